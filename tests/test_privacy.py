"""Differential privacy through the Trainer: private members (DP-SGD with Opacus) and DP federated averaging.

The math and the configurations are tested on their own in tests/functional/test_privacy_math.py and
tests/test_privacy_config.py; here they meet the cohort: a member's DP step against a hand-computed
clipped and noised step, its accountant against Opacus' own, the budget retiring members, resume keeping
the accounting, every algorithm with private members, and DP-FedAvg's clipping and noise.
"""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from helpers import BNNet, Probe, fast_trainer, same_state, states
from lightning_colearn import (CohortDataModule, CohortModule, CollectiveVoting, FederatedAveraging, MutualLearning,
                               ParticleSwarm, ProofOfLearning)
from lightning_colearn.functional.privacy import clip_update, dp_mean
from lightning_colearn.models import MLP, LogisticRegression

opacus = pytest.importorskip("opacus")  # the privacy extra, installed by make test
from opacus.accountants import RDPAccountant  # noqa: E402

SGD = partial(torch.optim.SGD, lr=0.1)


def private_dm(members=3, **kwargs) -> CohortDataModule:
    defaults = dict(num_members=members, batch_size=16, max_train_samples=96 * members, splits=(0.8, 0.2, 0.0),
                    sampling="poisson", eval_batch_size=500)
    return CohortDataModule("mnist_small", **{**defaults, **kwargs})


def fit(module, dm, callbacks=(), epochs=2, **kwargs):
    trainer = fast_trainer(max_epochs=epochs, callbacks=list(callbacks), **kwargs)
    trainer.fit(module, datamodule=dm)
    return trainer


class StepRecorder(Callback):
    """Keeps, for the first step: every member's parameters, the member's batch and its noise generator's state."""

    def __init__(self):
        self.seen = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.seen is None:
            self.seen = {
                "params": [[p.detach().clone() for p in m.parameters()] for m in pl_module.cohort],
                "batch": {i: (x.clone(), y.clone()) for i, (x, y) in batch.items()},
                "noise": [g.get_state() for g in pl_module.private.generators],
            }


