"""Benchmark: deep mutual learning against the same students trained independently.

Three students (ConvNet, ConvNet, MLP), SGD lr 0.01, batch 32, shared batches,
over 3 seeds, on ``mnist_small`` and (if the Debian package is installed) on
Fashion-MNIST (a ``--fashion-samples`` subset of its 60k training digits, to
keep the run short; the full 10k test set).

Prints (a) mean and best student test accuracy, DML vs independent, and
(b) training member-samples/s of MutualLearning (Trainer) against a plain
PyTorch loop training the three students independently on the same batches
(target ratio >= 0.8: the mutual term must cost little).

Run: ``.venv/bin/python bench/mutual.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import lightning as L
import torch

from common import FitTimer, quiet_lightning, plain_loop  # bench/common.py (scripts run from bench/)
from lightning_colearn import CohortDataModule, CohortModule, MutualLearning
from lightning_colearn.data.datasets import DEBIAN_FASHION_MNIST
from lightning_colearn.models import MLP, ConvNet

BATCH, LR = 32, 0.01


def students():
    return [ConvNet(), ConvNet(), MLP()]


def fit(cls, dm, epochs: int, seed: int):
    L.seed_everything(seed, verbose=False)
    module = cls(students(), optimizer=partial(torch.optim.SGD, lr=LR))
    timer = FitTimer()
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, datamodule=dm)
    result = trainer.test(module, datamodule=dm, verbose=False)[0]
    accs = [result[f"test_acc/member_{i}"] for i in range(3)]
    return accs, timer.seconds, trainer.global_step


def run_plain(dm, steps: int, seed: int) -> float:
    torch.manual_seed(seed)
    return plain_loop(students(), dm, steps, LR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fashion-samples", type=int, default=12000)
    args = parser.parse_args()
    quiet_lightning()
    sets = [("mnist_small", {})]
    if (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        sets.append(("fashion_mnist", {"max_train_samples": args.fashion_samples}))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; students ConvNet, ConvNet, MLP; "
          f"SGD lr {LR}, batch {BATCH}, {args.epochs} epochs, seeds {args.seeds}")
    print("\n| data | training | mean acc | best acc | DML samples/s | plain-loop samples/s | ratio |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, extra in sets:
        dm = CohortDataModule(name, num_members=3, batch_size=BATCH, stream="shared", splits=(1.0, 0.0, 0.0), **extra)
        dm.setup("fit")
        results = {"DML": [], "independent": []}
        rates, plain_rates = [], []
        for seed in args.seeds:
            accs, seconds, steps = fit(MutualLearning, dm, args.epochs, seed)
            results["DML"].append(accs)
            rates.append(3 * BATCH * steps / seconds)
            plain_rates.append(3 * BATCH * steps / run_plain(dm, steps, seed))
            results["independent"].append(fit(CohortModule, dm, args.epochs, seed)[0])
        ours, plain = statistics.median(rates), statistics.median(plain_rates)
        for label, runs in results.items():
            mean = statistics.mean(statistics.mean(a) for a in runs)
            best = statistics.mean(max(a) for a in runs)
            speed = f"{ours:,.0f} | {plain:,.0f} | {ours / plain:.2f} (target >= 0.8)" if label == "DML" else "| |"
            print(f"| {name} | {label} | {mean:.4f} | {best:.4f} | {speed} |")


if __name__ == "__main__":
    main()
