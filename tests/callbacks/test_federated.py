"""FederatedAveraging and ProofOfLearning: rounds, aggregation, consensus, ledger, resume, errors, accuracy."""

from __future__ import annotations

import hashlib
import math
import re
import sqlite3
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_colearn.callbacks.pofl as pofl_module
from helpers import Probe, fast_trainer, same_state, states
from lightning_colearn import CohortDataModule, CohortModule, FederatedAveraging, ProofOfLearning
from lightning_colearn.ledger import Ledger, LedgerError
from lightning_colearn.metrics.scoring import score
from lightning_colearn.models import MLP, LogisticRegression


def clients_dm(members=6, **kwargs) -> CohortDataModule:
    defaults = dict(num_members=members, batch_size=20, max_train_samples=60 * members, splits=(1.0, 0.0, 0.0),
                    eval_batch_size=500, partition="dirichlet", alpha=1.0)  # unequal shares: weights matter
    return CohortDataModule("mnist_small", **{**defaults, **kwargs})


def fit(module, dm, callbacks, **kwargs):
    trainer = fast_trainer(**{"max_epochs": 1, **kwargs}, callbacks=callbacks)
    trainer.fit(module, datamodule=dm)
    return trainer


# ------------------------------------------------------------------ FedAvg
def test_fedavg_round_is_the_sample_weighted_mean_of_the_sampled_clients_and_reaches_everyone():
    torch.manual_seed(0)
    fed = FederatedAveraging(clients_per_round=3)
    seen = {}
    dm = clients_dm()
    module = CohortModule(LogisticRegression, size=6)
    fit(module, dm, [Probe(lambda t, m: seen.setdefault("start", states(m)), lambda t, m: seen.setdefault("trained", states(m))), fed])

    clients = fed.history[0]["clients"]
    sizes = dm.member_sizes("train")
    assert len(set(sizes)) > 1 and len(clients) == 3
    others = [i for i in range(6) if i not in clients]
    for i in others:  # only sampled clients trained
        assert same_state(seen["trained"][i], seen["start"][i])
    total = sum(sizes[c] for c in clients)
    for name in seen["start"][0]:
        expected = sum(sizes[c] / total * seen["trained"][c][name].double() for c in clients).float()
        for state in states(module):
            torch.testing.assert_close(state[name], expected, rtol=1e-6, atol=1e-7)
    assert fed.history[0]["installed"] and 0.0 <= fed.history[0]["score"] <= 1.0


def test_client_sampling_is_seeded():
    def drawn(seed):
        torch.manual_seed(0)
        fed = FederatedAveraging(clients_per_round=2, seed=seed)
        fit(CohortModule(LogisticRegression, size=6), clients_dm(), [fed], max_epochs=4)
        return [r["clients"] for r in fed.history]

    assert drawn(1) == drawn(1)
    assert drawn(1) != drawn(2)


def test_local_epochs_make_a_round_span_epochs_with_one_pass_per_client_per_epoch():
    torch.manual_seed(0)
    dm = clients_dm()
    dm.setup("fit")
    own = [len(dm.member_dataloader(i)) for i in range(6)]
    fed = FederatedAveraging(clients_per_round=2, local_epochs=2)
    trainer = fit(CohortModule(LogisticRegression, size=6), dm, [fed], max_epochs=4)
    assert len(fed.history) == 2
    # sampled clients train side by side, one optimizer step per batch: a round's epoch is its longest client's pass
    assert trainer.global_step == sum(2 * max(own[c] for c in r["clients"]) for r in fed.history)
    assert len({own[c] for r in fed.history for c in r["clients"]}) > 1


def test_fedprox_keeps_clients_near_the_global_model_and_is_removed_after_fit():
    def drift(mu):
        torch.manual_seed(0)
        seen = {}
        module = CohortModule(LogisticRegression, size=4, optimizer=partial(torch.optim.SGD, lr=0.05))
        fed = FederatedAveraging(clients_per_round=4, mu=mu)
        fit(module, clients_dm(4, max_train_samples=2000), [Probe(lambda t, m: seen.setdefault("start", states(m)),
                                          lambda t, m: seen.setdefault("trained", states(m))), fed])
        assert module.loss_terms == []
        return sum(float((seen["trained"][c]["linear.weight"] - seen["start"][c]["linear.weight"]).norm()) for c in range(4))

    assert drift(mu=10.0) < 0.5 * drift(mu=0.0)


