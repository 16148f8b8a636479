"""Training, estimator style: one run per model directory, resumable bit for bit.

Training into an existing model directory (``rundir``) resumes from its newest intact
checkpoint (``checkpoints``) and ends with the same weights, bit for bit on the CPU, as
one uninterrupted run: the checkpoint holds the model, optimizer, step, epoch, the RNG
states (data order, noise, dropout) and the per-epoch history.  One trainer at a time
holds a directory (``rundir.lock``).  Under ``torchrun`` training is data parallel
(``distributed``); rank 0 alone writes files.  On CUDA with one process the step runs
from a CUDA graph captured after a few eager steps (``GraphedStep``).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import cae_kernels
from cae_kernels.optim import Adam

from . import checkpoints, rundir
from .data import Dataset, load_data
from .distributed import World, gather, join_world, mean_over_ranks
from .evaluation import build_model, encode_split, evaluate, noisy, parameter_table, reconstruct, resolve_device, scaled
from .rundir import Config, ConfigError, resolve_config
from .summaries import Writers, save_frame, write_pictures

__all__ = ["CudaGraph", "DirectCalls", "GraphedStep", "TrainResult", "train"]

LR_DECAY_RATE = 0.96
LR_DECAY_STEPS = 1000
GRID_IMAGES = 10
EMBEDDING_POINTS = 1000
WARMUP_STEPS = 3  # eager steps before the capture, as PyTorch's whole-network example takes


@dataclass
class TrainResult:
    model: nn.Module
    config: Config
    history: list[dict] = field(default_factory=list)
    step: int = 0


def _learning_rate(config: Config, step: int) -> float:
    """Exponential decay, staircase: lr * 0.96 ** (step // 1000), as the original."""
    return config.learning_rate * LR_DECAY_RATE ** (step // LR_DECAY_STEPS)


def _weight_penalty(weights: Sequence[torch.Tensor], weight_decay: float) -> torch.Tensor:
    """L2 weight decay as TF's l2_regularizer: weight_decay * sum(w^2) / 2, biases excluded."""
    return weight_decay * sum(w.square().sum() for w in weights) / 2


# --precision: the forward's dtype under autocast (None: float32 throughout).
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}


_SEEDS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _seed(loss: torch.Tensor) -> torch.Tensor:
    """The backward's seed, d total / d total = 1: one tensor per device and dtype, made in
    the first (eager) step, where ``backward()`` would fill a new one every step (a kernel)."""
    key = (loss.device, loss.dtype)
    if key not in _SEEDS:
        _SEEDS[key] = torch.ones((), dtype=loss.dtype, device=loss.device)
    return _SEEDS[key]


def _train_step(model, optimizer, weights, x, target, weight_decay, autocast=None,
                loss_sum=None) -> tuple[torch.Tensor, ...]:
    """One Adam step; returns the batch's cross-entropy, RMSE and gradient norm as 0-d tensors
    on the model's device, so that a step never waits for the device: they are read at
    log intervals. ``autocast``: the forward's lower precision (the convolutions; the loss,
    the gradients' accumulation and Adam stay float32), or None. ``loss_sum``: a 0-d tensor
    the batch's summed loss is added to (read at the epoch's end), or None."""
    # No cast cache: a captured step must cast the weights it is replayed with.
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None, cache_enabled=False):
        if hasattr(model, "module"):  # DistributedDataParallel: its forward syncs the gradients
            loss, rmse = model.module.loss(model(x), target)
        else:  # the forward and the loss in one op where the model fuses them
            _, loss, rmse = model.forward_loss(x, target)
    total = loss + _weight_penalty(weights, weight_decay) if weight_decay else loss
    optimizer.zero_grad(set_to_none=True)
    total.backward(_seed(total))
    optimizer.step()
    # cae_kernels.optim.Adam read the gradients' norm in its step; torch's Adam did not.
    grad_norm = getattr(optimizer, "grad_norm", None)
    if grad_norm is None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)  # a kernel or two, not one per tensor
    loss = loss.detach()
    if loss_sum is not None:
        loss_sum.add_(loss, alpha=len(target))  # one kernel
    return loss, rmse, grad_norm


