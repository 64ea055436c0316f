"""Resume from any step: a checkpoint taken inside an epoch (and inside a round) resumes to the uninterrupted run.

Each case trains once with ``ModelCheckpoint(every_n_train_steps=1)``, so one
uninterrupted run leaves a checkpoint after every step; then fresh objects
resume from the checkpoints of seeded-random steps inside epochs and train to
the same end. The final weights must be equal bit for bit, and so must the
algorithm's records (swarm moves, vote rounds, federated rounds, PoFL blocks,
PBT exploits, the mutual-learning loss history), without their wall times.
What makes this work: the training loader's position (``StepLoader``), the
round in progress (proposers' snapshots, clients' steps left), and the
epoch's loss sums, all in the checkpoint.
"""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from helpers import fast_trainer, same_state, states
from lightning_colearn import (SCAFFOLD, CohortDataModule, CohortModule, CollectiveVoting, FederatedAveraging,
                               MutualLearning, ParticleSwarm, PopulationBasedTraining, ProofOfLearning)
from lightning_colearn.callbacks import EpochCheckpoint
from lightning_colearn.data.loaders import StepLoader
from lightning_colearn.ledger import Ledger
from lightning_colearn.models import MLP

EPOCHS, MEMBERS = 3, 4


def _module(algorithm: str, backend: str):
    torch.manual_seed(0)
    factory = lambda: MLP(hidden=16)  # noqa: E731
    if algorithm == "mutual":
        return MutualLearning(factory, size=MEMBERS, num_classes=10, backend=backend)
    return CohortModule(factory, size=MEMBERS, num_classes=10, backend=backend)


def _callbacks(algorithm: str, tmp) -> list:
    return {
        "independent": [],
        "mutual": [],
        "swarm": [ParticleSwarm(every_n_steps=3, n_particles=3, seed=1)],  # moves inside and across epochs
        "voting": [CollectiveVoting(seed=1)],
        "fedavg": [FederatedAveraging(clients_per_round=2, local_epochs=2, seed=1)],  # rounds span 2 epochs
        "fedadam": [FederatedAveraging(clients_per_round=3, server_optimizer="fedadam", seed=1)],
        # the strategies: each keeps its own state across a round (control variates, client losses, step counts)
        "scaffold": [SCAFFOLD(clients_per_round=2, local_epochs=2, seed=1)],
        "fedprox": [FederatedAveraging(clients_per_round=3, mu=0.1, seed=1)],
        "qfedavg": [FederatedAveraging(clients_per_round=3, aggregator="qfedavg", q=1.0, seed=1)],
        "fednova": [FederatedAveraging(clients_per_round=3, aggregator="fednova", max_local_steps=[1, 3], seed=1)],
        "median": [FederatedAveraging(clients_per_round=3, aggregator="median", seed=1)],
        "personal": [FederatedAveraging(clients_per_round=3, personal=["fc2.*"], seed=1)],
        "failing": [FederatedAveraging(clients_per_round=4, dropout=0.3, seed=1)],
        "pofl": [ProofOfLearning(miners=2, clients_per_round=4, local_epochs=1, threshold=0.0,
                                 ledger=str(tmp / "ledger.db"), seed=1)],
        "pbt": [PopulationBasedTraining({"lr": {"type": "loguniform", "low": 1e-3, "high": 1e-1}}, interval=1,
                                        monitor="val_acc", seed=1)],
    }[algorithm]


def _records(algorithm: str, callbacks: list, module) -> object:
    def strip(rows):  # the decisions, without wall times
        return [{k: v for k, v in r.items() if "seconds" not in k and k not in ("time", "hash")} for r in rows]

    if algorithm == "mutual":
        return module.loss_history
    if not callbacks:
        return None
    cb = callbacks[0]
    for name in ("history", "results", "lineage"):
        if hasattr(cb, name):
            return strip(getattr(cb, name))
    raise AssertionError(algorithm)


class LedgerCopies(Callback):
    """After every step, a copy of the ledger as it is then (what a resumed run must continue from)."""

    def __init__(self, ledger: Path, folder: Path):
        self.ledger, self.folder = ledger, folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.ledger, self.folder / f"ledger-step={trainer.global_step}.db")


