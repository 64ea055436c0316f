"""Tests for lightning_colearn.cohort.Cohort: construction, whole-member arithmetic, member state."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

from lightning_colearn.cohort import Cohort
from lightning_colearn.functional import CohortMismatchError


class Tiny(nn.Module):
    """A zero-argument model class: Linear + BatchNorm (float and integer buffers)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(self.fc(x))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _fill(cohort: Cohort) -> list[dict[str, torch.Tensor]]:
    """Give every member distinct, exactly representable values; return copies of the states."""
    with torch.no_grad():
        for i, member in enumerate(cohort):
            for j, t in enumerate(member.state_dict(keep_vars=True).values()):
                if t.is_floating_point():
                    t.copy_(torch.arange(t.numel(), dtype=t.dtype).reshape(t.shape) * (i + 1) + 10 * j + i)
                else:
                    t.fill_(100 * (i + 1) + j)
    return [cohort.member_state(i) for i in range(len(cohort))]


def _param_ids(cohort: Cohort) -> list[int]:
    return [id(t) for m in cohort for t in m.state_dict(keep_vars=True).values()]


# ----------------------------------------------------------------- construction
def test_build_from_class_initialises_members_independently():
    cohort = Cohort(Tiny, size=3)
    assert len(cohort) == 3
    assert all(isinstance(m, Tiny) for m in cohort)
    assert not torch.equal(cohort[0].fc.weight, cohort[1].fc.weight)
    assert not torch.equal(cohort[1].fc.weight, cohort[2].fc.weight)
    assert cohort.is_homogeneous


def test_build_from_factory():
    cohort = Cohort(lambda: nn.Linear(2, 1), size=2)
    assert [type(m) for m in cohort] == [nn.Linear, nn.Linear]
    assert not torch.equal(cohort[0].weight, cohort[1].weight)


def test_build_from_instance_copies_equal_but_not_shared():
    model = Tiny()
    cohort = Cohort(model, size=3)
    assert len(cohort) == 3
    for i in range(1, 3):
        for (k, a), (k2, b) in zip(cohort[0].state_dict().items(), cohort[i].state_dict().items()):
            assert k == k2 and torch.equal(a, b)
            assert a.data_ptr() != b.data_ptr()
    with torch.no_grad():
        cohort[0].fc.weight.add_(1.0)
        cohort[0].bn.running_mean.add_(1.0)
    assert not torch.equal(cohort[0].fc.weight, cohort[1].fc.weight)
    assert not torch.equal(cohort[0].bn.running_mean, cohort[1].bn.running_mean)
    assert torch.equal(cohort[1].fc.weight, cohort[2].fc.weight)


def test_build_from_list_allows_heterogeneous_members():
    a, b = nn.Linear(2, 1), nn.Linear(3, 1)
    cohort = Cohort([a, b])
    assert len(cohort) == 2
    assert cohort[0] is a and cohort[1] is b
    assert not cohort.is_homogeneous
    assert list(cohort) == [a, b]


def test_build_from_list_with_matching_size():
    cohort = Cohort([nn.Linear(2, 1), nn.Linear(2, 1)], size=2)
    assert len(cohort) == 2 and cohort.is_homogeneous


def test_list_size_disagreement_raises():
    with pytest.raises(ValueError, match="size=3 but 2 members were given"):
        Cohort([nn.Linear(2, 1), nn.Linear(2, 1)], size=3)


@pytest.mark.parametrize("members", [Tiny, Tiny()], ids=["class", "instance"])
def test_size_missing_raises(members):
    with pytest.raises(ValueError, match="size is required"):
        Cohort(members)


@pytest.mark.parametrize("size", [0, -1, True, False, 2.0, "2"])
def test_bad_size_raises(size):
    with pytest.raises(ValueError, match="cohort size must be an int >= 1"):
        Cohort(Tiny, size=size)


def test_empty_list_raises():
    with pytest.raises(ValueError, match="at least one member, got an empty list"):
        Cohort([])


def test_non_module_member_raises():
    with pytest.raises(TypeError, match="member 1 must be an nn.Module, got str"):
        Cohort([nn.Linear(2, 1), "not a module"])


def test_factory_returning_non_module_raises():
    with pytest.raises(TypeError, match="factory must return an nn.Module"):
        Cohort(lambda: 3, size=2)


def test_non_callable_non_module_raises():
    with pytest.raises(TypeError, match="members must be an nn.Module"):
        Cohort(42, size=2)