def _use_cuda_graph(requested: bool | None, device: torch.device, world: World) -> bool:
    """Whether the training step runs from a CUDA graph: ``requested`` True (``--cuda-graph``),
    False (``--no-cuda-graph``) or None (the default: on CUDA, one process)."""
    if requested is False:
        return False
    if device.type != "cuda":
        if requested:
            raise ConfigError(f"--cuda-graph needs a CUDA device; this run's device is {device} "
                              f"(leave --cuda-graph out, or pass --device cuda)")
        return False
    if world.size > 1:
        if requested:
            raise ConfigError(f"--cuda-graph is not supported with {world.size} torchrun processes "
                              f"(DistributedDataParallel's steps run eagerly); leave it out")
        return False
    return True


class CudaGraph:
    """One function's CUDA work captured once and replayed (``torch.cuda.CUDAGraph``), as
    PyTorch's notes on whole-network capture prescribe: warm-up calls on a side stream
    (lazy initialization and the allocator's first blocks happen outside the capture),
    then the capture on that stream.  ``DirectCalls`` is its eager twin."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.graph = torch.cuda.CUDAGraph()
        self.outputs = None

    def warm_up(self, fn):
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                result = fn()
            current.wait_stream(self.stream)
        return result

    def capture(self, fn) -> None:
        """Records ``fn``'s work without running it; ``replay`` runs it."""
        with torch.cuda.device(self.device), torch.cuda.graph(self.graph, stream=self.stream):
            self.outputs = fn()

    def replay(self):
        """Runs the captured work on the current stream; returns the captured outputs,
        the same tensors every time, overwritten by each replay."""
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.outputs


class DirectCalls:
    """``CudaGraph``'s eager twin: ``capture`` keeps the function, ``replay`` calls it.
    With it the graphed step's logic runs where no GPU is (the tests)."""

    def __init__(self):
        self.fn = None

    def warm_up(self, fn):
        return fn()

    def capture(self, fn) -> None:
        self.fn = fn

    def replay(self):
        return self.fn()


class GraphedStep:
    """``step(x, target)`` run from a captured graph: ``graph`` is a ``CudaGraph`` (or its
    twin ``DirectCalls``).

    The first ``warmup`` batches of ``batch`` images run eagerly through
    ``graph.warm_up``.  At the next one the step is captured once on static input and
    target buffers, after ``release_grads`` (the gradients set to None, so that the
    captured backward allocates them from the graph's own memory), and replayed; every
    later batch of ``batch`` images is copied into the buffers and replayed.  A batch of
    another size (an epoch's short last batch, which the loader keeps) runs eagerly.
    """

    def __init__(self, step, graph, batch: int, release_grads, warmup: int = WARMUP_STEPS):
        self.step, self.graph, self.batch, self.release_grads, self.warmup = step, graph, batch, release_grads, warmup
        self.warmed = 0
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None  # input, target: set at the capture

    def __call__(self, x: torch.Tensor, target: torch.Tensor):
        if len(x) != self.batch:
            return self.step(x, target)
        if self.static is None:
            if self.warmed < self.warmup:
                self.warmed += 1
                return self.graph.warm_up(lambda: self.step(x, target))
            self.static = (torch.empty_like(x), torch.empty_like(target))
            self.release_grads()
            self.graph.capture(lambda: self.step(*self.static))
        self.static[0].copy_(x)
        self.static[1].copy_(target)
        return self.graph.replay()


