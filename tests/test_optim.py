"""Tests for lightning_colearn.optim.CohortOptimizer: N member optimizers behind one Optimizer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_colearn import Cohort
from lightning_colearn.optim import CohortOptimizer, StackedOptimizer


def _models(seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Linear(3, 2), nn.Linear(3, 2)]


def _make_opts(models):
    return [
        torch.optim.SGD(models[0].parameters(), lr=0.1, momentum=0.9),
        torch.optim.Adam(models[1].parameters(), lr=0.01),
    ]


def _backward(models, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
    for m in models:
        m.zero_grad(set_to_none=True)
        ((m(x) - y) ** 2).mean().backward()


def _params(models):
    return [p.detach().clone() for m in models for p in m.parameters()]


def _assert_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_container_step_equals_separate_member_steps():
    models = _models()
    twins = copy.deepcopy(models)
    cohort_opt = CohortOptimizer(_make_opts(models))
    separate = _make_opts(twins)
    start = _params(models)
    for step in range(4):
        _backward(models, step)
        _backward(twins, step)
        cohort_opt.step()
        for opt in separate:
            opt.step()
        _assert_equal(_params(models), _params(twins))
    # the parameters really moved
    assert not all(torch.equal(a, b) for a, b in zip(start, _params(models)))
    # momentum / Adam moments live in the members' own states
    assert "momentum_buffer" in cohort_opt.optimizers[0].state[models[0].weight]
    assert "exp_avg" in cohort_opt.optimizers[1].state[models[1].weight]
    assert cohort_opt.state[models[1].weight] is cohort_opt.optimizers[1].state[models[1].weight]


def test_step_subset_changes_only_that_member():
    models = _models()
    cohort_opt = CohortOptimizer(_make_opts(models))
    _backward(models, 0)
    before = [_params([m]) for m in models]
    cohort_opt.step(members=[1])
    _assert_equal(_params([models[0]]), before[0])
    assert not any(torch.equal(a, b) for a, b in zip(_params([models[1]]), before[1]))
    assert len(cohort_opt.optimizers[0].state) == 0  # member 0 never stepped: no momentum buffer
    assert len(cohort_opt.optimizers[1].state) == 2


def test_step_runs_closure_once_and_returns_loss():
    models = _models()
    cohort_opt = CohortOptimizer(_make_opts(models))
    calls = []

    def closure():
        calls.append(1)
        _backward(models, 0)
        return torch.tensor(3.0)

    loss = cohort_opt.step(closure)
    assert len(calls) == 1 and loss.item() == 3.0


def test_zero_grad_clears_every_member():
    models = _models()
    cohort_opt = CohortOptimizer(_make_opts(models))
    _backward(models, 0)
    cohort_opt.zero_grad()
    assert all(p.grad is None for m in models for p in m.parameters())
    _backward(models, 0)
    cohort_opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for m in models for p in m.parameters())


def test_param_groups_are_the_members_live_groups():
    models = _models()
    opts = _make_opts(models)
    cohort_opt = CohortOptimizer(opts)
    assert len(cohort_opt.param_groups) == 2
    assert cohort_opt.param_groups[0] is opts[0].param_groups[0]
    cohort_opt.param_groups[1]["lr"] = 0.5
    assert opts[1].param_groups[0]["lr"] == 0.5


def test_lr_scheduler_on_container_reaches_members():
    models = _models()
    opts = _make_opts(models)
    cohort_opt = CohortOptimizer(opts)
    sched = torch.optim.lr_scheduler.StepLR(cohort_opt, step_size=1, gamma=0.5)
    _backward(models, 0)
    cohort_opt.step()
    sched.step()
    assert opts[0].param_groups[0]["lr"] == pytest.approx(0.05)
    assert opts[1].param_groups[0]["lr"] == pytest.approx(0.005)


def _train(models, opt, steps, start=0):
    for step in range(start, start + steps):
        _backward(models, step)
        opt.step()


def test_state_dict_round_trip_reproduces_next_step_exactly():
    models = _models()
    cohort_opt = CohortOptimizer(_make_opts(models))
    _train(models, cohort_opt, 3)
    saved_state = copy.deepcopy(cohort_opt.state_dict())  # step() mutates state tensors in place
    saved_models = copy.deepcopy(models)
    assert isinstance(saved_state, dict) and len(saved_state["members"]) == 2

    _train(models, cohort_opt, 2, start=3)
    expected = _params(models)

    # A fresh optimizer over the restored models, loaded from the checkpoint.
    restored = CohortOptimizer(_make_opts(saved_models))
    restored.load_state_dict(saved_state)
    _train(saved_models, restored, 2, start=3)
    _assert_equal(_params(saved_models), expected)


def test_without_loading_state_the_next_step_differs():
    # Guards the round-trip test: a fresh optimizer (no momentum / moments) diverges.
    models = _models()
    cohort_opt = CohortOptimizer(_make_opts(models))
    _train(models, cohort_opt, 3)
    saved_models = copy.deepcopy(models)
    _train(models, cohort_opt, 1, start=3)
    fresh = CohortOptimizer(_make_opts(saved_models))
    _train(saved_models, fresh, 1, start=3)
    assert not all(torch.equal(a, b) for a, b in zip(_params(models), _params(saved_models)))


def test_load_state_dict_wrong_member_count():
    models = _models()
    cohort_opt = CohortOptimizer(_make_opts(models))
    state = cohort_opt.state_dict()
    with pytest.raises(ValueError, match="optimizer state holds 1 members but this cohort has 2"):
        cohort_opt.load_state_dict({"members": state["members"][:1]})
    with pytest.raises(ValueError, match="optimizer state holds 3 members but this cohort has 2"):
        cohort_opt.load_state_dict({"members": state["members"] + state["members"][:1]})


@pytest.mark.parametrize(
    "bad",
    [
        {"state": {}, "param_groups": []},  # a plain torch optimizer's state dict
        {"members": {0: {}}},
        {},
        [1, 2],
        None,
    ],
    ids=["plain-optimizer", "members-not-list", "empty", "list", "none"],
)
def test_load_state_dict_wrong_format(bad):
    models = _models()
    cohort_opt = CohortOptimizer(_make_opts(models))
    with pytest.raises(ValueError, match=r"optimizer state must be a CohortOptimizer state \(\{'members': \[\.\.\.\]\}\)"):
        cohort_opt.load_state_dict(bad)


def test_parameter_in_two_member_optimizers_raises():
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="more than one parameter group"):
        CohortOptimizer([torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD([model.weight], lr=0.1)])


def test_empty_or_non_optimizer_members_raise():
    with pytest.raises(ValueError, match="at least one member optimizer"):
        CohortOptimizer([])
    with pytest.raises(TypeError, match="member 1's optimizer must be a torch.optim.Optimizer"):
        CohortOptimizer([torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1), object()])


@pytest.mark.parametrize("stacked", [False, True], ids=["loop", "stacked"])
def test_a_negative_member_index_counts_from_the_end_as_in_the_cohort(stacked):
    cohort = Cohort(lambda: nn.Linear(2, 1), size=3, backend="stacked" if stacked else "loop")
    if stacked:
        opt = StackedOptimizer(cohort.stacked_parameters(), [list(m.parameters()) for m in cohort], torch.optim.SGD,
                               {"lr": 0.1, "momentum": 0.9})
    else:
        opt = CohortOptimizer([torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in cohort])
    before = [{k: v.clone() for k, v in cohort.member_state(i).items()} for i in range(3)]
    for p in cohort.stacked_parameters() if stacked else cohort.parameters():
        p.grad = torch.ones_like(p)
    opt.step(members=[-1])  # the last member, as cohort[-1]
    after = [cohort.member_state(i) for i in range(3)]
    assert [torch.equal(a["weight"], b["weight"]) for a, b in zip(before, after)] == [True, True, False]
    assert str(opt.member_state_dict(-1)) == str(opt.member_state_dict(2))
    opt.reset_member(-1)
    assert not opt.member_state_dict(2)["state"]


def test_repr():
    models = _models()
    assert repr(CohortOptimizer([torch.optim.SGD(m.parameters(), lr=0.1) for m in models])) == "CohortOptimizer(2 x SGD)"


def test_cohort_optimizer_member_indices_are_checked():
    models = _models()
    opt = CohortOptimizer(_make_opts(models))
    n = len(models)
    for members in ([n], [-n - 1], [True]):
        with pytest.raises(IndexError, match=rf"member index must be an int in \[0, {n - 1}\] \(or -{n}\.\.-1 from the end\), "
                                             rf"got {members[0]!r}"):
            opt.step(members=members)
    with pytest.raises(ValueError, match="needs at least one member index, got none"):
        opt.step(members=[])
    for call in (lambda: opt.member_state_dict(n), lambda: opt.reset_member(-n - 1), lambda: opt.load_member_state_dict(1.0, {})):
        with pytest.raises(IndexError, match="member index must be an int"):
            call()


def test_an_allowed_empty_member_list_steps_no_member():
    """Under DDP a rank whose members all sit a step out still calls step (Lightning counts steps on every rank)."""
    models = [torch.nn.Linear(3, 2) for _ in range(3)]
    opt = CohortOptimizer(_make_opts(models))
    for m in models:
        for p in m.parameters():
            p.grad = torch.ones_like(p)
    before = [p.detach().clone() for m in models for p in m.parameters()]
    opt.step(members=[], allow_empty=True)
    assert all(torch.equal(a, p) for a, p in zip(before, (p for m in models for p in m.parameters())))
    assert not opt.state  # no member's state was created
