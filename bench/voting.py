"""Benchmark: CollectiveVoting on colearn's MNIST example setup, against learning alone.

Setup (colearn's MNIST example): 5 learners, ColearnConvNet, Adam lr 1e-3,
batch 64, each learner keeps 90 % of its share to train and 10 % to vote on,
threshold 0.5, micro accuracy as the vote criterion, one round per epoch
(the proposer, round-robin, does one pass over its own training data).

Prints, per data set (``mnist_small`` and, if installed, a 30,000-image
training subset of Fashion-MNIST), one row per seed:

* seconds per round: proposer training (``train_seconds``), voting and
  acceptance (``vote_seconds``) and per-learner test scoring
  (``test_seconds``; zero here: the learners have no test split);
* the vote share, vote / (training + vote), target < 15 %;
* accepted rounds, and the final test accuracy of the shared model;
* the same learners trained alone on their own data only (no callback), with
  the same number of own-data passes as in the voting run (rounds / learners
  epochs each): mean and best final test accuracy.

Validation is off in the timed runs, so only the rounds are timed. The one-off
scoring of the learners' starting models (first round) is shown apart from the
per-round vote time.

Run: ``.venv/bin/python bench/voting.py`` (``--rounds 2`` for a quick look,
``--seeds 0 1 2`` for more seeds).
"""

from __future__ import annotations

import argparse
from functools import partial

import lightning as L
import torch
from torchmetrics.classification import MulticlassAccuracy

from common import FitTimer, quiet_lightning  # bench/common.py (scripts run from bench/)
from lightning_colearn import CohortDataModule, CohortModule, CollectiveVoting
from lightning_colearn.data.datasets import DEBIAN_FASHION_MNIST
from lightning_colearn.models import ColearnConvNet

SIZE, BATCH, EVAL_BATCH, LR, THRESHOLD = 5, 64, 500, 1e-3, 0.5
DATASETS = {"mnist_small": None, "fashion_mnist": 30_000}  # data set: max_train_samples


def datamodule(dataset: str, seed: int) -> CohortDataModule:
    dm = CohortDataModule(dataset, num_members=SIZE, batch_size=BATCH, eval_batch_size=EVAL_BATCH,
                          splits=(0.9, 0.1, 0.0), max_train_samples=DATASETS[dataset], seed=seed)
    dm.setup("fit")
    return dm


def trainer(epochs: int, callbacks: list) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
    )


def run_voting(dm: CohortDataModule, rounds: int, seed: int) -> dict:
    L.seed_everything(seed, verbose=False)
    module = CohortModule(ColearnConvNet, size=SIZE, optimizer=partial(torch.optim.Adam, lr=LR))
    voting = CollectiveVoting(threshold=THRESHOLD, criterion=MulticlassAccuracy(num_classes=10, average="micro"), seed=seed)
    timer = FitTimer()
    t = trainer(rounds, [timer, voting])
    t.fit(module, datamodule=dm)
    result = t.test(module, datamodule=dm, verbose=False)[0]
    per_round = {k: sum(r[k] for r in voting.results) / len(voting.results)
                 for k in ("train_seconds", "vote_seconds", "test_seconds", "initial_seconds")}
    return {**per_round, "fit": timer.seconds, "accepted": sum(r["accepted"] for r in voting.results),
            "rounds": len(voting.results), "acc": result["test_acc/mean"]}


def run_alone(dm: CohortDataModule, epochs: int, seed: int) -> list[float]:
    L.seed_everything(seed, verbose=False)
    module = CohortModule(ColearnConvNet, size=SIZE, optimizer=partial(torch.optim.Adam, lr=LR))
    t = trainer(epochs, [])
    t.fit(module, datamodule=dm)  # per-member stream: every learner trains on its own split only
    result = t.test(module, datamodule=dm, verbose=False)[0]
    return [result[f"test_acc/member_{i}"] for i in range(SIZE)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="voting rounds (epochs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    quiet_lightning()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    alone_epochs = max(1, round(args.rounds / SIZE))  # each learner proposes rounds / SIZE times, one pass each
    names = ["mnist_small"] + (["fashion_mnist"] if (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists() else [])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {SIZE} learners, ColearnConvNet, Adam {LR}, "
          f"batch {BATCH}, threshold {THRESHOLD}, {args.rounds} rounds; alone: {alone_epochs} epoch(s) each")
    for name in names:
        rows = []
        for seed in args.seeds:
            dm = datamodule(name, seed)
            rows.append((seed, dm.member_sizes("train"), run_voting(dm, args.rounds, seed), run_alone(dm, alone_epochs, seed)))
        label = name if DATASETS[name] is None else f"{name} ({DATASETS[name]:,} training images)"
        print(f"\n{label}, train split per learner {rows[0][1]}\n")
        print("| seed | s/round training | s/round voting + acceptance | s/round test scores | once: starting scores (s) "
              "| vote share | accepted | test acc (voting) | alone: mean | alone: best |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for seed, _, v, alone in rows:
            share = v["vote_seconds"] / (v["train_seconds"] + v["vote_seconds"])
            print(f"| {seed} | {v['train_seconds']:.3f} | {v['vote_seconds']:.3f} | {v['test_seconds']:.3f} | "
                  f"{v['initial_seconds'] * v['rounds']:.3f} | "
                  f"{100 * share:.1f} % (target < 15 %) | {v['accepted']}/{v['rounds']} | {v['acc']:.3f} | "
                  f"{sum(alone) / len(alone):.3f} | {max(alone):.3f} |")


if __name__ == "__main__":
    main()
