"""Every algorithm gives the same results on the stacked backend as on the loop backend (the oracle), same seed.

Each test builds one small, seeded setup twice, with ``backend="loop"`` and ``backend="stacked"``, and compares
the final weights (within float tolerance) and the algorithm's decisions (exactly). Independent training of a
plain CohortModule is covered elsewhere.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics.classification import MulticlassAccuracy

import helpers
from helpers import BNNet, fast_trainer, same_nested, same_state, states
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
from lightning_colearn.optim import CohortOptimizer, StackedOptimizer

BACKENDS = ("loop", "stacked")
RTOL, ATOL = 1e-4, 1e-5
# Many Adam steps: float32 sums in another order (one bmm instead of N matmuls) drift apart most where Adam
# divides by a tiny second moment (measured: 2.2e-5 on 1 of 100k weights after 34 steps of mutual learning);
# the same allowance as tests/test_stacked.py's TRAIN_TOL. A wrong update moves weights by ~lr = 1e-2 a step.
ADAM_ATOL = 1e-4

SGD = partial(torch.optim.SGD, lr=0.1, momentum=0.9)
ADAM = partial(torch.optim.Adam, lr=1e-2)


# --------------------------------------------------------------------- helpers
@dataclass
class Run:
    module: CohortModule
    callback: Callback
    trainer: L.Trainer
    init: list[dict[str, torch.Tensor]]  # member states before fit
    extra: list[Callback]  # the other callbacks (probes, snapshots), in the order given


def run(
    backend: str,
    make_module: Callable[[str], CohortModule],
    make_dm: Callable[[], CohortDataModule],
    make_callbacks: Callable[[], list[Callback]],
    seed: int = 0,
    **trainer_kwargs: Any,
) -> Run:
    """Seed, build the module on ``backend``, fit it with the callbacks; the algorithm's callback is the last one."""
    L.seed_everything(seed, verbose=False)
    module = make_module(backend)
    assert module.stacked is (backend == "stacked")
    init = states(module)
    callbacks = make_callbacks()
    trainer = fast_trainer(**trainer_kwargs, callbacks=callbacks)
    trainer.fit(module, datamodule=make_dm())
    assert isinstance(trainer.optimizers[0], StackedOptimizer if backend == "stacked" else CohortOptimizer)
    if backend == "stacked":  # the batched layers ran (no silent fallback to vmap)
        assert module.cohort.engine.mode == "batched"
    return Run(module, callbacks[-1], trainer, init, callbacks[:-1])


def run_both(*args: Any, **kwargs: Any) -> tuple[Run, Run]:
    loop, stacked = (run(backend, *args, **kwargs) for backend in BACKENDS)
    # same seed, same initial members: a difference later is the backends', not the setups'
    assert all(same_state(a, b) for a, b in zip(loop.init, stacked.init))
    return loop, stacked


def assert_same_weights(loop: CohortModule | list, stacked: CohortModule | list, atol: float = ATOL) -> None:
    """Every member's parameters and buffers agree within float tolerance (the same keys on both backends)."""
    a = states(loop) if isinstance(loop, CohortModule) else loop
    b = states(stacked) if isinstance(stacked, CohortModule) else stacked
    assert len(a) == len(b)
    for i, (sa, sb) in enumerate(zip(a, b)):
        assert sa.keys() == sb.keys(), i
        for k in sa:
            rtol, tol = (1e-9, 1e-10) if sa[k].dtype == torch.float64 else (RTOL, atol)
            torch.testing.assert_close(sb[k], sa[k], rtol=rtol, atol=tol, msg=lambda m, i=i, k=k: f"member {i} {k!r}: {m}")


def changed(r: Run) -> list[bool]:
    """Which members' weights differ from their initial ones after fit."""
    return [not same_state(a, b) for a, b in zip(r.init, states(r.module))]