class EveryStep(EpochCheckpoint):
    """``EpochCheckpoint(every_n_train_steps=1)`` keeping a copy of each save as ``step=<n>.ckpt``
    (an epoch's last step: the save at the epoch's end)."""

    def __init__(self, folder: Path):
        super().__init__(folder, every_n_train_steps=1)

    def _save_checkpoint(self, trainer, filepath):
        super()._save_checkpoint(trainer, filepath)
        shutil.copyfile(filepath, Path(filepath).with_name(f"step={trainer.global_step}.ckpt"))


def _blocks(path: Path) -> list[tuple]:
    ledger = Ledger(path)
    try:  # the decisions; a block's time (and so its hash) is the wall clock's
        return [(b.index, b.round, b.digest, b.scores) for b in ledger.listing()]
    finally:
        ledger.close()


def _fit(algorithm, backend, tmp, ckpt_path=None, every_step=False):
    module = _module(algorithm, backend)
    dm = CohortDataModule(num_members=MEMBERS, batch_size=32, max_train_samples=480, seed=0,  # 3 batches an epoch
                          stream="shared" if algorithm == "mutual" else "per_member")
    callbacks = _callbacks(algorithm, tmp)
    extra = [EveryStep(tmp / "steps")] if every_step else []
    if every_step and algorithm == "pofl":
        extra.insert(0, LedgerCopies(tmp / "ledger.db", tmp / "steps"))
    trainer = fast_trainer(max_epochs=EPOCHS, callbacks=[*callbacks, *extra], enable_checkpointing=every_step,
                           limit_val_batches=1 if algorithm == "pbt" else 0, default_root_dir=tmp)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, callbacks, trainer


# every algorithm on both backends; the strategies that only change the aggregation or the clients' losses on the
# loop backend (the round state they checkpoint is the same object on both)
CASES = [(a, b) for a in ("independent", "swarm", "mutual", "voting", "fedavg", "fedadam", "pofl", "pbt", "scaffold")
         for b in ("loop", "stacked")]
CASES += [(a, "loop") for a in ("fedprox", "qfedavg", "fednova", "median", "personal", "failing")]


