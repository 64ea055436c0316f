"""PopulationBasedTraining: a cohort that tunes its own hyperparameters while it trains.

Population-based training (Jaderberg et al. 2017, "Population Based Training of
Neural Networks"): every ``interval`` epochs (or steps) after ``burn_in``, the
members are ranked; each member of the bottom ``quantile_fraction`` copies a
random member of the top quantile, *in place* (weights, buffers, optimizer and
lr-scheduler state: *exploit*), then perturbs the copied hyperparameters
(*explore*; see :func:`lightning_colearn.functional.pbt.explore`). One run
finds a hyperparameter *schedule* rather than one fixed value.

Ray Tune's ``PopulationBasedTraining`` runs every member as a separate trial
process and exploits through checkpoint files. Here the population is the
cohort: one process (or the DDP ranks that shard it), copies are tensor copies,
a stacked cohort trains every member in one batched computation with its own
hyperparameters, and the same seed gives the same lineage, bit for bit. The
global step is the cohort's, so a member's iteration count never resets when
it exploits.

What can be tuned (``hyperparameters`` keys):

* optimizer settings of each member's param groups: ``lr``, ``weight_decay``,
  ``momentum``, ``dampening``, ``eps``, ``beta1``, ``beta2`` (Adam's ``betas``),
  or any other key as ``optimizer.<key>``. Changing ``lr`` under an lr scheduler
  scales the scheduler's ``base_lrs`` alike, so the schedule continues from the
  new value;
* ``scheduler.<attribute>``: an attribute of each member's lr scheduler
  (``scheduler.gamma`` of ``ExponentialLR``, ...);
* ``member.<path>``: an attribute of each member's module, e.g.
  ``member.net.2.p`` (a dropout probability; loop backend: a stacked cohort runs
  one copy of the architecture for all members);
* ``module.<attribute>``: a per-member setting of the LightningModule that it
  lists in ``per_member_hyperparameters`` (``MutualLearning``: ``temperature``,
  ``kl_weight``);
* ``callback.<attribute>``: a per-member setting of another callback of the Trainer
  (``FederatedAveraging``: FedProx's ``mu``, one per client).

Example::

    pbt = PopulationBasedTraining(
        {"lr": {"type": "loguniform", "low": 1e-3, "high": 0.3}, "momentum": {"type": "uniform", "low": 0.5, "high": 0.99}},
        interval=1, monitor="val_acc", mode="max")
    L.Trainer(max_epochs=10, callbacks=[pbt]).fit(CohortModule(MLP, size=16, optimizer=partial(torch.optim.SGD, lr=0.1)), dm)
    pbt.schedule()          # the best member's hyperparameters over the run: [{"step": 0, "lr": ..}, ...]
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import Metric

from lightning_colearn import distributed as D
from lightning_colearn._checks import is_int_at_least
from lightning_colearn import trackers
from lightning_colearn._io import write_csv
from lightning_colearn._seeded import PicklableGenerator
from lightning_colearn.functional import arithmetic as FA
from lightning_colearn.functional.pbt import Distribution, exploit_plan, explore, parse_space, ranking, sample
from lightning_colearn.metrics.cohort import higher_is_better
from lightning_colearn.metrics.scoring import score
from lightning_colearn.module import CohortModule

__all__ = ["PopulationBasedTraining", "PopulationBasedTrainingReplay"]

#: Optimizer param-group keys that may be named without ``optimizer.``; ``beta1``/``beta2`` are Adam's ``betas``.
OPTIMIZER_KEYS = ("lr", "weight_decay", "momentum", "dampening", "eps", "beta1", "beta2")
UNITS = ("epoch", "step")
MODES = ("max", "min")


# ------------------------------------------------------------------------------------------ targets
class _Target:
    """Where one hyperparameter lives in a member, and how to read and write it."""

    def __init__(self, name: str) -> None:
        self.name = name
        kind, _, rest = name.partition(".")
        if name in OPTIMIZER_KEYS:
            self.kind, self.key = "optimizer", name
        elif kind in ("optimizer", "scheduler", "member", "module", "callback") and rest:
            self.kind, self.key = kind, rest
        else:
            raise ValueError(
                f"PopulationBasedTraining: hyperparameters.{name}: not something a member has; use one of "
                f"{list(OPTIMIZER_KEYS)}, 'optimizer.<param-group key>', 'scheduler.<attribute>', "
                "'member.<module path>.<attribute>', 'module.<per-member setting>' or 'callback.<per-member setting>'"
            )

    def check(self, pl_module: CohortModule) -> None:
        if self.kind == "member" and pl_module.stacked:
            raise ValueError(f"PopulationBasedTraining: hyperparameters.{self.name}: a stacked cohort runs one copy of "
                             "the architecture for every member, so module attributes cannot differ per member; use "
                             "backend='loop'")
        if self.kind == "member":
            _resolve(pl_module.cohort[0], self.key, self.name)
        if self.kind == "module":
            allowed = tuple(getattr(pl_module, "per_member_hyperparameters", ()))
            if self.key not in allowed:
                raise ValueError(f"PopulationBasedTraining: hyperparameters.{self.name}: {type(pl_module).__name__} "
                                 f"takes per-member values for {list(allowed) or 'nothing'}, not {self.key!r}")

    def _callback(self, pl_module: CohortModule) -> Any:
        """The Trainer's callback that takes per-member values of this setting (FederatedAveraging's ``mu``)."""
        callbacks = getattr(pl_module.trainer, "callbacks", [])
        found = [c for c in callbacks if self.key in getattr(c, "per_member_hyperparameters", ())]
        if not found:
            takers = {type(c).__name__: list(c.per_member_hyperparameters) for c in callbacks
                      if getattr(c, "per_member_hyperparameters", ())}
            raise ValueError(f"PopulationBasedTraining: hyperparameters.{self.name}: no callback of the Trainer takes "
                             f"per-member values of {self.key!r} (callbacks that take some: {takers or 'none'})")
        return found[0]

    # the member's optimizer param groups (a member may have several; all get the value)
    def _groups(self, pl_module: CohortModule, i: int) -> list[dict[str, Any]]:
        return pl_module.member_optimizers()[i].param_groups

    def get(self, pl_module: CohortModule, i: int) -> Any:
        if self.kind == "optimizer":
            group = self._groups(pl_module, i)[0]
            key = "betas" if self.key in ("beta1", "beta2") else self.key
            if key not in group:
                raise ValueError(f"PopulationBasedTraining: hyperparameters.{self.name}: member {i}'s "
                                 f"{type(pl_module.member_optimizers()[i]).__name__} has no "
                                 f"{key!r} (it has {sorted(k for k in group if k != 'params')})")
            if key == "betas":
                return float(group["betas"][self.key == "beta2"])
            value = group[self.key]
            return float(value) if isinstance(value, torch.Tensor) else value
        if self.kind == "callback":
            return _member_value(getattr(self._callback(pl_module), self.key), i)
        if self.kind == "scheduler":
            scheduler = _scheduler(pl_module, i, self.name)
            if not hasattr(scheduler, self.key):
                raise ValueError(f"PopulationBasedTraining: hyperparameters.{self.name}: member {i}'s "
                                 f"{type(scheduler).__name__} has no attribute {self.key!r}")
            return getattr(scheduler, self.key)
        if self.kind == "member":
            owner, attr = _resolve(pl_module.cohort[i], self.key, self.name)
            return getattr(owner, attr)
        return _member_value(getattr(pl_module, self.key), i)

    def set(self, pl_module: CohortModule, i: int, value: Any) -> None:
        if self.kind == "optimizer":
            for group in self._groups(pl_module, i):
                if self.key in ("beta1", "beta2"):
                    betas = list(group["betas"])
                    betas[self.key == "beta2"] = value
                    group["betas"] = tuple(betas)
                    continue
                if self.key == "lr":
                    _rescale_scheduler(pl_module, i, group, value)
                group[self.key] = value
        elif self.kind == "callback":
            callback = self._callback(pl_module)
            _set_member_value(callback, self.key, i, value, pl_module.size)
            if hasattr(callback, "hyperparameters_changed"):
                callback.hyperparameters_changed(pl_module)
        elif self.kind == "scheduler":
            setattr(_scheduler(pl_module, i, self.name), self.key, value)
        elif self.kind == "member":
            owner, attr = _resolve(pl_module.cohort[i], self.key, self.name)
            setattr(owner, attr, value)
        else:
            _set_member_value(pl_module, self.key, i, value, pl_module.size)


def _member_value(value: Any, i: int) -> Any:
    """Member ``i``'s value of a setting held as one value for all or one per member."""
    return value[i] if isinstance(value, (list, tuple)) else value


