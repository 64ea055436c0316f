"""Tiny runs of every algorithm, in one process or as one rank of a DDP job (tests/test_ddp.py compares them).

As a script, under ``torchrun --nproc-per-node 2``, it runs every case with
``Trainer(strategy="ddp", devices=2)`` one after another in the same two
processes (one process start-up for all cases), and rank 0 saves each run's
result to ``<out>/<case>.pt``. ``run_case(name, out, world=1)`` is the same run
in one process. Each result holds the final weights, the logged metrics, the
global step and the algorithm's decisions (moves, votes, rounds, blocks).

    python -m torch.distributed.run --nproc-per-node 2 tests/ddp_cases.py OUT [--resume CKPT]
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics.classification import MulticlassAccuracy

from helpers import BNNet
from lightning_colearn import (
    CohortDataModule,
    CohortModule,
    CollectiveVoting,
    FederatedAveraging,
    MutualLearning,
    ParticleSwarm,
    PopulationBasedTraining,
    ProofOfLearning,
    SCAFFOLD,
)
from lightning_colearn.callbacks.checkpoint import EpochCheckpoint
from lightning_colearn.data.datasets import collate_batch
from lightning_colearn.models import MLP, LogisticRegression

SGD = partial(torch.optim.SGD, lr=0.05, momentum=0.9)
ADAM = partial(torch.optim.Adam, lr=1e-3)


def _case(name: str, out: Path) -> tuple[L.LightningModule, CohortDataModule, list[Any], dict[str, Any]]:
    """Module, data, callbacks and Trainer limits of case ``name`` (odd sizes: ranks train unequal shares)."""
    dm = partial(CohortDataModule, "mnist_small", batch_size=32, eval_batch_size=200)
    limits = dict(max_epochs=2, limit_train_batches=4, limit_val_batches=3)
    if name == "independent":
        return CohortModule(MLP, size=5, optimizer=SGD), dm(num_members=5), [], limits
    if name == "independent_stacked":
        return CohortModule(MLP, size=4, optimizer=ADAM, backend="stacked"), dm(num_members=4), [], limits
    if name == "swarm":  # BatchNorm buffers move with the parameters; optimizer state reset; noise
        swarm = ParticleSwarm(every_n_steps=2, n_particles=3, sigma=0.01, reset_optimizer=True, seed=1)
        return CohortModule(BNNet, size=5, optimizer=SGD), dm(num_members=5), [swarm], limits
    if name == "swarm_metric":  # fitness scored on held-out data by each member's rank
        swarm = ParticleSwarm(every_n_steps=3, n_particles=4, metric=MulticlassAccuracy(num_classes=10), seed=2)
        return CohortModule(MLP, size=4, optimizer=SGD), dm(num_members=4), [swarm], limits
    if name == "voting":  # every learner proposes: proposals from both ranks, voters on both
        voting = CollectiveVoting(threshold=0.5, proposer="all", steps_per_round=3, vote_batches=2)
        return CohortModule(MLP, size=5, optimizer=ADAM), dm(num_members=5), [voting], dict(limits, max_epochs=3)
    if name == "fedavg":  # FedProx term, clients on both ranks
        fedavg = FederatedAveraging(clients_per_round=4, mu=0.01, max_rounds=3, eval_batches=2, seed=3)
        return CohortModule(LogisticRegression, size=6, optimizer=SGD), dm(num_members=6), [fedavg], dict(limits, max_epochs=3)
    if name == "krum":
        krum = FederatedAveraging(clients_per_round=5, aggregator="krum", max_rounds=2, eval_batches=2, seed=4)
        return CohortModule(LogisticRegression, size=6, optimizer=SGD), dm(num_members=6), [krum], limits
    if name == "fedadam":  # the server optimizer's state on every rank; clients failing before they report
        fed = FederatedAveraging(clients_per_round=4, server_optimizer="fedadam", dropout=0.3, max_rounds=3, eval_batches=2, seed=3)
        return CohortModule(LogisticRegression, size=6, optimizer=SGD), dm(num_members=6), [fed], dict(limits, max_epochs=3)
    if name == "scaffold":  # control variates: the correction on the training rank, the updates on every rank
        fed = SCAFFOLD(clients_per_round=4, max_rounds=3, eval_batches=2, seed=3)
        return CohortModule(LogisticRegression, size=6, optimizer=SGD), dm(num_members=6), [fed], dict(limits, max_epochs=3)
    if name == "fedbn":  # personal BatchNorm; every client scored on its own test split by its rank
        fed = FederatedAveraging(clients_per_round=3, personal="batchnorm", max_rounds=2, eval_batches=2, seed=3)
        return CohortModule(BNNet, size=5, optimizer=SGD), dm(num_members=5, splits=(0.8, 0.0, 0.2)), [fed], limits
    if name == "qfedavg":  # each client's loss at the global model, computed by its rank
        fed = FederatedAveraging(clients_per_round=4, aggregator="qfedavg", q=1.0, max_rounds=2, eval_batches=2, seed=3)
        return CohortModule(LogisticRegression, size=6, optimizer=SGD), dm(num_members=6), [fed], limits
    if name == "fednova":  # stragglers' step budgets and FedNova's per-step normalization, steps counted on every rank
        fed = FederatedAveraging(clients_per_round=4, aggregator="fednova", max_local_steps=(1, 3), max_rounds=2, seed=5)
        return CohortModule(LogisticRegression, size=6, optimizer=SGD), dm(num_members=6), [fed], limits
    if name == "bulyan":
        fed = FederatedAveraging(clients_per_round=7, aggregator="bulyan", max_rounds=2, eval_batches=2, seed=4)
        return CohortModule(LogisticRegression, size=8, optimizer=SGD), dm(num_members=8), [fed], limits
    if name == "pofl":
        pofl = ProofOfLearning(miners=2, clients_per_round=4, threshold=0.2, ledger=str(out / "ledger.db"),
                               max_rounds=3, eval_batches=2, seed=5)
        return CohortModule(LogisticRegression, size=6, optimizer=SGD), dm(num_members=6), [pofl], dict(limits, max_epochs=3)
    if name == "pbt":  # ranked by the logged val_acc; a copy's optimizer state comes from the source's rank
        space = {"lr": {"type": "loguniform", "low": 1e-3, "high": 0.2}, "momentum": {"type": "uniform", "low": 0.0, "high": 0.95}}
        pbt = PopulationBasedTraining(space, quantile_fraction=0.5, seed=7)
        return CohortModule(BNNet, size=5, optimizer=SGD), dm(num_members=5, stream="shared"), [pbt], dict(limits, max_epochs=3)
    if name == "pbt_stacked":  # stacked Adam with per-member betas; scored on held-out data by each member's rank
        space = {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}, "beta1": {"type": "uniform", "low": 0.5, "high": 0.95}}
        pbt = PopulationBasedTraining(space, unit="step", interval=3, metric=MulticlassAccuracy(num_classes=10),
                                      fitness_batches=1, quantile_fraction=0.5, seed=8)
        return CohortModule(MLP, size=4, optimizer=ADAM, backend="stacked"), dm(num_members=4), [pbt], limits
    if name == "wrapped":  # a user's LightningModules as members: their own steps, logs and optimizers
        return CohortModule([Classifier() for _ in range(3)]), dm(num_members=3), [], limits
    if name == "mutual":
        module = MutualLearning([MLP() for _ in range(3)], optimizer=SGD, temperature=2.0)
        return module, dm(num_members=3, stream="shared"), [], limits
    if name == "mutual_bf16":  # bf16 logits cross the ranks (as float32: gloo has no bfloat16)
        module = MutualLearning([MLP() for _ in range(3)], optimizer=SGD, temperature=2.0)
        return module, dm(num_members=3, stream="shared"), [], dict(limits, precision="bf16-mixed")
    if name in ("resume_from_one", "resume_from_two", "uninterrupted"):  # checkpoints across process counts
        swarm = ParticleSwarm(every_n_steps=3, n_particles=3, seed=6)
        return CohortModule(BNNet, size=5, optimizer=ADAM), dm(num_members=5), [swarm], dict(limits, max_epochs=2)
    raise KeyError(name)


CASES = ("independent", "independent_stacked", "wrapped", "swarm", "swarm_metric", "voting", "fedavg", "krum", "pofl", "mutual",
         "mutual_bf16", "fedadam", "scaffold", "fedbn", "qfedavg", "bulyan", "fednova", "pbt", "pbt_stacked")


class Classifier(L.LightningModule):
    """A user's own LightningModule (automatic optimization), wrapped as a cohort member."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(784, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x.flatten(1)), y)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("acc", (self.net(x.flatten(1)).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def decisions(callbacks: list[Any], module: L.LightningModule) -> dict[str, Any]:
    """What the algorithm decided: moves, votes, rounds (without timings), the ledger's blocks, DML's losses."""
    found: dict[str, Any] = {}
    for cb in callbacks:
        if isinstance(cb, ParticleSwarm):
            found["moves"] = cb.history
        elif isinstance(cb, CollectiveVoting):
            found["votes"] = [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in cb.results]
        elif isinstance(cb, PopulationBasedTraining):
            found["lineage"], found["values"] = cb.lineage, cb.values
        elif isinstance(cb, (FederatedAveraging, ProofOfLearning)):
            found["rounds"] = [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in cb.history]
    if isinstance(module, MutualLearning):
        found["losses"] = module.loss_history
    return found


