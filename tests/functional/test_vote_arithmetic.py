"""Vote arithmetic: strictly-better votes, NaN, threshold edges, best-voted ties."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_colearn.functional.voting import best_voted, cast_votes, is_accepted


def test_votes_are_strictly_better_in_the_metric_direction_and_nan_never_votes_yes():
    proposal = torch.tensor([0.9, 0.8, math.nan, 0.7])
    current = torch.tensor([0.8, 0.8, 0.5, math.nan])
    assert cast_votes(proposal, current, maximize=True).tolist() == [True, False, False, False]
    assert cast_votes(proposal, current, maximize=False).tolist() == [False, False, False, False]
    assert cast_votes(torch.tensor([0.1]), torch.tensor([0.2]), maximize=False).tolist() == [True]


@pytest.mark.parametrize(
    ("yes", "voters", "threshold", "accepted"),
    [
        (3, 5, 0.6, True),  # exactly at the threshold (0.6 * 5 == 3.0000000000000004 in floats)
        (2, 4, 0.5, True),  # exactly at the threshold
        (1, 4, 0.5, False),
        (0, 4, 0.5, False),  # all no
        (4, 4, 1.0, True),  # unanimity needed and given
        (3, 4, 1.0, False),
        (1, 1, 0.5, True),  # a single voter decides
        (0, 1, 0.5, False),
        (0, 3, 0.0, True),  # threshold 0 accepts without any yes
    ],
)
def test_threshold_semantics(yes, voters, threshold, accepted):
    assert is_accepted(yes, voters, threshold) is accepted


def test_threshold_rejects_impossible_counts():
    with pytest.raises(ValueError, match="at least one voter"):
        is_accepted(0, 0, 0.5)
    with pytest.raises(ValueError, match=r"yes votes must be in \[0, 2\], got 3"):
        is_accepted(3, 2, 0.5)


def test_best_voted_breaks_ties_by_score_direction_then_index():
    assert best_voted([2, 3, 3], [0.9, 0.7, 0.8], maximize=True) == 2
    assert best_voted([2, 3, 3], [0.9, 0.7, 0.8], maximize=False) == 1
    assert best_voted([1, 1], [0.5, 0.5], maximize=True) == 0
    assert best_voted([1, 1], [math.nan, 0.1], maximize=True) == 1
    with pytest.raises(ValueError, match="at least one proposal"):
        best_voted([], [], maximize=True)
