"""PopulationBasedTraining: exploit copies exact state, explore keeps bounds, the same seed gives the same lineage,
resume equals an uninterrupted run, the stacked backend equals the loop, replay follows the schedule, errors."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torchmetrics.classification import MulticlassAccuracy

from helpers import BNNet, fast_trainer, same_nested, same_state, states
from lightning_colearn import (
    CohortDataModule,
    CohortModule,
    MutualLearning,
    PopulationBasedTraining,
    PopulationBasedTrainingReplay,
)
from lightning_colearn.functional.distillation import mutual_learning_losses
from lightning_colearn.functional.pbt import Choice, IntUniform, LogUniform, Uniform, exploit_plan, explore, parse_space
from lightning_colearn.models import MLP

SGD = partial(torch.optim.SGD, lr=0.05, momentum=0.9)
SPACE = {"lr": {"type": "loguniform", "low": 1e-3, "high": 0.3}, "momentum": {"type": "uniform", "low": 0.0, "high": 0.95},
         "weight_decay": {"type": "loguniform", "low": 1e-6, "high": 1e-2}}


def _fit(module, callbacks, root=None, dm=None, max_epochs=3, **kwargs):
    dm = dm or CohortDataModule(num_members=module.size, batch_size=16, eval_batch_size=200, stream="shared")
    trainer = fast_trainer(root, **{**dict(max_epochs=max_epochs, limit_train_batches=5, limit_val_batches=2, callbacks=callbacks), **kwargs})
    trainer.fit(module, datamodule=dm)
    return trainer


def _pbt(**kwargs):
    return PopulationBasedTraining(SPACE, **{"quantile_fraction": 0.5, "seed": 1, **kwargs})


# ---------------------------------------------------------------------------- the math
def test_explore_keeps_bounds_types_and_factors():
    space = parse_space({"lr": {"type": "loguniform", "low": 1e-3, "high": 0.1}, "units": {"type": "int", "low": 8, "high": 64},
                         "p": {"type": "uniform", "low": 0.0, "high": 0.5}, "act": ["relu", "gelu", "tanh"]})
    g = torch.Generator().manual_seed(0)
    values = {"lr": 0.05, "units": 32, "p": 0.25, "act": "gelu"}
    for _ in range(300):
        new = explore(values, space, g, resample_probability=0.0, perturbation_factors=(0.8, 1.2))
        assert new["lr"] / values["lr"] == pytest.approx(0.8) or new["lr"] / values["lr"] == pytest.approx(1.2) or new["lr"] in (1e-3, 0.1)
        assert type(new["units"]) is int and 8 <= new["units"] <= 64
        assert new["units"] in (round(values["units"] * 0.8), round(values["units"] * 1.2), 8, 64)
        assert new["act"] in ("relu", "tanh") if values["act"] == "gelu" else True  # a neighbour
        assert 0.0 <= new["p"] <= 0.5
        values = new
    for _ in range(300):  # resampling draws from the distribution, inside its bounds
        new = explore(values, space, g, resample_probability=1.0)
        assert 1e-3 <= new["lr"] <= 0.1 and 8 <= new["units"] <= 64 and new["act"] in space["act"].values
    # at a bound, a perturbation that would leave the range is clipped to it (integers too)
    assert explore({"units": 64}, {"units": IntUniform(8, 64)}, g, resample_probability=0.0, perturbation_factors=(1.5,)) == {"units": 64}
    assert explore({"lr": 0.1}, {"lr": LogUniform(1e-3, 0.1)}, g, resample_probability=0.0, perturbation_factors=(3.0,)) == {"lr": 0.1}
    assert explore({"a": "x"}, {"a": Choice(("x", "y"))}, g, resample_probability=0.0)["a"] in ("x", "y")


def test_exploit_plan_bottom_copies_top_and_nan_ranks_last():
    g = torch.Generator().manual_seed(0)
    scores = torch.tensor([0.5, 0.9, float("nan"), 0.1, 0.7, 0.8, 0.3, 0.6])
    for _ in range(50):
        plan = exploit_plan(scores, 0.25, maximize=True, generator=g)
        assert list(plan) == [2, 3] and set(plan.values()) <= {1, 5}  # worst first: NaN, then 0.1
    plan = exploit_plan(scores[[0, 1, 3, 4]], 0.5, maximize=False, generator=g, members=[0, 1, 3, 4])
    assert list(plan) == [1, 4] and set(plan.values()) <= {3, 0}
    assert exploit_plan(torch.tensor([1.0]), 0.5, True, g) == {}


@pytest.mark.parametrize("spec, match", [
    ({"lr": {"type": "loguniform", "low": -1, "high": 1}}, r"hyperparameters.lr: loguniform needs 0 < low < high, got low=-1"),
    ({"lr": {"type": "normal"}}, r"hyperparameters.lr: type must be one of .*got 'normal'"),
    ({"n": {"type": "int", "low": 1.5, "high": 4}}, r"hyperparameters.n: int needs integers low <= high, got low=1.5"),
    ({"a": {"type": "choice", "values": []}}, r"hyperparameters.a: choice needs a non-empty list"),
    ({"lr": {"type": "uniform", "low": 0, "high": 1, "step": 2}}, r"hyperparameters.lr: unknown keys \['step'\]"),
    ({}, r"hyperparameters must be a non-empty mapping"),
])
def test_bad_search_spaces_are_named(spec, match):
    with pytest.raises(ValueError, match=match):
        PopulationBasedTraining(spec)


@pytest.mark.parametrize("kwargs, match", [
    (dict(interval=0), r"interval must be an int >= 1, got 0"),
    (dict(unit="batch"), r"unit must be one of \['epoch', 'step'\], got 'batch'"),
    (dict(mode="best"), r"mode must be one of \['max', 'min'\], got 'best'"),
    (dict(quantile_fraction=0.75), r"quantile_fraction must be in \(0, 0.5\], got 0.75"),
    (dict(resample_probability=1.5), r"resample_probability must be in \[0, 1\], got 1.5"),
    (dict(perturbation_factors=[0.8, -1]), r"perturbation_factors must be a non-empty list of numbers > 0"),
    (dict(burn_in=-1), r"burn_in must be an int >= 0, got -1"),
    (dict(initial="random"), r"initial must be 'sample' or 'keep', got 'random'"),
])
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PopulationBasedTraining(SPACE, **kwargs)


def test_unknown_targets_and_modules_that_cannot_take_them_are_named():
    with pytest.raises(ValueError, match=r"hyperparameters.dropout: not something a member has"):
        PopulationBasedTraining({"dropout": [0.1, 0.2]})
    module = CohortModule(MLP, size=2, optimizer=SGD, backend="stacked")
    with pytest.raises(ValueError, match=r"hyperparameters.member.net.1.p: a stacked cohort runs one copy"):
        PopulationBasedTraining({"member.net.1.p": [0.1, 0.2]}).check_module(module)
    with pytest.raises(ValueError, match=r"hyperparameters.module.temperature: CohortModule takes per-member values for nothing"):
        PopulationBasedTraining({"module.temperature": [1.0, 2.0]}).check_module(module)
    with pytest.raises(ValueError, match=r"the member \(MLP\) has no 'head'"):
        PopulationBasedTraining({"member.head.p": [0.1]}).check_module(CohortModule(MLP, size=2))
    with pytest.raises(ValueError, match=r"a population of at least 2 members, got a cohort of 1"):
        PopulationBasedTraining(SPACE).check_module(CohortModule(MLP, size=1))
    with pytest.raises(ValueError, match=r"PopulationBasedTraining with privacy"):
        PopulationBasedTraining(SPACE).check_module(CohortModule(MLP, size=2, privacy=dict(noise_multiplier=1.0)))


def test_a_monitor_that_was_not_logged_is_named():
    pbt = _pbt(monitor="val_f1")
    with pytest.raises(ValueError, match=r"monitor='val_f1' needs 'val_f1/member_0'.*logged per-member keys: \['val_acc/member_0'"):
        _fit(CohortModule(MLP, size=4, optimizer=SGD), [pbt], max_epochs=2)


# ------------------------------------------------------------------------------ exploit
@pytest.mark.parametrize("backend", ["loop", "stacked"])
@pytest.mark.parametrize("optimizer", [SGD, partial(torch.optim.Adam, lr=1e-3)], ids=["sgd", "adam"])
def test_exploit_copies_weights_buffers_optimizer_and_scheduler_state(backend, optimizer):
    model = BNNet if backend == "loop" else MLP  # BatchNorm buffers on the loop; the stacked engine's MLP
    module = CohortModule(model, size=4, optimizer=optimizer, backend=backend,
                          lr_scheduler=partial(torch.optim.lr_scheduler.ExponentialLR, gamma=0.9))
    pbt = PopulationBasedTraining({"lr": SPACE["lr"]}, interval=10**6)  # never decides on its own
    _fit(module, [pbt], max_epochs=2)
    opts = module.member_optimizers()
    source_state, source_opt = states(module)[1], copy.deepcopy(opts[1].state_dict())
    others = {i: states(module)[i] for i in (0, 2)}
    pbt._exploit(module, {3: 1})
    assert same_state(states(module)[3], source_state)
    assert same_nested(opts[3].state_dict()["state"], source_opt["state"])
    assert opts[3].state_dict()["param_groups"][0]["lr"] == source_opt["param_groups"][0]["lr"]
    assert module.member_lr_scheduler(3).state_dict() == module.member_lr_scheduler(1).state_dict()
    assert all(same_state(states(module)[i], s) for i, s in others.items())  # nobody else changed
    # a copy, not an alias: training member 3 on leaves member 1 where it was
    x = torch.randn(8, 1, 28, 28)
    if backend == "loop":
        module.cohort[3](x).sum().backward()
        opts[3].step()
    else:
        module.cohort.stacked_forward(x, [3]).sum().backward()
        module.trainer.optimizers[0].step(members=[3])
    assert same_state(states(module)[1], source_state) and not same_state(states(module)[3], source_state)
    assert same_nested(opts[1].state_dict()["state"], source_opt["state"])


def test_decisions_follow_the_plan_and_values_stay_in_bounds():
    pbt = _pbt(quantile_fraction=0.25)
    module = CohortModule(MLP, size=8, optimizer=SGD)
    _fit(module, [pbt], max_epochs=3)
    assert len(pbt.lineage) == 2 * 2  # after epochs 1 and 2 (none after the last), 2 bottom members each
    space = pbt.space
    for r in pbt.lineage:
        assert r["member"] != r["source"] and r["score"] <= r["source_score"]
        for name, dist in space.items():
            assert dist.low <= r["new"][name] <= dist.high
    for i, values in enumerate(pbt.values):  # what the callback holds is what each member's optimizer uses
        group = module.member_optimizers()[i].param_groups[0]
        assert {k: group[k] for k in SPACE} == values
    # the best member's schedule is its ancestors' values, then its own changes
    schedule = pbt.schedule()
    assert schedule[0]["step"] == 0 and schedule[-1] == {"step": schedule[-1]["step"], **pbt.values[pbt.best_member]}
    assert [e["step"] for e in schedule] == sorted(e["step"] for e in schedule)


def test_same_seed_same_lineage_other_seed_another():
    def run(seed):
        torch.manual_seed(0)
        pbt = _pbt(seed=seed)
        module = CohortModule(MLP, size=6, optimizer=SGD)
        _fit(module, [pbt], max_epochs=3)
        return pbt, states(module)

    (a, sa), (b, sb), (c, _) = run(1), run(1), run(2)
    assert a.lineage == b.lineage and a.values == b.values
    assert all(same_state(x, y) for x, y in zip(sa, sb))
    assert a.values != c.values


def test_the_stacked_backend_equals_the_loop():
    """Each member its own lr, momentum and weight decay, changing at every decision: one batched step per
    training step on the stacked backend, one torch SGD per member on the loop (the oracle)."""
    runs = {}
    for backend in ("loop", "stacked"):
        torch.manual_seed(0)
        pbt = _pbt(metric=MulticlassAccuracy(num_classes=10), unit="step", interval=4, fitness_batches=1)
        module = CohortModule(MLP, size=6, optimizer=SGD, backend=backend)
        _fit(module, [pbt], max_epochs=2, dm=CohortDataModule(num_members=6, batch_size=16, eval_batch_size=200, seed=0))
        runs[backend] = pbt, states(module)
    (loop, loop_states), (stacked, stacked_states) = runs["loop"], runs["stacked"]
    assert [(r["member"], r["source"]) for r in loop.lineage] == [(r["member"], r["source"]) for r in stacked.lineage]
    assert len(loop.lineage) == 2 * 3  # steps 4 and 8 of 10, 3 of 6 members each
    for a, b in zip(loop_states, stacked_states):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- resume
class _Interrupt(Callback):
    """Stops the run after ``epochs`` epochs, as a killed job would (its last.ckpt written), the plan unchanged."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def test_resume_equals_uninterrupted(tmp_path):
    def run(root, stop_after, init, ckpt_path=None):
        module = CohortModule(MLP, size=4, optimizer=SGD)
        module.load_state_dict(init)
        pbt = _pbt()
        dm = CohortDataModule(num_members=4, batch_size=16, eval_batch_size=200, stream="shared")
        trainer = fast_trainer(root, max_epochs=4, limit_train_batches=5, limit_val_batches=2, enable_checkpointing=True,
                               callbacks=[pbt, _Interrupt(stop_after), ModelCheckpoint(dirpath=root, save_last=True)])
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return module, pbt

    torch.manual_seed(0)
    init = CohortModule(MLP, size=4).state_dict()
    full, full_pbt = run(tmp_path / "full", 4, init)
    run(tmp_path / "part", 2, init)
    resumed, resumed_pbt = run(tmp_path / "part", 4, init, ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    assert resumed_pbt.lineage == full_pbt.lineage and len(full_pbt.lineage) == 3 * 2
    assert resumed_pbt.values == full_pbt.values and resumed_pbt.timelines == full_pbt.timelines
    for a, b in zip(states(full), states(resumed)):
        assert same_state(a, b)


def test_a_corrupt_checkpoint_state_is_refused_and_changes_nothing():
    pbt = _pbt()
    before = pbt.generator.get_state()
    with pytest.raises(ValueError, match=r"PopulationBasedTraining checkpoint state is corrupt or from another search space"):
        pbt.load_state_dict({"generator": before, "values": [{"lr": 0.1}], "lineage": [], "trace": [], "timelines": []})
    with pytest.raises(ValueError, match="corrupt"):
        pbt.load_state_dict({"values": None})
    assert pbt.values is None and torch.equal(pbt.generator.get_state(), before)


# ------------------------------------------------------------------------ what is tuned
def test_lr_under_a_scheduler_and_scheduler_settings():
    space = {"lr": {"type": "loguniform", "low": 1e-3, "high": 0.3}, "scheduler.gamma": {"type": "uniform", "low": 0.5, "high": 0.99}}
    pbt = PopulationBasedTraining(space, quantile_fraction=0.5, seed=3)
    module = CohortModule(MLP, size=4, optimizer=SGD, lr_scheduler=partial(torch.optim.lr_scheduler.ExponentialLR, gamma=0.9))
    _fit(module, [pbt], max_epochs=2)
    for i in range(4):
        scheduler = module.member_lr_scheduler(i)
        assert scheduler.gamma == pbt.values[i]["scheduler.gamma"]
    # the schedule continues from the value PBT set: one more scheduler step multiplies it by the member's gamma
    lr = module.member_optimizers()[0].param_groups[0]["lr"]
    module.member_lr_scheduler(0).step()
    assert module.member_optimizers()[0].param_groups[0]["lr"] == pytest.approx(lr * pbt.values[0]["scheduler.gamma"])


def test_member_attributes_dropout_per_member():
    class DropNet(torch.nn.Module):
        num_classes = 10

        def __init__(self):
            super().__init__()
            self.fc, self.drop, self.out = torch.nn.Linear(784, 32), torch.nn.Dropout(0.1), torch.nn.Linear(32, 10)

        def forward(self, x):
            return self.out(self.drop(torch.relu(self.fc(x.flatten(1)))))

    pbt = PopulationBasedTraining({"member.drop.p": {"type": "uniform", "low": 0.0, "high": 0.5}}, quantile_fraction=0.5, seed=0)
    module = CohortModule(DropNet, size=4, optimizer=SGD)
    _fit(module, [pbt], max_epochs=2)
    assert [m.drop.p for m in module.cohort] == [v["member.drop.p"] for v in pbt.values]
    assert len({m.drop.p for m in module.cohort}) > 1


def test_mutual_learning_temperature_and_kl_weight_per_student():
    space = {"module.temperature": {"type": "uniform", "low": 1.0, "high": 4.0}, "module.kl_weight": {"type": "uniform", "low": 0.1, "high": 2.0}}
    pbt = PopulationBasedTraining(space, quantile_fraction=0.5, seed=0)
    module = MutualLearning([MLP() for _ in range(4)], optimizer=SGD)
    _fit(module, [pbt], max_epochs=2)
    assert module.temperature == [v["module.temperature"] for v in pbt.values]
    assert module.kl_weight == [v["module.kl_weight"] for v in pbt.values]


def test_per_student_temperatures_equal_the_kl_written_out():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 3, generator=g, requires_grad=True) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 0, 1])
    temps, weights = [1.0, 2.0, 3.5], [0.5, 1.0, 2.0]
    losses = mutual_learning_losses(logits, y, temps, weights)
    for i, (t, w) in enumerate(zip(temps, weights)):
        p_i = torch.softmax(logits[i] / t, dim=1)
        kl = sum((torch.softmax(logits[j].detach() / t, 1) * (torch.log_softmax(logits[j].detach() / t, 1) - torch.log(p_i))).sum(1)
                 for j in range(3) if j != i)
        expected = torch.nn.functional.cross_entropy(logits[i], y) + w * kl.mean() * t**2 / 2
        torch.testing.assert_close(losses[i], expected)
    # one temperature for all, given per student, is the shared path
    same = mutual_learning_losses(logits, y, [2.0] * 3, [1.0] * 3)
    torch.testing.assert_close(torch.stack(same), torch.stack(mutual_learning_losses(logits, y, 2.0, 1.0)))


