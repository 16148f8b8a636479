"""Checkpoints of a run: ``checkpoint.pt``, rewritten atomically after every epoch.

A temporary file, fsync, rename: readers see the previous checkpoint until the new one
is complete.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .rundir import atomic_write

__all__ = ["CHECKPOINT_FILE", "latest", "load", "save"]

CHECKPOINT_FILE = "checkpoint.pt"


def load(model_dir) -> tuple[Path, dict] | None:
    """The checkpoint of ``model_dir`` as ``(path, state)``; None if it has none."""
    path = Path(model_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    return path, torch.load(path, map_location="cpu", weights_only=True)


def latest(model_dir) -> Path | None:
    """The path of the checkpoint of ``model_dir`` (None if it has none)."""
    path = Path(model_dir) / CHECKPOINT_FILE
    return path if path.exists() else None


def save(model_dir, state: dict) -> Path:
    """Write ``state`` as the checkpoint of ``model_dir``."""
    path = Path(model_dir) / CHECKPOINT_FILE
    atomic_write(path, lambda f: torch.save(state, f))
    return path
