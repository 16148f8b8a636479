"""Training, evaluation and inference for the autoencoders, estimator style.

A *model directory* (like a TensorFlow Estimator's ``model_dir``) holds one run:

- ``config.json``: the configuration it was made with;
- ``checkpoint.pt``: model, optimizer, step, epoch, RNG states (data order, noise,
  dropout) and the per-epoch history, rewritten atomically after every epoch;
- TensorBoard event files (train scalars in the directory, eval in ``eval/``), image
  grids, and the embedding projector files of the eval codes;
- ``loss.png``, ``reconstructions.gif`` and ``reconstructions/epoch_NNNN.png``.

Training into an existing model directory resumes from its checkpoint, and ends with
the same weights, bit for bit on the CPU, as one uninterrupted run.  Options that
change what is trained (``RUN_KEYS``) must match the stored configuration; the others
(epochs, backend, memory format, device) may change between runs.

Under ``torchrun`` training is data parallel (DistributedDataParallel, gloo on CPU,
NCCL on GPU): every rank walks the same shuffled order and takes its slice of each
global batch; rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import viz
from .data import Dataset, Split, load_data
from .models import ConvAutoencoder, FCAutoencoder

__all__ = [
    "Config",
    "ConfigError",
    "RUN_KEYS",
    "resolve_config",
    "train",
    "evaluate",
    "load_model",
    "resolve_device",
    "build_model",
    "encode_split",
]

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FORMAT = "cae_kernels.train/1"
LR_DECAY_RATE = 0.96
LR_DECAY_STEPS = 1000
#: Noise for evaluation inputs comes from this fixed seed, so every evaluation of every
#: run sees the same noisy images.
EVAL_NOISE_SEED = 1234
GRID_IMAGES = 10
EMBEDDING_POINTS = 1000

MEMORY_FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


class ConfigError(ValueError):
    """An unusable configuration or model directory."""


@dataclass
class Config:
    model: str = "conv"
    filters: tuple[int, ...] = (16, 8, 8)
    downsample: str = "pool"
    hidden: tuple[int, ...] = (128, 64, 32)
    dropout: float | None = None
    epochs: int = 50
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    noise_factor: float = 0.0
    seed: int = 0
    data_dir: str | None = None
    limit: int | None = None
    backend: str = "cae"
    memory_format: str = "nhwc"  # the faster layout on the CPU, both backends (benchmarks/results)
    device: str = "cpu"

    def __post_init__(self):  # normalize, so that equal settings compare equal
        self.filters = tuple(int(f) for f in self.filters)
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.data_dir is not None:
            self.data_dir = str(Path(self.data_dir).expanduser().resolve())

    def validate(self) -> "Config":
        if self.model not in ("conv", "fc"):
            raise ConfigError(f"model must be 'conv' or 'fc', got {self.model!r}")
        if self.dropout is not None and self.model != "fc":
            raise ConfigError("dropout applies to the fully-connected model only (--model fc)")
        if self.memory_format not in MEMORY_FORMATS:
            raise ConfigError(f"memory format must be one of {sorted(MEMORY_FORMATS)}, got {self.memory_format!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be at least 1, got {self.limit}")
        if self.noise_factor < 0 or self.weight_decay < 0 or self.learning_rate <= 0:
            raise ConfigError("noise_factor and weight_decay must be >= 0, learning_rate > 0")
        return self

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


#: Options that decide what is trained: a model directory keeps them for life.
RUN_KEYS = ("model", "filters", "downsample", "hidden", "dropout", "batch_size", "learning_rate",
            "weight_decay", "noise_factor", "seed", "data_dir", "limit")


def _read_config(model_dir: Path) -> dict | None:
    path = model_dir / CONFIG_FILE
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable cae config ({exc})") from None
    if not isinstance(stored, dict) or stored.get("format") != CONFIG_FORMAT:
        raise ConfigError(f"{path} was not written by `cae train`; use another --model-dir")
    return stored["config"]


def resolve_config(model_dir, overrides: dict) -> tuple[Config, bool]:
    """The configuration of a run in ``model_dir`` given explicitly chosen ``overrides``.

    A new directory gets the defaults plus ``overrides``.  An existing one keeps its
    stored configuration; an override of one of ``RUN_KEYS`` that differs from it is an
    error naming every differing key.  Returns ``(config, exists)``.
    """
    model_dir = Path(model_dir)
    fields = {f.name for f in dataclasses.fields(Config)}
    if set(overrides) - fields:
        raise ConfigError(f"unknown option(s): {', '.join(sorted(set(overrides) - fields))}")
    stored = _read_config(model_dir)
    if stored is None:
        _refuse_foreign_files(model_dir)
        return Config(**overrides).validate(), False
    if set(stored) - fields:
        raise ConfigError(f"{model_dir / CONFIG_FILE} has settings this version does not know: "
                          f"{', '.join(sorted(set(stored) - fields))}")
    base = Config(**stored)
    merged = dataclasses.replace(base, **overrides)
    differing = [key for key in RUN_KEYS if key in overrides and getattr(merged, key) != getattr(base, key)]
    if differing:
        details = "; ".join(f"{key}: stored {_show(getattr(base, key))}, given {_show(getattr(merged, key))}"
                            for key in differing)
        raise ConfigError(f"{model_dir} holds a run with another configuration ({details}). "
                          f"Use a new --model-dir, or leave out these options to continue that run.")
    return merged.validate(), True


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


_OUTPUT_NAMES = (CHECKPOINT_FILE, "loss.png", "reconstructions.gif", "reconstructions", "eval")


def _refuse_foreign_files(model_dir: Path) -> None:
    """A directory without our config must not hold files we would overwrite."""
    clashes = [name for name in _OUTPUT_NAMES if (model_dir / name).exists()]
    if clashes:
        raise ConfigError(f"{model_dir} has no {CONFIG_FILE} but already holds {', '.join(clashes)}; "
                          f"refusing to overwrite files `cae train` did not write. Use another --model-dir.")


def atomic_write(path: Path, write: Callable) -> None:
    """Write ``path`` via ``write(file)`` into a temporary file beside it, fsync, then rename.

    Readers see the old file until the new one is complete; a crash or Ctrl-C midway
    leaves the old file whole (and no temporary file behind).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 -> what open() would have given
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _write_config(model_dir: Path, config: Config) -> None:
    text = json.dumps({"format": CONFIG_FORMAT, "config": config.to_json()}, indent=2) + "\n"
    atomic_write(model_dir / CONFIG_FILE, lambda f: f.write(text.encode()))


