"""User-level differential privacy for federated averaging: clipping, the noised mean, adaptive clipping.

DP-FedAvg (McMahan et al., 2018, "Learning Differentially Private Recurrent
Language Models", Algorithm 1 with the fixed-denominator estimator
``f~_f``) makes one round of federated averaging a Gaussian mechanism over
*clients* (users), not over examples:

1. every sampled client clips its update ``Delta_i`` (its model minus the
   global model) to L2 norm at most ``C`` (:func:`clip_update`), so one client
   moves the sum by at most ``C``;
2. the server releases ``(sum_i Delta_i + N(0, (sigma C)^2 I)) / m`` with
   ``m`` the *expected* number of clients a round (:func:`dp_mean`).

Adaptive clipping (Andrew et al., 2021, "Differentially Private Learning
with Adaptive Clipping", Algorithm 1 with the geometric update) replaces the
fixed ``C`` by an online, differentially private estimate of a quantile
``gamma`` of the clients' update norms: every client also reports
``b_i = [||Delta_i|| <= C]``, the server releases the noised fraction ``b~``
(:func:`noised_fraction`) and moves ``C <- C exp(-eta (b~ - gamma))``
(:func:`adaptive_clip_norm`). Both releases together spend the budget of a
single Gaussian mechanism of noise multiplier ``sigma`` when the update noise
is :func:`split_noise_multiplier` ``(sigma, sigma_b)``.

Conventions, as in :mod:`~lightning_colearn.functional.aggregation`: an
update is a list of floating tensors (parameters; counters such as
``num_batches_tracked`` are refused: they cannot be clipped); inputs are
never modified; the arithmetic is float64 and each result is written back in
the dtype and on the device of the tensor it stands for. A bad argument is a
``ValueError``/``TypeError`` that names it as the federated privacy config's
field (``dp.clip_norm``, ``dp.noise_multiplier``, ...), the value seen and
what is allowed.

Noise comes from ``torch.normal`` in float64 with the given ``generator``,
drawn tensor by tensor in the order of the update, so a seeded generator
reproduces a round exactly. It is *not* cryptographically secure noise (a
floating-point Gaussian sampler leaks through its low bits, Mironov 2012, "On
Significance of the Least Significant Bits for Differential Privacy"): these
functions are for research and simulation, where the cohort's clients live in
one process.

Examples:
    >>> import torch
    >>> updates = [[torch.tensor([3.0, 4.0])], [torch.tensor([0.375, 0.5])]]   # norms 5 and 0.625
    >>> clipped = [clip_update(u, 1.0) for u in updates]
    >>> [(was, norm) for _, was, norm in clipped]
    [(True, 5.0), (False, 0.625)]
    >>> g = torch.Generator().manual_seed(0)
    >>> mean = dp_mean([c for c, _, _ in clipped], clip_norm=1.0, noise_multiplier=1.0, expected_clients=2, generator=g)
    >>> [t.shape for t in mean]
    [torch.Size([2])]
    >>> b = noised_fraction(1, reported_clients=2, expected_clients=2, count_noise_multiplier=0.5, generator=g)
    >>> new_clip = adaptive_clip_norm(1.0, b, target_quantile=0.5, learning_rate=0.2)
    >>> new_clip == 1.0 * math.exp(-0.2 * (b - 0.5))
    True
    >>> round(split_noise_multiplier(1.0, 5.0), 4)   # Andrew et al.: sigma_b = m / 20 with m = 100
    1.005
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_colearn.functional.aggregation import _as_real
from lightning_colearn.functional.arithmetic import CohortMismatchError

__all__ = [
    "DP_SIDES",
    "adaptive_clip_norm",
    "clip_update",
    "dp_mean",
    "noised_fraction",
    "split_noise_multiplier",
    "update_norm",
]

#: Where DP-FedAvg's noise is added: by the server to the sum, or by every client to its own update.
DP_SIDES = ("server", "client")


# ----------------------------------------------------------------- validation
def _positive(field: str, value: object) -> float:
    """``value`` as a float after checking it is a finite number > 0; the error names ``dp.<field>``."""
    number = math.nan if isinstance(value, bool) else _as_real(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"dp.{field} must be a finite number > 0, got {value!r}")
    return number


def _finite(field: str, value: object) -> float:
    number = math.nan if isinstance(value, bool) else _as_real(value)
    if not math.isfinite(number):
        raise ValueError(f"dp.{field} must be a finite number, got {value!r}")
    return number


def _count(field: str, value: object) -> int:
    """``value`` as an int >= 0 (Python or numpy integer, or an integral 0-d tensor; never a bool or a float)."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point() and value.dtype != torch.bool:
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"dp.{field} must be an integer >= 0, got {value!r}")
    return int(value)


