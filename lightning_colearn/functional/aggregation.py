"""Federated aggregation of client updates: FedAvg, robust statistics, Krum, FedProx.

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
  Krum gives any non-finite update an infinite score so it is never selected.
  FedAvg has no such defence: one such client ruins its result.

Example:
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
    "aggregate",
    "coordinate_median",
    "fedavg",
    "fedprox_term",
    "krum",
    "trimmed_mean",
]

AGGREGATORS = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum")
"""The method names :func:`aggregate` accepts."""


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

    Example:
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

    Example:
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

    Example:
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


def _krum_scores(updates: Sequence[Sequence[Tensor]], num_byzantine: int) -> Tensor:
    """Krum score of every update: summed squared distances to its ``n - f - 2`` nearest others."""
    n = len(updates)
    floating = [k for k, t in enumerate(updates[0]) if _is_aggregated(t)]
    for k in floating:
        _check_orderable(updates[0][k], k, "krum")
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
    nearest = dist.topk(n - num_byzantine - 2, dim=1, largest=False).values
    return nearest.sum(dim=1)


@torch.no_grad()
def krum(
    updates: Sequence[Sequence[Tensor]], num_byzantine: int = 1, multi: int = 1
) -> tuple[list[Tensor], list[int]]:
    """Krum (``multi=1``) and multi-Krum (``multi > 1``) of Blanchard et al., 2017.

    The score of update ``i`` is the sum of squared L2 distances, over all
    floating tensors flattened together (buffers included when present), to
    its ``n - f - 2`` nearest other updates, where ``f = num_byzantine``. The
    ``multi`` updates with the lowest scores are selected (ties go to the
    lower client index) and their plain mean returned. An update holding
    NaN or Inf scores ``+inf`` and is never selected while finite ones remain.

    Args:
        updates: one list of tensors per client; needs ``n >= 2f + 3``.
        num_byzantine: ``f``, the number of faulty clients to tolerate.
        multi: how many updates to select and average, ``1 <= multi <= n``.

    Returns:
        The mean of the selected updates and their client indices, best score first.

    Example:
        >>> import torch
        >>> updates = [[torch.tensor([v])] for v in (1.0, 1.1, 0.9, 1.05, 100.0)]
        >>> krum(updates, num_byzantine=1)   # 1.05 has the closest two neighbours
        ([tensor([1.0500])], [3])
    """
    _check_updates(updates, "krum")
    n = len(updates)
    f = _as_int("num_byzantine", num_byzantine, 0)
    if n < 2 * f + 3:  # Blanchard et al.'s n > 2f + 2; it also leaves n - f - 2 >= 1 neighbours to score
        hint = f"; use num_byzantine <= {(n - 3) // 2} or more clients" if n >= 3 else "; it needs at least 3 clients"
        raise ValueError(f"krum needs n >= 2 * num_byzantine + 3 updates, got n={n} with f={f}{hint}")
    multi = _as_int("multi", multi, 1)
    if multi > n:
        raise ValueError(f"multi must be in [1, {n}] (the number of updates), got {multi}")
    scores = _krum_scores(updates, f)
    chosen = torch.sort(scores, stable=True).indices[:multi].tolist()
    mean = fedavg([updates[i] for i in chosen])  # the plain mean of the chosen
    # non-aggregated tensors (counters) come from the first update, as in every method
    return [m if _is_aggregated(first) else first.clone() for m, first in zip(mean, updates[0])], chosen


def aggregate(
    updates: Sequence[Sequence[Tensor]],
    method: str = "fedavg",
    weights: Sequence[float] | Tensor | None = None,
    *,
    trim_ratio: float = 0.1,
    num_byzantine: int = 1,
    multi: int | None = None,
) -> list[Tensor]:
    """Aggregate client updates with the method named by ``method`` (one of :data:`AGGREGATORS`).

    - ``"fedavg"``: :func:`fedavg` with ``weights``.
    - ``"median"``: :func:`coordinate_median`.
    - ``"trimmed_mean"``: :func:`trimmed_mean` with ``trim_ratio``.
    - ``"krum"``: :func:`krum` with ``num_byzantine`` and ``multi=1``.
    - ``"multi_krum"``: :func:`krum` with ``num_byzantine`` and ``multi``
      (default ``n - num_byzantine``).

    Only FedAvg is weighted: the robust methods check ``weights`` (so a bad
    value is still reported) and otherwise ignore them, which lets a caller
    always pass sample counts whatever the method.

    Example:
        >>> import torch
        >>> updates = [[torch.tensor([v])] for v in (1.0, 2.0, 3.0, 1e30, 2.5)]
        >>> aggregate(updates, "median")
        [tensor([2.5000])]
        >>> aggregate(updates, "multi_krum", num_byzantine=1)   # averages the 4 best
        [tensor([2.1250])]
    """
    if method not in AGGREGATORS:
        raise ValueError(f"unknown aggregation method {method!r}; expected one of {', '.join(map(repr, AGGREGATORS))}")
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
    if multi is None:
        multi = len(updates) - _as_int("num_byzantine", num_byzantine, 0)
    return krum(updates, num_byzantine, multi)[0]


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

    Example:
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
