"""lightning-colearn: collective learning for PyTorch Lightning."""

from lightning_colearn.callbacks import CollectiveVoting, FederatedAveraging, ParticleSwarm, ProofOfLearning
from lightning_colearn.cohort import Cohort
from lightning_colearn.data import CohortDataModule
from lightning_colearn.functional import CohortMismatchError
from lightning_colearn.ledger import Ledger, LedgerError
from lightning_colearn.module import CohortModule
from lightning_colearn.mutual import MutualLearning
from lightning_colearn.optim import CohortOptimizer, StackedOptimizer
from lightning_colearn.stacked import StackedModel

__all__ = [
    "CollectiveVoting",
    "Cohort",
    "CohortDataModule",
    "CohortMismatchError",
    "CohortModule",
    "CohortOptimizer",
    "FederatedAveraging",
    "Ledger",
    "LedgerError",
    "MutualLearning",
    "ParticleSwarm",
    "ProofOfLearning",
    "StackedModel",
    "StackedOptimizer",
]
__version__ = "0.1.0"