def test_a_non_finite_aggregate_is_discarded_but_a_robust_aggregator_survives_the_nan_client():
    def run(aggregator):
        torch.manual_seed(0)
        seen = {}

        def poison(trainer, module):  # all 5 clients are sampled; client 0 sends NaN weights
            with torch.no_grad():
                next(module.cohort[0].parameters()).fill_(math.nan)

        fed = FederatedAveraging(clients_per_round=5, aggregator=aggregator, trim_ratio=0.2)
        module = CohortModule(LogisticRegression, size=5)
        fit(module, clients_dm(5), [Probe(lambda t, m: seen.setdefault("start", states(m)), poison), fed])
        return fed.history[0], seen["start"], states(module)

    record, start, after = run("fedavg")
    assert not record["installed"] and record["reason"] == "non-finite aggregate: round discarded"
    for before, now in zip(start, after):
        assert same_state(before, now)  # every client back on the previous global model
    for aggregator in ("median", "trimmed_mean", "krum"):
        record, start, after = run(aggregator)
        assert record["installed"], aggregator
        assert all(torch.isfinite(t).all() for s in after for t in s.values())
        assert not same_state(after[0], start[0])


def test_max_rounds_and_target_stop_training_through_lightning():
    torch.manual_seed(0)
    fed = FederatedAveraging(clients_per_round=2, max_rounds=2)
    trainer = fit(CohortModule(LogisticRegression, size=6), clients_dm(), [fed], max_epochs=10)
    assert len(fed.history) == 2 and trainer.current_epoch == 2
    fed = FederatedAveraging(clients_per_round=2, target=0.0, stop_at_target=True)
    fit(CohortModule(LogisticRegression, size=6), clients_dm(), [fed], max_epochs=10)
    assert fed.rounds_to_target == 1 and len(fed.history) == 1


def test_fedavg_resumed_mid_round_equals_uninterrupted_run(tmp_path):
    def run(epochs, ckpt_path=None, every_epoch=False):
        L.seed_everything(0, verbose=False)
        module = CohortModule(LogisticRegression, size=6, optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9))
        fed = FederatedAveraging(clients_per_round=3, local_epochs=2, mu=0.1, reset_client_optimizer=False, seed=4)
        callbacks = [fed] + ([ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)] if every_epoch else [])
        trainer = fast_trainer(max_epochs=epochs, callbacks=callbacks, enable_checkpointing=every_epoch)
        trainer.fit(module, datamodule=clients_dm(), ckpt_path=ckpt_path)
        return module, fed

    full, full_fed = run(4)
    run(3, every_epoch=True)  # stops after epoch 2: in the middle of the second round
    resumed, resumed_fed = run(4, ckpt_path=str(tmp_path / "last.ckpt"))
    assert [r["clients"] for r in resumed_fed.history] == [r["clients"] for r in full_fed.history]
    for a, b in zip(states(full), states(resumed)):
        assert same_state(a, b)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(clients_per_round=0), "clients_per_round must be an int >= 1"),
        (dict(local_epochs=0), "local_epochs must be an int >= 1, got 0"),
        (dict(aggregator="mean"), "aggregator must be one of ['fedavg', 'median', 'trimmed_mean', 'krum', 'multi_krum', 'bulyan', 'qfedavg', 'fednova'], got 'mean'"),
        (dict(mu=-1.0), "mu must be a finite number >= 0, got -1.0"),
        (dict(mu=math.inf), "mu must be a finite number >= 0, got inf"),
        (dict(seed="a"), "seed must be an int >= 0, got 'a'"),
        (dict(seed=1.5), "seed must be an int >= 0, got 1.5"),
        (dict(maximize="no"), "maximize must be True, False or None (the criterion's own direction), got 'no'"),
        (dict(reset_client_optimizer="no"), "reset_client_optimizer must be True or False, got 'no'"),
        (dict(stop_at_target=1), "stop_at_target must be True or False, got 1"),
        (dict(eval_dataloader=3), "eval_dataloader must be an iterable of (x, y) batches (e.g. a DataLoader) or None, got int"),
        (dict(trim_ratio=0.5), "trim_ratio must be in [0, 0.5), got 0.5"),
        (dict(max_rounds=0), "max_rounds must be an int >= 1 or None, got 0"),
        (dict(target=math.nan), "target must be a finite number or None, got nan"),
    ],
)
def test_fedavg_argument_errors(kwargs, message):
    with pytest.raises(ValueError) as err:
        FederatedAveraging(**kwargs)
    assert message in str(err.value)