class RoundSnapshots(Callback):
    """Member states and member optimizer states at every epoch's start and end (list it before the algorithm)."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, Any]] = []

    @staticmethod
    def _take(module: CohortModule) -> tuple[list, list]:
        return states(module), [copy.deepcopy(o.state_dict()) for o in module.member_optimizers()]

    def on_train_epoch_start(self, trainer, pl_module):
        before, opt_before = self._take(pl_module)
        self.rounds.append({"before": before, "opt_before": opt_before})

    def on_train_epoch_end(self, trainer, pl_module):
        after, opt_after = self._take(pl_module)
        self.rounds[-1].update(after=after, opt_after=opt_after)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the 2-core machine is shared (a busy second core makes 2-thread kernels stall)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------- ParticleSwarm
@pytest.mark.parametrize(
    ("model", "optimizer", "swarm_kwargs", "precision"),
    [
        pytest.param(LogisticRegression, SGD, {}, "32-true", id="sgd-keep-optimizer"),
        pytest.param(LogisticRegression, SGD, {"reset_optimizer": True}, "32-true", id="sgd-reset-optimizer"),
        # Adam right after a reset divides each gradient by its own magnitude (g / (|g| + eps)): where an MLP weight's
        # gradient is a near-cancelling sum, float32 rounding of the two backends' matmuls (~1e-7) becomes a 1e-3
        # relative difference of that step (measured: 1 of 100,352 fc1 weights off by 1.6e-5). In float64 the
        # backends agree to 5e-13, which is what this case checks.
        pytest.param(MLP, ADAM, {"reset_optimizer": True, "move": "all", "sigma": 0.01}, "64-true", id="adam-reset-all-noise-f64"),
        pytest.param(BNNet, SGD, {"buffers": "copy"}, "32-true", id="batchnorm-copy-buffers"),
        pytest.param(BNNet, SGD, {"buffers": "move", "replacement": True}, "32-true", id="batchnorm-move-buffers"),
    ],
)
def test_particle_swarm_same_moves_and_weights(model, optimizer, swarm_kwargs, precision):
    """ParticleSwarm draws, ranks and moves the same members and ends with the same weights on both backends."""
    loop, stacked = run_both(
        lambda b: CohortModule(model, size=5, optimizer=optimizer, backend=b),
        lambda: CohortDataModule("mnist_small", num_members=5, batch_size=16, max_train_samples=800),
        lambda: [ParticleSwarm(every_n_steps=2, n_particles=3, alpha=0.5, seed=1, **swarm_kwargs)],
        max_steps=8, precision=precision,
    )
    history = loop.callback.history
    assert len(history) == 4 and any(r["moved"] for r in history)
    keys = ("step", "chosen", "best", "moved")
    assert [{k: r[k] for k in keys} for r in stacked.callback.history] == [{k: r[k] for k in keys} for r in history]
    for a, b in zip(history, stacked.callback.history):
        assert b["fitness"] == pytest.approx(a["fitness"], rel=RTOL, abs=ATOL)
    assert all(changed(stacked))
    assert_same_weights(loop.module, stacked.module)
    torch.testing.assert_close(stacked.module.last_loss, loop.module.last_loss, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------- MutualLearning
@pytest.mark.parametrize(
    ("optimizer", "mutual_kwargs"),
    [
        pytest.param(partial(torch.optim.SGD, lr=0.05, momentum=0.9), {}, id="sgd-kl"),
        pytest.param(ADAM, {"temperature": 4.0, "mode": "mse", "kl_weight": 0.5}, id="adam-mse-T4"),
    ],
)
def test_mutual_learning_homogeneous_students_same_weights(optimizer, mutual_kwargs):
    """MutualLearning with three MLP students ends with the same students and losses on both backends."""
    loop, stacked = run_both(
        lambda b: MutualLearning(MLP, size=3, optimizer=optimizer, backend=b, **mutual_kwargs),
        lambda: CohortDataModule("mnist_small", num_members=3, batch_size=32, stream="shared", max_train_samples=640),
        lambda: [Callback()],
        max_epochs=2,
    )
    assert stacked.trainer.global_step == loop.trainer.global_step == 34  # 2 epochs of 17 shared batches
    assert all(changed(stacked))
    assert_same_weights(loop.module, stacked.module, atol=ADAM_ATOL if optimizer is ADAM else ATOL)
    assert [e for e, _ in stacked.module.loss_history] == [0, 1]
    for (_, a), (_, b) in zip(loop.module.loss_history, stacked.module.loss_history):
        assert b == pytest.approx(a, rel=RTOL, abs=ATOL)


# ------------------------------------------------------------ CollectiveVoting
def voting_dm(members: int = 3, **kwargs: Any) -> CohortDataModule:
    defaults = dict(num_members=members, batch_size=32, max_train_samples=600, splits=(0.8, 0.2, 0.0))
    return CohortDataModule("mnist_small", **{**defaults, **kwargs})


def force(voting: CollectiveVoting, accept: bool, size: int) -> None:
    """Make every voter vote yes (current score below any accuracy) or no (above any)."""
    voting.current = [-1.0 if accept else 2.0] * size


class RecordingVoting(CollectiveVoting):
    """CollectiveVoting that keeps every round's member states just before the vote (the proposals)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.proposals: list[list[dict[str, torch.Tensor]]] = []

    def end_round(self, trainer, pl_module):
        self.proposals.append(states(pl_module))
        return super().end_round(trainer, pl_module)


