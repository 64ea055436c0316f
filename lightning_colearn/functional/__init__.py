"""Pure tensor functions for collective learning (no Lightning, no Hydra)."""

from lightning_colearn.functional.aggregation import (
    AGGREGATORS,
    aggregate,
    coordinate_median,
    fedavg,
    fedprox_term,
    krum,
    trimmed_mean,
)
from lightning_colearn.functional.arithmetic import (
    CohortMismatchError,
    check_same_structure,
    copy_,
    first_non_finite,
    is_finite,
    lerp_,
    weighted_average,
    weighted_sum,
)

__all__ = [
    "AGGREGATORS",
    "CohortMismatchError",
    "aggregate",
    "check_same_structure",
    "coordinate_median",
    "copy_",
    "fedavg",
    "fedprox_term",
    "first_non_finite",
    "is_finite",
    "krum",
    "lerp_",
    "trimmed_mean",
    "weighted_average",
    "weighted_sum",
]
