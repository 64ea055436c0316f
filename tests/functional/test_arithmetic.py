"""Tests for lightning_colearn.functional.arithmetic (pure tensor arithmetic on member states)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_colearn.functional import (
    CohortMismatchError,
    check_same_structure,
    copy_,
    is_finite,
    lerp_,
    weighted_average,
    weighted_sum,
)


def _states():
    a = [torch.tensor([1.0, 2.0]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor(7)]
    b = [torch.tensor([3.0, -2.0]), torch.tensor([[2.0, 2.0], [4.0, 0.0]]), torch.tensor(11)]
    c = [torch.tensor([0.0, 5.0]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor(13)]
    return a, b, c


# ------------------------------------------------------------------ weighted_sum
def test_weighted_sum_matches_hand_computation():
    a, b, c = _states()
    out = weighted_sum([a, b, c], [2.0, -1.0, 0.5])
    # 2*[1,2] - [3,-2] + 0.5*[0,5] = [-1, 8.5]
    torch.testing.assert_close(out[0], torch.tensor([-1.0, 8.5]))
    # 2*I - [[2,2],[4,0]] + 0.5*[[0,1],[1,0]] = [[0,-1.5],[-3.5,2]]
    torch.testing.assert_close(out[1], torch.tensor([[0.0, -1.5], [-3.5, 2.0]]))


def test_weighted_sum_returns_new_tensors_and_keeps_inputs():
    a, b, _ = _states()
    before = [t.clone() for t in a]
    out = weighted_sum([a, b], [1.0, 0.0])
    for o, t, orig in zip(out, a, before):
        assert o.data_ptr() != t.data_ptr()
        assert torch.equal(t, orig)
    out[0].add_(100.0)
    assert torch.equal(a[0], before[0])


def test_weighted_sum_integer_buffers_taken_from_first_state():
    a, b, c = _states()
    out = weighted_sum([a, b, c], [0.0, 1.0, 1.0])
    assert out[2].dtype == torch.int64
    assert out[2].item() == 7  # from a, not 0*7 + 11 + 13
    out_b = weighted_sum([b, a], [1.0, 1.0])
    assert out_b[2].item() == 11


def test_weighted_sum_bool_buffer_taken_from_first_state():
    out = weighted_sum([[torch.tensor([True, False])], [torch.tensor([False, True])]], [1.0, 1.0])
    assert out[0].dtype == torch.bool
    assert out[0].tolist() == [True, False]


def test_weighted_sum_preserves_dtype_and_accumulates_in_float64():
    # In float32, 1e8 + 1 rounds back to 1e8 (spacing 8), so 1e8 + 1 - 1e8 would be 0;
    # the float64 accumulator keeps the 1, and the result is cast back to float32.
    x = [torch.tensor([1e8], dtype=torch.float32)]
    y = [torch.tensor([1.0], dtype=torch.float32)]
    out = weighted_sum([x, y, x], [1.0, 1.0, -1.0])
    assert out[0].dtype == torch.float32
    assert out[0].item() == 1.0  # float32 left-to-right would give 0.0 (1e8 + 1 rounds to 1e8)


def test_weighted_sum_float16_roundtrip_dtype():
    out = weighted_sum([[torch.tensor([1.0], dtype=torch.float16)], [torch.tensor([3.0], dtype=torch.float16)]], [0.5, 0.5])
    assert out[0].dtype == torch.float16
    assert out[0].item() == 2.0


def test_weighted_sum_accepts_tensor_weights():
    a, b, _ = _states()
    out = weighted_sum([a, b], torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(out[0], torch.tensor([2.5, -1.0]))


@pytest.mark.parametrize(
    "weights",
    [[1.0], [1.0, 2.0, 3.0], [[1.0, 1.0]], []],
    ids=["too-short", "too-long", "2d", "empty"],
)
def test_weighted_sum_wrong_weight_length(weights):
    a, b, _ = _states()
    with pytest.raises(ValueError, match=r"weights must have one entry per member \(2\)"):
        weighted_sum([a, b], weights)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_weighted_sum_nonfinite_weights(bad):
    a, b, _ = _states()
    with pytest.raises(ValueError, match="weights must be finite"):
        weighted_sum([a, b], [1.0, bad])


def test_weighted_sum_no_states():
    with pytest.raises(ValueError, match="at least one member state"):
        weighted_sum([], [])


def test_weighted_sum_mismatched_lengths_and_shapes():
    with pytest.raises(CohortMismatchError, match="different tensor counts"):
        weighted_sum([[torch.zeros(2)], [torch.zeros(2), torch.zeros(2)]], [1.0, 1.0])
    with pytest.raises(CohortMismatchError, match=r"shape \(2,\) and \(3,\)"):
        weighted_sum([[torch.zeros(2)], [torch.zeros(3)]], [1.0, 1.0])


# -------------------------------------------------------------- weighted_average
def test_weighted_average_uniform():
    a, b, c = _states()
    out = weighted_average([a, b, c])
    torch.testing.assert_close(out[0], torch.tensor([4.0 / 3.0, 5.0 / 3.0]))
    torch.testing.assert_close(out[1], torch.tensor([[1.0, 1.0], [5.0 / 3.0, 1.0 / 3.0]]))
    assert out[2].item() == 7


def test_weighted_average_normalises_weights():
    a, b, _ = _states()
    out = weighted_average([a, b], [1.0, 3.0])  # = 0.25 a + 0.75 b
    torch.testing.assert_close(out[0], torch.tensor([2.5, -1.0]))
    torch.testing.assert_close(out[1], torch.tensor([[1.75, 1.5], [3.0, 0.25]]))
    # Scaling the weights changes nothing.
    out2 = weighted_average([a, b], [10.0, 30.0])
    for x, y in zip(out, out2):
        assert torch.equal(x, y)


def test_weighted_average_zero_weight_member_is_ignored():
    a, b, c = _states()
    out = weighted_average([a, b, c], [0, 1, 0])
    assert torch.equal(out[0], b[0])
    assert torch.equal(out[1], b[1])


@pytest.mark.parametrize("weights", [[1.0, -1.0], [0.0, 0.0], [-1.0, -2.0], [2.0, -0.5]])
def test_weighted_average_rejects_negative_or_zero_sum(weights):
    a, b, _ = _states()
    with pytest.raises(ValueError, match=r"weights must be >= 0 with a positive sum"):
        weighted_average([a, b], weights)


def test_weighted_average_rejects_bad_length_and_nan():
    a, b, _ = _states()
    with pytest.raises(ValueError, match=r"one entry per member \(2\)"):
        weighted_average([a, b], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="weights must be finite"):
        weighted_average([a, b], [math.nan, 1.0])


def test_weighted_average_no_states():
    with pytest.raises(ValueError, match="at least one member state"):
        weighted_average([])


# ------------------------------------------------------------------------ lerp_
def test_lerp_in_place_hand_computation():
    a, b, c = _states()
    a_ptrs = [t.data_ptr() for t in a]
    source = [t.clone() for t in c]
    lerp_([a, b], source, 0.25)
    # a <- 0.25 c + 0.75 a
    torch.testing.assert_close(a[0], torch.tensor([0.75, 2.75]))
    torch.testing.assert_close(a[1], torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    torch.testing.assert_close(b[0], torch.tensor([2.25, -0.25]))
    torch.testing.assert_close(b[1], torch.tensor([[1.5, 1.75], [3.25, 0.0]]))
    # integer tensors are the member's own
    assert a[2].item() == 7 and b[2].item() == 11
    # in place, and the source is unchanged
    assert [t.data_ptr() for t in a] == a_ptrs
    for s, orig in zip(source, c):
        assert torch.equal(s, orig)


def test_lerp_alpha_zero_and_one():
    a, b, c = _states()
    a0 = [t.clone() for t in a]
    lerp_([a], b, 0.0)
    for x, y in zip(a, a0):
        assert torch.equal(x, y)
    lerp_([a], c, 1.0)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    assert a[2].item() == 7


def test_lerp_does_not_record_autograd():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    lerp_([[p]], [torch.tensor([3.0, 4.0])], 0.5)
    assert torch.equal(p.detach(), torch.tensor([2.0, 3.0]))
    assert p.grad_fn is None and p.requires_grad


def test_lerp_mismatch():
    with pytest.raises(CohortMismatchError, match="target has 1 tensors, source has 2"):
        lerp_([[torch.zeros(2)]], [torch.zeros(2), torch.zeros(2)], 0.5)
    with pytest.raises(CohortMismatchError, match=r"shape \(2,\) toward \(3,\)"):
        lerp_([[torch.zeros(2)]], [torch.zeros(3)], 0.5)


# ------------------------------------------------------------------------ copy_
def test_copy_in_place_including_integers():
    a, b, c = _states()
    ptrs = [t.data_ptr() for t in a] + [t.data_ptr() for t in b]
    copy_([a, b], c)
    for state in (a, b):
        for x, y in zip(state, c):
            assert torch.equal(x, y)
    assert a[2].item() == 13  # copy_ copies integer buffers too
    assert [t.data_ptr() for t in a] + [t.data_ptr() for t in b] == ptrs
    # copies, not aliases
    c[0].add_(1.0)
    assert not torch.equal(a[0], c[0])


def test_copy_keeps_parameter_identity():
    p = torch.nn.Parameter(torch.zeros(3))
    state = [p]
    copy_([state], [torch.tensor([1.0, 2.0, 3.0])])
    assert state[0] is p
    assert p.tolist() == [1.0, 2.0, 3.0] and p.requires_grad


def test_copy_mismatch():
    with pytest.raises(CohortMismatchError, match="target has 2 tensors, source has 1"):
        copy_([[torch.zeros(2), torch.zeros(2)]], [torch.zeros(2)])
    with pytest.raises(CohortMismatchError, match=r"shape \(3,\) into \(2,\)"):
        copy_([[torch.zeros(2)]], [torch.zeros(3)])


# --------------------------------------------------------------------- is_finite
def test_is_finite():
    assert is_finite([torch.zeros(2), torch.tensor([1, 2])])
    assert not is_finite([torch.zeros(2), torch.tensor([1.0, math.nan])])
    assert not is_finite([torch.tensor([math.inf])])


# ---------------------------------------------------------- check_same_structure
def test_check_same_structure_accepts_equal_structures():
    check_same_structure({})
    check_same_structure({0: {"w": torch.zeros(2)}})
    check_same_structure({3: {"w": torch.zeros(2), "n": torch.tensor(1)}, 5: {"w": torch.ones(2), "n": torch.tensor(9)}})


def test_check_same_structure_shape_mismatch_names_members_and_tensor():
    states = {
        0: {"a": torch.zeros(2), "w": torch.zeros(2, 3)},
        2: {"a": torch.zeros(2), "w": torch.zeros(2, 3)},
        4: {"a": torch.zeros(2), "w": torch.zeros(3, 2)},
    }
    with pytest.raises(CohortMismatchError, match=r"members 0 and 4 differ at 'w': shape \(2, 3\) vs \(3, 2\)"):
        check_same_structure(states)


def test_check_same_structure_dtype_mismatch_names_members_and_tensor():
    states = {1: {"w": torch.zeros(2)}, 7: {"w": torch.zeros(2, dtype=torch.float64)}}
    with pytest.raises(CohortMismatchError, match=r"members 1 and 7 differ at 'w': dtype torch.float32 vs torch.float64"):
        check_same_structure(states)


def test_check_same_structure_missing_key_names_members_and_tensor():
    states = {0: {"w": torch.zeros(2), "b": torch.zeros(1)}, 1: {"w": torch.zeros(2)}}
    with pytest.raises(CohortMismatchError, match=r"members 0 and 1 differ at 'b': present in member 0, missing in member 1"):
        check_same_structure(states)


def test_check_same_structure_extra_key_names_members_and_tensor():
    states = {0: {"w": torch.zeros(2)}, 1: {"w": torch.zeros(2), "extra": torch.zeros(1)}}
    with pytest.raises(CohortMismatchError, match=r"members 0 and 1 differ at 'extra': present in member 1, missing in member 0"):
        check_same_structure(states)


def test_check_same_structure_order_mismatch():
    states = {0: {"w": torch.zeros(2), "b": torch.zeros(1)}, 1: {"b": torch.zeros(1), "w": torch.zeros(2)}}
    with pytest.raises(CohortMismatchError, match="members 0 and 1 differ at the order of their tensors"):
        check_same_structure(states)


def test_cohort_mismatch_error_is_value_error():
    assert issubclass(CohortMismatchError, ValueError)