# ------------------------------------------------------------------ a DP step, by hand
def test_a_members_dp_step_is_the_clipped_noised_sgd_step_written_out():
    """Abadi et al. 2016: clip every per-sample gradient to C, sum, add N(0, (sigma C)^2), divide by the expected batch."""
    torch.manual_seed(0)
    sigma, clip, lr, batch = 0.7, 0.05, 0.1, 16
    recorder = StepRecorder()
    module = CohortModule(LogisticRegression, size=2, optimizer=partial(torch.optim.SGD, lr=lr),
                          privacy=dict(noise_multiplier=sigma, max_grad_norm=clip))
    fit(module, private_dm(2, batch_size=batch), [recorder], epochs=1, max_steps=1)
    seen = recorder.seen
    for i in range(2):
        x, y = seen["batch"][i]
        model = LogisticRegression()
        with torch.no_grad():
            for p, value in zip(model.parameters(), seen["params"][i]):
                p.copy_(value)
        summed = [torch.zeros_like(p) for p in model.parameters()]
        for k in range(len(y)):  # per-sample gradients, one sample at a time
            grads = torch.autograd.grad(F.cross_entropy(model(x[k:k + 1]), y[k:k + 1]), list(model.parameters()))
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
            assert float(norm * min(1.0, clip / (float(norm) + 1e-6))) <= clip + 1e-6  # clipping bounds it
            summed = [s + g * min(1.0, clip / (float(norm) + 1e-6)) for s, g in zip(summed, grads)]
        generator = torch.Generator()
        generator.set_state(seen["noise"][i])  # the member's own noise, drawn parameter by parameter
        noised = [s + torch.normal(0.0, sigma * clip, size=s.shape, generator=generator) for s in summed]
        expected = [p - lr * g / batch for p, g in zip(seen["params"][i], noised)]
        for got, want in zip(module.cohort[i].parameters(), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_each_members_epsilon_equals_opacus_accountant_for_its_steps():
    torch.manual_seed(0)
    dm = private_dm(3, partition="dirichlet", alpha=1.0)  # unequal shares: each member its own sampling rate
    module = CohortModule(LogisticRegression, size=3, optimizer=SGD, privacy=dict(noise_multiplier=1.1, delta=1e-5))
    trainer = fit(module, dm, epochs=2)
    rates = dm.sample_rates()
    assert len(set(rates)) == 3
    for i in range(3):
        reference = RDPAccountant()
        for _ in range(trainer.global_step):  # every member steps at every step (shorter ones cycle)
            reference.step(noise_multiplier=1.1, sample_rate=rates[i])
        assert module.private.epsilon(i) == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
        assert trainer.callback_metrics[f"dp/epsilon/member_{i}"] == pytest.approx(module.private.epsilon(i), rel=1e-6)


# ------------------------------------------------------------------ budget
def test_a_member_is_retired_before_its_next_epoch_would_pass_the_target():
    torch.manual_seed(0)
    module = CohortModule(LogisticRegression, size=3, optimizer=SGD, privacy=dict(target_epsilon=2.0, delta=1e-5, epochs=3))
    trainer = fit(module, private_dm(), epochs=6)
    assert module.retired_members == {0, 1, 2} and trainer.current_epoch == 3  # the planned 3 epochs, then stop
    assert all(1.9 < module.private.epsilon(i) <= 2.0 for i in range(3))


def test_a_learner_whose_budget_is_spent_no_longer_proposes_but_the_others_go_on():
    torch.manual_seed(0)
    dm = private_dm(3, partition="linear")  # linear size skew: learner 0 has the least data, the highest sampling rate
    dm.setup("fit")
    module = CohortModule(LogisticRegression, size=3, optimizer=SGD,
                          privacy=dict(noise_multiplier=1.0, target_epsilon=10.0, delta=1e-5))
    voting = CollectiveVoting()  # round robin: learner 0 proposes in round 0, then would again in round 3
    fit(module, dm, [voting], epochs=6)
    assert module.retired_members == {0}
    assert [r["proposer"] for r in voting.results] == [0, 1, 2, 1, 1, 2]  # round 3 goes to the next learner still training
    assert [r["retired"] for r in voting.results] == [[], [0], [0], [0], [0], [0]]  # (retired at round 0's end)
    assert all(r["epsilon"][0] == voting.results[0]["epsilon"][0] for r in voting.results)  # it spends no more
    assert all(module.private.epsilon(i) <= 10.0 for i in range(3)) and module.private.epsilon(1) > module.private.epsilon(2)


def test_fedavg_no_longer_samples_a_retired_client():
    torch.manual_seed(0)
    module = CohortModule(LogisticRegression, size=4, optimizer=SGD,
                          privacy=dict(noise_multiplier=1.0, target_epsilon=3.0, delta=1e-5))
    fed = FederatedAveraging(clients_per_round=4)
    fit(module, private_dm(4, splits=(1.0, 0.0, 0.0), partition="linear"), [fed], epochs=4)
    retired = module.retired_members
    assert retired  # the smallest client's budget ran out first
    last = {c for r in fed.history[-1:] for c in r["clients"]}
    assert not (last & retired)


# ------------------------------------------------------------------ resume
def test_resume_keeps_the_accounting_and_the_noise(tmp_path):
    def run(epochs, ckpt_path=None, every_epoch=False):
        L.seed_everything(0, verbose=False)
        module = CohortModule(LogisticRegression, size=3, optimizer=SGD, privacy=dict(noise_multiplier=1.0, delta=1e-5))
        callbacks = [ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)] if every_epoch else []
        trainer = fast_trainer(max_epochs=epochs, callbacks=callbacks, enable_checkpointing=every_epoch)
        trainer.fit(module, datamodule=private_dm(), ckpt_path=ckpt_path)
        return module

    straight = run(4)
    run(2, every_epoch=True)
    resumed = run(4, ckpt_path=tmp_path / "last.ckpt")
    assert [resumed.private.epsilon(i) for i in range(3)] == [straight.private.epsilon(i) for i in range(3)]
    assert all(same_state(a, b) for a, b in zip(states(straight), states(resumed)))  # the same noise after the resume
    with pytest.raises(ValueError, match="the checkpoint holds privacy accounting, this CohortModule has privacy=None"):
        fast_trainer(max_epochs=5).fit(CohortModule(LogisticRegression, size=3, optimizer=SGD), datamodule=private_dm(),
                                       ckpt_path=tmp_path / "last.ckpt")


