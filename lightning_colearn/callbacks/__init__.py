"""Communication rules between the members of a CohortModule, as Lightning callbacks."""

from lightning_colearn.callbacks.checkpoint import CheckpointWriteError, EpochCheckpoint
from lightning_colearn.callbacks.federated import SCAFFOLD, FederatedAveraging
from lightning_colearn.callbacks.pbt import PopulationBasedTraining, PopulationBasedTrainingReplay
from lightning_colearn.callbacks.pofl import ProofOfLearning
from lightning_colearn.callbacks.reporting import CohortProgressBar, LivePlots
from lightning_colearn.callbacks.swarm import ParticleSwarm
from lightning_colearn.callbacks.voting import CollectiveVoting

__all__ = ["CheckpointWriteError", "CohortProgressBar", "CollectiveVoting", "EpochCheckpoint", "FederatedAveraging", "LivePlots", "ParticleSwarm", "PopulationBasedTraining", "PopulationBasedTrainingReplay", "ProofOfLearning", "SCAFFOLD"]