VOTE_KEYS = ("round", "step", "proposer", "candidates", "votes", "yes", "voters", "accepted", "reason")


def assert_same_votes(loop: Run, stacked: Run) -> None:
    a, b = loop.callback.results, stacked.callback.results
    assert [{k: r[k] for k in VOTE_KEYS} for r in b] == [{k: r[k] for k in VOTE_KEYS} for r in a]
    for ra, rb in zip(a, b):
        assert rb["scores"] == pytest.approx(ra["scores"], rel=RTOL, abs=ATOL, nan_ok=True)
        assert rb["current"] == pytest.approx(ra["current"], rel=RTOL, abs=ATOL, nan_ok=True)


def assert_rejected_rounds_restore_everything(r: Run) -> int:
    """In every rejected round each learner (the proposer's weights and optimizer state included) is bit-for-bit back;
    returns the number of rejected rounds."""
    (snapshots,) = [c for c in r.extra if isinstance(c, RoundSnapshots)]
    assert len(snapshots.rounds) == len(r.callback.results)
    rejected = 0
    for record, snap in zip(r.callback.results, snapshots.rounds):
        if record["accepted"]:
            continue
        rejected += 1
        proposals = r.callback.proposals[record["round"]]
        for p in record["candidates"]:  # the proposer(s) did train this round
            assert not same_state(proposals[p], snap["before"][p]), (record["round"], p)
        for i, (before, after) in enumerate(zip(snap["before"], snap["after"])):
            assert same_state(before, after), (record["round"], i)
        for i, (before, after) in enumerate(zip(snap["opt_before"], snap["opt_after"])):
            assert same_nested(before, after), (record["round"], i)
    return rejected


def test_collective_voting_forced_rejection_same_decisions_and_bit_for_bit_restore():
    """Accepted then forced-rejected voting rounds: same decisions and weights on both backends, and a rejected
    stacked round leaves every learner (weights and optimizer state) bit-for-bit unchanged."""

    def callbacks():
        voting = RecordingVoting(threshold=0.5)
        # rounds 0-2 accepted, round 3 (learner 0 proposes again, with momentum from round 0) rejected
        probe = helpers.Probe(before=lambda t, m: force(voting, accept=t.current_epoch < 3, size=3))
        return [probe, RoundSnapshots(), voting]

    loop, stacked = run_both(
        lambda b: CohortModule(LogisticRegression, size=3, optimizer=SGD, backend=b), voting_dm, callbacks, max_epochs=4,
    )
    assert [r["accepted"] for r in stacked.callback.results] == [True, True, True, False]
    assert stacked.callback.results[3]["proposer"] == 0 and stacked.callback.results[3]["yes"] == 0
    assert_same_votes(loop, stacked)
    assert stacked.extra[1].rounds[3]["opt_before"][0]["state"]  # learner 0 had momentum to restore
    assert assert_rejected_rounds_restore_everything(stacked) == 1
    assert all(changed(stacked))
    assert_same_weights(loop.module, stacked.module)


@pytest.mark.parametrize(
    ("optimizer", "voting_kwargs"),
    [
        pytest.param(SGD, {"threshold": 1.0}, id="sgd-round-robin-unanimous"),
        pytest.param(ADAM, {"threshold": 0.5, "proposer": "all"}, id="adam-all-propose"),
    ],
)
def test_collective_voting_same_votes_and_weights(optimizer, voting_kwargs):
    """Unforced voting rounds (votes scored for real) give the same votes, decisions and weights on both backends."""
    loop, stacked = run_both(
        lambda b: CohortModule(LogisticRegression, size=4, optimizer=optimizer, backend=b),
        lambda: voting_dm(4, max_train_samples=800, partition="dirichlet", alpha=0.5),
        lambda: [RoundSnapshots(), RecordingVoting(criterion=MulticlassAccuracy(num_classes=10), seed=3, **voting_kwargs)],
        max_epochs=5,
    )
    results = loop.callback.results
    assert len(results) == 5 and any(r["accepted"] for r in results)  # measured: 1 and 2 of 5 accepted
    assert_same_votes(loop, stacked)
    assert assert_rejected_rounds_restore_everything(stacked) == assert_rejected_rounds_restore_everything(loop) >= 1
    assert all(changed(stacked))
    assert_same_weights(loop.module, stacked.module)


