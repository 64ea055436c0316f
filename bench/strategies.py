"""Benchmark: federated strategies on non-IID Fashion-MNIST (the table of ``bench/federated.py --strategies``).

100 clients, 10 sampled per round, 1 local epoch of plain SGD (lr 0.05, batch 20) on each client's share,
Fashion-MNIST (the Debian package's files; ``mnist_small`` when they are missing) split with Dirichlet
alpha = 0.1 or 2-label shards (``pathological``), 90 % of each share to train on and 10 % as the client's own
test split; the server scores the global model on the 10,000 test images after every round.

Strategies (the papers' usual settings, not tuned here):

* FedAvg (McMahan et al. 2017); FedProx, mu = 0.01 (Li et al. 2020);
* FedAvgM, server lr 1, momentum 0.9 (Hsu et al. 2019);
* FedAdam and FedYogi, server lr 0.01, beta1 0.9, beta2 0.99, tau 1e-3 (Reddi et al. 2021);
* SCAFFOLD, option II, global lr 1 (Karimireddy et al. 2020);
* FedBN (Li et al. 2021): the ConvNet with BatchNorm, its BatchNorm layers kept by each client; its row
  also gives the mean of the clients' scores on their own test splits (what FedBN is meant for).

Printed per model, partition and strategy: rounds to a server accuracy of 0.6 and 0.7 (median over seeds,
``> R`` when not reached), the final server accuracy (mean and range over seeds) and seconds per round.

Run: ``.venv/bin/python bench/federated.py --strategies`` (``--rounds``, ``--seeds``, ``--models``).
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import lightning as L
import torch

from lightning_colearn import SCAFFOLD, CohortDataModule, CohortModule, FederatedAveraging
from lightning_colearn.data.datasets import DEBIAN_FASHION_MNIST
from lightning_colearn.models import MLP, ConvNet

CLIENTS, PER_ROUND, BATCH, LR = 100, 10, 20, 0.05
TARGETS = (0.6, 0.7)
PARTITIONS = {"Dirichlet 0.1": dict(partition="dirichlet", alpha=0.1), "2-label shards": dict(partition="pathological", labels_per_member=2)}
STRATEGIES = {
    "FedAvg": dict(),
    "FedProx": dict(mu=0.01),
    "FedAvgM": dict(server_optimizer="fedavgm", server_lr=1.0, server_momentum=0.9),
    "FedAdam": dict(server_optimizer="fedadam", server_lr=0.01, server_momentum=0.9, server_beta2=0.99, server_tau=1e-3),
    "FedYogi": dict(server_optimizer="fedyogi", server_lr=0.01, server_momentum=0.9, server_beta2=0.99, server_tau=1e-3),
    "SCAFFOLD": dict(),
    "FedBN": dict(personal="batchnorm"),
}


def dataset() -> str:
    return "fashion_mnist" if (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file() else "mnist_small"


def run(model: str, partition: str, strategy: str, rounds: int, seed: int, data: str | None = None) -> dict:
    dm = CohortDataModule(data or dataset(), num_members=CLIENTS, batch_size=BATCH, eval_batch_size=1000, splits=(0.9, 0.0, 0.1),
                          seed=seed, **PARTITIONS[partition])
    L.seed_everything(seed, verbose=False)
    factory = MLP if model == "MLP" else partial(ConvNet, batch_norm=strategy == "FedBN")
    module = CohortModule(factory, size=CLIENTS, optimizer=partial(torch.optim.SGD, lr=LR))
    common = dict(clients_per_round=PER_ROUND, max_rounds=rounds, seed=seed)
    callback = SCAFFOLD(**common) if strategy == "SCAFFOLD" else FederatedAveraging(**common, **STRATEGIES[strategy])
    start = time.perf_counter()
    L.Trainer(accelerator="cpu", max_epochs=rounds, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[callback]).fit(module, datamodule=dm)
    seconds = (time.perf_counter() - start) / len(callback.history)
    scores = [r["score"] for r in callback.history]
    reached = {t: next((i + 1 for i, s in enumerate(scores) if s >= t), None) for t in TARGETS}
    personal = callback.history[-1].get("client_scores")
    own = statistics.mean(s for s in personal if s is not None) if personal else None
    return {"reached": reached, "final": scores[-1], "seconds": seconds, "own": own}


def measure(models: list[str], rounds: dict[str, int], seeds: list[int], strategies: list[str] | None = None,
            data: str | None = None) -> None:
    print(f"{data or dataset()}, {CLIENTS} clients, {PER_ROUND} per round, SGD lr {LR}, batch {BATCH}, 1 local epoch, "
          f"seeds {seeds}, torch threads {torch.get_num_threads()}\n")
    print("| model | partition | strategy | rounds to 0.6 | rounds to 0.7 | final accuracy (mean, range) "
          "| clients' own test splits | s/round |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for model in models:
        for partition in PARTITIONS:
            for strategy in strategies or STRATEGIES:
                if strategy == "FedBN" and model != "ConvNet":
                    continue  # FedBN needs BatchNorm layers: the ConvNet's
                results = [run(model, partition, strategy, rounds[model], seed, data) for seed in seeds]
                reached = []
                for t in TARGETS:
                    values = [r["reached"][t] for r in results]
                    hit = [v for v in values if v is not None]
                    reached.append(f"{statistics.median(hit):g}" + ("" if len(hit) == len(values) else f" ({len(hit)}/{len(values)})")
                                   if hit else f"> {rounds[model]}")
                finals = [r["final"] for r in results]
                own = [r["own"] for r in results if r["own"] is not None]
                print(f"| {model} | {partition} | {strategy} | {reached[0]} | {reached[1]} | {statistics.mean(finals):.3f} "
                      f"({min(finals):.3f}-{max(finals):.3f}) | {f'{statistics.mean(own):.3f}' if own else '-'} "
                      f"| {statistics.mean(r['seconds'] for r in results):.2f} |", flush=True)


def main() -> None:
    """``python bench/strategies.py [NAME ...]``: the same table as ``federated.py --strategies``."""
    import argparse

    from common import quiet_lightning

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("strategies", nargs="*", default=[], help=f"any of {list(STRATEGIES)} (default: all)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=["MLP", "ConvNet"], choices=["MLP", "ConvNet"])
    args = parser.parse_args()
    quiet_lightning()
    measure(args.models, {m: args.rounds for m in args.models}, args.seeds, args.strategies or None)


if __name__ == "__main__":
    main()