def run_case(name: str, out: Path, world: int, ckpt_path: str | None = None, max_epochs: int | None = None,
             save_checkpoints: bool = False, split_loader: bool = False, **trainer_kwargs: Any) -> dict[str, Any] | None:
    """Run case ``name`` on ``world`` processes (1, or 2 under torchrun); rank 0 returns (and saves) its result."""
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0, verbose=False)
    module, datamodule, callbacks, limits = _case(name, out)
    if max_epochs is not None:
        limits["max_epochs"] = max_epochs
    if save_checkpoints:
        callbacks = [*callbacks, EpochCheckpoint(out / f"{name}_checkpoints")]
    distributed = dict(strategy="ddp", devices=world) if world > 1 else dict(devices=1)
    trainer = L.Trainer(
        **{**dict(accelerator="cpu", logger=False, enable_checkpointing=save_checkpoints, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=callbacks,
                  default_root_dir=str(out)), **distributed, **limits, **trainer_kwargs},
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of torchrun's processes: the same float sums in every run
    try:
        if split_loader:  # the user's own loader, split over the ranks
            datamodule.setup("fit")
            data = datamodule.train_set
            loader = DataLoader(data, batch_size=32, sampler=DistributedSampler(data), collate_fn=collate_batch)
            trainer.fit(module, train_dataloaders=loader)
        else:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        torch.set_num_threads(threads)
    if not trainer.is_global_zero:
        return None
    result = {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "global_step": trainer.global_step,
        "decisions": decisions(callbacks, module),
        "out": out,
    }
    torch.save(result, out / f"{name}.pt")
    return result


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--resume", help="a checkpoint written by one process after epoch 1, to resume on two")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    args = parser.parse_args(argv)
    for name in args.cases:
        run_case(name, args.out, world=2)
    # checkpoints across process counts: epoch 1 on two processes (resumed on one by the test) ...
    run_case("resume_from_two", args.out / "two", world=2, max_epochs=1, save_checkpoints=True)
    if args.resume:  # ... and one process's epoch-1 checkpoint resumed on two
        run_case("resume_from_one", args.out, world=2, ckpt_path=args.resume)
    # Lightning's default use_distributed_sampler=True: the module turns it off (members are sharded, not data)
    run_case("independent", args.out / "default_sampler", world=2, use_distributed_sampler=True)
    # a training loader the user split over the ranks is refused, on every rank
    try:
        run_case("independent", args.out / "split", world=2, split_loader=True)
    except ValueError as err:
        if int(os.environ.get("RANK", 0)) == 0:
            (args.out / "split_loader_error.txt").write_text(str(err))
    # Leave together: Lightning leaves the process group to an exit hook, and one full-suite run had rank 1
    # abort ("terminate called without an active exception") right after this last case, while rank 0 was
    # still writing (not reproduced in 24 reruns); a barrier, then an explicit teardown, closes the group on
    # both ranks at the same point instead of in two interpreter shutdowns.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
