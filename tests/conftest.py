"""Fixtures shared by test files."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

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


@pytest.fixture
def make_cfg(tmp_path, monkeypatch):
    """``make_cfg(*overrides, out=dir)``: the real config composed as ``colearn`` would, output in ``out``
    (default ``<tmp_path>/out``), no progress bar unless an override asks for one."""
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    GlobalHydra.instance().clear()

    def _make(*overrides: str, out: Path | None = None):
        out = out or tmp_path / "out"
        with initialize_config_module(config_module="lightning_colearn.conf", version_base="1.3"):
            return compose(
                config_name="config",
                overrides=[f"paths.output_dir={out}", "trainer.enable_progress_bar=false", *overrides],
            )

    yield _make
    GlobalHydra.instance().clear()


@pytest.fixture
def one_torch_thread():
    """Tiny runs: two intra-op threads on a busy 2-core machine make them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
