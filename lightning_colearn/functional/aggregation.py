"""Federated aggregation of client updates: FedAvg, robust statistics, Krum, Bulyan, q-FedAvg, FedProx.

An *update* is one client's ordered list of tensors (the same order as
``module.state_dict()``, e.g. ``list(module.state_dict().values())``); a
server holds one update per client and combines them into a new global state.
Nothing here knows about Lightning, so the same code serves a simulated
federation on one machine and a real server.

- :func:`fedavg` is the weighted mean of Federated Averaging (McMahan et al.,
  2017, "Communication-Efficient Learning of Deep Networks from Decentralized
  Data"), with weights usually the clients' sample counts.
- :func:`coordinate_median` and :func:`trimmed_mean` are the coordinate-wise
  robust estimators of Yin et al., 2018 ("Byzantine-Robust Distributed
  Learning: Towards Optimal Statistical Rates").
- :func:`krum` is Krum and multi-Krum (Blanchard et al., 2017, "Machine
  Learning with Adversaries: Byzantine Tolerant Gradient Descent").
- :func:`bulyan` is Bulyan (El Mhamdi et al., 2018, "The Hidden
  Vulnerability of Distributed Learning in Byzantium"): recursive Krum, then
  a coordinate-wise mean of the values nearest the median.
- :func:`qfedavg` is q-FedAvg (Li et al., 2020, "Fair Resource Allocation in
  Federated Learning"): clients with a higher loss weigh more.
- :func:`fedprox_term` is the proximal term FedProx adds to each client's
  local loss (Li et al., 2020, "Federated Optimization in Heterogeneous
  Networks").

Conventions shared by every aggregator:

- The result is a list of new tensors with the dtype and device of the first
  update; inputs are never modified and no autograd history is recorded.
- Floating tensors are aggregated in float64 and cast back. Integer and bool
  tensors (e.g. BatchNorm's ``num_batches_tracked``) have no meaningful
  average: they are copied from the first update.
- The robust estimators treat NaN as ``+inf`` when ordering values, so a
  client sending NaN or Inf is trimmed away like one sending huge values, and
  Krum (and Bulyan's Krum passes) gives any non-finite update an infinite
  score so it is never selected. FedAvg and q-FedAvg have no such defence:
  one such client ruins their result.

Examples:
    >>> import torch
    >>> honest = [[torch.tensor(v)] for v in ([0.0, 0.0], [1.0, 1.0], [2.0, 4.0], [3.0, 3.0])]
    >>> fedavg(honest, weights=[1, 1, 1, 5])   # weights: e.g. sample counts
    [tensor([2.2500, 2.5000])]
    >>> updates = honest + [[torch.tensor([1e30, float("nan")])]]   # one faulty client
    >>> fedavg(updates)
    [tensor([2.0000e+29,        nan])]
    >>> coordinate_median(updates)
    [tensor([2., 3.])]
    >>> trimmed_mean(updates, trim_ratio=0.2)   # drops 1 largest and 1 smallest per coordinate
    [tensor([2.0000, 2.6667])]
    >>> mean, chosen = krum(updates, num_byzantine=1, multi=2)
    >>> chosen   # the two updates closest to their neighbours
    [1, 3]
    >>> mean
    [tensor([2., 2.])]
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from lightning_colearn.functional.arithmetic import CohortMismatchError

__all__ = [
    "AGGREGATORS",
    "KRUM_WEIGHTINGS",
    "aggregate",
    "bulyan",
    "coordinate_median",
    "fedavg",
    "fednova",
    "fedprox_term",
    "local_step_norm",
    "krum",
    "qfedavg",
    "trimmed_mean",
]

AGGREGATORS = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum", "bulyan")
"""The method names :func:`aggregate` accepts."""

KRUM_WEIGHTINGS = ("uniform", "samples")
"""How multi-Krum and Bulyan average what they select: plainly, or weighted by the clients' weights."""


# ----------------------------------------------------------------- validation
def _check_updates(updates: Sequence[Sequence[Tensor]], caller: str) -> None:
    """Raise unless ``updates`` is a non-empty list of same-structure tensor lists.

    Every client is compared with client 0; the error names the client and
    the first tensor index where they differ.
    """
    if len(updates) == 0:
        raise ValueError(f"{caller} needs at least one update (one list of tensors per client), got none")
    for index, update in enumerate(updates):
        if update is None or isinstance(update, (str, bytes)) or not hasattr(update, "__iter__"):
            raise TypeError(f"update {index} is {type(update).__name__}; each update must be a list of tensors, "
                            "e.g. list(module.state_dict().values())")
        if isinstance(update, (Tensor, Mapping)):
            raise TypeError(
                f"update {index} is a {type(update).__name__}; each update must be a list of tensors, "
                "e.g. list(module.state_dict().values())"
            )
        for k, tensor in enumerate(update):
            if not isinstance(tensor, Tensor):
                raise TypeError(f"update {index} holds a {type(tensor).__name__} at tensor {k}, expected a Tensor")
    ref = updates[0]
    for index, update in enumerate(updates[1:], start=1):
        if len(update) != len(ref):
            raise CohortMismatchError(
                f"clients 0 and {index} differ in tensor count: {len(ref)} vs {len(update)}; "
                "every update needs the same tensors in the same order"
            )
        for k, (a, b) in enumerate(zip(ref, update)):
            if a.shape != b.shape:
                raise CohortMismatchError(
                    f"clients 0 and {index} differ at tensor {k}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
                )
            if a.dtype != b.dtype:
                raise CohortMismatchError(f"clients 0 and {index} differ at tensor {k}: dtype {a.dtype} vs {b.dtype}")


