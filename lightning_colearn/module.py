"""CohortModule: a LightningModule that trains every active member of a cohort.

Two ways in:

* a plain ``nn.Module`` (class, factory, instance or list) plus a loss and an
  optimizer partial: the module computes ``loss(member(x), y)`` per member and
  logs loss and accuracy per member and for the cohort (mean, best);
* an existing ``LightningModule`` (class, instance or list), replicated N times:
  its ``training_step``, ``validation_step``, ``test_step`` and
  ``configure_optimizers`` are reused unchanged; what it ``self.log``s is
  logged as ``<name>/member_<i>`` (and ``<name>/mean`` for scalars).

Training uses manual optimization: one optimizer per member inside a single
:class:`~lightning_colearn.optim.CohortOptimizer`, one backward over the sum
of the active members' losses (the members share no parameters, so each gets
exactly its own gradient), per-member gradient clipping, and one Lightning
step per batch (``max_steps`` counts batches, not member updates).

Callbacks implementing communication rules set :attr:`CohortModule.active_members`
and use :attr:`CohortModule.cohort` arithmetic between steps.

Under a DDP strategy (``Trainer(strategy="ddp", devices=W)``)
the members are sharded over the ranks, member ``i`` on rank ``i % W``, and each rank
trains only its own (:mod:`lightning_colearn.distributed`): rules call
:meth:`CohortModule.sync_members` before they read other ranks' members,
:meth:`CohortModule.gather_member_values` for per-member numbers, and
:meth:`CohortModule.decide` for decisions taken once. Validation and test split
the evaluation batches over the ranks (torchmetrics syncs the metrics), and a
checkpoint holds every member's weights and optimizer state, so it resumes
with any number of processes.

Examples:
    >>> import lightning as L
    >>> from functools import partial
    >>> import torch
    >>> from lightning_colearn import CohortDataModule, CohortModule
    >>> from lightning_colearn.models import LogisticRegression
    >>> _ = L.seed_everything(0, verbose=False)
    >>> module = CohortModule(LogisticRegression, size=2, optimizer=partial(torch.optim.Adam, lr=1e-3))
    >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, logger=False,
    ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(module, datamodule=CohortDataModule(num_members=2))
    >>> trainer.global_step, sorted(k for k in trainer.callback_metrics if k.startswith("val_acc"))
    (3, ['val_acc/best', 'val_acc/mean', 'val_acc/member_0', 'val_acc/member_1'])
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.data import DistributedSampler
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_colearn import distributed as D
from lightning_colearn.cohort import BACKENDS, Cohort, MemberSpec
from lightning_colearn.functional import stacked as FS
from lightning_colearn.metrics.cohort import CohortMetric
from lightning_colearn.optim import STACKED_OPTIMIZERS, CohortOptimizer, StackedOptimizer
from lightning_colearn.stacked import StackedBatchNorm, StackedLinear, batched_layers

__all__ = ["CohortModule", "choose_backend"]

OptimizerFactory = Callable[[Iterator[nn.Parameter]], Optimizer]


class CohortModule(L.LightningModule):
    """Train a cohort of N members with Lightning.

    Args:
        model: a :class:`Cohort`, a list of modules, a module instance (copied
            ``size`` times), or a class/factory (called ``size`` times); modules
            may be ``LightningModule``s, whose step methods are then reused.
        size: number of members when ``model`` is not a cohort or list.
        loss: ``loss(logits, target)`` for plain modules (default: cross-entropy).
        optimizer: ``optimizer(params) -> Optimizer`` (e.g. ``partial(torch.optim.SGD, lr=0.01)``),
            called once per member, or a list with one such callable per member. Default for plain modules: Adam, lr 1e-3. For
            LightningModule members, default: their own ``configure_optimizers``.
        lr_scheduler: ``lr_scheduler(optimizer) -> LRScheduler``, stepped per epoch, one per member.
        num_classes: classes for accuracy metrics (default: the members' ``num_classes`` attribute, if any;
            a one-output model, ``num_classes=1``, is a regressor and gets no accuracy).
        gradient_clip_val: clip each member's gradient norm to this value separately
            (Lightning's own ``gradient_clip_val`` would clip the norm over all members at once).
        backend: ``"loop"`` (one module and one optimizer per member),
            ``"stacked"`` (same-architecture plain modules trained as one
            batched computation, with one :class:`~lightning_colearn.optim.StackedOptimizer`;
            SGD, Adam and AdamW), or ``"auto"`` (:func:`choose_backend`: stacked
            where it measured faster). Default: the cohort's own backend, or ``"loop"``.
        privacy: sample-level differential privacy for every member: a
            :class:`~lightning_colearn.privacy.PrivacyConfig` (or a mapping of its fields): each member
            trains with DP-SGD through Opacus, with its own accountant; ``dp/epsilon/member_<i>`` is
            logged every epoch and a member whose next epoch would pass ``target_epsilon`` is retired
            (it trains no more). Needs the loop backend and a ``CohortDataModule(sampling="poisson")``
            (see :mod:`lightning_colearn.private`). Needs the ``privacy`` extra (Opacus).

    Both backends give the same results within float tolerance for the same
    seed (the loop is the oracle in the tests), and their checkpoints load
    into each other.
    """

    #: Settings of this module that may differ per member, as a list of one value per member
    #: (:class:`~lightning_colearn.callbacks.PopulationBasedTraining` tunes them as ``module.<name>``).
    per_member_hyperparameters: tuple[str, ...] = ()

    def __init__(
        self,
        model: MemberSpec | Cohort,
        size: int | None = None,
        *,
        loss: Callable[[Tensor, Tensor], Tensor] | None = None,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: Callable[[Optimizer], Any] | None = None,
        num_classes: int | None = None,
        gradient_clip_val: float | None = None,
        backend: str | None = None,
        privacy: Any = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.privacy = _privacy_config(privacy)
        if backend is not None and backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be one of {['auto', *BACKENDS]}, got {backend!r}")
        cohort = model if isinstance(model, Cohort) else Cohort(model, size)
        wrapped = [isinstance(m, L.LightningModule) for m in cohort]
        if any(wrapped) and not all(wrapped):
            raise TypeError("members must be all LightningModules or all plain nn.Modules, not a mix")
        self.wraps_lightning = all(wrapped)
        if optimizer is None and not self.wraps_lightning:
            optimizer = partial(torch.optim.Adam, lr=1e-3)
        if backend == "auto":
            backend = choose_backend(cohort, optimizer, self.wraps_lightning)
        if backend == "stacked":
            _check_stackable(cohort, optimizer, self.wraps_lightning)
        if self.privacy is not None:
            if backend == "stacked" or (backend is None and cohort.backend == "stacked"):
                raise ValueError("privacy: DP-SGD needs each member's per-sample gradients, which Opacus computes on the "
                                 "loop backend; use backend='loop' (or 'auto', which then picks it)")
            backend = "loop"
            from lightning_colearn.privacy import check_model

            cohort = Cohort([check_model(m, self.privacy.fix_model) for m in cohort.members], backend="loop")
        if backend is not None and backend != cohort.backend:
            cohort = Cohort(list(cohort.members), backend=backend)
        self.cohort = cohort
        for i, member in enumerate(self.cohort):
            if self.wraps_lightning and not member.automatic_optimization:
                raise ValueError(
                    f"member {i} ({type(member).__name__}) uses manual optimization; CohortModule steps the members "
                    "itself and needs members whose training_step returns a loss"
                )
        if isinstance(optimizer, (list, tuple)):
            if len(optimizer) != len(self.cohort) or not all(callable(o) for o in optimizer):
                raise TypeError(f"optimizer as a list needs one callable per member ({len(self.cohort)}), got {optimizer!r}")
        elif optimizer is not None and not callable(optimizer):
            raise TypeError(f"optimizer must be a callable params -> Optimizer (e.g. a partial), got {optimizer!r}")
        if gradient_clip_val is not None and (isinstance(gradient_clip_val, bool) or not isinstance(gradient_clip_val, (int, float))
                                              or not 0 < gradient_clip_val < math.inf):
            raise ValueError(f"gradient_clip_val must be a finite number > 0 or None, got {gradient_clip_val!r}")
        self.loss_fn = loss if loss is not None else F.cross_entropy
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.gradient_clip_val = gradient_clip_val
        classes = num_classes if num_classes is not None else _common_attr(self.cohort, "num_classes")
        # one output is a regressor (num_classes=1 for a regression target): no accuracy, callbacks need a criterion
        self.num_classes = None if type(classes) is int and classes < 2 else classes
        # modules and callables stay out of hparams (a checkpoint must load with weights_only=True)
        self.save_hyperparameters(ignore=["model", "students", "loss", "optimizer", "lr_scheduler", "privacy"])
        #: DP-SGD state of the members (set when the optimizers are built), ``None`` without ``privacy``.
        self.private: Any = None
        self._pending_privacy_state: dict[str, Any] | None = None

        n = len(self.cohort)
        #: Members trained in the next steps (``None``: all). Set by communication callbacks.
        self.active_members: list[int] | None = None
        #: Each member's most recent training loss (NaN before its first step); swarm fitness reads it.
        self.register_buffer("last_loss", torch.full((n,), math.nan))
        # Epoch sums live on the module's device: accumulating them never syncs the device mid-epoch.
        self.register_buffer("_epoch_loss", torch.zeros(n), persistent=False)
        self.register_buffer("_epoch_steps", torch.zeros(n, dtype=torch.long), persistent=False)
        self._schedulers: list[dict[str, Any] | None] = []
        self._pending_scheduler_states: list[Any] | None = None
        #: Extra loss terms ``term(member) -> Tensor`` added to each member's training loss
        #: (e.g. FedProx's proximal term, registered by :class:`~lightning_colearn.FederatedAveraging`).
        self.loss_terms: list[Callable[[int], Tensor]] = []
        #: Members the most recent training step updated (callbacks count a round's steps with it).
        self.stepped_members: list[int] = []
        self._member_logs: dict[str, dict[int, list[float]]] = defaultdict(_per_member_lists)  # (no lambda: ddp_spawn pickles the module)
        # Members across ranks (set at setup under a DDP strategy): this rank, the process count, the
        # members whose copies on non-owning ranks are stale, and whether evaluation splits its batches.
        self._rank, self._world_size = 0, 1
        self._stale: set[int] = set()
        self._shard_eval = False
        self._losses_shared = True
        if not self.wraps_lightning:
            self.val_loss = CohortMetric(MeanMetric(), n, maximize=False)
            self.test_loss = CohortMetric(MeanMetric(), n, maximize=False)
            if self.num_classes is not None:
                acc = MulticlassAccuracy(num_classes=int(self.num_classes), average="micro")
                self.val_acc = CohortMetric(acc, n)
                self.test_acc = CohortMetric(acc, n)

    # ----------------------------------------------------------------- basics
    @property
    def size(self) -> int:
        return len(self.cohort)

    @property
    def stacked(self) -> bool:
        """True when the cohort keeps its members stacked (``backend="stacked"``)."""
        return self.cohort.backend == "stacked"

    def forward(self, x: Tensor) -> Tensor:
        """Every member's output on ``x``, stacked: ``[N, B, ...]``."""
        return self.cohort(x)

    def member_outputs(self, x: Tensor, members: list[int] | None = None) -> list[Tensor]:
        """The outputs of ``members`` (default: all) on one shared batch ``x``: one forward per member, or one in all."""
        members = list(range(self.size)) if members is None else members
        if self.stacked:
            return list(self.cohort.stacked_forward(x, members).unbind(0))
        return [self.cohort[i](x) for i in members]

    def _member_logits(self, batch: Any, members: list[int]) -> tuple[dict[int, tuple[Tensor, Tensor]], Tensor | None]:
        """``{member: (logits, y)}`` through the stacked forward (one call per group of same-shaped batches),
        and the stacked logits ``[n, B, ...]`` when one call served every member (else None)."""
        # members come validated (_active); every member in order needs no list for the cohort to check again
        every = None if members == list(range(self.size)) else members
        if not (isinstance(batch, Mapping) and all(isinstance(k, int) for k in batch)):
            x, y = batch
            out = self.cohort.stacked_forward(x, every)
            return dict(zip(members, ((o, y) for o in out.unbind(0)))), out
        if type(self).member_batch is CohortModule.member_batch and all(i in batch for i in members):
            parts = {i: batch[i] for i in members}  # (x, y) of each member; the same as member_batch, without N checks
        else:
            parts = {i: self.member_batch(batch, i) for i in members}
        groups: dict[tuple, list[int]] = defaultdict(list)  # a member's last batch of an epoch may be shorter
        for i, (x, y) in parts.items():
            groups[(x.shape, y.shape)].append(i)
        result, whole = {}, None
        for group in groups.values():
            xs = _stack_members([parts[i][0] for i in group])
            out = self.cohort.stacked_forward(xs, every if len(groups) == 1 else group, per_member=True)
            if len(groups) == 1:
                whole = out  # the losses use it whole: no N selects in the backward
            result.update({i: (o, parts[i][1]) for i, o in zip(group, out.unbind(0))})
        return {i: result[i] for i in members}, whole

    def member_batch(self, batch: Any, member: int) -> Any:
        """Member ``member``'s part of ``batch``: ``batch[member]`` for per-member dict batches, else ``batch``."""
        if isinstance(batch, Mapping) and all(isinstance(k, int) for k in batch):
            if member not in batch:
                raise KeyError(f"batch has no entry for member {member} (members in batch: {sorted(batch)})")
            return batch[member]
        return batch

    def _active(self) -> list[int]:
        if self.active_members is None:
            active = list(range(self.size))
        else:
            active = [int(i) for i in self.active_members]
            for i in active:
                if not 0 <= i < self.size:
                    raise IndexError(f"active_members holds {i}, but the cohort has members 0..{self.size - 1}")
        retired = self.retired_members
        return [i for i in active if i not in retired] if retired else active

    @property
    def retired_members(self) -> set[int]:
        """Members that train no more: their privacy budget is spent (empty without ``privacy``)."""
        return self.private.retired if self.private is not None else set()

    def _trainable(self) -> list[int]:
        """The active members this process trains (all active ones in one process)."""
        active = self._active()
        return active if self._world_size == 1 else [i for i in active if D.member_owner(i, self._world_size) == self._rank]

    # ------------------------------------------------------- members across ranks
    @property
    def world_size(self) -> int:
        """Processes the members are sharded over (1 outside DDP)."""
        return self._world_size

    @property
    def owned_members(self) -> list[int]:
        """The members this process trains: all of them in one process, ``i % world_size == rank`` under DDP."""
        return D.owned_members(self.size, self._rank, self._world_size)

    @property
    def sync_logs(self) -> bool:
        """``sync_dist`` for epoch-level logs: under DDP every rank logs the same value (Lightning expects the
        sync there, and the mean of equal values is that value, exactly)."""
        return self._world_size > 1

    def sync_members(self, members: list[int] | None = None) -> None:
        """Bring this process's copies of ``members`` (default: all) up to date from the ranks that train them.

        A collective under DDP: every rank calls it at the same point with the same
        ``members``. Only members that trained since their last sync move bytes;
        in one process it does nothing.
        """
        if self._world_size == 1:
            return
        wanted = range(self.size) if members is None else members
        stale = sorted(self._stale.intersection(wanted))
        if stale:
            D.sync_members(self.trainer.strategy, self.cohort.member_tensors, stale, self._rank, self._world_size)
            self._stale.difference_update(stale)

    def gather_member_values(self, compute: Callable[[list[int]], list[float]], members: list[int]) -> list[float]:
        """One number per member of ``members``: ``compute(some_members)`` returns theirs (e.g. scores).

        Under DDP each rank computes only the members it trains (it holds their current
        weights without a sync, and the work splits over the ranks), and one
        ``all_reduce`` gives every rank all the values; in one process it is ``compute(members)``.
        """
        if self._world_size == 1:
            return list(compute(list(members)))
        mine = [m for m in dict.fromkeys(members) if D.member_owner(m, self._world_size) == self._rank]
        values = dict(zip(mine, compute(mine))) if mine else {}
        return D.gather_values(self.trainer.strategy, values, members, self.last_loss.device)

    def decide(self, decision: Any) -> Any:
        """Rank 0's ``decision`` on every rank (taken once, so no rank can drift); ``decision`` itself in one process."""
        if self._world_size == 1:
            return decision
        return self.trainer.strategy.broadcast(decision, src=0)

    # --------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        opt = self.optimizers()
        opt.zero_grad()
        self.stepped_members = []
        if self._world_size > 1:
            self._no_gradient_sync()
        member_losses = self.cohort_losses(batch, batch_idx)
        own, losses, total = list(member_losses), None, None
        if member_losses:
            vector = getattr(member_losses, "vector", None)
            if vector is not None:  # stacked: one sum, one write (not N selects and adds)
                total, losses = vector.sum(), vector.detach()
            else:
                total = sum(member_losses.values())
                losses = torch.stack([loss.detach() for loss in member_losses.values()])
            losses = losses.to(self.last_loss.dtype)
            # The members share no parameters (or, in MutualLearning, see each other only detached),
            # so one backward over the sum gives every member exactly its own gradient.
            self.manual_backward(total)
        stepped, written = own, own
        if self._world_size > 1:
            stepped = self._stepping_members()
            if stepped is None:  # a member's step may return None: every rank learns which stepped, and their losses
                stepped, losses = self._share_step(own, losses)
                written = stepped
            else:  # no exchange per step (ranks run unsynchronised between rules); losses are shared when read
                self._losses_shared = False
            self._stale.update(stepped)
        if not stepped:
            return None
        self.stepped_members = stepped
        # every rank steps (its own members, maybe none this step): Lightning counts global_step on each rank alike
        opt.step(members=own, allow_empty=True)
        self._step_schedulers("step")
        if written:
            # every member, in order (the common case): whole-tensor ops, no list-to-index conversions
            rows = slice(None) if len(written) == self.size and written == list(range(self.size)) else written
            self.last_loss[rows] = losses
            self._epoch_loss[rows] += losses
            self._epoch_steps[rows] += 1
        if self._log_this_step(batch_idx):
            self.share_losses()
            self.log("train_loss/mean", self.last_loss[stepped].mean(), prog_bar=True, batch_size=_batch_size(batch))
        return None if total is None else total.detach()

    def _stepping_members(self) -> list[int] | None:
        """The members this step trains on all ranks together, when known without asking the other ranks.

        Every active member of plain modules steps; a wrapped LightningModule's (or an
        overridden) step may return None, so those are exchanged (``None`` here).
        """
        plain = type(self).member_training_step is CohortModule.member_training_step and not self.wraps_lightning
        return self._active() if plain and type(self).cohort_losses is CohortModule.cohort_losses else None

    def share_losses(self) -> None:
        """Make every member's last training loss and this epoch's loss sums known on every rank.

        Under DDP each rank updates only its own members' entries of :attr:`last_loss`
        between communication points; rules that read them call this first (a collective:
        one ``all_reduce``, skipped when nothing changed). In one process it does nothing.
        """
        if self._world_size == 1 or self._losses_shared:
            return
        own = self.owned_members
        mine = torch.zeros(3, self.size, dtype=torch.float64, device=self.last_loss.device)
        mine[0, own] = self.last_loss[own].double()  # a never-trained member's NaN passes through the sum
        mine[1, own] = self._epoch_loss[own].double()
        mine[2, own] = self._epoch_steps[own].double()
        total = self.trainer.strategy.reduce(mine, reduce_op="sum")
        self.last_loss.copy_(total[0])
        self._epoch_loss.copy_(total[1])
        self._epoch_steps.copy_(total[2].round().long())
        self._losses_shared = True

    def _no_gradient_sync(self) -> None:
        # DDP would average the gradients across ranks, i.e. across different members. The members share no
        # parameters: no sync at all for this step's backward (what DDP's no_sync() sets; Lightning sets it
        # back after every training forward in manual optimization, hence here, inside the step).
        model = self.trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            model.require_backward_grad_sync = False

    def _share_step(self, stepped: list[int], losses: Tensor | None) -> tuple[list[int], Tensor]:
        """The members that stepped on any rank, and their losses: one ``all_reduce`` of ``[2, N]``."""
        shared = torch.zeros(2, self.size, dtype=self.last_loss.dtype, device=self.last_loss.device)
        if stepped:
            shared[0, stepped] = losses
            shared[1, stepped] = 1
        shared = self.trainer.strategy.reduce(shared, reduce_op="sum")
        everyone = shared[1].nonzero().flatten()
        return everyone.tolist(), shared[0, everyone]

    def cohort_losses(self, batch: Any, batch_idx: int) -> dict[int, Tensor]:
        """``{member: loss}`` for the members that train on this batch (the active ones whose step returned a loss).

        Override when the losses couple the members (as :class:`~lightning_colearn.MutualLearning` does);
        override :meth:`member_training_step` to change one member's loss.
        """
        if self.stacked and type(self).member_training_step is CohortModule.member_training_step:
            return self._stacked_losses(batch, self._trainable())
        losses = {}
        for i in self._trainable():
            loss = self.member_training_step(i, self.member_batch(batch, i), batch_idx)
            if loss is not None:  # Lightning's convention: a step returning None is skipped
                for term in self.loss_terms:
                    loss = loss + term(i)
                losses[i] = loss
        return losses

    def _stacked_losses(self, batch: Any, active: list[int]) -> dict[int, Tensor]:
        if not active:
            return {}
        outputs, whole = self._member_logits(batch, active)
        values = None
        if self.loss_fn is F.cross_entropy and len({y.shape for _, y in outputs.values()}) == 1:
            # [n, B, C]: one loss call for all members
            logits = whole if whole is not None else torch.stack([outputs[i][0] for i in active])
            ys = _stack_members([outputs[i][1] for i in active])
            per_sample = F.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="none")
            values = per_sample.view(len(active), -1).mean(1)
            losses = {i: values[k] for k, i in enumerate(active)}
        else:
            losses = {i: self.loss_fn(*outputs[i]) for i in active}
        for term in self.loss_terms:
            losses = {i: loss + term(i) for i, loss in losses.items()}
        if not self.loss_terms and values is not None:
            return _LossVector(losses, values)  # training_step sums the vector itself
        return losses

    def _log_this_step(self, batch_idx: int) -> bool:
        # self.log costs ~0.6 ms a call, a large share of a small cohort's step; per-step values are
        # logged every log_every_n_steps batches (what the logger keeps anyway), epoch means always.
        every = max(1, int(getattr(self.trainer, "log_every_n_steps", 1) or 1))
        return batch_idx % every == 0

    def member_training_step(self, member: int, batch: Any, batch_idx: int) -> Tensor | None:
        """The loss of one member on its batch (override to change what a member optimises)."""
        module = self.cohort[member]
        if self.wraps_lightning:
            out = self._call_member(member, "training_step", batch, batch_idx)
            if out is None or isinstance(out, Tensor):
                return out
            if isinstance(out, Mapping) and "loss" in out:
                return out["loss"]
            raise TypeError(f"member {member}'s training_step must return a loss tensor, a dict with 'loss', or None")
        x, y = batch
        if len(x) == 0:  # an empty Poisson batch: a noise-only DP step (the loss' mean over no samples is NaN)
            return module(x).sum() * 0.0
        return self.loss_fn(module(x), y)

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        # Runs after the precision plugin unscaled the gradients (16-mixed),
        # so the clip threshold applies to true gradient norms.
        if self.gradient_clip_val is None:
            return
        if self.stacked:  # per member, never one norm across members
            grads = [p.grad for p in self.cohort.stacked_parameters() if p.grad is not None]
            if grads:
                FS.clip_grad_norms_(grads, self.gradient_clip_val)
            return
        for i in self.stepped_members:
            torch.nn.utils.clip_grad_norm_(self.cohort[i].parameters(), self.gradient_clip_val)

    def on_train_epoch_start(self) -> None:
        self._epoch_loss.zero_()
        self._epoch_steps.zero_()

    def on_train_epoch_end(self) -> None:
        if self.private is not None:
            self._account_privacy()
        self.share_losses()
        trained = (self._epoch_steps > 0).nonzero().flatten().tolist()
        if trained:
            means = self._epoch_loss[trained] / self._epoch_steps[trained]
            self.log_dict({f"train_loss/member_{i}": float(v) for i, v in zip(trained, means)}, sync_dist=self.sync_logs)
        self._log_member_means("train")
        self._step_schedulers("epoch")

    # ------------------------------------------------------------- evaluation
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._skip_eval_batch(batch_idx):
            self._evaluate("val", batch, batch_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._skip_eval_batch(batch_idx):
            self._evaluate("test", batch, batch_idx)

    def on_validation_epoch_start(self) -> None:
        self._start_eval(self.trainer.val_dataloaders)

    def on_test_epoch_start(self) -> None:
        self._start_eval(self.trainer.test_dataloaders)

    def _start_eval(self, loaders: Any) -> None:
        if self._world_size == 1:
            return
        self.sync_members()  # every rank evaluates every member, on its share of the batches
        # rank r takes batches r, r + W, ...: each batch once, no padding (a DistributedSampler repeats samples
        # to even out the ranks); if Lightning already split the loader over the ranks, every batch is ours
        self._shard_eval = not _split_over_ranks(loaders)

    def _skip_eval_batch(self, batch_idx: int) -> bool:
        return self._world_size > 1 and self._shard_eval and batch_idx % self._world_size != self._rank

    def _any_rank(self, flag: bool) -> bool:
        return flag if self._world_size == 1 else self.trainer.strategy.reduce_boolean_decision(flag, all=False)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _evaluate(self, stage: str, batch: Any, batch_idx: int) -> None:
        if self.stacked:
            for i, (logits, y) in self._member_logits(batch, list(range(self.size)))[0].items():
                getattr(self, f"{stage}_loss").update(i, self.loss_fn(logits, y), weight=len(y))
                if self.num_classes is not None:
                    getattr(self, f"{stage}_acc").update(i, logits, y)
            return
        for i in range(self.size):
            member_batch = self.member_batch(batch, i)
            if self.wraps_lightning:
                self._call_member(i, f"{'validation' if stage == 'val' else 'test'}_step", member_batch, batch_idx)
                continue
            x, y = member_batch
            logits = self.cohort[i](x)
            getattr(self, f"{stage}_loss").update(i, self.loss_fn(logits, y), weight=len(y))
            if self.num_classes is not None:
                getattr(self, f"{stage}_acc").update(i, logits, y)

    def _log_eval(self, stage: str) -> None:
        if self.wraps_lightning:
            self._log_member_means(stage)
            return
        names = ["loss"] + (["acc"] if self.num_classes is not None else [])
        for name in names:
            metric: CohortMetric = getattr(self, f"{stage}_{name}")
            if not self._any_rank(bool(metric.updated())):  # under DDP compute() syncs: all ranks or none
                continue
            with warnings.catch_warnings():  # under DDP a rank may have had no batch of a short evaluation set
                warnings.filterwarnings("ignore", message=".*was called before the ``update`` method")
                values = metric.compute()
            _, best = metric.best(values)
            logged = {f"{stage}_{name}/member_{i}": values[i] for i in range(self.size)}
            logged[f"{stage}_{name}/best"] = best
            self.log_dict(logged, sync_dist=self.sync_logs)
            self.log(f"{stage}_{name}/mean", values.mean(), prog_bar=True, sync_dist=self.sync_logs)
            metric.reset()

    # ------------------------------------------------------ wrapped modules
    def setup(self, stage: str) -> None:
        self._rank, self._world_size = self.trainer.global_rank, self.trainer.world_size
        if self._world_size > 1:  # leave the process group together at exit, whichever launcher started us
            D.release_process_group_at_exit()
        # every rank starts from the same members (DDP broadcasts rank 0's when it wraps the module)
        self._stale, self._losses_shared = set(), True
        connector = getattr(self.trainer, "_accelerator_connector", None)
        if self._world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            # The members are sharded, not the data: every rank needs every batch. Lightning's default would put a
            # DistributedSampler into the loaders; it reads this flag after setup(). (If a later Lightning moves the
            # flag, on_train_start still refuses a split training loader with a clear message.)
            connector.use_distributed_sampler = False
            rank_zero_info("CohortModule: use_distributed_sampler set to False (the members are sharded over the "
                           "processes, not the data)")
        if self._world_size > 1 and not any(p.requires_grad for p in self.parameters()):
            # a stacked cohort keeps its trainable tensors outside the module tree (the members hold views),
            # and DDP refuses a module without a trainable parameter: give it one it never has to sync
            self._ddp_anchor = _DDPAnchor()
        if self.stacked and getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"precision={self.trainer.precision!r} scales gradients per parameter, which the stacked backend does "
                "not support; use precision='bf16-mixed' or '32-true', or backend='loop'"
            )
        if self.wraps_lightning:
            for member in self.cohort:
                member.trainer = self.trainer  # so member code may read self.trainer / self.current_epoch

    def on_train_start(self) -> None:
        if self._world_size == 1:
            return
        if _split_over_ranks(self.trainer.train_dataloader):
            raise ValueError(
                "CohortModule under DDP shards the members over the ranks, and every rank must see every "
                "training batch, but the training loader has a DistributedSampler (each rank would see part "
                "of the data); use a plain sampler (Trainer(use_distributed_sampler=False) keeps Lightning "
                "from adding one)"
            )

    def on_train_end(self) -> None:
        self.share_losses()
        self.sync_members()  # every rank (rank 0 for ddp_spawn's hand-back, trainer.test) holds the final members

    def teardown(self, stage: str) -> None:
        if self.wraps_lightning:
            for member in self.cohort:
                member.trainer = None

    def _call_member(self, member: int, hook: str, *args: Any) -> Any:
        with self._member_logging(member, hook):
            return getattr(self.cohort[member], hook)(*args)

    @contextmanager
    def _member_logging(self, member: int, hook: str):
        # A wrapped module's self.log(name, ...) becomes our self.log("name/member_i", ...);
        # scalars are also kept to log the cohort mean at epoch end.
        module = self.cohort[member]
        stage = {"training_step": "train", "validation_step": "val", "test_step": "test"}[hook]

        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            if self._world_size == 1:
                self.log(f"{name}/member_{member}", value, *args, **kwargs)
            elif stage != "train":  # under DDP a member's evaluation batches are spread over the ranks
                self.log(f"{name}/member_{member}", value, *args, **{"sync_dist": True, **kwargs})
            # (under DDP only the member's own rank trains it: its training values are logged as epoch means)
            if isinstance(value, (int, float)) or (isinstance(value, Tensor) and value.numel() == 1):
                self._member_logs[f"{stage}|{name}"][member].append(float(value.detach() if isinstance(value, Tensor) else value))

        module.log = log
        try:
            yield
        finally:
            del module.log

    def _log_member_means(self, stage: str) -> None:
        if not self.wraps_lightning:  # (only wrapped modules' own logs are kept)
            return
        keys = sorted(k for k in self._member_logs if k.startswith(f"{stage}|"))
        if self._world_size > 1:  # each rank knows its own members' (training) or its batches' (evaluation) values
            keys = sorted(set().union(*D.gather_objects(keys)))
        for key in keys:
            per_member = self._member_logs.pop(key, {})
            totals = torch.zeros(2, self.size, dtype=torch.float64, device=self.last_loss.device)  # sums, counts
            for i, values in per_member.items():
                totals[0, i], totals[1, i] = sum(values), len(values)
            if self._world_size > 1:
                totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
            logged = (totals[1] > 0).nonzero().flatten().tolist()
            if not logged:
                continue
            means = totals[0, logged] / totals[1, logged]
            name = key.split("|", 1)[1]
            if self._world_size > 1 and stage == "train":
                self.log_dict({f"{name}/member_{i}": float(m) for i, m in zip(logged, means)}, sync_dist=True)
            self.log(f"{name}/mean", float(means.mean()), sync_dist=self.sync_logs)

    # ------------------------------------------------------------- optimizers
    def member_optimizers(self) -> list[Optimizer]:
        """Each member's own optimizer, inside the :class:`CohortOptimizer` Lightning steps (after ``configure_optimizers``)."""
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        members = getattr(optimizers[0], "optimizers", None) if optimizers else None
        if members is None:
            raise RuntimeError("member optimizers exist once the Trainer has called configure_optimizers (fit has started)")
        return members

    def member_lr_scheduler(self, member: int) -> Any:
        """Member ``member``'s lr scheduler (``None`` without ``lr_scheduler``, or before the optimizers exist)."""
        config = self._schedulers[member] if self._schedulers else None
        return None if config is None else config["scheduler"]

    def reset_member_optimizer(self, member: int) -> None:
        """Forget member ``member``'s optimizer state (momentum, Adam moments, step count): a fresh optimizer."""
        self.trainer.optimizers[0].reset_member(member)

    # --------------------------------------------------------------- privacy
    def _make_private(self, optimizers: list[Optimizer]) -> list[Optimizer]:
        """Wrap every member's optimizer for DP-SGD (Opacus), from the data module's sampling rates."""
        from lightning_colearn.private import PrivateMembers

        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "sample_rates"):
            raise ValueError("privacy needs a CohortDataModule: each member's sampling rate comes from its training split")
        if getattr(dm, "sampling", None) != "poisson":
            if self.privacy.poisson_sampling:
                raise ValueError("privacy: DP-SGD's accounting assumes Poisson sampling of each member's data; use "
                                 "CohortDataModule(sampling='poisson') (or privacy.poisson_sampling=false to train on "
                                 "shuffled batches, for which the reported epsilon is only an approximation)")
            rank_zero_warn("privacy.poisson_sampling=false: batches are shuffled, not Poisson-sampled; the accountants' "
                           "epsilon assumes Poisson sampling and is an approximation, not a guarantee")
        if self.loss_terms:
            raise ValueError("privacy: extra loss terms (FedProx's mu, SCAFFOLD's correction) are not per-sample, and "
                             "DP-SGD's clipped per-sample gradients would leave them out; drop them with privacy")
        if self._world_size > 1:
            raise ValueError("privacy runs in one process for now: each member's accountant and noise live where it "
                             "trains; use a single-process strategy")
        epochs = self.privacy.epochs or (self.trainer.max_epochs if self.trainer.max_epochs not in (None, -1) else None)
        self.private = PrivateMembers(self.privacy, list(self.cohort), dm.sample_rates(), dm.batch_size, epochs,
                                      dm.steps_per_epoch(), seed=torch.initial_seed() % (1 << 31))
        if self._pending_privacy_state is not None:
            self.private.load_state_dict(self._pending_privacy_state)
            self._pending_privacy_state = None
        else:  # a budget too small for one epoch: the member never trains (its first epoch would already pass it)
            self._retire_spent(0.0)
        return self.private.wrap(optimizers)

    def _retire_spent(self, spent: float | None = None) -> None:
        for i in range(self.size):
            if i not in self.private.retired and self.private.spent_after_next_epoch(i):
                self.private.retired.add(i)
                eps = self.private.epsilon(i) if spent is None else spent
                rank_zero_info(f"CohortModule: member {i}'s privacy budget is spent (epsilon {eps:.3f}, one more epoch "
                               f"would pass target_epsilon={self.privacy.target_epsilon}): it trains no more")

    def _account_privacy(self) -> None:
        """Log every member's epsilon; retire the members whose next epoch would pass ``target_epsilon``."""
        logged = {f"dp/epsilon/member_{i}": self.private.epsilon(i) for i in range(self.size)}
        self._retire_spent()
        logged["dp/retired"] = float(len(self.private.retired))
        self.log_dict(logged, on_step=False, on_epoch=True)
        if len(self.private.retired) == self.size:
            rank_zero_info("CohortModule: every member's privacy budget is spent; training stops")
            self.trainer.should_stop = True

    def configure_optimizers(self) -> CohortOptimizer | StackedOptimizer:
        if self.stacked:
            return self._configure_stacked()
        optimizers, schedulers = [], []
        for i, member in enumerate(self.cohort):
            if self.optimizer_factory is not None:
                factory = self.optimizer_factory
                opt = (factory[i] if isinstance(factory, (list, tuple)) else factory)(member.parameters())
                sched = None if self.lr_scheduler_factory is None else _scheduler_config(self.lr_scheduler_factory(opt), i)
            else:
                opt, sched = _parse_member_optimizers(member.configure_optimizers(), i)
            if not isinstance(opt, Optimizer):
                raise TypeError(f"the optimizer for member {i} must be a torch.optim.Optimizer, got {type(opt).__name__}")
            _check_hyperparameters(i, opt.param_groups)
            optimizers.append(opt)
            schedulers.append(sched)
        self._schedulers = schedulers
        if self._pending_scheduler_states is not None:
            self._load_scheduler_states(self._pending_scheduler_states)
            self._pending_scheduler_states = None
        if self.privacy is not None:
            optimizers = self._make_private(optimizers)
        return CohortOptimizer(optimizers)

    def _configure_stacked(self) -> StackedOptimizer:
        factories = self.optimizer_factory if isinstance(self.optimizer_factory, (list, tuple)) else [self.optimizer_factory] * self.size
        specs = [_optimizer_spec(f) for f in factories]
        for i, (_, kwargs) in enumerate(specs):
            _check_hyperparameters(i, [kwargs])
        opt = StackedOptimizer(self.cohort.stacked_parameters(), [list(m.parameters()) for m in self.cohort],
                               specs[0][0], [kwargs for _, kwargs in specs])
        self._schedulers = [None if self.lr_scheduler_factory is None else _scheduler_config(self.lr_scheduler_factory(m), i)
                            for i, m in enumerate(opt.optimizers)]
        if self._pending_scheduler_states is not None:
            self._load_scheduler_states(self._pending_scheduler_states)
            self._pending_scheduler_states = None
        return opt

    def _step_schedulers(self, interval: str) -> None:
        counter = self.trainer.global_step if interval == "step" else self.current_epoch + 1
        for i, config in enumerate(self._schedulers):
            if config is None or config["interval"] != interval or counter % config["frequency"]:
                continue
            scheduler = config["scheduler"]
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                key = f"{config['monitor']}/member_{i}"
                if key not in self.trainer.callback_metrics:
                    raise KeyError(f"ReduceLROnPlateau of member {i} monitors {key!r}, which was not logged")
                scheduler.step(self.trainer.callback_metrics[key])
            else:
                scheduler.step()

    #: Buffers summing the running epoch's losses (non-persistent: not weights); a checkpoint taken inside
    #: an epoch carries them, so the resumed epoch logs the means of all its steps.
    EPOCH_SUMS = ("_epoch_loss", "_epoch_steps")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cohort_lr_schedulers"] = [None if c is None else c["scheduler"].state_dict() for c in self._schedulers]
        checkpoint["cohort_epoch_sums"] = {name: getattr(self, name).detach().cpu().clone() for name in self.EPOCH_SUMS}
        if self.private is not None:
            checkpoint["cohort_privacy"] = self.private.state_dict()
        if self._world_size > 1:  # a checkpoint holds every member, whichever rank trained it
            self.share_losses()
            self.sync_members()
            checkpoint["state_dict"] = self.trainer.strategy.lightning_module_state_dict()
            if checkpoint.get("optimizer_states"):
                checkpoint["optimizer_states"] = [self._gathered_optimizer_state()]

    def _gathered_optimizer_state(self) -> dict[str, Any]:
        """The cohort optimizer's state with each member's entry from the rank that trains it."""
        opt = self.trainer.optimizers[0]
        merged = opt.state_dict()
        for part in D.gather_objects({i: opt.member_state_dict(i) for i in self.owned_members}):
            for i, state in part.items():
                merged["members"][i] = state
        return merged

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sums = checkpoint.get("cohort_epoch_sums") or {}  # (an epoch's start zeroes them: only a mid-epoch resume keeps them)
        for name, value in sums.items():
            own = getattr(self, name, None) if name in self.EPOCH_SUMS else None
            if own is None or not isinstance(value, Tensor) or value.shape != own.shape:
                raise ValueError(f"the checkpoint's cohort_epoch_sums[{name!r}] does not fit this module "
                                 f"(expected {None if own is None else tuple(own.shape)}, got "
                                 f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__})")
        for name, value in sums.items():
            getattr(self, name).copy_(value)
        privacy = checkpoint.get("cohort_privacy")
        if privacy is not None and self.privacy is None:
            raise ValueError("the checkpoint holds privacy accounting, this CohortModule has privacy=None: resuming "
                             "without DP would break the guarantee; pass the run's privacy settings")
        if privacy is not None:
            if self.private is not None:
                self.private.load_state_dict(privacy)
            else:  # the accountants are made with the optimizers, after the checkpoint's modules are restored
                self._pending_privacy_state = privacy
        states = checkpoint.get("cohort_lr_schedulers")
        if states is None:
            return
        if self._schedulers:
            self._load_scheduler_states(states)
        else:  # optimizers are configured after the checkpoint's modules are restored
            self._pending_scheduler_states = states

    def _load_scheduler_states(self, states: list[Any]) -> None:
        if len(states) != len(self._schedulers):
            raise ValueError(f"checkpoint holds {len(states)} member lr schedulers, this cohort has {len(self._schedulers)}")
        for i, (config, state) in enumerate(zip(self._schedulers, states)):
            if (config is None) != (state is None):
                raise ValueError(f"member {i}: checkpoint and module disagree on whether it has an lr scheduler")
            if config is not None:
                config["scheduler"].load_state_dict(state)


