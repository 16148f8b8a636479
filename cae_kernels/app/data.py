"""MNIST-format data: an IDX reader, folder discovery, the bundled 5,000-digit sample.

A data folder is found in any of these layouts (each file gzip-compressed or raw):

- MNIST / Fashion-MNIST: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (also ``train-images.idx3-ubyte``);
- torchvision's download folder: ``<root>/MNIST/raw/...`` or ``<root>/FashionMNIST/raw/...``;
- a single set: ``images-idx3-ubyte`` + ``labels-idx1-ubyte`` (the bundled sample's names).

With train and t10k files, those are the train and eval splits.  With one set, it is
split deterministically: shuffled with a fixed seed and split stratified by label, so the
bundled sample (sorted by label!) gives 4,500 train / 500 eval images, 50 per class in
eval, the same on every machine.

Broken files raise ``DataFileNotFoundError`` (missing) or ``IDXFormatError``
(truncated, wrong magic number, bad gzip), both ``DataError``s naming the file.
"""

from __future__ import annotations

import gzip
import importlib.resources
import os
import struct
import zlib
from dataclasses import dataclass
from importlib.resources.abc import Traversable  # pathlib.Path is one too
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DataError",
    "DataFileNotFoundError",
    "IDXFormatError",
    "Split",
    "Dataset",
    "read_idx",
    "load_data",
    "bundled_data_dir",
]

#: IDX magic numbers of MNIST: unsigned bytes (0x08), 3-d images / 1-d labels.
IMAGES_MAGIC = 0x0803  # 2051
LABELS_MAGIC = 0x0801  # 2049

#: The seed of the deterministic train/eval split of single-set folders.  It is not the
#: training seed: runs with different --seed values evaluate on the same images.
SPLIT_SEED = 0
EVAL_FRACTION = 0.1

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_SUBDIRS = ("", "raw", "MNIST/raw", "FashionMNIST/raw")


class DataError(Exception):
    """A data file or folder is missing or unreadable; ``path`` names it."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file or folder does not exist."""


class IDXFormatError(DataError, ValueError):
    """A file is not a valid IDX file: wrong magic number, truncated, bad gzip data."""


def read_idx(path, magic: int | None = None) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw, detected from its first bytes).

    ``magic``, when given, is the expected magic number (e.g. 2051 for MNIST images).
    """
    path = path if hasattr(path, "open") else Path(path)
    if not path.is_file():
        raise DataFileNotFoundError(path, "no such file")
    with path.open("rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise IDXFormatError(path, f"truncated or corrupt gzip data ({exc})") from None

    if len(raw) < 4:
        raise IDXFormatError(path, f"truncated: {len(raw)} bytes, not even an IDX header")
    (found_magic,) = struct.unpack(">I", raw[:4])
    zero, dtype_code, ndim = found_magic >> 16, (found_magic >> 8) & 0xFF, found_magic & 0xFF
    if magic is not None and found_magic != magic:
        raise IDXFormatError(path, f"wrong magic number {found_magic} (0x{found_magic:08x}), "
                                   f"expected {magic} (0x{magic:08x}); not an MNIST IDX file of this kind")
    if zero != 0 or dtype_code not in _IDX_DTYPES or ndim == 0:
        raise IDXFormatError(path, f"wrong magic number {found_magic} (0x{found_magic:08x}); not an IDX file")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXFormatError(path, f"truncated: the header needs {header} bytes, the file has {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    expected = int(np.prod(dims)) * dtype.itemsize
    payload = len(raw) - header
    if payload < expected:
        raise IDXFormatError(path, f"truncated: {payload} of {expected} data bytes for shape {dims}")
    if payload > expected:
        raise IDXFormatError(path, f"{payload - expected} unexpected bytes after the data of shape {dims}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


@dataclass
class Split:
    """Images as uint8 [N, 1, H, W] (scale with ``/ 255``) and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> Split:
        """The first ``n`` examples (all when ``n`` is None)."""
        return self if n is None else Split(self.images[:n], self.labels[:n])