def _check_weights(weights: Sequence[float] | Tensor, count: int) -> Tensor:
    """Return ``weights`` as float64 on the CPU after checking length, finiteness, sign and sum."""
    if isinstance(weights, Tensor):
        if weights.dtype == torch.bool:
            raise TypeError("weights must be real numbers (e.g. sample counts), got a bool tensor")
        w = weights.detach().cpu()
    else:
        if isinstance(weights, (str, bytes, Mapping)) or not hasattr(weights, "__iter__"):
            raise TypeError(f"weights must be a sequence of numbers (one per update) or a 1-D tensor, got {type(weights).__name__}")
        w = list(weights)  # a list, a tuple or a 1-D numpy array
        # nested lists fall through to the shape check below
        bad = [v for v in w if isinstance(v, (bool, str, bytes, Mapping))
               or not isinstance(v, numbers.Real) and not isinstance(v, (list, tuple))]
        if bad:
            raise TypeError(f"weights must be real numbers (e.g. sample counts), got {bad[0]!r} in {w!r}")
    w = torch.as_tensor(w, dtype=torch.float64)
    if w.ndim != 1 or w.numel() != count:
        raise ValueError(f"weights must have one entry per update ({count}), got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    if (w < 0).any() or float(w.sum()) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {w.tolist()}")
    return w


def _as_int(name: str, value: object, minimum: int) -> int:
    try:
        if isinstance(value, bool):  # operator.index(True) is 1: a flag is not a count
            raise TypeError
        number = operator.index(value)  # accepts int and numpy integers, rejects 1.5
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {number}")
    return number


def _as_real(value: object) -> float:
    """``value`` as a float, or NaN (which fails every range check) when it is not a real number."""
    if isinstance(value, (str, bytes)):
        return math.nan
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _check_orderable(tensor: Tensor, k: int, caller: str) -> None:
    if tensor.is_complex():
        raise TypeError(f"{caller} orders values coordinate by coordinate; tensor {k} is complex ({tensor.dtype})")


# -------------------------------------------------------------------- helpers
def _stack(tensors: Sequence[Tensor]) -> Tensor:
    """Stack one tensor from every client into ``[n, *shape]`` on the first client's device."""
    device = tensors[0].device
    return torch.stack([t.detach().to(device) for t in tensors])


def _nan_as_inf(stacked: Tensor) -> Tensor:
    return torch.where(torch.isnan(stacked), torch.full_like(stacked, math.inf), stacked)