def _check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _check_update(update: object, name: str, caller: str) -> list[Tensor]:
    """``update`` as a non-empty list of floating tensors."""
    if update is None or isinstance(update, (Tensor, str, bytes, Mapping)) or not hasattr(update, "__iter__"):
        raise TypeError(f"{caller}: {name} must be a list of tensors (a client's model minus the global model), "
                        f"got {type(update).__name__}")
    tensors = list(update)
    if not tensors:
        raise ValueError(f"{caller}: {name} holds no tensors; an update has one tensor per parameter")
    for k, tensor in enumerate(tensors):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{caller}: {name} holds a {type(tensor).__name__} at tensor {k}, expected a Tensor")
        if not tensor.is_floating_point():
            raise TypeError(f"{caller} takes floating tensors (parameters) only; {name} tensor {k} is {tensor.dtype} "
                            "(leave counters such as num_batches_tracked out of a DP update)")
    return tensors


def _norm64(tensors: Sequence[Tensor]) -> float:
    """The L2 norm of all the tensors together, in float64."""
    squares = sum(float(torch.linalg.vector_norm(t.detach().to(torch.float64)) ** 2) for t in tensors)
    return math.sqrt(squares)


def _noise(shape: torch.Size, std: float, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """``N(0, std^2)`` of ``shape`` in float64, drawn on the generator's device (the tensor's without one)."""
    where = generator.device if generator is not None else device
    return torch.normal(0.0, std, size=tuple(shape), generator=generator, dtype=torch.float64, device=where)


# --------------------------------------------------------------- clipping
@torch.no_grad()
def update_norm(update: Sequence[Tensor]) -> float:
    """The L2 norm of a client's update, over all its tensors together (as one flat vector), in float64.

    Examples:
        >>> import torch
        >>> update_norm([torch.tensor([3.0]), torch.tensor([[4.0]])])
        5.0
    """
    return _norm64(_check_update(update, "update", "update_norm"))


@torch.no_grad()
def clip_update(update: Sequence[Tensor], clip_norm: float) -> tuple[list[Tensor], bool, float]:
    """Scale a client's update to L2 norm at most ``clip_norm`` (McMahan et al., 2018, ``ClipFn`` "flat clipping").

    ``Delta <- Delta * min(1, C / ||Delta||)`` with the norm taken over all
    tensors together: an update of norm ``<= C`` is returned unchanged (as new
    tensors), a larger one is scaled down onto the sphere of radius ``C``, so
    its direction is kept. Returns ``(clipped, was_clipped, norm)``:
    ``was_clipped`` is ``norm > C`` (the complement of Andrew et al.'s
    ``b_i``, counted by :func:`noised_fraction`) and ``norm`` the norm
    *before* clipping. The scaling is float64; each tensor is written back in
    its dtype, so the clipped norm exceeds ``C`` by at most that dtype's
    rounding (a relative ``eps / 2``).

    A non-finite update (a diverged client) has no direction to keep and is
    refused with a ``ValueError``: drop that client from the round.

    Examples:
        >>> import torch
        >>> clipped, was_clipped, norm = clip_update([torch.tensor([3.0, 0.0]), torch.tensor([4.0])], 1.0)
        >>> clipped, was_clipped, norm
        ([tensor([0.6000, 0.0000]), tensor([0.8000])], True, 5.0)
        >>> clip_update([torch.tensor([0.375, 0.5])], 1.0)
        ([tensor([0.3750, 0.5000])], False, 0.625)
    """
    tensors = _check_update(update, "update", "clip_update")
    bound = _positive("clip_norm", clip_norm)
    norm = _norm64(tensors)
    if not math.isfinite(norm):
        raise ValueError(f"clip_update: the update's norm is {norm} (it holds NaN or Inf); a diverged client's update "
                         "cannot be clipped, leave it out of the round")
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    clipped = [(t.detach().to(torch.float64) * scale).to(t.dtype) for t in tensors]
    return clipped, norm > bound, norm


# ---------------------------------------------------------- the noised mean
@torch.no_grad()
def dp_mean(
    clipped_updates: Sequence[Sequence[Tensor]],
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_clients: float,
    generator: torch.Generator | None = None,
    side: str = "server",
) -> list[Tensor]:
    """The differentially private mean of clipped client updates (McMahan et al., 2018, DP-FedAvg).

    ``side="server"`` (the default) is the paper's estimator with a fixed
    denominator::

        mean = (sum_i Delta_i + N(0, (sigma C)^2 I)) / m

    with ``sigma`` = ``noise_multiplier``, ``C`` = ``clip_norm`` and ``m`` =
    ``expected_clients``, the number of clients sampled a round (``q W`` in
    the paper, with unit weights), *not* the number that reported: dividing by
    the random count of reporters would make the denominator depend on who
    took part, and the sensitivity of the mean would no longer be ``C / m``.
    The noise is one ``N(0, (sigma C)^2)`` tensor per parameter, drawn in
    float64 from ``generator`` in the order of the update.

    ``side="client"`` has every client add ``N(0, (sigma C)^2 / m I)`` to its
    own clipped update before the sum (the noise of distributed DP under
    secure aggregation: the server never sees a client's update, but a single
    noised update is far from private on its own: its noise is ``sigma / sqrt(m)``).
    When the ``m`` expected clients all report, the sum carries the same noise
    variance ``(sigma C)^2`` as the server side. When fewer report, the sum
    has less noise than ``sigma`` promises (``n/m`` of the variance for ``n``
    reporters), so an accountant that assumes ``sigma`` is **optimistic**: the
    server side adds the full noise whoever reports, and is the default for
    that reason. The client-side noise is drawn client by client, and within
    a client tensor by tensor.

    Every update must already be clipped to ``clip_norm``
    (:func:`clip_update`); one that is not (beyond its dtype's rounding) is a
    ``ValueError``, because the noise only protects updates of norm ``<= C``.
    More updates than ``expected_clients`` is fine (Poisson sampling of
    clients draws a random number of them); at least one is needed for the
    shapes: a round where no client reported is better skipped.

    Returns new tensors with the dtype and device of the first update's.

    Examples:
        >>> import torch
        >>> updates = [[torch.tensor([0.6, 0.8])], [torch.tensor([0.0, 0.5])]]
        >>> g = torch.Generator().manual_seed(0)
        >>> mean = dp_mean(updates, clip_norm=1.0, noise_multiplier=0.5, expected_clients=2, generator=g)
        >>> noise = torch.normal(0.0, 0.5 * 1.0, size=(2,), generator=torch.Generator().manual_seed(0),
        ...                      dtype=torch.float64)
        >>> torch.allclose(mean[0], ((torch.tensor([0.6, 1.3], dtype=torch.float64) + noise) / 2).float())
        True
    """
    if clipped_updates is None or isinstance(clipped_updates, (Tensor, str, bytes, Mapping)) \
            or not hasattr(clipped_updates, "__iter__"):
        raise TypeError(f"dp_mean: clipped_updates must be a list of updates (one list of tensors per client), "
                        f"got {type(clipped_updates).__name__}")
    updates = [_check_update(u, f"update {i}", "dp_mean") for i, u in enumerate(clipped_updates)]
    bound = _positive("clip_norm", clip_norm)
    sigma = _positive("noise_multiplier", noise_multiplier)
    m = _positive("expected_clients", expected_clients)
    if side not in DP_SIDES:
        raise ValueError(f"dp.side must be one of {list(DP_SIDES)}, got {side!r}")
    _check_generator(generator)
    if not updates:
        raise ValueError("dp_mean needs at least one clipped update (for the tensors' shapes); "
                         "a round where no client reported is better skipped")
    first = updates[0]
    for i, update in enumerate(updates):
        if len(update) != len(first):
            raise CohortMismatchError(f"dp_mean: update 0 has {len(first)} tensors, update {i} has {len(update)}")
        for k, (a, b) in enumerate(zip(first, update)):
            if a.shape != b.shape:
                raise CohortMismatchError(f"dp_mean: updates 0 and {i} differ at tensor {k}: "
                                          f"shape {tuple(a.shape)} vs {tuple(b.shape)}")
        # the rounding of a clipped update written back in its dtype: a relative eps / 2 per coordinate
        slack = max(torch.finfo(t.dtype).eps for t in update)
        norm = _norm64(update)
        if not norm <= bound * (1 + slack):
            raise ValueError(f"dp_mean takes clipped updates: update {i} has norm {norm:.6g} > dp.clip_norm {bound:g} "
                             "(clip it with clip_update first)")

    std = sigma * bound
    sums = [torch.zeros(t.shape, dtype=torch.float64, device=t.device) for t in first]
    if side == "server":
        for update in updates:
            for acc, t in zip(sums, update):
                acc.add_(t.detach().to(device=acc.device, dtype=torch.float64))
        for acc in sums:
            acc.add_(_noise(acc.shape, std, acc.device, generator).to(acc.device))
    else:
        client_std = std / math.sqrt(m)
        for update in updates:
            for acc, t in zip(sums, update):
                noised = t.detach().to(device=acc.device, dtype=torch.float64)
                noised = noised + _noise(acc.shape, client_std, acc.device, generator).to(acc.device)
                acc.add_(noised)
    return [(acc / m).to(t.dtype) for acc, t in zip(sums, first)]


# -------------------------------------------------------- adaptive clipping
def noised_fraction(
    unclipped_count: int,
    *,
    reported_clients: int,
    expected_clients: float,
    count_noise_multiplier: float,
    generator: torch.Generator | None = None,
) -> float:
    """The noised fraction of clients whose update norm was ``<= C`` (Andrew et al., 2021, Algorithm 1).

    Every reporting client sends ``b_i = [||Delta_i|| <= C]``; the server
    releases::

        b~ = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2

    with ``m`` = ``expected_clients`` and ``sigma_b`` =
    ``count_noise_multiplier``. Centring every ``b_i`` on ``1/2`` is what gives
    the count a sensitivity of ``1/2`` (adding or removing a client moves the
    centred sum by exactly ``1/2``), which is where the factor 2 of
    :func:`split_noise_multiplier` comes from. When all ``m`` expected
    clients report (``reported_clients == m``) this is the paper's
    ``(sum_i b_i + N(0, sigma_b^2)) / m``; when fewer or more report, the
    plain count would leak the number of reporters with sensitivity 1, so
    the centred form is the private one, and it needs ``reported_clients``.

    The noise is a single float64 draw ``torch.normal(0.0, sigma_b, size=(1,),
    generator=generator, dtype=torch.float64)``. The result can fall outside
    ``[0, 1]``: it is an unbiased, noised estimate, to be fed as it is to
    :func:`adaptive_clip_norm`.

    Examples:
        >>> import torch
        >>> b = noised_fraction(3, reported_clients=4, expected_clients=4, count_noise_multiplier=0.2,
        ...                     generator=torch.Generator().manual_seed(0))
        >>> z = torch.normal(0.0, 0.2, size=(1,), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> math.isclose(b, (3 + z.item()) / 4)
        True
    """
    count = _count("unclipped_count", unclipped_count)
    reported = _count("reported_clients", reported_clients)
    m = _positive("expected_clients", expected_clients)
    sigma_b = _positive("count_noise_multiplier", count_noise_multiplier)
    _check_generator(generator)
    if count > reported:
        raise ValueError(f"dp.unclipped_count must be <= dp.reported_clients ({reported}), got {count}")
    z = torch.normal(0.0, sigma_b, size=(1,), generator=generator, dtype=torch.float64,
                     device=generator.device if generator is not None else "cpu")
    return (count - reported / 2 + float(z.item())) / m + 0.5


def adaptive_clip_norm(clip_norm: float, unclipped_fraction: float, *, target_quantile: float,
                       learning_rate: float) -> float:
    """The next round's clipping norm: ``C exp(-eta (b~ - gamma))`` (Andrew et al., 2021, geometric update).

    ``unclipped_fraction`` is ``b~``, the noised fraction of clients whose
    update norm was ``<= C`` (:func:`noised_fraction`; any finite number, the
    noise may take it outside ``[0, 1]``), ``target_quantile`` is ``gamma``
    and ``learning_rate`` is ``eta``. When fewer clients than ``gamma`` fit
    under ``C`` (``b~ < gamma``), ``C`` grows; when more do, it shrinks; at
    most by a factor ``exp(eta)`` a round while ``b~`` stays in ``[0, 1]``.
    This is online gradient descent on ``log C`` for the pinball loss of the
    ``gamma``-quantile of the update norms, so ``C`` tracks that quantile. No
    privacy is spent here: the update is post-processing of ``b~``.

    Examples:
        >>> c = adaptive_clip_norm(1.0, 0.3, target_quantile=0.5, learning_rate=0.2)   # too few fit: C grows
        >>> c == math.exp(0.2 * 0.2), c > 1.0
        (True, True)
        >>> adaptive_clip_norm(1.0, 0.9, target_quantile=0.5, learning_rate=0.2) < 1.0
        True
    """
    c = _positive("clip_norm", clip_norm)
    b = _finite("unclipped_fraction", unclipped_fraction)
    gamma = math.nan if isinstance(target_quantile, bool) else _as_real(target_quantile)
    if not 0 < gamma < 1:
        raise ValueError(f"dp.target_quantile must be a number in (0, 1), got {target_quantile!r}")
    eta = _positive("clip_learning_rate", learning_rate)
    new = c * math.exp(-eta * (b - gamma))
    if not (math.isfinite(new) and new > 0):
        raise ValueError(f"adaptive_clip_norm: the clipping norm {c:g} moved to {new!r} (C exp(-{eta:g} ({b:g} - {gamma:g}))); "
                         "the learning rate or the fraction is out of any sensible range")
    return new


def split_noise_multiplier(noise_multiplier: float, count_noise_multiplier: float) -> float:
    """The update's noise multiplier ``sigma_Delta`` that, with the count's ``sigma_b``, spends exactly ``sigma``.

    Andrew et al. (2021, Theorem 1) show that one round releasing the noised
    sum of clipped updates (noise multiplier ``sigma_Delta``) and the noised
    centred count (std ``sigma_b`` on a query of sensitivity ``1/2``, so noise
    multiplier ``2 sigma_b``) is as private as one Gaussian mechanism of noise
    multiplier ``sigma`` with ``sigma^-2 = sigma_Delta^-2 + (2 sigma_b)^-2``.
    So for a budget ``sigma``::

        sigma_Delta = (sigma^-2 - (2 sigma_b)^-2)^(-1/2)

    which exists only when ``2 sigma_b > sigma``, i.e. ``sigma_b > sigma / 2``;
    the closer ``sigma_b`` is to that bound, the more of the budget the count
    takes and the more noise the update needs. The accountant is then fed
    ``sigma`` (not ``sigma_Delta``) for the round.

    Examples:
        >>> round(split_noise_multiplier(1.0, 5.0), 6)   # the count takes 1% of the budget: 0.5% more update noise
        1.005038
        >>> split_noise_multiplier(1.0, 0.5)
        Traceback (most recent call last):
        ...
        ValueError: dp.count_noise_multiplier must be > dp.noise_multiplier / 2 = 0.5 for the update noise and the count noise to fit in a budget of noise multiplier 1.0 (Andrew et al. 2021), got 0.5
    """
    sigma = _positive("noise_multiplier", noise_multiplier)
    sigma_b = _positive("count_noise_multiplier", count_noise_multiplier)
    rest = sigma ** -2 - (2 * sigma_b) ** -2  # the update's share of the budget, in precision (1 / variance)
    if not (2 * sigma_b > sigma and rest > 0):
        raise ValueError(f"dp.count_noise_multiplier must be > dp.noise_multiplier / 2 = {sigma / 2:g} for the update noise "
                         f"and the count noise to fit in a budget of noise multiplier {sigma!r} (Andrew et al. 2021), "
                         f"got {count_noise_multiplier!r}")
    return rest ** -0.5