#: What ``backend="auto"`` stacks, from ``bench/vectorised.py`` (batch 64 per member, SGD, through
#: CohortModule + Trainer, Fashion-MNIST; stacked / loop member-samples/s) on two 2-core CPUs, an
#: AVX2-only one (A, median of 3) and an AMD EPYC whose MKL runs AVX-512 (B, median of 5):
#:
#: ===============  ===========  ===========  ===========  ===========
#: model (A / B)     N=1          N=4          N=12         N=48
#: ===============  ===========  ===========  ===========  ===========
#: logistic reg.    0.92 / 0.71  1.00 / 1.31  1.56 / 1.61  1.39 / 1.57
#: MLP              0.56 / 0.85  1.05 / 1.29  1.42 / 1.56  1.69 / 1.53
#: ConvNet          1.01 / 0.81  1.10 / 0.74  1.27 / 0.86  0.78 / 0.55
#: ===============  ===========  ===========  ===========  ===========
#:
#: One member gains nothing from stacking and pays for the gathers; from about 8 members on, the stacked
#: step wins on both CPUs for models made of Linear layers (per-member kernel launches dominate the loop).
#: The ConvNet row is the grouped convolution in contiguous memory, before two changes measured on B
#: only: channels-last convolutions (``functional.stacked.CHANNELS_LAST``) and passes of members whose
#: activations stay under 30 MiB (``stacked.LARGEST_ACTIVATION``). With them, over six runs on B, the
#: stacked ConvNet trains 0.88-1.17x the plain loop at N=12 (0.70-1.27x the loop backend, whose own speed
#: varied 0.95-1.47x the plain loop between those runs) and 0.97-1.32x at N=48 (three runs); colearn's
#: larger ConvNet 1.18x at N=12, 0.94x at N=48 (one run). That is a win on average but not on every
#: run, model and N, and A is not re-measured: ``auto`` leaves convolutional models on the loop
#: (``backend="stacked"`` stacks them).
STACKED_MIN_MEMBERS = 8


