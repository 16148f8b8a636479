"""The IDX reader, data folder layouts, the bundled sample and its split, bad files."""

import gzip
import struct

import numpy as np
import pytest
import torch

from cae_kernels.app.data import DataError, DataFileNotFoundError, IDXFormatError, load_data, read_idx, stratified_split


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    rank = array.ndim
    header = struct.pack(">I", magic if magic is not None else 0x0800 | rank)
    return header + struct.pack(f">{rank}I", *array.shape) + array.astype(np.uint8).tobytes()


def write_set(folder, prefix, n, compress=True, seed=0, image_stem=None, label_stem=None):
    """n random 28x28 images and labels as an IDX pair named like MNIST's files."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    stems = (image_stem or f"{prefix}images-idx3-ubyte", label_stem or f"{prefix}labels-idx1-ubyte")
    for stem, array in zip(stems, (images, labels), strict=True):
        data = idx_bytes(array)
        if compress:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return images, labels


def test_bundled_sample_is_split_4500_500_stratified_and_deterministic():
    data = load_data()
    assert (len(data.train), len(data.eval)) == (4500, 500)
    assert data.train.images.shape == (4500, 1, 28, 28) and data.train.images.dtype == torch.uint8
    assert torch.bincount(data.eval.labels).tolist() == [50] * 10
    assert torch.bincount(data.train.labels).tolist() == [450] * 10
    # The file is sorted by label; the split is shuffled, so a prefix is a fair sample.
    assert len(torch.unique(data.train.labels[:100])) == 10
    again = load_data()
    assert torch.equal(again.train.images, data.train.images)
    assert torch.equal(again.eval.labels, data.eval.labels)
    assert "mnist-5k" in data.describe()


def test_stratified_split_is_a_partition():
    labels = torch.randint(0, 10, (1000,))
    train, evaluation = stratified_split(labels)
    assert sorted(torch.cat([train, evaluation]).tolist()) == list(range(1000))
    for label in range(10):
        members = int((labels == label).sum())
        assert int((labels[evaluation] == label).sum()) == round(members * 0.1)


@pytest.mark.parametrize("compress", (True, False))
def test_mnist_folder_uses_train_and_t10k_as_the_splits(tmp_path, compress):
    images, labels = write_set(tmp_path, "train-", 30, compress, seed=1)
    test_images, test_labels = write_set(tmp_path, "t10k-", 12, compress, seed=2)
    data = load_data(tmp_path)
    assert torch.equal(data.train.images[:, 0], torch.from_numpy(images))
    assert torch.equal(data.train.labels, torch.from_numpy(labels).long())
    assert torch.equal(data.eval.images[:, 0], torch.from_numpy(test_images))
    assert torch.equal(data.eval.labels, torch.from_numpy(test_labels).long())


@pytest.mark.parametrize("layout", ("MNIST/raw", "FashionMNIST/raw", "raw"))
def test_torchvision_raw_folders_are_found(tmp_path, layout):
    write_set(tmp_path / layout, "train-", 20)
    write_set(tmp_path / layout, "t10k-", 10, compress=False)
    data = load_data(tmp_path)
    assert (len(data.train), len(data.eval)) == (20, 10)


def test_dotted_mnist_names_are_found(tmp_path):
    write_set(tmp_path, "", 20, image_stem="train-images.idx3-ubyte", label_stem="train-labels.idx1-ubyte")
    write_set(tmp_path, "", 10, image_stem="t10k-images.idx3-ubyte", label_stem="t10k-labels.idx1-ubyte")
    assert (len(load_data(tmp_path).train), len(load_data(tmp_path).eval)) == (20, 10)


def test_a_single_set_is_split_deterministically(tmp_path):
    write_set(tmp_path, "", 200)
    first, second = load_data(tmp_path), load_data(tmp_path)
    assert len(first.train) + len(first.eval) == 200 and 15 <= len(first.eval) <= 25
    assert torch.equal(first.eval.images, second.eval.images)


def test_a_train_set_alone_is_split_too(tmp_path):
    write_set(tmp_path, "train-", 100)
    data = load_data(tmp_path)
    assert len(data.train) + len(data.eval) == 100


def test_missing_directory(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="no such data directory") as info:
        load_data(tmp_path / "nowhere")
    assert isinstance(info.value, FileNotFoundError) and "nowhere" in str(info.value)


def test_directory_without_idx_files(tmp_path):
    (tmp_path / "notes.txt").write_text("no digits here")
    with pytest.raises(DataFileNotFoundError, match="no MNIST-format IDX files"):
        load_data(tmp_path)


def test_missing_labels_file_is_named(tmp_path):
    write_set(tmp_path, "train-", 10)
    write_set(tmp_path, "t10k-", 10)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataFileNotFoundError, match=r"t10k-labels-idx1-ubyte.*missing"):
        load_data(tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="gone.gz: no such file"):
        read_idx(tmp_path / "gone.gz")


@pytest.mark.parametrize("compress", (True, False))
def test_truncated_file_is_named(tmp_path, compress):
    write_set(tmp_path, "", 50, compress)
    name = "images-idx3-ubyte.gz" if compress else "images-idx3-ubyte"
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(IDXFormatError, match=rf"{name}: truncated") as info:
        load_data(tmp_path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, DataError)


def test_truncated_header(tmp_path):
    (tmp_path / "short").write_bytes(b"\x00\x00")
    with pytest.raises(IDXFormatError, match="short: truncated"):
        read_idx(tmp_path / "short")


def test_wrong_magic_is_named(tmp_path):
    write_set(tmp_path, "", 10, compress=False)
    labels = np.zeros(10, dtype=np.uint8)
    (tmp_path / "labels-idx1-ubyte").write_bytes(idx_bytes(labels, magic=0x0803))  # images' magic
    with pytest.raises(IDXFormatError, match=r"labels-idx1-ubyte: wrong magic number 2051.*expected 2049"):
        load_data(tmp_path)


def test_not_an_idx_file(tmp_path):
    (tmp_path / "images-idx3-ubyte").write_bytes(b"PK\x03\x04 this is a zip file, not IDX")
    with pytest.raises(IDXFormatError, match="images-idx3-ubyte: wrong magic number"):
        read_idx(tmp_path / "images-idx3-ubyte")


def test_corrupt_gzip(tmp_path):
    data = bytearray(gzip.compress(idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))))
    data[12:20] = b"\xff" * 8
    (tmp_path / "bad.gz").write_bytes(bytes(data))
    with pytest.raises(IDXFormatError, match="bad.gz: truncated or corrupt gzip"):
        read_idx(tmp_path / "bad.gz")


def test_extra_bytes_and_count_mismatch(tmp_path):
    (tmp_path / "long").write_bytes(idx_bytes(np.zeros(5, dtype=np.uint8)) + b"\x00")
    with pytest.raises(IDXFormatError, match="long: 1 unexpected bytes"):
        read_idx(tmp_path / "long")
    write_set(tmp_path / "set", "", 10, compress=False)
    (tmp_path / "set" / "labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(9, dtype=np.uint8)))
    with pytest.raises(IDXFormatError, match="9 labels for 10 images"):
        load_data(tmp_path / "set")