def _set_member_value(owner: Any, key: str, i: int, value: Any, size: int) -> None:
    """Give member ``i`` its own ``owner.<key>``: a setting held as one value becomes one value per member."""
    current = getattr(owner, key)
    values = list(current) if isinstance(current, (list, tuple)) else [current] * size
    values[i] = value
    setattr(owner, key, values)


def _resolve(root: torch.nn.Module, path: str, name: str) -> tuple[Any, str]:
    *parts, attr = path.split(".")
    owner: Any = root
    for part in parts:
        if not hasattr(owner, part):
            raise ValueError(f"PopulationBasedTraining: hyperparameters.{name}: the member ({type(root).__name__}) has "
                             f"no {part!r} on the way to {path!r}")
        owner = getattr(owner, part)
    if not hasattr(owner, attr):
        raise ValueError(f"PopulationBasedTraining: hyperparameters.{name}: {type(owner).__name__} has no attribute {attr!r}")
    return owner, attr


def _scheduler(pl_module: CohortModule, i: int, name: str) -> Any:
    scheduler = pl_module.member_lr_scheduler(i)
    if scheduler is None:
        raise ValueError(f"PopulationBasedTraining: hyperparameters.{name}: member {i} has no lr scheduler "
                         "(CohortModule(lr_scheduler=...))")
    return scheduler