def choose_backend(cohort: Cohort, optimizer: Any, wraps_lightning: bool) -> str:
    """``"stacked"`` when the cohort can be stacked and measured faster stacked, else ``"loop"``.

    Stackable: plain modules (not LightningModules) of one architecture, every
    tensor-holding layer with a batched form, and SGD/Adam/AdamW. Faster: at
    least :data:`STACKED_MIN_MEMBERS` members, and a model built only from
    ``nn.Linear`` and BatchNorm layers (the kind of model the measurements
    cover: this package's LogisticRegression and MLP); no convolution (stacked
    convolutions win on some CPUs and lose on others, see the table above).

    Examples:
        >>> from lightning_colearn.models import MLP
        >>> choose_backend(Cohort(MLP, size=12), partial(torch.optim.SGD, lr=0.1), False)
        'stacked'
        >>> choose_backend(Cohort(MLP, size=2), partial(torch.optim.SGD, lr=0.1), False)
        'loop'
        >>> choose_backend(Cohort(MLP, size=12), partial(torch.optim.RMSprop, lr=0.1), False)
        'loop'
        >>> from lightning_colearn.models import ConvNet
        >>> choose_backend(Cohort(ConvNet, size=12), partial(torch.optim.SGD, lr=0.1), False)
        'loop'
    """
    if len(cohort) < STACKED_MIN_MEMBERS:
        return "loop"
    try:
        _check_stackable(cohort, optimizer, wraps_lightning)
    except (TypeError, ValueError):
        return "loop"
    member = cohort[0]
    layers = batched_layers(member) or {}
    linear_only = bool(layers) and set(layers.values()) <= {StackedLinear, StackedBatchNorm}
    return "stacked" if linear_only else "loop"


