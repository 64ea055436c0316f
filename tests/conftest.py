"""Fixtures shared by test files."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from lightning_colearn.data.datasets import DEBIAN_FASHION_MNIST

_IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(scope="session")
def fashion_root(tmp_path_factory) -> Path:
    """torchvision's FashionMNIST layout (``<root>/FashionMNIST/raw``, uncompressed), made once from the Debian
    package's files, so ``torchvision.datasets.FashionMNIST(root)`` reads them offline."""
    if not all((DEBIAN_FASHION_MNIST / f"{name}.gz").is_file() for name in _IDX):
        pytest.skip(f"Fashion-MNIST IDX files not in {DEBIAN_FASHION_MNIST} (Debian package dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("torchvision")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in _IDX:
        with gzip.open(DEBIAN_FASHION_MNIST / f"{name}.gz") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return root
