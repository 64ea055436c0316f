"""CollectiveVoting: rejection restores exactly, acceptance installs everywhere, votes, resume, errors, accuracy."""

from __future__ import annotations

import copy
import math
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torchmetrics import MeanSquaredError, Metric
from torchmetrics.classification import MulticlassAccuracy

import lightning_colearn.callbacks.voting as voting_module
import helpers
from helpers import BNNet, fast_trainer, same_nested, same_state, states
from lightning_colearn import CohortDataModule, CohortModule, CollectiveVoting
from lightning_colearn.metrics.scoring import score
from lightning_colearn.models import MLP, ColearnConvNet, LogisticRegression



def Probe(on_round_start=None, on_round_trained=None):
    """helpers.Probe with hooks that also get the round's epoch: ``hook(epoch, trainer, module)``."""
    def wrap(hook):
        return None if hook is None else (lambda trainer, module: hook(trainer.current_epoch, trainer, module))

    return helpers.Probe(wrap(on_round_start), wrap(on_round_trained))


def force(voting: CollectiveVoting, accept: bool, size: int) -> None:
    """Make every voter vote yes (current score below anything) or no (above anything), for accuracy."""
    voting.current = [-1.0 if accept else 2.0] * size


def small_dm(members=3, **kwargs) -> CohortDataModule:
    defaults = dict(num_members=members, batch_size=32, max_train_samples=600, splits=(0.8, 0.2, 0.0))
    return CohortDataModule("mnist_small", **{**defaults, **kwargs})


def fit(module, dm, callbacks, **trainer_kwargs):
    trainer = fast_trainer(**{"max_epochs": 1, **trainer_kwargs}, callbacks=callbacks)
    trainer.fit(module, datamodule=dm)
    return trainer


# ------------------------------------------------------------ accept / reject
def test_rejected_round_restores_proposer_weights_and_optimizer_state_and_leaves_others_bit_for_bit():
    torch.manual_seed(0)
    voting = CollectiveVoting(threshold=0.5)
    seen = {}

    def start(epoch, trainer, module):
        force(voting, accept=epoch < 3, size=3)  # rounds 0-2 accepted, round 3 (proposer 0 again) rejected
        if epoch == 3:
            seen["before"] = states(module)
            seen["optimizer"] = copy.deepcopy(trainer.optimizers[0].optimizers[0].state_dict())

    def trained(epoch, trainer, module):
        if epoch == 3:
            seen["proposal"] = states(module)[0]

    module = CohortModule(LogisticRegression, size=3, optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9))
    trainer = fit(module, small_dm(), [Probe(start, trained), voting], max_epochs=4)

    assert [r["accepted"] for r in voting.results] == [True, True, True, False]
    assert voting.results[3]["proposer"] == 0 and voting.results[3]["yes"] == 0
    assert not same_state(seen["proposal"], seen["before"][0])  # the proposer did train in round 3
    assert seen["optimizer"]["state"]  # it had momentum buffers from round 0 to restore
    for before, after in zip(seen["before"], states(module)):
        assert same_state(before, after)
    assert same_nested(trainer.optimizers[0].optimizers[0].state_dict(), seen["optimizer"])


def test_accepted_round_installs_parameters_and_buffers_everywhere_and_keeps_voters_optimizer_state():
    torch.manual_seed(0)
    voting = CollectiveVoting(threshold=0.5, criterion=MulticlassAccuracy(num_classes=10))
    seen = {}

    def trained(epoch, trainer, module):
        seen["proposal"] = states(module)[0]

    module = CohortModule(BNNet, size=3)
    trainer = fit(module, small_dm(), [Probe(lambda e, t, m: force(voting, True, 3), trained), voting])

    record = voting.results[0]
    assert record["accepted"] and record["proposer"] == 0 and record["votes"] == [None, True, True]
    for state in states(module):
        assert same_state(state, seen["proposal"])  # running_mean / running_var included
    voters = trainer.optimizers[0].optimizers[1:]
    assert all(not opt.state_dict()["state"] for opt in voters)  # voters never stepped: their state is untouched
    # every learner's cached score is now its score of the proposal, the proposer's own one included
    assert voting.current == record["scores"] and not any(math.isnan(s) for s in record["scores"])