def test_same_module_twice_raises_shared_storage():
    m = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"members 0 and 1 share storage \('weight' and 'weight'\)"):
        Cohort([m, m])


def test_members_sharing_a_parameter_raise():
    a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    b.bias = a.bias
    with pytest.raises(ValueError, match=r"members 0 and 1 share storage \('bias' and 'bias'\)"):
        Cohort([a, b])


def test_tied_weights_within_one_member_are_allowed():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2, bias=False)
            self.b = nn.Linear(2, 2, bias=False)
            self.b.weight = self.a.weight

    cohort = Cohort(Tied(), size=2)
    assert len(cohort) == 2


# ----------------------------------------------------------------- container
def test_index_out_of_range_raises():
    cohort = Cohort(Tiny, size=3)
    assert cohort[-1] is cohort.members[2]
    for bad in (3, -4, 10):
        with pytest.raises(IndexError, match=r"member index must be an int in \[0, 2\]"):
            cohort[bad]
    with pytest.raises(IndexError):
        cohort[True]
    with pytest.raises(IndexError):
        cohort.member_state(3)
    with pytest.raises(IndexError):
        cohort.broadcast(5)
    with pytest.raises(IndexError):
        cohort.average(members=[0, 3])
    with pytest.raises(IndexError):
        cohort.lerp(toward=-5)


def test_forward_stacks_member_outputs():
    cohort = Cohort(lambda: nn.Linear(2, 3), size=4)
    x = torch.randn(5, 2)
    out = cohort(x)
    assert out.shape == (4, 5, 3)
    for i, member in enumerate(cohort):
        assert torch.equal(out[i], member(x))


def test_check_compatible_subset():
    cohort = Cohort([nn.Linear(2, 1), nn.Linear(2, 1), nn.Linear(3, 1)])
    cohort.check_compatible([0, 1])
    with pytest.raises(CohortMismatchError, match="members 0 and 2 differ at 'weight'"):
        cohort.check_compatible()


# ----------------------------------------------------------------- arithmetic
def test_average_hand_computation_including_batchnorm_buffers():
    cohort = Cohort(Tiny, size=3)
    states = _fill(cohort)
    ids = _param_ids(cohort)
    cohort.average()
    for i in range(3):
        got = cohort.member_state(i)
        for name in states[0]:
            if name.endswith("num_batches_tracked"):
                # integers cannot be averaged: taken from the first member
                assert got[name].item() == states[0][name].item()
            else:
                expected = (states[0][name] + states[1][name] + states[2][name]) / 3
                torch.testing.assert_close(got[name], expected)
    # running_mean really moved (it is not the first member's value any more)
    assert not torch.equal(cohort[0].bn.running_mean, states[0]["bn.running_mean"])
    assert _param_ids(cohort) == ids


def test_weighted_average_subset_into_other_member():
    cohort = Cohort(Tiny, size=3)
    states = _fill(cohort)
    cohort.average(weights=[1.0, 3.0], members=[0, 1], into=[2])
    for name in states[0]:
        if states[0][name].is_floating_point():
            torch.testing.assert_close(cohort.member_state(2)[name], 0.25 * states[0][name] + 0.75 * states[1][name])
        else:
            assert cohort.member_state(2)[name].item() == states[0][name].item()
    # members 0 and 1 are untouched
    for i in (0, 1):
        for name, t in cohort.member_state(i).items():
            assert torch.equal(t, states[i][name])


