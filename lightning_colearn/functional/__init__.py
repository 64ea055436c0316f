"""Pure tensor functions for collective learning (no Lightning, no Hydra)."""

from lightning_colearn.functional.arithmetic import (
    CohortMismatchError,
    check_same_structure,
    copy_,
    is_finite,
    lerp_,
    weighted_average,
    weighted_sum,
)

__all__ = [
    "CohortMismatchError",
    "check_same_structure",
    "copy_",
    "is_finite",
    "lerp_",
    "weighted_average",
    "weighted_sum",
]