def _check_stackable(cohort: Cohort, optimizer: Any, wraps_lightning: bool) -> None:
    if wraps_lightning:
        raise TypeError(
            "backend='stacked' needs plain nn.Module members; LightningModule members run their own training_step "
            "one by one (use backend='loop')"
        )
    try:
        cohort.check_compatible()
    except ValueError as err:
        raise type(err)(f"backend='stacked' needs members of one architecture: {err}") from None
    factories = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
    kinds = {_optimizer_spec(f)[0] for f in factories}
    if len(kinds) > 1:
        raise ValueError(f"backend='stacked' needs one optimizer type for all members, got {sorted(k.__name__ for k in kinds)}")


def _check_hyperparameters(member: int, groups: list[dict[str, Any]]) -> None:
    """Refuse a NaN or infinite optimizer setting (``lr=nan`` from a sweep): torch takes it and every weight turns NaN.

    Examples:
        >>> _check_hyperparameters(0, [{"lr": 0.1, "betas": (0.9, float("inf"))}])
        Traceback (most recent call last):
        ...
        ValueError: the optimizer for member 0: betas must hold finite numbers, got (0.9, inf)
    """
    for group in groups:
        for key, value in group.items():
            if key == "params":
                continue
            values = value if isinstance(value, (tuple, list)) else (value,)
            for v in values:
                v = v.item() if isinstance(v, Tensor) and v.numel() == 1 else v
                if isinstance(v, float) and not math.isfinite(v):
                    what = "hold finite numbers" if values is value else "be a finite number"
                    raise ValueError(f"the optimizer for member {member}: {key} must {what}, got {value!r}")


