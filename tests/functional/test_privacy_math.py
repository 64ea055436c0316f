"""Tests for lightning_colearn.functional.privacy: DP-FedAvg and adaptive clipping, against the papers' equations.

McMahan et al. (2018), "Learning Differentially Private Recurrent Language Models" (DP-FedAvg, the
fixed-denominator estimator) and Andrew et al. (2021), "Differentially Private Learning with Adaptive
Clipping" (the noised unclipped fraction, the geometric update and the split of the noise multiplier)
are written out by hand here in Python floats or float64 tensors, with the same seeded generators.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_colearn.functional.arithmetic import CohortMismatchError
from lightning_colearn.functional.privacy import (
    adaptive_clip_norm,
    clip_update,
    dp_mean,
    noised_fraction,
    split_noise_multiplier,
    update_norm,
)

BAD_POSITIVE = [0, -1.0, math.nan, math.inf, True, "1", None]


def _update(*shapes: tuple[int, ...], seed: int = 0, scale: float = 1.0, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype) for shape in shapes]


def _hand_norm(update: list[torch.Tensor]) -> float:
    return math.sqrt(sum(x * x for t in update for x in t.double().flatten().tolist()))


# ------------------------------------------------------------------- the norm
def test_update_norm_is_the_norm_of_all_tensors_together():
    update = [torch.tensor([1.0, -2.0]), torch.tensor([[2.0], [4.0]])]
    assert update_norm(update) == 5.0
    random = _update((3, 4), (5,), (2, 2, 2), seed=1)
    assert update_norm(random) == pytest.approx(_hand_norm(random), rel=1e-12)


# ------------------------------------------------------------------- clipping
@settings(max_examples=200, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4),
    scale=st.floats(1e-4, 1e3),
    clip=st.floats(1e-3, 1e2),
    seed=st.integers(0, 2**16),
)
def test_clipping_bounds_every_norm_and_keeps_the_direction(shapes, scale, clip, seed):
    update = _update(*shapes, seed=seed, scale=scale)
    before = [t.clone() for t in update]
    clipped, was_clipped, norm = clip_update(update, clip)
    hand = _hand_norm(update)
    assert norm == pytest.approx(hand, rel=1e-12)
    assert was_clipped == (hand > clip)
    # McMahan et al.: Delta * min(1, C / ||Delta||), float32 written back
    factor = min(1.0, clip / hand) if hand > 0 else 1.0
    for c, t in zip(clipped, update):
        assert c.dtype == t.dtype and c.shape == t.shape
        torch.testing.assert_close(c, (t.double() * factor).float(), rtol=0, atol=0)
    assert _hand_norm(clipped) <= clip * (1 + torch.finfo(torch.float32).eps)
    assert all(torch.equal(a, b) for a, b in zip(update, before))  # the input is left alone
    if not was_clipped:
        assert all(torch.equal(c, t) for c, t in zip(clipped, update))
        assert all(c is not t for c, t in zip(clipped, update))  # new tensors all the same


def test_small_updates_are_returned_unchanged_and_the_boundary_is_not_clipped():
    update = [torch.tensor([0.375, 0.5])]  # norm 0.625 exactly
    clipped, was_clipped, norm = clip_update(update, 0.625)
    assert (was_clipped, norm) == (False, 0.625)
    assert torch.equal(clipped[0], update[0])
    zero, was_clipped, norm = clip_update([torch.zeros(3)], 1.0)
    assert (was_clipped, norm) == (False, 0.0) and torch.equal(zero[0], torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_clipping_keeps_the_dtype_and_bounds_the_norm_up_to_its_rounding(dtype):
    for seed in range(50):
        update = _update((7,), (3, 3), seed=seed, scale=10.0, dtype=dtype)
        clipped, was_clipped, _ = clip_update(update, 1.0)
        assert was_clipped and [c.dtype for c in clipped] == [dtype, dtype]
        assert _hand_norm(clipped) <= 1.0 * (1 + torch.finfo(dtype).eps)


def test_clipping_refuses_what_cannot_be_clipped():
    with pytest.raises(ValueError, match=re.escape("the update's norm is inf")):
        clip_update([torch.tensor([1.0, math.inf])], 1.0)
    with pytest.raises(ValueError, match="the update's norm is nan"):
        clip_update([torch.tensor([math.nan])], 1.0)
    with pytest.raises(TypeError, match="floating tensors .* tensor 1 is torch.int64"):
        clip_update([torch.zeros(2), torch.tensor([3])], 1.0)
    with pytest.raises(TypeError, match="must be a list of tensors"):
        clip_update(torch.zeros(2), 1.0)
    with pytest.raises(TypeError, match="holds a list at tensor 0"):
        clip_update([[1.0]], 1.0)
    with pytest.raises(ValueError, match="holds no tensors"):
        clip_update([], 1.0)
    with pytest.raises(TypeError, match="floating tensors"):
        update_norm([torch.tensor([True])])


@pytest.mark.parametrize("bad", BAD_POSITIVE)
def test_clipping_needs_a_positive_clip_norm(bad):
    with pytest.raises(ValueError, match=re.escape(f"dp.clip_norm must be a finite number > 0, got {bad!r}")):
        clip_update([torch.ones(2)], bad)


# ------------------------------------------------------------- the noised mean
UPDATES = [
    [torch.tensor([0.6, 0.0]), torch.tensor([[0.8]])],
    [torch.tensor([0.1, -0.2]), torch.tensor([[0.3]])],
    [torch.tensor([-0.5, 0.5]), torch.tensor([[0.0]])],
]


def _hand_server_mean(updates, clip, sigma, m, seed):
    """McMahan et al. (2018): (sum_i Delta_i + N(0, (sigma C)^2 I)) / (q W), unit weights: q W = m."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(len(updates[0])):
        total = sum(u[k].double() for u in updates)
        noise = torch.normal(0.0, sigma * clip, size=tuple(updates[0][k].shape), generator=g, dtype=torch.float64)
        out.append(((total + noise) / m).to(updates[0][k].dtype))
    return out


