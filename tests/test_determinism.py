"""Same seed, same machine, same backend: two runs of every algorithm are bit-for-bit identical.

What is promised, and tested here: on one machine, with one backend (``"loop"`` or ``"stacked"``) and one torch
intra-op thread count, two runs started from the same ``L.seed_everything`` seed with fresh objects end with
bit-identical member weights and buffers, bit-identical optimizer state, identical decisions of the algorithm
(swarm moves, votes, sampled clients, winners, scores) and, for ProofOfLearning, ledgers with identical block
digests and hashes.

What is not promised:

* across backends, results agree only within float tolerance (the stacked backend batches the members' matmuls,
  which rounds differently); that is tested in ``test_stacked_algorithms.py``;
* across thread counts nothing is promised: a reduction split over a different number of threads adds in another
  order, so the last bits of a sum (and everything trained from it) can differ. This file therefore keeps the
  process's thread count as it is (it does not call ``torch.set_num_threads``);
* across machines (other CPU, other BLAS / torch build) nothing is promised either.

All runs use a plain Trainer: ``deterministic=True`` is not needed for bit-identical CPU runs.
A ledger block's ``time`` is a wall-clock timestamp covered by the block hash, so the PoFL test pins the ledger's
clock; the weight digests do not depend on it.
"""

from __future__ import annotations

import math
import types
from functools import partial
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics.classification import MulticlassAccuracy

import lightning_colearn.ledger as ledger_module
from helpers import BNNet, same_nested, states
from lightning_colearn import (
    CohortDataModule,
    CohortModule,
    CollectiveVoting,
    FederatedAveraging,
    MutualLearning,
    ParticleSwarm,
    ProofOfLearning,
)
from lightning_colearn.ledger import Ledger
from lightning_colearn.models import MLP, LogisticRegression
from test_stacked_algorithms import ADAM, BACKENDS, SGD, Run, changed, clients_dm, run, voting_dm


# --------------------------------------------------------------------- helpers
def same_value(a: Any, b: Any) -> bool:
    """Exact equality of nested records (dicts, lists, tuples, tensors, floats); NaN equals NaN, nothing else is loose."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        if not a.is_floating_point():
            return torch.equal(a, b)
        nan = a.isnan()
        return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def decisions(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records without their wall-time fields (``*_seconds``)."""
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in records]


def assert_identical_runs(first: Run, second: Run) -> None:
    """Same initial members; every run trained; final weights, optimizer state and last losses bit-identical."""
    assert len(first.init) == len(second.init)
    for i, (a, b) in enumerate(zip(first.init, second.init)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"member {i}: initial weights differ"
    for r in (first, second):
        assert all(changed(r)), "every member must have trained"
    final_a, final_b = states(first.module), states(second.module)
    assert len(final_a) == len(final_b)
    for i, (a, b) in enumerate(zip(final_a, final_b)):
        assert a.keys() == b.keys(), i
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"member {i} {k!r} differs between runs"
    opt_a, opt_b = first.trainer.optimizers[0].state_dict(), second.trainer.optimizers[0].state_dict()
    assert opt_a["members"] and any(m["state"] for m in opt_a["members"])  # there is state to compare
    assert same_nested(opt_a, opt_b), "optimizer state differs between runs"
    assert first.trainer.global_step == second.trainer.global_step > 0
    assert same_value(first.module.last_loss, second.module.last_loss)  # NaN: a member that has not trained yet


def twice(backend: str, *args: Any, **kwargs: Any) -> tuple[Run, Run]:
    """Two runs of the same setup on ``backend``, each from ``seed_everything(0)`` with fresh objects."""
    return run(backend, *args, **kwargs), run(backend, *args, **kwargs)


backends = pytest.mark.parametrize("backend", BACKENDS)


# ------------------------------------------------------------------- algorithms
@backends
def test_independent_training_is_bit_identical(backend):
    """Plain CohortModule (independent members, BatchNorm, Adam) trains bit-identically twice on one backend."""
    first, second = twice(
        backend,
        lambda b: CohortModule(BNNet, size=3, optimizer=ADAM, backend=b),
        lambda: CohortDataModule("mnist_small", num_members=3, batch_size=16, max_train_samples=480),
        lambda: [Callback()],
        max_epochs=2,
    )
    assert_identical_runs(first, second)


@backends
def test_particle_swarm_is_bit_identical(backend):
    """ParticleSwarm (draws with replacement, moves all, noise, moved buffers) makes the same moves twice."""
    first, second = twice(
        backend,
        lambda b: CohortModule(BNNet, size=5, optimizer=SGD, backend=b),
        lambda: CohortDataModule("mnist_small", num_members=5, batch_size=16, max_train_samples=800),
        lambda: [ParticleSwarm(every_n_steps=2, n_particles=3, alpha=0.5, replacement=True, move="all",
                               sigma=0.01, buffers="move", seed=1)],
        max_steps=8,
    )
    assert_identical_runs(first, second)
    history = first.callback.history
    assert len(history) == 4 and any(r["moved"] for r in history)
    assert same_value(decisions(second.callback.history), decisions(history))


@backends
def test_mutual_learning_is_bit_identical(backend):
    """MutualLearning (three homogeneous MLP students, shared stream) trains bit-identically twice."""
    first, second = twice(
        backend,
        lambda b: MutualLearning(MLP, size=3, optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9), backend=b),
        lambda: CohortDataModule("mnist_small", num_members=3, batch_size=32, stream="shared", max_train_samples=320),
        lambda: [Callback()],
        max_epochs=2,
    )
    assert_identical_runs(first, second)
    assert len(first.module.loss_history) == 2
    assert same_value(second.module.loss_history, first.module.loss_history)


