"""Benchmark: FederatedAveraging and ProofOfLearning on flexBlock's setup.

Setup (flexBlock's PoFL notebook): 100 clients, MLP 784-128-10, Adam lr 1e-3,
batch 20, 20 clients sampled per round, 1 local epoch (one pass over the
client's own data), each client's whole share is training data; the server
scores on the data set's test split (batch 1000). PoFL: 10 miners (client c
belongs to miner c % 10), blocks from accuracy 0.6, the ledger in a temporary
directory.

Prints, per data set (``mnist_small``: 40 images per client; and, if the
Debian package is installed, full Fashion-MNIST: 60,000 images, 600 per
client), one row per seed and run (FedAvg on IID clients, FedAvg on 2-label
shards, PoFL on IID clients):

* seconds per round: client training (``train_seconds``), aggregation
  (``aggregate_seconds``), FedAvg's server evaluation (``eval_seconds``), and
  PoFL's consensus evaluation of the candidates (``consensus_seconds``) and
  block validation and ledger append (``ledger_seconds``); the round time is
  the sum of the phases;
* PoFL's consensus share, (consensus + ledger) / round time, target < 20 %;
* rounds to a server score of 0.6 and of 0.8 (for PoFL, the score of a round
  with a block; rounds without one have none), and the final server score
  (PoFL: the last block's);
* for PoFL, the blocks appended, and the **forward floor**: the share consensus
  + ledger would have if they cost nothing but their forward passes (each
  round's candidates, plus the validators' re-score when a block is
  appended), timed with the run's own models on the evaluation set in memory
  after the run. It is a lower bound: inside a round the same passes measured
  ~1.65 ms per 1,000 images against ~1.45 ms here. A share below the floor
  needs fewer or cheaper forward passes, not less overhead;
* and the **append floor**: the forward floor plus, per block, one bare
  durable append of the run's model (``Ledger.propose`` and ``commit``, one
  fsync'd SQLite transaction, no re-score) to a fresh ledger, median of
  :data:`APPENDS`. No run that keeps every block on disk goes below it.

Validation is off in the timed runs (the callbacks score the global model or
the candidates themselves); ``fit s/round`` is the whole training loop per
round (Lightning's epoch overhead included) for comparison.

Run: ``.venv/bin/python bench/federated.py`` (``--rounds 2`` for a quick look,
``--seeds 0 1 2`` for more seeds, ``--datasets mnist_small`` for one data set).
``--strategies [NAME ...]`` prints the federated strategies' table instead (:mod:`strategies`: FedAvg,
FedProx, FedAvgM, FedAdam, FedYogi, SCAFFOLD, FedBN on non-IID Fashion-MNIST, 3 seeds by default).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch

from common import FitTimer, quiet_lightning  # bench/common.py (scripts run from bench/)
from lightning_colearn import CohortDataModule, CohortModule, FederatedAveraging, Ledger, ProofOfLearning
from lightning_colearn.data.datasets import DEBIAN_FASHION_MNIST
from lightning_colearn.models import MLP

CLIENTS, BATCH, EVAL_BATCH, LR, PER_ROUND, LOCAL_EPOCHS, MINERS, THRESHOLD = 100, 20, 1000, 1e-3, 20, 1, 10, 0.6
TARGETS = (0.6, 0.8)
# Default rounds per data set (--rounds overrides both). Fashion-MNIST measured at ~1.1-1.5 s per round on
# 2 CPU cores (mnist_small ~0.15 s), so one seed of the whole benchmark takes ~2.5 minutes, three ~7.5.
ROUNDS = {"mnist_small": 30, "fashion_mnist": 30}
APPENDS = 15  # bare appends timed for the append floor
STRATEGY_ROUNDS = 40  # --strategies: rounds per run (MLP ~0.6 s, ConvNet ~1.5-2 s a round on 2 CPU cores)
RUNS = [("FedAvg", "iid"), ("FedAvg", "pathological"), ("PoFL", "iid")]
PHASES = ("train_seconds", "aggregate_seconds", "eval_seconds", "consensus_seconds", "ledger_seconds")


def datamodule(dataset: str, partition: str, seed: int) -> CohortDataModule:
    dm = CohortDataModule(dataset, num_members=CLIENTS, batch_size=BATCH, eval_batch_size=EVAL_BATCH,
                          splits=(1.0, 0.0, 0.0), partition=partition, labels_per_member=2, seed=seed)
    dm.setup("fit")
    return dm


def trainer(rounds: int, callbacks: list) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_epochs=rounds * LOCAL_EPOCHS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=callbacks,
    )


def run(algorithm: str, dm: CohortDataModule, rounds: int, seed: int) -> dict:
    L.seed_everything(seed, verbose=False)
    module = CohortModule(MLP, size=CLIENTS, optimizer=partial(torch.optim.Adam, lr=LR))
    with tempfile.TemporaryDirectory() as tmp:
        if algorithm == "FedAvg":
            callback = FederatedAveraging(clients_per_round=PER_ROUND, local_epochs=LOCAL_EPOCHS, max_rounds=rounds, seed=seed)
        else:
            callback = ProofOfLearning(miners=MINERS, clients_per_round=PER_ROUND, threshold=THRESHOLD,
                                       ledger=Path(tmp) / "ledger.db", local_epochs=LOCAL_EPOCHS, max_rounds=rounds, seed=seed)
        timer = FitTimer()
        trainer(rounds, [timer, callback]).fit(module, datamodule=dm)
        blocks = sum(r.get("block") is not None for r in callback.history) if algorithm == "PoFL" else None
    history = callback.history
    per_round = {k: sum(r[k] for r in history) / len(history) for k in PHASES if k in history[0]}
    floor = append_floor = None
    if algorithm == "PoFL":
        # forward passes per round: every candidate once, the winner once more when validators re-score a block
        passes = sum(sum(s is not None for s in r["scores"]) + (r["block"] is not None) for r in history) / len(history)
        forwards = passes * forward_seconds([module.cohort[i] for i in range(MINERS)], dm)
        appends = blocks / len(history) * append_seconds(module.cohort.member_state(0))
        rest = per_round["train_seconds"] + per_round["aggregate_seconds"]
        floor = forwards / (rest + forwards)
        append_floor = (forwards + appends) / (rest + forwards + appends)
    scores = [r["score"] for r in history if r.get("score") is not None]
    reached = {t: next((r["round"] + 1 for r in history if r.get("score") is not None and r["score"] >= t), None)
               for t in TARGETS}
    return {**per_round, "round": sum(per_round.values()), "fit": timer.seconds / len(history), "rounds": len(history),
            "reached": reached, "final": scores[-1] if scores else None, "blocks": blocks, "floor": floor,
            "append_floor": append_floor}


@torch.no_grad()
def forward_seconds(models: list, dm: CohortDataModule, repeats: int = 5) -> float:
    """Seconds for one model's forward passes over the whole evaluation set (median of ``repeats``, mean over models)."""
    batches = [x for x, _ in dm.eval_dataloader()]
    for m in models:
        m.eval()
    times = []
    for _ in range(repeats + 1):  # the first pass warms up
        start = time.perf_counter()
        for x in batches:
            for m in models:
                m(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) / len(models)