# --- devices, models ---------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``, checked: a clear error where CUDA cannot be used."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but CUDA is not available here "
                              f"(torch {torch.__version__}, no usable GPU/driver); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} asked for, but only {torch.cuda.device_count()} "
                              f"CUDA device(s) exist")
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return device


def build_model(config: Config) -> nn.Module:
    if config.model == "fc":
        return FCAutoencoder(config.hidden, config.dropout)
    return ConvAutoencoder(config.filters, config.downsample, backend=config.backend,
                           memory_format=MEMORY_FORMATS[config.memory_format])


def parameter_table(model: nn.Module) -> str:
    rows = [(name, "x".join(map(str, p.shape)), p.numel()) for name, p in model.named_parameters()]
    total = sum(count for _, _, count in rows)
    width = max(len("total"), *(len(name) for name, _, _ in rows))
    lines = [f"{'parameter':<{width}}  {'shape':>12}  {'count':>9}"]
    lines += [f"{name:<{width}}  {shape:>12}  {count:>9,}" for name, shape, count in rows]
    lines.append(f"{'total':<{width}}  {'':>12}  {total:>9,}")
    return "\n".join(lines)


def load_model(model_dir, backend: str | None = None, device: str | None = None,
               memory_format: str | None = None) -> tuple[nn.Module, Config, dict]:
    """The model of a model directory with its last checkpoint's weights, in eval mode.

    ``backend``, ``device`` and ``memory_format`` default to the stored ones.
    """
    model_dir = Path(model_dir)
    overrides = {k: v for k, v in (("backend", backend), ("device", device),
                                   ("memory_format", memory_format)) if v is not None}
    config, exists = resolve_config(model_dir, overrides)
    path = model_dir / CHECKPOINT_FILE
    if not exists or not path.exists():
        raise ConfigError(f"{model_dir} holds no trained model (no {CHECKPOINT_FILE}); run `cae train` first")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(config)
    model.load_state_dict(checkpoint["model"])
    model.to(resolve_device(config.device)).eval()
    return model, config, checkpoint


# --- one batch, one evaluation ------------------------------------------------------------


def _scaled(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device=device, dtype=torch.float32) / 255.0


def _noisy(x: torch.Tensor, factor: float, generator: torch.Generator) -> torch.Tensor:
    """The denoising input: x + factor * N(0, 1), clipped to [0, 1] (noise drawn on the CPU)."""
    if factor == 0:
        return x
    noise = torch.randn(x.shape, generator=generator).to(x.device)
    return (x + factor * noise).clamp_(0.0, 1.0)


