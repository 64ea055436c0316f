"""lightning-colearn: collective learning for PyTorch Lightning.

The names below are imported on first use (PEP 562), so a tool that needs
only the ledger (``colearn-ledger``) starts without importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BlockRefused": "lightning_colearn.ledger",
    "CollectiveVoting": "lightning_colearn.callbacks",
    "Cohort": "lightning_colearn.cohort",
    "CohortDataModule": "lightning_colearn.data",
    "CohortMismatchError": "lightning_colearn.functional",
    "CohortModule": "lightning_colearn.module",
    "CohortOptimizer": "lightning_colearn.optim",
    "FederatedAveraging": "lightning_colearn.callbacks",
    "Ledger": "lightning_colearn.ledger",
    "LedgerError": "lightning_colearn.ledger",
    "MutualLearning": "lightning_colearn.mutual",
    "ParticleSwarm": "lightning_colearn.callbacks",
    "PopulationBasedTraining": "lightning_colearn.callbacks",
    "PopulationBasedTrainingReplay": "lightning_colearn.callbacks",
    "ProofOfLearning": "lightning_colearn.callbacks",
    "SCAFFOLD": "lightning_colearn.callbacks",
    "StackedModel": "lightning_colearn.stacked",
    "StackedOptimizer": "lightning_colearn.optim",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_colearn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