def append_seconds(state: dict, repeats: int = APPENDS) -> float:
    """Median seconds of one bare durable append of ``state`` (propose and commit, no re-score) to a fresh ledger."""
    times = []
    with tempfile.TemporaryDirectory() as tmp, Ledger(Path(tmp) / "floor.db") as ledger:
        for i in range(repeats + 1):  # the first append creates the file's pages
            start = time.perf_counter()
            ledger.commit(*ledger.propose(i, 0, [1.0], state))
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"rounds per run (default: {ROUNDS['mnist_small']} on mnist_small, {ROUNDS['fashion_mnist']} on Fashion-MNIST)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--datasets", nargs="+", choices=list(ROUNDS), default=list(ROUNDS),
                        help="data sets to run (Fashion-MNIST only if its Debian package is installed)")
    parser.add_argument("--strategies", nargs="*", default=None, metavar="STRATEGY",
                        help="instead: the strategy table (bench/strategies.py), all strategies or those named")
    parser.add_argument("--models", nargs="+", default=["MLP", "ConvNet"], choices=["MLP", "ConvNet"],
                        help="--strategies: the models")
    args = parser.parse_args()
    quiet_lightning()
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.strategies is not None:
        import strategies  # bench/strategies.py

        unknown = set(args.strategies) - set(strategies.STRATEGIES)
        if unknown:
            parser.error(f"--strategies takes {list(strategies.STRATEGIES)}, got {sorted(unknown)}")
        rounds = args.rounds or STRATEGY_ROUNDS
        seeds = args.seeds if args.seeds != [0] else [0, 1, 2]
        data = "mnist_small" if args.datasets == ["mnist_small"] else None  # (a quick look; default: Fashion-MNIST)
        strategies.measure(args.models, {m: rounds for m in args.models}, seeds, args.strategies or None, data)
        return
    installed = (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists()
    names = [name for name in args.datasets if name != "fashion_mnist" or installed]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {CLIENTS} clients, MLP, Adam {LR}, batch {BATCH}, "
          f"{PER_ROUND} clients per round, {LOCAL_EPOCHS} local epoch; PoFL: {MINERS} miners, threshold {THRESHOLD}")
    if "fashion_mnist" in args.datasets and not installed:
        print(f"(Fashion-MNIST skipped: {DEBIAN_FASHION_MNIST} not installed)")
    for name in names:
        rounds = args.rounds or ROUNDS[name]
        rows = []
        for seed in args.seeds:
            for algorithm, partition in RUNS:
                start = time.perf_counter()
                dm = datamodule(name, partition, seed)
                rows.append((seed, algorithm, partition, dm.member_sizes("train"), run(algorithm, dm, rounds, seed),
                             time.perf_counter() - start))
        sizes = rows[0][3]
        print(f"\n{name}, {rounds} rounds, training images per client {min(sizes)}-{max(sizes)} "
              f"({sum(sizes):,} in all)\n")
        print("| seed | run | clients | s/round training | aggregation | server eval | consensus | ledger | round (sum) "
              "| consensus + ledger share | rounds to 0.6 | rounds to 0.8 | final score | blocks | fit s/round | run s |")
        print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for seed, algorithm, partition, _, r, wall in rows:
            pofl = algorithm == "PoFL"
            share = (f"{100 * (r['consensus_seconds'] + r['ledger_seconds']) / r['round']:.1f} % (target < 20 %; "
                     f"forward floor {100 * r['floor']:.1f} %, append floor {100 * r['append_floor']:.1f} %)" if pofl else "-")
            clients = "IID" if partition == "iid" else "2 labels each"
            reached = [str(r["reached"][t]) if r["reached"][t] is not None else f"> {r['rounds']}" for t in TARGETS]
            final = "-" if r["final"] is None else f"{r['final']:.3f}"
            blocks = r["blocks"] if pofl else "-"
            phases = " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in PHASES)
            print(f"| {seed} | {algorithm} | {clients} | {phases} | {r['round']:.3f} | "
                  f"{share} | {reached[0]} | {reached[1]} | {final} | {blocks} | {r['fit']:.3f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
