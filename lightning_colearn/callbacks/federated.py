"""FederatedAveraging: FedAvg and robust aggregation over the clients of a cohort, as a Lightning callback.

Each round a seeded sample of clients starts from the global model, trains
``local_epochs`` passes over its own data, and the server aggregates their
weights: FedAvg weights them by training-sample count (McMahan et al. 2017);
``median``, ``trimmed_mean``, ``krum`` and ``multi_krum`` resist corrupt
clients (Yin et al. 2018; Blanchard et al. 2017). ``mu > 0`` adds FedProx's
proximal term ``mu/2 * ||w - w_global||^2`` to every client's loss (Li et al.
2020). The aggregate goes to every client; the server evaluates it on the
shared evaluation set each round and records when ``target`` is reached.

An aggregate with NaN/Inf values (e.g. FedAvg over a client that sent NaN) is
not installed: the round is discarded, every client returns to the previous
global model, and the record says why.

Example::

    dm = CohortDataModule("mnist_small", num_members=100, batch_size=20, partition="pathological", labels_per_member=2)
    trainer = L.Trainer(max_epochs=30, callbacks=[FederatedAveraging(clients_per_round=20, local_epochs=1)])
    trainer.fit(CohortModule(MLP, size=100), datamodule=dm)
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
from torch import Tensor

from lightning_colearn.callbacks.rounds import ClientRounds
from lightning_colearn.functional import arithmetic as FA
from lightning_colearn.functional.aggregation import AGGREGATORS, aggregate, fedprox_term
from lightning_colearn.module import CohortModule

__all__ = ["FederatedAveraging", "sample_counts"]


class FederatedAveraging(ClientRounds):
    """Federated averaging (or a robust aggregator) between the clients (members) of a :class:`CohortModule`.

    Args:
        clients_per_round, local_epochs, max_rounds, target, stop_at_target, criterion, maximize,
            eval_dataloader, eval_batches, reset_client_optimizer, seed: see :class:`ClientRounds`.
        aggregator: one of ``fedavg``, ``median``, ``trimmed_mean``, ``krum``, ``multi_krum``.
        mu: FedProx proximal weight (0: plain local training).
        trim_ratio: fraction trimmed at each end by ``trimmed_mean``.
        num_byzantine: corrupt clients ``krum`` / ``multi_krum`` tolerate.
    """

    name = "fedavg"

    def __init__(
        self,
        clients_per_round: int = 10,
        local_epochs: int = 1,
        aggregator: str = "fedavg",
        *,
        mu: float = 0.0,
        trim_ratio: float = 0.1,
        num_byzantine: int = 1,
        **kwargs: Any,
    ) -> None:
        errors = []
        if aggregator not in AGGREGATORS:
            errors.append(f"aggregator must be one of {list(AGGREGATORS)}, got {aggregator!r}")
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0 <= mu < math.inf:
            errors.append(f"mu must be a finite number >= 0, got {mu!r}")
        if isinstance(trim_ratio, bool) or not isinstance(trim_ratio, (int, float)) or not 0 <= trim_ratio < 0.5:
            errors.append(f"trim_ratio must be in [0, 0.5), got {trim_ratio!r}")
        if isinstance(num_byzantine, bool) or not isinstance(num_byzantine, int) or num_byzantine < 0:
            errors.append(f"num_byzantine must be an int >= 0, got {num_byzantine!r}")
        if errors:
            raise ValueError("FederatedAveraging: " + "; ".join(errors))
        super().__init__(clients_per_round, local_epochs, **kwargs)
        self.aggregator, self.mu, self.trim_ratio, self.num_byzantine = aggregator, float(mu), float(trim_ratio), num_byzantine
        self._global_state: dict[str, Tensor] | None = None
        self._global_params: list[Tensor] = []

    def check_module(self, pl_module: L.LightningModule) -> None:
        super().check_module(pl_module)
        n = self.clients_per_round
        if self.aggregator in ("krum", "multi_krum") and n < 2 * self.num_byzantine + 3:
            raise ValueError(
                f"FederatedAveraging: {self.aggregator} with num_byzantine={self.num_byzantine} needs "
                f"clients_per_round >= {2 * self.num_byzantine + 3}, got {n}"
            )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.mu > 0 and self._proximal not in pl_module.loss_terms:
            pl_module.loss_terms.append(self._proximal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._proximal in getattr(pl_module, "loss_terms", []):
            pl_module.loss_terms.remove(self._proximal)

    def _proximal(self, member: int) -> Tensor:
        params = self._module.cohort.member_parameters(member)  # differentiable on both backends
        return fedprox_term(params, self._global_params, self.mu)

    # ----------------------------------------------------------------- rounds
    def start_round(self, trainer: L.Trainer, pl_module: CohortModule, clients: list[int]) -> None:
        # every client holds the global model between rounds: keep it to fall back on and for FedProx
        self._module = pl_module
        self._global_state = pl_module.cohort.member_state(clients[0])
        self._global_params = [p.detach().clone() for p in pl_module.cohort[clients[0]].parameters()]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        if self._clients is not None and self._global_state is None:  # resumed mid-round
            # (between rounds every member held the global model; the non-sampled ones still do)
            holder = next((i for i in range(pl_module.size) if i not in self._clients), None)
            if holder is None:
                raise ValueError("FederatedAveraging cannot resume mid-round when every client was sampled; resume from a round boundary")
            self.start_round(trainer, pl_module, [holder])
        super().on_train_epoch_start(trainer, pl_module)

    def finish_round(self, trainer: L.Trainer, pl_module: CohortModule, clients: list[int]) -> dict[str, Any]:
        start = time.perf_counter()
        cohort = pl_module.cohort
        weights = sample_counts(trainer, clients)
        result = aggregate(
            [cohort.member_tensors(c) for c in clients], self.aggregator, weights,
            trim_ratio=self.trim_ratio, num_byzantine=self.num_byzantine,
        )
        installed = FA.is_finite(result)
        if installed:
            FA.copy_([cohort.member_tensors(i) for i in range(len(cohort))], result)
        else:  # discard the round: every client back to the previous global model
            for c in clients:
                cohort.load_member_state(c, self._global_state)
        aggregate_seconds = time.perf_counter() - start
        start = time.perf_counter()
        value = self.server_score(trainer, pl_module, 0)
        self._global_state = None
        return {
            "score": value,
            "installed": installed,
            "reason": "aggregated" if installed else "non-finite aggregate: round discarded",
            "aggregate_seconds": aggregate_seconds,
            "eval_seconds": time.perf_counter() - start,
        }


def sample_counts(trainer: L.Trainer, clients: list[int]) -> list[float]:
    """Each client's number of training samples (FedAvg's weights); equal weights without a CohortDataModule."""
    dm = trainer.datamodule
    if dm is not None and hasattr(dm, "member_sizes"):
        sizes = dm.member_sizes("train")
        return [float(sizes[c]) for c in clients]
    return [1.0] * len(clients)
