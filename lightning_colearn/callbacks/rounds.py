"""Client rounds: the round mechanics federated algorithms share (FedAvg, proof of federated learning).

The members of a :class:`CohortModule` are the clients. A round spans
``local_epochs`` Lightning epochs: at its start ``clients_per_round`` clients
are sampled (seeded, without replacement) and only they train, each one pass
over its own data per epoch (clients with less data stop early instead of
cycling); after the round's last batch, before Lightning validates and
checkpoints, the subclass aggregates (:meth:`ClientRounds.finish_round`), the
server evaluates the resulting model on a shared evaluation set, and
``max_rounds`` or a reached ``target`` stop training through
``trainer.should_stop``.

Round state (the round counter, the sampling generator, the clients of a round
in progress and the epochs it has done) is checkpointed, so a run resumed from
any epoch-end checkpoint continues exactly, even in the middle of a
multi-epoch round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_colearn._seeded import PicklableGenerator
from lightning_colearn._checks import is_int_at_least
from lightning_colearn import trackers
from lightning_colearn._io import write_csv
from lightning_colearn.functional import arithmetic as FA
from lightning_colearn.metrics.cohort import higher_is_better
from lightning_colearn.metrics.scoring import score
from lightning_colearn.module import CohortModule

__all__ = ["ClientRounds", "is_last_batch", "own_pass_steps", "resumed_mid_epoch"]


def is_last_batch(trainer: L.Trainer, batch_idx: int) -> bool:
    """True in ``on_train_batch_end`` of the epoch's last batch (``limit_train_batches`` counted), before validation runs."""
    return trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or batch_idx + 1 >= trainer.num_training_batches


def resumed_mid_epoch(trainer: L.Trainer) -> bool:
    """True in ``on_train_start`` of a run resumed from a checkpoint taken inside an epoch: Lightning then does
    not call ``on_train_epoch_start`` again, so what that hook sets up must come from the checkpoint."""
    return bool(getattr(trainer.fit_loop, "restarted_mid_epoch", False))


def own_pass_steps(trainer: L.Trainer, member: int) -> float:
    """Training steps of one pass over ``member``'s own data (per-member streams), else ``inf`` (a shared stream: the epoch)."""
    dm = trainer.datamodule
    if dm is not None and getattr(dm, "stream", None) == "per_member" and hasattr(dm, "member_split"):
        return math.ceil(len(dm.member_split(member, "train")) / dm.batch_size)  # the member's loader length
    return math.inf


