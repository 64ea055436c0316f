"""Tests for lightning_colearn.data.partition: every partition scheme, encode_labels / assign, and split_member.

The previous member-by-member loop version of iid / dirichlet / shards-with-k-classes (now
``pathological``) is kept below as the oracle: the vectorised schemes must give the same partition,
bit for bit, from the same seed.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_colearn._checks import is_int_at_least
from lightning_colearn.data.partition import (
    LABEL_SCHEMES,
    PARTITIONS,
    assign,
    encode_labels,
    partition,
    split_member,
)

NUM_CLASSES = 10
# Sorted by label, 100 samples per class: the hardest input for a naive "deal in order" split.
LABELS = np.repeat(np.arange(NUM_CLASSES), 100)
# 50 writers with 10 or 30 samples each, in a shuffled order.
GROUPS = np.random.default_rng(7).permutation(np.repeat(np.arange(50), np.tile([10, 30], 25)))
COVERING = ("iid", "dirichlet", "shards", "linear", "square", "exponential", "natural")  # use every sample

# Arguments that make every scheme run on LABELS over 5 members.
SCHEME_KWARGS = {
    "iid": {},
    "dirichlet": {"alpha": 0.5},
    "shards": {"shards_per_member": 2},
    "pathological": {"labels_per_member": 2},
    "linear": {},
    "square": {},
    "exponential": {},
    "sizes": {"sizes": [100, 300, 50, 200, 150]},
    "inner_dirichlet": {"alpha": 0.5},
    "natural": {"groups": GROUPS},
}


# ---------------------------------------------------------------- the previous loop version (the oracle)
def previous_loop_partition(labels, num_members, scheme="iid", *, seed=0, alpha=0.5, labels_per_member=2,
                            min_size=1):
    """The partition of the previous, loop-based module (``shards`` there is ``pathological`` now), unchanged."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not is_int_at_least(num_members, 1):
        raise ValueError(f"num_members must be an int >= 1, got {num_members!r}")
    if num_members * min_size > len(labels):
        raise ValueError(
            f"cannot give {num_members} members at least {min_size} sample(s) each from {len(labels)} samples"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(len(labels)), num_members)
    elif scheme == "dirichlet":
        parts = _previous_loop_dirichlet(labels, num_members, alpha, min_size, rng)
    elif scheme == "pathological":
        parts = _previous_loop_shards(labels, num_members, labels_per_member, rng)
    else:
        raise ValueError(f"no previous version of {scheme!r}")
    return [np.sort(p).astype(np.int64) for p in parts]


def _previous_loop_dirichlet(labels, n, alpha, min_size, rng):
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 for the dirichlet partition, got {alpha}")
    classes = np.unique(labels)
    for _ in range(100):
        parts = [[] for _ in range(n)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(n, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for member, chunk in enumerate(np.split(idx, cuts)):
                parts[member].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        if min(len(p) for p in merged) >= min_size:
            return merged
    raise ValueError(
        f"dirichlet partition with alpha={alpha} left a member with fewer than {min_size} samples "
        f"in 100 draws; raise alpha or use fewer members (num_members={n})"
    )


def _previous_loop_shards(labels, n, k, rng):
    classes = np.unique(labels)
    if not is_int_at_least(k, 1) or k > len(classes):
        raise ValueError(f"labels_per_member must be an int in [1, {len(classes)}], got {k!r}")
    order = rng.permutation(classes)
    held = [[order[(i * k + j) % len(classes)] for j in range(k)] for i in range(n)]
    holders = {c: [i for i in range(n) if c in held[i]] for c in classes}
    parts = [[] for _ in range(n)]
    for c, members in holders.items():
        if not members:
            continue
        idx = rng.permutation(np.flatnonzero(labels == c))
        for member, chunk in zip(members, np.array_split(idx, len(members))):
            parts[member].append(chunk)
    return [np.concatenate(p) for p in parts]


# ---------------------------------------------------------------- helpers
def _assert_disjoint(parts, total):
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "each part is sorted and has no duplicates"
    joined = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    assert len(np.unique(joined)) == len(joined), "a sample was given to two members"
    assert len(joined) == 0 or (joined.min() >= 0 and joined.max() < total)


def _assert_covers(parts, total):
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(total))


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) and x.dtype == y.dtype for x, y in zip(a, b))


def _num_major_classes(labels, part, threshold=0.05):
    counts = np.bincount(labels[part], minlength=NUM_CLASSES)
    return int((counts / max(len(part), 1) > threshold).sum())


