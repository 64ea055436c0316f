"""Partition one data set over the members of a cohort, deterministically from a seed.

The schemes of the federated-learning literature (pure numpy, vectorised: 1,000,000 samples over
1,000 members take a few tens of milliseconds). Each returns one sorted ``int64`` index array per
member; the arrays are disjoint, and the same seed gives the same partition.

Label-free schemes (``labels`` may be just the sample count):

* ``iid``: shuffle, then deal out equal shares. Every sample is used; sizes differ by at most one.
* ``linear`` / ``square`` / ``exponential``: size skew as in flwr-datasets' Linear-, Square- and
  ExponentialPartitioner: member ``i`` gets ``min_size`` samples plus a share of the rest in
  proportion to ``i + 1``, ``(i + 1) ** 2`` or ``exp(i)``; the samples are IID. Every sample is used.
* ``sizes``: explicit member sizes (``sizes=``: sample counts, or fractions summing to 1); IID samples.
  Member sizes are exactly as given (fractions: rounded by largest remainder, every sample used).
* ``natural``: the data set's own groups (``groups=``: one writer / user / device id per sample), as in
  flwr-datasets' NaturalIdPartitioner and LEAF (Caldas et al., 2018): whole groups are dealt to
  members, ``floor(G / n)`` or ``ceil(G / n)`` groups each. Every sample is used; a group is never split.

Label schemes (``labels`` must hold every sample's class; any hashable labels, see :func:`encode_labels`):

* ``dirichlet``: for each class, member shares drawn from Dir(alpha) (Hsu et al., 2019, "Measuring the
  effects of non-identical data distribution"); small alpha = few classes per member. Every sample is
  used; redrawn (up to 100 times) until every member has ``min_size`` samples. ``self_balancing=True``
  stops giving a class to members that already hold more than ``N / n`` samples (as flwr-datasets'
  DirichletPartitioner).
* ``shards``: sort-and-shard of McMahan et al., 2017 ("Communication-efficient learning of deep
  networks from decentralized data", the FedAvg paper): sort by label, cut into
  ``n * shards_per_member`` equal shards, deal ``shards_per_member`` random shards to each member.
  Every sample is used; sizes differ by at most ``shards_per_member``.
* ``pathological``: each member holds exactly ``labels_per_member`` classes, dealt round-robin from a
  shuffled class order; each class is split evenly among the members holding it (the k-classes-per-client
  split of McMahan et al., 2017, and flwr-datasets' PathologicalPartitioner). Samples of classes no member
  holds are unused (every class is held once ``n * labels_per_member >= classes``).
* ``inner_dirichlet``: fixed member sizes (``sizes=``, else equal), each member's class mix drawn from
  Dir(alpha) over the classes (Acar et al., 2021, "Federated learning based on dynamic regularization",
  as flwr-datasets' InnerDirichletPartitioner); classes that run out are shared out proportionally and
  the shortfall redrawn over the classes left. Member sizes are exactly as given.

Each member's share is then split into train / vote / test parts (:func:`split_member`): "vote" is the
member's own held-out data that later judges proposals.

Examples:
    >>> import numpy as np
    >>> labels = np.repeat(np.arange(10), 20)          # sorted by label
    >>> parts = partition(labels, 4, "iid", seed=0)
    >>> [len(p) for p in parts], sorted(np.concatenate(parts).tolist()) == list(range(200))
    ([50, 50, 50, 50], True)
    >>> [sorted(set(labels[p].tolist())) for p in partition(labels, 5, "pathological", labels_per_member=2, seed=0)]
    [[4, 6], [2, 7], [3, 5], [0, 9], [1, 8]]
    >>> [len(p) for p in partition(200, 4, "linear", seed=0)]   # no labels needed: just the sample count
    [21, 40, 60, 79]
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from lightning_colearn._checks import is_int_at_least

__all__ = ["LABEL_SCHEMES", "PARTITIONS", "assign", "encode_labels", "partition", "split_member"]

PARTITIONS = (
    "iid", "dirichlet", "shards", "pathological", "linear", "square", "exponential", "sizes", "inner_dirichlet",
    "natural",
)
LABEL_SCHEMES = frozenset({"dirichlet", "shards", "pathological", "inner_dirichlet"})
_LABEL_FREE = tuple(s for s in PARTITIONS if s not in LABEL_SCHEMES)
_DIRICHLET_TRIES = 100

# What to change when a member ends up with fewer than ``min_size`` samples, per scheme.
_TOO_SMALL_ADVICE = {
    "iid": "use fewer members or a lower min_size",
    "dirichlet": "raise alpha or use fewer members",
    "shards": "use fewer members or fewer shards_per_member",
    "pathological": "a class has fewer samples than members holding it; use fewer members, "
                    "a larger labels_per_member or a lower min_size",
    "linear": "use fewer members or a lower min_size",
    "square": "use fewer members or a lower min_size",
    "exponential": "use fewer members or a lower min_size",
    "sizes": "raise that member's entry of sizes or lower min_size",
    "inner_dirichlet": "raise that member's entry of sizes or lower min_size",
    "natural": "its groups are too small; use fewer members (more groups each) or a lower min_size",
}


def partition(
    labels: np.ndarray | Sequence | int | None,
    num_members: int,
    scheme: str = "iid",
    *,
    seed: int = 0,
    alpha: float = 0.5,
    labels_per_member: int = 2,
    shards_per_member: int = 2,
    min_size: int = 1,
    self_balancing: bool = False,
    sizes: Sequence[float] | np.ndarray | None = None,
    groups: np.ndarray | Sequence | None = None,
) -> list[np.ndarray]:
    """Split sample indices ``0..N-1`` over ``num_members``; returns one sorted ``int64`` index array per member.

    Args:
        labels: every sample's class label (1-D, any hashable values), or, for the schemes that do not
            read labels (``iid``, ``linear``, ``square``, ``exponential``, ``sizes``, ``natural``), just the
            sample count ``N`` (``natural`` also takes ``None``: ``N = len(groups)``).
        num_members: number of parts.
        scheme: one of :data:`PARTITIONS` (see the module docstring for what each guarantees).
        seed: seeds every random draw; the same seed gives the same partition.
        alpha: Dirichlet concentration of ``dirichlet`` and ``inner_dirichlet`` (> 0; small = skewed).
        labels_per_member: classes per member of ``pathological`` (in ``[1, classes]``).
        shards_per_member: shards per member of ``shards`` (>= 1).
        min_size: fewest samples any member may get (>= 0); ``dirichlet`` redraws (up to 100 times) to
            meet it, every other scheme raises a ``ValueError`` naming the member that falls short.
        self_balancing: ``dirichlet`` only: members already above ``N / num_members`` samples get no
            share of the classes still to deal.
        sizes: member sizes of ``sizes`` (required) and ``inner_dirichlet`` (optional): one sample count
            per member summing to at most ``N``, or fractions summing to 1.
        groups: ``natural`` only (required): one group id (writer, user, ...) per sample.

    The parts are always disjoint. ``iid``, ``dirichlet``, ``shards``, ``linear``, ``square``,
    ``exponential`` and ``natural`` use every sample; ``sizes`` and ``inner_dirichlet`` use
    ``sum(sizes)``; ``pathological`` uses every sample of every class some member holds.
    Every bad argument is a ``ValueError`` naming it, the value seen and what is allowed.

    Examples:
        >>> import numpy as np
        >>> labels = np.repeat(["cat", "dog", "emu"], 4)
        >>> [labels[p].tolist() for p in partition(labels, 3, "pathological", labels_per_member=1, seed=0)]
        [['emu', 'emu', 'emu', 'emu'], ['cat', 'cat', 'cat', 'cat'], ['dog', 'dog', 'dog', 'dog']]
        >>> partition(12, 3, "dirichlet")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: partition 'dirichlet' needs class labels, but the data set has none (got 12 samples ...
    """
    if scheme not in PARTITIONS:
        raise ValueError(f"partition must be one of {PARTITIONS}, got {scheme!r}")
    codes, num_classes, total = _read_labels(labels, scheme, groups)
    if not is_int_at_least(num_members, 1):
        raise ValueError(f"num_members must be an int >= 1, got {num_members!r}")
    if not is_int_at_least(min_size, 0):
        raise ValueError(f"min_size must be an int >= 0, got {min_size!r}")
    if num_members * min_size > total:
        raise ValueError(
            f"cannot give {num_members} members at least {min_size} sample(s) each from {total} samples"
        )
    if sizes is not None and scheme not in ("sizes", "inner_dirichlet"):
        raise ValueError(f"sizes is only read by the sizes and inner_dirichlet partitions, not {scheme!r}; drop it")
    if groups is not None and scheme != "natural":
        raise ValueError(f"groups is only read by the natural partition, not {scheme!r}; drop it")
    try:
        rng = np.random.default_rng(seed)
    except (TypeError, ValueError):
        raise ValueError(
            f"seed must be an int >= 0 (or anything numpy.random.default_rng takes), got {seed!r}"
        ) from None

    n = num_members
    if scheme == "iid":
        owner = _iid(total, n, rng)
    elif scheme == "dirichlet":
        owner = _dirichlet(codes, num_classes, n, alpha, min_size, self_balancing, rng)
    elif scheme == "shards":
        owner = _shards(codes, num_classes, n, shards_per_member, rng)
    elif scheme == "pathological":
        owner = _pathological(codes, num_classes, n, labels_per_member, rng)
    elif scheme in ("linear", "square", "exponential"):
        owner = _size_skew(total, n, scheme, min_size, rng)
    elif scheme == "sizes":
        if sizes is None:
            raise ValueError("the sizes partition needs sizes=[...]: one sample count (or fraction) per member")
        owner = _cut_permutation(total, _member_sizes(sizes, n, total, min_size), rng)
    elif scheme == "inner_dirichlet":
        wanted = _even_sizes(total, n) if sizes is None else _member_sizes(sizes, n, total, min_size)
        owner = _inner_dirichlet(codes, num_classes, wanted, alpha, rng)
    else:  # natural
        owner = _natural(groups, total, n, rng)
    parts = assign(owner, n)
    _check_min_size(parts, min_size, scheme)
    return parts


# ------------------------------------------------------------------ labels and the owner array
def encode_labels(labels: np.ndarray | Sequence) -> tuple[np.ndarray, list]:
    """Class labels of any hashable type as ``int64`` codes, and the sorted class list the codes index into.

    Integers, booleans, floats, strings, numpy arrays and array-likes (a CPU tensor) all work; a list
    that mixes types (``[1, "1"]``) keeps them apart (numpy alone would turn both into ``"1"``). The
    classes are sorted (by value, or by type name and ``repr`` when they cannot be compared), so the
    codes do not depend on the order the samples come in. Small-range integers take an O(N) path.

    Examples:
        >>> codes, classes = encode_labels(["dog", "cat", "dog", "emu"])
        >>> codes.tolist(), classes
        ([1, 0, 1, 2], ['cat', 'dog', 'emu'])
        >>> encode_labels([3, 1, 3])[0].tolist(), encode_labels([3, 1, 3])[1]
        ([1, 0, 1], [1, 3])
    """
    arr = _as_label_array(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind in "biu" and len(arr):
        values = arr.view(np.uint8) if arr.dtype.kind == "b" else arr
        lo, hi = int(values.min()), int(values.max())
        if hi - lo <= 4 * len(arr) + 1024 and hi <= np.iinfo(np.int64).max:  # bincount over the range: O(N), no sort
            shifted = values.astype(np.int64) - lo
            present = np.bincount(shifted, minlength=hi - lo + 1) > 0
            lookup = np.cumsum(present) - 1
            classes = (np.flatnonzero(present) + lo).astype(arr.dtype)
            return lookup[shifted], classes.tolist()
    if arr.dtype.kind != "O":
        classes, codes = np.unique(arr, return_inverse=True)
        return codes.reshape(-1).astype(np.int64), classes.tolist()
    try:
        distinct = set(arr.tolist())
    except TypeError as err:
        raise ValueError(f"labels must be hashable, got {err}") from None
    try:
        ordered = sorted(distinct)
    except TypeError:  # classes of several types that cannot be compared
        ordered = sorted(distinct, key=lambda c: (type(c).__name__, repr(c)))
    index = {c: i for i, c in enumerate(ordered)}
    return np.fromiter(map(index.__getitem__, arr.tolist()), dtype=np.int64, count=len(arr)), ordered


def _as_label_array(labels) -> np.ndarray:
    if isinstance(labels, np.ndarray):
        return labels
    if isinstance(labels, (list, tuple)) and labels and all(isinstance(x, tuple) for x in labels):
        return _object_array(labels)  # tuples as labels: numpy would make them a second axis
    try:
        arr = np.asarray(labels)
    except (TypeError, ValueError) as err:
        raise ValueError(f"labels must be a 1-D sequence of hashable class labels, got {err}") from None
    if arr.dtype.kind in "USO" and arr.ndim == 1:
        # numpy turns [1, "1"] into ["1", "1"] (and [1, b"1"] into bytes): keep the Python objects instead
        kinds = {type(x) for x in labels}
        if not (kinds <= {str} or kinds <= {bytes}):
            return _object_array(labels)
    return arr


def _object_array(items) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = list(items)
    return arr


def _read_labels(labels, scheme: str, groups) -> tuple[np.ndarray | None, int, int]:
    """``(codes, num_classes, N)``; ``codes`` is None when the scheme does not read labels."""
    if labels is None or is_int_at_least(labels, 0):
        if scheme in LABEL_SCHEMES:
            seen = "no labels" if labels is None else f"{labels} samples without labels"
            raise ValueError(
                f"partition {scheme!r} needs class labels, but the data set has none (got {seen}); "
                f"pass labels=... or use one of {', '.join(_LABEL_FREE)}"
            )
        if labels is not None:
            return None, 0, int(labels)
        if scheme == "natural" and groups is not None:
            return None, 0, len(_as_label_array(groups))
        raise ValueError(f"labels must be the class labels or the sample count for the {scheme!r} partition, got None")
    if isinstance(labels, numbers.Integral) and not isinstance(labels, bool):
        raise ValueError(f"labels as a sample count must be >= 0, got {labels}")
    if scheme not in LABEL_SCHEMES:  # only the length is read: no need to encode
        arr = _as_label_array(labels)
        if arr.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
        return None, 0, len(arr)
    codes, classes = encode_labels(labels)
    return codes, len(classes), len(codes)


def assign(owner: np.ndarray, num_members: int) -> list[np.ndarray]:
    """Index arrays from an owner array: ``owner[i]`` is the member of sample ``i``, or -1 for an unused sample.

    Returns one sorted ``int64`` array of sample indices per member (empty for a member that owns
    nothing), from one stable argsort (a radix sort for up to 65,534 members) and one bincount.

    Examples:
        >>> [p.tolist() for p in assign(np.array([1, 0, -1, 1, 2]), 4)]
        [[1], [0, 3], [4], []]
    """
    owner = np.asarray(owner)
    if not is_int_at_least(num_members, 1):
        raise ValueError(f"num_members must be an int >= 1, got {num_members!r}")
    if owner.ndim != 1 or owner.dtype.kind not in "iu":
        raise ValueError(f"owner must be a 1-D integer array, got shape {owner.shape} and dtype {owner.dtype}")
    if len(owner) and (owner.min() < -1 or owner.max() >= num_members):
        raise ValueError(
            f"owner values must be in [-1, {num_members - 1}] (-1 = unused), "
            f"got values from {owner.min()} to {owner.max()}"
        )
    shifted = _narrow(owner.astype(np.int64) + 1, num_members + 1)  # -1 -> 0: unused samples sort first
    order = np.argsort(shifted, kind="stable").astype(np.int64, copy=False)
    counts = np.bincount(shifted, minlength=num_members + 1)
    return np.split(order, np.cumsum(counts)[:-1])[1:]


def _narrow(values: np.ndarray, upper: int) -> np.ndarray:
    """``values`` (all in ``[0, upper)``) in the smallest unsigned type: numpy radix-sorts 8- and 16-bit keys."""
    if upper <= 1 << 8:
        return values.astype(np.uint8)
    if upper <= 1 << 16:
        return values.astype(np.uint16)
    return values


def _by_class(codes: np.ndarray, num_classes: int, order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices grouped by class (stable: in the order of ``order``, default ascending) and the class starts."""
    keys = _narrow(codes if order is None else codes[order], num_classes)
    grouped = np.argsort(keys, kind="stable")
    if order is not None:
        grouped = order[grouped]
    starts = np.concatenate(([0], np.cumsum(np.bincount(codes, minlength=num_classes))))
    return grouped.astype(np.int64, copy=False), starts


def _check_min_size(parts: list[np.ndarray], min_size: int, scheme: str) -> None:
    if not min_size:
        return
    lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    short = np.flatnonzero(lengths < min_size)
    if len(short):
        i = int(short[0])
        raise ValueError(
            f"member {i} got {lengths[i]} sample(s), fewer than min_size={min_size}, in the {scheme!r} partition "
            f"({len(short)} member(s) fall short); {_TOO_SMALL_ADVICE[scheme]}"
        )


def _even_sizes(total: int, n: int) -> np.ndarray:
    """Sizes of ``np.array_split(range(total), n)``: the first ``total % n`` parts one larger."""
    sizes = np.full(n, total // n, dtype=np.int64)
    sizes[: total % n] += 1
    return sizes


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Non-negative integers summing exactly to ``total``, in proportion to ``weights`` (largest remainder)."""
    exact = total * (weights / weights.sum())
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    missing = total - int(counts.sum())
    if missing >= 0:  # the usual case: 0 <= missing < len(weights)
        counts[order[np.arange(missing) % len(order)]] += 1
    else:  # float error pushed a floor up: take the excess back from the largest counts
        counts[np.argsort(-counts, kind="stable")[:-missing]] -= 1
    return counts


def _cut_permutation(total: int, sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Owner array: a seeded permutation of the samples cut into consecutive runs of ``sizes`` (the rest unused)."""
    owner = np.full(total, -1, dtype=np.int64)
    used = int(sizes.sum())
    owner[rng.permutation(total)[:used]] = np.repeat(np.arange(len(sizes)), sizes)
    return owner


def _short(values) -> str:
    values = list(np.asarray(values).tolist())
    return str(values) if len(values) <= 8 else f"[{', '.join(map(str, values[:8]))}, ...] ({len(values)} entries)"


def _member_sizes(sizes, n: int, total: int, min_size: int) -> np.ndarray:
    """``sizes`` (sample counts, or fractions summing to 1) as validated sample counts, one per member."""
    arr = np.asarray(sizes)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"sizes must have one entry per member (num_members={n}), got {_short(arr)}")
    if arr.dtype.kind in "iu":
        if (arr < 0).any():
            raise ValueError(f"sizes must be sample counts >= 0, got {_short(arr)}")
        if int(arr.sum()) > total:
            raise ValueError(f"sizes sum to {int(arr.sum())}, more than the {total} samples; lower them")
        small = np.flatnonzero(arr < min_size)
        if len(small):
            raise ValueError(
                f"sizes[{small[0]}] = {arr[small[0]]} is below min_size={min_size}; raise it or lower min_size"
            )
        return arr.astype(np.int64)
    if arr.dtype.kind == "f" and np.isfinite(arr).all() and (arr >= 0).all() and np.isclose(arr.sum(), 1.0):
        return _largest_remainder(total, arr.astype(np.float64))
    raise ValueError(
        f"sizes must be sample counts (ints >= 0 summing to <= {total}) or fractions (>= 0 summing to 1), "
        f"got {_short(arr)}"
    )


def _check_alpha(alpha, scheme: str) -> None:
    if not (isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) and 0 < alpha < np.inf):
        raise ValueError(f"alpha must be > 0 (and finite) for the {scheme} partition, got {alpha}")


