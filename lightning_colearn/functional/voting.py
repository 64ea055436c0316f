"""Vote arithmetic of collective learning (colearn's protocol): pure tensor functions.

A voter says yes when the proposal scores *strictly* better than its current
model on its own vote data; a NaN score never earns a yes. A proposal is
accepted when ``yes >= threshold * voters``, evaluated as ``yes / voters >=
threshold`` so that e.g. 3 of 5 at threshold 0.6 is exactly at the threshold
(``0.6 * 5`` is ``3.0000000000000004`` in floating point).

Examples:
    >>> import torch
    >>> votes = cast_votes(torch.tensor([0.9, 0.5, 0.8]), torch.tensor([0.8, 0.6, 0.8]), maximize=True)
    >>> votes.tolist()
    [True, False, False]
    >>> is_accepted(int(votes.sum()), voters=2, threshold=0.5)
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["best_voted", "cast_votes", "is_accepted"]


def cast_votes(proposal: Tensor, current: Tensor, maximize: bool) -> Tensor:
    """Per voter, whether ``proposal`` is strictly better than ``current`` (NaN on either side: no)."""
    if proposal.shape != current.shape:
        raise ValueError(f"proposal scores {tuple(proposal.shape)} and current scores {tuple(current.shape)} differ in shape")
    return proposal > current if maximize else proposal < current  # comparisons with NaN are False


def is_accepted(yes: int, voters: int, threshold: float) -> bool:
    """``yes >= threshold * voters`` (with ``voters >= 1`` and ``0 <= threshold <= 1``)."""
    if voters < 1:
        raise ValueError(f"a vote needs at least one voter, got voters={voters}")
    if not 0 <= yes <= voters:
        raise ValueError(f"yes votes must be in [0, {voters}], got {yes}")
    return yes / voters >= threshold


def best_voted(yes: Sequence[int], mean_scores: Sequence[float], maximize: bool) -> int:
    """Index of the proposal with most yes votes; ties go to the better mean vote score, then the lower index.

    Examples:
        >>> best_voted([2, 3, 3], [0.9, 0.7, 0.8], maximize=True)
        2
    """
    if not yes:
        raise ValueError("best_voted needs at least one proposal")
    scores = torch.tensor(list(mean_scores), dtype=torch.float64).nan_to_num(float("-inf") if maximize else float("inf"))
    sign = 1.0 if maximize else -1.0
    return max(range(len(yes)), key=lambda i: (yes[i], sign * float(scores[i]), -i))
