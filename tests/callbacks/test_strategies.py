"""Federated strategies through the Trainer: server optimizers, SCAFFOLD, Bulyan, q-FedAvg, personal layers, failures.

The update rules themselves are checked against the papers' equations in tests/functional/; here each strategy
runs in a real fit, where the rule must meet the round mechanics: what the clients trained, what the server
installs, what stays with each client, what a checkpoint holds and what a resumed run does.
"""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers import Probe, fast_trainer, same_state, states
from lightning_colearn import SCAFFOLD, CohortDataModule, CohortModule, FederatedAveraging, ProofOfLearning
from lightning_colearn.functional.aggregation import fedavg, fednova, qfedavg
from lightning_colearn.models import ConvNet, LogisticRegression

SGD = partial(torch.optim.SGD, lr=0.1)


def clients_dm(members=6, **kwargs) -> CohortDataModule:
    defaults = dict(num_members=members, batch_size=20, max_train_samples=60 * members, splits=(1.0, 0.0, 0.0),
                    eval_batch_size=500, partition="dirichlet", alpha=1.0)  # unequal shares: weights matter
    return CohortDataModule("mnist_small", **{**defaults, **kwargs})


def run(fed, *, members=6, epochs=2, model=LogisticRegression, optimizer=SGD, probe=None, dm=None, backend=None, **trainer):
    L.seed_everything(0, verbose=False)
    module = CohortModule(model, size=members, optimizer=optimizer, **({"backend": backend} if backend else {}))
    fast_trainer(max_epochs=epochs, callbacks=([probe] if probe else []) + [fed], **trainer).fit(module, datamodule=dm or clients_dm(members))
    return module


def recorder():
    """A Probe that keeps every member's state at each round's start and after its training (before aggregation)."""
    seen = {"start": [], "trained": []}
    return seen, Probe(lambda t, m: seen["start"].append(states(m)), lambda t, m: seen["trained"].append(states(m)))


def rounds_of(fed):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in fed.history]


# ------------------------------------------------------------------ server optimizers
@pytest.mark.parametrize("server", [dict(server_optimizer="fedavgm", server_lr=1.0, server_momentum=0.0),
                                    dict(server_optimizer=partial(torch.optim.SGD, lr=1.0))], ids=["fedavgm", "sgd_factory"])
def test_server_lr_1_without_momentum_is_fedavg_bit_for_bit(server):
    plain = run(FederatedAveraging(clients_per_round=3), epochs=3)
    served = run(FederatedAveraging(clients_per_round=3, **server), epochs=3)
    assert all(same_state(a, b) for a, b in zip(states(plain), states(served)))


