"""A trained model put to use: loading it from its model directory, evaluation, reconstructions, codes.

Also the pieces training shares with them: the device check, building the model of a
configuration, scaling images to [0, 1] and the denoising input noise.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoints
from .data import Split
from .models import ConvAutoencoder, FCAutoencoder
from .rundir import MEMORY_FORMATS, Config, ConfigError, resolve_config

__all__ = ["build_model", "encode_split", "evaluate", "load_model", "parameter_table", "reconstruct",
           "resolve_device"]

#: Noise for evaluation inputs comes from this fixed seed, so every evaluation of every
#: run sees the same noisy images.
EVAL_NOISE_SEED = 1234


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA where a GPU is usable, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``,
    checked: a clear error where CUDA cannot be used."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but CUDA is not available here "
                              f"(torch {torch.__version__}, no usable GPU/driver); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} asked for, but only {torch.cuda.device_count()} "
                              f"CUDA device(s) exist")
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
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
    """The model of a model directory with its newest intact checkpoint's weights, in eval mode.

    ``backend``, ``device`` and ``memory_format`` default to the stored ones.  A damaged
    newest checkpoint is skipped with a warning on stderr (``checkpoints.load``).
    """
    model_dir = Path(model_dir)
    overrides = {k: v for k, v in (("backend", backend), ("device", device),
                                   ("memory_format", memory_format)) if v is not None}
    config, exists = resolve_config(model_dir, overrides)
    found = checkpoints.load(model_dir) if exists else None
    if found is None:
        raise ConfigError(f"{model_dir} holds no trained model (no checkpoint); run `cae train` first")
    _, checkpoint = found
    model = build_model(config)
    model.load_state_dict(checkpoint["model"])
    model.to(resolve_device(config.device)).eval()
    return model, config, checkpoint


def scaled(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images as float32 in [0, 1] on ``device``."""
    return images.to(device=device, dtype=torch.float32) / 255.0


def noisy(x: torch.Tensor, factor: float, generator: torch.Generator) -> torch.Tensor:
    """The denoising input: x + factor * N(0, 1), clipped to [0, 1] (noise drawn on the CPU)."""
    if factor == 0:
        return x
    noise = torch.randn(x.shape, generator=generator).to(x.device)
    return (x + factor * noise).clamp_(0.0, 1.0)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 256, noise_factor: float = 0.0,
             device: torch.device | str = "cpu") -> dict:
    """Mean sigmoid cross-entropy and RMSE of sigmoid(logits) vs the clean images, over ``split``."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    generator = torch.Generator().manual_seed(EVAL_NOISE_SEED)
    # Summed on the device in float64, read once at the end.
    loss_sum, squared_sum = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(2))
    count = 0
    for start in range(0, len(split), batch_size):
        target = scaled(split.images[start:start + batch_size], device)
        logits = model(noisy(target, noise_factor, generator))
        loss_sum += F.binary_cross_entropy_with_logits(logits, target, reduction="sum").double()
        squared_sum += (torch.sigmoid(logits).double() - target.double()).square().sum()
        count += target.numel()
    model.train(was_training)
    loss_sum, squared_sum = loss_sum.item(), squared_sum.item()
    return {"loss": loss_sum / count, "rmse": math.sqrt(squared_sum / count), "images": len(split)}


@torch.no_grad()
def reconstruct(model: nn.Module, images: torch.Tensor, noise_factor: float = 0.0,
                device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Rows for a comparison grid: originals, (noisy inputs,) reconstructions, in [0, 1] on the CPU."""
    model.eval()
    clean = scaled(images, torch.device(device))
    inputs = noisy(clean, noise_factor, torch.Generator().manual_seed(EVAL_NOISE_SEED))
    recon = torch.sigmoid(model(inputs)).reshape(clean.shape)
    rows = [clean, inputs, recon] if noise_factor else [clean, recon]
    return [r.cpu() for r in rows]


@torch.no_grad()
def encode_split(model: nn.Module, split: Split, batch_size: int = 256,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """The codes of a split's clean images, flattened: [N, code size], on the CPU."""
    model.eval()
    codes = [model.encode(scaled(split.images[s:s + batch_size], torch.device(device))).flatten(1).cpu()
             for s in range(0, len(split), batch_size)]
    return torch.cat(codes)