def _adam(model: nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """The conv autoencoder on this package's kernels (backends "cae", "sim") trains with
    ``cae_kernels.optim.Adam`` on the model's ops (on CUDA its step and the gradient norm
    are one launch); the others with torch's Adam (fused on CUDA)."""
    if getattr(model, "backend", "torch") in ("cae", "sim"):
        return Adam(model.parameters(), lr=lr, functions=model.functions)
    return torch.optim.Adam(model.parameters(), lr=lr, fused=_fused_adam(device))


def _fused_adam(device: torch.device) -> bool | None:
    """On CUDA the fused Adam: one kernel for every parameter instead of a few per tensor."""
    return True if device.type == "cuda" else None


def _use_fused_adam(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """After ``load_state_dict``: the saved groups carry the writing run's choice (a checkpoint
    written on the CPU would turn the fused Adam off on CUDA, and the reverse), so this
    run's device decides again; the step counts follow (fused: float32 on the device)."""
    fused = _fused_adam(device)
    for group in optimizer.param_groups:
        group["fused"] = fused
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and fused:
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def _make_capturable(optimizer: torch.optim.Optimizer, lr: torch.Tensor) -> None:
    """Adam for a captured step: capturable and fused, its step counts on the device, the
    learning rate ``lr``, a device tensor the schedule fills in place (a number would be
    fixed in the graph).  After ``load_state_dict``, whose saved groups replace these
    settings and whose state tensors are new ones: so before the capture."""
    for group in optimizer.param_groups:
        group.update(capturable=True, fused=True, lr=lr)
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state:
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def _optimizer_state(optimizer: torch.optim.Optimizer, lr: float) -> dict:
    """The optimizer's state_dict as an eager run writes it: the learning rate a number,
    not capturable (a graphed run's own settings, made again when it resumes)."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if isinstance(group["lr"], torch.Tensor):
            group.update(lr=lr, capturable=False)
    return state


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


def train(model_dir, *, out=None, progress: bool = True, log_every: int = 10,
          keep_checkpoints: int = checkpoints.DEFAULT_KEEP, dataset: Dataset | None = None,
          cuda_graph: bool | None = None, fused: bool | None = None, precision: str = "float32",
          **options) -> TrainResult:
    """Train (or resume training) the run in ``model_dir``; ``options`` are ``Config`` fields.

    ``cuda_graph``: run the step from a CUDA graph captured after ``WARMUP_STEPS`` eager
    steps (None, the default: on CUDA with one process; True where that is not possible
    is a ``ConfigError``). ``fused``: the conv autoencoder on the block ops (True) or one
    op per layer (False); None, the default, leaves it to the model (``ConvAutoencoder``:
    fused on CUDA). It does not change the numbers, so a run may resume with another.
    ``precision``: "float32", or "bfloat16" for the forward's convolutions under autocast
    (their products in bfloat16, sums in float32; on CUDA, or with backend "torch": the
    CPU kernels compute in float32 only, a ``ConfigError``). A run may resume with another.

    Only the options given explicitly are checked against an existing run's stored
    configuration.  Writes config, checkpoints (the last ``keep_checkpoints``), event
    files and pictures into ``model_dir`` (rank 0 only), which it holds locked: a second
    trainer gets ``RunDirBusyError``.  On KeyboardInterrupt the last checkpoint stays
    whole, a note on how to resume is printed and the interrupt is re-raised.
    """
    if keep_checkpoints < 1:
        raise ConfigError(f"keep_checkpoints must be at least 1, got {keep_checkpoints}")
    model_dir = Path(model_dir)
    config, _ = resolve_config(model_dir, options)
    world, device = join_world(resolve_device(config.device))
    try:
        if config.batch_size % world.size:
            raise ConfigError(f"batch size {config.batch_size} is not divisible by the {world.size} processes")
        graphed = _use_cuda_graph(cuda_graph, device, world)
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if PRECISIONS[precision] is not None and device.type == "cpu" and config.model == "conv" \
                and config.backend == "cae":
            raise ConfigError(f"--precision {precision} needs CUDA or backend torch: the CPU kernels compute in "
                              f"float32 only")
        if fused and (config.model != "conv" or config.backend == "torch"):
            raise ConfigError(f"--fused runs this package's block ops: the conv model on backend 'cae', "
                              f"not the {config.model} model on backend {config.backend!r}")
        data = dataset if dataset is not None else load_data(config.data_dir)
        with rundir.lock(model_dir) if world.main else contextlib.nullcontext():
            config, _ = resolve_config(model_dir, options)  # again, now that no other trainer can write it
            trainer = _Trainer(model_dir, config, world, device, data, out if out is not None else sys.stdout,
                               graphed, PRECISIONS[precision])
            if fused is not None and config.model == "conv":
                trainer.model.fused = fused
            return trainer.run(progress, log_every, keep_checkpoints)
    finally:
        world.leave()


class _Trainer:
    """One call of ``train``: the model, optimizer and generators, restored, then the epochs."""

    def __init__(self, model_dir: Path, config: Config, world: World, device: torch.device, data: Dataset,
                 out, graphed: bool = False, autocast: torch.dtype | None = None):
        self.model_dir, self.config, self.world, self.device, self.data, self.out, self.graphed = (
            model_dir, config, world, device, data, out, graphed)
        self.autocast = autocast
        self.train_split = data.train.head(config.limit)
        self.eval_split = data.eval.head(config.limit)
        torch.manual_seed(config.seed)
        self.model = build_model(config).to(device)
        if world.rank:  # different dropout masks on each rank
            torch.manual_seed(config.seed + 7919 * world.rank)
        self.order_generator = torch.Generator().manual_seed(config.seed)
        self.noise_generator = torch.Generator().manual_seed(self._noise_seed())
        self.weights = self.model.weights()
        self.optimizer = _adam(self.model, config.learning_rate, device)
        self.lr = config.learning_rate  # the learning rate of the last step, as set
        self.lr_tensor: torch.Tensor | None = None  # graphed: Adam's learning rate on the device
        # The epoch's summed loss, on the device (a graphed step adds to it: one tensor for the run).
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.step, self.epoch, self.history = 0, 0, []
        self.saved: tuple[Path, int, int] | None = None  # the newest checkpoint on disk: path, epoch, step

    def _noise_seed(self) -> int:
        return self.config.seed + 104729 * (self.world.rank + 1)

    def say(self, text: str) -> None:
        if self.world.main:
            print(text, file=self.out, flush=True)

    def restore(self) -> None:
        """Continue from the newest intact checkpoint, if any (a damaged newer one is skipped, warned)."""
        found = checkpoints.load(self.model_dir, warn=checkpoints.warn_stderr if self.world.main else None)
        if found is None:
            return
        path, checkpoint = found
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        _use_fused_adam(self.optimizer, self.device)
        self.step, self.epoch, self.history = checkpoint["step"], checkpoint["epoch"], checkpoint["history"]
        self.saved = (path, self.epoch, self.step)
        self.order_generator.set_state(checkpoint["rng"]["data_order"])
        ranks = checkpoint["rng"]["ranks"]
        if len(ranks) == self.world.size:
            _set_rng_state(ranks[self.world.rank], self.noise_generator, self.device)
        else:
            self.say(f"note: the checkpoint was written by {len(ranks)} process(es), this run has "
                     f"{self.world.size}; noise and dropout restart from fresh seeds (not bitwise resumable)")
            self.noise_generator.manual_seed(self._noise_seed() + self.epoch)

    def announce(self) -> None:
        config, world = self.config, self.world
        self.say(f"{'resuming' if self.step else 'training'} {type(self.model).__name__} in {self.model_dir} "
                 f"at epoch {self.epoch + 1}/{config.epochs}, step {self.step}")
        self.say(f"data: {self.data.describe()}" + (f" (limited to {len(self.train_split)}/{len(self.eval_split)})"
                                                    if config.limit else ""))
        uses_cpu_kernels = config.model == "conv" and config.backend == "cae" and self.device.type == "cpu"
        self.say(f"backend: {config.backend if config.model == 'conv' else 'torch (nn.Linear)'}, "
                 f"memory format: {config.memory_format}, device: {self.device}"
                 + (f" (CPU kernels: {cae_kernels.cpu_capability()})" if uses_cpu_kernels else "")
                 + (f", {world.size} processes" if world.size > 1 else "")
                 + (f", precision: {str(self.autocast).removeprefix('torch.')} (autocast)" if self.autocast else ""))
        if self.device.type == "cuda":
            self.say(f"CUDA graph: the step is captured after {WARMUP_STEPS} eager steps (--no-cuda-graph: eager)"
                     if self.graphed else "CUDA graph: off, eager steps")
        self.say(parameter_table(self.model))

    def step_runner(self, net: nn.Module):
        """The training step, ``(x, target) -> (loss, rmse, grad_norm)``, its loss added to
        ``loss_sum``: eager, or graphed (a ``GraphedStep``, set up after ``restore``)."""
        config = self.config

        def step(x, target):
            # loss_sum: no host sync, read at the epoch's end.
            return _train_step(net, self.optimizer, self.weights, x, target, config.weight_decay, self.autocast,
                               self.loss_sum)

        if not self.graphed:
            return step
        self.lr_tensor = torch.tensor(self.lr, dtype=torch.float32, device=self.device)
        _make_capturable(self.optimizer, self.lr_tensor)
        return GraphedStep(step, self.new_graph(), config.batch_size,
                           release_grads=lambda: self.optimizer.zero_grad(set_to_none=True))

    def new_graph(self):
        return CudaGraph(self.device)

    def set_learning_rate(self, lr: float) -> None:
        if self.lr_tensor is None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        elif lr != self.lr:
            self.lr_tensor.fill_(lr)  # in place: the graph reads this tensor
        self.lr = lr

    def run(self, progress: bool, log_every: int, keep: int) -> TrainResult:
        config, world = self.config, self.world
        self.restore()
        if self.epoch >= config.epochs:
            self.say(f"{self.model_dir}: already trained for {self.epoch} epoch(s) (step {self.step}); "
                     f"nothing to do (raise --epochs to train on)")
            return TrainResult(self.model.eval(), config, self.history, self.step)
        if world.main:
            rundir.write_config(self.model_dir, config)
        self.announce()
        net = self.model
        if world.size > 1:
            net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        step = self.step_runner(net)
        writers = Writers(self.model_dir, self.step if self.step else None) if world.main else None
        try:
            for epoch in range(self.epoch + 1, config.epochs + 1):
                self.epoch = epoch
                record = self.train_epoch(net, step, writers, progress and world.main, log_every)
                self.end_epoch(record, writers, keep)
            if world.main:
                codes_split = self.eval_split.head(EMBEDDING_POINTS)
                codes = encode_split(self.model, codes_split, config.batch_size, self.device)
                writers.embedding(self.step, codes, codes_split)
        except KeyboardInterrupt:
            if world.main:
                kept = (f"{self.saved[0]} holds epoch {self.saved[1]} (step {self.saved[2]}), intact"
                        if self.saved else "no checkpoint was written yet")
                print(f"\ninterrupted in epoch {self.epoch}; {kept}. Resume with the same command, or: "
                      f"cae train --model-dir {self.model_dir} --epochs {config.epochs}", file=self.out, flush=True)
            raise
        finally:
            if writers:
                writers.close()
        return TrainResult(self.model.eval(), config, self.history, self.step)

    def train_epoch(self, net: nn.Module, step, writers: Writers | None, progress: bool, log_every: int) -> dict:
        """One pass over the shuffled training split; returns the epoch's record (without eval)."""
        config, world, split = self.config, self.world, self.train_split
        net.train()
        started = time.perf_counter()
        steps_per_epoch = math.ceil(len(split) / config.batch_size)
        # disable=None: drawn on a terminal only.
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {self.epoch}/{config.epochs}", unit="step",
                   leave=False, file=sys.stderr, disable=None if progress else True, dynamic_ncols=True)
        order = torch.randperm(len(split), generator=self.order_generator)
        self.loss_sum.zero_()
        seen = 0
        with bar:
            for index, start in enumerate(range(0, len(order), config.batch_size), 1):
                batch = order[start:start + config.batch_size]
                if len(batch) < world.size:
                    continue  # too few for every rank to get one; skipped on all ranks alike
                target = scaled(split.images[batch[world.rank::world.size]], self.device)
                lr = _learning_rate(config, self.step)
                self.set_learning_rate(lr)
                loss, rmse, grad_norm = step(noisy(target, config.noise_factor, self.noise_generator), target)
                self.step += 1
                seen += len(target)
                rate = seen * world.size / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} img/s", refresh=False)
                bar.update(1)
                if writers and (self.step % log_every == 0 or index == steps_per_epoch):
                    writers.train_scalars(self.step, loss=loss.item(), rmse=rmse.item(), learning_rate=lr,
                                          grad_norm=grad_norm.item())
        seconds = time.perf_counter() - started
        return {"epoch": self.epoch, "step": self.step,
                "train_loss": mean_over_ranks(self.loss_sum.item(), seen, world),
                "learning_rate": _learning_rate(config, self.step), "seconds": seconds,
                "images_per_second": len(split) / seconds}

    def end_epoch(self, record: dict, writers: Writers | None, keep: int) -> None:
        """Evaluate, then (rank 0) checkpoint, log, draw and report the epoch."""
        config, world, epoch, step = self.config, self.world, self.epoch, self.step
        rng = {"data_order": self.order_generator.get_state(),
               "ranks": gather(_rng_state(self.noise_generator, self.device), world)}
        if not world.main:
            return
        metrics = evaluate(self.model, self.eval_split, config.batch_size, config.noise_factor, self.device)
        record.update(eval_loss=metrics["loss"], eval_rmse=metrics["rmse"])
        self.history.append(record)
        rows = reconstruct(self.model, self.eval_split.images[:GRID_IMAGES], config.noise_factor, self.device)
        writers.epoch_end(step, record, rows)
        save_frame(self.model_dir, epoch, rows)
        path = checkpoints.save(self.model_dir, {
            "config": config.to_json(), "model": self.model.state_dict(),
            "optimizer": _optimizer_state(self.optimizer, self.lr), "step": step, "epoch": epoch,
            "history": self.history, "rng": rng}, keep)
        self.saved = (path, epoch, step)
        write_pictures(self.model_dir, self.history)
        self.say(f"epoch {epoch}/{config.epochs}  step {step}  train loss {record['train_loss']:.4f}  "
                 f"eval loss {record['eval_loss']:.4f}  eval rmse {record['eval_rmse']:.4f}  "
                 f"lr {record['learning_rate']:.2e}  {record['seconds']:.1f}s "
                 f"({record['images_per_second']:,.0f} img/s)")