# ------------------------------------------------------------------ every algorithm
@pytest.mark.parametrize("algorithm", ["independent", "swarm", "mutual", "voting", "fedavg"])
def test_every_algorithm_trains_private_members_on_the_loop_backend(algorithm):
    torch.manual_seed(0)
    privacy = dict(noise_multiplier=1.0, delta=1e-5)
    if algorithm == "mutual":
        module = MutualLearning([MLP(), MLP()], optimizer=SGD, privacy=privacy)
        dm = private_dm(2, stream="shared")
    else:
        module = CohortModule(MLP, size=3, optimizer=SGD, privacy=privacy)
        dm = private_dm(3)
    callback = {"swarm": ParticleSwarm(every_n_steps=2, n_particles=3), "voting": CollectiveVoting(),
                "fedavg": FederatedAveraging(clients_per_round=2)}.get(algorithm)
    before = states(module)
    trainer = fit(module, dm, [callback] if callback else [], epochs=2)
    assert not all(same_state(a, b) for a, b in zip(before, states(module)))
    trained = [i for i in range(module.size) if module.private.epsilon(i) > 0]
    assert trained and all(math.isfinite(module.private.epsilon(i)) for i in trained)
    assert all(f"dp/epsilon/member_{i}" in trainer.callback_metrics for i in range(module.size))


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("privacy,message", [
    (dict(noise_multiplier=0.0), r"privacy.noise_multiplier must be a finite number > 0 .*got 0.0"),
    (dict(noise_multiplier=1.0, delta=1.0), r"privacy.delta must be a number in \(0, 1\) .*got 1.0"),
    (dict(target_epsilon=3.0, delta=None), "privacy.delta"),
    (dict(noise_multiplier=1.0, accountant="moments"), "privacy.accountant"),
    (dict(noise_multiplier=1.0, nosie=2), "nosie"),
])
def test_bad_privacy_settings_are_named(privacy, message):
    with pytest.raises(ValueError, match=message):
        CohortModule(MLP, size=2, privacy=privacy)


def test_what_dp_sgd_cannot_train_is_refused_clearly():
    with pytest.raises(ValueError, match=r"privacy: .*bn.*BatchNorm1d.*privacy.fix_model=true"):
        CohortModule(BNNet, size=2, privacy=dict(noise_multiplier=1.0))
    fixed = CohortModule(BNNet, size=2, privacy=dict(noise_multiplier=1.0, fix_model=True))
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in fixed.cohort.modules())
    fit(fixed, private_dm(2), epochs=1)  # the GroupNorm version trains
    with pytest.raises(ValueError, match="privacy: DP-SGD needs each member's per-sample gradients.*backend='loop'"):
        CohortModule(MLP, size=2, backend="stacked", privacy=dict(noise_multiplier=1.0))
    with pytest.raises(ValueError, match=r"privacy: DP-SGD's accounting assumes Poisson sampling.*sampling='poisson'"):
        fit(CohortModule(MLP, size=2, privacy=dict(noise_multiplier=1.0)), private_dm(2, sampling="shuffle"), epochs=1)
    with pytest.raises(ValueError, match="privacy: extra loss terms .*FedProx"):
        fit(CohortModule(MLP, size=2, privacy=dict(noise_multiplier=1.0)), private_dm(2),
            [FederatedAveraging(clients_per_round=2, mu=0.1)], epochs=1)
    with pytest.raises(ValueError, match="dp needs aggregator='fedavg'"):
        FederatedAveraging(aggregator="median", dp=dict(noise_multiplier=1.0))
    with pytest.raises(ValueError, match="dp is not a ProofOfLearning option"):
        ProofOfLearning(miners=2, dp=dict(noise_multiplier=1.0))