def _is_aggregated(tensor: Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


# ---------------------------------------------------------------- aggregators
@torch.no_grad()
def fedavg(updates: Sequence[Sequence[Tensor]], weights: Sequence[float] | Tensor | None = None) -> list[Tensor]:
    """Weighted mean of the updates (FedAvg, McMahan et al., 2017).

    Args:
        updates: one list of tensors per client.
        weights: one non-negative weight per client, e.g. its number of
            training samples; normalised to sum to one. ``None`` weighs every
            client equally. A client with weight 0 is left out entirely, so
            even a NaN update from it does not reach the result.

    Not robust: a single client with NaN, Inf or huge values ruins the result
    (use :func:`coordinate_median`, :func:`trimmed_mean` or :func:`krum`).

    Examples:
        >>> import torch
        >>> fedavg([[torch.tensor([0.0])], [torch.tensor([4.0])]], weights=[30, 10])
        [tensor([1.])]
    """
    _check_updates(updates, "fedavg")
    n = len(updates)
    w = torch.ones(n, dtype=torch.float64) if weights is None else _check_weights(weights, n)
    keep = torch.nonzero(w > 0).flatten().tolist()
    w = w[keep] / w[keep].sum()
    out = []
    for tensors in zip(*updates):
        first = tensors[0]
        if not _is_aggregated(first):
            out.append(first.clone())
            continue
        acc_dtype = torch.complex128 if first.is_complex() else torch.float64
        stacked = _stack([tensors[i] for i in keep]).to(acc_dtype)
        mean = torch.tensordot(w.to(device=stacked.device, dtype=acc_dtype), stacked, dims=1)
        out.append(mean.to(first.dtype))
    return out


@torch.no_grad()
def coordinate_median(updates: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """Coordinate-wise median of the updates (Yin et al., 2018).

    For an even number of clients the median is the mean of the two middle
    values. NaN counts as ``+inf``, so fewer than half the clients sending
    NaN, Inf or huge values cannot move a coordinate beyond the honest range.

    Examples:
        >>> import torch
        >>> coordinate_median([[torch.tensor([1.0, 9.0])], [torch.tensor([2.0, 8.0])], [torch.tensor([1e30, 7.0])]])
        [tensor([2., 8.])]
    """
    n = len(updates)

    def median(ordered: Tensor) -> Tensor:
        if n % 2:
            return ordered[n // 2].clone()
        return (ordered[n // 2 - 1].double() + ordered[n // 2].double()) / 2

    return _sorted_reduce(updates, "coordinate_median", median)


@torch.no_grad()
def trimmed_mean(updates: Sequence[Sequence[Tensor]], trim_ratio: float = 0.1) -> list[Tensor]:
    """Coordinate-wise trimmed mean of the updates (Yin et al., 2018).

    In every coordinate the ``k = floor(trim_ratio * n)`` largest and ``k``
    smallest of the ``n`` values are dropped and the rest averaged. NaN counts
    as ``+inf``, so it is among the largest values dropped. It tolerates up to
    ``k`` faulty clients; note that the default ``trim_ratio=0.1`` drops
    nothing when there are fewer than 10 clients.

    Args:
        updates: one list of tensors per client.
        trim_ratio: fraction dropped at each end, ``0 <= trim_ratio < 0.5``;
            0 is the plain mean.

    Examples:
        >>> import torch
        >>> updates = [[torch.tensor([v])] for v in (1.0, 2.0, 3.0, 10.0, -50.0)]
        >>> trimmed_mean(updates, trim_ratio=0.2)
        [tensor([2.])]
    """
    if not 0 <= _as_real(trim_ratio) < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio!r}")
    n = len(updates)
    k = math.floor(float(trim_ratio) * n)  # trim_ratio < 0.5 keeps at least one value
    return _sorted_reduce(updates, "trimmed_mean", lambda ordered: ordered[k : n - k].mean(dim=0, dtype=torch.float64))


def _sorted_reduce(updates: Sequence[Sequence[Tensor]], name: str, reduce: Callable[[Tensor], Tensor]) -> list[Tensor]:
    """Per tensor: stack the clients, sort every coordinate (NaN as +inf) and ``reduce`` over the client axis."""
    _check_updates(updates, name)
    out = []
    for index, tensors in enumerate(zip(*updates)):
        first = tensors[0]
        if not _is_aggregated(first):
            out.append(first.clone())
            continue
        _check_orderable(first, index, name)
        ordered = _nan_as_inf(_stack(tensors)).sort(dim=0).values
        out.append(reduce(ordered).to(first.dtype))
    return out


def _krum_distances(updates: Sequence[Sequence[Tensor]], caller: str = "krum") -> Tensor:
    """``[n, n]`` squared L2 distances between the updates; ``+inf`` on the diagonal and for non-finite updates."""
    n = len(updates)
    floating = [k for k, t in enumerate(updates[0]) if _is_aggregated(t)]
    for k in floating:
        _check_orderable(updates[0][k], k, caller)
    # One row per client: all floating tensors flattened together, in float64.
    columns = [_stack([u[k] for u in updates]).reshape(n, -1).to(torch.float64) for k in floating]
    flat = torch.cat(columns, dim=1) if columns else torch.zeros(n, 0, dtype=torch.float64)
    # Exact pairwise differences (not the |x|^2 + |y|^2 - 2xy expansion, which cancels badly for close updates).
    dist = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist").square()
    faulty = ~torch.isfinite(flat).all(dim=1)
    dist = torch.where(torch.isnan(dist), torch.full_like(dist, math.inf), dist)
    dist[faulty, :] = math.inf
    dist[:, faulty] = math.inf
    dist.fill_diagonal_(math.inf)  # a client is not its own neighbour
    return dist


def _krum_scores(updates: Sequence[Sequence[Tensor]], num_byzantine: int) -> Tensor:
    """Krum score of every update: summed squared distances to its ``n - f - 2`` nearest others."""
    dist = _krum_distances(updates)
    nearest = dist.topk(len(updates) - num_byzantine - 2, dim=1, largest=False).values
    return nearest.sum(dim=1)


def _check_krum_weighting(krum_weighting: object) -> str:
    if krum_weighting not in KRUM_WEIGHTINGS:
        raise ValueError(
            f"krum_weighting must be one of {', '.join(map(repr, KRUM_WEIGHTINGS))}, got {krum_weighting!r}"
        )
    return krum_weighting  # type: ignore[return-value]


@torch.no_grad()
def krum(
    updates: Sequence[Sequence[Tensor]],
    num_byzantine: int = 1,
    multi: int = 1,
    *,
    weights: Sequence[float] | Tensor | None = None,
    krum_weighting: str = "uniform",
) -> tuple[list[Tensor], list[int]]:
    """Krum (``multi=1``) and multi-Krum (``multi > 1``) of Blanchard et al., 2017.

    The score of update ``i`` is the sum of squared L2 distances, over all
    floating tensors flattened together (buffers included when present), to
    its ``n - f - 2`` nearest other updates, where ``f = num_byzantine``. The
    ``multi`` updates with the lowest scores are selected (ties go to the
    lower client index) and averaged. An update holding NaN or Inf scores
    ``+inf`` and is never selected while finite ones remain.

    How the selected updates are averaged is ``krum_weighting``:

    - ``"uniform"`` (the default, as Blanchard et al.): their plain mean.
      Every selected client counts the same, so a client cannot gain
      influence by claiming a large sample count; ``weights``, if given, are
      checked and otherwise ignored (so a caller can always pass them).
    - ``"samples"``: their mean weighted by ``weights`` (e.g. sample counts),
      as FedAvg weighs clients. Selection is unchanged; the claimed counts
      are trusted, so use it when counts come from the server's own records.

    Args:
        updates: one list of tensors per client; needs ``n >= 2f + 3``.
        num_byzantine: ``f``, the number of faulty clients to tolerate.
        multi: how many updates to select and average, ``1 <= multi <= n``.
        weights: one non-negative weight per client (all of them, not only
            the selected); needed by ``krum_weighting="samples"``.
        krum_weighting: ``"uniform"`` or ``"samples"`` (see above).

    Returns:
        The mean of the selected updates and their client indices, best score first.

    Examples:
        >>> import torch
        >>> updates = [[torch.tensor([v])] for v in (1.0, 1.1, 0.9, 1.05, 100.0)]
        >>> krum(updates, num_byzantine=1)   # 1.05 has the closest two neighbours
        ([tensor([1.0500])], [3])
        >>> krum(updates, num_byzantine=1, multi=2)[1]   # 1.0 and 1.1 tie: the lower index wins
        [3, 0]
        >>> krum(updates, num_byzantine=1, multi=2, weights=[3, 1, 1, 1, 1], krum_weighting="samples")[0]
        [tensor([1.0125])]
    """
    _check_updates(updates, "krum")
    n = len(updates)
    krum_weighting = _check_krum_weighting(krum_weighting)
    w = None if weights is None else _check_weights(weights, n)
    if krum_weighting == "samples" and w is None:
        raise ValueError(
            "krum_weighting='samples' averages the selected updates weighted by weights (e.g. sample counts), "
            "got weights=None; pass weights or use krum_weighting='uniform'"
        )
    f = _as_int("num_byzantine", num_byzantine, 0)
    if n < 2 * f + 3:  # Blanchard et al.'s n > 2f + 2; it also leaves n - f - 2 >= 1 neighbours to score
        hint = f"; use num_byzantine <= {(n - 3) // 2} or more clients" if n >= 3 else "; it needs at least 3 clients"
        raise ValueError(f"krum needs n >= 2 * num_byzantine + 3 updates, got n={n} with f={f}{hint}")
    multi = _as_int("multi", multi, 1)
    if multi > n:
        raise ValueError(f"multi must be in [1, {n}] (the number of updates), got {multi}")
    scores = _krum_scores(updates, f)
    chosen = torch.sort(scores, stable=True).indices[:multi].tolist()
    if krum_weighting == "samples":
        chosen_w = w[chosen]  # type: ignore[index]
        if float(chosen_w.sum()) <= 0:
            raise ValueError(
                f"krum_weighting='samples' cannot average the selected updates {chosen}: their weights are all 0"
            )
        mean = fedavg([updates[i] for i in chosen], chosen_w)
    else:
        mean = fedavg([updates[i] for i in chosen])  # the plain mean of the chosen
    # non-aggregated tensors (counters) come from the first update, as in every method
    return [m if _is_aggregated(first) else first.clone() for m, first in zip(mean, updates[0])], chosen


@torch.no_grad()
def bulyan(
    updates: Sequence[Sequence[Tensor]],
    num_byzantine: int = 1,
    weights: Sequence[float] | Tensor | None = None,
) -> tuple[list[Tensor], list[int]]:
    """Bulyan (El Mhamdi et al., 2018): recursive Krum, then a coordinate-wise mean around the median.

    With ``n`` updates and ``f = num_byzantine`` (needs ``n >= 4f + 3``):

    1. Select ``theta = n - 2f`` updates by Krum applied recursively: each
       pass scores the ``n_r`` updates not yet selected with Krum's score over
       that remaining set (squared distances to the ``n_r - f - 2`` nearest,
       at least 1) and moves the best one (ties: lower client index) to the
       selection.
    2. In every coordinate, average the ``beta = theta - 2f`` values of the
       selected updates closest to their coordinate-wise median (the mean of
       the two middle values when ``theta`` is even; ties in distance go to
       the update selected earlier).

    Step 1 keeps Krum's guarantee that the selection is near the honest
    updates; step 2 bounds every coordinate by honest values, which Krum
    alone does not (a Byzantine update can be close in L2 yet far in one
    coordinate). As in :func:`coordinate_median`, NaN counts as ``+inf``, and
    an update holding NaN or Inf is never selected while finite ones remain.

    ``weights=None`` is the paper's plain mean in step 2. With ``weights``
    (e.g. sample counts, all > 0) the ``beta`` values of each coordinate are
    averaged weighted by their clients' weights; selection is unchanged and
    the result stays within the range of the ``beta`` values, but the claimed
    counts are trusted.

    Args:
        updates: one list of tensors per client; needs ``n >= 4f + 3``.
        num_byzantine: ``f``, the number of faulty clients to tolerate.
        weights: ``None``, or one weight > 0 per client.

    Returns:
        The aggregate and the client indices of the ``theta`` selected updates, in selection order.

    Examples:
        >>> import torch
        >>> updates = [[torch.tensor([v, -v])] for v in (1.0, 1.1, 0.9, 1.05, 0.95, 1.3, 1e6)]
        >>> result, selected = bulyan(updates, num_byzantine=1)
        >>> selected   # theta = 7 - 2 = 5 picks, most central first; the outlier 1e6 is never one
        [0, 3, 4, 1, 2]
        >>> result     # beta = 3 values nearest the median 1.0: 0.95, 1.0, 1.05
        [tensor([ 1., -1.])]
    """
    _check_updates(updates, "bulyan")
    n = len(updates)
    f = _as_int("num_byzantine", num_byzantine, 0)
    if n < 4 * f + 3:
        hint = f"; use num_byzantine <= {(n - 3) // 4} or more clients" if n >= 3 else "; it needs at least 3 clients"
        raise ValueError(f"bulyan needs n >= 4 * num_byzantine + 3 updates, got n={n} with f={f}{hint}")
    w = None
    if weights is not None:
        w = _check_weights(weights, n)
        if (w <= 0).any():
            raise ValueError(
                f"bulyan weights must all be > 0 (a coordinate's beta nearest values could all come from "
                f"weight-0 clients), got {w.tolist()}"
            )
    theta, beta = n - 2 * f, n - 4 * f
    # 1. recursive Krum over the remaining updates
    dist = _krum_distances(updates, "bulyan")
    remaining, selected = list(range(n)), []
    for _ in range(theta):
        r = len(remaining)
        if r == 1:
            best = 0
        else:
            rows = torch.tensor(remaining)
            sub = dist.index_select(0, rows).index_select(1, rows)
            scores = sub.topk(max(r - f - 2, 1), dim=1, largest=False).values.sum(dim=1)
            best = int(torch.sort(scores, stable=True).indices[0])
        selected.append(remaining.pop(best))
    # 2. coordinate-wise: the beta selected values nearest the median, averaged
    out = []
    for tensors in zip(*updates):
        first = tensors[0]
        if not _is_aggregated(first):
            out.append(first.clone())
            continue
        stacked = _nan_as_inf(_stack([tensors[i] for i in selected]).to(torch.float64))
        ordered = stacked.sort(dim=0).values
        median = ordered[theta // 2] if theta % 2 else (ordered[theta // 2 - 1] + ordered[theta // 2]) / 2
        gap = (stacked - median).abs()
        gap = torch.where(torch.isnan(gap), torch.full_like(gap, math.inf), gap)  # inf - inf
        nearest = gap.sort(dim=0, stable=True).indices[:beta]
        values = stacked.gather(0, nearest)
        if w is None:
            mean = values.mean(dim=0)
        else:
            vw = w.to(stacked.device)[torch.tensor(selected, device=stacked.device)][nearest]
            mean = (values * vw).sum(dim=0) / vw.sum(dim=0)
        out.append(mean.to(first.dtype))
    return out, selected



def aggregate(
    updates: Sequence[Sequence[Tensor]],
    method: str = "fedavg",
    weights: Sequence[float] | Tensor | None = None,
    *,
    trim_ratio: float = 0.1,
    num_byzantine: int = 1,
    multi: int | None = None,
    krum_weighting: str = "uniform",
) -> list[Tensor]:
    """Aggregate client updates with the method named by ``method`` (one of :data:`AGGREGATORS`).

    - ``"fedavg"``: :func:`fedavg` with ``weights``.
    - ``"median"``: :func:`coordinate_median`.
    - ``"trimmed_mean"``: :func:`trimmed_mean` with ``trim_ratio``.
    - ``"krum"``: :func:`krum` with ``num_byzantine`` and ``multi=1``.
    - ``"multi_krum"``: :func:`krum` with ``num_byzantine``, ``multi``
      (default ``n - num_byzantine``) and ``krum_weighting``.
    - ``"bulyan"``: :func:`bulyan` with ``num_byzantine``, weighted by
      ``weights`` only when ``krum_weighting="samples"``.

    By default only FedAvg is weighted: the robust methods check ``weights``
    (so a bad value is still reported) and otherwise ignore them, which lets
    a caller always pass sample counts whatever the method.
    ``krum_weighting="samples"`` (default ``"uniform"``, the papers' plain
    mean) makes multi-Krum and Bulyan average what they select weighted by
    ``weights``; it needs ``weights`` for those two methods and changes
    nothing for the others (a single Krum update has nothing to weigh).

    Examples:
        >>> import torch
        >>> updates = [[torch.tensor([v])] for v in (1.0, 2.0, 3.0, 1e30, 2.5)]
        >>> aggregate(updates, "median")
        [tensor([2.5000])]
        >>> aggregate(updates, "multi_krum", num_byzantine=1)   # averages the 4 best
        [tensor([2.1250])]
        >>> aggregate(updates, "multi_krum", [1, 1, 1, 1, 4], num_byzantine=1, krum_weighting="samples")
        [tensor([2.2857])]
    """
    if method not in AGGREGATORS:
        raise ValueError(f"unknown aggregation method {method!r}; expected one of {', '.join(map(repr, AGGREGATORS))}")
    krum_weighting = _check_krum_weighting(krum_weighting)
    if method == "fedavg":
        return fedavg(updates, weights)
    if weights is not None and len(updates) > 0:
        _check_weights(weights, len(updates))
    if method == "median":
        return coordinate_median(updates)
    if method == "trimmed_mean":
        return trimmed_mean(updates, trim_ratio)
    if method == "krum":
        if multi not in (None, 1):
            raise ValueError(f"method 'krum' selects one update, got multi={multi}; use method 'multi_krum'")
        return krum(updates, num_byzantine, 1)[0]
    if method == "bulyan":
        if multi is not None:
            raise ValueError(f"method 'bulyan' selects n - 2 * num_byzantine updates itself, got multi={multi}; leave multi unset")
        if krum_weighting == "samples" and weights is None:
            raise ValueError("krum_weighting='samples' weighs Bulyan's mean by weights (e.g. sample counts), got weights=None")
        return bulyan(updates, num_byzantine, weights if krum_weighting == "samples" else None)[0]
    if multi is None:
        multi = len(updates) - _as_int("num_byzantine", num_byzantine, 0)
    return krum(updates, num_byzantine, multi, weights=weights, krum_weighting=krum_weighting)[0]


# ------------------------------------------------------------------- q-FedAvg
def _check_losses(losses: Sequence[float] | Tensor, count: int, q: float) -> Tensor:
    """``losses`` as float64 on the CPU after checking length, finiteness and sign (``> 0``, or ``>= 0`` at q = 0)."""
    if isinstance(losses, Tensor):
        if losses.dtype == torch.bool or losses.is_complex():
            raise TypeError(f"losses must be real numbers (each client's loss at the global model), got a {losses.dtype} tensor")
        values = losses.detach().cpu()
    else:
        if isinstance(losses, (str, bytes, Mapping)) or not hasattr(losses, "__iter__"):
            raise TypeError(f"losses must be a sequence of numbers (one per update) or a 1-D tensor, got {type(losses).__name__}")
        values = list(losses)
        bad = [v for v in values if isinstance(v, (bool, str, bytes, Mapping))
               or not isinstance(v, (numbers.Real, Tensor)) and not isinstance(v, (list, tuple))]
        if bad:
            raise TypeError(f"losses must be real numbers (each client's loss at the global model), got {bad[0]!r} in {values!r}")
        values = [float(v) if isinstance(v, Tensor) and v.numel() == 1 else v for v in values]
    f = torch.as_tensor(values, dtype=torch.float64)
    if f.ndim != 1 or f.numel() != count:
        raise ValueError(f"losses must have one entry per update ({count}), got shape {tuple(f.shape)}")
    if not torch.isfinite(f).all():
        raise ValueError(f"losses must be finite, got {f.tolist()}")
    if q == 0:
        if (f < 0).any():
            raise ValueError(f"losses must be >= 0, got {f.tolist()}")
    elif (f <= 0).any():
        raise ValueError(f"losses must be > 0 when q > 0 (q-FedAvg uses F_k ** (q - 1)), got {f.tolist()} with q={q}")
    return f


@torch.no_grad()
def qfedavg(
    global_params: Sequence[Tensor],
    updates: Sequence[Sequence[Tensor]],
    losses: Sequence[float] | Tensor,
    *,
    q: float,
    lipschitz: float,
    weights: Sequence[float] | Tensor | None = None,
) -> list[Tensor]:
    """q-FedAvg's server step (Li et al., 2020, "Fair Resource Allocation in Federated Learning", Algorithm 2).

    q-FFL minimises ``sum_k p_k F_k^(q+1) / (q+1)``: the larger ``q``, the
    more the clients with a high loss count, for a fairer spread of accuracy
    across clients. With ``x`` the global model, ``y_k`` client ``k``'s model
    after its local steps, ``F_k`` its loss at ``x`` and ``L = lipschitz``::

        Delta w_k = L * (x - y_k)
        Delta_k   = F_k^q * Delta w_k
        h_k       = q * F_k^(q-1) * ||Delta w_k||^2 + L * F_k^q
        x+        = x - sum_k p_k Delta_k / sum_k p_k h_k

    ``||Delta w_k||^2`` sums over all floating tensors together. ``p_k`` are
    ``weights`` (e.g. sample counts; uniform when None): the paper samples
    clients with probability ``p_k`` and sums the sample uniformly, so
    weighing a full round by ``p_k`` is the expectation of that.

    ``q = 0`` is FedAvg: ``h_k = L`` and ``x+ = x - sum p_k (x - y_k) / sum p_k``,
    equal to :func:`fedavg` up to rounding but not bit for bit, because
    ``x - (x - mean)`` is rounded differently from ``mean``.
    Numerically, every ``F_k^q`` is divided by the largest one before use (a
    common factor of ``Delta_k`` and ``h_k``, so the result is unchanged)
    and ``F_k^(q-1) = F_k^q / F_k``: large ``q`` neither overflows nor
    underflows, and ``q = 0`` never forms ``0 * F_k^-1``. Float64 arithmetic,
    cast back; non-floating tensors are copied from the first update; not
    robust (a NaN or huge update ruins the result, as with FedAvg).

    Args:
        global_params: ``x``, the model the clients started the round from.
        updates: ``y_k``, one list of tensors per client, like ``global_params``.
        losses: ``F_k``, each client's loss at ``x`` (on its training data);
            finite and ``> 0`` (``>= 0`` when ``q == 0``).
        q: the fairness parameter, a finite number ``>= 0``.
        lipschitz: ``L > 0``, an estimate of the Lipschitz constant of the
            gradients; the paper uses ``1 / local learning rate``.
        weights: ``p_k``, one non-negative weight per client (a client of
            weight 0 is left out entirely), or None for uniform.

    Examples:
        >>> import torch
        >>> x = [torch.tensor([0.0, 0.0])]
        >>> ys = [[torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 1.0])]]
        >>> qfedavg(x, ys, [1.0, 4.0], q=0.0, lipschitz=10.0)   # FedAvg
        [tensor([0.5000, 0.5000])]
        >>> qfedavg(x, ys, [1.0, 4.0], q=1.0, lipschitz=10.0)   # loss 4 pulls 4 times harder; h_k shortens the step
        [tensor([0.0400, 0.1600])]
    """
    _check_updates(updates, "qfedavg")
    n = len(updates)
    q_value = _as_real(q) if not isinstance(q, bool) else math.nan
    if not (math.isfinite(q_value) and q_value >= 0):
        raise ValueError(f"q must be a finite number >= 0, got {q!r}")
    lip = _as_real(lipschitz) if not isinstance(lipschitz, bool) else math.nan
    if not (math.isfinite(lip) and lip > 0):
        raise ValueError(f"lipschitz must be a finite number > 0 (the paper uses 1 / the local learning rate), got {lipschitz!r}")
    f = _check_losses(losses, n, q_value)
    w = torch.ones(n, dtype=torch.float64) if weights is None else _check_weights(weights, n)
    if global_params is None or isinstance(global_params, (Tensor, Mapping, str, bytes)) or not hasattr(global_params, "__iter__"):
        raise TypeError(f"global_params must be a list of tensors like each update, got {type(global_params).__name__}")
    global_params = list(global_params)
    ref = updates[0]
    for k, x in enumerate(global_params):
        if not isinstance(x, Tensor):
            raise TypeError(f"global_params holds a {type(x).__name__} at tensor {k}, expected a Tensor")
    if len(global_params) != len(ref):
        raise CohortMismatchError(f"global_params has {len(global_params)} tensors, each update has {len(ref)}")
    for k, (x, y) in enumerate(zip(global_params, ref)):
        if x.shape != y.shape or x.dtype != y.dtype:
            raise CohortMismatchError(
                f"global_params and update 0 differ at tensor {k}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}"
            )
        if x.is_complex():
            raise TypeError(f"qfedavg needs real tensors; tensor {k} is complex ({x.dtype})")
    keep = torch.nonzero(w > 0).flatten().tolist()
    p, f = w[keep], f[keep]
    floating = [k for k, t in enumerate(global_params) if t.is_floating_point()]
    device = global_params[floating[0]].device if floating else None
    # x - y_k in float64, one [clients, ...] stack per tensor; ||Delta w_k||^2 over all of them
    gaps = {}
    sq = torch.zeros(len(keep), dtype=torch.float64, device=device)
    for k in floating:
        x64 = global_params[k].detach().to(torch.float64)
        gap = x64 - _stack([updates[i][k] for i in keep]).to(device=x64.device, dtype=torch.float64)
        gaps[k] = gap
        sq = sq + gap.reshape(len(keep), -1).square().sum(dim=1).to(sq.device) * lip**2
    f = f.to(sq.device)
    if q_value == 0:
        scale = torch.ones_like(f)  # F^0 = 1, also for F = 0
        curvature = torch.zeros_like(f)  # q * F^(q-1) * ||Delta w||^2 = 0
    else:
        log_f = f.log()
        scale = torch.exp(q_value * (log_f - log_f.max()))  # F_k^q / max_j F_j^q
        curvature = q_value * sq / f
    p = p.to(sq.device)
    coef = p * scale  # p_k F_k^q (over the common factor)
    denominator = (coef * (curvature + lip)).sum()  # sum p_k h_k (over the common factor)
    out = []
    for k, x in enumerate(global_params):
        if k not in gaps:
            out.append(updates[0][k].clone())
            continue
        gap = gaps[k]
        step = torch.tensordot(coef.to(gap.device) * lip, gap, dims=1) / denominator.to(gap.device)
        out.append((x.detach().to(torch.float64) - step).to(x.dtype))
    return out


# ------------------------------------------------------------------- FedProx
def fedprox_term(params: Sequence[Tensor], global_params: Sequence[Tensor], mu: float) -> Tensor:
    """FedProx's proximal term ``(mu / 2) * sum_k ||params_k - global_params_k||^2`` (Li et al., 2020).

    Add it to a client's local loss to keep its model near the global one it
    started the round from. It is differentiable with respect to ``params``
    (its gradient is ``mu * (params - global_params)``); ``global_params`` are
    detached. Non-floating tensors (e.g. step counters) are skipped.

    Args:
        params: the client's current tensors, e.g. ``list(module.parameters())``.
        global_params: the global tensors of this round, in the same order.
        mu: the proximal coefficient, ``mu >= 0``; 0 gives plain FedAvg.

    Examples:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> term = fedprox_term([w], [torch.tensor([0.0, 0.0])], mu=0.1)
        >>> term
        tensor(0.2500, grad_fn=<MulBackward0>)
        >>> term.backward(); w.grad
        tensor([0.1000, 0.2000])
    """
    if not (math.isfinite(_as_real(mu)) and float(mu) >= 0):
        raise ValueError(f"mu must be a finite number >= 0, got {mu!r}")
    if len(params) != len(global_params):
        raise CohortMismatchError(f"params has {len(params)} tensors, global_params has {len(global_params)}")
    total: Tensor | None = None
    for k, (p, g) in enumerate(zip(params, global_params)):
        if p.shape != g.shape:
            raise CohortMismatchError(
                f"params and global_params differ at tensor {k}: shape {tuple(p.shape)} vs {tuple(g.shape)}"
            )
        if not p.is_floating_point():
            continue
        sq = (p - g.detach().to(device=p.device, dtype=p.dtype)).square().sum()
        total = sq if total is None else total + sq
    if total is None:
        device = params[0].device if len(params) else None
        total = torch.zeros((), device=device)
    return (float(mu) / 2) * total


# ------------------------------------------------------------------- FedNova
def local_step_norm(steps: int, momentum: float = 0.0) -> float:
    """``||a_i||_1`` of FedNova for ``steps`` local SGD steps with heavy-ball ``momentum`` (Wang et al. 2020, eq. 11).

    Plain SGD: ``steps``. With momentum ``rho``: ``(steps - rho * (1 - rho^steps) / (1 - rho)) / (1 - rho)``,
    how far ``steps`` momentum steps move compared with one plain step of the same gradient.

    Examples:
        >>> local_step_norm(5), round(local_step_norm(2, momentum=0.5), 6)
        (5.0, 2.5)
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    rho = _as_real(momentum) if not isinstance(momentum, bool) else math.nan
    if not (math.isfinite(rho) and 0 <= rho < 1):
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    if rho == 0:
        return float(steps)
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


@torch.no_grad()
def fednova(
    global_params: Sequence[Tensor],
    updates: Sequence[Sequence[Tensor]],
    steps: Sequence[int],
    weights: Sequence[float] | Tensor | None = None,
    *,
    momentum: float = 0.0,
) -> list[Tensor]:
    """FedNova's normalized averaging (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in
    Heterogeneous Federated Optimization").

    Clients that take more local steps move further; FedAvg then weighs their direction more than their
    data warrant and converges to another objective. FedNova averages each client's update per local
    step and rescales by the effective number of steps::

        d_i   = (x - y_i) / a_i                 a_i = local_step_norm(steps_i, momentum)
        tau   = sum_i p_i a_i                   p_i = weights_i / sum_j weights_j
        x+    = x - tau * sum_i p_i d_i

    With equal ``steps`` this is :func:`fedavg` (up to rounding). Float64 arithmetic, cast back;
    non-floating tensors come from the first update.

    Examples:
        >>> import torch
        >>> x = [torch.tensor([0.0])]
        >>> ys = [[torch.tensor([1.0])], [torch.tensor([4.0])]]     # client 1 took 4 steps, client 0 one
        >>> fedavg(ys), fednova(x, ys, steps=[1, 4])                 # FedAvg follows the busy client
        ([tensor([2.5000])], [tensor([2.5000])])
        >>> fednova(x, [[torch.tensor([1.0])], [torch.tensor([2.0])]], steps=[1, 4])
        [tensor([1.8750])]
    """
    _check_updates(updates, "fednova")
    n = len(updates)
    if isinstance(steps, (str, bytes)) or not hasattr(steps, "__len__") or len(steps) != n:
        raise ValueError(f"steps must hold one local step count per update ({n}), got {steps!r}")
    norms = torch.tensor([local_step_norm(s, momentum) for s in steps], dtype=torch.float64)
    w = torch.ones(n, dtype=torch.float64) if weights is None else _check_weights(weights, n)
    p = w / w.sum()
    global_params = list(global_params)
    if len(global_params) != len(updates[0]):
        raise CohortMismatchError(f"global_params has {len(global_params)} tensors, each update has {len(updates[0])}")
    tau = float((p * norms).sum())
    coef = p / norms * tau
    out = []
    for k, x in enumerate(global_params):
        if not x.is_floating_point():
            out.append(updates[0][k].clone())
            continue
        if x.shape != updates[0][k].shape:
            raise CohortMismatchError(f"global_params and update 0 differ at tensor {k}: {tuple(x.shape)} vs {tuple(updates[0][k].shape)}")
        x64 = x.detach().to(torch.float64)
        gaps = x64 - _stack([u[k] for u in updates]).to(device=x64.device, dtype=torch.float64)
        out.append((x64 - torch.tensordot(coef.to(x64.device), gaps, dims=1)).to(x.dtype))
    return out
