"""Tests for lightning_colearn.data.partition: iid / dirichlet / shards partitions and split_member."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_colearn.data.partition import PARTITIONS, partition, split_member

NUM_CLASSES = 10
# Sorted by label, 100 samples per class: the hardest input for a naive "deal in order" split.
LABELS = np.repeat(np.arange(NUM_CLASSES), 100)


def _assert_disjoint(parts, total):
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "a sample was given to two members"
    assert joined.min() >= 0 and joined.max() < total
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "each part is sorted and has no duplicates"


def _num_major_classes(labels, part, threshold=0.05):
    counts = np.bincount(labels[part], minlength=NUM_CLASSES)
    return int((counts / max(len(part), 1) > threshold).sum())


@pytest.mark.parametrize(
    "scheme,kwargs",
    [("iid", {}), ("dirichlet", {"alpha": 0.5}), ("shards", {"labels_per_member": 2})],
)
def test_parts_disjoint_and_deterministic(scheme, kwargs):
    a = partition(LABELS, 5, scheme, seed=3, **kwargs)
    b = partition(LABELS, 5, scheme, seed=3, **kwargs)
    c = partition(LABELS, 5, scheme, seed=4, **kwargs)
    assert len(a) == 5
    _assert_disjoint(a, len(LABELS))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_partition_accepts_a_list():
    parts = partition(LABELS.tolist(), 4, "iid", seed=0)
    assert sum(len(p) for p in parts) == len(LABELS)


def test_iid_covers_everything_with_equal_shares():
    parts = partition(LABELS, 4, "iid", seed=0)
    assert [len(p) for p in parts] == [250] * 4
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))
    uneven = partition(np.zeros(10, dtype=int), 3, "iid", seed=0)
    assert sorted(len(p) for p in uneven) == [3, 3, 4]


def test_iid_on_sorted_labels_gives_each_member_roughly_uniform_labels():
    parts = partition(LABELS, 4, "iid", seed=0)
    for p in parts:
        counts = np.bincount(LABELS[p], minlength=NUM_CLASSES)
        assert (counts > 0).all(), "every member holds every class"
        # expected 25 per class; binomial std ~4.3, so +-15 is > 3 sigma
        assert np.abs(counts - 25).max() <= 15, counts


def test_dirichlet_covers_everything():
    parts = partition(LABELS, 5, "dirichlet", seed=0, alpha=0.5)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_not():
    n = 10
    skewed = partition(LABELS, n, "dirichlet", seed=0, alpha=0.1)
    flat = partition(LABELS, n, "dirichlet", seed=0, alpha=100.0)
    skewed_classes = np.mean([_num_major_classes(LABELS, p) for p in skewed])
    flat_classes = np.mean([_num_major_classes(LABELS, p) for p in flat])
    assert flat_classes >= 9  # alpha=100: nearly uniform, every class > 5% of each member
    assert skewed_classes <= 5  # alpha=0.1: a few dominant classes per member
    assert skewed_classes < flat_classes


def test_dirichlet_respects_min_size():
    parts = partition(LABELS, 10, "dirichlet", seed=0, alpha=0.1, min_size=20)
    assert min(len(p) for p in parts) >= 20


def test_dirichlet_impossible_min_size_raises():
    with pytest.raises(ValueError, match="left a member with fewer than"):
        partition(np.repeat(np.arange(2), 10), 10, "dirichlet", seed=0, alpha=0.01, min_size=2)


@pytest.mark.parametrize("n,k", [(5, 2), (3, 3), (10, 1), (4, 10), (7, 3)])
def test_shards_each_member_has_exactly_k_labels(n, k):
    parts = partition(LABELS, n, "shards", seed=1, labels_per_member=k)
    for p in parts:
        assert len(np.unique(LABELS[p])) == k
    if n * k >= NUM_CLASSES:
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))
        assert len(np.unique(LABELS[np.concatenate(parts)])) == NUM_CLASSES


def test_shards_class_split_evenly_among_holders():
    parts = partition(LABELS, 10, "shards", seed=2, labels_per_member=2)  # every class held by 2 members
    for p in parts:
        assert len(p) == 100  # 2 classes x (100 samples / 2 holders)
        assert sorted(np.bincount(LABELS[p])[np.unique(LABELS[p])].tolist()) == [50, 50]


def test_shards_with_too_few_members_leave_classes_out():
    parts = partition(LABELS, 2, "shards", seed=0, labels_per_member=2)
    used = np.unique(LABELS[np.concatenate(parts)])
    assert len(used) == 4
    assert sum(len(p) for p in parts) == 400


def test_bad_scheme_raises():
    with pytest.raises(ValueError, match=r"partition must be one of \('iid', 'dirichlet', 'shards'\), got 'pathological'"):
        partition(LABELS, 2, "pathological")
    assert PARTITIONS == ("iid", "dirichlet", "shards")


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_dirichlet_bad_alpha_raises(alpha):
    with pytest.raises(ValueError, match="alpha must be > 0"):
        partition(LABELS, 2, "dirichlet", alpha=alpha)


@pytest.mark.parametrize("k", [0, -1, 11, True, 2.0])
def test_shards_bad_labels_per_member_raises(k):
    with pytest.raises(ValueError, match=r"labels_per_member must be an int in \[1, 10\]"):
        partition(LABELS, 2, "shards", labels_per_member=k)


@pytest.mark.parametrize("n", [0, -2, True, 2.5])
def test_bad_num_members_raises(n):
    with pytest.raises(ValueError, match="num_members must be an int >= 1"):
        partition(LABELS, n, "iid")


def test_too_many_members_for_min_size_raises():
    with pytest.raises(ValueError, match="cannot give 11 members at least 1 sample"):
        partition(np.arange(10), 11, "iid")


def test_labels_must_be_1d():
    with pytest.raises(ValueError, match="labels must be 1-D"):
        partition(np.zeros((4, 2), dtype=int), 2, "iid")


# ---------------------------------------------------------------- split_member
def test_split_member_fractions_disjoint_covering():
    indices = np.arange(1000, 1100)
    parts = split_member(indices, (0.7, 0.2, 0.1), seed=0)
    assert [len(p) for p in parts] == [70, 20, 10]
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)
    assert np.array_equal(np.sort(joined), indices)
    assert all(np.all(np.diff(p) > 0) for p in parts)


def test_split_member_shuffles_rather_than_cutting_in_order():
    parts = split_member(np.arange(100), (0.5, 0.5), seed=0)
    assert not np.array_equal(parts[0], np.arange(50))


def test_split_member_leftovers_go_to_train():
    parts = split_member(np.arange(13), (0.5, 0.25, 0.25), seed=0)
    assert [len(p) for p in parts] == [7, 3, 3]


def test_split_member_zero_fraction_gets_nothing():
    parts = split_member(np.arange(20), (0.9, 0.0, 0.1), seed=0)
    assert [len(p) for p in parts] == [18, 0, 2]


def test_split_member_deterministic():
    idx = np.arange(50) * 3
    a = split_member(idx, (0.8, 0.1, 0.1), seed=5)
    b = split_member(idx, (0.8, 0.1, 0.1), seed=5)
    c = split_member(idx, (0.8, 0.1, 0.1), seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.5, 0.6), (1.1, -0.1), (0.0, 0.0, 0.0)])
def test_split_member_bad_fractions_raise(fractions):
    with pytest.raises(ValueError, match="split fractions must be >= 0 and sum to 1"):
        split_member(np.arange(10), fractions)


def test_split_member_small_member_gets_one_vote_sample():
    parts = split_member(np.arange(10), (0.8, 0.1, 0.1), seed=0)
    assert [len(p) for p in parts] == [8, 1, 1]


@pytest.mark.parametrize("n", [3, 5, 9])
def test_split_member_every_nonzero_fraction_gets_a_sample_when_enough(n):
    parts = split_member(np.arange(n), (0.8, 0.1, 0.1), seed=0)
    assert all(len(p) >= 1 for p in parts), [len(p) for p in parts]
    assert sum(len(p) for p in parts) == n


def test_split_member_exact_fractions_not_lost_to_rounding():
    parts = split_member(np.arange(100), (0.42, 0.29, 0.29), seed=0)
    assert [len(p) for p in parts] == [42, 29, 29]