def _weight_penalty(weights: Sequence[torch.Tensor], weight_decay: float) -> torch.Tensor:
    """L2 weight decay as TF's l2_regularizer: weight_decay * sum(w^2) / 2, biases excluded."""
    return weight_decay * sum(w.square().sum() for w in weights) / 2


def _train_step(model, optimizer, weights, x, target, weight_decay) -> tuple[float, float, float]:
    """One Adam step; returns the batch's cross-entropy, RMSE and gradient norm."""
    logits = model(x)
    loss = F.binary_cross_entropy_with_logits(logits, target)
    total = loss + _weight_penalty(weights, weight_decay) if weight_decay else loss
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    optimizer.step()
    with torch.no_grad():
        rmse = (torch.sigmoid(logits) - target).square().mean().sqrt()
    return loss.item(), rmse.item(), grad_norm.item()


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 256, noise_factor: float = 0.0,
             device: torch.device | str = "cpu") -> dict:
    """Mean sigmoid cross-entropy and RMSE of sigmoid(logits) vs the clean images, over ``split``."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    generator = torch.Generator().manual_seed(EVAL_NOISE_SEED)
    loss_sum = squared_sum = 0.0
    count = 0
    for start in range(0, len(split), batch_size):
        target = _scaled(split.images[start:start + batch_size], device)
        logits = model(_noisy(target, noise_factor, generator))
        loss_sum += F.binary_cross_entropy_with_logits(logits, target, reduction="sum").item()
        squared_sum += (torch.sigmoid(logits).double() - target.double()).square().sum().item()
        count += target.numel()
    model.train(was_training)
    return {"loss": loss_sum / count, "rmse": math.sqrt(squared_sum / count), "images": len(split)}


@torch.no_grad()
def reconstruct(model: nn.Module, images: torch.Tensor, noise_factor: float = 0.0,
                device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Rows for a comparison grid: originals, (noisy inputs,) reconstructions, in [0, 1] on the CPU."""
    model.eval()
    clean = _scaled(images, torch.device(device))
    noisy = _noisy(clean, noise_factor, torch.Generator().manual_seed(EVAL_NOISE_SEED))
    recon = torch.sigmoid(model(noisy)).reshape(clean.shape)
    rows = [clean, noisy, recon] if noise_factor else [clean, recon]
    return [r.cpu() for r in rows]


@torch.no_grad()
def encode_split(model: nn.Module, split: Split, batch_size: int = 256,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """The codes of a split's clean images, flattened: [N, code size], on the CPU."""
    model.eval()
    codes = [model.encode(_scaled(split.images[s:s + batch_size], torch.device(device))).flatten(1).cpu()
             for s in range(0, len(split), batch_size)]
    return torch.cat(codes)


# --- distributed --------------------------------------------------------------------------


@dataclass
class _World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _join_world(device: torch.device) -> tuple[_World, torch.device]:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return _World(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                **({"device_id": device} if device.type == "cuda" else {}))
    return _World(rank, size, local_rank, owns), device


# --- the training loop --------------------------------------------------------------------


class _Progress:
    """A one-line progress bar with images/s, drawn only on a terminal."""

    def __init__(self, stream, label: str, total_steps: int, enabled: bool):
        self.stream, self.label, self.total = stream, label, total_steps
        self.enabled = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.start = time.perf_counter()
        self.last_draw = 0.0

    def update(self, steps: int, images: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last_draw < 0.1 and steps < self.total):
            return
        self.last_draw = now
        filled = int(24 * steps / self.total)
        rate = images / max(now - self.start, 1e-9)
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (24 - filled)}] "
                          f"{steps}/{self.total} {rate:,.0f} img/s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()


@dataclass
class TrainResult:
    model: nn.Module
    config: Config
    history: list[dict] = field(default_factory=list)
    step: int = 0