def test_while_one_learner_proposes_the_others_do_not_train():
    torch.manual_seed(0)
    voting = CollectiveVoting(threshold=1.0)
    seen = {}

    def trained(epoch, trainer, module):
        seen["after_training"] = states(module)

    module = CohortModule(LogisticRegression, size=3)
    fit(module, small_dm(), [Probe(lambda e, t, m: seen.setdefault("start", states(m)), trained), voting])
    assert not same_state(seen["after_training"][0], seen["start"][0])
    assert all(same_state(a, b) for a, b in zip(seen["after_training"][1:], seen["start"][1:]))


def test_learners_start_equal_unless_sync_start_is_off():
    for sync in (True, False):
        torch.manual_seed(0)
        module = CohortModule(LogisticRegression, size=3)
        voting = CollectiveVoting(sync_start=sync)
        seen = {}
        fit(module, small_dm(), [Probe(lambda e, t, m: seen.setdefault("start", states(m))), voting])
        assert same_state(seen["start"][1], seen["start"][0]) is sync


# ------------------------------------------------------------------- votes
class MeanCrossEntropy(Metric):
    higher_is_better = False

    def __init__(self):
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits, target):
        self.total += nn.functional.cross_entropy(logits, target, reduction="sum")
        self.count += len(target)

    def compute(self):
        return self.total / self.count


@pytest.mark.parametrize("vote_batches", [None, 1])
def test_votes_follow_a_minimised_criterion_scored_by_hand(vote_batches):
    torch.manual_seed(0)
    voting = CollectiveVoting(threshold=0.5, criterion=MeanCrossEntropy(), vote_batches=vote_batches)
    seen = {}

    def trained(epoch, trainer, module):
        seen["proposal"] = copy.deepcopy(module.cohort[0])

    dm = small_dm(eval_batch_size=10)  # 30 vote samples per learner: 3 batches
    module = CohortModule(LogisticRegression, size=3)
    fit(module, dm, [Probe(on_round_trained=trained), voting])

    record = voting.results[0]
    for j in (1, 2):
        by_hand = score(seen["proposal"], dm.vote_dataloader(j), MeanCrossEntropy(), max_batches=vote_batches)
        assert record["scores"][j] == pytest.approx(by_hand, rel=1e-6)
        assert record["votes"][j] == (record["scores"][j] < record["current"][j])


def test_nan_proposal_is_rejected_without_being_scored(monkeypatch):
    torch.manual_seed(0)
    voting = CollectiveVoting(threshold=0.0)  # would accept any finite proposal
    calls = []
    real = voting_module.score_many
    monkeypatch.setattr(voting_module, "score_many", lambda *a, **k: calls.append(1) or real(*a, **k))
    seen = {}

    def poison(epoch, trainer, module):
        seen["calls"] = len(calls)
        with torch.no_grad():
            next(module.cohort[0].parameters())[0, 0] = math.nan

    module = CohortModule(LogisticRegression, size=3)
    fit(module, small_dm(), [Probe(lambda e, t, m: seen.setdefault("start", states(m)), poison), voting])

    record = voting.results[0]
    assert not record["accepted"] and record["reason"] == "non-finite weights"
    assert len(calls) == seen["calls"]  # nothing scored after the poisoning
    assert all(math.isnan(s) for s in record["scores"]) and record["yes"] == 0
    for before, after in zip(seen["start"], states(module)):
        assert same_state(before, after)


def test_a_byzantine_learner_proposing_random_weights_is_always_rejected():
    torch.manual_seed(0)
    voting = CollectiveVoting(threshold=0.5)

    def sabotage(epoch, trainer, module):
        if voting.round % 4 == 1:  # learner 1 proposes in rounds 1, 5, ...
            with torch.no_grad():
                for p in module.cohort[1].parameters():
                    p.normal_()

    module = CohortModule(LogisticRegression, size=4, optimizer=partial(torch.optim.Adam, lr=1e-2))
    fit(module, small_dm(4, max_train_samples=2000), [Probe(on_round_trained=sabotage), voting], max_epochs=8)
    byzantine = [r for r in voting.results if r["proposer"] == 1]
    honest = [r for r in voting.results if r["proposer"] != 1]
    assert len(byzantine) == 2 and not any(r["accepted"] for r in byzantine)
    assert all(r["yes"] == 0 for r in byzantine)
    assert any(r["accepted"] for r in honest)