def test_fedavg_module_errors():
    with pytest.raises(ValueError, match=r"clients_per_round must be in \[1, 3\] \(the cohort size\), got 4"):
        FederatedAveraging(clients_per_round=4).check_module(CohortModule(LogisticRegression, size=3))
    with pytest.raises(ValueError, match="krum with num_byzantine=1 needs clients_per_round >= 5, got 4"):
        FederatedAveraging(clients_per_round=4, aggregator="krum").check_module(CohortModule(LogisticRegression, size=6))
    with pytest.raises(ValueError, match="clients of one architecture"):
        FederatedAveraging(clients_per_round=2).check_module(CohortModule([LogisticRegression(), MLP()]))


# -------------------------------------------------------------------- PoFL
def pofl_run(tmp_path, rounds=2, **kwargs):
    torch.manual_seed(0)
    defaults = dict(miners=3, clients_per_round=4, threshold=0.0, ledger=tmp_path / "ledger.db")
    pofl = ProofOfLearning(**{**defaults, **kwargs})
    seen = {"trained": []}
    module = CohortModule(LogisticRegression, size=9)
    fit(module, clients_dm(9), [Probe(trained=lambda t, m: seen["trained"].append(states(m))), pofl], max_epochs=rounds)
    return pofl, module, seen


def test_pofl_consensus_scores_each_miners_aggregate_and_every_miner_adopts_the_winner(tmp_path):
    pofl, module, seen = pofl_run(tmp_path, rounds=1)
    record, trained = pofl.history[0], seen["trained"][0]
    dm = clients_dm(9)
    dm.setup("fit")
    sizes = dm.member_sizes("train")
    groups = {}
    for c in record["clients"]:
        groups.setdefault(c % 3, []).append(c)
    for m in range(3):
        if m not in groups:
            assert record["scores"][m] is None
            continue
        total = sum(sizes[c] for c in groups[m])
        candidate = LogisticRegression()
        candidate.load_state_dict({k: sum(sizes[c] / total * trained[c][k].double() for c in groups[m]).float()
                                   for k in trained[0]})
        by_hand = score(candidate, dm.eval_dataloader(), pofl.criterion)
        assert record["scores"][m] == pytest.approx(by_hand, abs=2e-3)  # one sample in 500 may flip
    ranked = {m: s for m, s in enumerate(record["scores"]) if s is not None}
    assert record["winner"] == max(ranked, key=ranked.get) and record["block"] == 0
    assert all(state is pofl.miner_states[0] for state in pofl.miner_states)
    with Ledger(tmp_path / "ledger.db") as ledger:
        assert len(ledger) == 1 and ledger.verify().ok
        assert ledger.block(0).scores == record["scores"] and ledger.block(0).winner == record["winner"]
        for state in states(module):  # the chain head is what every member holds after fit
            assert same_state(state, ledger.load(0))


def test_pofl_without_a_passing_candidate_appends_nothing_and_miners_keep_their_candidates(tmp_path):
    pofl, module, _ = pofl_run(tmp_path, rounds=2, threshold=1.1)
    assert all(r["block"] is None and r["reason"] == "no candidate passed the threshold" for r in pofl.history)
    with Ledger(tmp_path / "ledger.db") as ledger:
        assert len(ledger) == 0
    distinct = {id(s) for s in pofl.miner_states}
    assert len(distinct) > 1  # miners evolved separately
    scores = pofl.history[-1]["scores"]
    best = max((m for m in range(3) if scores[m] is not None), key=lambda m: scores[m])
    for state in states(module):  # without a block, the last round's best miner model is the run's model
        assert same_state(state, pofl.miner_states[best])


def test_a_miner_without_clients_never_has_a_candidate(tmp_path):
    assignment = [0, 1] * 4 + [0]  # miner 2 has no clients at all
    pofl, _, _ = pofl_run(tmp_path, rounds=3, assignment=assignment)
    assert all(r["scores"][2] is None and r["winner"] != 2 for r in pofl.history)
    assert all(r["block"] is not None for r in pofl.history)


