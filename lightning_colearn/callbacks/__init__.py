"""Communication rules between the members of a CohortModule, as Lightning callbacks."""

from lightning_colearn.callbacks.swarm import ParticleSwarm

__all__ = ["ParticleSwarm"]
