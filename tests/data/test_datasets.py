"""Tests for lightning_colearn.data.datasets: embedded sample, IDX reader, load_dataset, ImageDataset."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_colearn.data import datasets as ds
from lightning_colearn.data.datasets import (
    DATASETS,
    DatasetNotFoundError,
    ImageArrays,
    ImageDataset,
    collate_batch,
    load_dataset,
    read_idx,
)

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _idx_bytes(array: np.ndarray) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.tobytes()


def _write_idx(path: Path, array: np.ndarray) -> Path:
    data = _idx_bytes(array)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def _tiny_split(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=n, dtype=np.uint8)


# ------------------------------------------------------------------ mnist_small
@pytest.fixture(scope="module")
def mnist_small():
    return load_dataset("mnist_small")


def test_mnist_small_shapes_and_dtypes(mnist_small):
    train, test = mnist_small
    assert isinstance(train, ImageArrays) and isinstance(test, ImageArrays)
    assert train.images.shape == (4000, 28, 28) and test.images.shape == (1000, 28, 28)
    assert len(train) == 4000 and len(test) == 1000
    assert train.images.dtype == torch.uint8 and test.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and test.labels.dtype == torch.int64
    assert sorted(train.labels.unique().tolist()) == list(range(10))
    assert sorted(test.labels.unique().tolist()) == list(range(10))
    assert train.images.max() > 200 and train.images.min() == 0  # real pixel data, not zeros


def test_mnist_small_is_stable_across_calls(mnist_small):
    again = load_dataset("mnist_small")
    assert torch.equal(again[0].images, mnist_small[0].images)
    assert torch.equal(again[1].labels, mnist_small[1].labels)


def test_image_arrays_validation():
    with pytest.raises(ValueError, match="images must be uint8"):
        ImageArrays(torch.zeros(2, 28, 28), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="images must be uint8"):
        ImageArrays(torch.zeros(2, 784, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        ImageArrays(torch.zeros(2, 28, 28, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))


# ------------------------------------------------------------------ ImageDataset
def test_image_dataset_normalises(mnist_small):
    train, _ = mnist_small
    dataset = ImageDataset(train, 0.5, 0.25)
    assert len(dataset) == 4000
    x, y = dataset[7]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    expected = (train.images[7].float() / 255.0 - 0.5) / 0.25
    torch.testing.assert_close(x[0], expected)
    assert y.item() == train.labels[7].item()


def test_image_dataset_getitems_equals_stacked_getitem(mnist_small):
    train, _ = mnist_small
    dataset = ImageDataset(train, 0.1307, 0.3081)
    indices = [5, 0, 3999, 17, 5]
    xb, yb = dataset.__getitems__(indices)
    items = [dataset[i] for i in indices]
    assert torch.equal(xb, torch.stack([x for x, _ in items]))
    assert torch.equal(yb, torch.stack([y for _, y in items]))
    assert xb.shape == (5, 1, 28, 28)


def test_collate_batch_passes_ready_batches_and_collates_lists():
    x, y = torch.zeros(2, 1, 2, 2), torch.tensor([1, 2])
    out = collate_batch((x, y))
    assert out[0] is x and out[1] is y
    xs, ys = collate_batch([(torch.ones(1, 2, 2), torch.tensor(3)), (torch.zeros(1, 2, 2), torch.tensor(4))])
    assert xs.shape == (2, 1, 2, 2) and ys.tolist() == [3, 4]


def test_dataloader_batches_match_dataset(mnist_small):
    train, _ = mnist_small
    dataset = ImageDataset(train, 0.1307, 0.3081)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collate_batch)
    xb, yb = next(iter(loader))
    assert torch.equal(xb, dataset.images[:8]) and torch.equal(yb, dataset.labels[:8])


# ---------------------------------------------------------------------- read_idx
@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_plain_and_gz(tmp_path, name):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = read_idx(_write_idx(tmp_path / name, array))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    assert np.array_equal(out, array)
    assert out.flags.writeable  # a copy, not a view on the read-only bytes


def test_read_idx_1d_labels(tmp_path):
    out = read_idx(_write_idx(tmp_path / "labels.gz", np.array([3, 1, 4, 1, 5])))
    assert out.tolist() == [3, 1, 4, 1, 5]


def test_read_idx_truncated_raises(tmp_path):
    path = tmp_path / "trunc-idx3-ubyte"
    path.write_bytes(_idx_bytes(np.zeros((2, 3, 4)))[:-1])
    with pytest.raises(ValueError, match="truncated or padded: 39 bytes, header says 40"):
        read_idx(path)


def test_read_idx_padded_raises(tmp_path):
    path = tmp_path / "padded.gz"
    with gzip.open(path, "wb") as f:
        f.write(_idx_bytes(np.zeros(5)) + b"\x00")
    with pytest.raises(ValueError, match="truncated or padded"):
        read_idx(path)


@pytest.mark.parametrize(
    "header",
    [b"\x01\x00\x08\x01", b"\x00\x00\x0d\x01", b"\x00\x00", b""],
    ids=["nonzero-magic", "float-type", "short", "empty"],
)
def test_read_idx_bad_header_raises(tmp_path, header):
    path = tmp_path / "bad"
    path.write_bytes(header + struct.pack(">I", 1) + b"\x00" if len(header) == 4 else header)
    with pytest.raises(ValueError, match="is not a uint8 IDX file"):
        read_idx(path)


# ------------------------------------------------------------------ load_dataset
def test_unknown_dataset_raises():
    with pytest.raises(ValueError, match=r"data set must be one of .*got 'cifar10'"):
        load_dataset("cifar10")
    assert DATASETS == ("mnist_small", "mnist", "fashion_mnist")


def test_missing_mnist_raises_helpful_error(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", root=tmp_path)
    message = str(info.value)
    assert "data.root" in message
    assert "mnist_small" in message
    assert "data.download is false" in message
    assert str(tmp_path) in message
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_load_dataset_reads_idx_files_in_root(tmp_path, gz):
    train_x, train_y = _tiny_split(5, 0)
    test_x, test_y = _tiny_split(3, 1)
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", train_x)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", train_y)
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", test_x)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", test_y)
    for name in ("mnist", "fashion_mnist"):
        train, test = load_dataset(name, root=tmp_path)
        assert train.images.shape == (5, 28, 28) and test.images.shape == (3, 28, 28)
        assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
        assert np.array_equal(train.images.numpy(), train_x) and np.array_equal(test.images.numpy(), test_x)
        assert train.labels.tolist() == train_y.tolist() and test.labels.tolist() == test_y.tolist()


def test_load_dataset_with_mixed_gz_and_plain_files(tmp_path):
    train_x, train_y = _tiny_split(4, 2)
    test_x, test_y = _tiny_split(2, 3)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_x)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", train_y)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", test_x)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", test_y)
    train, test = load_dataset("mnist", root=str(tmp_path))
    assert np.array_equal(train.images.numpy(), train_x)
    assert test.labels.tolist() == test_y.tolist()


def test_load_dataset_incomplete_root_is_not_read_as_idx(tmp_path):
    train_x, train_y = _tiny_split(4, 2)
    _write_idx(tmp_path / "train-images-idx3-ubyte", train_x)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", train_y)
    with pytest.raises(DatasetNotFoundError, match="mnist_small"):
        load_dataset("mnist", root=tmp_path)


def test_default_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("COLEARN_DATA", str(tmp_path))
    assert ds.default_root() == tmp_path


@pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").exists(), reason="Debian package dataset-fashion-mnist not installed"
)
def test_fashion_mnist_from_debian_files(tmp_path):
    train, test = load_dataset("fashion_mnist", root=tmp_path)
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert train.labels.shape == (60000,) and test.labels.shape == (10000,)
    assert train.images.dtype == torch.uint8
    assert sorted(test.labels.unique().tolist()) == list(range(10))