@pytest.mark.parametrize("algorithm,backend", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_resume_from_a_step_inside_an_epoch_equals_the_uninterrupted_run(tmp_path, algorithm, backend):
    torch.set_num_threads(1)
    module, callbacks, trainer = _fit(algorithm, backend, tmp_path / "full", every_step=True)
    final, records = states(module), _records(algorithm, callbacks, module)
    steps_per_epoch = trainer.num_training_batches
    assert isinstance(trainer.train_dataloader.flattened[0] if hasattr(trainer.train_dataloader, "flattened")
                      else trainer.train_dataloader, StepLoader)
    total = trainer.global_step
    inside = [s for s in range(1, total) if s % steps_per_epoch]  # steps that end inside an epoch
    boundary = [s for s in range(1, total) if not s % steps_per_epoch]  # an epoch's last step (saved at its end)
    rng = random.Random(f"{algorithm}-{backend}")
    for step in sorted([*rng.sample(inside, 2), rng.choice(boundary)]):
        ckpt = tmp_path / "full" / "steps" / f"step={step}.ckpt"
        assert ckpt.is_file(), sorted(p.name for p in (tmp_path / "full" / "steps").iterdir())
        if algorithm == "pofl":  # the resumed run continues the ledger as it was at that step
            (tmp_path / f"from_{step}").mkdir()
            shutil.copyfile(tmp_path / "full" / "steps" / f"ledger-step={step}.db", tmp_path / f"from_{step}" / "ledger.db")
        resumed, resumed_callbacks, resumed_trainer = _fit(algorithm, backend, tmp_path / f"from_{step}", ckpt_path=str(ckpt))
        assert resumed_trainer.global_step == total
        assert all(same_state(a, b) for a, b in zip(states(resumed), final)), f"weights differ after resuming at step {step}"
        got = _records(algorithm, resumed_callbacks, resumed)
        assert repr(got) == repr(records), f"records differ after resuming at step {step}"  # (repr: nan == nan)
        if algorithm == "pofl":
            full_blocks = _blocks(tmp_path / "full" / "ledger.db")
            assert full_blocks and _blocks(tmp_path / f"from_{step}" / "ledger.db") == full_blocks


def test_loader_state_that_does_not_fit_is_refused():
    dm = CohortDataModule(num_members=2, batch_size=32, max_train_samples=128, seed=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader = loader.flattened[0] if hasattr(loader, "flattened") else loader
    with pytest.raises(ValueError, match=r"training-loader state must be \{'epoch': int, 'step': int\}, got \{'step': 1\}"):
        loader.load_state_dict({"step": 1})
    with pytest.raises(ValueError, match=r"does not fit this loader \(steps per epoch: 2\)"):
        loader.load_state_dict({"epoch": 0, "step": 9})


def test_a_resumed_step_sampler_continues_the_epoch_then_starts_the_next_from_zero():
    from lightning_colearn.data.loaders import StepSampler

    sampler = StepSampler(4)
    sampler.set_epoch(2)
    sampler.resume_at(2, 3)
    assert list(sampler) == [(2, 3)]
    sampler.set_epoch(3)
    assert list(sampler) == [(3, s) for s in range(4)]
    sampler.resume_at(5, 1)  # another epoch's position: ignored by this pass
    assert list(sampler) == [(3, s) for s in range(4)]
    assert not math.isnan(len(sampler))


# ------------------------------------------------------------------------------ bad checkpoint contents
def _state_at(tmp_path, algorithm: str, step: int = 2) -> tuple[dict, object, object]:
    """The callback (or module) state a step checkpoint holds, and fresh objects to load it into."""
    module, callbacks, _ = _fit(algorithm, "loop", tmp_path / "full", every_step=True)
    ckpt = torch.load(tmp_path / "full" / "steps" / f"step={step}.ckpt", weights_only=False)
    return ckpt, _module(algorithm, "loop"), _callbacks(algorithm, tmp_path / "fresh")


def test_a_round_in_progress_without_its_snapshots_is_refused(tmp_path):
    ckpt, _, (voting,) = _state_at(tmp_path, "voting")
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("CollectiveVoting")]
    assert state["round_in_progress"] is not None  # step 2 is inside the first round
    state["round_in_progress"]["snapshots"] = {}
    with pytest.raises(ValueError, match=r"CollectiveVoting checkpoint state is corrupt.*round_in_progress must hold "
                                         r"each proposer's steps left and snapshot"):
        voting.load_state_dict(state)


def test_clients_steps_left_that_do_not_match_the_round_are_refused(tmp_path):
    ckpt, _, (fedavg,) = _state_at(tmp_path, "fedavg")
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("FederatedAveraging")]
    assert set(state["remaining"]) == set(state["clients"])
    state["remaining"] = {99: 1}
    with pytest.raises(ValueError, match=r"remaining must be None or each client of the round's steps left, got \{99: 1\}"):
        fedavg.load_state_dict(state)


def test_epoch_loss_sums_of_another_cohort_size_are_refused(tmp_path):
    ckpt, module, _ = _state_at(tmp_path, "independent")
    ckpt["cohort_epoch_sums"]["_epoch_loss"] = torch.zeros(MEMBERS + 1)
    with pytest.raises(ValueError, match=r"cohort_epoch_sums\['_epoch_loss'\] does not fit this module \(expected \(4,\), got \(5,\)\)"):
        module.on_load_checkpoint(ckpt)


def test_epoch_checkpoint_step_interval_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"every_n_train_steps must be None or an int >= 1, got 0"):
        EpochCheckpoint(tmp_path, every_n_train_steps=0)


def test_epoch_checkpoint_saves_every_n_steps_and_the_last_at_the_epoch_end(tmp_path):
    saved = []

    class Spy(EpochCheckpoint):
        def _save_checkpoint(self, trainer, filepath):
            saved.append(trainer.global_step)
            super()._save_checkpoint(trainer, filepath)

    module = _module("independent", "loop")
    dm = CohortDataModule(num_members=MEMBERS, batch_size=32, max_train_samples=480, seed=0)
    trainer = fast_trainer(max_epochs=2, callbacks=[Spy(tmp_path, every_n_train_steps=2)], enable_checkpointing=True)
    trainer.fit(module, datamodule=dm)
    assert saved == [2, 3, 4, 6]  # every 2nd step of two 3-step epochs, and each epoch's end (its last step)
    assert (tmp_path / "last.ckpt").is_file() and not list(tmp_path.glob("*.tmp"))
