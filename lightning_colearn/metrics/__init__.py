"""Vote and consensus criteria on torchmetrics."""

from lightning_colearn.metrics.cohort import CohortMetric, higher_is_better
from lightning_colearn.metrics.scoring import score

__all__ = ["CohortMetric", "higher_is_better", "score"]