def test_average_bad_weights_raise():
    cohort = Cohort(Tiny, size=2)
    with pytest.raises(ValueError, match=r"one entry per member \(2\)"):
        cohort.average(weights=[1.0])
    with pytest.raises(ValueError, match="positive sum"):
        cohort.average(weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        cohort.average(weights=[math.nan, 1.0])
    with pytest.raises(ValueError, match="at least one member index"):
        cohort.average(members=[])


def test_weighted_sum_hand_computation():
    cohort = Cohort(Tiny, size=3)
    states = _fill(cohort)
    cohort.weighted_sum([2.0, -1.0], members=[0, 1], into=[0, 2])
    for i in (0, 2):
        got = cohort.member_state(i)
        for name in states[0]:
            if states[0][name].is_floating_point():
                torch.testing.assert_close(got[name], 2.0 * states[0][name] - states[1][name])
            else:
                assert got[name].item() == states[0][name].item()
    for name, t in cohort.member_state(1).items():
        assert torch.equal(t, states[1][name])


def test_weighted_sum_default_into_is_members():
    cohort = Cohort(lambda: nn.Linear(2, 1), size=3)
    states = _fill(cohort)
    cohort.weighted_sum([1.0, 1.0], members=[1, 2])
    expected = states[1]["weight"] + states[2]["weight"]
    assert torch.equal(cohort[1].weight.detach(), expected)
    assert torch.equal(cohort[2].weight.detach(), expected)
    assert torch.equal(cohort[0].weight.detach(), states[0]["weight"])


def test_lerp_hand_computation_moves_running_mean_not_counter():
    cohort = Cohort(Tiny, size=3)
    states = _fill(cohort)
    ids = _param_ids(cohort)
    cohort.lerp(toward=1, alpha=0.25)
    for i in (0, 2):
        got = cohort.member_state(i)
        for name in states[0]:
            if name.endswith("num_batches_tracked"):
                assert got[name].item() == states[i][name].item()  # the member's own counter
            else:
                torch.testing.assert_close(got[name], 0.25 * states[1][name] + 0.75 * states[i][name])
    assert not torch.equal(cohort[0].bn.running_mean, states[0]["bn.running_mean"])
    assert cohort[0].bn.num_batches_tracked.item() == states[0]["bn.num_batches_tracked"].item()
    assert cohort[0].bn.num_batches_tracked.item() != states[1]["bn.num_batches_tracked"].item()
    for name, t in cohort.member_state(1).items():  # the target does not move
        assert torch.equal(t, states[1][name])
    assert _param_ids(cohort) == ids


def test_lerp_subset_only_moves_listed_members():
    cohort = Cohort(lambda: nn.Linear(2, 1), size=3)
    states = _fill(cohort)
    cohort.lerp(toward=0, members=[2], alpha=1.0)
    assert torch.equal(cohort[2].weight.detach(), states[0]["weight"])
    assert torch.equal(cohort[1].weight.detach(), states[1]["weight"])


def test_lerp_member_equal_to_target_is_ignored():
    cohort = Cohort(lambda: nn.Linear(2, 1), size=2)
    states = _fill(cohort)
    cohort.lerp(toward=0, members=[0, 1], alpha=0.5)
    assert torch.equal(cohort[0].weight.detach(), states[0]["weight"])
    torch.testing.assert_close(cohort[1].weight.detach(), 0.5 * (states[0]["weight"] + states[1]["weight"]))


def test_lerp_duplicate_members_raise_and_change_nothing():
    cohort = Cohort(lambda: nn.Linear(2, 1), size=3)
    states = _fill(cohort)
    with pytest.raises(ValueError, match=r"members must be distinct, got \[1, 1\]"):
        cohort.lerp(toward=0, members=[1, 1], alpha=0.5)
    with pytest.raises(ValueError, match="members must be distinct"):
        cohort.lerp(toward=0, members=[2, -1], alpha=0.5)  # -1 is member 2
    for i in range(3):
        for name, t in cohort.member_state(i).items():
            assert torch.equal(t, states[i][name])


@pytest.mark.parametrize("alpha", [-0.1, 1.5, math.nan])
def test_lerp_alpha_out_of_range_raises(alpha):
    cohort = Cohort(lambda: nn.Linear(2, 1), size=2)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        cohort.lerp(toward=0, alpha=alpha)


def test_broadcast_copies_everything_including_integer_buffers():
    cohort = Cohort(Tiny, size=3)
    states = _fill(cohort)
    ids = _param_ids(cohort)
    cohort.broadcast(1)
    for i in range(3):
        for name, t in cohort.member_state(i).items():
            assert torch.equal(t, states[1][name])
    assert _param_ids(cohort) == ids
    # copies, not aliases
    with torch.no_grad():
        cohort[0].fc.weight.add_(1.0)
    assert not torch.equal(cohort[0].fc.weight, cohort[2].fc.weight)


def test_broadcast_to_subset():
    cohort = Cohort(lambda: nn.Linear(2, 1), size=3)
    states = _fill(cohort)
    cohort.broadcast(2, to=[0])
    assert torch.equal(cohort[0].weight.detach(), states[2]["weight"])
    assert torch.equal(cohort[1].weight.detach(), states[1]["weight"])


def test_optimizer_stays_valid_after_arithmetic():
    cohort = Cohort(lambda: nn.Linear(2, 1), size=2)
    opt = torch.optim.SGD(cohort[0].parameters(), lr=1.0)
    params = list(cohort[0].parameters())
    cohort.average()
    cohort.broadcast(1)
    cohort.lerp(toward=0, alpha=0.5)
    assert all(a is b for a, b in zip(params, cohort[0].parameters()))
    assert all(p.requires_grad and p.is_leaf for p in cohort[0].parameters())
    before = cohort[0].weight.detach().clone()
    cohort[0](torch.ones(1, 2)).sum().backward()
    opt.step()
    # the optimizer's step reached the live parameter of member 0
    torch.testing.assert_close(cohort[0].weight.detach(), before - 1.0)


def test_heterogeneous_arithmetic_error_names_members_and_tensor():
    cohort = Cohort([nn.Linear(2, 1), nn.Linear(3, 1)])
    before = [cohort.member_state(i) for i in range(2)]
    for op in (
        lambda: cohort.average(),
        lambda: cohort.weighted_sum([1.0, 1.0]),
        lambda: cohort.lerp(toward=0),
        lambda: cohort.broadcast(0),
    ):
        with pytest.raises(CohortMismatchError, match=r"members 0 and 1 differ at 'weight': shape \(1, 2\) vs \(1, 3\)"):
            op()
    for i in range(2):
        for name, t in cohort.member_state(i).items():
            assert torch.equal(t, before[i][name])


def test_heterogeneous_compatible_subset_can_be_combined():
    cohort = Cohort([nn.Linear(2, 1), nn.Linear(3, 1), nn.Linear(2, 1)])
    states = _fill(cohort)
    cohort.average(members=[0, 2])
    torch.testing.assert_close(cohort[0].weight.detach(), (states[0]["weight"] + states[2]["weight"]) / 2)
    assert torch.equal(cohort[1].weight.detach(), states[1]["weight"])
    with pytest.raises(CohortMismatchError, match="members 0 and 1 differ at 'weight'"):
        cohort.broadcast(0, to=[1])


def test_dtype_mismatch_error():
    cohort = Cohort([nn.Linear(2, 1), nn.Linear(2, 1).double()])
    with pytest.raises(CohortMismatchError, match="members 0 and 1 differ at 'weight': dtype torch.float32 vs torch.float64"):
        cohort.average()


def test_missing_tensor_error():
    cohort = Cohort([nn.Linear(2, 1), nn.Linear(2, 1, bias=False)])
    with pytest.raises(CohortMismatchError, match="members 0 and 1 differ at 'bias': present in member 0, missing in member 1"):
        cohort.average()


# ----------------------------------------------------------------- member state
def test_member_state_returns_detached_copies():
    cohort = Cohort(Tiny, size=2)
    state = cohort.member_state(0)
    assert list(state) == list(cohort[0].state_dict())
    original = cohort[0].fc.weight.detach().clone()
    state["fc.weight"].add_(5.0)
    state["bn.num_batches_tracked"].add_(3)
    assert torch.equal(cohort[0].fc.weight.detach(), original)
    assert cohort[0].bn.num_batches_tracked.item() == 0
    assert not state["fc.weight"].requires_grad


def test_load_member_state_round_trip_keeps_identity():
    cohort = Cohort(Tiny, size=2)
    states = _fill(cohort)
    ids = _param_ids(cohort)
    cohort.load_member_state(0, states[1])
    for name, t in cohort.member_state(0).items():
        assert torch.equal(t, states[1][name])
    assert _param_ids(cohort) == ids
    # loaded by copy: changing the source afterwards changes nothing
    states[1]["fc.weight"].add_(1.0)
    assert not torch.equal(cohort[0].fc.weight.detach(), states[1]["fc.weight"])


def _bad_states(good: dict[str, torch.Tensor]):
    bad_shape = dict(good, **{"bn.weight": torch.zeros(3)})
    bad_dtype = dict(good, **{"bn.bias": good["bn.bias"].double()})
    bad_int_dtype = dict(good, **{"bn.num_batches_tracked": torch.tensor(1, dtype=torch.int32)})
    missing = {k: v for k, v in good.items() if k != "bn.running_var"}
    extra = dict(good, **{"bn.extra": torch.zeros(2)})
    nan = dict(good, **{"bn.running_mean": torch.tensor([0.0, math.nan])})
    inf = dict(good, **{"bn.running_var": torch.tensor([math.inf, 1.0])})
    return [
        ("shape", bad_shape, CohortMismatchError, r"state for member 1 does not fit at 'bn.weight': got \(3,\)"),
        ("dtype", bad_dtype, CohortMismatchError, r"does not fit at 'bn.bias'.*torch.float64"),
        ("int-dtype", bad_int_dtype, CohortMismatchError, r"does not fit at 'bn.num_batches_tracked'"),
        ("missing", missing, CohortMismatchError, r"missing \['bn.running_var'\]"),
        ("extra", extra, CohortMismatchError, r"unexpected \['bn.extra'\]"),
        ("nan", nan, ValueError, r"NaN/Inf values in 'bn.running_mean'"),
        ("inf", inf, ValueError, r"NaN/Inf values in 'bn.running_var'"),
    ]


@pytest.mark.parametrize("case", range(7), ids=["shape", "dtype", "int-dtype", "missing", "extra", "nan", "inf"])
def test_load_member_state_bad_state_leaves_member_unchanged(case):
    cohort = Cohort(Tiny, size=2)
    states = _fill(cohort)
    # Differs from member 1 everywhere; the bad entry is not the first tensor,
    # so a loader that wrote while checking would already have changed some.
    good = {k: v + 1 for k, v in states[0].items()}
    _, bad, exc, match = _bad_states(good)[case]
    before = cohort.member_state(1)
    with pytest.raises(exc, match=match):
        cohort.load_member_state(1, bad)
    after = cohort.member_state(1)
    assert list(after) == list(before)
    for name in before:
        assert torch.equal(after[name], before[name])


def test_load_member_state_allow_nonfinite():
    cohort = Cohort(lambda: nn.Linear(2, 1), size=1)
    state = cohort.member_state(0)
    state["bias"] = torch.tensor([math.nan])
    cohort.load_member_state(0, state, allow_nonfinite=True)
    assert math.isnan(cohort[0].bias.item())


def test_load_member_state_accepts_reordered_keys():
    cohort = Cohort(lambda: nn.Linear(2, 1), size=2)
    states = _fill(cohort)
    reordered = dict(reversed(list(states[1].items())))  # bias, weight
    cohort.load_member_state(0, reordered)
    assert torch.equal(cohort[0].weight.detach(), states[1]["weight"])
    assert torch.equal(cohort[0].bias.detach(), states[1]["bias"])


def test_cohort_is_a_module_with_all_member_parameters():
    cohort = Cohort(Tiny, size=2)
    assert len(list(cohort.parameters())) == 2 * len(list(Tiny().parameters()))
    sd = cohort.state_dict()
    assert "members.1.bn.running_mean" in sd
    clone = copy.deepcopy(cohort)
    assert torch.equal(clone[1].fc.weight, cohort[1].fc.weight)


def test_member_indices_are_integers_and_states_are_tensor_mappings():
    import numpy as np

    torch.manual_seed(0)
    c = Cohort(lambda: nn.Linear(2, 1), size=3)
    before = [m.weight.detach().clone() for m in c]
    for bad in ([0, 1.7], [True, False], ["0", "2"]):
        with pytest.raises(IndexError, match=r"member index must be an int in \[0, 2\] \(or -3\.\.-1 from the end\), got "):
            c.average(members=bad)
    assert all(torch.equal(b, m.weight) for b, m in zip(before, c))  # nothing averaged
    c.average(members=[np.int64(0), torch.tensor(2)])  # numpy and 0-d tensor integers are indices
    assert torch.equal(c[0].weight, c[2].weight)
    state = c.member_state(0)
    c.load_member_state(np.int64(1), state)
    assert torch.equal(c[1].weight, c[0].weight)
    for bad, message in (
        ([state["weight"], state["bias"]], "must be a mapping of name -> Tensor (a state_dict), got list"),
        (None, "must be a mapping of name -> Tensor (a state_dict), got NoneType"),
        ({"weight": np.ones((1, 2), np.float32), "bias": np.ones(1, np.float32)}, "'weight' must be a torch.Tensor, got ndarray"),
        ({"weight": [[1.0, 1.0]], "bias": [1.0]}, "'weight' must be a torch.Tensor, got list"),
    ):
        with pytest.raises(TypeError, match=rf"state for member 2.*{re.escape(message)}"):
            c.load_member_state(2, bad)