# ------------------------------------------------------------------ DP-FedAvg
def test_dp_fedavg_installs_the_clipped_noised_mean_and_clipping_bounds_each_client():
    clip, sigma, m = 0.05, 0.8, 4
    seen = {"start": [], "trained": []}

    def inflate(trainer, module):  # one client's update is huge: clipping must bound what it contributes
        with torch.no_grad():
            for p in module.cohort[fed._clients[0]].parameters():
                p.mul_(1000.0)
        seen["trained"].append(states(module))

    torch.manual_seed(0)
    fed = FederatedAveraging(clients_per_round=m, dp=dict(noise_multiplier=sigma, clip_norm=clip), seed=5)
    module = CohortModule(LogisticRegression, size=6, optimizer=SGD)
    probe = Probe(lambda t, mod: seen["start"].append(states(mod)), inflate)
    fit(module, private_dm(6, splits=(1.0, 0.0, 0.0), sampling="shuffle"), [probe, fed], epochs=2)
    for r, record in enumerate(fed.history):
        x = seen["start"][r][record["clients"][0]]
        updates = [[seen["trained"][r][c][k] - x[k] for k in x] for c in record["clients"]]
        clipped = [clip_update(u, clip)[0] for u in updates]
        assert all(float(torch.sqrt(sum(t.double().pow(2).sum() for t in u))) <= clip * (1 + 1e-6) for u in clipped)
        generator = torch.Generator().manual_seed((5 * 1_000_003 + r) * 1_000_003 + 13)
        mean = dp_mean(clipped, clip_norm=clip, noise_multiplier=sigma, expected_clients=m, generator=generator)
        after = seen["start"][r + 1] if r + 1 < len(seen["start"]) else states(module)
        for (k, value), step in zip(x.items(), mean):
            torch.testing.assert_close(after[0][k], value + step, rtol=1e-5, atol=1e-7)
    reference = RDPAccountant()
    for _ in fed.history:
        reference.step(noise_multiplier=sigma, sample_rate=m / 6)
    assert fed.history[-1]["dp_epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5))


def test_dp_fedavg_stops_before_a_round_would_pass_its_target_and_resumes_its_accounting(tmp_path):
    def run(epochs, ckpt_path=None, every_epoch=False):
        L.seed_everything(0, verbose=False)
        fed = FederatedAveraging(clients_per_round=3, dp=dict(noise_multiplier=1.5, clip_norm=0.1, adaptive=True,
                                                               target_epsilon=5.0), seed=1)  # 5 rounds reach 4.62
        callbacks = [fed] + ([ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)] if every_epoch else [])
        trainer = fast_trainer(max_epochs=epochs, callbacks=callbacks, enable_checkpointing=every_epoch)
        module = CohortModule(LogisticRegression, size=6, optimizer=SGD)
        trainer.fit(module, datamodule=private_dm(6, splits=(1.0, 0.0, 0.0), sampling="shuffle"), ckpt_path=ckpt_path)
        return module, fed

    straight, fed = run(30)
    assert len(fed.history) == 5 and fed.dp_epsilon() <= 5.0
    assert len({r["clip_norm"] for r in fed.history}) > 1  # adaptive: the clip norm moves
    run(2, every_epoch=True)
    resumed, fed_resumed = run(30, ckpt_path=tmp_path / "last.ckpt")
    assert fed_resumed.dp_epsilon() == fed.dp_epsilon() and fed_resumed.clip_norm == fed.clip_norm
    assert all(same_state(a, b) for a, b in zip(states(straight), states(resumed)))
