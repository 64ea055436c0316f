"""Population-based training, the math: search spaces, exploit plans and explore steps (pure, seeded).

Population-based training (Jaderberg et al. 2017, "Population Based Training of
Neural Networks") ranks a population every so often; each member in the bottom
quantile *exploits* (copies a random member of the top quantile: weights and
optimizer state) and *explores* (perturbs the copied hyperparameters). This
module holds the decisions; :class:`~lightning_colearn.callbacks.PopulationBasedTraining`
applies them to a cohort.

Choices (Ray Tune's ``PopulationBasedTraining`` makes the same ones unless said):

* the quantile holds ``ceil(N * quantile_fraction)`` members, at most ``N // 2``,
  so the top and bottom never overlap; a NaN score ranks last (a diverged member
  is replaced first); ties rank by member index (deterministic);
* explore: with ``resample_probability`` a value is drawn afresh from its
  distribution; otherwise a number is multiplied by one of ``perturbation_factors``
  (chosen uniformly) and a categorical value moves to a neighbouring choice.
  Values are clipped to their declared bounds and integers stay integers
  (Ray Tune users ask for both). Every explored value takes exactly two draws
  from the generator, so the random stream does not depend on the values.

Examples:
    >>> g = torch.Generator().manual_seed(0)
    >>> space = parse_space({"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1}, "layers": [1, 2, 4]})
    >>> space["lr"], space["layers"]
    (LogUniform(low=0.0001, high=0.1), Choice(values=(1, 2, 4)))
    >>> plan = exploit_plan(torch.tensor([0.9, 0.2, 0.5, 0.7]), 0.25, maximize=True, generator=g)
    >>> plan                                             # member 1 (worst) copies member 0 (best)
    {1: 0}
    >>> new = explore({"lr": 0.01, "layers": 2}, space, g, resample_probability=0.0)
    >>> round(new["lr"], 6) in (0.008, 0.012), new["layers"] in (1, 4)
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

__all__ = ["Choice", "IntUniform", "LogUniform", "Uniform", "exploit_plan", "explore", "parse_space", "quantile_size",
           "ranking", "sample"]


@dataclass(frozen=True)
class Uniform:
    """A float uniform in ``[low, high]``."""

    low: float
    high: float

    def draw(self, u: float) -> float:
        return self.low + u * (self.high - self.low)

    def clip(self, value: float) -> float:
        return min(max(float(value), self.low), self.high)


@dataclass(frozen=True)
class LogUniform(Uniform):
    """A float whose logarithm is uniform in ``[log low, log high]`` (learning rates, weight decays)."""

    def draw(self, u: float) -> float:
        return math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))


@dataclass(frozen=True)
class IntUniform:
    """An integer uniform in ``[low, high]``, both included."""

    low: int
    high: int

    def draw(self, u: float) -> int:
        return min(self.low + int(u * (self.high - self.low + 1)), self.high)

    def clip(self, value: float) -> int:
        return int(min(max(round(value), self.low), self.high))


@dataclass(frozen=True)
class Choice:
    """One of ``values`` (categorical; explore moves to a neighbouring value in this order)."""

    values: tuple

    def draw(self, u: float) -> Any:
        return self.values[min(int(u * len(self.values)), len(self.values) - 1)]


Distribution = Union[Uniform, LogUniform, IntUniform, Choice]
_TYPES = {"uniform": Uniform, "loguniform": LogUniform, "int": IntUniform, "randint": IntUniform, "choice": Choice}


def parse_space(space: Mapping[str, Any]) -> dict[str, Distribution]:
    """A search space from Python or YAML: ``{name: distribution}``.

    A distribution is a :class:`Uniform`, :class:`LogUniform`, :class:`IntUniform` or
    :class:`Choice`, a mapping ``{"type": "uniform" | "loguniform" | "int" | "choice", "low": ..,
    "high": ..}`` (``"values": [...]`` for ``choice``), or a list (a choice).

    Examples:
        >>> parse_space({"momentum": {"type": "uniform", "low": 0.5, "high": 0.99}, "n": {"type": "int", "low": 1, "high": 8}})
        {'momentum': Uniform(low=0.5, high=0.99), 'n': IntUniform(low=1, high=8)}
        >>> parse_space({"lr": {"type": "loguniform", "low": 0.0, "high": 1.0}})
        Traceback (most recent call last):
        ...
        ValueError: hyperparameters.lr: loguniform needs 0 < low < high, got low=0.0, high=1.0
    """
    if not isinstance(space, Mapping) or not space:
        raise ValueError(f"hyperparameters must be a non-empty mapping of name -> distribution, got {space!r}")
    return {str(name): _distribution(str(name), spec) for name, spec in space.items()}


def _distribution(name: str, spec: Any) -> Distribution:
    where = f"hyperparameters.{name}"
    if isinstance(spec, (Uniform, IntUniform, Choice)):
        spec = _as_mapping(spec)
    if isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):  # a list (or Hydra's ListConfig)
        spec = {"type": "choice", "values": list(spec)}
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: expected a distribution (a mapping with 'type', or a list of choices), got {spec!r}")
    kind = spec.get("type")
    if kind not in _TYPES:
        raise ValueError(f"{where}: type must be one of {sorted(_TYPES)}, got {kind!r}")
    extra = set(spec) - ({"type", "values"} if kind == "choice" else {"type", "low", "high"})
    if extra:
        raise ValueError(f"{where}: unknown keys {sorted(extra)} for type {kind!r}")
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, Sequence) or isinstance(values, str) or len(values) < 1:
            raise ValueError(f"{where}: choice needs a non-empty list of values, got {values!r}")
        return Choice(tuple(values))
    low, high = spec.get("low"), spec.get("high")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high))
    if kind in ("int", "randint"):
        if not (numbers and float(low).is_integer() and float(high).is_integer() and low <= high):
            raise ValueError(f"{where}: int needs integers low <= high, got low={low!r}, high={high!r}")
        return IntUniform(int(low), int(high))
    if not numbers or not low < high or (kind == "loguniform" and not low > 0):
        need = "0 < low < high" if kind == "loguniform" else "finite low < high"
        raise ValueError(f"{where}: {kind} needs {need}, got low={low!r}, high={high!r}")
    return _TYPES[kind](float(low), float(high))


def _as_mapping(dist: Distribution) -> dict[str, Any]:
    if isinstance(dist, Choice):
        return {"type": "choice", "values": list(dist.values)}
    kind = {LogUniform: "loguniform", Uniform: "uniform", IntUniform: "int"}[type(dist)]
    return {"type": kind, "low": dist.low, "high": dist.high}


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def sample(space: Mapping[str, Distribution], generator: torch.Generator) -> dict[str, Any]:
    """One value per hyperparameter, drawn from its distribution (one draw each, in the space's order).

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> values = sample({"lr": LogUniform(1e-3, 1e-1), "opt": Choice(("sgd", "adam"))}, g)
        >>> 1e-3 <= values["lr"] <= 1e-1, values["opt"] in ("sgd", "adam")
        (True, True)
    """
    return {name: dist.draw(_uniform(generator)) for name, dist in space.items()}


def quantile_size(n: int, fraction: float) -> int:
    """Members in the top (and in the bottom) quantile: ``ceil(n * fraction)``, at most ``n // 2``.

    Examples:
        >>> quantile_size(16, 0.25), quantile_size(3, 0.5), quantile_size(1, 0.25)
        (4, 1, 0)
    """
    return min(math.ceil(n * fraction), n // 2)


def ranking(scores: Sequence[float] | Tensor, maximize: bool, members: Sequence[int] | None = None) -> list[int]:
    """Positions of ``scores``, best first: a NaN score ranks last, ties rank by member index (``members[k]``,
    default ``k``), so the order never depends on anything but the scores.

    Examples:
        >>> ranking([0.2, float("nan"), 0.9, 0.9], maximize=True)
        [2, 3, 0, 1]
    """
    values = [float(s) for s in scores]
    members = list(range(len(values))) if members is None else list(members)

    def rank(k: int) -> tuple:
        v = values[k]
        return (math.isnan(v), 0.0 if math.isnan(v) else (-v if maximize else v), members[k])

    return sorted(range(len(values)), key=rank)


def exploit_plan(scores: Tensor, fraction: float, maximize: bool, generator: torch.Generator,
                 members: Sequence[int] | None = None) -> dict[int, int]:
    """``{bottom member: top member it copies}``: each bottom-quantile member draws one top member uniformly.

    Args:
        scores: one score per member of ``members`` (default: member ``i`` scores ``scores[i]``).
        fraction: the quantile, in ``(0, 0.5]``.
        maximize: True when a higher score is better.
        generator: draws the sources (one draw per bottom member, worst first).
        members: the members that take part (e.g. not a retired one).

    A NaN score ranks last; ties rank by member index.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> plan = exploit_plan(torch.tensor([0.3, float("nan"), 0.1, 0.2]), 0.5, maximize=False, generator=g)
        >>> list(plan), all(src in (2, 3) for src in plan.values())   # lower is better: NaN, then 0.3, copy 0.1 or 0.2
        ([1, 0], True)
    """
    members = list(range(len(scores))) if members is None else list(members)
    if len(members) != len(scores):
        raise ValueError(f"exploit_plan: {len(scores)} scores for {len(members)} members")
    order = ranking(scores, maximize, members)
    q = quantile_size(len(members), fraction)
    if q == 0:
        return {}
    top = [members[k] for k in order[:q]]
    bottom = [members[k] for k in reversed(order[-q:])]  # worst first
    return {dst: top[min(int(_uniform(generator) * q), q - 1)] for dst in bottom}


def explore(values: Mapping[str, Any], space: Mapping[str, Distribution], generator: torch.Generator, *,
            resample_probability: float = 0.25, perturbation_factors: Sequence[float] = (0.8, 1.2)) -> dict[str, Any]:
    """Perturbed copies of ``values``: resample (probability ``resample_probability``) or perturb each, within bounds.

    A number is multiplied by one of ``perturbation_factors`` (uniformly chosen),
    then clipped to ``[low, high]`` (an integer is rounded first); a categorical
    value moves one step left or right in its choices (staying at an end when it
    would leave them). Two draws per hyperparameter, whatever happens.

    Examples:
        >>> g = torch.Generator().manual_seed(1)
        >>> explore({"lr": 0.095}, {"lr": Uniform(0.0, 0.1)}, g, resample_probability=0.0, perturbation_factors=(1.2,))
        {'lr': 0.1}
    """
    out = {}
    for name, dist in space.items():
        u, r = _uniform(generator), _uniform(generator)
        value = values[name]
        if u < resample_probability:
            out[name] = dist.draw(r)
        elif isinstance(dist, Choice):
            if value not in dist.values:  # e.g. set by hand outside the choices: start afresh
                out[name] = dist.draw(r)
            else:
                k = dist.values.index(value) + (-1 if r < 0.5 else 1)
                out[name] = dist.values[min(max(k, 0), len(dist.values) - 1)]
        else:
            factor = perturbation_factors[min(int(r * len(perturbation_factors)), len(perturbation_factors) - 1)]
            out[name] = dist.clip(value * factor)
    return out