def test_every_learner_proposes_and_the_best_voted_proposal_is_installed():
    torch.manual_seed(0)
    voting = CollectiveVoting(threshold=0.5, proposer="all")
    seen = {}

    def trained(epoch, trainer, module):
        seen["proposals"] = states(module)

    module = CohortModule(LogisticRegression, size=3)
    fit(module, small_dm(), [Probe(lambda e, t, m: (seen.setdefault("start", states(m)), force(voting, True, 3)), trained), voting])
    record = voting.results[0]
    assert sorted(record["candidates"]) == [0, 1, 2]
    assert all(not same_state(p, s) for p, s in zip(seen["proposals"], seen["start"]))  # all trained
    assert record["accepted"] and record["yes"] == max(record["candidates"].values()) == 2
    for state in states(module):
        assert same_state(state, seen["proposals"][record["proposer"]])


def test_a_round_is_one_pass_over_the_proposers_own_data_or_steps_per_round():
    torch.manual_seed(0)
    dm = small_dm(partition="dirichlet", alpha=0.5, max_train_samples=1000)
    dm.setup("fit")
    own = [len(dm.member_dataloader(i)) for i in range(3)]
    assert len(set(own)) > 1  # unequal shares: the epoch is longer than some proposers' pass
    trainer = fit(CohortModule(LogisticRegression, size=3), dm, [CollectiveVoting()], max_epochs=3)
    assert trainer.global_step == sum(own)
    trainer = fit(CohortModule(LogisticRegression, size=3), small_dm(), [CollectiveVoting(steps_per_round=2)], max_epochs=3)
    assert trainer.global_step == 6


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize("proposer", ["random", "all"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, proposer):
    def run(epochs, ckpt_path=None, dirpath=None):
        L.seed_everything(0, verbose=False)
        module = CohortModule(LogisticRegression, size=3, optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9))
        voting = CollectiveVoting(threshold=0.5, proposer=proposer, seed=3)
        callbacks = [voting] + ([ModelCheckpoint(dirpath=dirpath, save_last=True, save_top_k=0)] if dirpath else [])
        trainer = fast_trainer(max_epochs=epochs, callbacks=callbacks, enable_checkpointing=dirpath is not None)
        trainer.fit(module, datamodule=small_dm(), ckpt_path=ckpt_path)
        return module, voting

    full, full_voting = run(4)
    run(2, dirpath=tmp_path)
    resumed, resumed_voting = run(4, ckpt_path=str(tmp_path / "last.ckpt"))
    keys = ("round", "proposer", "candidates", "scores", "votes", "yes", "accepted")
    # repr: NaN scores (the proposer's, in rejected rounds) compare equal as text
    assert repr([{k: r[k] for k in keys} for r in resumed_voting.results]) == repr([{k: r[k] for k in keys} for r in full_voting.results])
    for a, b in zip(states(full), states(resumed)):
        assert same_state(a, b)


def test_corrupt_state_is_refused_and_changes_nothing():
    voting = CollectiveVoting()
    state = voting.state_dict()
    for broken in ({}, {**state, "round": 3}, {**state, "generator": "x"}):
        with pytest.raises(ValueError, match="CollectiveVoting checkpoint state is corrupt"):
            voting.load_state_dict(broken)
    assert voting.round == 0 and voting.results == []


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(threshold=1.5), "threshold must be a number in [0, 1], got 1.5"),
        (dict(threshold=-0.1), "got -0.1"),
        (dict(proposer="best"), "proposer must be one of ['round_robin', 'random', 'all'], got 'best'"),
        (dict(steps_per_round=0), "steps_per_round must be an int >= 1 or None, got 0"),
        (dict(vote_batches=2.5), "vote_batches must be an int >= 1 or None, got 2.5"),
        (dict(criterion="accuracy"), "criterion must be a torchmetrics.Metric, got str"),
        (dict(criterion=MeanSquaredError(), maximize=None), None),  # has higher_is_better: fine
    ],
)
def test_argument_errors(kwargs, message):
    if message is None:
        assert CollectiveVoting(**kwargs).maximize is False
        return
    with pytest.raises(ValueError) as err:
        CollectiveVoting(**kwargs)
    assert message in str(err.value)


def test_criterion_without_direction_needs_maximize():
    class Unsure(MeanCrossEntropy):
        higher_is_better = None

    with pytest.raises(ValueError, match="higher_is_better is not set.*maximize=True or maximize=False"):
        CollectiveVoting(criterion=Unsure())
    assert CollectiveVoting(criterion=Unsure(), maximize=False).maximize is False