# ---------------------------------------------------------------- the vectorised schemes equal the loop version
ORACLE_LABELS = {
    "sorted": LABELS,
    "random": np.random.default_rng(1).integers(0, 7, 500),
    "gappy": np.random.default_rng(2).choice([-3, 7, 100, 10**6], 300),
    "strings": np.random.default_rng(3).choice(["cat", "dog", "emu", "yak"], 200),
    "one_class": np.zeros(40, dtype=int),
}


@pytest.mark.parametrize("name", sorted(ORACLE_LABELS))
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_iid_equals_the_previous_loop_version(name, seed):
    labels = ORACLE_LABELS[name]
    for n in (1, 3, 7):
        assert _same(partition(labels, n, "iid", seed=seed), previous_loop_partition(labels, n, "iid", seed=seed))
    assert _same(partition(len(labels), 7, "iid", seed=seed), previous_loop_partition(labels, 7, "iid", seed=seed))


@pytest.mark.parametrize("name", sorted(ORACLE_LABELS))
@pytest.mark.parametrize("seed", [0, 1, 12345])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 10.0])
def test_dirichlet_equals_the_previous_loop_version(name, seed, alpha):
    labels = ORACLE_LABELS[name]
    for n in (1, 3, 7):
        new = partition(labels, n, "dirichlet", seed=seed, alpha=alpha, min_size=0)
        assert _same(new, previous_loop_partition(labels, n, "dirichlet", seed=seed, alpha=alpha, min_size=0))


def test_dirichlet_redraws_equal_the_previous_loop_version():
    # alpha=0.1 over 10 members with min_size=20 needs several redraws: they must consume the RNG the same way
    kwargs = dict(seed=0, alpha=0.1, min_size=20)
    new = partition(LABELS, 10, "dirichlet", **kwargs)
    assert _same(new, previous_loop_partition(LABELS, 10, "dirichlet", **kwargs))
    with pytest.raises(ValueError, match="left a member with fewer than 2 samples in 100 draws") as new:
        partition(np.repeat(np.arange(2), 10), 10, "dirichlet", seed=0, alpha=0.01, min_size=2)
    with pytest.raises(ValueError) as old:
        previous_loop_partition(np.repeat(np.arange(2), 10), 10, "dirichlet", seed=0, alpha=0.01, min_size=2)
    assert str(new.value) == str(old.value)


@pytest.mark.parametrize("name", sorted(ORACLE_LABELS))
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_pathological_equals_the_previous_loop_shards(name, seed):
    labels = ORACLE_LABELS[name]
    num_classes = len(np.unique(labels))
    for n in (1, 3, 7, 20):
        for k in sorted({1, min(2, num_classes), num_classes}):
            new = partition(labels, n, "pathological", seed=seed, labels_per_member=k, min_size=0)
            assert _same(new, previous_loop_partition(labels, n, "pathological", seed=seed, labels_per_member=k,
                                                      min_size=0))


# ---------------------------------------------------------------- every scheme
@pytest.mark.parametrize("scheme", PARTITIONS)
def test_parts_disjoint_sorted_and_deterministic(scheme):
    kwargs = SCHEME_KWARGS[scheme]
    a = partition(LABELS, 5, scheme, seed=3, **kwargs)
    b = partition(LABELS, 5, scheme, seed=3, **kwargs)
    c = partition(LABELS, 5, scheme, seed=4, **kwargs)
    assert len(a) == 5
    _assert_disjoint(a, len(LABELS))
    assert _same(a, b)
    assert not _same(a, c)
    if scheme in COVERING:
        _assert_covers(a, len(LABELS))


