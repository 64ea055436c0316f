"""Federated strategies over the clients of a cohort, as Lightning callbacks: FedAvg and its peers' baselines.

Each round a seeded sample of clients starts from the global model, trains
``local_epochs`` passes over its own data, and the server combines their models:

* aggregation: FedAvg weights them by training-sample count (McMahan et al.
  2017); ``median``, ``trimmed_mean``, ``krum``, ``multi_krum`` and
  ``bulyan`` resist corrupt clients (Yin et al. 2018; Blanchard et al. 2017;
  El Mhamdi et al. 2018); ``qfedavg`` reweights clients by their loss for a
  fairer spread of accuracy (Li et al. 2020, q-FFL);
* a server optimizer (``server_optimizer=``) treats ``global - aggregate`` as a
  gradient: FedAvgM, FedAdam, FedYogi, FedAdagrad (Hsu et al. 2019; Reddi et
  al. 2021) or any ``torch.optim`` factory; server lr 1 without momentum is
  plain FedAvg, bit for bit;
* ``mu > 0`` adds FedProx's proximal term ``mu/2 * ||w - w_global||^2`` to every
  client's loss (Li et al. 2020); :class:`SCAFFOLD` corrects every local
  gradient with control variates (Karimireddy et al. 2020);
* ``personal=`` keeps layers out of aggregation, with each client (FedBN's
  BatchNorm, Li et al. 2021; FedPer's heads, Arivazhagan et al. 2019);
* ``dropout=`` / ``min_completion=`` simulate clients that fail to report
  (Flower's FaultTolerantFedAvg): see :class:`~lightning_colearn.callbacks.rounds.ClientRounds`.

The result goes to every client; the server evaluates it on the shared
evaluation set each round and records when ``target`` is reached. An
aggregate with NaN/Inf values is not installed: the round is discarded, every
client returns to where it started, and the record says why.

Example::

    dm = CohortDataModule("mnist_small", num_members=100, batch_size=20, partition="dirichlet", alpha=0.1)
    fed = FederatedAveraging(clients_per_round=10, server_optimizer="fedadam", server_lr=1e-2)
    L.Trainer(max_epochs=30, callbacks=[fed]).fit(CohortModule(MLP, size=100), datamodule=dm)
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_colearn.callbacks.rounds import ClientRounds
from lightning_colearn.functional import arithmetic as FA
from lightning_colearn.functional.aggregation import AGGREGATORS, KRUM_WEIGHTINGS, aggregate, fednova, fedprox_term, qfedavg
from lightning_colearn.functional.privacy import adaptive_clip_norm, clip_update, dp_mean, noised_fraction
from lightning_colearn.functional.server import (is_identity_server, pseudo_gradient, scaffold_client_variate,
                                                 scaffold_server_variate)
from lightning_colearn.metrics.scoring import score
from lightning_colearn.module import CohortModule
from lightning_colearn.optim import FedAdagrad, FedAdam, FedYogi
from lightning_colearn.privacy import FederatedPrivacy, epsilon, epsilon_after, make_accountant

__all__ = ["FederatedAveraging", "SCAFFOLD", "SERVER_OPTIMIZERS", "STRATEGIES", "sample_counts"]

#: Server optimizers by name (``server_optimizer=``); any ``params -> torch.optim.Optimizer`` factory works too.
SERVER_OPTIMIZERS = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")
#: What ``aggregator=`` takes: the robust aggregators, and q-FedAvg.
STRATEGIES = (*AGGREGATORS, "qfedavg", "fednova")



class FederatedAveraging(ClientRounds):
    """Federated averaging (or another strategy) between the clients (members) of a :class:`CohortModule`.

    The round arguments (``clients_per_round``, ``local_epochs``, ``max_rounds``, ``target``,
    ``stop_at_target``, ``criterion``, ``maximize``, ``eval_dataloader``, ``eval_batches``,
    ``reset_client_optimizer``, ``dropout``, ``min_completion``, ``seed``) are those of
    :class:`~lightning_colearn.callbacks.rounds.ClientRounds`.

    Args:
        aggregator: one of :data:`STRATEGIES`: ``fedavg``, ``median``, ``trimmed_mean``, ``krum``,
            ``multi_krum``, ``bulyan``, ``qfedavg``, ``fednova`` (each client's update normalized by its
            local steps, Wang et al. 2020: for clients doing unequal work, e.g. ``max_local_steps=(2, 30)``;
            with SGD momentum from the client's optimizer, otherwise plain steps).
        mu: FedProx proximal weight (0: plain local training).
        trim_ratio: fraction trimmed at each end by ``trimmed_mean``.
        num_byzantine: corrupt clients ``krum`` / ``multi_krum`` / ``bulyan`` tolerate.
        krum_weighting: how ``multi_krum`` averages the updates it selects: ``uniform`` (the plain
            mean, as Blanchard et al.) or ``samples`` (weighted by training-sample count, as FedAvg).
        q: q-FedAvg's fairness exponent (0: FedAvg; larger: more weight to clients with higher loss).
        server_optimizer: ``None`` (install the aggregate), one of :data:`SERVER_OPTIMIZERS`, or a
            factory ``params -> torch.optim.Optimizer`` stepped on the pseudo-gradient ``global - aggregate``.
        server_lr: the server's learning rate η (default: 1 for FedAvgM, 1e-2 for the adaptive ones).
        server_momentum: FedAvgM's momentum β; the adaptive optimizers' β1.
        server_beta2: FedAdam's and FedYogi's β2.
        server_tau: the adaptive optimizers' τ (adaptivity).
        personal: tensors that stay with each client and are never aggregated: ``"batchnorm"``
            (FedBN: every BatchNorm weight, bias and running statistic) or parameter-name patterns
            (``fnmatch``, e.g. ``["fc2.*"]`` for a FedPer-style local head). Each round then also
            scores every client on its own test split (``client_scores``, logged as ``<name>/personal_score``).
        dp: user-level differential privacy (DP-FedAvg, McMahan et al. 2018): a
            :class:`~lightning_colearn.privacy.FederatedPrivacy` or a mapping of its fields. Every client's
            update is clipped to ``clip_norm`` (fixed, or adapted to a quantile of the update norms, Andrew
            et al. 2021), Gaussian noise is added to their sum on the server (or by each client), and the
            sum is divided by ``clients_per_round``; an accountant over rounds (sampling rate
            ``clients_per_round / clients``) logs ``<name>/dp_epsilon``, and training stops before a round
            would pass ``target_epsilon``. Needs ``aggregator="fedavg"``.
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
        krum_weighting: str = "uniform",
        q: float = 1.0,
        server_optimizer: str | Callable[..., torch.optim.Optimizer] | None = None,
        server_lr: float | None = None,
        server_momentum: float = 0.9,
        server_beta2: float = 0.99,
        server_tau: float = 1e-3,
        personal: str | Sequence[str] | None = None,
        dp: Any = None,
        **kwargs: Any,
    ) -> None:
        errors = []
        try:
            dp = FederatedPrivacy.from_any(dp)
        except (TypeError, ValueError) as err:
            errors.append(str(err))
            dp = None
        if dp is not None and aggregator != "fedavg":
            errors.append(f"dp needs aggregator='fedavg' (its noise is calibrated for the clipped mean), got {aggregator!r}")
        if aggregator not in STRATEGIES:
            errors.append(f"aggregator must be one of {list(STRATEGIES)}, got {aggregator!r}")
        for field, value, low, high in (("mu", mu, 0, math.inf), ("q", q, 0, math.inf)):
            if not _finite_number(value) or not low <= value < high:
                errors.append(f"{field} must be a finite number >= 0, got {value!r}")
        if not _finite_number(trim_ratio) or not 0 <= trim_ratio < 0.5:
            errors.append(f"trim_ratio must be in [0, 0.5), got {trim_ratio!r}")
        if isinstance(num_byzantine, bool) or not isinstance(num_byzantine, int) or num_byzantine < 0:
            errors.append(f"num_byzantine must be an int >= 0, got {num_byzantine!r}")
        if krum_weighting not in KRUM_WEIGHTINGS:
            errors.append(f"krum_weighting must be one of {list(KRUM_WEIGHTINGS)}, got {krum_weighting!r}")
        if server_optimizer is not None and server_optimizer not in SERVER_OPTIMIZERS and not callable(server_optimizer):
            errors.append(f"server_optimizer must be None, one of {list(SERVER_OPTIMIZERS)} or a factory "
                          f"params -> torch.optim.Optimizer, got {server_optimizer!r}")
        if server_lr is not None and (not _finite_number(server_lr) or server_lr <= 0):
            errors.append(f"server_lr must be a finite number > 0 or None, got {server_lr!r}")
        for field, value in (("server_momentum", server_momentum), ("server_beta2", server_beta2)):
            if not _finite_number(value) or not 0 <= value < 1:
                errors.append(f"{field} must be a number in [0, 1), got {value!r}")
        if not _finite_number(server_tau) or server_tau <= 0:
            errors.append(f"server_tau must be a finite number > 0, got {server_tau!r}")
        if personal is not None and not (personal == "batchnorm" or (
                not isinstance(personal, (str, bytes)) and isinstance(personal, Sequence) and personal
                and all(isinstance(p, str) and p for p in personal))):
            errors.append(f"personal must be None, 'batchnorm' or a non-empty list of parameter-name patterns, got {personal!r}")
        if errors:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(errors))
        super().__init__(clients_per_round, local_epochs, **kwargs)
        self.aggregator, self.mu, self.trim_ratio, self.num_byzantine = aggregator, float(mu), float(trim_ratio), num_byzantine
        self.krum_weighting, self.q = krum_weighting, float(q)
        self.server_optimizer, self.server_lr = server_optimizer, server_lr
        self.server_momentum, self.server_beta2, self.server_tau = float(server_momentum), float(server_beta2), float(server_tau)
        self.personal = [personal] if personal == "batchnorm" else None if personal is None else list(personal)
        self.dp = dp
        #: DP-FedAvg: the clip norm (adapted each round when ``dp.adaptive``) and the accountant over rounds.
        self.clip_norm = None if dp is None else float(dp.clip_norm)
        self._dp_accountant = None if dp is None else make_accountant(dp.accountant)
        self._global_state: dict[str, Tensor] | None = None  # the round's starting global model
        self._personal_start: dict[int, dict[str, Tensor]] = {}  # each sampled client's own tensors at the round's start
        self._losses: dict[int, float] | None = None  # q-FedAvg: the sampled clients' losses at the global model
        self._server: torch.optim.Optimizer | None = None
        self._server_params: list[nn.Parameter] = []
        self._pending_server_state: dict[str, Any] | None = None
        self._personal_names: set[str] = set()

    # ------------------------------------------------------------------ setup
    def check_module(self, pl_module: L.LightningModule) -> None:
        super().check_module(pl_module)
        n, f = self.clients_per_round, self.num_byzantine
        if self.aggregator in ("krum", "multi_krum") and n < 2 * f + 3:
            raise ValueError(f"{type(self).__name__}: {self.aggregator} with num_byzantine={f} needs "
                             f"clients_per_round >= {2 * f + 3}, got {n}")
        if self.aggregator == "bulyan" and n < 4 * f + 3:
            raise ValueError(f"{type(self).__name__}: bulyan with num_byzantine={f} needs clients_per_round >= 4 * "
                             f"num_byzantine + 3 = {4 * f + 3} (El Mhamdi et al. 2018), got {n}")
        if self.aggregator == "qfedavg" and pl_module.wraps_lightning:
            raise ValueError(f"{type(self).__name__}: qfedavg scores each client's loss with the module's loss function; "
                             "it needs plain nn.Module clients, not wrapped LightningModules")
        self._personal_names = self._find_personal(pl_module.cohort[0])

    def _find_personal(self, model: nn.Module) -> set[str]:
        if self.personal is None:
            return set()
        names = list(model.state_dict())
        if self.personal == ["batchnorm"]:
            found = {f"{prefix}.{k}" if prefix else k for prefix, m in model.named_modules()
                     if isinstance(m, nn.modules.batchnorm._BatchNorm) for k in m.state_dict()}
            if not found:
                raise ValueError(f"{type(self).__name__}: personal='batchnorm' but the model has no BatchNorm layer")
        else:
            found = set()
            for pattern in self.personal:
                hits = {k for k in names if fnmatch.fnmatchcase(k, pattern)}
                if not hits:
                    raise ValueError(f"{type(self).__name__}: personal pattern {pattern!r} matches no tensor of the model; "
                                     f"its tensors are {names}")
                found |= hits
        if not set(names) - found:
            raise ValueError(f"{type(self).__name__}: personal={self.personal!r} keeps every tensor local: nothing is left to aggregate")
        return found

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._module = pl_module
        self.hyperparameters_changed(pl_module)
        if stage == "fit" and self.personal is not None:
            dm = trainer.datamodule
            if dm is None or not hasattr(dm, "member_sizes") or 0 in dm.member_sizes("test"):
                rank_zero_warn(f"{type(self).__name__}: personal layers without a test split for every client: the "
                               "per-client scores need data.splits[2] > 0; only the global score is reported")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._proximal in getattr(pl_module, "loss_terms", []):
            pl_module.loss_terms.remove(self._proximal)

    #: PopulationBasedTraining may give each client its own FedProx ``mu`` (``callback.mu``).
    per_member_hyperparameters = ("mu",)

    def hyperparameters_changed(self, pl_module: L.LightningModule) -> None:
        """Called when ``mu`` is set (by :class:`PopulationBasedTraining`: one value per client): the proximal
        term is added to the clients' losses as soon as some client has ``mu > 0``."""
        mus = self.mu if isinstance(self.mu, (list, tuple)) else [self.mu]
        if max(mus) > 0 and self._proximal not in pl_module.loss_terms:
            pl_module.loss_terms.append(self._proximal)

    def _proximal(self, member: int) -> Tensor:
        params = self._module.cohort.member_parameters(member)  # differentiable on both backends
        mu = self.mu[member] if isinstance(self.mu, (list, tuple)) else self.mu
        return fedprox_term(params, self._global_params(), mu)

    def _global_params(self) -> list[Tensor]:
        names = self._param_names()
        return [self._global_state[k] for k in names]  # type: ignore[index]

    def _param_names(self) -> list[str]:
        return [k for k, _ in self._module.cohort[0].named_parameters()]

    # ----------------------------------------------------------------- rounds
    def start_round(self, trainer: L.Trainer, pl_module: CohortModule, clients: list[int]) -> None:
        # every client holds the global model (and its own personal tensors) between rounds: keep them to fall back on
        self._module = pl_module
        self._global_state = pl_module.cohort.member_state(clients[0])
        self._personal_start = {c: {k: v for k, v in pl_module.cohort.member_state(c).items() if k in self._personal_names}
                                for c in clients} if self._personal_names else {}
        self._losses = self._client_losses(trainer, pl_module, clients) if self.aggregator == "qfedavg" else None

    def _client_losses(self, trainer: L.Trainer, pl_module: CohortModule, clients: list[int]) -> dict[int, float]:
        """Each client's mean training loss at the global model (q-FedAvg's F_k), on the rank that trains it."""
        dm = trainer.datamodule

        def losses(mine: list[int]) -> list[float]:
            return [_mean_loss(pl_module.cohort[c], dm.member_dataloader(c, "train", shuffle=False), pl_module.loss_fn,
                               pl_module.device, trainer.precision_plugin.forward_context) for c in mine]

        if dm is None or not hasattr(dm, "member_dataloader"):
            raise ValueError(f"{type(self).__name__}: qfedavg needs each client's training data (a CohortDataModule)")
        return dict(zip(clients, pl_module.gather_member_values(losses, clients)))

    def revert_clients(self, trainer: L.Trainer, pl_module: CohortModule, clients: list[int]) -> None:
        for c in clients:
            pl_module.cohort.load_member_state(c, {**self._global_state, **self._personal_start.get(c, {})})  # type: ignore[dict-item]

    def discard_round(self, trainer: L.Trainer, pl_module: CohortModule, clients: list[int], reason: str) -> dict[str, Any]:
        self.revert_clients(trainer, pl_module, clients)
        record = {"score": self.server_score(trainer, pl_module, 0), "installed": False, "reason": reason}
        self._end()
        return record

    def finish_round(self, trainer: L.Trainer, pl_module: CohortModule, clients: list[int]) -> dict[str, Any]:
        start = time.perf_counter()
        cohort = pl_module.cohort
        names = list(self._global_state)  # type: ignore[arg-type]
        shared = [k for k in names if k not in self._personal_names]
        index = [names.index(k) for k in shared]
        updates = [[tensors[i] for i in index] for tensors in (cohort.member_tensors(c) for c in clients)]
        result = self._aggregate(trainer, pl_module, clients, updates, shared)
        result = self._server_step(shared, result)
        installed = FA.is_finite(result)
        if installed:
            FA.copy_([[tensors[i] for i in index] for tensors in (cohort.member_tensors(m) for m in range(len(cohort)))], result)
        else:  # discard the round: every client back to the previous global model
            self.revert_clients(trainer, pl_module, clients)
        aggregate_seconds = time.perf_counter() - start
        start = time.perf_counter()
        record: dict[str, Any] = {"score": self.server_score(trainer, pl_module, 0)}
        if self.dp is not None:
            record.update(dp_epsilon=self.dp_epsilon(), clip_norm=self.clip_norm)
        if self._personal_names:
            record["client_scores"] = self._client_scores(trainer, pl_module)
        record.update({
            "installed": installed,
            "reason": "aggregated" if installed else "non-finite aggregate: round discarded",
            "aggregate_seconds": aggregate_seconds,
            "eval_seconds": time.perf_counter() - start,
        })
        self._end()
        return record

    def _end(self) -> None:
        self._global_state, self._personal_start, self._losses = None, {}, None

    def _aggregate(self, trainer: L.Trainer, pl_module: CohortModule, clients: list[int], updates: list[list[Tensor]],
                   shared: list[str]) -> list[Tensor]:
        weights = sample_counts(trainer, clients)
        if self.aggregator == "qfedavg":
            losses = [self._losses[c] for c in clients]  # type: ignore[index]
            lr = _client_lr(pl_module, clients[0])
            return qfedavg([self._global_state[k] for k in shared], updates, losses, q=self.q,  # type: ignore[index]
                           lipschitz=1.0 / lr, weights=weights)
        if self.dp is not None:
            return self._dp_mean(trainer, pl_module, clients, updates, shared)
        if self.aggregator == "fednova":
            steps = [max(self.round_steps(c), 1) for c in clients]
            momentum = float(pl_module.member_optimizers()[clients[0]].param_groups[0].get("momentum", 0.0) or 0.0)
            return fednova([self._global_state[k] for k in shared], updates, steps, weights, momentum=momentum)  # type: ignore[index]
        return aggregate(updates, self.aggregator, weights, trim_ratio=self.trim_ratio,
                         num_byzantine=self.num_byzantine, krum_weighting=self.krum_weighting)

    # ------------------------------------------------------------ DP-FedAvg
    def _dp_mean(self, trainer: L.Trainer, pl_module: CohortModule, clients: list[int], updates: list[list[Tensor]],
                 shared: list[str]) -> list[Tensor]:
        """``x + (sum of clipped updates + noise) / clients_per_round``, and the accounting and clip norm of the round."""
        dp, m = self.dp, self.clients_per_round
        x = [self._global_state[k] for k in shared]  # type: ignore[index]
        floating = [i for i, t in enumerate(x) if t.is_floating_point()]
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.round) * 1_000_003 + 13)
        clipped, unclipped = [], 0
        for update in updates:
            delta = [update[i].detach() - x[i] for i in floating]
            if not FA.is_finite(delta):  # a client that sent NaN/Inf contributes nothing (its sensitivity stays bounded)
                clipped.append([torch.zeros_like(t) for t in delta])
                continue
            kept, was_clipped, _ = clip_update(delta, self.clip_norm)
            clipped.append(kept)
            unclipped += not was_clipped
        sigma = dp.update_noise_for(m) if dp.adaptive else dp.noise_multiplier
        mean = dp_mean(clipped, clip_norm=self.clip_norm, noise_multiplier=sigma, expected_clients=m,
                       generator=generator, side=dp.side)
        result = [t.clone() for t in updates[0]]
        for k, i in enumerate(floating):
            result[i] = (x[i] + mean[k]).to(x[i].dtype)
        if dp.adaptive:  # the next round's clip norm, from the noised fraction of updates that needed no clipping
            fraction = noised_fraction(unclipped, reported_clients=len(clients), expected_clients=m,
                                       count_noise_multiplier=dp.count_noise_for(m), generator=generator)
            self.clip_norm = adaptive_clip_norm(self.clip_norm, fraction, target_quantile=dp.target_quantile,
                                                learning_rate=dp.clip_learning_rate)
        self._dp_accountant.step(noise_multiplier=dp.noise_multiplier, sample_rate=m / pl_module.size)
        return result

    def dp_epsilon(self) -> float | None:
        """DP-FedAvg's ε so far (``None`` without ``dp``)."""
        return None if self.dp is None else epsilon(self._dp_accountant, self.dp.delta)

    def _dp_budget_spent(self, pl_module: CohortModule) -> bool:
        dp = self.dp
        if dp is None or dp.target_epsilon is None:
            return False
        after = epsilon_after(self._dp_accountant, dp.delta, noise_multiplier=dp.noise_multiplier,
                              sample_rate=self.clients_per_round / pl_module.size, steps=1)
        return after > dp.target_epsilon

    # ---------------------------------------------------------- server step
    def _server_step(self, shared: list[str], result: list[Tensor]) -> list[Tensor]:
        """The server optimizer's step on the parameters, from the pseudo-gradient ``global - aggregate``."""
        optimizer = self._server_optimizer(shared)
        if optimizer is None or is_identity_server(optimizer) or not FA.is_finite(result):
            return result  # (a non-finite aggregate is discarded whole; the server's state must not take it in)
        params = set(self._param_names())
        positions = [i for i, k in enumerate(shared) if k in params and result[i].is_floating_point()]
        x = [self._global_state[shared[i]] for i in positions]  # type: ignore[index]
        grads = pseudo_gradient(x, [result[i] for i in positions])
        with torch.no_grad():
            for p, value, g in zip(self._server_params, x, grads):
                p.copy_(value)
                p.grad = g.to(p.dtype)
            optimizer.step()
        stepped = list(result)
        for p, i in zip(self._server_params, positions):
            stepped[i] = p.detach().clone()
            p.grad = None
        return stepped

    def _server_optimizer(self, shared: list[str]) -> torch.optim.Optimizer | None:
        if self.server_optimizer is None:
            return None
        if self._server is None:
            params = set(self._param_names())
            self._server_params = [nn.Parameter(self._global_state[k].detach().clone())  # type: ignore[index]
                                   for k in shared if k in params and self._global_state[k].is_floating_point()]  # type: ignore[index]
            self._server = self._make_server_optimizer(self._server_params)
            if self._pending_server_state is not None:
                self._server.load_state_dict(self._pending_server_state)
                self._pending_server_state = None
        return self._server

    def _make_server_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        name, lr = self.server_optimizer, self.server_lr
        betas = (self.server_momentum, self.server_beta2)
        if name == "fedavgm":
            return torch.optim.SGD(params, lr=1.0 if lr is None else lr, momentum=self.server_momentum)
        if name == "fedadam":
            return FedAdam(params, lr=1e-2 if lr is None else lr, betas=betas, tau=self.server_tau)
        if name == "fedyogi":
            return FedYogi(params, lr=1e-2 if lr is None else lr, betas=betas, tau=self.server_tau)
        if name == "fedadagrad":
            return FedAdagrad(params, lr=1e-2 if lr is None else lr, beta1=self.server_momentum, tau=self.server_tau)
        optimizer = name(params)  # type: ignore[operator]
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{type(self).__name__}: server_optimizer must return a torch.optim.Optimizer, got {type(optimizer).__name__}")
        return optimizer

    # ------------------------------------------------------------- evaluation
    def _client_scores(self, trainer: L.Trainer, pl_module: CohortModule) -> list[float | None]:
        """Every client's score on its own test split (its personal layers included); ``None`` without one."""
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "member_sizes"):
            return [None] * pl_module.size
        sizes = dm.member_sizes("test")
        have = [c for c in range(pl_module.size) if sizes[c] > 0]

        def scores(mine: list[int]) -> list[float]:
            return [score(pl_module.cohort[c], dm.member_dataloader(c, "test"), self.criterion, pl_module.device,
                          context=trainer.precision_plugin.forward_context) for c in mine]

        values = dict(zip(have, pl_module.gather_member_values(scores, have))) if have else {}
        return [values.get(c) for c in range(pl_module.size)]

    def log_round(self, pl_module: CohortModule, record: dict[str, Any]) -> None:
        super().log_round(pl_module, record)
        if record.get("dp_epsilon") is not None:
            pl_module.log(f"{self.name}/dp_epsilon", float(record["dp_epsilon"]), on_step=False, on_epoch=True)
        scores = [s for s in record.get("client_scores") or [] if s is not None]
        if scores:
            pl_module.log(f"{self.name}/personal_score", sum(scores) / len(scores), on_step=False, on_epoch=True,
                          sync_dist=pl_module.sync_logs)

    # ------------------------------------------------------------ checkpoint
    def resume_mid_epoch(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        self._module = pl_module  # (the round's start state came with the checkpoint: round_start)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        self._module = pl_module
        if self._clients is None and self._dp_budget_spent(pl_module):  # a new round would pass target_epsilon
            rank_zero_info(f"{type(self).__name__}: one more round would take epsilon past dp.target_epsilon="
                           f"{self.dp.target_epsilon} (now {self.dp_epsilon():.3f}): training stops")
            pl_module.active_members = []
            trainer.should_stop = True
            return
        if self._clients is not None and self._global_state is None:  # a mid-round checkpoint without round_start
            # (written before round starts were checkpointed): between rounds every member held the global
            # model, and the clients not sampled still do
            holder = next((i for i in range(pl_module.size) if i not in self._clients), None)
            if holder is None or self._personal_names or self.aggregator == "qfedavg":
                raise ValueError(f"{type(self).__name__} cannot resume this mid-round checkpoint: it has no round start "
                                 "state; resume from a round boundary")
            self.start_round(trainer, pl_module, [holder])
        super().on_train_epoch_start(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["round_start"] = None if self._global_state is None else {
            "global": self._global_state, "personal": self._personal_start, "losses": self._losses}
        if self.dp is not None:
            state["dp"] = {"accountant": self._dp_accountant.state_dict(), "clip_norm": self.clip_norm}
        if self._server is not None:
            state["server_optimizer"] = self._server.state_dict()
        elif self._pending_server_state is not None:
            state["server_optimizer"] = self._pending_server_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            start, server = state_dict.get("round_start"), state_dict.get("server_optimizer")
            if start is not None and not (isinstance(start, dict) and isinstance(start.get("global"), dict)
                                          and all(isinstance(v, Tensor) for v in start["global"].values())
                                          and isinstance(start.get("personal"), dict)):
                raise ValueError(f"round_start must be None or the round's starting states, got {type(start).__name__}")
            if server is not None and not (isinstance(server, dict) and {"state", "param_groups"} <= set(server)):
                raise ValueError("server_optimizer must be an optimizer state_dict (state, param_groups)")
            if server is not None and self.server_optimizer is None:
                raise ValueError("the checkpoint has a server optimizer's state, this FederatedAveraging has server_optimizer=None")
            dp = state_dict.get("dp")
            if (dp is None) != (self.dp is None):
                raise ValueError("the checkpoint and this FederatedAveraging disagree on dp (privacy accounting must continue)")
            if dp is not None:
                accountant = make_accountant(self.dp.accountant)
                accountant.load_state_dict(dp["accountant"])
                clip = dp["clip_norm"]
                if not _finite_number(clip) or clip <= 0:
                    raise ValueError(f"dp clip_norm must be a finite number > 0, got {clip!r}")
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{type(self).__name__} checkpoint state is corrupt or from another version: {err}") from err
        super().load_state_dict(state_dict)
        if start is not None:
            self._global_state, self._personal_start, self._losses = start["global"], dict(start["personal"]), start.get("losses")
        self._server, self._pending_server_state = None, server
        if dp is not None:
            self._dp_accountant, self.clip_norm = accountant, float(clip)


class SCAFFOLD(FederatedAveraging):
    """SCAFFOLD (Karimireddy et al. 2020): FedAvg whose clients correct their drift with control variates.

    Every local gradient becomes ``g_i(y) - c_i + c`` (added to the loss as the linear term
    ``<c - c_i, y>``, whose gradient is exactly the correction, so it works on both cohort
    backends); after the round each reporting client's variate becomes (option II, the default)
    ``c_i - c + (x - y_i) / (K_i * lr)`` with ``K_i`` its local steps and ``lr`` its learning rate,
    or (option I) its gradient at the server model ``x`` over its training data. The server
    moves ``x`` by ``global_lr`` times the aggregate's step and ``c`` by ``1/N`` times the sum of
    the variates' changes. Clients keep their variates between the rounds they are sampled in,
    and every variate is checkpointed.

    Args:
        option: ``"II"`` (default, free) or ``"I"`` (one more pass over each client's data per round;
            plain ``nn.Module`` clients only).
        global_lr: the server's step size η_g (1: the aggregate itself, as FedAvg).
        variate_batches: option I: batches of the client's data for its gradient at ``x`` (default: all).
        **kwargs: as :class:`FederatedAveraging` (the aggregator must be ``fedavg``; SCAFFOLD's
            server step replaces ``server_optimizer``).
    """

    name = "scaffold"

    def __init__(self, clients_per_round: int = 10, local_epochs: int = 1, *, option: str = "II", global_lr: float = 1.0,
                 variate_batches: int | None = None, **kwargs: Any) -> None:
        errors = []
        if option not in ("I", "II"):
            errors.append(f"option must be 'I' or 'II', got {option!r}")
        if not _finite_number(global_lr) or global_lr <= 0:
            errors.append(f"global_lr must be a finite number > 0, got {global_lr!r}")
        if variate_batches is not None and (isinstance(variate_batches, bool) or not isinstance(variate_batches, int)
                                            or variate_batches < 1):
            errors.append(f"variate_batches must be an int >= 1 or None, got {variate_batches!r}")
        if kwargs.get("aggregator", "fedavg") != "fedavg":
            errors.append(f"aggregator must be 'fedavg' (SCAFFOLD's server step averages), got {kwargs['aggregator']!r}")
        if kwargs.get("server_optimizer") is not None:
            errors.append("server_optimizer must be None: SCAFFOLD's server step is global_lr times the aggregate's step")
        if kwargs.get("personal") is not None:
            errors.append("personal must be None: SCAFFOLD's control variates cover the whole model")
        if kwargs.get("dp") is not None:
            errors.append("dp must be None: SCAFFOLD's control variates carry each client's unclipped, un-noised drift")
        if errors:
            raise ValueError("SCAFFOLD: " + "; ".join(errors))
        kwargs.pop("server_optimizer", None)
        super().__init__(clients_per_round, local_epochs, server_optimizer=None if global_lr == 1 else
                         partial(torch.optim.SGD, lr=float(global_lr)), **kwargs)
        self.option, self.global_lr, self.variate_batches = option, float(global_lr), variate_batches
        #: The server's control variate ``c`` (``None`` until the first round: zeros).
        self.server_variate: list[Tensor] | None = None
        #: Each client's control variate ``c_i`` (absent: zeros, never sampled).
        self.client_variates: dict[int, list[Tensor]] = {}
        self._corrections: dict[int, list[Tensor]] = {}

    def check_module(self, pl_module: L.LightningModule) -> None:
        super().check_module(pl_module)
        if self.option == "I" and pl_module.wraps_lightning:
            raise ValueError("SCAFFOLD: option 'I' computes each client's gradient with the module's loss function; "
                             "wrapped LightningModule clients need option 'II'")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._correct not in pl_module.loss_terms:
            pl_module.loss_terms.append(self._correct)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._correct in getattr(pl_module, "loss_terms", []):
            pl_module.loss_terms.remove(self._correct)

    def _correct(self, member: int) -> Tensor:
        """``<c - c_i, y>``: its gradient is the control-variate correction of member ``member``'s local gradient."""
        params = self._module.cohort.member_parameters(member)
        correction = self._corrections.get(member)
        if correction is None:  # c and c_i change only between rounds: one subtraction per client and round
            zeros = [torch.zeros_like(p) for p in params]
            c, c_i = self.server_variate or zeros, self.client_variates.get(member, zeros)
            correction = [(a - b).detach().to(p.device, p.dtype) for a, b, p in zip(c, c_i, params)]
            self._corrections[member] = correction
        return sum((t * p).sum() for t, p in zip(correction, params))

    def finish_round(self, trainer: L.Trainer, pl_module: CohortModule, clients: list[int]) -> dict[str, Any]:
        names = self._param_names()
        x = [self._global_state[k] for k in names]  # type: ignore[index]
        zeros = [torch.zeros_like(t) for t in x]
        c = self.server_variate or zeros
        new, deltas = {}, []
        for client in clients:
            c_i = self.client_variates.get(client, zeros)
            y_i = [t.detach().clone() for t in pl_module.cohort.member_parameters(client)]
            grad = self._gradient_at(trainer, pl_module, client, x) if self.option == "I" else None
            steps = max(self.round_steps(client), 1)
            new[client] = scaffold_client_variate(c_i, c, x, y_i, steps=steps, lr=_client_lr(pl_module, client),
                                                  option=self.option, grad_at_x=grad)
            deltas.append([a - b for a, b in zip(new[client], c_i)])
        server_variate = scaffold_server_variate(c, deltas, num_clients=pl_module.size)
        if not all(FA.is_finite(v) for v in (server_variate, *new.values())):
            # A diverging client (huge but finite weights) gives non-finite variates, which would turn every later
            # round's corrected gradients NaN: the round is discarded, variates and model alike.
            self.revert_clients(trainer, pl_module, clients)
            record = {"score": self.server_score(trainer, pl_module, 0), "installed": False,
                      "reason": "non-finite control variates: round discarded"}
            self._end()
        else:
            record = super().finish_round(trainer, pl_module, clients)
            if record["installed"]:  # c += (1/N) * sum of the reporting clients' variate changes (the paper's |S|/N mean)
                self.server_variate = server_variate
                self.client_variates.update(new)
        self._corrections = {}
        return record

    def _gradient_at(self, trainer: L.Trainer, pl_module: CohortModule, client: int, x: list[Tensor]) -> list[Tensor]:
        """Option I: the client's full (or ``variate_batches``) gradient of its training loss at the server model ``x``."""
        dm = trainer.datamodule
        model = pl_module.cohort[client]
        names = self._param_names()
        params = {k: t.detach().clone().requires_grad_(True) for k, t in zip(names, x)}
        buffers = {k: v for k, v in model.state_dict().items() if k not in params}
        total = [torch.zeros_like(t) for t in x]
        batches = 0
        was_training = model.training
        model.train()
        for k, (inputs, targets) in enumerate(dm.member_dataloader(client, "train", shuffle=False)):
            if self.variate_batches is not None and k >= self.variate_batches:
                break
            inputs, targets = inputs.to(pl_module.device), targets.to(pl_module.device)
            out = torch.func.functional_call(model, {**buffers, **params}, (inputs,))
            grads = torch.autograd.grad(pl_module.loss_fn(out, targets), list(params.values()))
            total = [a + g for a, g in zip(total, grads)]
            batches += 1
        model.train(was_training)
        return [t / max(batches, 1) for t in total]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["server_variate"] = self.server_variate
        state["client_variates"] = self.client_variates
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            c, c_i = state_dict["server_variate"], state_dict["client_variates"]
            if c is not None and not (isinstance(c, list) and all(isinstance(t, Tensor) for t in c)):
                raise ValueError(f"server_variate must be None or a list of tensors, got {type(c).__name__}")
            if not isinstance(c_i, dict) or not all(isinstance(k, int) and isinstance(v, list) and all(isinstance(t, Tensor) for t in v)
                                                    for k, v in c_i.items()):
                raise ValueError("client_variates must map client indices to lists of tensors")
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"SCAFFOLD checkpoint state is corrupt or from another version: {err}") from err
        super().load_state_dict(state_dict)
        self.server_variate, self.client_variates, self._corrections = c, dict(c_i), {}


# ------------------------------------------------------------------ helpers
def sample_counts(trainer: L.Trainer, clients: list[int]) -> list[float]:
    """Each client's number of training samples (FedAvg's weights); equal weights without a CohortDataModule."""
    dm = trainer.datamodule
    if dm is not None and hasattr(dm, "member_sizes"):
        sizes = dm.member_sizes("train")
        return [float(sizes[c]) for c in clients]
    return [1.0] * len(clients)


def _client_lr(pl_module: CohortModule, client: int) -> float:
    lr = pl_module.member_optimizers()[client].param_groups[0].get("lr")
    lr = float(lr.item() if isinstance(lr, Tensor) else lr) if lr is not None else math.nan
    if not lr > 0:
        raise ValueError(f"client {client}'s optimizer has no learning rate > 0 (got {lr}); SCAFFOLD and q-FedAvg need it")
    return lr


@torch.no_grad()
def _mean_loss(model: nn.Module, loader: Any, loss_fn: Callable[[Tensor, Tensor], Tensor], device: torch.device,
               context: Callable[[], Any] | None = None) -> float:
    """The sample-weighted mean of ``loss_fn`` over ``loader``, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            with context() if context is not None else contextlib.nullcontext():
                total += float(loss_fn(model(inputs), targets)) * len(targets)
            count += len(targets)
    finally:
        model.train(was_training)
    return total / max(count, 1)


def _finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