def _optimizer_spec(factory: Any) -> tuple[type, dict[str, Any]]:
    """``(torch optimizer class, keyword arguments)`` of ``partial(torch.optim.SGD, lr=...)`` or a bare class."""
    if isinstance(factory, type) and factory in STACKED_OPTIMIZERS:
        return factory, {}
    if isinstance(factory, partial) and factory.func in STACKED_OPTIMIZERS and not factory.args:
        return factory.func, dict(factory.keywords)
    raise ValueError(
        "backend='stacked' needs the optimizer as partial(torch.optim.SGD|Adam|AdamW, **kwargs) (Hydra: "
        f"_partial_: true), got {factory!r}; use backend='loop' for other optimizers"
    )


class _LossVector(dict):
    """``{member: loss}`` whose losses are the rows of one tensor, ``vector`` (in the dict's order)."""

    def __init__(self, losses: dict[int, Tensor], vector: Tensor) -> None:
        super().__init__(losses)
        self.vector = vector


def _stack_members(tensors: list[Tensor]) -> Tensor:
    """``torch.stack(tensors)``, without a copy when they are consecutive equal slices of one tensor.

    :class:`~lightning_colearn.data.MemberBatches` gathers a step's member batches into one tensor;
    stacking its slices again would copy every input once more.
    """
    first = tensors[0]
    step = first.numel() * first.element_size()
    if first.is_contiguous() and all(
        t.shape == first.shape and t.is_contiguous() and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and t.data_ptr() == first.data_ptr() + k * step
        for k, t in enumerate(tensors)
    ):
        return first.as_strided((len(tensors), *first.shape), (first.numel(), *first.stride()), first.storage_offset())
    return torch.stack(tensors)


