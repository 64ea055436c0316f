"""Whole-model arithmetic on lists of tensors.

A member's *state* here is the ordered list of its parameters and buffers
(the same order as ``module.state_dict()``). Every function takes such lists,
so the same code serves a loop cohort, a stacked cohort and a federated
server holding client updates. Nothing here knows about Lightning.

The in-place functions use ``torch._foreach_*`` kernels: one call moves every
tensor of every affected member, with no autograd history and no new modules
(the "models are vectors" view of Nytorch's ``ParticleModule``, done without
state-dict round trips).

Examples:
    >>> import torch
    >>> a, b = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 6.0])]
    >>> weighted_average([a, b], torch.tensor([1.0, 3.0]))
    [tensor([2.5000, 5.0000])]
    >>> lerp_([a], b, 0.5); a
    [tensor([2., 4.])]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "CohortMismatchError",
    "check_same_structure",
    "copy_",
    "first_non_finite",
    "is_finite",
    "lerp_",
    "weighted_average",
    "weighted_sum",
]


class CohortMismatchError(ValueError):
    """Two members cannot be combined: their tensors differ in name, shape or dtype."""


def check_same_structure(states: Mapping[int, Mapping[str, Tensor]]) -> None:
    """Raise :class:`CohortMismatchError` unless every state has the same names, shapes and dtypes.

    ``states`` maps a member index to that member's named tensors; the error
    names the two members and the first tensor where they differ.

    Examples:
        >>> import torch
        >>> check_same_structure({0: {"w": torch.zeros(2)}, 1: {"w": torch.zeros(3)}})
        Traceback (most recent call last):
        ...
        lightning_colearn.functional.arithmetic.CohortMismatchError: members 0 and 1 differ at 'w': shape (2,) vs (3,)
    """
    items = list(states.items())
    if not items:
        return
    ref_index, ref = items[0]
    for index, state in items[1:]:
        if list(state) != list(ref):
            missing = [k for k in ref if k not in state]
            extra = [k for k in state if k not in ref]
            if missing:
                detail = f"{missing[0]!r}: present in member {ref_index}, missing in member {index}"
            elif extra:
                detail = f"{extra[0]!r}: present in member {index}, missing in member {ref_index}"
            else:
                detail = "the order of their tensors"
            raise CohortMismatchError(
                f"members {ref_index} and {index} differ at {detail}; "
                "this operation needs members of the same architecture"
            )
        for name, tensor in ref.items():
            other = state[name]
            if tensor.shape != other.shape:
                raise CohortMismatchError(
                    f"members {ref_index} and {index} differ at {name!r}: "
                    f"shape {tuple(tensor.shape)} vs {tuple(other.shape)}"
                )
            if tensor.dtype != other.dtype:
                raise CohortMismatchError(
                    f"members {ref_index} and {index} differ at {name!r}: "
                    f"dtype {tensor.dtype} vs {other.dtype}"
                )


def _check_weights(weights: Tensor | Sequence[float], count: int) -> Tensor:
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if weights.ndim != 1 or weights.numel() != count:
        raise ValueError(f"weights must have one entry per member ({count}), got shape {tuple(weights.shape)}")
    if not torch.isfinite(weights).all():
        raise ValueError(f"weights must be finite, got {weights.tolist()}")
    return weights


def weighted_sum(states: Sequence[Sequence[Tensor]], weights: Tensor | Sequence[float]) -> list[Tensor]:
    """Return ``sum_i weights[i] * states[i]`` tensor by tensor (new tensors).

    Floating tensors are combined in float64 and cast back, so averaging many
    members loses no precision. Integer and bool tensors (e.g. BatchNorm's
    ``num_batches_tracked``) cannot be scaled: they are taken from the first
    state.

    Examples:
        >>> import torch
        >>> weighted_sum([[torch.tensor([1.0])], [torch.tensor([2.0])]], [2.0, -1.0])
        [tensor([0.])]
    """
    if len(states) == 0:
        raise ValueError("weighted_sum needs at least one member state, got none")
    weights = _check_weights(weights, len(states))
    lengths = {len(s) for s in states}
    if len(lengths) != 1:
        raise CohortMismatchError(f"member states have different tensor counts: {sorted(lengths)}")
    out = []
    for tensors in zip(*states):
        first = tensors[0]
        if not (first.is_floating_point() or first.is_complex()):
            out.append(first.clone())
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for w, t in zip(weights.tolist(), tensors):
            if t.shape != first.shape:
                raise CohortMismatchError(f"cannot add tensors of shape {tuple(first.shape)} and {tuple(t.shape)}")
            acc.add_(t.to(torch.float64), alpha=w)
        out.append(acc.to(first.dtype))
    return out


def weighted_average(
    states: Sequence[Sequence[Tensor]], weights: Tensor | Sequence[float] | None = None
) -> list[Tensor]:
    """Return the (weighted) mean of member states; weights need not sum to one.

    This is FedAvg's aggregation when ``weights`` are the members' sample
    counts (McMahan et al., 2017).

    Examples:
        >>> import torch
        >>> weighted_average([[torch.tensor([0.0])], [torch.tensor([4.0])]], [3, 1])
        [tensor([1.])]
    """
    if len(states) == 0:
        raise ValueError("weighted_average needs at least one member state, got none")
    weights = torch.ones(len(states)) if weights is None else _check_weights(weights, len(states))
    total = float(weights.sum())
    if (weights < 0).any() or total <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {weights.tolist()}")
    return weighted_sum(states, weights / total)


@torch.no_grad()
def lerp_(targets: Sequence[Sequence[Tensor]], source: Sequence[Tensor], alpha: float) -> None:
    """Move every target state toward ``source`` in place: ``t <- alpha * source + (1 - alpha) * t``.

    All floating tensors of all targets move in one ``torch._foreach_lerp_``
    call. Non-floating tensors are left alone (a step counter is the member's
    own). ``alpha=1`` copies, ``alpha=0`` does nothing.
    """
    flat_targets, flat_sources = [], []
    for state in targets:
        if len(state) != len(source):
            raise CohortMismatchError(f"target has {len(state)} tensors, source has {len(source)}")
        for t, s in zip(state, source):
            if t.shape != s.shape:
                raise CohortMismatchError(f"cannot move a tensor of shape {tuple(t.shape)} toward {tuple(s.shape)}")
            if t.is_floating_point():
                flat_targets.append(t)
                flat_sources.append(s)
    if flat_targets:
        torch._foreach_lerp_(flat_targets, flat_sources, float(alpha))


@torch.no_grad()
def copy_(targets: Sequence[Sequence[Tensor]], source: Sequence[Tensor]) -> None:
    """Copy ``source`` into every target state in place (parameters keep their identity)."""
    flat_targets, flat_sources = [], []
    for state in targets:
        if len(state) != len(source):
            raise CohortMismatchError(f"target has {len(state)} tensors, source has {len(source)}")
        for t, s in zip(state, source):
            if t.shape != s.shape:
                raise CohortMismatchError(f"cannot copy a tensor of shape {tuple(s.shape)} into {tuple(t.shape)}")
            flat_targets.append(t)
            flat_sources.append(s)
    if flat_targets:
        torch._foreach_copy_(flat_targets, flat_sources)


def is_finite(tensors: Sequence[Tensor]) -> bool:
    """True when no floating tensor holds NaN or Inf."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def first_non_finite(state: Mapping[str, Tensor]) -> str | None:
    """The name of the first floating (or complex) tensor of ``state`` holding NaN or Inf, or None.

    Examples:
        >>> first_non_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")]), "n": torch.tensor([3])})
        'b'
    """
    for name, value in state.items():
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            return name
    return None