def _rng_state(noise: torch.Generator, device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "noise": noise.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, noise: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    noise.set_state(state["noise"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _learning_rate(config: Config, step: int) -> float:
    """Exponential decay, staircase: lr * 0.96 ** (step // 1000), as the original."""
    return config.learning_rate * LR_DECAY_RATE ** (step // LR_DECAY_STEPS)


def train(model_dir, *, out=None, progress: bool = True, log_every: int = 10,
          dataset: Dataset | None = None, **options) -> TrainResult:
    """Train (or resume training) the run in ``model_dir``; ``options`` are ``Config`` fields.

    Only the options given explicitly are checked against an existing run's stored
    configuration.  Writes config, checkpoints, event files and pictures into
    ``model_dir`` (rank 0 only).  On KeyboardInterrupt the last checkpoint stays whole,
    a note on how to resume is printed and the interrupt is re-raised.
    """
    out = out if out is not None else sys.stdout
    model_dir = Path(model_dir)
    config, _ = resolve_config(model_dir, options)
    device = resolve_device(config.device)
    world, device = _join_world(device)
    if config.batch_size % world.size:
        raise ConfigError(f"batch size {config.batch_size} is not divisible by the {world.size} processes")

    def say(text: str) -> None:
        if world.main:
            print(text, file=out, flush=True)

    data = dataset if dataset is not None else load_data(config.data_dir)
    train_split = data.train.head(config.limit)
    eval_split = data.eval.head(config.limit)

    torch.manual_seed(config.seed)
    model = build_model(config).to(device)
    if world.rank:  # different dropout masks on each rank
        torch.manual_seed(config.seed + 7919 * world.rank)
    order_generator = torch.Generator().manual_seed(config.seed)
    noise_generator = torch.Generator().manual_seed(config.seed + 104729 * (world.rank + 1))
    weights = model.weights()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)

    step, epoch, history = 0, 0, []
    checkpoint_path = model_dir / CHECKPOINT_FILE
    if checkpoint_path.exists():
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, epoch, history = checkpoint["step"], checkpoint["epoch"], checkpoint["history"]
        order_generator.set_state(checkpoint["rng"]["data_order"])
        ranks = checkpoint["rng"]["ranks"]
        if len(ranks) == world.size:
            _set_rng_state(ranks[world.rank], noise_generator, device)
        else:
            say(f"note: the checkpoint was written by {len(ranks)} process(es), this run has "
                f"{world.size}; noise and dropout restart from fresh seeds (not bitwise resumable)")
            noise_generator.manual_seed(config.seed + 104729 * (world.rank + 1) + epoch)
    net = model
    if world.size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    if epoch >= config.epochs:
        say(f"{model_dir}: already trained for {epoch} epoch(s) (step {step}); "
            f"nothing to do (raise --epochs to train on)")
        return TrainResult(model.eval(), config, history, step)
    if world.main:
        model_dir.mkdir(parents=True, exist_ok=True)
        _write_config(model_dir, config)

    say(f"{'resuming' if step else 'training'} {type(model).__name__} in {model_dir} "
        f"at epoch {epoch + 1}/{config.epochs}, step {step}")
    say(f"data: {data.describe()}" + (f" (limited to {len(train_split)}/{len(eval_split)})"
                                      if config.limit else ""))
    say(f"backend: {config.backend if config.model == 'conv' else 'torch (nn.Linear)'}, "
        f"memory format: {config.memory_format}, device: {device}"
        + (f", {world.size} processes" if world.size > 1 else ""))
    say(parameter_table(model))

    writers = _Writers(model_dir, step if step else None) if world.main else None
    grid_images = eval_split.images[:GRID_IMAGES]
    steps_per_epoch = math.ceil(len(train_split) / config.batch_size)
    saved = (epoch, step)  # what the checkpoint on disk holds
    try:
        for epoch in range(epoch + 1, config.epochs + 1):
            net.train()
            started = time.perf_counter()
            bar = _Progress(sys.stderr, f"epoch {epoch}/{config.epochs}", steps_per_epoch,
                            progress and world.main)
            order = torch.randperm(len(train_split), generator=order_generator)
            loss_sum, seen = 0.0, 0
            for index, start in enumerate(range(0, len(order), config.batch_size), 1):
                batch = order[start:start + config.batch_size]
                if len(batch) < world.size:
                    continue  # too few for every rank to get one; skipped on all ranks alike
                target = _scaled(train_split.images[batch[world.rank::world.size]], device)
                lr = _learning_rate(config, step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss, rmse, grad_norm = _train_step(net, optimizer, weights,
                                              _noisy(target, config.noise_factor, noise_generator),
                                              target, config.weight_decay)
                step += 1
                loss_sum += loss * len(target)
                seen += len(target)
                bar.update(index, seen * world.size)
                if writers and (step % log_every == 0 or index == steps_per_epoch):
                    writers.train_scalars(step, loss=loss, rmse=rmse, learning_rate=lr, grad_norm=grad_norm)
            bar.close()
            seconds = time.perf_counter() - started
            record = {"epoch": epoch, "step": step, "train_loss": _mean_over_ranks(loss_sum, seen, world),
                      "learning_rate": _learning_rate(config, step), "seconds": seconds,
                      "images_per_second": len(train_split) / seconds}
            if world.main:
                metrics = evaluate(model, eval_split, config.batch_size, config.noise_factor, device)
                record.update(eval_loss=metrics["loss"], eval_rmse=metrics["rmse"])
            rng = {"data_order": order_generator.get_state(),
                   "ranks": _gather(_rng_state(noise_generator, device), world)}
            if world.main:
                history.append(record)
                rows = reconstruct(model, grid_images, config.noise_factor, device)
                writers.epoch_end(step, record, rows)
                _save_frame(model_dir, epoch, rows)
                atomic_write(checkpoint_path, lambda f: torch.save({
                    "config": config.to_json(), "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                    "history": history, "rng": rng}, f))
                saved = (epoch, step)
                _write_pictures(model_dir, history)
                say(f"epoch {epoch}/{config.epochs}  step {step}  train loss {record['train_loss']:.4f}  "
                    f"eval loss {record['eval_loss']:.4f}  eval rmse {record['eval_rmse']:.4f}  "
                    f"lr {record['learning_rate']:.2e}  {seconds:.1f}s ({record['images_per_second']:,.0f} img/s)")
        if world.main:
            codes_split = eval_split.head(EMBEDDING_POINTS)
            writers.embedding(step, encode_split(model, codes_split, config.batch_size, device), codes_split)
    except KeyboardInterrupt:
        if world.main:
            kept = (f"{checkpoint_path} holds epoch {saved[0]} (step {saved[1]}), intact"
                    if saved[1] else "no checkpoint was written yet")
            print(f"\ninterrupted in epoch {epoch}; {kept}. Resume with the same command, or: "
                  f"cae train --model-dir {model_dir} --epochs {config.epochs}", file=out, flush=True)
        raise
    finally:
        if writers:
            writers.close()
        if world.owns_group:
            dist.destroy_process_group()
    return TrainResult(model.eval(), config, history, step)


def _mean_over_ranks(loss_sum: float, seen: int, world: _World) -> float:
    if world.size > 1:
        totals = torch.tensor([loss_sum, float(seen)], dtype=torch.float64)
        dist.all_reduce(totals)
        loss_sum, seen = totals.tolist()
    return loss_sum / max(seen, 1)


def _gather(state: dict, world: _World) -> list[dict]:
    if world.size == 1:
        return [state]
    states = [None] * world.size
    dist.all_gather_object(states, state)
    return states


def _save_frame(model_dir: Path, epoch: int, rows: list[torch.Tensor]) -> None:
    frames = model_dir / "reconstructions"
    frames.mkdir(exist_ok=True)
    grid = viz.comparison_grid(rows)
    atomic_write(frames / f"epoch_{epoch:04d}.png", lambda f: viz.save_png(grid, f))


def _write_pictures(model_dir: Path, history: list[dict]) -> None:
    atomic_write(model_dir / "loss.png", lambda f: viz.plot_losses(history, f))
    paths = [model_dir / "reconstructions" / f"epoch_{record['epoch']:04d}.png" for record in history]
    frames = [viz.read_png(path) for path in paths if path.exists()]
    if frames:
        atomic_write(model_dir / "reconstructions.gif", lambda f: viz.save_gif(frames, f))


class _Writers:
    """TensorBoard event files: train scalars in model_dir, eval scalars and images in eval/."""

    def __init__(self, model_dir: Path, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events logged after the checkpoint by an interrupted run.
        self.train = SummaryWriter(str(model_dir), purge_step=purge_step)
        self.eval = SummaryWriter(str(model_dir / "eval"), purge_step=purge_step)

    def train_scalars(self, step: int, **values: float) -> None:
        for tag, value in values.items():
            self.train.add_scalar(tag, value, step)

    def epoch_end(self, step: int, record: dict, rows: list[torch.Tensor]) -> None:
        self.train.add_scalar("epoch_loss", record["train_loss"], step)
        self.train.add_scalar("images_per_second", record["images_per_second"], step)
        self.eval.add_scalar("loss", record["eval_loss"], step)
        self.eval.add_scalar("rmse", record["eval_rmse"], step)
        self.eval.add_scalar("epoch_loss", record["eval_loss"], step)
        grid = torch.from_numpy(viz.comparison_grid(rows))
        self.eval.add_image("reconstructions", grid, step, dataformats="HW")
        self.train.flush()
        self.eval.flush()

    def embedding(self, step: int, codes: torch.Tensor, split: Split) -> None:
        self.train.add_embedding(codes, metadata=split.labels.tolist(),
                                 label_img=split.images.float() / 255.0, global_step=step, tag="codes")

    def close(self) -> None:
        self.train.close()
        self.eval.close()