# ------------------------------------------------------------------ the schemes (each returns an owner array)
def _iid(total: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``iid``: one seeded permutation cut into ``np.array_split`` shares; every sample used, sizes differ by <= 1.

    Examples:
        >>> [len(p) for p in partition(10, 3, "iid")]
        [4, 3, 3]
    """
    owner = np.empty(total, dtype=np.int64)
    owner[rng.permutation(total)] = np.repeat(np.arange(n), _even_sizes(total, n))
    return owner


def _dirichlet(
    codes: np.ndarray, num_classes: int, n: int, alpha: float, min_size: int, self_balancing: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """``dirichlet`` (Hsu et al., 2019): each class's samples shuffled, then cut among the members by Dir(alpha) shares.

    Every sample is used. Per class (in sorted class order) the draws are a permutation of the class's
    indices, then the shares; the cut points are ``floor(cumsum(shares)[:-1] * class_size)``. A partition
    leaving a member below ``min_size`` is redrawn, up to 100 times. ``self_balancing`` (flwr-datasets'
    DirichletPartitioner) zeroes the shares of members already holding more than ``N / n`` samples.

    Examples:
        >>> labels = np.repeat(np.arange(3), 10)
        >>> parts = partition(labels, 2, "dirichlet", alpha=100.0)
        >>> sum(len(p) for p in parts), [len(set(labels[p].tolist())) for p in parts]
        (30, [3, 3])
    """
    _check_alpha(alpha, "dirichlet")
    if not isinstance(self_balancing, (bool, np.bool_)):
        raise ValueError(f"self_balancing must be True or False, got {self_balancing!r}")
    grouped, starts = _by_class(codes, num_classes)
    members = np.arange(n)
    concentration = np.full(n, alpha)
    average = len(codes) / n
    for _ in range(_DIRICHLET_TRIES):
        owner = np.empty(len(codes), dtype=np.int64)
        held = np.zeros(n, dtype=np.int64)
        for c in range(num_classes):
            idx = rng.permutation(grouped[starts[c]:starts[c + 1]])
            shares = rng.dirichlet(concentration)
            if self_balancing:
                balanced = np.where(held > average, 0.0, shares)
                if balanced.sum() > 0:
                    shares = balanced / balanced.sum()
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            counts = np.diff(np.concatenate(([0], cuts, [len(idx)])))
            owner[idx] = np.repeat(members, counts)
            held += counts
        if held.min() >= min_size:
            return owner
    raise ValueError(
        f"dirichlet partition with alpha={alpha} left a member with fewer than {min_size} samples "
        f"in {_DIRICHLET_TRIES} draws; raise alpha or use fewer members (num_members={n})"
    )


def _shards(codes: np.ndarray, num_classes: int, n: int, per_member: int, rng: np.random.Generator) -> np.ndarray:
    """``shards`` (McMahan et al., 2017): shuffle, stable-sort by label, cut into ``n * per_member`` equal shards, deal.

    Every sample is used; every member gets ``per_member`` shards, and shards differ in size by at most
    one sample, so member sizes differ by at most ``per_member``. Within a class the order is random, so
    which samples of a class land in a shard depends on the seed too.

    Examples:
        >>> labels = np.repeat(np.arange(4), 10)            # 8 shards of 5 samples, each within one class
        >>> [sorted(set(labels[p].tolist())) for p in partition(labels, 4, "shards", shards_per_member=2)]
        [[2, 3], [1, 3], [0, 1], [0, 2]]
    """
    if not is_int_at_least(per_member, 1):
        raise ValueError(f"shards_per_member must be an int >= 1, got {per_member!r}")
    num_shards = n * per_member
    if num_shards > len(codes):
        raise ValueError(
            f"shards partition cuts num_members * shards_per_member = {num_shards} shards but there are only "
            f"{len(codes)} samples; use fewer members or fewer shards_per_member"
        )
    by_label, _ = _by_class(codes, num_classes, order=rng.permutation(len(codes)))
    shard_owner = np.empty(num_shards, dtype=np.int64)
    shard_owner[rng.permutation(num_shards)] = np.arange(num_shards) // per_member
    owner = np.empty(len(codes), dtype=np.int64)
    owner[by_label] = np.repeat(shard_owner, _even_sizes(len(codes), num_shards))
    return owner


def _pathological(codes: np.ndarray, num_classes: int, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``pathological``: member ``i`` holds classes ``order[(i*k + j) % C]``, ``j < k``, of a shuffled class order.

    Every member holds exactly ``k`` distinct classes; each class held by ``h`` members is shuffled and
    cut into ``h`` nearly equal chunks (``np.array_split``), dealt to its holders in member order.
    Classes nobody holds (when ``n * k < C``) are unused.

    Examples:
        >>> labels = np.repeat(np.arange(4), 6)
        >>> [sorted(set(labels[p].tolist())) for p in partition(labels, 2, "pathological", labels_per_member=2)]
        [[0, 2], [1, 3]]
    """
    if not is_int_at_least(k, 1) or k > num_classes:
        raise ValueError(f"labels_per_member must be an int in [1, {num_classes}] (the number of classes), got {k!r}")
    # Deal classes round-robin from a shuffled order: member i gets slots i*k .. i*k+k-1 (mod C), so
    # every member has k distinct classes and every class is used once n*k >= C.
    order = rng.permutation(num_classes)
    held = order[(np.arange(n)[:, None] * k + np.arange(k)) % num_classes].ravel()
    holders = np.repeat(np.arange(n), k)[np.argsort(held, kind="stable")]  # by class, members ascending
    holder_starts = np.concatenate(([0], np.cumsum(np.bincount(held, minlength=num_classes))))
    grouped, starts = _by_class(codes, num_classes)
    owner = np.full(len(codes), -1, dtype=np.int64)
    for c in range(num_classes):
        members = holders[holder_starts[c]:holder_starts[c + 1]]
        if len(members):
            idx = rng.permutation(grouped[starts[c]:starts[c + 1]])
            owner[idx] = np.repeat(members, _even_sizes(len(idx), len(members)))
    return owner


def _size_skew(total: int, n: int, scheme: str, min_size: int, rng: np.random.Generator) -> np.ndarray:
    """``linear`` / ``square`` / ``exponential``: ``min_size`` + the rest by weight ``i+1``, ``(i+1)**2``, ``exp(i)``.

    Every sample is used (the sizes sum exactly to ``N``: floor, then largest remainder); the samples
    are a seeded permutation cut at those sizes, so each member's data is IID. The exponential weights
    are ``exp(i - (n - 1))``: the same ratios, no overflow for thousands of members.

    Examples:
        >>> [len(p) for p in partition(100, 4, "square")], [len(p) for p in partition(100, 4, "exponential")]
        ([4, 14, 30, 52], [4, 9, 24, 63])
    """
    i = np.arange(n, dtype=np.float64)
    weights = {"linear": i + 1, "square": (i + 1) ** 2, "exponential": np.exp(i - (n - 1))}[scheme]
    sizes = min_size + _largest_remainder(total - n * min_size, weights)
    return _cut_permutation(total, sizes, rng)


def _inner_dirichlet(
    codes: np.ndarray, num_classes: int, sizes: np.ndarray, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """``inner_dirichlet`` (Acar et al., 2021; flwr-datasets' InnerDirichletPartitioner): fixed sizes, Dir(alpha) mix.

    Each member draws class proportions from Dir(alpha) and its wanted class counts from a multinomial
    of its size over them. While a class is wanted more than it has samples, its takers are cut back in
    proportion to what they wanted (largest remainder, so the class is used up exactly), the class is
    closed, and each member's shortfall is redrawn over the classes still open (its proportions
    renormalised over them). Every round closes at least one class, so this ends within ``C`` rounds.
    Member sizes are exactly ``sizes``; within a class the samples are dealt in a seeded random order.

    Examples:
        >>> labels = np.repeat(np.arange(3), [10, 5, 5])
        >>> [len(p) for p in partition(labels, 4, "inner_dirichlet", sizes=[8, 6, 4, 2], alpha=0.3)]
        [8, 6, 4, 2]
    """
    _check_alpha(alpha, "inner_dirichlet")
    n = len(sizes)
    if not num_classes:  # no samples, so every size is 0
        return np.zeros(0, dtype=np.int64)
    available = np.bincount(codes, minlength=num_classes)
    proportions = rng.dirichlet(np.full(num_classes, alpha), size=n)
    taken = rng.multinomial(sizes, proportions)  # (members, classes)
    closed = np.zeros(num_classes, dtype=bool)
    for _ in range(num_classes + 1):
        wanted = taken.sum(axis=0)
        over = np.flatnonzero(wanted > available)
        if not len(over):
            break
        # Cut the takers of each over-subscribed class back to exactly its samples, in proportion.
        # Integer arithmetic: taken * available / wanted = cut + remainder / wanted, exactly.
        cut, remainder = np.divmod(taken[:, over] * available[over], wanted[over])
        missing = available[over] - cut.sum(axis=0)
        rank = np.argsort(np.argsort(-remainder, axis=0, kind="stable"), axis=0, kind="stable")
        taken[:, over] = cut + (rank < missing)
        closed[over] = True
        # Redraw each member's shortfall over the classes that still have room.
        short = sizes - taken.sum(axis=1)
        room = np.where(closed, 0, available - taken.sum(axis=0))
        weights = proportions * (room > 0)
        sums = weights.sum(axis=1, keepdims=True)
        fallback = room / max(room.sum(), 1)  # a member whose proportions are all on closed classes
        weights = np.where(sums > 0, weights / np.where(sums > 0, sums, 1), fallback)
        taken += rng.multinomial(short, weights)
    else:  # unreachable: every round closes a class, and the sizes fit the samples
        raise AssertionError("inner_dirichlet repair did not settle")
    # Deal the samples: each class's samples in a seeded order, cut among members 0..n-1, the rest unused.
    by_class, _ = _by_class(codes, num_classes, order=rng.permutation(len(codes)))
    runs = np.concatenate([taken.T, (available - taken.sum(axis=0))[:, None]], axis=1)  # (classes, n + 1)
    run_owner = np.tile(np.append(np.arange(n), -1), num_classes)
    owner = np.empty(len(codes), dtype=np.int64)
    owner[by_class] = np.repeat(run_owner, runs.ravel())
    return owner


def _natural(groups, total: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``natural``: whole groups (writers, users) dealt to members, ``floor(G/n)`` or ``ceil(G/n)`` each.

    The group order is shuffled (seeded), then cut into ``n`` nearly equal runs of groups. Every sample
    is used and all samples of one group go to one member. Needs at least ``n`` groups.

    Examples:
        >>> writers = ["ann", "bob", "ann", "cy", "dee", "bob"]
        >>> [p.tolist() for p in partition(6, 2, "natural", groups=writers, min_size=0)]
        [[0, 2, 3], [1, 4, 5]]
    """
    if groups is None:
        raise ValueError("the natural partition needs groups=...: one group id (writer, user, ...) per sample")
    group_codes, group_ids = encode_labels(groups)
    if len(group_codes) != total:
        raise ValueError(f"groups must have one entry per sample ({total} samples), got {len(group_codes)}")
    num_groups = len(group_ids)
    if num_groups < n:
        raise ValueError(
            f"natural partition needs at least num_members ({n}) groups, got {num_groups}; use fewer members"
        )
    group_owner = np.empty(num_groups, dtype=np.int64)
    group_owner[rng.permutation(num_groups)] = np.repeat(np.arange(n), _even_sizes(num_groups, n))
    return group_owner[group_codes]


def split_member(
    indices: np.ndarray, fractions: Sequence[float], seed: int = 0
) -> list[np.ndarray]:
    """Shuffle one member's indices and cut them into parts of the given fractions (e.g. train/vote/test).

    Sizes are rounded by largest remainder; every non-zero fraction gets at
    least one sample when the member has enough.

    Examples:
        >>> import numpy as np
        >>> [len(p) for p in split_member(np.arange(10), (0.8, 0.1, 0.1))]
        [8, 1, 1]
    """
    fractions = [float(f) for f in fractions]
    if any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    indices = np.random.default_rng(seed).permutation(np.asarray(indices))
    n = len(indices)
    # Largest-remainder rounding (exact fractions are never lost to float
    # error), then every non-zero fraction gets at least one sample, taken
    # from the largest part, while the member has enough samples.
    exact = np.asarray(fractions) * n
    sizes = np.floor(exact + 1e-9).astype(int)
    for i in np.argsort(-(exact - sizes), kind="stable")[: n - int(sizes.sum())]:
        sizes[i] += 1
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if n >= len(wanted):
        for i in wanted:
            if sizes[i] == 0:
                sizes[int(np.argmax(sizes))] -= 1
                sizes[i] = 1
    return [np.sort(p) for p in np.split(indices, np.cumsum(sizes)[:-1])]