# ---------------------------------------------------------- FederatedAveraging
def clients_dm(members: int = 6, **kwargs: Any) -> CohortDataModule:
    defaults = dict(num_members=members, batch_size=20, max_train_samples=60 * members, splits=(1.0, 0.0, 0.0),
                    eval_batch_size=500, partition="dirichlet", alpha=1.0)  # unequal shares: weights matter
    return CohortDataModule("mnist_small", **{**defaults, **kwargs})


@pytest.mark.parametrize(
    ("optimizer", "fed_kwargs"),
    [
        pytest.param(SGD, {"clients_per_round": 3}, id="fedavg-sampled-3-of-6"),
        pytest.param(SGD, {"clients_per_round": 4, "mu": 0.5, "reset_client_optimizer": False}, id="fedprox-mu0.5-keep-optimizer"),
        pytest.param(ADAM, {"clients_per_round": 2, "mu": 0.1, "local_epochs": 2}, id="fedprox-adam-2-local-epochs"),
        pytest.param(SGD, {"clients_per_round": 5, "aggregator": "median"}, id="median"),
    ],
)
def test_federated_averaging_same_clients_and_weights(optimizer, fed_kwargs):
    """FederatedAveraging (client sampling, FedProx, robust aggregation) samples the same clients, scores the same
    and ends with the same global model on both backends."""
    loop, stacked = run_both(
        lambda b: CohortModule(LogisticRegression, size=6, optimizer=optimizer, backend=b),
        clients_dm,
        lambda: [FederatedAveraging(seed=4, **fed_kwargs)],
        max_epochs=4,
    )
    a, b = loop.callback.history, stacked.callback.history
    assert len(a) == 4 // fed_kwargs.get("local_epochs", 1)
    assert [r["clients"] for r in b] == [r["clients"] for r in a]
    assert len({tuple(r["clients"]) for r in a}) > 1  # sampling varies between rounds
    assert [r["installed"] for r in b] == [r["installed"] for r in a] == [True] * len(a)
    # server accuracy on 500 samples: one sample flipped by float rounding would be 0.002
    assert [r["score"] for r in b] == pytest.approx([r["score"] for r in a], abs=2.5e-3)
    assert stacked.trainer.global_step == loop.trainer.global_step
    assert all(changed(stacked))
    assert stacked.module.loss_terms == loop.module.loss_terms == []
    assert_same_weights(loop.module, stacked.module)


# ------------------------------------------------------------- ProofOfLearning
@pytest.mark.parametrize("threshold", [pytest.param(0.0, id="blocks"), pytest.param(1.1, id="no-block")])
def test_proof_of_learning_same_winners_blocks_and_weights(tmp_path, threshold):
    """ProofOfLearning picks the same winners, appends the same blocks and ends with the same miner models and
    weights on both backends (block digests may differ by float rounding, so they are not compared)."""

    def callbacks(backend):
        return lambda: [ProofOfLearning(miners=3, clients_per_round=4, threshold=threshold, seed=2,
                                        ledger=tmp_path / f"{backend}.db")]

    loop, stacked = (  # not run_both: each backend writes its own ledger
        run(backend, lambda b: CohortModule(LogisticRegression, size=9, optimizer=SGD, backend=b), lambda: clients_dm(9),
            callbacks(backend), max_epochs=3)
        for backend in BACKENDS
    )
    assert all(same_state(a, b) for a, b in zip(loop.init, stacked.init))
    a, b = loop.callback.history, stacked.callback.history
    assert len(a) == 3
    keys = ("round", "clients", "winner", "block", "reason")
    assert [{k: r[k] for k in keys} for r in b] == [{k: r[k] for k in keys} for r in a]
    for ra, rb in zip(a, b):
        assert [s is None for s in rb["scores"]] == [s is None for s in ra["scores"]]
        assert [s for s in rb["scores"] if s is not None] == pytest.approx([s for s in ra["scores"] if s is not None], abs=2.5e-3)
        assert rb["score"] == pytest.approx(ra["score"], abs=2.5e-3)  # None (no block) on both, or close
    blocks = [r["block"] for r in a if r["block"] is not None]
    assert blocks == ([0, 1, 2] if threshold == 0.0 else [])
    with Ledger(tmp_path / "loop.db") as la, Ledger(tmp_path / "stacked.db") as lb:
        assert len(la) == len(lb) == len(blocks) and lb.verify().ok
        assert [blk.winner for blk in lb] == [blk.winner for blk in la]
        assert [blk.round for blk in lb] == [blk.round for blk in la]
        for i in range(len(la)):
            assert_same_weights([la.load(i)], [lb.load(i)])
    assert_same_weights(loop.callback.miner_states, stacked.callback.miner_states)
    assert all(changed(stacked))
    assert_same_weights(loop.module, stacked.module)