class ClientRounds(PicklableGenerator, Callback):
    """Base class: client sampling, local epochs, server evaluation, stopping (see the module docstring).

    Args:
        clients_per_round: clients sampled per round, in ``[1, cohort size]``.
        local_epochs: passes each sampled client makes over its own data per round (Lightning epochs per round).
        max_rounds: stop after this many rounds (``None``: the Trainer's limits decide).
        target: server score that counts as reached (recorded in :attr:`rounds_to_target`).
        stop_at_target: stop training once ``target`` is reached.
        criterion: torchmetrics metric of the server evaluation (default: accuracy over the module's classes).
        maximize: direction for a criterion without ``higher_is_better``.
        eval_dataloader: the shared evaluation set (default: the datamodule's ``eval_dataloader()``).
        eval_batches: evaluate on at most this many batches of it (default: all).
        reset_client_optimizer: clients start every round with fresh optimizer state (FL clients are stateless).
        dropout: probability that a sampled client fails before reporting (it trains, but its update never
            arrives; it goes back to where it started the round). Drawn per client and round from
            ``(seed, round)``, so the client samples do not change with it.
        min_completion: fraction of a round's sampled clients that must report; fewer, and the round is
            discarded and logged (Flower's FaultTolerantFedAvg).
        max_local_steps: stragglers: each sampled client stops after this many optimizer steps in a round,
            an int, or ``(low, high)`` to draw each client's limit uniformly per round from ``(seed, round)``
            (heterogeneous local work, as FedNova studies; ``None``: every client does its full passes).
        seed: seeds client sampling (its state is checkpointed).
    """

    name = "rounds"

    def __init__(
        self,
        clients_per_round: int = 10,
        local_epochs: int = 1,
        *,
        max_rounds: int | None = None,
        target: float | None = None,
        stop_at_target: bool = False,
        criterion: Metric | None = None,
        maximize: bool | None = None,
        eval_dataloader: Any = None,
        eval_batches: int | None = None,
        reset_client_optimizer: bool = True,
        dropout: float = 0.0,
        min_completion: float = 0.0,
        max_local_steps: int | Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        errors = self._check_arguments(
            clients_per_round=clients_per_round, local_epochs=local_epochs, max_rounds=max_rounds,
            target=target, criterion=criterion, eval_batches=eval_batches, maximize=maximize, seed=seed,
            stop_at_target=stop_at_target, reset_client_optimizer=reset_client_optimizer, eval_dataloader=eval_dataloader,
        )
        for name, value, high in (("dropout", dropout, "1)"), ("min_completion", min_completion, "1]")):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1 or (name == "dropout" and value == 1):
                errors.append(f"{name} must be a number in [0, {high}, got {value!r}")
        limits = [max_local_steps] if is_int_at_least(max_local_steps, 1) else max_local_steps
        if max_local_steps is not None and not (
                isinstance(limits, Sequence) and not isinstance(limits, (str, bytes)) and len(limits) in (1, 2)
                and all(is_int_at_least(v, 1) for v in limits)
                and limits[0] <= limits[-1]):
            errors.append(f"max_local_steps must be None, an int >= 1 or (low, high) with 1 <= low <= high, got {max_local_steps!r}")
        if errors:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(errors))
        self.max_local_steps = None if max_local_steps is None else (int(limits[0]), int(limits[-1]))
        self.maximize = higher_is_better(criterion, maximize) if criterion is not None else (True if maximize is None else maximize)
        self.clients_per_round, self.local_epochs, self.max_rounds = clients_per_round, local_epochs, max_rounds
        self.target, self.stop_at_target, self.criterion = target, stop_at_target, criterion
        self.eval_dataloader, self.eval_batches = eval_dataloader, eval_batches
        self.reset_client_optimizer, self.seed = reset_client_optimizer, seed
        self.dropout, self.min_completion = float(dropout), float(min_completion)
        self.generator = torch.Generator().manual_seed(seed)
        #: Rounds completed.
        self.round = 0
        #: One record per round: round, step, clients, score, seconds per phase, and the subclass's fields.
        self.history: list[dict[str, Any]] = []
        #: First round (1-based count) whose server score reached ``target``, or ``None``.
        self.rounds_to_target: int | None = None
        self._clients: list[int] | None = None  # the round in progress
        self._round_epochs = 0  # epochs the round in progress has done
        self._synced = False
        self._remaining: dict[int, float] = {}
        self._round_steps: dict[int, int] = {}  # optimizer steps each client of the round in progress has taken
        self._resume_remaining: dict[int, int] | None = None  # from a checkpoint taken inside an epoch

    @staticmethod
    def _check_arguments(**kw: Any) -> list[str]:
        errors = []
        if not is_int_at_least(kw["clients_per_round"], 1):
            errors.append(f"clients_per_round must be an int >= 1 (and <= cohort size), got {kw['clients_per_round']!r}")
        if not is_int_at_least(kw["local_epochs"], 1):
            errors.append(f"local_epochs must be an int >= 1, got {kw['local_epochs']!r}")
        if kw["max_rounds"] is not None and not is_int_at_least(kw["max_rounds"], 1):
            errors.append(f"max_rounds must be an int >= 1 or None, got {kw['max_rounds']!r}")
        target = kw["target"]
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target)):
            errors.append(f"target must be a finite number or None, got {target!r}")
        if kw["criterion"] is not None and not isinstance(kw["criterion"], Metric):
            errors.append(f"criterion must be a torchmetrics.Metric, got {type(kw['criterion']).__name__}")
        if kw["eval_batches"] is not None and not is_int_at_least(kw["eval_batches"], 1):
            errors.append(f"eval_batches must be an int >= 1 or None, got {kw['eval_batches']!r}")
        if kw["maximize"] is not None and not isinstance(kw["maximize"], bool):
            errors.append(f"maximize must be True, False or None (the criterion's own direction), got {kw['maximize']!r}")
        for flag in ("stop_at_target", "reset_client_optimizer"):
            if not isinstance(kw[flag], bool):
                errors.append(f"{flag} must be True or False, got {kw[flag]!r}")
        if not is_int_at_least(kw["seed"], 0):  # Lightning's seed_everything range starts at 0 too
            errors.append(f"seed must be an int >= 0, got {kw['seed']!r}")
        loader = kw["eval_dataloader"]
        if loader is not None and (isinstance(loader, (str, bytes)) or not hasattr(loader, "__iter__")):
            errors.append(f"eval_dataloader must be an iterable of (x, y) batches (e.g. a DataLoader) or None, "
                          f"got {type(loader).__name__}")
        return errors

    @property
    def state_key(self) -> str:
        return self._generate_state_key(clients_per_round=self.clients_per_round, seed=self.seed)

    # ------------------------------------------------------------------ setup
    def check_module(self, pl_module: L.LightningModule) -> None:
        """Raise a clear error unless this algorithm can run on ``pl_module`` (at ``setup``, and by the CLI)."""
        cls = type(self).__name__
        if not isinstance(pl_module, CohortModule):
            raise TypeError(f"{cls} needs a CohortModule (its members are the clients), got {type(pl_module).__name__}")
        if self.clients_per_round > pl_module.size:
            raise ValueError(f"{cls}: clients_per_round must be in [1, {pl_module.size}] (the cohort size), got {self.clients_per_round}")
        try:
            pl_module.cohort.check_compatible()
        except FA.CohortMismatchError as err:
            raise ValueError(f"{cls} needs clients of one architecture (their weights are aggregated): {err}") from err
        if self.criterion is None and pl_module.num_classes is None:
            raise ValueError(f"{cls}: pass criterion=... (the module has no num_classes for the default accuracy)")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.check_module(pl_module)
        if self.criterion is None:
            self.criterion = MulticlassAccuracy(num_classes=int(pl_module.num_classes), average="micro")
        if stage == "fit" and self.eval_dataloader is None:
            dm = trainer.datamodule
            if dm is None or not hasattr(dm, "eval_dataloader"):
                raise ValueError(f"{type(self).__name__} needs a shared evaluation set: pass eval_dataloader=... or use a CohortDataModule")
            self.eval_dataloader = dm.eval_dataloader()

    def on_fit_start(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        if not self._synced:  # every client starts from one initial model (not on resume: already equal)
            pl_module.cohort.broadcast(0)
            self._synced = True

    def on_train_start(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        remaining, self._resume_remaining = self._resume_remaining, None
        if remaining is not None and self._clients is not None and resumed_mid_epoch(trainer):
            # the epoch's client steps left and the active clients come from the checkpoint
            self.resume_mid_epoch(trainer, pl_module)
            self._remaining = remaining
            self._round_start = time.perf_counter()
            pl_module.active_members = [c for c in self._clients if self._remaining[c] > 0]

    def resume_mid_epoch(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        """Subclass hook: restore what ``on_train_epoch_start`` would have set up, on a resume inside an epoch."""

    def on_train_end(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        pl_module.active_members = None

    # ----------------------------------------------------------------- rounds
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        if self._clients is None:
            # clients whose privacy budget is spent are no longer sampled (without any, the draw is as it always was)
            eligible = [i for i in range(pl_module.size) if i not in pl_module.retired_members]
            if not eligible:  # every client's privacy budget is spent
                pl_module.active_members = []
                trainer.should_stop = True
                return
            self._clients = sorted(eligible[k] for k in torch.randperm(len(eligible), generator=self.generator)[: self.clients_per_round].tolist())
            self._round_epochs = 0
            self._round_steps = {c: 0 for c in self._clients}
            self._round_start = time.perf_counter()
            self.start_round(trainer, pl_module, self._clients)
            if self.reset_client_optimizer:
                for c in self._clients:
                    pl_module.reset_member_optimizer(c)
        elif not hasattr(self, "_round_start"):  # resumed in the middle of a round
            self._round_start = time.perf_counter()
        budgets = self.step_budgets(self._clients)
        self._remaining = {c: min(own_pass_steps(trainer, c), budgets[c] - self._round_steps.get(c, 0)) for c in self._clients}
        pl_module.active_members = [c for c in self._clients if self._remaining[c] > 0]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: CohortModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._clients is None:
            return
        for c in pl_module.stepped_members:
            if c in self._remaining:
                self._remaining[c] -= 1
                self._round_steps[c] = self._round_steps.get(c, 0) + 1
        pl_module.active_members = [c for c in self._clients if self._remaining[c] > 0]
        epoch_ends = is_last_batch(trainer, batch_idx)
        out_of_steps = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
        if epoch_ends:
            self._round_epochs += 1  # counted here, not at epoch end: the epoch's checkpoint must include it
        if (epoch_ends and self._round_epochs >= self.local_epochs) or out_of_steps:
            self._end_round(trainer, pl_module)

    def _end_round(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        clients, self._clients = self._clients, None
        pl_module.active_members = []
        start = time.perf_counter()
        record: dict[str, Any] = {"round": self.round, "step": trainer.global_step, "clients": clients,
                                  "train_seconds": start - self._round_start}
        if getattr(pl_module, "private", None) is not None:  # private clients: who is no longer sampled (budget spent)
            record["retired"] = sorted(pl_module.retired_members)
        del self._round_start
        pl_module.sync_members(clients)  # under DDP: every rank gets the clients' updates from the ranks that trained them
        failed = self.failures(clients)
        reporting = [c for c in clients if c not in failed]
        needed = max(1, math.ceil(self.min_completion * len(clients) - 1e-9))
        if self.dropout > 0:
            record["failed"] = failed
        if len(reporting) < needed:
            record.update(self.discard_round(trainer, pl_module, clients,
                                             f"{len(reporting)} of {len(clients)} clients reported, fewer than "
                                             f"min_completion={self.min_completion:g} allows: round discarded"))
        else:
            if failed:
                self.revert_clients(trainer, pl_module, failed)
            record.update(self.finish_round(trainer, pl_module, reporting))
        self.round += 1
        value = record.get("score")
        if value is not None and self.target is not None and self.rounds_to_target is None and self._reached(value):
            self.rounds_to_target = self.round
        record["rounds_to_target"] = self.rounds_to_target
        self.history.append(record)
        self.log_round(pl_module, record)
        if (self.max_rounds is not None and self.round >= self.max_rounds) or (
            self.stop_at_target and self.rounds_to_target is not None
        ):
            trainer.should_stop = True  # Lightning finishes this epoch (validation, checkpoint) and stops

    def failures(self, clients: list[int]) -> list[int]:
        """The round's clients that fail before reporting: each with probability ``dropout``, from ``(seed, round)``."""
        if self.dropout == 0:
            return []
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.round) * 1_000_003 + 7)
        draws = torch.rand(len(clients), generator=generator, dtype=torch.float64)
        return [c for c, u in zip(clients, draws.tolist()) if u < self.dropout]

    def step_budgets(self, clients: list[int]) -> dict[int, float]:
        """Each client's most optimizer steps this round (``max_local_steps``; ``inf`` without it), from ``(seed, round)``."""
        if self.max_local_steps is None:
            return {c: math.inf for c in clients}
        low, high = self.max_local_steps
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.round) * 1_000_003 + 11)
        drawn = torch.randint(low, high + 1, (len(clients),), generator=generator).tolist()
        return dict(zip(clients, drawn))

    def round_steps(self, client: int) -> int:
        """Optimizer steps ``client`` took in the round in progress (SCAFFOLD's K)."""
        return self._round_steps.get(client, 0)

    def _reached(self, value: float) -> bool:
        return value >= self.target if self.maximize else value <= self.target

    def server_score(self, trainer: L.Trainer, pl_module: CohortModule, member: int) -> float:
        """Score member ``member`` on the shared evaluation set (under DDP: once, by the rank that trains it)."""
        def scores(mine: list[int]) -> list[float]:
            return [score(pl_module.cohort[m], self.eval_dataloader, self.criterion, pl_module.device,
                          max_batches=self.eval_batches, context=trainer.precision_plugin.forward_context) for m in mine]

        return pl_module.gather_member_values(scores, [member])[0]

    # ------------------------------------------------------- subclass hooks
    def start_round(self, trainer: L.Trainer, pl_module: CohortModule, clients: list[int]) -> None:
        """Prepare the sampled clients before they train (e.g. load their miner's model)."""

    def finish_round(self, trainer: L.Trainer, pl_module: CohortModule, clients: list[int]) -> dict[str, Any]:
        """Aggregate the updates of the clients that reported; return the round's record fields (``score``: the server score)."""
        raise NotImplementedError

    def revert_clients(self, trainer: L.Trainer, pl_module: CohortModule, clients: list[int]) -> None:
        """Put ``clients`` back where they started the round (their update never reached the server)."""
        raise NotImplementedError

    def discard_round(self, trainer: L.Trainer, pl_module: CohortModule, clients: list[int], reason: str) -> dict[str, Any]:
        """Too few clients reported: every client of the round goes back; returns the round's record fields."""
        self.revert_clients(trainer, pl_module, clients)
        return {"score": None, "installed": False, "reason": reason}

    def log_round(self, pl_module: CohortModule, record: dict[str, Any]) -> None:
        logged = {f"{self.name}/round": float(record["round"])}
        if record.get("score") is not None:
            logged[f"{self.name}/score"] = float(record["score"])
        pl_module.log_dict(logged, on_step=False, on_epoch=True, sync_dist=pl_module.sync_logs)

    # --------------------------------------------------------------- results
    def write_history(self, path: str | Path) -> Path:
        """Write one CSV row per round (lists joined by spaces), atomically."""
        rows = [{k: " ".join("" if x is None else f"{x:.6g}" if isinstance(x, float) else str(x) for x in v)
                 if isinstance(v, list) else v for k, v in r.items()} for r in self.history]
        return write_csv(path, rows, None if rows else ["round"])

    def write_artifacts(self, trainer: L.Trainer, pl_module: CohortModule, out: Path) -> dict[str, Path]:
        """``<name>_rounds.csv`` and the figure ``<name>_rounds.png`` in ``out``."""
        if not self.history:
            return {}
        from lightning_colearn import plots  # matplotlib only here

        self.write_history(out / f"{self.name}_rounds.csv")
        name = f"{self.name}_rounds"
        return {name: plots.plot_rounds(self.history, out / f"{name}.png", title=type(self).__name__, target=self.target)}

    def progress_postfix(self) -> dict[str, str]:
        """The last round, for the progress bar: ``{"round": "7: score 0.812"}`` (or why it was discarded)."""
        if not self.history:
            return {}
        last = self.history[-1]
        value = last.get("score")
        return {"round": f"{last['round']}: " + (f"score {value:.4g}" if value is not None else str(last.get("reason", "no score")))}

    def on_fit_end(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        # Without a logger nothing is written (the working directory is not the run's).
        trackers.publish(trainer, pl_module, self)

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "generator": self.generator.get_state(),
            "history": list(self.history),
            "rounds_to_target": self.rounds_to_target,
            "clients": self._clients,
            "round_epochs": self._round_epochs,
            "round_steps": dict(self._round_steps),
            "synced": self._synced,
            # the epoch's steps left per client: a checkpoint inside an epoch resumes with them
            "remaining": dict(self._remaining) if self._clients is not None and hasattr(self, "_remaining") else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            round_, history = int(state_dict["round"]), list(state_dict["history"])
            if round_ != len(history):
                raise ValueError(f"round {round_} with {len(history)} recorded rounds")
            rounds_to_target, clients = state_dict["rounds_to_target"], state_dict["clients"]
            round_epochs, synced = state_dict["round_epochs"], state_dict["synced"]
            round_steps = state_dict.get("round_steps", {})  # (checkpoints before client step counts had none)
            if not isinstance(round_steps, dict) or not all(is_int_at_least(k, 0) and is_int_at_least(v, 0)
                                                            for k, v in round_steps.items()):
                raise ValueError(f"round_steps must map client indices to step counts, got {round_steps!r}")
            if rounds_to_target is not None and not (is_int_at_least(rounds_to_target, 1) and rounds_to_target <= round_):
                raise ValueError(f"rounds_to_target must be None or an int in [1, {round_}], got {rounds_to_target!r}")
            if clients is not None and (not isinstance(clients, list) or not all(is_int_at_least(c, 0) for c in clients)
                                        or len(set(clients)) != len(clients)):
                raise ValueError(f"clients must be None or a list of distinct client indices, got {clients!r}")
            if not is_int_at_least(round_epochs, 0) or round_epochs > self.local_epochs:
                raise ValueError(f"round_epochs must be an int in [0, {self.local_epochs}] (local_epochs), got {round_epochs!r}")
            if not isinstance(synced, bool):
                raise ValueError(f"synced must be a bool, got {synced!r}")
            remaining = state_dict.get("remaining")
            if remaining is not None and (clients is None or not isinstance(remaining, dict) or set(remaining) != set(clients)
                                          or not all(is_int_at_least(v, 0) for v in remaining.values())):
                raise ValueError(f"remaining must be None or each client of the round's steps left, got {remaining!r} "
                                 f"for clients {clients!r}")
            self.generator.set_state(state_dict["generator"])  # the last step that can fail: nothing half-loaded
        except (KeyError, RuntimeError, TypeError, ValueError) as err:
            raise ValueError(f"{type(self).__name__} checkpoint state is corrupt or from another version: {err}") from err
        self.round, self.history, self.rounds_to_target, self._clients = round_, history, rounds_to_target, clients
        self._round_epochs, self._synced, self._round_steps = round_epochs, synced, dict(round_steps)
        self._resume_remaining = None if remaining is None else {int(k): int(v) for k, v in remaining.items()}
