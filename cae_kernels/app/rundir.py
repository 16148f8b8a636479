"""The model directory of a run: its configuration, atomic file writes, and the trainer's lock.

A *model directory* (like a TensorFlow Estimator's ``model_dir``) holds one run.  Its
``config.json`` keeps the configuration the run was made with; options that change what
is trained (``RUN_KEYS``) must match it on every later ``cae train``, the others (epochs,
backend, memory format, device) may change between runs.  One trainer at a time holds a
directory: ``lock()`` takes an OS lock (``flock``) on its ``.lock`` file, which the
kernel releases when the process ends, however it ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "CONFIG_FILE",
    "LOCK_FILE",
    "MEMORY_FORMATS",
    "RUN_KEYS",
    "Config",
    "ConfigError",
    "RunDirBusyError",
    "atomic_write",
    "lock",
    "resolve_config",
    "write_config",
]

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
CONFIG_FORMAT = "cae_kernels.train/1"  # the name it had when written first: run directories keep it

MEMORY_FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


class ConfigError(ValueError):
    """An unusable configuration or model directory."""


class RunDirBusyError(ConfigError):
    """Another trainer holds the model directory."""


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
    device: str = "auto"  # CUDA where a GPU is usable, else the CPU

    def __post_init__(self):  # normalize, so that equal settings compare equal
        self.filters = tuple(int(f) for f in self.filters)
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.data_dir is not None:
            self.data_dir = str(Path(self.data_dir).expanduser().resolve())

    def validate(self) -> Config:
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

#: Files and folders ``cae train`` writes; a directory without our config must hold none.
OUTPUT_NAMES = ("checkpoint.pt", "checkpoints.json", "loss.png", "reconstructions.gif", "reconstructions", "eval")


def check_model_dir(model_dir: Path) -> None:
    """``model_dir`` must be a directory, or not exist yet (below a directory)."""
    if model_dir.exists() and not model_dir.is_dir():
        raise ConfigError(f"--model-dir {model_dir} is a file, not a directory; "
                          f"name a new or existing model directory")
    for parent in model_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--model-dir {model_dir}: {parent} is a file, not a directory")
            break


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
    check_model_dir(model_dir)
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
        details = "; ".join(f"{key}: stored {show(getattr(base, key))}, given {show(getattr(merged, key))}"
                            for key in differing)
        raise ConfigError(f"{model_dir} holds a run with another configuration ({details}). "
                          f"Use a new --model-dir, or leave out these options to continue that run.")
    return merged.validate(), True


def show(value) -> str:
    """A setting as the command line spells it (tuples as 16,8,8)."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _refuse_foreign_files(model_dir: Path) -> None:
    """A directory without our config must not hold files we would overwrite."""
    clashes = [name for name in OUTPUT_NAMES if (model_dir / name).exists()]
    clashes += sorted(p.name for p in model_dir.glob("checkpoint_epoch_*.pt"))
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


def write_config(model_dir: Path, config: Config) -> None:
    text = json.dumps({"format": CONFIG_FORMAT, "config": config.to_json()}, indent=2) + "\n"
    atomic_write(model_dir / CONFIG_FILE, lambda f: f.write(text.encode()))


def make_model_dir(model_dir: Path) -> None:
    check_model_dir(model_dir)
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create model directory {model_dir}: {exc.strerror}") from None


@contextlib.contextmanager
def lock(model_dir) -> Iterator[None]:
    """Hold ``model_dir`` for one trainer: a second one gets ``RunDirBusyError``.

    The lock is ``flock`` on ``model_dir/.lock`` (created if need be), so the kernel drops
    it when the holder exits or crashes; the file itself stays and holds the last
    holder's process id, for the error message.
    """
    model_dir = Path(model_dir)
    make_model_dir(model_dir)
    path = model_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        by = f" (process {holder})" if holder.isdigit() else ""
        raise RunDirBusyError(f"{model_dir} is in use by another `cae train`{by}; wait for it to "
                              f"finish, or train into another --model-dir") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
