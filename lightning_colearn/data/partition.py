"""Partition one data set over the members of a cohort, deterministically from a seed.

Three schemes, as in the federated-learning literature:

* ``iid``: shuffle, then deal out equal shares (sorted input still gives IID members).
* ``dirichlet``: for each class, member shares drawn from Dir(alpha) (Hsu et
  al., 2019, "Measuring the effects of non-identical data distribution");
  small alpha = few classes per member.
* ``shards``: each member holds exactly ``labels_per_member`` classes, each
  class split evenly among the members holding it (McMahan et al., 2017,
  pathological non-IID).

Each member's share is then split into train / vote / test parts
(:func:`split_member`): "vote" is the member's own held-out data that later
judges proposals.

Example:
    >>> import numpy as np
    >>> labels = np.repeat(np.arange(10), 20)          # sorted by label
    >>> parts = partition(labels, 4, "iid", seed=0)
    >>> [len(p) for p in parts], sorted(np.concatenate(parts).tolist()) == list(range(200))
    ([50, 50, 50, 50], True)
    >>> [sorted(set(labels[p].tolist())) for p in partition(labels, 5, "shards", labels_per_member=2, seed=0)]
    [[4, 6], [2, 7], [3, 5], [0, 9], [1, 8]]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lightning_colearn._checks import is_int_at_least

__all__ = ["PARTITIONS", "partition", "split_member"]

PARTITIONS = ("iid", "dirichlet", "shards")


def partition(
    labels: np.ndarray | Sequence[int],
    num_members: int,
    scheme: str = "iid",
    *,
    seed: int = 0,
    alpha: float = 0.5,
    labels_per_member: int = 2,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Split sample indices ``0..len(labels)-1`` over ``num_members``; returns one sorted index array per member.

    The parts are disjoint. ``iid`` and ``dirichlet`` use every sample;
    ``shards`` uses every sample of every class some member holds (all
    classes when ``num_members * labels_per_member >= num_classes``).
    ``min_size`` is the fewest samples any member may get; ``dirichlet``
    redraws (up to 100 times) until every member has that many.
    """
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
        parts = _dirichlet(labels, num_members, alpha, min_size, rng)
    elif scheme == "shards":
        parts = _shards(labels, num_members, labels_per_member, rng)
    else:
        raise ValueError(f"partition must be one of {PARTITIONS}, got {scheme!r}")
    return [np.sort(p).astype(np.int64) for p in parts]


def _dirichlet(labels: np.ndarray, n: int, alpha: float, min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 for the dirichlet partition, got {alpha}")
    classes = np.unique(labels)
    for _ in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(n)]
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


def _shards(labels: np.ndarray, n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(labels)
    if not is_int_at_least(k, 1) or k > len(classes):
        raise ValueError(f"labels_per_member must be an int in [1, {len(classes)}], got {k!r}")
    # Deal classes round-robin from a shuffled order: member i gets slots
    # i*k .. i*k+k-1 (mod C), so every member has k distinct classes and
    # every class is used once n*k >= C.
    order = rng.permutation(classes)
    held = [[order[(i * k + j) % len(classes)] for j in range(k)] for i in range(n)]
    holders = {c: [i for i in range(n) if c in held[i]] for c in classes}
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c, members in holders.items():
        if not members:
            continue
        idx = rng.permutation(np.flatnonzero(labels == c))
        for member, chunk in zip(members, np.array_split(idx, len(members))):
            parts[member].append(chunk)
    return [np.concatenate(p) for p in parts]


def split_member(
    indices: np.ndarray, fractions: Sequence[float], seed: int = 0
) -> list[np.ndarray]:
    """Shuffle one member's indices and cut them into parts of the given fractions (e.g. train/vote/test).

    Sizes are rounded by largest remainder; every non-zero fraction gets at
    least one sample when the member has enough.

    Example:
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