@dataclass
class Dataset:
    train: Split
    eval: Split
    source: str  # where it came from, for logs

    def describe(self) -> str:
        shape = "x".join(str(s) for s in self.train.images.shape[1:])
        return f"{self.source}: {len(self.train)} train / {len(self.eval)} eval images of {shape}"


def bundled_data_dir() -> Traversable:
    """The bundled 5,000-digit MNIST sample (package data)."""
    return importlib.resources.files("cae_kernels.app").joinpath("bundled").joinpath("mnist-5k")


def _find(folder: Traversable, stems: list[str]):
    for stem in stems:
        for name in (stem, stem + ".gz"):
            candidate = folder.joinpath(name)
            if candidate.is_file():
                return candidate
    return None


def _stems(prefix: str, kind: str, rank: int) -> list[str]:
    if not prefix:
        return [f"{kind}-idx{rank}-ubyte"]
    return [f"{prefix}-{kind}-idx{rank}-ubyte", f"{prefix}-{kind}.idx{rank}-ubyte"]


def _read_set(folder: Traversable, prefix: str) -> Split | None:
    """The images/labels pair named with ``prefix`` in ``folder``, or None if it has no images."""
    images_file = _find(folder, _stems(prefix, "images", 3))
    if images_file is None:
        return None
    labels_file = _find(folder, _stems(prefix, "labels", 1))
    if labels_file is None:
        expected = folder.joinpath(_stems(prefix, "labels", 1)[0] + "[.gz]")
        raise DataFileNotFoundError(expected, f"missing: the labels for {images_file.name}")
    images = read_idx(images_file, IMAGES_MAGIC)
    labels = read_idx(labels_file, LABELS_MAGIC)
    if len(images) != len(labels):
        raise IDXFormatError(labels_file, f"{len(labels)} labels for {len(images)} images in {images_file.name}")
    return Split(torch.from_numpy(images.copy()).unsqueeze(1),
                 torch.from_numpy(labels.astype(np.int64)))


def stratified_split(labels: torch.Tensor, eval_fraction: float = EVAL_FRACTION,
                     seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic shuffled train/eval indices with each label's share of eval equal."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    is_eval = torch.zeros(len(labels), dtype=torch.bool)
    shuffled = labels[order]
    for label in torch.unique(labels):
        members = order[shuffled == label]
        is_eval[members[: round(len(members) * eval_fraction)]] = True
    # Shuffle each side again: taking each label's first members of `order` leaves the
    # head of `order` lopsided, and Split.head(n) must be a fair sample.
    train, eval_ = order[~is_eval[order]], order[is_eval[order]]
    return (train[torch.randperm(len(train), generator=generator)],
            eval_[torch.randperm(len(eval_), generator=generator)])


def load_data(data_dir: str | os.PathLike | None = None) -> Dataset:
    """Train and eval splits from an MNIST-format folder, or the bundled sample if None."""
    if data_dir is None:
        root, source = bundled_data_dir(), "bundled MNIST sample (mnist-5k)"
    else:
        root, source = Path(data_dir), str(data_dir)
        if not root.is_dir():
            raise DataFileNotFoundError(root, "no such data directory")

    for sub in _SUBDIRS:
        folder = root
        for part in sub.split("/") if sub else ():
            folder = folder.joinpath(part)  # one name at a time: Traversables take one
        if not folder.is_dir():
            continue
        train, test = _read_set(folder, "train"), _read_set(folder, "t10k")
        if train is not None and test is not None:
            return Dataset(train, test, source)
        single = train or test or _read_set(folder, "")
        if single is not None:
            train_idx, eval_idx = stratified_split(single.labels)
            return Dataset(Split(single.images[train_idx], single.labels[train_idx]),
                           Split(single.images[eval_idx], single.labels[eval_idx]), source)
    raise DataFileNotFoundError(
        root, "no MNIST-format IDX files found (looked for train-/t10k-images-idx3-ubyte[.gz] "
              "and images-idx3-ubyte[.gz], also under raw/, MNIST/raw/, FashionMNIST/raw/)")
