"""Particle-swarm moves on whole models: selection, best particle, fused moves.

Nytorch (``ParticleModule``) treats models as vectors: every k steps a few
particles are drawn, sorted by fitness, and each non-best one becomes
``alpha * best + (1 - alpha) * particle``. Classic accelerated PSO (Yang,
2010) moves every particle toward the best and adds a random term. These
functions hold that logic without Lightning; the callback
:class:`~lightning_colearn.callbacks.ParticleSwarm` applies it to a cohort.

Examples:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> chosen = select_particles(12, 6, g)
    >>> len(chosen), len(set(chosen.tolist()))
    (6, 6)
    >>> best, moves = plan_moves(torch.tensor([3, 5, 5, 7]), torch.tensor([0.2, 0.9, 0.9, 0.5]), maximize=False)
    >>> best, moves
    (3, {5: 2, 7: 1})
    >>> effective_alpha(0.5, 2)   # a member drawn twice moves twice
    0.75
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_colearn.functional.arithmetic import lerp_

__all__ = ["effective_alpha", "gaussian_perturb_", "move_toward_", "plan_moves", "select_particles"]


def select_particles(size: int, n_particles: int, generator: torch.Generator, replacement: bool = False) -> Tensor:
    """Draw ``n_particles`` member indices from ``range(size)``, without replacement unless asked.

    With replacement is Nytorch's behaviour (a member may be drawn twice).
    """
    if not 1 <= n_particles <= size and not replacement:
        raise ValueError(f"n_particles must be in [1, {size}] without replacement, got {n_particles}")
    if replacement:
        return torch.randint(size, (n_particles,), generator=generator)
    return torch.randperm(size, generator=generator)[:n_particles]


def plan_moves(chosen: Tensor, fitness: Tensor, maximize: bool) -> tuple[int, dict[int, int]]:
    """The best chosen member and, for every other chosen member, how many times it was drawn.

    ``fitness[k]`` belongs to ``chosen[k]``; NaN fitness counts as the worst.
    Ties go to the member drawn first.
    """
    if chosen.ndim != 1 or chosen.shape != fitness.shape or len(chosen) == 0:
        raise ValueError(f"chosen and fitness must be equal-length 1-D, got {tuple(chosen.shape)} and {tuple(fitness.shape)}")
    worst = -torch.inf if maximize else torch.inf
    score = torch.where(torch.isnan(fitness), torch.full_like(fitness, worst), fitness.float())
    best = int(chosen[int(score.argmax() if maximize else score.argmin())])
    counts = Counter(int(m) for m in chosen if int(m) != best)
    return best, dict(sorted(counts.items()))


def effective_alpha(alpha: float, times: int) -> float:
    """Moving ``times`` times by ``alpha`` toward a fixed point is one move by ``1 - (1 - alpha) ** times``."""
    return 1.0 - (1.0 - alpha) ** times


@torch.no_grad()
def move_toward_(targets: dict[int, Sequence[Tensor]], best: Sequence[Tensor], alpha: float, times: dict[int, int]) -> None:
    """Move each target state toward ``best`` in place, ``times[member]`` times, one fused call per multiplicity."""
    by_times: dict[int, list[Sequence[Tensor]]] = {}
    for member, state in targets.items():
        by_times.setdefault(times.get(member, 1), []).append(state)
    for k, states in sorted(by_times.items()):
        lerp_(states, best, effective_alpha(alpha, k))


@torch.no_grad()
def gaussian_perturb_(states: Sequence[Sequence[Tensor]], sigma: float, generator: torch.Generator) -> None:
    """Add N(0, sigma^2) noise to every floating tensor of every state (the random term of APSO).

    Noise is drawn on the CPU from ``generator`` (so it is reproducible on any
    device) and added with one fused call.
    """
    flat = [t for state in states for t in state if t.is_floating_point()]
    if not flat or sigma == 0:
        return
    noise = [torch.randn(t.shape, generator=generator, dtype=torch.float32).to(device=t.device, dtype=t.dtype) for t in flat]
    torch._foreach_add_(flat, noise, alpha=sigma)
