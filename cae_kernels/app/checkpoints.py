"""Checkpoints of a run: the last few kept, each verified when loaded.

After every epoch the trainer writes ``checkpoint_epoch_NNNN.pt`` (atomically: a
temporary file, fsync, rename) and then ``checkpoints.json``, the list of the kept
checkpoints with their epoch, step and SHA-256; checkpoints beyond the newest ``keep``
(5 by default, as TensorFlow's estimator kept) are then deleted.

Loading takes the newest checkpoint that is intact: its SHA-256 matches the list (where
the list names it), ``torch.load`` reads it and it holds what a checkpoint holds.  A
damaged one is skipped with a warning; when none is intact, ``CheckpointError`` names
every file tried.  A run directory of an older version, with one ``checkpoint.pt``,
loads as before (it counts as older than any numbered checkpoint).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .rundir import ConfigError, atomic_write

__all__ = ["DEFAULT_KEEP", "CheckpointError", "checkpoint_paths", "latest", "load", "save"]

DEFAULT_KEEP = 5
LEGACY_FILE = "checkpoint.pt"
MANIFEST_FILE = "checkpoints.json"
MANIFEST_FORMAT = "cae_kernels.checkpoints/1"
_NAME = re.compile(r"checkpoint_epoch_(\d+)\.pt")
#: What every checkpoint holds.
KEYS = ("config", "model", "optimizer", "step", "epoch", "history", "rng")


class CheckpointError(ConfigError):
    """No usable checkpoint in a model directory."""


def file_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch:04d}.pt"


def checkpoint_paths(model_dir) -> list[Path]:
    """The checkpoint files of ``model_dir``, newest first (a legacy ``checkpoint.pt`` last)."""
    model_dir = Path(model_dir)
    numbered = sorted(((int(m.group(1)), p) for p in model_dir.glob("checkpoint_epoch_*.pt")
                       if (m := _NAME.fullmatch(p.name))), reverse=True)
    paths = [p for _, p in numbered]
    if (model_dir / LEGACY_FILE).is_file():
        paths.append(model_dir / LEGACY_FILE)
    return paths


def _read_manifest(model_dir: Path) -> list[dict]:
    try:
        manifest = json.loads((model_dir / MANIFEST_FILE).read_text())
        if manifest.get("format") == MANIFEST_FORMAT:
            return [entry for entry in manifest["checkpoints"] if isinstance(entry, dict)]
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        pass
    return []


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _verified(path: Path, digest: str | None) -> dict:
    """The checkpoint at ``path``; raises ValueError saying what is wrong with it."""
    data = path.read_bytes()
    if not data:
        raise ValueError("empty file")
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"SHA-256 differs from {MANIFEST_FILE} (damaged or truncated, {len(data)} bytes)")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged zip
        raise ValueError(f"not a readable checkpoint ({_one_line(exc)})") from None
    if not isinstance(state, dict) or any(key not in state for key in KEYS):
        raise ValueError("not a cae checkpoint (keys missing)")
    match = _NAME.fullmatch(path.name)
    if match and int(match.group(1)) != state["epoch"]:
        raise ValueError(f"holds epoch {state['epoch']}, not the epoch of its name")
    return state


def warn_stderr(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def load(model_dir, warn: Callable[[str], None] | None = warn_stderr) -> tuple[Path, dict] | None:
    """The newest intact checkpoint of ``model_dir`` as ``(path, state)``; None if it has none.

    Damaged checkpoints are skipped, each with a ``warn(line)``; when every checkpoint
    is damaged, raises ``CheckpointError`` naming them.
    """
    model_dir = Path(model_dir)
    digests = {entry.get("file"): entry.get("sha256") for entry in _read_manifest(model_dir)}
    damaged = []
    for path in checkpoint_paths(model_dir):
        try:
            state = _verified(path, digests.get(path.name))
        except (OSError, ValueError) as exc:
            damaged.append(f"{path.name} ({exc})")
            continue
        if damaged and warn is not None:
            warn(f"skipped damaged checkpoint(s) in {model_dir}: {'; '.join(damaged)}; "
                 f"using {path.name} (epoch {state['epoch']}, step {state['step']})")
        return path, state
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {model_dir}: {'; '.join(damaged)}. Move the damaged "
                              f"file(s) away to train from scratch, or use another --model-dir")
    return None


def latest(model_dir) -> Path | None:
    """The path of the newest intact checkpoint of ``model_dir`` (None if it has none)."""
    found = load(model_dir, warn=None)
    return found[0] if found else None


def save(model_dir, state: dict, keep: int = DEFAULT_KEEP) -> Path:
    """Write ``state`` as the checkpoint of its epoch, list it, delete those beyond ``keep``."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    model_dir = Path(model_dir)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path = model_dir / file_name(state["epoch"])
    atomic_write(path, lambda f: f.write(data))

    entry = {"file": path.name, "epoch": state["epoch"], "step": state["step"],
             "sha256": hashlib.sha256(data).hexdigest()}
    listed = {e.get("file"): e for e in _read_manifest(model_dir) if e.get("file") != path.name}
    existing = [p for p in checkpoint_paths(model_dir) if p != path]
    kept = existing[:keep - 1]
    manifest = {"format": MANIFEST_FORMAT,
                "checkpoints": [entry] + [listed[p.name] for p in kept if p.name in listed]}
    atomic_write(model_dir / MANIFEST_FILE, lambda f: f.write((json.dumps(manifest, indent=2) + "\n").encode()))
    for old in existing[keep - 1:]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    return path