def test_validators_refuse_a_block_whose_score_they_cannot_reproduce(tmp_path, monkeypatch):
    real = pofl_module.score
    monkeypatch.setattr(pofl_module, "score", lambda *a, **k: real(*a, **k) - 0.25)  # the validators' re-evaluation
    pofl, _, _ = pofl_run(tmp_path, rounds=1)
    record = pofl.history[0]
    assert record["block"] is None and record["reason"].startswith("refused by validators")
    with Ledger(tmp_path / "ledger.db") as ledger:
        assert len(ledger) == 0


def test_pofl_resumed_after_a_crash_between_append_and_checkpoint_does_not_append_twice(tmp_path):
    def run(epochs, root, ckpt_path=None):
        L.seed_everything(0, verbose=False)
        pofl = ProofOfLearning(miners=3, clients_per_round=4, threshold=0.0, ledger=root / "ledger.db", seed=2)
        checkpoints = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, filename="{epoch}")
        trainer = fast_trainer(max_epochs=epochs, callbacks=[pofl, checkpoints], enable_checkpointing=True)
        module = CohortModule(LogisticRegression, size=9)
        trainer.fit(module, datamodule=clients_dm(9), ckpt_path=ckpt_path)
        return module, pofl

    straight, _ = run(3, tmp_path / "a")
    crashed = tmp_path / "b"
    run(3, crashed)  # the ledger has the blocks of rounds 0-2 ...
    # ... but the run resumes from the checkpoint after round 0, as if it had died right after appending
    resumed, pofl = run(3, crashed, ckpt_path=str(crashed / "ckpt" / "epoch=0.ckpt"))
    # the replayed rounds are recorded as the uninterrupted run recorded them (the replay is only logged)
    _, uninterrupted = run(3, tmp_path / "c")
    assert [r["block"] for r in pofl.history] == [r["block"] for r in uninterrupted.history] == [0, 1, 2]
    assert [r["reason"] for r in pofl.history] == [r["reason"] for r in uninterrupted.history] == ["block appended"] * 3
    with Ledger(crashed / "ledger.db") as ledger, Ledger(tmp_path / "a" / "ledger.db") as reference:
        assert len(ledger) == 3 and ledger.verify().ok
        assert [b.digest for b in ledger] == [b.digest for b in reference]
    for a, b in zip(states(straight), states(resumed)):
        assert same_state(a, b)


def test_a_ledger_missing_blocks_the_checkpoint_knows_is_an_error(tmp_path):
    def run(epochs, ckpt_path=None):
        pofl = ProofOfLearning(miners=3, clients_per_round=4, threshold=0.0, ledger=tmp_path / "ledger.db")
        trainer = fast_trainer(max_epochs=epochs, enable_checkpointing=True,
                               callbacks=[pofl, ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)])
        trainer.fit(CohortModule(LogisticRegression, size=9), datamodule=clients_dm(9), ckpt_path=ckpt_path)

    run(2)
    (tmp_path / "ledger.db").unlink()  # the chain is lost; the checkpoint knows 2 blocks
    with pytest.raises(LedgerError, match="holds 0 blocks but this run's checkpoint knows 2"):
        run(3, ckpt_path=str(tmp_path / "last.ckpt"))


def test_pofl_does_not_train_on_a_tampered_ledger(tmp_path):
    pofl_run(tmp_path, rounds=2)
    path = tmp_path / "ledger.db"
    con = sqlite3.connect(path)
    with con:
        con.execute("UPDATE blocks SET scores = ? WHERE idx = 0", ("[0.99, 0.1, 0.2]",))
    con.close()
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(LedgerError, match=r"ProofOfLearning: .*ledger.db fails verification \(block 0: hash does not match"
                                          r".*a broken chain is not extended"):
        pofl_run(tmp_path, rounds=2)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # nothing appended