def test_module_errors():
    with pytest.raises(ValueError, match="at least 2 learners.*got cohort size 1"):
        CollectiveVoting().check_module(CohortModule(LogisticRegression, size=1))
    with pytest.raises(ValueError, match="learners of one architecture"):
        CollectiveVoting().check_module(CohortModule([LogisticRegression(), MLP()]))
    with pytest.raises(TypeError, match="needs a CohortModule, got"):
        CollectiveVoting().check_module(nn.Linear(2, 2))


def test_a_learner_without_vote_data_is_an_error_at_setup():
    with pytest.raises(ValueError, match=r"learner 0 has an empty vote split \(data.splits=\[0.9, 0.0, 0.1\]"):
        fit(CohortModule(LogisticRegression, size=3), small_dm(splits=(0.9, 0.0, 0.1)), [CollectiveVoting()])
    with pytest.raises(ValueError, match=r"vote_dataloaders needs one loader per learner \(3\), got 1"):
        fit(CohortModule(LogisticRegression, size=3), small_dm(), [CollectiveVoting(vote_dataloaders=[[]])])


# ----------------------------------------------------------------- results
def test_results_are_written_logged_and_plotted(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    voting = CollectiveVoting()
    logger = CSVLogger(tmp_path, name="", version="")
    dm = small_dm(splits=(0.8, 0.1, 0.1))  # per-learner test splits: test scores every round
    trainer = fit(CohortModule(LogisticRegression, size=3), dm, [voting], max_epochs=2, logger=logger,
                  limit_val_batches=1, log_every_n_steps=1)
    lines = (tmp_path / "voting_results.csv").read_text().splitlines()
    assert lines[0].startswith("round,step,proposer,accepted,yes,voters,reason,score_0,score_1,score_2,vote_0")
    assert "test_0" in lines[0] and "val_acc_0" in lines[0] and len(lines) == 3
    assert (tmp_path / "voting_results.png").stat().st_size > 0 and (tmp_path / "voting_votes.png").stat().st_size > 0
    assert {"vote/accepted", "vote/yes_fraction", "vote_test/member_2"} <= set(trainer.callback_metrics)
    assert len(voting.results[1]["test"]) == 3 and len(voting.results[1]["val"]) == 3
    assert "vote/accepted" in (tmp_path / "metrics.csv").read_text().splitlines()[0]


def test_runs_in_bf16_mixed_precision():
    torch.manual_seed(0)
    voting = CollectiveVoting()
    fit(CohortModule(LogisticRegression, size=3), small_dm(), [voting], precision="bf16-mixed", max_epochs=2)
    assert len(voting.results) == 2 and all(not math.isnan(s) for s in voting.current)


# ---------------------------------------------------------------- accuracy
def _colearn_example(seed: int) -> dict[str, float]:
    L.seed_everything(seed, verbose=False)
    dm = CohortDataModule("mnist_small", num_members=5, batch_size=64, eval_batch_size=500, splits=(0.9, 0.1, 0.0))
    voting = CollectiveVoting(threshold=0.5, criterion=MulticlassAccuracy(num_classes=10))
    module = CohortModule(ColearnConvNet, size=5, optimizer=partial(torch.optim.Adam, lr=1e-3))
    trainer = fast_trainer(max_epochs=20, callbacks=[voting])
    trainer.fit(module, datamodule=dm)
    return trainer.test(module, datamodule=dm, verbose=False)[0]


@pytest.mark.slow
def test_colearn_example_on_mnist_small_reaches_096_in_20_rounds():
    # One run's accuracy depends on the CPU's float kernels, not only on the seed: seed 0 gave 0.969 on an
    # AVX2-only CPU and 0.951 on an AVX-512 one. Seeds 0-4 on the latter: 0.951, 0.961, 0.968, 0.971, 0.971
    # (seeds 0-2 on the former: 0.969, 0.956, 0.968). So the claim is the typical run: the median of 5 seeds,
    # and no run far below it.
    results = [_colearn_example(seed) for seed in range(5)]
    accuracies = sorted(r["test_acc/mean"] for r in results)
    assert accuracies[2] >= 0.96, accuracies
    assert accuracies[0] >= 0.94, accuracies
    for result in results:
        assert len({round(result[f"test_acc/member_{i}"], 6) for i in range(5)}) == 1  # one shared model