def test_fedadam_installs_the_papers_update_of_the_fedavg_aggregate():
    """Reddi et al. 2021, Algorithm 2, written out: m, v over two rounds, x + lr * m / (sqrt(v) + tau)."""
    seen, probe = recorder()
    lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    fed = FederatedAveraging(clients_per_round=3, server_optimizer="fedadam", server_lr=lr, server_momentum=b1,
                             server_beta2=b2, server_tau=tau)
    dm = clients_dm()
    module = run(fed, epochs=2, probe=probe, dm=dm)
    sizes = dm.member_sizes("train")
    m = v = None
    for r, record in enumerate(fed.history):
        x = seen["start"][r][record["clients"][0]]
        agg = fedavg([list(seen["trained"][r][c].values()) for c in record["clients"]], [sizes[c] for c in record["clients"]])
        agg = dict(zip(x, agg))
        m = {k: torch.zeros_like(t, dtype=torch.float64) for k, t in x.items()} if m is None else m
        v = {k: torch.full_like(t, tau ** 2, dtype=torch.float64) for k, t in x.items()} if v is None else v
        expected = {}
        for k in x:
            delta = agg[k].double() - x[k].double()
            m[k] = b1 * m[k] + (1 - b1) * delta
            v[k] = b2 * v[k] + (1 - b2) * delta ** 2
            expected[k] = (x[k].double() + lr * m[k] / (v[k].sqrt() + tau)).float()
        after = seen["start"][r + 1] if r + 1 < len(seen["start"]) else states(module)
        for state in after:  # every client holds the new global model
            for k in x:
                torch.testing.assert_close(state[k], expected[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_each_server_optimizer_moves_the_global_model_away_from_the_plain_aggregate(name):
    plain = states(run(FederatedAveraging(clients_per_round=3), epochs=2))
    served = run(fed := FederatedAveraging(clients_per_round=3, server_optimizer=name), epochs=2)
    assert all(r["installed"] for r in fed.history)
    assert not same_state(plain[0], states(served)[0])
    assert all(same_state(states(served)[0], s) for s in states(served))  # one global model everywhere
    assert fed.state_dict()["server_optimizer"]["state"]  # the server's moments are in the checkpoint


# ------------------------------------------------------------------ resume
STRATEGIES = {
    "fedadam": dict(server_optimizer="fedadam"),
    "fedavgm": dict(server_optimizer="fedavgm", server_lr=0.7),
    "qfedavg": dict(aggregator="qfedavg", q=2.0),
    "dropout": dict(dropout=0.4, min_completion=0.5),
    "bulyan": dict(aggregator="bulyan", clients_per_round=7, num_byzantine=1),
}


@pytest.mark.parametrize("name", [*STRATEGIES, "scaffold_I", "scaffold_II", "fedbn"])
def test_resumed_mid_run_equals_uninterrupted(name, tmp_path):
    def make():
        if name.startswith("scaffold"):
            return SCAFFOLD(clients_per_round=3, local_epochs=2, option=name.split("_")[1], reset_client_optimizer=False, seed=4)
        if name == "fedbn":
            return FederatedAveraging(clients_per_round=3, local_epochs=2, personal="batchnorm", reset_client_optimizer=False, seed=4)
        kwargs = {"clients_per_round": 3, **STRATEGIES[name]}
        return FederatedAveraging(local_epochs=2, reset_client_optimizer=False, seed=4, **kwargs)

    members = 8
    model = partial(ConvNet, batch_norm=True) if name == "fedbn" else LogisticRegression
    dm = partial(clients_dm, members, splits=(0.8, 0.0, 0.2) if name == "fedbn" else (1.0, 0.0, 0.0))

    def fit(epochs, ckpt_path=None, every_epoch=False):
        L.seed_everything(0, verbose=False)
        module = CohortModule(model, size=members, optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9))
        fed = make()
        callbacks = [fed] + ([ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)] if every_epoch else [])
        trainer = fast_trainer(max_epochs=epochs, limit_train_batches=2, callbacks=callbacks, enable_checkpointing=every_epoch)
        trainer.fit(module, datamodule=dm(), ckpt_path=ckpt_path)
        return module, fed

    straight, fed_straight = fit(6)
    fit(3, every_epoch=True)  # stops after epoch 3: in the middle of round 2 (2 epochs a round)
    resumed, fed_resumed = fit(6, ckpt_path=tmp_path / "last.ckpt")
    assert len(fed_straight.history) == 3
    assert rounds_of(fed_resumed) == rounds_of(fed_straight)
    assert all(same_state(a, b) for a, b in zip(states(straight), states(resumed)))
    if name.startswith("scaffold"):
        assert fed_resumed.client_variates.keys() == fed_straight.client_variates.keys()
        for c, variate in fed_straight.client_variates.items():
            assert all(torch.equal(a, b) for a, b in zip(variate, fed_resumed.client_variates[c]))