@backends
def test_collective_voting_is_bit_identical(backend):
    """CollectiveVoting (random proposer, real votes, accepted and rejected rounds) decides bit-identically twice."""
    first, second = twice(
        backend,
        lambda b: CohortModule(LogisticRegression, size=4, optimizer=ADAM, backend=b),
        lambda: voting_dm(4, max_train_samples=800, partition="dirichlet", alpha=0.5),
        lambda: [CollectiveVoting(threshold=0.5, proposer="random", criterion=MulticlassAccuracy(num_classes=10), seed=3)],
        max_epochs=5,
    )
    assert_identical_runs(first, second)
    results = first.callback.results
    assert len(results) == 5 and {r["accepted"] for r in results} == {True, False}  # restores are exercised too
    assert same_value(decisions(second.callback.results), decisions(results))
    assert same_value(second.callback.current, first.callback.current)


@backends
def test_federated_averaging_is_bit_identical(backend):
    """FederatedAveraging with client sampling (3 of 6) and FedProx samples, aggregates and scores identically twice."""
    first, second = twice(
        backend,
        lambda b: CohortModule(LogisticRegression, size=6, optimizer=SGD, backend=b),
        clients_dm,
        lambda: [FederatedAveraging(clients_per_round=3, mu=0.1, reset_client_optimizer=False, seed=4)],
        max_epochs=4,
    )
    assert_identical_runs(first, second)
    history = first.callback.history
    assert len(history) == 4 and len({tuple(r["clients"]) for r in history}) > 1  # sampling varies between rounds
    assert same_value(decisions(second.callback.history), decisions(history))


@backends
def test_proof_of_learning_is_bit_identical(backend, tmp_path, monkeypatch):
    """ProofOfLearning picks the same winners and writes ledgers with identical block digests and hashes twice."""
    # the block timestamp is the only wall-clock input to a block (its hash covers it): pin it
    monkeypatch.setattr(ledger_module, "_time", types.SimpleNamespace(time=lambda: 1_700_000_000.0))
    paths = iter([tmp_path / "first.db", tmp_path / "second.db"])

    def callbacks() -> list[Callback]:
        return [ProofOfLearning(miners=3, clients_per_round=4, threshold=0.0, seed=2, ledger=next(paths))]

    first, second = twice(
        backend,
        lambda b: CohortModule(LogisticRegression, size=9, optimizer=SGD, backend=b),
        lambda: clients_dm(9),
        callbacks,
        max_epochs=3,
    )
    assert_identical_runs(first, second)
    history = first.callback.history
    assert [r["block"] for r in history] == [0, 1, 2]
    assert same_value(decisions(second.callback.history), decisions(history))
    assert same_value(second.callback.miner_states, first.callback.miner_states)
    with Ledger(tmp_path / "first.db", readonly=True) as la, Ledger(tmp_path / "second.db", readonly=True) as lb:
        assert la.verify().ok and lb.verify().ok
        blocks_a, blocks_b = list(la), list(lb)
        assert len(blocks_a) == len(blocks_b) == 3
        assert [b.digest for b in blocks_b] == [b.digest for b in blocks_a]
        assert [b.hash for b in blocks_b] == [b.hash for b in blocks_a]
        assert same_value(blocks_b, blocks_a)  # every field: index, links, round, winner, scores, time
        for i in range(3):
            assert same_nested(lb.load(i), la.load(i))
