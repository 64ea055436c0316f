"""Benchmark: the training-data path of a 12-member cohort, generic Dataset against tensors and a plain loop.

Same data (Fashion-MNIST from the Debian package, normalised, in memory), same IID partition over 12
members, batch 64 per member, one SGD step per member per batch, ``--steps`` steps. Sides:

* ``tensor path``: ``CohortDataModule.from_tensors(x, y)``: every step's batches of all members in one
  ``index_select``;
* ``generic Dataset``: the same tensors behind a user's own ``Dataset`` with only ``__getitem__``: read
  sample by sample and collated (``default_collate``), what any map-style data set gets;
* ``generic + __getitems__``: the same with PyTorch's batched-fetch protocol, one call per step;
* ``generic, in_memory``: the plain ``Dataset`` with ``in_memory=True``: read once at setup (timed
  separately, not in the samples/s), then gathered as tensors;
* ``plain PyTorch loop``: 12 models, each with its own ``DataLoader(TensorDataset, batch_size=64,
  shuffle=True)`` over its member's split, forward / backward / step per member: no Lightning.

The first three train through ``lightning.Trainer`` + :class:`~lightning_colearn.CohortModule`; the
training loop alone is timed (:class:`FitTimer`). Printed: member-samples per second (median of
``--repeats`` interleaved runs) and the ratios; the target is generic / tensor >= 0.8.

Run: ``.venv/bin/python bench/data_path.py`` (also part of ``bench/partition.py``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from common import FitTimer, quiet_lightning
from lightning_colearn import CohortDataModule, CohortModule
from lightning_colearn.data.datasets import DEBIAN_FASHION_MNIST, preset
from lightning_colearn.models import MLP, ConvNet

MEMBERS, BATCH, LR = 12, 64, 0.01
TARGET = 0.8


class PlainDataset(Dataset):
    """What a user writes: tensors behind ``__getitem__``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class BatchedDataset(PlainDataset):
    """The same, with PyTorch's batched fetch (``DataLoader`` calls it instead of one ``__getitem__`` per sample)."""

    def __getitems__(self, indices: list[int]):
        index = torch.as_tensor(indices)
        return list(zip(self.x.index_select(0, index), self.y.index_select(0, index)))


def load() -> tuple[torch.Tensor, torch.Tensor, str]:
    name = "fashion_mnist" if (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file() else "mnist_small"
    train, _ = preset(name)
    return train.inputs, train.targets, name


def datamodule(kind: str, x: torch.Tensor, y: torch.Tensor) -> CohortDataModule:
    common = dict(num_members=MEMBERS, batch_size=BATCH, splits=(1.0, 0.0, 0.0), test_fraction=0.0, seed=0)
    if kind == "tensor path":
        return CohortDataModule.from_tensors(x, y, **common)
    data = BatchedDataset(x, y) if kind == "generic + __getitems__" else PlainDataset(x, y)
    # labels= : the bench times training, not the label scan
    return CohortDataModule(data, labels=y, in_memory=kind == "generic, in_memory", **common)


def run_lightning(kind: str, model, x, y, steps: int) -> float:
    dm = datamodule(kind, x, y)
    torch.manual_seed(0)
    module = CohortModule(model, size=MEMBERS, optimizer=partial(torch.optim.SGD, lr=LR))
    timer = FitTimer()
    L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
              callbacks=[timer]).fit(module, datamodule=dm)
    return MEMBERS * BATCH * steps / timer.seconds


def run_plain(model, x, y, steps: int) -> float:
    dm = datamodule("tensor path", x, y)
    dm.setup("fit")
    torch.manual_seed(0)
    models = [model() for _ in range(MEMBERS)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=LR) for m in models]
    loaders = [DataLoader(TensorDataset(x[dm.member_split(i)], y[dm.member_split(i)]), batch_size=BATCH, shuffle=True)
               for i in range(MEMBERS)]
    iterators = [iter(loader) for loader in loaders]
    start = time.perf_counter()
    for _ in range(steps):
        for i, (m, opt) in enumerate(zip(models, optimizers)):
            try:
                xb, yb = next(iterators[i])
            except StopIteration:
                iterators[i] = iter(loaders[i])
                xb, yb = next(iterators[i])
            opt.zero_grad()
            F.cross_entropy(m(xb), yb).backward()
            opt.step()
    return MEMBERS * BATCH * steps / (time.perf_counter() - start)


SIDES = ("tensor path", "generic Dataset", "generic + __getitems__", "generic, in_memory", "plain PyTorch loop")


def measure(models: list[str], steps: int, repeats: int) -> None:
    quiet_lightning()
    x, y, name = load()
    print(f"{name}: {len(y):,} samples in memory, {MEMBERS} members, batch {BATCH} per member, SGD, {steps} steps, "
          f"median of {repeats} interleaved runs, torch threads {torch.get_num_threads()}\n")
    factories = {"MLP": MLP, "ConvNet": ConvNet}
    print("| model | side | member-samples/s | / tensor path | / plain loop |")
    print("| --- | --- | ---: | ---: | ---: |")
    verdicts = []
    for label in models:
        model = factories[label]
        rates: dict[str, list[float]] = {side: [] for side in SIDES}
        for _ in range(repeats):
            for side in SIDES:
                rate = run_plain(model, x, y, steps) if side == "plain PyTorch loop" else run_lightning(side, model, x, y, steps)
                rates[side].append(rate)
        median = {side: statistics.median(v) for side, v in rates.items()}
        for side in SIDES:
            print(f"| {label} | {side} | {median[side]:,.0f} | {median[side] / median['tensor path']:.2f}x "
                  f"| {median[side] / median['plain PyTorch loop']:.2f}x |")
        ratio = median["generic Dataset"] / median["tensor path"]
        verdicts.append(f"{label}: generic / tensor {ratio:.2f}x ({'PASS' if ratio >= TARGET else 'FAIL'} against >= {TARGET}x)")
    print("\n" + "\n".join(verdicts))
    start = time.perf_counter()
    datamodule("generic, in_memory", x, y).setup("fit")
    print(f"in_memory's one read of the {len(y):,} samples at setup: {time.perf_counter() - start:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["MLP", "ConvNet"], choices=["MLP", "ConvNet"])
    args = parser.parse_args()
    measure(args.models, args.steps, args.repeats)


if __name__ == "__main__":
    main()