# ------------------------------------------------------------------ SCAFFOLD
def test_scaffold_first_round_is_fedavg_then_its_variates_are_the_papers_option_ii():
    seen, probe = recorder()
    plain = run(FederatedAveraging(clients_per_round=3), epochs=1)
    sc = SCAFFOLD(clients_per_round=3)
    dm = clients_dm()
    module = run(sc, epochs=2, probe=probe, dm=dm)
    assert all(same_state(a, b) for a, b in zip(seen["start"][1], states(plain)))  # zero variates: FedAvg
    # round 0 starts from c = c_i = 0, so c_i = (x - y_i) / (K_i * lr) and c = sum(c_i) / N
    names = [k for k, _ in module.cohort[0].named_parameters()]
    x, first, second = seen["start"][0][0], sc.history[0]["clients"], sc.history[1]["clients"]
    expected = {c: [(x[n] - seen["trained"][0][c][n]) / (math.ceil(dm.member_sizes("train")[c] / 20) * 0.1) for n in names]
                for c in first}
    for c in set(first) - set(second):  # not sampled again: still its round-0 variate
        for got, want in zip(sc.client_variates[c], expected[c]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert sorted(sc.client_variates) == sorted(set(first) | set(second))


def test_scaffold_correction_is_the_gradient_of_its_loss_term():
    sc = SCAFFOLD(clients_per_round=2)
    for backend in ("loop", "stacked"):
        module = CohortModule(LogisticRegression, size=3, backend=backend)
        sc._module, sc._corrections = module, {}
        params = module.cohort.member_parameters(1)
        sc.server_variate = [torch.randn_like(p) for p in params]
        sc.client_variates[1] = [torch.randn_like(p) for p in params]
        leaves = [p for p in (module.cohort.stacked_parameters() if backend == "stacked" else params)]
        for p in leaves:
            p.requires_grad_(True)
        grads = torch.autograd.grad(sc._correct(1), leaves)
        if backend == "stacked":
            grads = [g[1] for g in grads]
        for g, c, ci in zip(grads, sc.server_variate, sc.client_variates[1]):
            torch.testing.assert_close(g, c - ci)


def test_scaffold_stacked_equals_loop():
    loop = run(SCAFFOLD(clients_per_round=4), members=8, epochs=3, backend="loop")
    stacked = run(SCAFFOLD(clients_per_round=4), members=8, epochs=3, backend="stacked")
    for a, b in zip(states(loop), states(stacked)):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_scaffold_option_i_variate_is_the_clients_gradient_at_the_server_model():
    seen, probe = recorder()
    sc = SCAFFOLD(clients_per_round=2, option="I")
    dm = clients_dm(4)
    run(sc, members=4, epochs=1, probe=probe, dm=dm)
    client = sc.history[0]["clients"][0]
    model = LogisticRegression()
    model.load_state_dict(seen["start"][0][client])
    total, batches = [torch.zeros_like(p) for p in model.parameters()], 0
    for inputs, targets in dm.member_dataloader(client, "train", shuffle=False):
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        total = [a + g for a, g in zip(total, torch.autograd.grad(loss, list(model.parameters())))]
        batches += 1
    for got, want in zip(sc.client_variates[client], total):
        torch.testing.assert_close(got, want / batches, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ Bulyan, q-FedAvg, multi-Krum
def test_bulyan_ignores_a_nan_client_and_checks_its_requirement():
    def poison(trainer, module):
        with torch.no_grad():
            next(module.cohort[trainer.callbacks[1]._clients[0]].parameters()).fill_(math.nan)

    fed = FederatedAveraging(clients_per_round=7, aggregator="bulyan", num_byzantine=1)
    module = run(fed, members=8, epochs=2, probe=Probe(trained=poison))
    assert all(r["installed"] for r in fed.history)
    assert all(torch.isfinite(t).all() for s in states(module) for t in s.values())
    with pytest.raises(ValueError, match=r"bulyan with num_byzantine=2 needs clients_per_round >= 4 \* num_byzantine \+ 3 = 11"):
        run(FederatedAveraging(clients_per_round=8, aggregator="bulyan", num_byzantine=2), members=8, epochs=1)


def test_qfedavg_with_q_0_is_fedavg_and_its_step_is_the_papers():
    plain = run(FederatedAveraging(clients_per_round=3), epochs=2)
    fair = run(FederatedAveraging(clients_per_round=3, aggregator="qfedavg", q=0.0), epochs=2)
    for a, b in zip(states(plain), states(fair)):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    seen, probe = recorder()
    dm = clients_dm()
    fed = FederatedAveraging(clients_per_round=3, aggregator="qfedavg", q=2.0)
    module = run(fed, epochs=1, probe=probe, dm=dm)
    clients = fed.history[0]["clients"]
    x = seen["start"][0][clients[0]]
    losses = []
    for c in clients:  # F_k: the client's training loss at the global model
        model = LogisticRegression()
        model.load_state_dict(x)
        xs, ys = zip(*dm.member_dataloader(c, "train", shuffle=False))
        losses.append(float(torch.nn.functional.cross_entropy(model(torch.cat(xs)), torch.cat(ys))))
    expected = qfedavg(list(x.values()), [list(seen["trained"][0][c].values()) for c in clients], losses, q=2.0,
                       lipschitz=1 / 0.1, weights=[dm.member_sizes("train")[c] for c in clients])
    for got, want in zip(states(module)[0].values(), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_multi_krum_sample_weighting_differs_from_the_plain_mean():
    uniform = run(FederatedAveraging(clients_per_round=5, aggregator="multi_krum"), epochs=1)
    weighted = run(FederatedAveraging(clients_per_round=5, aggregator="multi_krum", krum_weighting="samples"), epochs=1)
    assert not same_state(states(uniform)[0], states(weighted)[0])


# ------------------------------------------------------------------ personal layers
def test_fedbn_keeps_each_clients_batchnorm_and_scores_every_client_on_its_own_test_split():
    seen, probe = recorder()
    fed = FederatedAveraging(clients_per_round=3, personal="batchnorm")
    dm = clients_dm(6, splits=(0.8, 0.0, 0.2))
    module = run(fed, epochs=2, probe=probe, dm=dm, model=partial(ConvNet, batch_norm=True))
    after = states(module)
    bn = [k for k in after[0] if k.startswith("bn")]
    shared = [k for k in after[0] if not k.startswith("bn")]
    assert bn and shared
    for k in shared:  # the aggregated tensors are the same everywhere
        assert all(torch.equal(after[0][k], s[k]) for s in after)
    last = fed.history[-1]["clients"]
    for c in range(6):  # each client's BatchNorm is its own: what it trained, or untouched if it never trained
        own = seen["trained"][-1][c] if c in last else seen["start"][-1][c]
        assert all(torch.equal(after[c][k], own[k]) for k in bn)
    trained_ever = {c for r in fed.history for c in r["clients"]}
    assert len({after[c]["bn1.running_mean"].sum().item() for c in trained_ever}) == len(trained_ever)
    scores = fed.history[-1]["client_scores"]
    assert len(scores) == 6 and all(0.0 <= s <= 1.0 for s in scores)


def test_personal_patterns_keep_a_local_head():
    fed = FederatedAveraging(clients_per_round=6, personal=["linear.bias"])
    module = run(fed, epochs=1)
    after = states(module)
    assert all(torch.equal(after[0]["linear.weight"], s["linear.weight"]) for s in after)
    assert len({s["linear.bias"].numpy().tobytes() for s in after}) == 6  # (softmax keeps their sums equal)


@pytest.mark.parametrize("personal,message", [
    ("batchnorm", "personal='batchnorm' but the model has no BatchNorm layer"),
    (["head.*"], r"personal pattern 'head.\*' matches no tensor of the model; its tensors are \['linear.weight', 'linear.bias'\]"),
    (["linear.*"], r"keeps every tensor local: nothing is left to aggregate"),
])
def test_personal_errors(personal, message):
    with pytest.raises(ValueError, match=message):
        run(FederatedAveraging(clients_per_round=2, personal=personal), epochs=1)


# ------------------------------------------------------------------ client failures
def test_failed_clients_are_left_out_and_go_back_to_where_they_started():
    seen, probe = recorder()
    dm = clients_dm(8)
    fed = FederatedAveraging(clients_per_round=6, dropout=0.4, seed=2)
    module = run(fed, members=8, epochs=3, probe=probe, dm=dm)
    plain = FederatedAveraging(clients_per_round=6, seed=2)
    run(plain, members=8, epochs=3)
    assert [r["clients"] for r in fed.history] == [r["clients"] for r in plain.history]  # failures never change the samples
    failed = [r["failed"] for r in fed.history]
    assert any(failed) and all(set(f) < set(r["clients"]) for f, r in zip(failed, fed.history))
    sizes = dm.member_sizes("train")
    for r, record in enumerate(fed.history):
        reporting = [c for c in record["clients"] if c not in record["failed"]]
        expected = fedavg([list(seen["trained"][r][c].values()) for c in reporting], [sizes[c] for c in reporting])
        after = seen["start"][r + 1] if r + 1 < len(seen["start"]) else states(module)
        for got, want in zip(after[0].values(), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_min_completion_discards_a_round_with_too_few_reports():
    seen, probe = recorder()
    fed = FederatedAveraging(clients_per_round=4, dropout=0.6, min_completion=0.75, seed=0)
    module = run(fed, epochs=3, probe=probe)
    discarded = [r for r in fed.history if not r["installed"]]
    assert discarded and all("fewer than min_completion=0.75 allows: round discarded" in r["reason"] for r in discarded)
    for r, record in enumerate(fed.history):
        if not record["installed"]:  # every client holds the model it started the round with
            after = seen["start"][r + 1] if r + 1 < len(seen["start"]) else states(module)
            assert all(same_state(a, b) for a, b in zip(after, seen["start"][r]))


# ------------------------------------------------------------------ arguments
@pytest.mark.parametrize("kwargs,message", [
    (dict(server_optimizer="adam"), r"server_optimizer must be None, one of \['fedavgm', 'fedadam', 'fedyogi', 'fedadagrad'\]"),
    (dict(server_lr=0.0), "server_lr must be a finite number > 0 or None, got 0.0"),
    (dict(server_momentum=1.0), r"server_momentum must be a number in \[0, 1\), got 1.0"),
    (dict(server_beta2=-0.1), r"server_beta2 must be a number in \[0, 1\), got -0.1"),
    (dict(server_tau=0), "server_tau must be a finite number > 0, got 0"),
    (dict(q=-1), "q must be a finite number >= 0, got -1"),
    (dict(krum_weighting="median"), r"krum_weighting must be one of \['uniform', 'samples'\], got 'median'"),
    (dict(personal=""), "personal must be None, 'batchnorm' or a non-empty list of parameter-name patterns, got ''"),
    (dict(personal=[3]), "personal must be None, 'batchnorm' or a non-empty list"),
    (dict(dropout=1.0), r"dropout must be a number in \[0, 1\), got 1.0"),
    (dict(min_completion=1.5), r"min_completion must be a number in \[0, 1\], got 1.5"),
    (dict(dropout="x"), r"dropout must be a number in \[0, 1\), got 'x'"),
])
def test_strategy_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=r"FederatedAveraging: .*" + message):
        FederatedAveraging(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(option="III"), "option must be 'I' or 'II', got 'III'"),
    (dict(global_lr=0), "global_lr must be a finite number > 0, got 0"),
    (dict(variate_batches=0), "variate_batches must be an int >= 1 or None, got 0"),
    (dict(aggregator="median"), "aggregator must be 'fedavg'"),
    (dict(server_optimizer="fedadam"), "server_optimizer must be None"),
    (dict(personal="batchnorm"), "personal must be None"),
])
def test_scaffold_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match="SCAFFOLD: .*" + message):
        SCAFFOLD(**kwargs)