def test_corrupt_round_states_are_refused_and_change_nothing(tmp_path):
    fedavg = FederatedAveraging(clients_per_round=2, local_epochs=2)
    good = fedavg.state_dict()
    for change, message in (
        (dict(rounds_to_target="x"), r"rounds_to_target must be None or an int in \[1, 0\], got 'x'"),
        (dict(round_epochs=-3, clients=[7, 8]), r"round_epochs must be an int in \[0, 2\] \(local_epochs\), got -3"),
        (dict(round_epochs=3), r"round_epochs must be an int in \[0, 2\] \(local_epochs\), got 3"),
        (dict(clients=[1, 1]), r"clients must be None or a list of distinct client indices, got \[1, 1\]"),
        (dict(clients="ab"), r"clients must be None or a list"),
        (dict(synced="no"), r"synced must be a bool, got 'no'"),
    ):
        with pytest.raises(ValueError, match=r"FederatedAveraging checkpoint state is corrupt or from another version: " + message):
            fedavg.load_state_dict({**good, **change})
        assert fedavg.round == 0 and fedavg._clients is None and fedavg._round_epochs == 0
    pofl = ProofOfLearning(miners=2, ledger=None)
    good = pofl.state_dict()
    for change, message in (
        (dict(miner_states="x"), r"miner_states must be None or 2 state dicts \(one per miner\), got str"),
        (dict(miner_states=[{"w": torch.ones(1)}] * 5), r"miner_states must be None or 2 state dicts .*got list of 5"),
        (dict(ledger_base=-4), r"ledger_base must be None or an int >= 0, got -4"),
    ):
        with pytest.raises(ValueError, match=r"ProofOfLearning checkpoint state is corrupt or from another version: " + message):
            pofl.load_state_dict({**good, **change})
        assert pofl.miner_states is None and pofl._ledger_base is None


def test_pofl_argument_errors():
    with pytest.raises(ValueError, match="miners must be an int >= 1, got 0"):
        ProofOfLearning(miners=0)
    with pytest.raises(ValueError, match="threshold must be a finite number, got inf"):
        ProofOfLearning(threshold=math.inf)
    with pytest.raises(ValueError, match=r"aggregator must be one of \['fedavg', 'median', 'trimmed_mean'\] \(Krum needs"):
        ProofOfLearning(aggregator="krum")
    with pytest.raises(ValueError, match="ledger must be a path, a Ledger or None, got int"):
        ProofOfLearning(ledger=3)
    for tolerance in (math.nan, -1.0, "x", math.inf):
        with pytest.raises(ValueError, match=rf"tolerance must be a finite number >= 0, got {re.escape(repr(tolerance))}"):
            ProofOfLearning(tolerance=tolerance)
    for assignment in ("01", [0.9, 1.7], 3, [0, -1]):
        with pytest.raises(ValueError, match=r"assignment must be a list with one miner index \(an int >= 0\) per client, got "
                                             + re.escape(repr(assignment))):
            ProofOfLearning(miners=2, assignment=assignment)
    with pytest.raises(ValueError, match="assignment holds miner 5, miners are 0..2"):
        ProofOfLearning(miners=3, clients_per_round=2, assignment=[0, 5, 1]).check_module(CohortModule(LogisticRegression, size=3))


# ---------------------------------------------------------------- accuracy
def flexblock_dm(**kwargs):
    return CohortDataModule("mnist_small", num_members=100, batch_size=20, eval_batch_size=1000, splits=(1.0, 0.0, 0.0), **kwargs)


@pytest.mark.slow
def test_pofl_on_100_iid_clients_and_10_miners_reaches_080_within_12_rounds(tmp_path):
    L.seed_everything(0, verbose=False)
    pofl = ProofOfLearning(miners=10, clients_per_round=20, threshold=0.6, ledger=tmp_path / "ledger.db", target=0.8,
                           stop_at_target=True, max_rounds=12)
    module = CohortModule(MLP, size=100, optimizer=partial(torch.optim.Adam, lr=1e-3))
    trainer = fast_trainer(max_epochs=60, callbacks=[pofl])
    trainer.fit(module, datamodule=flexblock_dm())
    assert pofl.rounds_to_target is not None and pofl.rounds_to_target <= 12, [r["score"] for r in pofl.history]
    test_acc = trainer.test(module, datamodule=flexblock_dm(), verbose=False)[0]["test_acc/mean"]
    assert test_acc >= 0.8  # the chain head, installed in every member
    with Ledger(tmp_path / "ledger.db") as ledger:
        assert ledger.verify().ok


@pytest.mark.slow
def test_fedavg_on_2_label_shards_reaches_060_within_60_rounds():
    L.seed_everything(0, verbose=False)
    fed = FederatedAveraging(clients_per_round=20, target=0.6, stop_at_target=True, max_rounds=60)
    module = CohortModule(MLP, size=100, optimizer=partial(torch.optim.Adam, lr=1e-3))
    trainer = fast_trainer(max_epochs=60, callbacks=[fed])
    trainer.fit(module, datamodule=flexblock_dm(partition="pathological", labels_per_member=2))
    assert fed.rounds_to_target is not None and fed.rounds_to_target <= 60, [r["score"] for r in fed.history]