def test_scheme_table_is_complete():
    assert PARTITIONS == ("iid", "dirichlet", "shards", "pathological", "linear", "square", "exponential", "sizes",
                          "inner_dirichlet", "natural")
    assert LABEL_SCHEMES == {"dirichlet", "shards", "pathological", "inner_dirichlet"}
    assert set(SCHEME_KWARGS) == set(PARTITIONS)


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_string_labels_work_and_match_integer_codes(scheme):
    names = np.array(["airplane", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck", "zebra"])
    kwargs = SCHEME_KWARGS[scheme]
    as_strings = partition(names[LABELS], 5, scheme, seed=1, **kwargs)
    assert _same(as_strings, partition(LABELS, 5, scheme, seed=1, **kwargs))  # sorted names = the same class order
    assert _same(partition(names[LABELS].tolist(), 5, scheme, seed=1, **kwargs), as_strings)


@pytest.mark.parametrize("scheme", sorted(set(PARTITIONS) - LABEL_SCHEMES))
def test_label_free_schemes_take_the_sample_count(scheme):
    kwargs = SCHEME_KWARGS[scheme]
    assert _same(partition(len(LABELS), 5, scheme, seed=2, **kwargs), partition(LABELS, 5, scheme, seed=2, **kwargs))
    assert _same(partition(np.int64(len(LABELS)), 5, scheme, seed=2, **kwargs),
                 partition(LABELS, 5, scheme, seed=2, **kwargs))


@pytest.mark.parametrize("scheme", sorted(LABEL_SCHEMES))
def test_label_schemes_without_labels_raise(scheme):
    expected = (f"partition '{scheme}' needs class labels, but the data set has none (got 1000 samples without "
                f"labels); pass labels=... or use one of iid, linear, square, exponential, sizes, natural")
    with pytest.raises(ValueError) as err:
        partition(1000, 5, scheme, **SCHEME_KWARGS[scheme])
    assert str(err.value) == expected
    with pytest.raises(ValueError, match=r"needs class labels, but the data set has none \(got no labels\)"):
        partition(None, 5, scheme, **SCHEME_KWARGS[scheme])


def test_partition_accepts_a_list():
    parts = partition(LABELS.tolist(), 4, "iid", seed=0)
    assert sum(len(p) for p in parts) == len(LABELS)


# ---------------------------------------------------------------- iid
def test_iid_covers_everything_with_equal_shares():
    parts = partition(LABELS, 4, "iid", seed=0)
    assert [len(p) for p in parts] == [250] * 4
    _assert_covers(parts, len(LABELS))
    uneven = partition(np.zeros(10, dtype=int), 3, "iid", seed=0)
    assert sorted(len(p) for p in uneven) == [3, 3, 4]


def test_iid_on_sorted_labels_gives_each_member_roughly_uniform_labels():
    parts = partition(LABELS, 4, "iid", seed=0)
    for p in parts:
        counts = np.bincount(LABELS[p], minlength=NUM_CLASSES)
        assert (counts > 0).all(), "every member holds every class"
        # expected 25 per class; binomial std ~4.3, so +-15 is > 3 sigma
        assert np.abs(counts - 25).max() <= 15, counts


# ---------------------------------------------------------------- dirichlet
def test_dirichlet_covers_everything():
    parts = partition(LABELS, 5, "dirichlet", seed=0, alpha=0.5)
    _assert_covers(parts, len(LABELS))


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


def test_dirichlet_self_balancing_caps_members_near_the_average():
    labels = np.repeat(np.arange(20), 100)
    n, average = 20, len(labels) / 20
    plain = partition(labels, n, "dirichlet", seed=0, alpha=0.3, min_size=0)
    balanced = partition(labels, n, "dirichlet", seed=0, alpha=0.3, min_size=0, self_balancing=True)
    _assert_covers(balanced, len(labels))
    # a member stops receiving classes once above the average, so it can overshoot by at most one class
    assert max(map(len, balanced)) <= average + 100
    assert np.std(list(map(len, balanced))) < np.std(list(map(len, plain)))
    assert _same(plain, partition(labels, n, "dirichlet", seed=0, alpha=0.3, min_size=0, self_balancing=False))


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf"), "0.5", True])
@pytest.mark.parametrize("scheme", ["dirichlet", "inner_dirichlet"])
def test_dirichlet_bad_alpha_raises(alpha, scheme):
    with pytest.raises(ValueError, match=f"alpha must be > 0 \\(and finite\\) for the {scheme} partition, got"):
        partition(LABELS, 2, scheme, alpha=alpha)


def test_dirichlet_bad_self_balancing_raises():
    with pytest.raises(ValueError, match="self_balancing must be True or False, got 'yes'"):
        partition(LABELS, 2, "dirichlet", self_balancing="yes")


# ---------------------------------------------------------------- shards (sort and shard, McMahan et al. 2017)
def test_shards_deal_equal_label_sorted_shards():
    parts = partition(LABELS, 10, "shards", seed=0, shards_per_member=2)  # 20 shards of 50, 2 per class
    _assert_covers(parts, len(LABELS))
    for p in parts:
        assert len(p) == 100
        counts = np.bincount(LABELS[p], minlength=NUM_CLASSES)
        assert set(counts.tolist()) <= {0, 50, 100}, "each shard lies within one class"
        assert 1 <= (counts > 0).sum() <= 2


def test_shards_sizes_within_one_shard_rounding():
    labels = np.random.default_rng(0).integers(0, 10, 997)
    n, s = 7, 3
    parts = partition(labels, n, "shards", seed=5, shards_per_member=s)
    _assert_covers(parts, len(labels))
    low, high = s * (len(labels) // (n * s)), s * -(-len(labels) // (n * s))
    assert all(low <= len(p) <= high for p in parts), [len(p) for p in parts]


def test_shards_shuffle_within_a_class():
    # two seeds give the same shard sizes but pick different samples of a class for a shard
    a = partition(LABELS, 20, "shards", seed=0, shards_per_member=1)
    b = partition(LABELS, 20, "shards", seed=1, shards_per_member=1)
    assert {tuple(p) for p in a} != {tuple(p) for p in b}
    assert all((np.diff(p) > 1).any() for p in a), "a shard is not a run of consecutive indices"


@pytest.mark.parametrize("s", [0, -1, True, 2.0])
def test_shards_bad_shards_per_member_raises(s):
    with pytest.raises(ValueError, match=f"shards_per_member must be an int >= 1, got {s!r}"):
        partition(LABELS, 2, "shards", shards_per_member=s)


def test_more_shards_than_samples_raises():
    with pytest.raises(ValueError, match="cuts num_members \\* shards_per_member = 30 shards but there are only 20"):
        partition(np.arange(20) % 2, 10, "shards", shards_per_member=3)


# ---------------------------------------------------------------- pathological (k classes per member)
@pytest.mark.parametrize("n,k", [(5, 2), (3, 3), (10, 1), (4, 10), (7, 3)])
def test_pathological_each_member_has_exactly_k_labels(n, k):
    parts = partition(LABELS, n, "pathological", seed=1, labels_per_member=k)
    for p in parts:
        assert len(np.unique(LABELS[p])) == k
    if n * k >= NUM_CLASSES:
        _assert_covers(parts, len(LABELS))
        assert len(np.unique(LABELS[np.concatenate(parts)])) == NUM_CLASSES


def test_pathological_class_split_evenly_among_holders():
    parts = partition(LABELS, 10, "pathological", seed=2, labels_per_member=2)  # every class held by 2 members
    for p in parts:
        assert len(p) == 100  # 2 classes x (100 samples / 2 holders)
        assert sorted(np.bincount(LABELS[p])[np.unique(LABELS[p])].tolist()) == [50, 50]


def test_pathological_with_too_few_members_leaves_classes_out():
    parts = partition(LABELS, 2, "pathological", seed=0, labels_per_member=2)
    used = np.unique(LABELS[np.concatenate(parts)])
    assert len(used) == 4
    assert sum(len(p) for p in parts) == 400


def test_pathological_many_classes_and_members():
    labels = np.random.default_rng(0).integers(0, 500, 20_000)
    parts = partition(labels, 1000, "pathological", seed=0, labels_per_member=3, min_size=0)
    _assert_covers(parts, len(labels))
    assert all(len(np.unique(labels[p])) == 3 for p in parts)


@pytest.mark.parametrize("k", [0, -1, 11, True, 2.0])
def test_pathological_bad_labels_per_member_raises(k):
    with pytest.raises(ValueError, match=r"labels_per_member must be an int in \[1, 10\]"):
        partition(LABELS, 2, "pathological", labels_per_member=k)


def test_pathological_class_smaller_than_its_holders_raises_on_min_size():
    labels = np.repeat([0, 1], [2, 100])  # class 0 has 2 samples, held by 2 of 4 members
    assert min(map(len, partition(labels, 4, "pathological", labels_per_member=1, min_size=1))) == 1
    with pytest.raises(ValueError, match=r"member \d got 1 sample\(s\), fewer than min_size=2, in the 'pathological'"
                                         r" partition \(2 member\(s\) fall short\); a class has fewer samples"):
        partition(labels, 4, "pathological", labels_per_member=1, min_size=2)


# ---------------------------------------------------------------- linear / square / exponential
@pytest.mark.parametrize("scheme,weight", [("linear", lambda i: i + 1.0), ("square", lambda i: (i + 1.0) ** 2),
                                           ("exponential", lambda i: np.exp(i - i.max()))])
@pytest.mark.parametrize("total,n,min_size", [(1000, 5, 1), (997, 13, 3), (5000, 1000, 1), (50, 50, 1), (10, 4, 0)])
def test_size_skew_sizes_follow_the_weights(scheme, weight, total, n, min_size):
    parts = partition(total, n, scheme, seed=0, min_size=min_size)
    _assert_covers(parts, total)
    sizes = np.array([len(p) for p in parts])
    w = weight(np.arange(n, dtype=float))
    exact = min_size + (total - n * min_size) * w / w.sum()
    assert (sizes >= min_size).all()
    assert np.all(np.abs(sizes - exact) < 1), "floor plus largest remainder"
    assert np.all(np.diff(sizes) >= 0)


def test_exponential_with_a_thousand_members_does_not_overflow():
    parts = partition(100_000, 1000, "exponential", seed=0)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 100_000 and min(sizes) == 1
    assert sizes[-1] > sizes[-2] > sizes[-3] > 1


def test_size_skew_samples_are_iid():
    parts = partition(LABELS, 4, "linear", seed=0)
    biggest = np.bincount(LABELS[parts[-1]], minlength=NUM_CLASSES)
    assert (biggest > 20).all(), biggest  # 400 samples of sorted labels, ~40 per class


# ---------------------------------------------------------------- sizes
def test_sizes_as_counts_are_exact_and_leave_the_rest_unused():
    parts = partition(LABELS, 3, "sizes", seed=0, sizes=[10, 0, 300], min_size=0)
    assert [len(p) for p in parts] == [10, 0, 300]
    _assert_disjoint(parts, len(LABELS))


def test_sizes_as_fractions_use_every_sample():
    parts = partition(101, 3, "sizes", seed=0, sizes=[0.5, 0.25, 0.25])
    assert [len(p) for p in parts] == [51, 25, 25]
    _assert_covers(parts, 101)
    assert [len(p) for p in partition(100, 2, "sizes", sizes=np.array([0.3, 0.7]))] == [30, 70]


@pytest.mark.parametrize("scheme", ["sizes", "inner_dirichlet"])
@pytest.mark.parametrize("sizes,match", [
    ([100, 200], r"sizes must have one entry per member \(num_members=3\), got \[100, 200\]"),
    ([[1, 2, 3]], r"sizes must have one entry per member"),
    ([100, -1, 5], r"sizes must be sample counts >= 0, got \[100, -1, 5\]"),
    ([500, 500, 1], r"sizes sum to 1001, more than the 1000 samples; lower them"),
    ([0.5, 0.4, 0.3], r"sizes must be sample counts \(ints >= 0 summing to <= 1000\) or fractions"),
    ([0.5, float("nan"), 0.5], r"or fractions \(>= 0 summing to 1\), got \[0.5, nan, 0.5\]"),
    ([1.5, -0.5, 0.0], r"or fractions"),
    ([True, True, False], r"sizes must be sample counts"),
    (["a", "b", "c"], r"sizes must be sample counts"),
    ([10, 0, 10], r"sizes\[1\] = 0 is below min_size=1; raise it or lower min_size"),
])
def test_bad_sizes_raise(scheme, sizes, match):
    with pytest.raises(ValueError, match=match):
        partition(LABELS, 3, scheme, sizes=sizes)


def test_sizes_fractions_below_min_size_raise_naming_the_member():
    with pytest.raises(ValueError, match=r"member 1 got 0 sample\(s\), fewer than min_size=1, in the 'sizes' "
                                         r"partition .*raise that member's entry of sizes"):
        partition(100, 3, "sizes", sizes=[0.5, 0.0, 0.5])


def test_sizes_scheme_needs_sizes():
    with pytest.raises(ValueError, match=r"the sizes partition needs sizes=\[...\]"):
        partition(100, 3, "sizes")


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "natural", "linear"])
def test_sizes_and_groups_only_where_read(scheme):
    only_sizes = f"sizes is only read by the sizes and inner_dirichlet partitions, not '{scheme}'"
    with pytest.raises(ValueError, match=only_sizes):
        partition(LABELS, 3, scheme, sizes=[1, 1, 1], groups=GROUPS)
    if scheme != "natural":
        with pytest.raises(ValueError, match=f"groups is only read by the natural partition, not '{scheme}'"):
            partition(LABELS, 3, scheme, groups=GROUPS)


# ---------------------------------------------------------------- inner_dirichlet
def test_inner_dirichlet_default_sizes_are_equal_and_cover_everything():
    parts = partition(LABELS, 7, "inner_dirichlet", seed=0, alpha=0.5)
    assert sorted(len(p) for p in parts) == [142] * 1 + [143] * 6
    _assert_covers(parts, len(LABELS))


def test_inner_dirichlet_sizes_exact_even_when_classes_run_out():
    labels = np.repeat(np.arange(5), [900, 40, 30, 20, 10])  # one big class, four tiny ones
    sizes = [200, 150, 150, 100, 100, 100, 100, 50, 25, 25]
    for seed in range(5):
        for alpha in (0.05, 0.5, 50.0):
            parts = partition(labels, 10, "inner_dirichlet", seed=seed, alpha=alpha, sizes=sizes)
            assert [len(p) for p in parts] == sizes
            _assert_disjoint(parts, len(labels))
    full = partition(labels, 10, "inner_dirichlet", seed=0, alpha=0.05, sizes=[100] * 10)
    _assert_covers(full, len(labels))  # every class used up exactly


def test_inner_dirichlet_small_alpha_is_skewed_large_alpha_is_not():
    skewed = partition(LABELS, 10, "inner_dirichlet", seed=0, alpha=0.1)
    flat = partition(LABELS, 10, "inner_dirichlet", seed=0, alpha=100.0)
    skewed_classes = np.mean([_num_major_classes(LABELS, p) for p in skewed])
    flat_classes = np.mean([_num_major_classes(LABELS, p) for p in flat])
    assert flat_classes >= 9
    assert skewed_classes <= 5


def test_inner_dirichlet_fractions():
    parts = partition(LABELS, 4, "inner_dirichlet", seed=0, sizes=[0.1, 0.2, 0.3, 0.4])
    assert [len(p) for p in parts] == [100, 200, 300, 400]


# ---------------------------------------------------------------- natural
def test_natural_keeps_groups_whole_and_uses_every_sample():
    n = 7
    parts = partition(LABELS, n, "natural", seed=0, groups=GROUPS)
    _assert_covers(parts, len(LABELS))
    owner_of_group = {}
    for member, p in enumerate(parts):
        for g in np.unique(GROUPS[p]).tolist():
            assert owner_of_group.setdefault(g, member) == member, f"group {g} split"
    per_member = [len(np.unique(GROUPS[p])) for p in parts]
    num_groups = len(np.unique(GROUPS))
    assert sorted(set(per_member)) == sorted({num_groups // n, -(-num_groups // n)})
    assert sum(per_member) == num_groups


def test_natural_one_group_per_member_when_counts_match():
    groups = np.array(["ann", "bob", "cy", "dee"])[np.arange(40) % 4]
    parts = partition(40, 4, "natural", seed=0, groups=groups)
    assert sorted(groups[p][0] for p in parts) == ["ann", "bob", "cy", "dee"]
    assert all(len(set(groups[p].tolist())) == 1 for p in parts)
    other = partition(40, 4, "natural", seed=1, groups=groups)
    assert [groups[p][0] for p in parts] != [groups[p][0] for p in other], "the group order is shuffled by the seed"


def test_natural_takes_the_sample_count_from_groups():
    assert _same(partition(None, 3, "natural", groups=GROUPS), partition(len(GROUPS), 3, "natural", groups=GROUPS))


def test_natural_too_few_groups_raises():
    with pytest.raises(ValueError, match=r"natural partition needs at least num_members \(60\) groups, got 50"):
        partition(LABELS, 60, "natural", groups=GROUPS)


def test_natural_groups_length_must_match():
    with pytest.raises(ValueError, match=r"groups must have one entry per sample \(1000 samples\), got 999"):
        partition(LABELS, 3, "natural", groups=GROUPS[:-1])


def test_natural_needs_groups():
    with pytest.raises(ValueError, match=r"the natural partition needs groups=\.\.\."):
        partition(LABELS, 3, "natural")
    with pytest.raises(ValueError, match="labels must be the class labels or the sample count"):
        partition(None, 3, "natural")


def test_natural_small_group_below_min_size_raises():
    groups = np.repeat([0, 1, 2], [1, 50, 50])
    with pytest.raises(ValueError, match=r"member \d got 1 sample\(s\), fewer than min_size=2, in the 'natural'"):
        partition(101, 3, "natural", groups=groups, min_size=2)


# ---------------------------------------------------------------- common argument checks
def test_bad_scheme_raises():
    with pytest.raises(ValueError, match=r"partition must be one of \('iid', 'dirichlet', .*'natural'\), got 'bogus'"):
        partition(LABELS, 2, "bogus")


@pytest.mark.parametrize("n", [0, -2, True, 2.5])
def test_bad_num_members_raises(n):
    with pytest.raises(ValueError, match="num_members must be an int >= 1"):
        partition(LABELS, n, "iid")


@pytest.mark.parametrize("m", [-1, 1.5, None])
def test_bad_min_size_raises(m):
    with pytest.raises(ValueError, match=f"min_size must be an int >= 0, got {m!r}"):
        partition(LABELS, 2, "iid", min_size=m)


@pytest.mark.parametrize("seed", [-1, "abc", 1.5])
def test_bad_seed_raises(seed):
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        partition(LABELS, 2, "iid", seed=seed)


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_too_many_members_for_min_size_raises(scheme):
    kwargs = {"groups": np.arange(10)} if scheme == "natural" else {}
    with pytest.raises(ValueError, match="cannot give 11 members at least 1 sample"):
        partition(np.arange(10), 11, scheme, **kwargs)


def test_labels_must_be_1d():
    with pytest.raises(ValueError, match="labels must be 1-D"):
        partition(np.zeros((4, 2), dtype=int), 2, "iid")
    with pytest.raises(ValueError, match="labels must be 1-D"):
        partition(np.zeros((4, 2), dtype=int), 2, "dirichlet")


def test_negative_sample_count_raises():
    with pytest.raises(ValueError, match="labels as a sample count must be >= 0, got -5"):
        partition(-5, 2, "iid")


def test_min_size_zero_allows_empty_members():
    parts = partition(3, 5, "iid", min_size=0)
    assert sorted(len(p) for p in parts) == [0, 0, 1, 1, 1]
    assert all(p.dtype == np.int64 for p in parts)


# ---------------------------------------------------------------- encode_labels and assign
def test_encode_labels_of_many_types():
    codes, classes = encode_labels(np.array([5, -3, 5, 10**9]))  # wide range: the sorting path
    assert codes.tolist() == [1, 0, 1, 2] and classes == [-3, 5, 10**9]
    codes, classes = encode_labels(np.array([True, False, True]))
    assert codes.tolist() == [1, 0, 1] and classes == [False, True]
    codes, classes = encode_labels(np.array([2, 0, 2], dtype=np.uint8))
    assert codes.dtype == np.int64 and codes.tolist() == [1, 0, 1] and classes == [0, 2]
    codes, classes = encode_labels(np.array([-128, 127, -128], dtype=np.int8))  # no int8 overflow
    assert codes.tolist() == [0, 1, 0] and classes == [-128, 127]
    codes, classes = encode_labels([0.5, 0.25, 0.5])
    assert codes.tolist() == [1, 0, 1] and classes == [0.25, 0.5]
    codes, classes = encode_labels([1, "1", 1, None])  # numpy alone would merge 1 and "1"
    assert len(classes) == 3 and codes[0] == codes[2] != codes[1]
    codes, classes = encode_labels([(1, 2), (0, 1), (1, 2)])
    assert codes.tolist() == [1, 0, 1]
    codes, classes = encode_labels([])
    assert codes.dtype == np.int64 and len(codes) == 0 and classes == []


def test_encode_labels_does_not_depend_on_sample_order():
    labels = np.array(["b", "a", "c", "a"])
    codes, classes = encode_labels(labels)
    perm = np.array([3, 0, 2, 1])
    codes2, classes2 = encode_labels(labels[perm])
    assert classes == classes2 == ["a", "b", "c"]
    assert np.array_equal(codes[perm], codes2)
    assert [classes[c] for c in codes] == labels.tolist()


def test_encode_labels_of_a_tensor():
    torch = pytest.importorskip("torch")
    codes, classes = encode_labels(torch.tensor([3, 1, 3]))
    assert codes.tolist() == [1, 0, 1] and classes == [1, 3]
    assert _same(partition(torch.tensor(LABELS), 5, "dirichlet", seed=0), partition(LABELS, 5, "dirichlet", seed=0))


def test_encode_labels_bad_input():
    with pytest.raises(ValueError, match="labels must be 1-D"):
        encode_labels(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="labels must be hashable"):
        encode_labels(np.array([{1: 2}, {3: 4}], dtype=object))


def test_assign_is_the_member_by_member_loop():
    rng = np.random.default_rng(0)
    for n, total in [(1, 10), (4, 100), (300, 5000), (70_000, 100_000)]:  # the last one beyond 16-bit keys
        owner = rng.integers(-1, n, total)
        parts = assign(owner, n)
        assert len(parts) == n
        for member in rng.choice(n, min(n, 50), replace=False):
            assert np.array_equal(parts[member], np.flatnonzero(owner == member))
            assert parts[member].dtype == np.int64
    assert [p.tolist() for p in assign(np.array([], dtype=int), 2)] == [[], []]


@pytest.mark.parametrize("owner,match", [
    (np.array([0, 3]), r"owner values must be in \[-1, 2\] \(-1 = unused\), got values from 0 to 3"),
    (np.array([-2, 0]), r"owner values must be in \[-1, 2\]"),
    (np.array([0.0, 1.0]), r"owner must be a 1-D integer array, got shape \(2,\) and dtype float64"),
    (np.zeros((2, 2), dtype=int), r"owner must be a 1-D integer array"),
])
def test_assign_bad_owner_raises(owner, match):
    with pytest.raises(ValueError, match=match):
        assign(owner, 3)


# ---------------------------------------------------------------- properties over random inputs
# The start of every ValueError partition raises: a property run may meet any of them, never another error.
OUR_ERRORS = re.compile(
    r"(cannot give \d+ members at least|member \d+ got \d+ sample|natural partition needs at least|"
    r"labels_per_member must be|shards partition cuts|sizes sum to|sizes\[\d+\] = |sizes must be|"
    r"dirichlet partition with alpha=)"
)


@st.composite
def cases(draw):
    """Random label vectors (balanced or Dirichlet-skewed classes) and arguments for one random scheme."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    num_classes, total = draw(st.integers(1, 12)), draw(st.integers(0, 300))
    class_mix = rng.dirichlet(np.full(num_classes, draw(st.sampled_from([0.3, 100.0]))))
    labels = rng.choice(num_classes, total, p=class_mix)
    n = draw(st.integers(1, 20))
    scheme = draw(st.sampled_from(PARTITIONS))
    kwargs = dict(seed=draw(st.integers(0, 2**32)), min_size=draw(st.integers(0, 3)))
    if scheme in ("dirichlet", "inner_dirichlet"):
        kwargs["alpha"] = draw(st.floats(0.05, 20.0))
    if scheme == "dirichlet":
        kwargs["self_balancing"] = draw(st.booleans())
    if scheme == "pathological":
        kwargs["labels_per_member"] = draw(st.integers(1, 4))
    if scheme == "shards":
        kwargs["shards_per_member"] = draw(st.integers(1, 4))
    if scheme == "sizes" or (scheme == "inner_dirichlet" and draw(st.booleans())):
        if draw(st.booleans()):
            kwargs["sizes"] = rng.integers(0, max(2 * total // n, 1) + 1, n).tolist()
        else:
            w = rng.integers(0, 10, n).astype(float)
            kwargs["sizes"] = (w / w.sum()).tolist() if w.sum() else w.tolist()
    if scheme == "natural":
        kwargs["groups"] = rng.integers(0, draw(st.integers(1, 40)), total)
    return labels, n, scheme, kwargs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_every_scheme_keeps_its_guarantees_or_raises_a_value_error(case):
    labels, n, scheme, kwargs = case
    total = len(labels)
    try:
        parts = partition(labels, n, scheme, **kwargs)
    except ValueError as err:
        assert OUR_ERRORS.match(str(err)), err
        return
    assert len(parts) == n
    _assert_disjoint(parts, total)
    assert _same(parts, partition(labels, n, scheme, **kwargs)), "same seed, same partition"
    sizes = np.array([len(p) for p in parts])
    assert (sizes >= kwargs["min_size"]).all()
    if scheme in COVERING:
        _assert_covers(parts, total)
    if scheme == "iid":
        assert sizes.max() - sizes.min() <= 1
    elif scheme == "shards":
        s = kwargs["shards_per_member"]
        assert sizes.min() >= s * (total // (n * s)) and sizes.max() <= s * -(-total // (n * s))
    elif scheme == "pathological":
        k, present = kwargs["labels_per_member"], np.unique(labels)
        used = np.concatenate(parts)
        held = np.unique(labels[used])
        assert len(held) == min(n * k, len(present)), "n * k classes dealt round-robin"
        assert np.array_equal(np.sort(used), np.flatnonzero(np.isin(labels, held))), "all samples of held classes"
        assert all(len(np.unique(labels[p])) <= k for p in parts)
        if np.bincount(labels).max(initial=0) and np.bincount(labels)[present].min() >= n:
            assert all(len(np.unique(labels[p])) == k for p in parts)
    elif scheme in ("sizes", "inner_dirichlet") and "sizes" in kwargs:
        given_sizes = np.asarray(kwargs["sizes"])
        if given_sizes.dtype.kind == "i":
            assert sizes.tolist() == given_sizes.tolist()
        else:
            assert sizes.sum() == total and np.all(np.abs(sizes - given_sizes * total) < 1)
    elif scheme == "inner_dirichlet":
        _assert_covers(parts, total)
        assert sizes.max() - sizes.min() <= 1
    elif scheme == "natural":
        groups = kwargs["groups"]
        owner = np.full(total, -1)
        for member, p in enumerate(parts):
            owner[p] = member
        for g in np.unique(groups):
            assert len(np.unique(owner[groups == g])) == 1, "a group stays whole"
        per_member = [len(np.unique(groups[p])) for p in parts]
        num_groups = len(np.unique(groups))
        assert min(per_member) >= num_groups // n and max(per_member) <= -(-num_groups // n)


@settings(max_examples=80, deadline=None)
@given(labels=st.lists(st.integers(0, 11), min_size=1, max_size=300), n=st.integers(1, 15),
       seed=st.integers(0, 2**32), alpha=st.floats(0.05, 20.0), k=st.integers(1, 4))
def test_vectorised_schemes_equal_the_previous_loop_version(labels, n, seed, alpha, k):
    labels = np.array(labels)
    cases = [("iid", {}), ("dirichlet", {"alpha": alpha}), ("pathological", {"labels_per_member": k})]
    for scheme, kwargs in cases:
        try:
            old = previous_loop_partition(labels, n, scheme, seed=seed, min_size=0, **kwargs)
        except ValueError:
            with pytest.raises(ValueError):
                partition(labels, n, scheme, seed=seed, min_size=0, **kwargs)
            continue
        assert _same(partition(labels, n, scheme, seed=seed, min_size=0, **kwargs), old), scheme


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
