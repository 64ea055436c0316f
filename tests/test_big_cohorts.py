"""Big cohorts on a 2-core machine: 64 logistic regressions and 16 ConvNets, memory flat over rounds.

RSS is read from /proc after every round. "Flat" means the last rounds hold no more than a few MiB
over the early ones: a copy kept alive per round (a snapshot, a candidate, a result tensor) would add
at least one member's size (LR: 31 KiB x 64 members per round; ConvNet: 90 KiB per member) each round.
"""

from __future__ import annotations

import gc
from functools import partial

import lightning as L
import pytest
import torch

from helpers import fast_trainer
from lightning_colearn import CohortDataModule, CohortModule, CollectiveVoting, FederatedAveraging
from lightning_colearn.models import ConvNet, LogisticRegression

pytestmark = pytest.mark.slow


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class RoundRss(L.Callback):
    """RSS (MiB) at the end of every round (epoch), after a garbage collection."""

    def __init__(self) -> None:
        self.rss: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        gc.collect()
        self.rss.append(rss_mib())


@pytest.mark.parametrize("backend", ["stacked"])  # a leak per round would show on either backend; one keeps the suite short
def test_64_logistic_regressions_federated_50_rounds_flat_memory(backend):
    """64 clients, 16 sampled per round, 50 FedAvg rounds: every round runs and RSS does not grow."""
    L.seed_everything(0, verbose=False)
    module = CohortModule(LogisticRegression, size=64, optimizer=partial(torch.optim.SGD, lr=0.05), backend=backend)
    fed, probe = FederatedAveraging(clients_per_round=16), RoundRss()
    trainer = fast_trainer(max_epochs=50, callbacks=[fed, probe])
    trainer.fit(module, datamodule=CohortDataModule(num_members=64, batch_size=32, seed=0))
    assert len(fed.history) == 50
    early, late = max(probe.rss[5:15]), max(probe.rss[-10:])
    assert late - early < 8.0, f"RSS grew {late - early:.1f} MiB from rounds 6-15 to 41-50: {probe.rss}"


def test_16_convnets_vote_12_rounds_flat_memory():
    """16 ConvNet learners (stacked), 12 voting rounds: every round is recorded and RSS does not grow."""
    L.seed_everything(0, verbose=False)
    module = CohortModule(ConvNet, size=16, optimizer=partial(torch.optim.Adam, lr=1e-3), backend="stacked")
    vote, probe = CollectiveVoting(threshold=0.5, vote_batches=1, steps_per_round=2), RoundRss()
    trainer = fast_trainer(max_epochs=12, limit_train_batches=2, callbacks=[probe, vote])
    trainer.fit(module, datamodule=CohortDataModule(num_members=16, batch_size=32, seed=0))
    assert len(vote.results) == 12
    early, late = max(probe.rss[2:6]), max(probe.rss[-4:])
    assert late - early < 8.0, f"RSS grew {late - early:.1f} MiB from rounds 3-6 to 9-12: {probe.rss}"


def test_memory_grows_linearly_with_members():
    """Stacked LR cohorts of 16, 32 and 64: the parameter memory per member is constant (linear growth)."""
    sizes, used = [16, 32, 64], []
    for n in sizes:
        torch.manual_seed(0)
        module = CohortModule(LogisticRegression, size=n, optimizer=partial(torch.optim.Adam, lr=1e-3), backend="stacked")
        opt = module.configure_optimizers()
        for p in module.cohort.stacked_parameters():
            p.grad = torch.zeros_like(p)
        opt.step()  # Adam's moments exist now: parameters + gradients + 2 moments
        tensors = [*module.cohort.stacked_parameters(), *(p.grad for p in module.cohort.stacked_parameters())]
        tensors += [t for ts in opt._state.values() for t in ts]
        used.append(sum(t.numel() * t.element_size() for t in tensors))
    per_member = [u / n for u, n in zip(used, sizes)]
    assert max(per_member) - min(per_member) < 1024, per_member  # the same bytes per member at every size
    assert per_member[0] == pytest.approx(4 * 7850 * 4 + 3 * 4, rel=0.01)  # 4 float32 copies of 7,850 weights (+ steps)
