"""Deep mutual learning losses (Zhang et al., CVPR 2018, "Deep Mutual Learning").

Student ``i`` minimises cross-entropy on the labels plus the mean KL
divergence from each peer's softened prediction to its own:

    L_i = CE(z_i, y) + kl_weight * T^2 / (n - 1) * sum_{j != i} KL(p_j^T || p_i^T)

with ``p^T = softmax(z / T)``; the peers' ``p_j`` are detached (a student
learns from its peers, it does not pull them), and ``T^2`` keeps the
gradient scale independent of ``T`` (Hinton et al., 2015). All n losses
come from one ``log_softmax`` per student: the peer sum is computed as a
total minus the student's own term, so the cost is O(n), not O(n^2).

``mode="mse"`` replaces the KL term by the mean squared error between the
student's logits and each (detached) peer's, for parity with KD_Lib's DML
default (``loss_fn=MSELoss``).

Examples:
    >>> import torch
    >>> z = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])]   # CE 0.1269 and 2.1269, KL 1.5232 both ways
    >>> [round(float(v), 4) for v in mutual_learning_losses(z, torch.tensor([0]))]
    [1.6501, 3.6501]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MODES", "mutual_learning_losses"]

MODES = ("kl", "mse")


def mutual_learning_losses(
    logits: Sequence[Tensor],
    target: Tensor,
    temperature: float | Sequence[float] = 1.0,
    kl_weight: float | Sequence[float] = 1.0,
    mode: str = "kl",
    return_parts: bool = False,
) -> list[Tensor] | tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """One loss per student; with ``return_parts`` also the CE and mimicry parts (detached).

    ``temperature`` and ``kl_weight`` are one number for all students or one per student
    (population-based training tunes them per student): student ``i`` softens every
    distribution with its own ``T_i`` and weighs its mimicry term with its own weight.
    """
    n = len(logits)
    if n < 2:
        raise ValueError(f"mutual learning needs at least 2 students' logits, got {n}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    temperatures, weights = (_per_student(v, n, name) for v, name in ((temperature, "temperature"), (kl_weight, "kl_weight")))
    if not all(t > 0 for t in temperatures):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if len(set(temperatures)) > 1 and mode == "kl":  # one temperature for all takes the shared path below
        return _per_student_losses(logits, target, temperatures, weights, return_parts)
    temperature = temperatures[0]
    shapes = {tuple(z.shape) for z in logits}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"every student's logits must have the same shape [batch, classes], got {sorted(shapes)}")
    z = [t.float() for t in logits]  # the loss in fp32 under autocast
    ce = [F.cross_entropy(t, target) for t in z]
    if mode == "mse":
        peers = torch.stack([t.detach() for t in z])
        total = peers.sum(0)
        # mean over peers j != i of mean((z_i - z_j)^2), written without the O(n^2) pairs
        sq = (peers**2).sum(0)
        mimic = [
            (((n - 1) * t**2 - 2 * t * (total - p) + (sq - p**2)) / (n - 1)).mean()
            for t, p in zip(z, peers)
        ]
    else:
        log_p = [F.log_softmax(t / temperature, dim=1) for t in z]
        peer_log_p = torch.stack([lp.detach() for lp in log_p])  # [n, B, C]
        peer_p = peer_log_p.exp()
        neg_entropy = (peer_p * peer_log_p).sum(2)  # [n, B]: sum_c p_j log p_j
        p_total, h_total = peer_p.sum(0), neg_entropy.sum(0)
        mimic = []
        for i, lp in enumerate(log_p):
            # sum_{j != i} KL(p_j || p_i) = sum_{j != i} sum_c p_j log p_j - sum_c (sum_{j != i} p_j) log p_i
            kl = (h_total - neg_entropy[i]) - ((p_total - peer_p[i]) * lp).sum(1)
            mimic.append(kl.mean() * temperature**2 / (n - 1))
    losses = [c + w * m for c, m, w in zip(ce, mimic, weights)]
    if return_parts:
        return losses, [c.detach() for c in ce], [m.detach() for m in mimic]
    return losses


def _per_student(value: float | Sequence[float], n: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{name} must be one number or one per student ({n}), got {len(values)} values")
    return values


def _per_student_losses(logits: Sequence[Tensor], target: Tensor, temperatures: list[float], weights: list[float],
                        return_parts: bool) -> Any:
    """The KL form with a temperature per student: student ``i`` compares its ``softmax(z_i / T_i)`` with every
    peer's ``softmax(z_j / T_i)`` (n softmaxes per student: the shared-temperature path needs n in all)."""
    n = len(logits)
    z = [t.float() for t in logits]
    ce = [F.cross_entropy(t, target) for t in z]
    mimic = []
    for i, t in enumerate(temperatures):
        lp = F.log_softmax(z[i] / t, dim=1)
        kl = sum(F.kl_div(lp, F.log_softmax(z[j].detach() / t, dim=1), log_target=True, reduction="none").sum(1)
                 for j in range(n) if j != i)
        mimic.append(kl.mean() * t**2 / (n - 1))
    losses = [c + w * m for c, m, w in zip(ce, mimic, weights)]
    if return_parts:
        return losses, [c.detach() for c in ce], [m.detach() for m in mimic]
    return losses