# ------------------------------------------------------------------------------- replay
class _LrLog(Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append((trainer.global_step, pl_module.member_optimizers()[0].param_groups[0]["lr"]))


def test_replay_follows_the_schedule_and_reads_the_csv(tmp_path):
    schedule = [{"step": 0, "lr": 0.1, "momentum": 0.5}, {"step": 3, "lr": 0.02, "momentum": 0.9}, {"step": 7, "lr": 0.005, "momentum": 0.0}]
    pbt = _pbt()
    pbt.timelines, pbt.space = [[(e["step"], {k: v for k, v in e.items() if k != "step"}) for e in schedule]], \
        {"lr": Uniform(0, 1), "momentum": Uniform(0, 1)}
    path = pbt.write_schedule(tmp_path / "schedule.csv", member=0)
    for source in (schedule, path):
        log = _LrLog()  # after the replay in the callback list: sees the step's values
        module = CohortModule(MLP, size=1, optimizer=SGD)
        _fit(module, [PopulationBasedTrainingReplay(source), log], max_epochs=2, limit_val_batches=0)
        expected = [0.1 if s < 3 else 0.02 if s < 7 else 0.005 for s, _ in log.lrs]
        assert [lr for _, lr in log.lrs] == pytest.approx(expected) and len(log.lrs) == 10
        assert module.member_optimizers()[0].param_groups[0]["momentum"] == 0.0
    with pytest.raises(ValueError, match=r"schedule steps must not decrease, got \[3, 0\]"):
        PopulationBasedTrainingReplay([{"step": 3, "lr": 0.1}, {"step": 0, "lr": 0.2}])


def test_files_and_plot_in_the_log_dir(tmp_path):
    pbt = _pbt()
    module = CohortModule(MLP, size=4, optimizer=SGD)
    _fit(module, [pbt], max_epochs=2, logger=CSVLogger(tmp_path, name="run"))
    out = tmp_path / "run" / "version_0"
    lineage = (out / "pbt_lineage.csv").read_text().splitlines()
    assert lineage[0].startswith("step,epoch,member,source,score,source_score,lr_old,lr_new") and len(lineage) == 1 + 2
    rows = (out / "pbt_schedule.csv").read_text().splitlines()
    assert rows[0] == "step,lr,momentum,weight_decay" and len(rows) == 1 + len(pbt.schedule())
    assert (out / "pbt.png").stat().st_size > 10_000
    metrics = (out / "metrics.csv").read_text().splitlines()[0]
    assert "pbt/lr/member_0" in metrics and "pbt/exploits" in metrics


def test_burn_in_and_step_interval():
    pbt = _pbt(unit="step", interval=2, burn_in=4, metric=MulticlassAccuracy(num_classes=10), fitness_batches=1)
    _fit(CohortModule(MLP, size=4, optimizer=SGD), [pbt], max_epochs=2,
         dm=CohortDataModule(num_members=4, batch_size=16, eval_batch_size=200, seed=0))
    assert sorted({r["step"] for r in pbt.lineage}) == [6, 8]  # from step 6 on, every 2, not after the last (10)
    assert not any(math.isnan(s) for s in pbt.last_scores)


def test_hyperparameters_the_members_do_not_have_are_named_before_training():
    module = CohortModule(MLP, size=4, optimizer=partial(torch.optim.Adam, lr=1e-3))
    with pytest.raises(ValueError, match=r"hyperparameters.momentum: member 0's Adam has no 'momentum' \(it has \["):
        _fit(module, [PopulationBasedTraining({"momentum": {"type": "uniform", "low": 0.0, "high": 0.9}})], max_epochs=1)
    assert module.trainer.global_step == 0
    with pytest.raises(ValueError, match=r"hyperparameters.beta1: member 0's SGD has no 'betas'"):
        _fit(CohortModule(MLP, size=4, optimizer=SGD), [PopulationBasedTraining({"beta1": [0.8, 0.9]})], max_epochs=1)
    with pytest.raises(ValueError, match=r"hyperparameters.scheduler.gamma: member 0 has no lr scheduler"):
        _fit(CohortModule(MLP, size=4, optimizer=SGD), [PopulationBasedTraining({"scheduler.gamma": [0.8, 0.9]})], max_epochs=1)


def test_final_scores_initial_values_and_no_decision_when_the_run_stops_early():
    class StopAfterValidation(Callback):  # as EarlyStopping does, at the end of validation of epoch 2
        def on_validation_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                trainer.should_stop = True

    pbt = _pbt()
    module = CohortModule(MLP, size=4, optimizer=SGD)
    trainer = _fit(module, [StopAfterValidation(), pbt], max_epochs=5)
    assert trainer.current_epoch == 2 and {r["epoch"] for r in pbt.lineage} == {0}  # epoch 1 ended the run: no copy
    assert pbt.last_scores == [float(trainer.callback_metrics[f"val_acc/member_{i}"]) for i in range(4)]
    assert pbt.initial_values == pbt.trace[0][2]
    copied = {r["member"]: r["source"] for r in pbt.lineage}  # a copy's schedule starts with its source's values
    assert all(pbt.schedule(m)[0] == {"step": 0, **pbt.initial_values[src]} for m, src in copied.items())


def test_fedprox_mu_per_client():
    from lightning_colearn import FederatedAveraging
    from lightning_colearn.functional.aggregation import fedprox_term

    fed = FederatedAveraging(clients_per_round=4, mu=0.0, eval_batches=1, seed=0)  # no proximal term until PBT sets mu
    pbt = PopulationBasedTraining({"callback.mu": {"type": "loguniform", "low": 1e-3, "high": 1.0}}, quantile_fraction=0.5, seed=0)
    class Terms(Callback):
        checked = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if fed._global_state is None:  # between rounds
                return
            assert fed._proximal in pl_module.loss_terms  # mu > 0 came from PBT: the proximal term is on
            for i in range(4):  # each client's proximal term with its own mu
                params = pl_module.cohort.member_parameters(i)
                torch.testing.assert_close(fed._proximal(i), fedprox_term(params, fed._global_params(), fed.mu[i]))
            self.checked += 1

    terms = Terms()
    module = CohortModule(MLP, size=4, optimizer=SGD)
    _fit(module, [fed, pbt, terms], max_epochs=2, dm=CohortDataModule(num_members=4, batch_size=16, eval_batch_size=200, seed=0))
    assert fed.mu == [v["callback.mu"] for v in pbt.values] and len(set(fed.mu)) == 4
    assert terms.checked >= 8
    with pytest.raises(ValueError, match=r"hyperparameters.callback.mu: no callback of the Trainer takes per-member values of 'mu'"):
        _fit(CohortModule(MLP, size=4, optimizer=SGD), [PopulationBasedTraining({"callback.mu": [0.1, 0.2]})], max_epochs=1)
