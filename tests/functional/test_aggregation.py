"""Tests for lightning_colearn.functional.aggregation (FedAvg, median, trimmed mean, Krum, Bulyan, q-FedAvg, FedProx)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from lightning_colearn.functional.aggregation import (
    AGGREGATORS,
    aggregate,
    bulyan,
    coordinate_median,
    fedavg,
    fedprox_term,
    krum,
    qfedavg,
    trimmed_mean,
)
from lightning_colearn.functional.arithmetic import CohortMismatchError, weighted_average

# Five clients, each with a 2-vector, a 1x2 matrix and an integer step counter.
A = [1.0, 2.0, 3.0, 4.0, 10.0]
B = [5.0, -1.0, 0.0, 2.0, 3.0]


def _updates(n: int = 5) -> list[list[torch.Tensor]]:
    return [
        [torch.tensor([A[i], B[i]]), torch.tensor([[B[i], A[i]]]), torch.tensor(100 + i)]
        for i in range(n)
    ]


def _scalar_updates(values) -> list[list[torch.Tensor]]:
    return [[torch.tensor([float(v)])] for v in values]


# ----------------------------------------------------------------------- fedavg
def test_fedavg_equal_weights_hand_computation():
    out = fedavg(_updates())
    # A: (1+2+3+4+10)/5 = 4; B: (5-1+0+2+3)/5 = 1.8
    torch.testing.assert_close(out[0], torch.tensor([4.0, 1.8]))
    torch.testing.assert_close(out[1], torch.tensor([[1.8, 4.0]]))
    assert out[2].item() == 100


def test_fedavg_weighted_by_sample_counts():
    out = fedavg(_updates(), weights=[1, 1, 1, 1, 4])
    # A: (1+2+3+4+4*10)/8 = 6.25; B: (5-1+0+2+4*3)/8 = 2.25
    torch.testing.assert_close(out[0], torch.tensor([6.25, 2.25]))
    torch.testing.assert_close(out[1], torch.tensor([[2.25, 6.25]]))
    # Only ratios matter, and a tensor of weights works as well as a list.
    again = fedavg(_updates(), weights=torch.tensor([10.0, 10.0, 10.0, 10.0, 40.0]))
    assert torch.equal(again[0], out[0])


def test_fedavg_matches_weighted_average():
    g = torch.Generator().manual_seed(0)
    updates = [[torch.randn(3, 4, generator=g), torch.randn(2, generator=g)] for _ in range(6)]
    weights = torch.rand(6, generator=g) * 100
    for x, y in zip(fedavg(updates, weights), weighted_average(updates, weights)):
        torch.testing.assert_close(x, y)


def test_fedavg_zero_weight_client_is_left_out_even_if_nan():
    updates = _scalar_updates([1.0, 3.0, math.nan])
    out = fedavg(updates, weights=[1, 1, 0])
    torch.testing.assert_close(out[0], torch.tensor([2.0]))


def test_fedavg_single_client_is_a_copy():
    (update,) = _updates(1)
    out = fedavg([update])
    for o, t in zip(out, update):
        assert torch.equal(o, t) and o.data_ptr() != t.data_ptr()


# ------------------------------------------------------------ coordinate_median
def test_coordinate_median_odd_hand_computation():
    out = coordinate_median(_updates())
    # A sorted 1,2,3,4,10 -> 3; B sorted -1,0,2,3,5 -> 2
    torch.testing.assert_close(out[0], torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(out[1], torch.tensor([[2.0, 3.0]]))
    assert out[2].item() == 100


def test_coordinate_median_even_is_mean_of_the_two_middle_values():
    out = coordinate_median(_updates(4))
    # A: 1,2,3,4 -> 2.5; B: -1,0,2,5 -> 1
    torch.testing.assert_close(out[0], torch.tensor([2.5, 1.0]))


def test_coordinate_median_matches_torch_median_for_odd_n():
    g = torch.Generator().manual_seed(1)
    updates = [[torch.randn(5, 3, generator=g)] for _ in range(7)]
    expected = torch.stack([u[0] for u in updates]).median(dim=0).values
    assert torch.equal(coordinate_median(updates)[0], expected)


# ------------------------------------------------------------------ trimmed_mean
@pytest.mark.parametrize(
    ("trim_ratio", "expected_a", "expected_b"),
    [
        (0.0, 4.0, 1.8),  # k = 0: the plain mean
        (0.1, 4.0, 1.8),  # k = floor(0.5) = 0: nothing trimmed with 5 clients
        (0.2, 3.0, 5.0 / 3.0),  # k = 1: A keeps 2,3,4; B keeps 0,2,3
        (0.4, 3.0, 2.0),  # k = 2: only the median is left
        (0.49, 3.0, 2.0),  # k = floor(2.45) = 2
    ],
)
def test_trimmed_mean_hand_computation(trim_ratio, expected_a, expected_b):
    out = trimmed_mean(_updates(), trim_ratio=trim_ratio)
    torch.testing.assert_close(out[0], torch.tensor([expected_a, expected_b]))
    torch.testing.assert_close(out[1], torch.tensor([[expected_b, expected_a]]))
    assert out[2].item() == 100


def test_trimmed_mean_ten_clients():
    updates = _scalar_updates([7, -3, 0, 100, 2, 5, 1, -50, 4, 3])
    # sorted: -50 -3 0 1 2 3 4 5 7 100; k = floor(0.25 * 10) = 2 -> mean(0,1,2,3,4,5) = 2.5
    torch.testing.assert_close(trimmed_mean(updates, 0.25)[0], torch.tensor([2.5]))
    # default 0.1 -> k = 1 -> mean(-3 .. 7) = 19 / 8
    torch.testing.assert_close(trimmed_mean(updates)[0], torch.tensor([19.0 / 8.0]))


def test_trimmed_mean_matches_per_coordinate_loop():
    g = torch.Generator().manual_seed(2)
    updates = [[torch.randn(4, 2, generator=g)] for _ in range(9)]
    out = trimmed_mean(updates, 0.25)[0]
    k = 2
    stacked = torch.stack([u[0] for u in updates])
    for i in range(4):
        for j in range(2):
            values = sorted(stacked[:, i, j].tolist())
            kept = values[k : len(values) - k]
            assert out[i, j].item() == pytest.approx(sum(kept) / len(kept), rel=1e-6)


# -------------------------------------------------------------------------- krum
KRUM_POINTS = [0.0, 1.0, 1.3, 1.1, 10.0]
# n=5, f=1: each score sums the 2 nearest squared distances.
# 0: 1 + 1.21 = 2.21; 1: 0.01 + 0.09 = 0.10; 2: 0.04 + 0.09 = 0.13; 3: 0.01 + 0.04 = 0.05; 4: 75.69 + 79.21 = 154.9
# so the order is 3, 1, 2, 0, 4.


def test_krum_selects_the_most_central_update():
    out, chosen = krum(_scalar_updates(KRUM_POINTS), num_byzantine=1)
    assert chosen == [3]
    torch.testing.assert_close(out[0], torch.tensor([1.1]))


def test_multi_krum_averages_the_chosen_updates_in_score_order():
    out, chosen = krum(_scalar_updates(KRUM_POINTS), num_byzantine=1, multi=3)
    assert chosen == [3, 1, 2]
    torch.testing.assert_close(out[0], torch.tensor([(1.1 + 1.0 + 1.3) / 3]))
    out, chosen = krum(_scalar_updates(KRUM_POINTS), num_byzantine=1, multi=5)
    assert chosen == [3, 1, 2, 0, 4]
    torch.testing.assert_close(out[0], torch.tensor([sum(KRUM_POINTS) / 5]))


def test_krum_scores_use_all_floating_tensors_together():
    # Tensor 0 alone makes client 0 central (score 1 + 1); tensor 1 puts it far away, and the sum decides.
    updates = [
        [torch.tensor([0.0]), torch.tensor([50.0]), torch.tensor(7)],
        [torch.tensor([-1.0]), torch.tensor([0.0]), torch.tensor(8)],
        [torch.tensor([1.0]), torch.tensor([0.3]), torch.tensor(9)],
        [torch.tensor([-2.0]), torch.tensor([0.2]), torch.tensor(10)],
        [torch.tensor([2.0]), torch.tensor([-0.1]), torch.tensor(11)],
    ]
    out, chosen = krum(updates, num_byzantine=1)
    assert chosen != [0]
    # client 1: neighbours 3 (1 + 0.04) and 2 (4 + 0.09) -> 5.13; client 2: 4 (1 + 0.16) and 1 (4.09) -> 5.25
    assert chosen == [1]
    assert out[2].item() == 7  # integer tensors come from the first update, not the chosen one


def test_krum_matches_a_brute_force_oracle():
    g = torch.Generator().manual_seed(3)
    n, f = 8, 2
    updates = [[torch.randn(3, 2, generator=g), torch.randn(4, generator=g)] for _ in range(n)]
    flat = [torch.cat([t.flatten() for t in u]).double() for u in updates]
    scores = []
    for i in range(n):
        d = sorted(float(((flat[i] - flat[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    order = sorted(range(n), key=lambda i: scores[i])
    _, chosen = krum(updates, num_byzantine=f, multi=n)
    assert chosen == order
    out, chosen = krum(updates, num_byzantine=f, multi=3)
    assert chosen == order[:3]
    torch.testing.assert_close(out[0], torch.stack([updates[i][0] for i in order[:3]]).mean(0))


def test_krum_num_byzantine_zero_needs_three_clients():
    # n - f - 2 = 1 neighbour: scores 1, 1, 16 -> a tie between clients 0 and 1, the lower index wins
    out, chosen = krum(_scalar_updates([0.0, 1.0, 5.0]), num_byzantine=0)
    assert chosen == [0]
    torch.testing.assert_close(out[0], torch.tensor([0.0]))
    assert krum(_scalar_updates([0.0, 1.0, 5.0]), num_byzantine=0, multi=3)[1] == [0, 1, 2]


# ---------------------------------------------------------------------- aggregate
def test_aggregate_dispatches_to_each_method():
    updates = _scalar_updates(KRUM_POINTS)
    weights = [1, 2, 3, 4, 5]
    assert AGGREGATORS == ("fedavg", "median", "trimmed_mean", "krum", "multi_krum", "bulyan")
    assert torch.equal(aggregate(updates)[0], fedavg(updates)[0])
    assert torch.equal(aggregate(updates, "fedavg", weights)[0], fedavg(updates, weights)[0])
    assert torch.equal(aggregate(updates, "median", weights)[0], coordinate_median(updates)[0])
    assert torch.equal(aggregate(updates, "trimmed_mean", trim_ratio=0.2)[0], trimmed_mean(updates, 0.2)[0])
    assert torch.equal(aggregate(updates, "krum", num_byzantine=1)[0], torch.tensor([1.1]))
    # multi_krum defaults to n - f = 4 updates: 3, 1, 2, 0
    torch.testing.assert_close(aggregate(updates, "multi_krum", num_byzantine=1)[0], torch.tensor([3.4 / 4]))
    torch.testing.assert_close(aggregate(updates, "multi_krum", num_byzantine=1, multi=2)[0], torch.tensor([1.05]))


def test_aggregate_robust_methods_still_check_weights():
    with pytest.raises(ValueError, match="weights must be >= 0"):
        aggregate(_scalar_updates(KRUM_POINTS), "median", weights=[1, 1, 1, 1, -1])


# ---------------------------------------------------------------- robustness
HONEST = [[1.0, -2.0, 0.5], [1.2, -1.8, 0.4], [0.9, -2.1, 0.6], [1.1, -2.2, 0.5]]
HONEST_MEAN = torch.tensor([sum(col) / len(col) for col in zip(*HONEST)])


@pytest.mark.parametrize("bad", [1e30, -1e30, math.nan, math.inf], ids=["huge", "-huge", "nan", "inf"])
@pytest.mark.parametrize("position", [0, 2, 4])
def test_robust_methods_tolerate_one_faulty_client_fedavg_does_not(bad, position):
    rows = [list(r) for r in HONEST]
    rows.insert(position, [1.0, bad, 0.5])  # only one coordinate is corrupted
    updates = [[torch.tensor(r)] for r in rows]
    for result in (
        coordinate_median(updates),
        trimmed_mean(updates, trim_ratio=0.2),
        krum(updates, num_byzantine=1)[0],
        aggregate(updates, "multi_krum", num_byzantine=1),
    ):
        assert torch.isfinite(result[0]).all()
        torch.testing.assert_close(result[0], HONEST_MEAN, atol=0.2, rtol=0)
    _, chosen = krum(updates, num_byzantine=1, multi=4)
    assert position not in chosen
    ruined = fedavg(updates)[0][1]
    assert not torch.isfinite(ruined) or abs(ruined) > 1e20


def test_robust_methods_tolerate_a_huge_and_a_nan_client_together():
    rows = [*HONEST, [1.0, -2.0, 0.45]]
    honest_mean = torch.tensor([sum(col) / len(col) for col in zip(*rows)])
    updates = [[torch.tensor(r)] for r in rows]
    updates.insert(1, [torch.full((3,), 1e30)])
    updates.insert(4, [torch.tensor([math.nan, 0.0, math.nan])])
    median = coordinate_median(updates)[0]
    trimmed = trimmed_mean(updates, trim_ratio=0.3)  # k = 2 of 7
    multi, chosen = krum(updates, num_byzantine=2, multi=5)
    assert sorted(chosen) == [0, 2, 3, 5, 6]
    torch.testing.assert_close(multi[0], honest_mean)  # exactly the honest clients
    torch.testing.assert_close(median, honest_mean, atol=0.2, rtol=0)
    torch.testing.assert_close(trimmed[0], honest_mean, atol=0.2, rtol=0)
    torch.testing.assert_close(krum(updates, num_byzantine=2)[0][0], honest_mean, atol=0.2, rtol=0)
    ruined = fedavg(updates)[0]
    assert torch.isnan(ruined[0]) and ruined[1] > 1e28


def test_median_treats_nan_as_plus_inf():
    # 0, 1, 2, NaN -> NaN sorts last: middle values 1 and 2 (ignoring NaN would give the median of 0,1,2 = 1).
    out = coordinate_median(_scalar_updates([math.nan, 0.0, 2.0, 1.0]))
    torch.testing.assert_close(out[0], torch.tensor([1.5]))
    # Two NaN of three: the median is +inf, never NaN.
    assert coordinate_median(_scalar_updates([math.nan, 0.0, math.nan]))[0].item() == math.inf


def test_krum_with_every_update_faulty_keeps_the_order_of_clients():
    _, chosen = krum(_scalar_updates([math.nan, math.inf, math.nan]), num_byzantine=0, multi=3)
    assert chosen == [0, 1, 2]


# --------------------------------------------------- new tensors, dtype, device
AGGREGATE_CALLS = [
    pytest.param(lambda u: fedavg(u), id="fedavg"),
    pytest.param(lambda u: fedavg(u, [1, 2, 3, 4, 5]), id="fedavg-weighted"),
    pytest.param(coordinate_median, id="median"),
    pytest.param(lambda u: trimmed_mean(u, 0.2), id="trimmed_mean"),
    pytest.param(lambda u: krum(u, 1)[0], id="krum"),
    pytest.param(lambda u: krum(u, 1, multi=3)[0], id="multi_krum"),
    pytest.param(lambda u: krum(u, 1, multi=3, weights=[1, 2, 3, 4, 5], krum_weighting="samples")[0],
                 id="multi_krum-samples"),
    pytest.param(lambda u: bulyan(u, 0)[0], id="bulyan"),
    pytest.param(lambda u: bulyan(u, 0, weights=[1, 2, 3, 4, 5])[0], id="bulyan-weighted"),
    pytest.param(lambda u: qfedavg(u[1], u, [1.0, 2.0, 0.5, 3.0, 1.5], q=2.0, lipschitz=10.0), id="qfedavg"),
]


@pytest.mark.parametrize("call", AGGREGATE_CALLS)
def test_results_are_new_tensors_and_inputs_are_unchanged(call):
    updates = _updates()
    before = [[t.clone() for t in u] for u in updates]
    out = call(updates)
    assert len(out) == 3
    for o, t in zip(out, updates[0]):
        assert o.data_ptr() != t.data_ptr()
        assert o.dtype == t.dtype and o.shape == t.shape and o.device == t.device
    for o in out:
        o.add_(1)
    for u, b in zip(updates, before):
        for t, orig in zip(u, b):
            assert torch.equal(t, orig)


@pytest.mark.parametrize("call", AGGREGATE_CALLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_results_keep_the_dtype(call, dtype):
    updates = [[t.to(dtype) if t.is_floating_point() else t for t in u] for u in _updates()]
    out = call(updates)
    assert out[0].dtype == dtype and out[1].dtype == dtype and out[2].dtype == torch.int64


@pytest.mark.parametrize("call", AGGREGATE_CALLS)
def test_results_carry_no_autograd_history(call):
    updates = [[torch.nn.Parameter(t) if t.is_floating_point() else t for t in u] for u in _updates()]
    out = call(updates)
    assert all(not o.requires_grad and o.grad_fn is None for o in out)


@pytest.mark.parametrize("call", AGGREGATE_CALLS)
def test_non_floating_tensors_come_from_the_first_update(call):
    updates = []
    for i in range(5):
        bn = torch.nn.BatchNorm1d(2)
        with torch.no_grad():
            bn.weight.fill_(float(i))
        bn.num_batches_tracked.fill_(10 * i + 3)
        state = list(bn.state_dict().values())
        state.append(torch.tensor([i % 2 == 0, True]))
        updates.append(state)
    out = call(updates)
    assert out[4].dtype == torch.int64 and out[4].item() == 3  # num_batches_tracked of client 0
    assert out[5].dtype == torch.bool and out[5].tolist() == [True, True]
    assert out[4].data_ptr() != updates[0][4].data_ptr()


# --------------------------------------------------------------- error messages
@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: fedavg([]), "fedavg"),
        (lambda: coordinate_median([]), "coordinate_median"),
        (lambda: trimmed_mean([]), "trimmed_mean"),
        (lambda: krum([]), "krum"),
        (lambda: bulyan([]), "bulyan"),
        (lambda: qfedavg([], [], [], q=1.0, lipschitz=1.0), "qfedavg"),
        (lambda: aggregate([], "median"), "coordinate_median"),
    ],
)
def test_empty_updates(call, name):
    with pytest.raises(ValueError, match=f"{name} needs at least one update"):
        call()


@pytest.mark.parametrize(
    "fn",
    [fedavg, coordinate_median, trimmed_mean, lambda u: krum(u, 0), lambda u: bulyan(u, 0),
     lambda u: qfedavg([torch.zeros(2), torch.zeros(3)], u, [1.0] * len(u), q=1.0, lipschitz=1.0)],
    ids=["fedavg", "median", "trimmed", "krum", "bulyan", "qfedavg"],
)
def test_mismatched_clients_name_the_client_and_the_tensor(fn):
    good = [torch.zeros(2), torch.zeros(3)]
    with pytest.raises(CohortMismatchError, match=r"clients 0 and 3 differ at tensor 1: shape \(3,\) vs \(4,\)"):
        fn([good, good, good, [torch.zeros(2), torch.zeros(4)]])
    with pytest.raises(
        CohortMismatchError, match=r"clients 0 and 2 differ at tensor 0: dtype torch.float32 vs torch.float64"
    ):
        fn([good, good, [torch.zeros(2, dtype=torch.float64), torch.zeros(3)]])
    with pytest.raises(CohortMismatchError, match="clients 0 and 1 differ in tensor count: 2 vs 1"):
        fn([good, [torch.zeros(2)], good])


def test_updates_must_be_lists_of_tensors():
    with pytest.raises(TypeError, match=r"update 1 is a dict; .*list\(module.state_dict\(\).values\(\)\)"):
        fedavg([[torch.zeros(1)], {"w": torch.zeros(1)}])
    with pytest.raises(TypeError, match="update 0 is a Tensor"):
        coordinate_median([torch.zeros(3), torch.zeros(3)])
    with pytest.raises(TypeError, match="update 0 holds a float at tensor 1, expected a Tensor"):
        fedavg([[torch.zeros(1), 1.0]])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0, 1.0], r"weights must have one entry per update \(3\), got shape \(2,\)"),
        ([1.0, 1.0, 1.0, 1.0], r"weights must have one entry per update \(3\), got shape \(4,\)"),
        ([[1.0, 1.0, 1.0]], r"weights must have one entry per update \(3\), got shape \(1, 3\)"),
        ([1.0, math.nan, 1.0], r"weights must be finite, got \[1.0, nan, 1.0\]"),
        ([1.0, math.inf, 1.0], r"weights must be finite, got \[1.0, inf, 1.0\]"),
        ([1.0, -1.0, 1.0], r"weights must be >= 0 with a positive sum, got \[1.0, -1.0, 1.0\]"),
        ([0, 0, 0], r"weights must be >= 0 with a positive sum, got \[0.0, 0.0, 0.0\]"),
    ],
)
def test_bad_weights(weights, message):
    with pytest.raises(ValueError, match=message):
        fedavg(_updates(3), weights)


@pytest.mark.parametrize("trim_ratio", [-0.1, 0.5, 0.7, math.nan, "0.1", None])
def test_bad_trim_ratio(trim_ratio):
    with pytest.raises(ValueError, match=r"trim_ratio must be in \[0, 0.5\), got "):
        trimmed_mean(_updates(), trim_ratio)


@pytest.mark.parametrize(("n", "f"), [(4, 1), (6, 2), (2, 0), (1, 0)])
def test_krum_needs_enough_clients(n, f):
    with pytest.raises(ValueError, match=rf"krum needs n >= 2 \* num_byzantine \+ 3 updates, got n={n} with f={f}"):
        krum(_scalar_updates(range(n)), num_byzantine=f)
    krum(_scalar_updates(range(2 * f + 3)), num_byzantine=f)  # the smallest n that works


def test_krum_bad_arguments():
    updates = _scalar_updates(range(5))
    with pytest.raises(ValueError, match="num_byzantine must be an integer >= 0, got -1"):
        krum(updates, num_byzantine=-1)
    with pytest.raises(ValueError, match="num_byzantine must be an integer >= 0, got 1.5"):
        krum(updates, num_byzantine=1.5)
    with pytest.raises(ValueError, match="multi must be an integer >= 1, got 0"):
        krum(updates, multi=0)
    with pytest.raises(ValueError, match=r"multi must be in \[1, 5\] \(the number of updates\), got 6"):
        krum(updates, multi=6)
    with pytest.raises(ValueError, match="method 'krum' selects one update, got multi=2; use method 'multi_krum'"):
        aggregate(updates, "krum", multi=2)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(
        ValueError,
        match="unknown aggregation method 'mean'; "
        "expected one of 'fedavg', 'median', 'trimmed_mean', 'krum', 'multi_krum', 'bulyan'",
    ):
        aggregate(_updates(), "mean")


def test_robust_methods_reject_complex_tensors():
    updates = [[torch.zeros(2, dtype=torch.complex64)] for _ in range(3)]
    with pytest.raises(TypeError, match="tensor 0 is complex"):
        coordinate_median(updates)
    torch.testing.assert_close(fedavg(updates)[0], torch.zeros(2, dtype=torch.complex64))


# ------------------------------------------------------------------ fedprox_term
def test_fedprox_term_value_and_gradient():
    w = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([[0.0, 3.0]], requires_grad=True)]
    g = [torch.tensor([0.0, 0.0], requires_grad=True), torch.tensor([[1.0, 1.0]], requires_grad=True)]
    term = fedprox_term(w, g, mu=0.5)
    # (0.5 / 2) * (1 + 4 + 1 + 4) = 2.5
    torch.testing.assert_close(term, torch.tensor(2.5))
    term.backward()
    for p, q in zip(w, g):
        torch.testing.assert_close(p.grad, 0.5 * (p.detach() - q.detach()))
        assert q.grad is None  # the global model is detached


def test_fedprox_term_on_a_module_and_with_mu_zero():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    global_params = [p.detach().clone() for p in model.parameters()]
    torch.testing.assert_close(fedprox_term(list(model.parameters()), global_params, 0.01), torch.tensor(0.0))
    with torch.no_grad():
        model.weight.add_(1.0)
    mu = 0.01
    term = fedprox_term(list(model.parameters()), global_params, mu)
    torch.testing.assert_close(term, torch.tensor(mu / 2 * 6))
    term.backward()
    torch.testing.assert_close(model.weight.grad, torch.full((2, 3), mu))
    torch.testing.assert_close(model.bias.grad, torch.zeros(2))
    assert fedprox_term(list(model.parameters()), [torch.zeros(2, 3), torch.zeros(2)], 0.0).item() == 0.0


def test_fedprox_term_skips_integer_tensors():
    term = fedprox_term([torch.tensor([2.0]), torch.tensor(5)], [torch.tensor([0.0]), torch.tensor(0)], mu=1.0)
    torch.testing.assert_close(term, torch.tensor(2.0))


def test_fedprox_term_errors():
    w = [torch.zeros(2)]
    for mu in (-0.1, math.nan, math.inf, "1"):
        with pytest.raises(ValueError, match="mu must be a finite number >= 0, got "):
            fedprox_term(w, w, mu)
    with pytest.raises(CohortMismatchError, match="params has 1 tensors, global_params has 2"):
        fedprox_term(w, [torch.zeros(2), torch.zeros(2)], 0.1)
    with pytest.raises(CohortMismatchError, match=r"differ at tensor 0: shape \(2,\) vs \(3,\)"):
        fedprox_term(w, [torch.zeros(3)], 0.1)


def test_weights_and_updates_of_the_wrong_type_are_named():
    import numpy as np

    updates = [[torch.ones(2)], [torch.zeros(2)]]
    for weights, message in (
        (["a", 1.0], r"weights must be real numbers \(e.g. sample counts\), got 'a' in \['a', 1.0\]"),
        ([True, False], r"weights must be real numbers \(e.g. sample counts\), got True"),
        (torch.tensor([True, False]), r"weights must be real numbers \(e.g. sample counts\), got a bool tensor"),
        ({0: 1.0, 1: 2.0}, r"weights must be a sequence of numbers \(one per update\) or a 1-D tensor, got dict"),
        ("ab", r"weights must be a sequence of numbers .*got str"),
    ):
        with pytest.raises(TypeError, match=message):
            aggregate(updates, weights=weights)
    expected = [torch.full((2,), 0.25)]
    for weights in ([1, 3], (1, 3), np.array([1, 3]), [np.int64(1), np.float32(3)], torch.tensor([1, 3])):
        assert torch.allclose(aggregate(updates, weights=weights)[0], expected[0])
    with pytest.raises(ValueError, match="num_byzantine must be an integer >= 0, got True"):
        krum([[torch.ones(1)]] * 5, num_byzantine=True)
    with pytest.raises(TypeError, match=r"update 0 is NoneType; each update must be a list of tensors"):
        aggregate([None, None])


# ------------------------------------------------------------ multi-Krum weighting
def test_multi_krum_samples_weighting_hand_computation():
    updates = _scalar_updates(KRUM_POINTS)
    weights = [1, 2, 3, 4, 5]
    out, chosen = krum(updates, num_byzantine=1, multi=3, weights=weights, krum_weighting="samples")
    assert chosen == [3, 1, 2]  # selection does not depend on the weights
    # clients 3, 1, 2 hold 1.1, 1.0, 1.3 with weights 4, 2, 3
    torch.testing.assert_close(out[0], torch.tensor([(4 * 1.1 + 2 * 1.0 + 3 * 1.3) / 9]))
    via_aggregate = aggregate(updates, "multi_krum", weights, num_byzantine=1, multi=3, krum_weighting="samples")
    assert torch.equal(via_aggregate[0], out[0])


def test_multi_krum_uniform_is_the_default_and_ignores_weights():
    updates = _scalar_updates(KRUM_POINTS)
    plain = krum(updates, num_byzantine=1, multi=3)
    weighted_ignored = krum(updates, num_byzantine=1, multi=3, weights=[1, 2, 3, 4, 5])
    assert torch.equal(plain[0][0], weighted_ignored[0][0]) and plain[1] == weighted_ignored[1]
    assert torch.equal(aggregate(updates, "multi_krum", [1, 2, 3, 4, 5], num_byzantine=1)[0],
                       aggregate(updates, "multi_krum", num_byzantine=1)[0])
    # a single Krum update has nothing to weigh
    assert torch.equal(aggregate(updates, "krum", [1, 2, 3, 4, 5], krum_weighting="samples")[0], torch.tensor([1.1]))


def test_multi_krum_samples_with_non_floating_tensors_and_zero_weights():
    out, chosen = krum(_updates(), num_byzantine=1, multi=3, weights=[0, 1, 1, 1, 0], krum_weighting="samples")
    assert out[2].item() == 100  # counters from the first update
    kept = [i for i in chosen if i in (1, 2, 3)]
    expected = torch.stack([_updates()[i][0] for i in kept]).mean(0)
    torch.testing.assert_close(out[0], expected)


def test_krum_weighting_errors():
    updates = _scalar_updates(KRUM_POINTS)
    for bad in ("samples ", "weighted", None, 1):
        with pytest.raises(ValueError, match=rf"krum_weighting must be one of 'uniform', 'samples', got {re.escape(repr(bad))}"):
            krum(updates, krum_weighting=bad)
        with pytest.raises(ValueError, match="krum_weighting must be one of 'uniform', 'samples', got "):
            aggregate(updates, "median", krum_weighting=bad)
    with pytest.raises(ValueError, match="krum_weighting='samples' averages the selected updates weighted by weights .*got weights=None"):
        krum(updates, multi=3, krum_weighting="samples")
    with pytest.raises(ValueError, match="krum_weighting='samples' averages the selected updates .*got weights=None"):
        aggregate(updates, "multi_krum", krum_weighting="samples")
    with pytest.raises(ValueError, match=r"weights must be >= 0 with a positive sum, got \[1.0, -1.0, 1.0, 1.0, 1.0\]"):
        krum(updates, multi=3, weights=[1, -1, 1, 1, 1])  # checked even when uniform ignores them
    with pytest.raises(ValueError, match=r"cannot average the selected updates \[3, 1\]: their weights are all 0"):
        krum(updates, multi=2, weights=[1, 0, 1, 0, 1], krum_weighting="samples")


# ----------------------------------------------------------------------- Bulyan
def _bulyan_oracle(rows: list[list[float]], f: int, weights=None):
    """El Mhamdi et al. (2018) written out with Python floats: recursive Krum, then beta nearest the median."""
    n = len(rows)

    def d2(i, j):
        return sum((a - b) ** 2 for a, b in zip(rows[i], rows[j]))

    remaining, selected = list(range(n)), []
    while len(selected) < n - 2 * f:
        if len(remaining) == 1:
            best = remaining[0]
        else:
            k = max(len(remaining) - f - 2, 1)
            scores = {i: sum(sorted(d2(i, j) for j in remaining if j != i)[:k]) for i in remaining}
            best = min(remaining, key=lambda i: (scores[i], i))
        selected.append(best)
        remaining.remove(best)
    beta = n - 4 * f
    out = []
    for c in range(len(rows[0])):
        values = [rows[i][c] for i in selected]
        s, t = sorted(values), len(values)
        median = s[t // 2] if t % 2 else (s[t // 2 - 1] + s[t // 2]) / 2
        nearest = sorted(range(t), key=lambda j: (abs(values[j] - median), j))[:beta]
        w = [1.0 if weights is None else float(weights[selected[j]]) for j in nearest]
        out.append(sum(values[j] * wj for j, wj in zip(nearest, w)) / sum(w))
    return out, selected


@pytest.mark.parametrize(("n", "f"), [(7, 1), (8, 1), (10, 1), (11, 2), (4, 0)])
@pytest.mark.parametrize("weighted", [False, True])
def test_bulyan_matches_the_papers_algorithm_written_out(n, f, weighted):
    g = torch.Generator().manual_seed(10 * n + f)
    updates = [[torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64),
                torch.tensor(7 + i)] for i in range(n)]
    weights = (torch.rand(n, generator=g) * 10 + 1).tolist() if weighted else None
    rows = [torch.cat([u[0].flatten(), u[1]]).tolist() for u in updates]
    expected, expected_selected = _bulyan_oracle(rows, f, weights)
    out, selected = bulyan(updates, num_byzantine=f, weights=weights)
    assert selected == expected_selected
    torch.testing.assert_close(torch.cat([out[0].flatten(), out[1]]), torch.tensor(expected, dtype=torch.float64))
    assert out[2].item() == 7


def test_bulyan_hand_computation():
    # n = 7, f = 1: theta = 5 selected, beta = 3 averaged per coordinate
    updates = _scalar_updates([0.0, 1.0, 1.5, 3.0, 4.0, 6.0, 50.0])
    out, selected = bulyan(updates, num_byzantine=1)
    # pass 1 (7 left, 4 neighbours): 1.5 scores 0.25 + 2.25 + 2.25 + 6.25 = 11, 1.0 scores 14.25 -> client 2
    # pass 2 (6 left, 3): 1.0, 3.0 and 4.0 all score 14 (e.g. 1.0: 1 + 4 + 9) -> the lower index, client 1
    # pass 3 (5 left, 2): 0.0: 9 + 16; 3.0: 1 + 9; 4.0: 1 + 4 = 5; 6.0: 4 + 9 -> client 4
    # pass 4 (4 left, 1): 0.0, 3.0 and 6.0 all score 9 -> client 0; pass 5 (3 left, 1): 3.0 and 6.0 score 9 -> client 3
    assert selected == [2, 1, 4, 0, 3]
    # values 1.5, 1.0, 4.0, 0.0, 3.0: median 1.5; nearest 1.5, 1.0, then 0.0 and 3.0 tie at 1.5 and
    # 0.0 was selected earlier -> (1.5 + 1.0 + 0.0) / 3
    torch.testing.assert_close(out[0], torch.tensor([2.5 / 3]))


@pytest.mark.parametrize("bad", [1e30, -1e30, math.nan, math.inf], ids=["huge", "-huge", "nan", "inf"])
@pytest.mark.parametrize("position", [0, 3, 6])
@pytest.mark.parametrize("everywhere", [False, True], ids=["one-coordinate", "all-coordinates"])
def test_bulyan_a_faulty_client_never_affects_the_result(bad, position, everywhere):
    honest = [[1.0, -2.0, 0.5], [1.2, -1.8, 0.4], [0.9, -2.1, 0.6], [1.1, -2.2, 0.5], [1.0, -1.9, 0.45],
              [1.05, -2.05, 0.55]]
    rows = [list(r) for r in honest]
    rows.insert(position, [bad] * 3 if everywhere else [1.0, bad, 0.5])
    out, selected = bulyan([[torch.tensor(r)] for r in rows], num_byzantine=1)
    assert position not in selected
    # the same result whatever the faulty client sends, as long as it is far
    reference, ref_selected = bulyan([[torch.tensor(r)] for r in
                                      [*(rows[:position]), [1e6, 1e6, 1e6], *(rows[position + 1:])]], num_byzantine=1)
    assert selected == ref_selected and torch.equal(out[0], reference[0])
    stacked = torch.tensor(honest)
    assert torch.isfinite(out[0]).all()
    assert (out[0] >= stacked.min(0).values).all() and (out[0] <= stacked.max(0).values).all()


def test_bulyan_tolerates_two_faulty_clients_with_f_two():
    g = torch.Generator().manual_seed(5)
    honest = [[torch.randn(4, generator=g) * 0.1 + 1.0] for _ in range(9)]
    updates = list(honest)
    updates.insert(2, [torch.full((4,), 1e30)])
    updates.insert(7, [torch.tensor([math.nan, 1.0, 1.0, 1.0])])
    out, selected = bulyan(updates, num_byzantine=2)  # n = 11 = 4 * 2 + 3
    assert 2 not in selected and 7 not in selected and len(selected) == 7
    stacked = torch.stack([h[0] for h in honest])
    assert (out[0] >= stacked.min(0).values).all() and (out[0] <= stacked.max(0).values).all()


def test_bulyan_with_f_zero_is_the_plain_mean():
    updates = _updates()
    out, selected = bulyan(updates, num_byzantine=0)
    assert sorted(selected) == [0, 1, 2, 3, 4]
    for a, b in zip(out, fedavg(updates)):
        torch.testing.assert_close(a, b)


def test_bulyan_through_aggregate():
    g = torch.Generator().manual_seed(6)
    updates = [[torch.randn(3, generator=g)] for _ in range(7)]
    weights = [1, 2, 3, 4, 5, 6, 7]
    plain = bulyan(updates, 1)[0][0]
    assert torch.equal(aggregate(updates, "bulyan", num_byzantine=1)[0], plain)
    assert torch.equal(aggregate(updates, "bulyan", weights, num_byzantine=1)[0], plain)  # uniform ignores weights
    weighted = aggregate(updates, "bulyan", weights, num_byzantine=1, krum_weighting="samples")[0]
    assert torch.equal(weighted, bulyan(updates, 1, weights)[0][0]) and not torch.equal(weighted, plain)
    with pytest.raises(ValueError, match="method 'bulyan' selects n - 2 \\* num_byzantine updates itself, got multi=3"):
        aggregate(updates, "bulyan", multi=3)
    with pytest.raises(ValueError, match="krum_weighting='samples' weighs Bulyan's mean by weights .*got weights=None"):
        aggregate(updates, "bulyan", krum_weighting="samples")


@pytest.mark.parametrize(("n", "f"), [(6, 1), (10, 2), (2, 0), (1, 0), (4, 1)])
def test_bulyan_needs_n_at_least_4f_plus_3(n, f):
    with pytest.raises(ValueError, match=rf"bulyan needs n >= 4 \* num_byzantine \+ 3 updates, got n={n} with f={f}"):
        bulyan(_scalar_updates(range(n)), num_byzantine=f)
    bulyan(_scalar_updates(range(4 * f + 3)), num_byzantine=f)  # the smallest n that works


def test_bulyan_bad_arguments():
    updates = _scalar_updates(range(7))
    with pytest.raises(ValueError, match="num_byzantine must be an integer >= 0, got -1"):
        bulyan(updates, num_byzantine=-1)
    with pytest.raises(ValueError, match="num_byzantine must be an integer >= 0, got 0.5"):
        bulyan(updates, num_byzantine=0.5)
    with pytest.raises(ValueError, match=r"weights must have one entry per update \(7\), got shape \(2,\)"):
        bulyan(updates, weights=[1, 2])
    with pytest.raises(ValueError, match=r"bulyan weights must all be > 0 .*got \[1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0\]"):
        bulyan(updates, weights=[1, 0, 1, 1, 1, 1, 1])
    with pytest.raises(TypeError, match="tensor 0 is complex"):
        bulyan([[torch.zeros(2, dtype=torch.complex64)] for _ in range(7)])


# --------------------------------------------------------------------- q-FedAvg
def _qfedavg_reference(x: list[float], ys: list[list[float]], losses, q, lipschitz, weights=None) -> list[float]:
    """Li et al. (2020), Algorithm 2, written out literally (in Decimal, so large F ** q cannot overflow)."""
    from decimal import Decimal, localcontext

    def dec(v):
        return Decimal(repr(float(v)))

    with localcontext() as context:
        context.prec = 60
        L, Q = dec(lipschitz), dec(q)
        p = [dec(1.0)] * len(ys) if weights is None else [dec(w) for w in weights]
        dw = [[L * (dec(a) - dec(b)) for a, b in zip(x, y)] for y in ys]
        F = [dec(v) for v in losses]
        deltas = [[F[k] ** Q * d for d in dw[k]] for k in range(len(ys))]
        h = [Q * F[k] ** (Q - 1) * sum(d * d for d in dw[k]) + L * F[k] ** Q for k in range(len(ys))]
        denominator = sum(pk * hk for pk, hk in zip(p, h))
        return [float(dec(x[j]) - sum(p[k] * deltas[k][j] for k in range(len(ys))) / denominator) for j in range(len(x))]


QF_X = [torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([[2.0]], dtype=torch.float64), torch.tensor(3)]
QF_YS = [
    [torch.tensor([0.3, -0.8], dtype=torch.float64), torch.tensor([[2.2]], dtype=torch.float64), torch.tensor(10)],
    [torch.tensor([0.9, -1.0], dtype=torch.float64), torch.tensor([[1.5]], dtype=torch.float64), torch.tensor(11)],
    [torch.tensor([0.1, -1.6], dtype=torch.float64), torch.tensor([[2.1]], dtype=torch.float64), torch.tensor(12)],
]
QF_LOSSES = [0.5, 1.2, 2.0]


def _flat(tensors) -> list[float]:
    return torch.cat([t.flatten().double() for t in tensors if t.is_floating_point()]).tolist()


@pytest.mark.parametrize("q", [0.0, 0.5, 1.0, 5.0])
@pytest.mark.parametrize("weights", [None, [10, 20, 5]])
def test_qfedavg_matches_the_papers_equations(q, weights):
    lipschitz = 1 / 0.1  # 1 / the local learning rate, as in the paper
    out = qfedavg(QF_X, QF_YS, QF_LOSSES, q=q, lipschitz=lipschitz, weights=weights)
    expected = _qfedavg_reference(_flat(QF_X), [_flat(y) for y in QF_YS], QF_LOSSES, q, lipschitz, weights)
    torch.testing.assert_close(torch.tensor(_flat(out), dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    assert out[2].item() == 10  # integer tensors come from the first update, not from global_params
    assert out[0].dtype == torch.float64 and out[1].shape == (1, 1)


def test_qfedavg_float32_and_large_q_without_overflow():
    x32 = [t.float() if t.is_floating_point() else t for t in QF_X]
    ys32 = [[t.float() if t.is_floating_point() else t for t in y] for y in QF_YS]
    out = qfedavg(x32, ys32, QF_LOSSES, q=1.0, lipschitz=10.0)
    expected = _qfedavg_reference(_flat(x32), [_flat(y) for y in ys32], QF_LOSSES, 1.0, 10.0)
    assert out[0].dtype == torch.float32
    torch.testing.assert_close(torch.tensor(_flat(out)), torch.tensor(expected, dtype=torch.float32))
    # 20 ** 300 overflows float64: F ** q is taken relative to the largest one
    losses = [10.0, 20.0, 15.0]
    out = qfedavg(QF_X, QF_YS, losses, q=300.0, lipschitz=10.0)
    expected = _qfedavg_reference(_flat(QF_X), [_flat(y) for y in QF_YS], losses, 300.0, 10.0)
    assert all(math.isfinite(v) for v in _flat(out))
    torch.testing.assert_close(torch.tensor(_flat(out), dtype=torch.float64), torch.tensor(expected, dtype=torch.float64))


def test_qfedavg_with_q_zero_is_fedavg():
    g = torch.Generator().manual_seed(4)
    x = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g), torch.tensor(1)]
    ys = [[x[0] + torch.randn(3, 4, generator=g), x[1] + torch.randn(5, generator=g), torch.tensor(20 + i)]
          for i in range(4)]
    for weights in (None, [3, 1, 0, 6]):
        for losses in ([0.3, 2.0, 1.0, 7.0], [0.0, 0.0, 1.0, 0.0]):  # F = 0 is allowed at q = 0 (0 * F^-1 guarded)
            out = qfedavg(x, ys, losses, q=0.0, lipschitz=7.0, weights=weights)
            # equal up to rounding only: x - (x - mean) is not mean bit for bit
            for a, b in zip(out, fedavg(ys, weights)):
                torch.testing.assert_close(a, b)


def test_qfedavg_larger_q_weighs_the_higher_loss_client_more():
    # orthogonal moves: the result's coordinates are each client's pull, in the ratio (F_2 / F_1) ** q
    x = [torch.zeros(2, dtype=torch.float64)]
    ys = [[torch.tensor([1.0, 0.0], dtype=torch.float64)], [torch.tensor([0.0, 1.0], dtype=torch.float64)]]
    losses = [1.0, 3.0]
    ratios = []
    for q in (0.0, 0.5, 1.0, 5.0):
        out = qfedavg(x, ys, losses, q=q, lipschitz=10.0)[0]
        ratios.append((out[1] / out[0]).item())
        assert ratios[-1] == pytest.approx(3.0**q, rel=1e-12)
    assert ratios == sorted(ratios) and ratios[0] == pytest.approx(1.0)
    # three clients: the share of the highest-loss client grows with q
    ys3 = [[torch.eye(3, dtype=torch.float64)[i]] for i in range(3)]
    shares = []
    for q in (0.0, 0.5, 1.0, 5.0):
        out = qfedavg([torch.zeros(3, dtype=torch.float64)], ys3, [1.0, 2.0, 4.0], q=q, lipschitz=10.0)[0]
        shares.append((out[2] / out.sum()).item())
    assert shares == sorted(shares) and shares[-1] > 0.9


def test_qfedavg_zero_weight_client_is_left_out_even_if_nan():
    x = [torch.zeros(1)]
    ys = [[torch.tensor([1.0])], [torch.tensor([math.nan])]]
    out = qfedavg(x, ys, [1.0, 2.0], q=1.0, lipschitz=10.0, weights=[1, 0])
    expected = _qfedavg_reference([0.0], [[1.0]], [1.0], 1.0, 10.0)
    torch.testing.assert_close(out[0], torch.tensor(expected, dtype=torch.float32))
    assert torch.isnan(qfedavg(x, ys, [1.0, 2.0], q=1.0, lipschitz=10.0)[0]).all()  # not robust otherwise


def test_qfedavg_accepts_losses_as_a_tensor_or_scalar_tensors():
    expected = qfedavg(QF_X, QF_YS, QF_LOSSES, q=1.0, lipschitz=10.0)
    as_float64 = {"dtype": torch.float64}
    for losses in (torch.tensor(QF_LOSSES, **as_float64), [torch.tensor(v, **as_float64) for v in QF_LOSSES],
                   tuple(QF_LOSSES)):
        for a, b in zip(qfedavg(QF_X, QF_YS, losses, q=1.0, lipschitz=10.0), expected):
            assert torch.equal(a, b)


def test_qfedavg_errors():
    kw = {"q": 1.0, "lipschitz": 10.0}
    for q in (-0.5, math.nan, math.inf, "1", True, None):
        with pytest.raises(ValueError, match=rf"q must be a finite number >= 0, got {re.escape(repr(q))}"):
            qfedavg(QF_X, QF_YS, QF_LOSSES, q=q, lipschitz=10.0)
    for lipschitz in (0.0, -1.0, math.inf, math.nan, "10"):
        with pytest.raises(ValueError, match=r"lipschitz must be a finite number > 0 \(the paper uses 1 / the local learning rate\), got "):
            qfedavg(QF_X, QF_YS, QF_LOSSES, q=1.0, lipschitz=lipschitz)
    with pytest.raises(ValueError, match=r"losses must have one entry per update \(3\), got shape \(2,\)"):
        qfedavg(QF_X, QF_YS, [1.0, 2.0], **kw)
    with pytest.raises(ValueError, match=r"losses must be finite, got \[1.0, nan, 2.0\]"):
        qfedavg(QF_X, QF_YS, [1.0, math.nan, 2.0], **kw)
    with pytest.raises(ValueError, match=r"losses must be > 0 when q > 0 \(q-FedAvg uses F_k \*\* \(q - 1\)\), got \[1.0, 0.0, 2.0\] with q=1.0"):
        qfedavg(QF_X, QF_YS, [1.0, 0.0, 2.0], **kw)
    with pytest.raises(ValueError, match=r"losses must be >= 0, got \[1.0, -0.1, 2.0\]"):
        qfedavg(QF_X, QF_YS, [1.0, -0.1, 2.0], q=0.0, lipschitz=1.0)
    with pytest.raises(TypeError, match=r"losses must be real numbers \(each client's loss at the global model\), got 'a'"):
        qfedavg(QF_X, QF_YS, ["a", 1.0, 2.0], **kw)
    with pytest.raises(TypeError, match="losses must be a sequence of numbers .*got float"):
        qfedavg(QF_X, QF_YS, 1.0, **kw)
    with pytest.raises(TypeError, match="losses must be real numbers .*got a torch.bool tensor"):
        qfedavg(QF_X, QF_YS, torch.tensor([True, True, False]), **kw)
    with pytest.raises(CohortMismatchError, match="global_params has 2 tensors, each update has 3"):
        qfedavg(QF_X[:2], QF_YS, QF_LOSSES, **kw)
    with pytest.raises(CohortMismatchError, match=r"global_params and update 0 differ at tensor 1: \(1, 2\) torch.float64 vs \(1, 1\) torch.float64"):
        qfedavg([QF_X[0], torch.zeros(1, 2, dtype=torch.float64), QF_X[2]], QF_YS, QF_LOSSES, **kw)
    with pytest.raises(TypeError, match="global_params must be a list of tensors like each update, got Tensor"):
        qfedavg(torch.zeros(2), QF_YS, QF_LOSSES, **kw)
    with pytest.raises(TypeError, match="global_params holds a float at tensor 0, expected a Tensor"):
        qfedavg([1.0, QF_X[1], QF_X[2]], QF_YS, QF_LOSSES, **kw)
    with pytest.raises(ValueError, match=r"weights must be >= 0 with a positive sum, got \[0.0, 0.0, 0.0\]"):
        qfedavg(QF_X, QF_YS, QF_LOSSES, weights=[0, 0, 0], **kw)
    with pytest.raises(TypeError, match=r"qfedavg needs real tensors; tensor 0 is complex"):
        qfedavg([torch.zeros(2, dtype=torch.complex64)], [[torch.zeros(2, dtype=torch.complex64)]], [1.0], **kw)