def _rescale_scheduler(pl_module: CohortModule, i: int, group: dict[str, Any], value: float) -> None:
    """A new lr under a scheduler: its base lr scales alike, so the schedule continues from the new value."""
    scheduler = pl_module.member_lr_scheduler(i)
    old = float(group["lr"])
    if scheduler is None or not hasattr(scheduler, "base_lrs") or old == 0:
        return
    k = next((k for k, g in enumerate(scheduler.optimizer.param_groups) if g is group), 0)
    scheduler.base_lrs[k] = scheduler.base_lrs[k] * float(value) / old
    if hasattr(scheduler, "_last_lr") and k < len(scheduler._last_lr):
        scheduler._last_lr[k] = float(value)


# ---------------------------------------------------------------------------------------- callback
class PopulationBasedTraining(PicklableGenerator, Callback):
    """Exploit and explore between the members of a :class:`CohortModule` (see the module docstring).

    Args:
        hyperparameters: the search space, ``{name: distribution}`` (see
            :func:`~lightning_colearn.functional.pbt.parse_space`): a mapping with ``type`` (``uniform``,
            ``loguniform``, ``int``, ``choice``) and ``low``/``high`` or ``values``, or a list of choices.
            Each member starts from its own sample (``initial="sample"``, drawn with ``seed``) or from the
            values it was built with (``initial="keep"``).
        interval: epochs (or steps, ``unit="step"``) between decisions.
        unit: ``"epoch"`` (decide after each ``interval``-th epoch, after validation) or ``"step"``.
        burn_in: epochs (or steps) before the first decision.
        monitor: the logged per-member key to rank by: ``"val_acc"`` reads ``val_acc/member_{i}``
            (a key containing ``{i}`` is formatted with the member index).
        mode: ``"max"`` or ``"min"``: whether a higher ``monitor`` is better.
        metric: instead of ``monitor``, a torchmetrics metric on held-out batches (the datamodule's
            ``holdout_dataloader()`` or ``fitness_dataloader``), direction from its ``higher_is_better``.
        fitness_batches: held-out batches per score (with ``metric``).
        quantile_fraction: the bottom and top quantile, in ``(0, 0.5]`` (Ray Tune's default 0.25).
        resample_probability: the chance an explored value is drawn afresh (0.25).
        perturbation_factors: the factors a number is multiplied by otherwise ((0.8, 1.2)).
        seed: seeds initial samples, sources and exploration (its state is checkpointed).

    After training, :attr:`lineage` holds every exploit (step, member, source, scores, old and new values),
    ``pbt_lineage.csv``, ``pbt_schedule.csv`` (the best member's schedule) and ``pbt.png`` go to the
    logger's directory, and :meth:`schedule` returns a member's hyperparameters over the run, which
    :class:`PopulationBasedTrainingReplay` trains one model on.
    """

    def __init__(
        self,
        hyperparameters: Mapping[str, Any],
        *,
        interval: int = 1,
        unit: str = "epoch",
        burn_in: int = 0,
        monitor: str = "val_acc",
        mode: str = "max",
        metric: Metric | None = None,
        fitness_batches: int = 4,
        fitness_dataloader: Any = None,
        quantile_fraction: float = 0.25,
        resample_probability: float = 0.25,
        perturbation_factors: Sequence[float] = (0.8, 1.2),
        initial: str = "sample",
        seed: int = 0,
    ) -> None:
        errors = []
        if not is_int_at_least(interval, 1):
            errors.append(f"interval must be an int >= 1, got {interval!r}")
        if unit not in UNITS:
            errors.append(f"unit must be one of {list(UNITS)}, got {unit!r}")
        if not is_int_at_least(burn_in, 0):
            errors.append(f"burn_in must be an int >= 0, got {burn_in!r}")
        if mode not in MODES:
            errors.append(f"mode must be one of {list(MODES)}, got {mode!r}")
        if not isinstance(monitor, str) or not monitor:
            errors.append(f"monitor must be a logged key such as 'val_acc', got {monitor!r}")
        if metric is not None and not isinstance(metric, Metric):
            errors.append(f"metric must be a torchmetrics.Metric, got {type(metric).__name__}")
        if not is_int_at_least(fitness_batches, 1):
            errors.append(f"fitness_batches must be an int >= 1, got {fitness_batches!r}")
        if not _number(quantile_fraction) or not 0 < quantile_fraction <= 0.5:
            errors.append(f"quantile_fraction must be in (0, 0.5], got {quantile_fraction!r}")
        if not _number(resample_probability) or not 0 <= resample_probability <= 1:
            errors.append(f"resample_probability must be in [0, 1], got {resample_probability!r}")
        factors = list(perturbation_factors) if isinstance(perturbation_factors, Sequence) else []
        if not factors or not all(_number(f) and f > 0 for f in factors):
            errors.append(f"perturbation_factors must be a non-empty list of numbers > 0, got {perturbation_factors!r}")
        if initial not in ("sample", "keep"):
            errors.append(f"initial must be 'sample' or 'keep', got {initial!r}")
        if errors:
            raise ValueError("PopulationBasedTraining: " + "; ".join(errors))
        self.space: dict[str, Distribution] = parse_space(hyperparameters)
        self.targets = {name: _Target(name) for name in self.space}
        self.interval, self.unit, self.burn_in = interval, unit, burn_in
        self.monitor, self.mode = monitor, mode
        self.metric, self.fitness_batches, self.fitness_dataloader = metric, fitness_batches, fitness_dataloader
        self.maximize = higher_is_better(metric, None) if metric is not None else mode == "max"
        self.quantile_fraction, self.resample_probability = float(quantile_fraction), float(resample_probability)
        self.perturbation_factors = tuple(float(f) for f in factors)
        self.initial, self.seed = initial, seed
        self.generator = torch.Generator().manual_seed(seed)
        #: Each member's current hyperparameters (``None`` before training starts).
        self.values: list[dict[str, Any]] | None = None
        #: Every exploit: ``{"step", "epoch", "member", "source", "score", "source_score", "old", "new"}``.
        self.lineage: list[dict[str, Any]] = []
        #: ``(step, [score per member], [values per member])`` at every decision, for the plot.
        self.trace: list[tuple[int, list[float], list[dict[str, Any]]]] = []
        #: Each member's schedule so far: ``[(step, values), ...]``; an exploiting member takes its source's.
        self.timelines: list[list[tuple[int, dict[str, Any]]]] = []
        self.last_scores: list[float] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(hyperparameters=sorted(self.space), interval=self.interval, unit=self.unit,
                                        seed=self.seed)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.check_module(pl_module)

    def check_module(self, pl_module: L.LightningModule) -> None:
        """Raise a clear error unless this callback can run on ``pl_module`` (at ``setup``, and by the CLI first)."""
        if not isinstance(pl_module, CohortModule):
            raise TypeError(f"PopulationBasedTraining needs a CohortModule, got {type(pl_module).__name__}")
        if pl_module.size < 2:
            raise ValueError(f"PopulationBasedTraining needs a population of at least 2 members, got a cohort of {pl_module.size}")
        if getattr(pl_module, "privacy", None) is not None:
            raise ValueError("PopulationBasedTraining with privacy: an exploit copies one member's weights, trained on "
                             "its data, into another member, outside either member's DP accounting; drop one of them")
        try:
            pl_module.cohort.check_compatible()
        except FA.CohortMismatchError as err:
            raise ValueError(f"PopulationBasedTraining needs members of the same architecture (exploit copies weights): {err}") from err
        for target in self.targets.values():
            target.check(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        n = pl_module.size
        for target in self.targets.values():  # every hyperparameter exists (Adam has no momentum): say so now
            target.get(pl_module, 0)
        if self.values is None:  # a fresh run (a resumed one restored its values in load_state_dict)
            if self.initial == "sample":
                self.values = [sample(self.space, self.generator) for _ in range(n)]
            else:
                self.values = [{name: t.get(pl_module, i) for name, t in self.targets.items()} for i in range(n)]
            self.timelines = [[(trainer.global_step, dict(v))] for v in self.values]
            self.trace.append((trainer.global_step, [math.nan] * n, [dict(v) for v in self.values]))
        if len(self.values) != n:
            raise ValueError(f"PopulationBasedTraining state holds {len(self.values)} members, the cohort has {n}")
        for i, values in enumerate(self.values):
            self._apply(pl_module, i, values)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        if self.unit == "epoch" and self._due(trainer.current_epoch + 1) and not _finished(trainer):
            self.step(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: CohortModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.unit == "step" and self._due(trainer.global_step) and not _finished(trainer):
            self.step(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        # the final scores (no decision is taken after the last step): best_member and schedule() speak of them
        if self.values is not None and (self.metric is not None or all(
                k in trainer.callback_metrics for k in self._monitor_keys(pl_module.size))):
            self.last_scores = self.scores(trainer, pl_module)

    def _due(self, count: int) -> bool:
        return count > self.burn_in and count % self.interval == 0

    # -------------------------------------------------------------- decisions
    def scores(self, trainer: L.Trainer, pl_module: CohortModule) -> list[float]:
        """Each member's current score (``monitor`` from the logged metrics, or ``metric`` on held-out data)."""
        n = pl_module.size
        if self.metric is not None:
            return pl_module.gather_member_values(lambda ms: [self._score(trainer, pl_module, m) for m in ms], list(range(n)))
        keys = self._monitor_keys(n)
        missing = [k for k in keys if k not in trainer.callback_metrics]
        if missing:
            logged = sorted(k for k in trainer.callback_metrics if "member_" in k)
            raise ValueError(
                f"PopulationBasedTraining: monitor={self.monitor!r} needs {missing[0]!r} (one key per member), which was "
                f"not logged before this decision (step {trainer.global_step}); logged per-member keys: {logged[:8]}"
                f"{' ...' if len(logged) > 8 else ''}. Validate before each decision (check_val_every_n_epoch, "
                "val_check_interval) or rank by metric=... on held-out data"
            )
        return [float(trainer.callback_metrics[k]) for k in keys]

    def _monitor_keys(self, n: int) -> list[str]:
        return [self.monitor.format(i=i) if "{i}" in self.monitor else f"{self.monitor}/member_{i}" for i in range(n)]

    def step(self, trainer: L.Trainer, pl_module: CohortModule) -> list[dict[str, Any]]:
        """Rank, exploit and explore once; returns this decision's exploits (also appended to :attr:`lineage`)."""
        scores = self.scores(trainer, pl_module)
        members = [i for i in range(pl_module.size) if i not in pl_module.retired_members]
        plan = exploit_plan(torch.tensor([scores[i] for i in members], dtype=torch.float64), self.quantile_fraction,
                            self.maximize, self.generator, members)
        explored = {dst: explore(self.values[src], self.space, self.generator, resample_probability=self.resample_probability,
                                 perturbation_factors=self.perturbation_factors) for dst, src in plan.items()}
        plan, explored = pl_module.decide((plan, explored))  # under DDP: rank 0's decision on every rank
        self._exploit(pl_module, plan)
        step, records = trainer.global_step, []
        for dst, src in plan.items():
            records.append({"step": step, "epoch": trainer.current_epoch, "member": dst, "source": src,
                            "score": scores[dst], "source_score": scores[src], "old": dict(self.values[dst]),
                            "new": dict(explored[dst])})
            self.timelines[dst] = [*self.timelines[src], (step, dict(explored[dst]))]
        for dst in plan:
            self.values[dst] = dict(explored[dst])
            self._apply(pl_module, dst, self.values[dst])
        self.lineage.extend(records)
        self.last_scores = scores
        self.trace.append((step, list(scores), [dict(v) for v in self.values]))
        logged = {"pbt/exploits": float(len(plan)), "pbt/best_score": max(scores) if self.maximize else min(scores)}
        for name in self.space:
            for i, values in enumerate(self.values):
                if isinstance(values[name], (int, float)) and not isinstance(values[name], bool):
                    logged[f"pbt/{name}/member_{i}"] = float(values[name])
        pl_module.log_dict(logged, on_step=self.unit == "step", on_epoch=self.unit == "epoch", sync_dist=pl_module.sync_logs)
        return records

    def _exploit(self, pl_module: CohortModule, plan: Mapping[int, int]) -> None:
        """Copy each source into its destination: weights and buffers, optimizer and lr-scheduler state."""
        if not plan:
            return
        sources = sorted(set(plan.values()))
        pl_module.sync_members(sorted({*sources, *plan}))  # under DDP: the current weights on every rank
        for dst, src in plan.items():
            pl_module.cohort.broadcast(src, [dst])
        optimizers = pl_module.member_optimizers()
        # optimizer state lives on the rank that trains the member: each source's owner sends it
        world = pl_module.world_size
        own = {s: copy.deepcopy(optimizers[s].state_dict()) for s in sources
               if world == 1 or D.member_owner(s, world) == pl_module.global_rank}
        states = {k: v for part in D.gather_objects(own) for k, v in part.items()} if world > 1 else own
        for dst, src in plan.items():
            optimizers[dst].load_state_dict(copy.deepcopy(states[src]))
            scheduler = pl_module.member_lr_scheduler(dst)
            if scheduler is not None:
                scheduler.load_state_dict(copy.deepcopy(pl_module.member_lr_scheduler(src).state_dict()))

    def _apply(self, pl_module: CohortModule, i: int, values: Mapping[str, Any]) -> None:
        for name, target in self.targets.items():
            target.set(pl_module, i, values[name])

    def _score(self, trainer: L.Trainer, pl_module: CohortModule, member: int) -> float:
        return score(pl_module.cohort[member], self._holdout(trainer), self.metric, pl_module.device,
                     max_batches=self.fitness_batches, select=lambda batch: pl_module.member_batch(batch, member))

    def _holdout(self, trainer: L.Trainer) -> Any:
        if self.fitness_dataloader is None:
            dm = trainer.datamodule
            if dm is None or not hasattr(dm, "holdout_dataloader"):
                raise ValueError("PopulationBasedTraining(metric=...) needs held-out data: pass fitness_dataloader=... or "
                                 "use a CohortDataModule (its members' vote splits are the held-out data)")
            self.fitness_dataloader = dm.holdout_dataloader()
        return self.fitness_dataloader

    # ---------------------------------------------------------------- results
    @property
    def initial_values(self) -> list[dict[str, Any]]:
        """Each member's hyperparameters at the start of training (its own sample of the space)."""
        if not self.trace:
            raise RuntimeError("PopulationBasedTraining has not started: no member has values yet")
        return [dict(v) for v in self.trace[0][2]]  # (a member's schedule starts with its first ancestor's values)

    @property
    def best_member(self) -> int:
        """The member with the best score at the end of training (or, during it, at the last decision)."""
        if self.last_scores is None:
            raise RuntimeError("PopulationBasedTraining has made no decision yet: no member is best")
        return ranking(self.last_scores, self.maximize)[0]

    def schedule(self, member: int | None = None) -> list[dict[str, Any]]:
        """``member``'s (default: the best one's) hyperparameters over the run: ``[{"step": s, name: value, ...}]``,
        each entry in force from step ``s`` on (what it inherited from the members it copied included)."""
        if not self.timelines:
            raise RuntimeError("PopulationBasedTraining has not started: there is no schedule yet")
        member = self.best_member if member is None else member
        if not 0 <= member < len(self.timelines):
            raise IndexError(f"member must be in 0..{len(self.timelines) - 1}, got {member}")
        return [{"step": step, **values} for step, values in self.timelines[member]]

    def write_lineage(self, path: str | Path) -> Path:
        """Every exploit as CSV: step, epoch, member, source, scores, and each hyperparameter's old and new value."""
        rows = []
        for r in self.lineage:
            row = {k: r[k] for k in ("step", "epoch", "member", "source", "score", "source_score")}
            for name in self.space:
                row[f"{name}_old"], row[f"{name}_new"] = r["old"][name], r["new"][name]
            rows.append(row)
        fields = ["step", "epoch", "member", "source", "score", "source_score",
                  *(f"{name}_{when}" for name in self.space for when in ("old", "new"))]
        return write_csv(path, rows, fields)

    def write_schedule(self, path: str | Path, member: int | None = None) -> Path:
        """:meth:`schedule` as CSV (``step`` and one column per hyperparameter), what the replay reads."""
        return write_csv(path, self.schedule(member), ["step", *self.space])

    def write_artifacts(self, trainer: L.Trainer, pl_module: CohortModule, out: Path) -> dict[str, Path]:
        """``pbt_lineage.csv``, ``pbt_schedule.csv`` and the figure ``pbt.png`` in ``out`` (nothing before a decision)."""
        if self.last_scores is None:
            return {}
        self.write_lineage(out / "pbt_lineage.csv")
        self.write_schedule(out / "pbt_schedule.csv")
        from lightning_colearn import plots  # matplotlib only here

        return {"pbt": plots.plot_pbt(self, out / "pbt.png")}

    def progress_postfix(self) -> dict[str, str]:
        """The last decision, for the progress bar: ``{"pbt": "decision 3: 4 exploits, best 0.81"}``."""
        if self.last_scores is None:
            return {}
        decisions = [t for t in self.trace if not all(math.isnan(s) for s in t[1])]  # (the first entry: initial values)
        exploits = sum(1 for r in self.lineage if decisions and r["step"] == decisions[-1][0])
        best = (max if self.maximize else min)(self.last_scores)
        return {"pbt": f"decision {len(decisions)}: {exploits} exploits, best {best:.4g}"}

    def on_fit_end(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        figures = trackers.publish(trainer, pl_module, self)  # nothing without a logger, on another rank, or before a decision
        if figures:
            rank_zero_info(f"PopulationBasedTraining: best member {self.best_member}; lineage in {figures['pbt'].parent / 'pbt_lineage.csv'}")

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "values": copy.deepcopy(self.values),
                "lineage": copy.deepcopy(self.lineage), "trace": copy.deepcopy(self.trace),
                "timelines": copy.deepcopy(self.timelines), "last_scores": self.last_scores}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            generator = torch.Generator()
            generator.set_state(state_dict["generator"])
            values = state_dict["values"]
            if values is not None and not (isinstance(values, list) and all(isinstance(v, dict) and set(v) == set(self.space)
                                                                           for v in values)):
                raise ValueError(f"values must hold one dict of {sorted(self.space)} per member")
            lineage, trace, timelines = list(state_dict["lineage"]), list(state_dict["trace"]), list(state_dict["timelines"])
        except (KeyError, RuntimeError, TypeError, ValueError) as err:
            raise ValueError(f"PopulationBasedTraining checkpoint state is corrupt or from another search space: {err}") from err
        self.generator, self.values, self.lineage, self.trace = generator, values, lineage, [tuple(t) for t in trace]
        self.timelines = [[tuple(e) for e in t] for t in timelines]
        self.last_scores = state_dict.get("last_scores")


class PopulationBasedTrainingReplay(Callback):
    """Train on a schedule found by :class:`PopulationBasedTraining` (Ray Tune's ``PopulationBasedTrainingReplay``).

    Args:
        schedule: ``pbt.schedule()`` (a list of ``{"step": s, name: value, ...}``), or the path of a
            ``pbt_schedule.csv``.

    Every member of the :class:`CohortModule` (typically ``size=1``) takes each entry's values at the
    start of step ``s`` (entry 0 before training). Weights are not copied: one model trains from its own
    initialisation along the best member's hyperparameter schedule.

    Example::

        replay = PopulationBasedTrainingReplay(pbt.schedule())
        L.Trainer(max_epochs=10, callbacks=[replay]).fit(CohortModule(MLP, size=1, optimizer=...), dm)
    """

    def __init__(self, schedule: Sequence[Mapping[str, Any]] | str | Path) -> None:
        entries = _read_schedule(schedule) if isinstance(schedule, (str, Path)) else [dict(e) for e in schedule]
        if not entries or any("step" not in e for e in entries):
            raise ValueError(f"PopulationBasedTrainingReplay: schedule must be a non-empty list of dicts with 'step', got {schedule!r}")
        steps = [e["step"] for e in entries]
        if steps != sorted(steps):
            raise ValueError(f"PopulationBasedTrainingReplay: schedule steps must not decrease, got {steps}")
        self.entries = entries
        self.targets = {name: _Target(name) for name in entries[0] if name != "step"}
        self.applied = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        for target in self.targets.values():
            target.check(pl_module)
        self._catch_up(trainer.global_step, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: CohortModule, batch: Any, batch_idx: int) -> None:
        self._catch_up(trainer.global_step, pl_module)

    def _catch_up(self, step: int, pl_module: CohortModule) -> None:
        latest = None
        while self.applied < len(self.entries) and self.entries[self.applied]["step"] <= step:
            latest = self.entries[self.applied]
            self.applied += 1
        if latest is None:
            return
        for i in range(pl_module.size):
            for name, target in self.targets.items():
                target.set(pl_module, i, latest[name])

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = 0  # the entries in force at the resumed step are applied again at train start


def _finished(trainer: L.Trainer) -> bool:
    """True after the run's last step: no decision then (its copies would never train, and a test after fit
    would score them twice; Ray Tune does not perturb a finished trial either)."""
    last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs \
        and trainer.is_last_batch
    last_step = trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps
    return bool(last_epoch or last_step or trainer.should_stop)  # should_stop: early stopping, max_time, ...


def _read_schedule(path: str | Path) -> list[dict[str, Any]]:
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: _parse_value(v) if k != "step" else int(v) for k, v in row.items()} for row in rows]


def _parse_value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