class _DDPAnchor(nn.Module):
    """One scalar parameter for DDP to hold on to; never trained, never in a checkpoint (which then loads anywhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001
        pass

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # noqa: ANN001
        pass


def _per_member_lists() -> defaultdict[int, list[float]]:
    return defaultdict(list)


def _split_over_ranks(loaders: Any) -> bool:
    """True when a DataLoader among a stage's loaders (one, a list, a dict or a CombinedLoader) has a
    DistributedSampler, as its sampler or inside its batch sampler."""
    if loaders is None:
        return False
    if hasattr(loaders, "flattened"):
        loaders = loaders.flattened
    elif isinstance(loaders, Mapping):
        loaders = loaders.values()
    elif not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    samplers = [s for dl in loaders for s in (getattr(dl, "sampler", None),
                                             getattr(getattr(dl, "batch_sampler", None), "sampler", None))]
    return any(isinstance(s, DistributedSampler) for s in samplers)


def _privacy_config(value: Any) -> Any:
    if value is None:
        return None
    from lightning_colearn.privacy import PrivacyConfig  # Opacus is an extra: imported only when asked for

    return PrivacyConfig.from_any(value)


def _common_attr(cohort: Cohort, name: str) -> Any:
    values = {getattr(m, name, None) for m in cohort}
    return values.pop() if len(values) == 1 else None


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, Mapping):
        batch = next(iter(batch.values()))
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return len(batch[0])
    return None


def _scheduler_config(scheduler: Any, member: int) -> dict[str, Any]:
    config = dict(scheduler) if isinstance(scheduler, Mapping) else {"scheduler": scheduler}
    if "scheduler" not in config:
        raise ValueError(f"member {member}'s lr scheduler config needs a 'scheduler' key, got {sorted(config)}")
    config.setdefault("interval", "epoch")
    config.setdefault("frequency", 1)
    config.setdefault("monitor", "val_loss")
    if config["interval"] not in ("step", "epoch"):
        raise ValueError(f"member {member}'s lr scheduler interval must be 'step' or 'epoch', got {config['interval']!r}")
    return config


def _parse_member_optimizers(conf: Any, member: int) -> tuple[Optimizer, dict[str, Any] | None]:
    """Accept what Lightning's ``configure_optimizers`` may return, with exactly one optimizer."""
    if isinstance(conf, Optimizer):
        return conf, None
    if isinstance(conf, Mapping):
        sched = conf.get("lr_scheduler")
        return conf["optimizer"], None if sched is None else _scheduler_config(sched, member)
    if isinstance(conf, (list, tuple)) and len(conf) == 2 and isinstance(conf[0], (list, tuple)):
        opts, scheds = list(conf[0]), list(conf[1])
        if len(opts) == 1 and len(scheds) <= 1:
            return opts[0], _scheduler_config(scheds[0], member) if scheds else None
    if isinstance(conf, (list, tuple)) and len(conf) == 1:
        return _parse_member_optimizers(conf[0], member)
    raise ValueError(
        f"member {member}'s configure_optimizers must return one optimizer (optionally with one lr scheduler); "
        f"got {type(conf).__name__}{' of length ' + str(len(conf)) if isinstance(conf, (list, tuple)) else ''}"
    )