def _hand_client_mean(updates, clip, sigma, m, seed):
    """Every client adds N(0, (sigma C)^2 / m I) to its own update, client by client, tensor by tensor."""
    g = torch.Generator().manual_seed(seed)
    sums = [torch.zeros(t.shape, dtype=torch.float64) for t in updates[0]]
    for update in updates:
        for k, t in enumerate(update):
            sums[k] += t.double() + torch.normal(0.0, sigma * clip / math.sqrt(m), size=tuple(t.shape), generator=g,
                                                 dtype=torch.float64)
    return [(s / m).to(t.dtype) for s, t in zip(sums, updates[0])]


@pytest.mark.parametrize("m", [3, 5, 2.5])  # everyone reported; fewer did (the denominator stays m); a Poisson mean
def test_server_side_mean_equals_the_hand_computation_with_the_same_generator(m):
    before = [[t.clone() for t in u] for u in UPDATES]
    mean = dp_mean(UPDATES, clip_norm=1.0, noise_multiplier=0.7, expected_clients=m,
                   generator=torch.Generator().manual_seed(11))
    expected = _hand_server_mean(UPDATES, 1.0, 0.7, m, seed=11)
    for a, b in zip(mean, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(torch.equal(a, b) for u, v in zip(UPDATES, before) for a, b in zip(u, v))


@pytest.mark.parametrize("m", [3, 6])
def test_client_side_mean_equals_the_hand_computation_with_the_same_generator(m):
    mean = dp_mean(UPDATES, clip_norm=2.0, noise_multiplier=1.3, expected_clients=m, side="client",
                   generator=torch.Generator().manual_seed(5))
    expected = _hand_client_mean(UPDATES, 2.0, 1.3, m, seed=5)
    for a, b in zip(mean, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_mean_keeps_the_first_updates_dtype():
    updates = [[t.to(torch.float16) for t in u] for u in UPDATES]
    mean = dp_mean(updates, clip_norm=1.0, noise_multiplier=1.0, expected_clients=3,
                   generator=torch.Generator().manual_seed(0))
    assert [t.dtype for t in mean] == [torch.float16, torch.float16]
    assert [t.shape for t in mean] == [torch.Size([2]), torch.Size([1, 1])]


def _noise_variance(side: str, *, reporting: int, m: int, sigma: float, clip: float, seed: int) -> float:
    """The empirical variance of the mean's coordinates when every update is zero: the noise alone."""
    size = 200_000
    updates = [[torch.zeros(size, dtype=torch.float64)] for _ in range(reporting)]
    mean = dp_mean(updates, clip_norm=clip, noise_multiplier=sigma, expected_clients=m, side=side,
                   generator=torch.Generator().manual_seed(seed))
    return float(mean[0].var())


def test_server_and_client_side_add_the_same_noise_variance_when_everyone_reports():
    # Var of the mean = (sigma C / m)^2 on both sides. With n = 200 000 draws the sample variance has a relative
    # standard deviation of sqrt(2 / n) = 0.32%: a 2% tolerance is 6.3 of them (a false failure < 1e-9, and the
    # seeds are fixed), the server/client difference's 3% is 6.7 of its 0.45%.
    m, sigma, clip = 8, 1.5, 0.5
    expected = (sigma * clip / m) ** 2
    server = _noise_variance("server", reporting=m, m=m, sigma=sigma, clip=clip, seed=1)
    client = _noise_variance("client", reporting=m, m=m, sigma=sigma, clip=clip, seed=2)
    assert server == pytest.approx(expected, rel=0.02)
    assert client == pytest.approx(expected, rel=0.02)
    assert client / server == pytest.approx(1.0, abs=0.03)


def test_client_side_noise_falls_short_when_fewer_clients_report():
    # the documented reason the server side is the default: 4 of 8 report, the client side has half the variance
    m, sigma, clip = 8, 1.0, 1.0
    server = _noise_variance("server", reporting=4, m=m, sigma=sigma, clip=clip, seed=3)
    client = _noise_variance("client", reporting=4, m=m, sigma=sigma, clip=clip, seed=4)
    assert server == pytest.approx((sigma * clip / m) ** 2, rel=0.02)
    assert client == pytest.approx(0.5 * (sigma * clip / m) ** 2, rel=0.02)


def test_dp_mean_refuses_unclipped_updates_and_mismatched_clients():
    with pytest.raises(ValueError, match=re.escape("update 1 has norm 5 > dp.clip_norm 1 (clip it with clip_update first)")):
        dp_mean([[torch.tensor([0.6, 0.8])], [torch.tensor([3.0, 4.0])]], clip_norm=1.0, noise_multiplier=1.0,
                expected_clients=2)
    with pytest.raises(CohortMismatchError, match=re.escape("updates 0 and 1 differ at tensor 0: shape (2,) vs (3,)")):
        dp_mean([[torch.zeros(2)], [torch.zeros(3)]], clip_norm=1.0, noise_multiplier=1.0, expected_clients=2)
    with pytest.raises(CohortMismatchError, match="update 0 has 1 tensors, update 1 has 2"):
        dp_mean([[torch.zeros(2)], [torch.zeros(2), torch.zeros(1)]], clip_norm=1.0, noise_multiplier=1.0,
                expected_clients=2)
    with pytest.raises(ValueError, match="needs at least one clipped update"):
        dp_mean([], clip_norm=1.0, noise_multiplier=1.0, expected_clients=2)
    with pytest.raises(TypeError, match="clipped_updates must be a list of updates"):
        dp_mean(torch.zeros(2, 2), clip_norm=1.0, noise_multiplier=1.0, expected_clients=2)
    with pytest.raises(TypeError, match="update 0 tensor 0 is torch.int64"):
        dp_mean([[torch.zeros(2, dtype=torch.long)]], clip_norm=1.0, noise_multiplier=1.0, expected_clients=2)


@pytest.mark.parametrize("field", ["clip_norm", "noise_multiplier", "expected_clients"])
@pytest.mark.parametrize("bad", BAD_POSITIVE)
def test_dp_mean_names_every_bad_number(field, bad):
    kwargs = {"clip_norm": 1.0, "noise_multiplier": 1.0, "expected_clients": 2, field: bad}
    with pytest.raises(ValueError, match=re.escape(f"dp.{field} must be a finite number > 0, got {bad!r}")):
        dp_mean([[torch.zeros(2)]], **kwargs)


def test_dp_mean_names_a_bad_side_and_generator():
    with pytest.raises(ValueError, match=re.escape("dp.side must be one of ['server', 'client'], got 'both'")):
        dp_mean([[torch.zeros(2)]], clip_norm=1.0, noise_multiplier=1.0, expected_clients=2, side="both")
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        dp_mean([[torch.zeros(2)]], clip_norm=1.0, noise_multiplier=1.0, expected_clients=2, generator=0)


# ------------------------------------------------------------ adaptive clipping
@pytest.mark.parametrize("count,reported,m", [(7, 10, 10), (3, 4, 4), (0, 5, 5)])
def test_noised_fraction_is_andrew_et_al_count_over_m_when_everyone_reports(count, reported, m):
    # Andrew et al. (2021), Algorithm 1: b = (sum_i b_i + N(0, sigma_b^2)) / m
    b = noised_fraction(count, reported_clients=reported, expected_clients=m, count_noise_multiplier=0.5,
                        generator=torch.Generator().manual_seed(9))
    z = torch.normal(0.0, 0.5, size=(1,), generator=torch.Generator().manual_seed(9), dtype=torch.float64).item()
    assert b == pytest.approx((count + z) / m, rel=1e-12, abs=1e-15)


def test_noised_fraction_centres_the_count_when_fewer_or_more_report():
    # sum_i (b_i - 1/2) has sensitivity 1/2 whatever the number of reporters; the server adds back 1/2
    for reported in (3, 12):
        b = noised_fraction(2, reported_clients=reported, expected_clients=8, count_noise_multiplier=0.4,
                            generator=torch.Generator().manual_seed(1))
        z = torch.normal(0.0, 0.4, size=(1,), generator=torch.Generator().manual_seed(1), dtype=torch.float64).item()
        assert b == pytest.approx((2 - reported / 2 + z) / 8 + 0.5, rel=1e-12)


def test_noised_fraction_refuses_bad_counts():
    kwargs = {"expected_clients": 4, "count_noise_multiplier": 1.0}
    with pytest.raises(ValueError, match=re.escape("dp.unclipped_count must be <= dp.reported_clients (3), got 4")):
        noised_fraction(4, reported_clients=3, **kwargs)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=re.escape(f"dp.unclipped_count must be an integer >= 0, got {bad!r}")):
            noised_fraction(bad, reported_clients=3, **kwargs)
        with pytest.raises(ValueError, match=re.escape(f"dp.reported_clients must be an integer >= 0, got {bad!r}")):
            noised_fraction(0, reported_clients=bad, **kwargs)
    for bad in BAD_POSITIVE:
        with pytest.raises(ValueError, match=re.escape(f"dp.count_noise_multiplier must be a finite number > 0, got {bad!r}")):
            noised_fraction(1, reported_clients=3, expected_clients=4, count_noise_multiplier=bad)
        with pytest.raises(ValueError, match=re.escape(f"dp.expected_clients must be a finite number > 0, got {bad!r}")):
            noised_fraction(1, reported_clients=3, expected_clients=bad, count_noise_multiplier=1.0)
    assert noised_fraction(torch.tensor(2), reported_clients=3, generator=torch.Generator().manual_seed(0), **kwargs)


@pytest.mark.parametrize("b,gamma,eta", [(0.1, 0.5, 0.2), (0.9, 0.5, 0.2), (0.5, 0.5, 0.2), (-0.3, 0.8, 0.05),
                                         (1.4, 0.1, 1.0)])
def test_adaptive_clip_norm_is_the_geometric_update_by_the_exact_factor(b, gamma, eta):
    # Andrew et al. (2021): C <- C exp(-eta (b - gamma))
    new = adaptive_clip_norm(0.7, b, target_quantile=gamma, learning_rate=eta)
    assert new == 0.7 * math.exp(-eta * (b - gamma))
    if b < gamma:
        assert new > 0.7  # too few updates fit under C: it grows
    elif b > gamma:
        assert new < 0.7
    else:
        assert new == 0.7


def test_adaptive_clipping_tracks_the_target_quantile_of_the_norms():
    # 300 rounds of 100 clients with log-normal update norms: C settles near their median (exp(0) = 1)
    g = torch.Generator().manual_seed(0)
    clip, m = 0.05, 100
    for _ in range(300):
        norms = torch.exp(torch.randn(m, generator=g, dtype=torch.float64) * 0.5)
        unclipped = int((norms <= clip).sum())
        b = noised_fraction(unclipped, reported_clients=m, expected_clients=m, count_noise_multiplier=m / 20, generator=g)
        clip = adaptive_clip_norm(clip, b, target_quantile=0.5, learning_rate=0.2)
    assert 0.8 < clip < 1.25


def test_adaptive_clip_norm_names_every_bad_argument():
    for bad in BAD_POSITIVE:
        with pytest.raises(ValueError, match=re.escape(f"dp.clip_norm must be a finite number > 0, got {bad!r}")):
            adaptive_clip_norm(bad, 0.5, target_quantile=0.5, learning_rate=0.2)
        with pytest.raises(ValueError, match=re.escape(f"dp.clip_learning_rate must be a finite number > 0, got {bad!r}")):
            adaptive_clip_norm(1.0, 0.5, target_quantile=0.5, learning_rate=bad)
    for bad in (0, 1, 1.5, -0.1, math.nan):
        with pytest.raises(ValueError, match=re.escape(f"dp.target_quantile must be a number in (0, 1), got {bad!r}")):
            adaptive_clip_norm(1.0, 0.5, target_quantile=bad, learning_rate=0.2)
    for bad in (math.nan, math.inf, None, "0.5"):
        with pytest.raises(ValueError, match=re.escape(f"dp.unclipped_fraction must be a finite number, got {bad!r}")):
            adaptive_clip_norm(1.0, bad, target_quantile=0.5, learning_rate=0.2)
    with pytest.raises(ValueError, match="moved to 0.0"):
        adaptive_clip_norm(1.0, 1e3, target_quantile=0.5, learning_rate=1e3)


# ----------------------------------------------------------------- the split
@pytest.mark.parametrize("sigma,sigma_b", [(1.0, 5.0), (1.0, 0.6), (0.7, 100.0), (3.0, 2.0)])
def test_split_noise_multiplier_spends_exactly_the_budget(sigma, sigma_b):
    # Andrew et al. (2021), Theorem 1: sigma^-2 = sigma_Delta^-2 + (2 sigma_b)^-2
    sigma_delta = split_noise_multiplier(sigma, sigma_b)
    assert sigma_delta == pytest.approx((sigma ** -2 - (2 * sigma_b) ** -2) ** -0.5, rel=1e-15)
    assert sigma_delta ** -2 + (2 * sigma_b) ** -2 == pytest.approx(sigma ** -2, rel=1e-12)
    assert sigma_delta > sigma


def test_split_noise_multiplier_names_the_minimum_count_noise():
    for sigma_b in (0.5, 0.4):
        with pytest.raises(ValueError, match=re.escape(
                f"dp.count_noise_multiplier must be > dp.noise_multiplier / 2 = 0.5 for the update noise and the count "
                f"noise to fit in a budget of noise multiplier 1.0 (Andrew et al. 2021), got {sigma_b}")):
            split_noise_multiplier(1.0, sigma_b)
    for bad in BAD_POSITIVE:
        with pytest.raises(ValueError, match=re.escape(f"dp.noise_multiplier must be a finite number > 0, got {bad!r}")):
            split_noise_multiplier(bad, 1.0)
        with pytest.raises(ValueError, match=re.escape(f"dp.count_noise_multiplier must be a finite number > 0, got {bad!r}")):
            split_noise_multiplier(1.0, bad)