def test_pofl_refuses_what_needs_one_server_model_and_takes_client_failures(tmp_path):
    for name in ("server_optimizer", "personal", "q", "mu", "option"):
        with pytest.raises(ValueError, match=rf"ProofOfLearning: {name} is not a ProofOfLearning option: "):
            ProofOfLearning(miners=2, **{name: "fedadam"})
    pofl = ProofOfLearning(miners=2, clients_per_round=4, threshold=0.0, dropout=0.5, min_completion=0.5, seed=1)
    run(pofl, epochs=4)
    assert any(r["failed"] for r in pofl.history)
    assert all(r["block"] is None for r in pofl.history if "discarded" in str(r["reason"]))


# ------------------------------------------------------------------ stragglers and FedNova
def test_stragglers_stop_at_their_drawn_step_budget_and_fednova_normalizes_their_updates():
    seen, probe = recorder()
    dm = clients_dm(6, max_train_samples=2000)  # ~16 batches a client: the budgets bind
    fed = FederatedAveraging(clients_per_round=4, max_local_steps=(1, 6), aggregator="fednova", seed=3)
    module = run(fed, epochs=2, probe=probe, dm=dm, optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.5))
    for r, record in enumerate(fed.history):
        fed.round = r  # the budgets are a function of (seed, round)
        budgets = fed.step_budgets(record["clients"])
        moved = {c: not same_state(seen["trained"][r][c], seen["start"][r][c]) for c in record["clients"]}
        assert all(moved.values()) and len(set(budgets.values())) > 1
        x = seen["start"][r][record["clients"][0]]
        steps = [min(budgets[c], math.ceil(dm.member_sizes("train")[c] / 20)) for c in record["clients"]]
        expected = fednova(list(x.values()), [list(seen["trained"][r][c].values()) for c in record["clients"]], steps,
                           [dm.member_sizes("train")[c] for c in record["clients"]], momentum=0.5)
        after = seen["start"][r + 1] if r + 1 < len(seen["start"]) else states(module)
        for got, want in zip(after[0].values(), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"max_local_steps must be None, an int >= 1 or \(low, high\) .*got \(5, 2\)"):
        FederatedAveraging(max_local_steps=(5, 2))


def test_fednova_with_equal_steps_is_fedavg():
    updates = [[torch.randn(3, 2), torch.randn(2)] for _ in range(4)]
    x = [torch.zeros(3, 2), torch.zeros(2)]
    for got, want in zip(fednova(x, updates, [5] * 4, [1, 2, 3, 4], momentum=0.9), fedavg(updates, [1, 2, 3, 4])):
        torch.testing.assert_close(got, want)


def test_a_mid_round_checkpoint_without_round_start_resumes_from_a_client_that_was_not_sampled(tmp_path):
    """Checkpoints written before round starts were saved hold none: the global model is read off an idle client."""
    def fit(epochs, ckpt_path=None, every_epoch=False):
        L.seed_everything(0, verbose=False)
        module = CohortModule(LogisticRegression, size=6, optimizer=partial(torch.optim.SGD, lr=0.1))
        fed = FederatedAveraging(clients_per_round=3, local_epochs=2, mu=0.1, seed=4)
        callbacks = [fed] + ([ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)] if every_epoch else [])
        fast_trainer(max_epochs=epochs, callbacks=callbacks, enable_checkpointing=every_epoch).fit(
            module, datamodule=clients_dm(), ckpt_path=ckpt_path)
        return module, fed

    straight, _ = fit(4)
    fit(1, every_epoch=True)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("FederatedAveraging")]
    assert checkpoint["callbacks"][key].pop("round_start") is not None
    torch.save(checkpoint, tmp_path / "old.ckpt")
    resumed, _ = fit(4, ckpt_path=tmp_path / "old.ckpt")
    assert all(same_state(a, b) for a, b in zip(states(straight), states(resumed)))


def test_scaffold_discards_a_round_whose_control_variates_overflow():
    seen, probe = recorder()

    def diverge(trainer, module):  # a client whose weights blew up, finite but near float32's limit
        with torch.no_grad():
            next(module.cohort[trainer.callbacks[1]._clients[0]].parameters()).fill_(3e38)

    sc = SCAFFOLD(clients_per_round=3)
    module = run(sc, epochs=2, probe=Probe(trained=diverge))
    assert [r["installed"] for r in sc.history] == [False, False]
    assert all(r["reason"] == "non-finite control variates: round discarded" for r in sc.history)
    assert sc.server_variate is None and sc.client_variates == {}
    assert all(torch.isfinite(t).all() for s in states(module) for t in s.values())
