"""MutualLearning: deep mutual learning (Zhang et al., CVPR 2018) for heterogeneous students.

Every student trains on the labels and on its peers' softened, detached
predictions (:func:`~lightning_colearn.functional.distillation.mutual_learning_losses`),
with exactly one forward pass per student per step and one optimizer per
student. Unlike KD_Lib's ``DML``, the default mimicry term is the KL of the
paper (``mode="mse"`` gives KD_Lib's MSE-on-logits for parity), peers'
predictions carry no gradient, validation runs in eval mode, and every
student (not only the best) is checkpointed and exportable.

Examples:
    >>> import lightning as L, torch
    >>> from functools import partial
    >>> from lightning_colearn import CohortDataModule
    >>> from lightning_colearn.models import MLP, LogisticRegression
    >>> module = MutualLearning([MLP(), LogisticRegression()], optimizer=partial(torch.optim.SGD, lr=0.05))
    >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
    ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(module, datamodule=CohortDataModule(num_members=2, stream="shared"))
    >>> sorted(k for k in trainer.callback_metrics if k.startswith("val_acc"))
    ['val_acc/best', 'val_acc/ensemble', 'val_acc/mean', 'val_acc/member_0', 'val_acc/member_1']
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_colearn import trackers
from lightning_colearn import distributed as D
from lightning_colearn.cohort import Cohort
from lightning_colearn.functional.distillation import MODES, mutual_learning_losses
from lightning_colearn.module import CohortModule, OptimizerFactory

__all__ = ["MutualLearning", "load_student"]


class MutualLearning(CohortModule):
    """Students that learn from the labels and from each other.

    Args:
        students: a list of at least two modules (architectures may differ;
            outputs must be ``[batch, num_classes]`` logits), a :class:`Cohort`,
            or a class/factory with ``size``.
        size: number of students when ``students`` is a class or factory.
        optimizer: ``params -> Optimizer``, or one per student (default: Adam, lr 1e-3).
        temperature: softening temperature T (> 0); the mimicry term is scaled by T^2.
        kl_weight: weight of the mimicry term against the cross-entropy (>= 0).
        mode: ``"kl"`` (the paper) or ``"mse"`` (MSE between logits, KD_Lib's default).
        num_classes: as :class:`CohortModule`.
        lr_scheduler: as :class:`CohortModule`.
        gradient_clip_val: as :class:`CohortModule`.
        backend: as :class:`CohortModule` (``"stacked"`` needs students of one architecture and runs them in one forward).
        privacy: as :class:`CohortModule` (each student private: its own DP-SGD and accountant; the peers it
            learns from are seen detached, so the per-sample gradients are its own).

    Training batches must be shared, ``(x, y)``: every student sees the same
    inputs (``CohortDataModule(stream="shared")``).
    """

    #: PopulationBasedTraining may give each student its own (``module.temperature``, ``module.kl_weight``).
    per_member_hyperparameters = ("temperature", "kl_weight")

    def __init__(
        self,
        students: Sequence[nn.Module] | Cohort | Any,
        size: int | None = None,
        *,
        optimizer: OptimizerFactory | Sequence[OptimizerFactory] | None = None,
        temperature: float = 1.0,
        kl_weight: float = 1.0,
        mode: str = "kl",
        num_classes: int | None = None,
        lr_scheduler: Any = None,
        gradient_clip_val: float | None = None,
        backend: str | None = None,
        privacy: Any = None,
    ) -> None:
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if not isinstance(kl_weight, (int, float)) or isinstance(kl_weight, bool) or not kl_weight >= 0:
            raise ValueError(f"kl_weight must be a number >= 0, got {kl_weight!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        super().__init__(
            students, size, optimizer=optimizer, lr_scheduler=lr_scheduler,
            num_classes=num_classes, gradient_clip_val=gradient_clip_val, backend=backend, privacy=privacy,
        )
        if len(self.cohort) < 2:
            raise ValueError(
                f"MutualLearning needs at least 2 students (a student learns from its peers), got {len(self.cohort)}"
            )
        if self.wraps_lightning:
            raise TypeError("MutualLearning students must be plain nn.Modules returning logits, not LightningModules")
        self.temperature, self.kl_weight, self.mode = float(temperature), float(kl_weight), mode
        if self.num_classes is not None:
            acc = MulticlassAccuracy(num_classes=int(self.num_classes), average="micro")
            self.val_ensemble_acc, self.test_ensemble_acc = acc.clone(), acc.clone()
        #: Mean training loss of every student per epoch: ``[(epoch, [loss per student]), ...]``.
        self.loss_history: list[tuple[int, list[float]]] = []
        self.register_buffer("_epoch_parts", torch.zeros(2), persistent=False)  # epoch sums: mean CE, mean mimicry

    def cohort_losses(self, batch: Any, batch_idx: int) -> dict[int, Tensor]:
        if isinstance(batch, Mapping):
            raise ValueError(
                "MutualLearning needs one shared batch for all students (data.stream=shared); got per-member batches"
            )
        x, y = batch
        own = self.owned_members  # every student trains on every batch (under DDP: this rank's students)
        logits = self.member_outputs(x, own)  # exactly one forward per student (stacked: one for all)
        if self.world_size > 1:  # the peers' predictions come from the ranks that train them (detached anyway)
            logits = self._all_logits(dict(zip(own, logits)))
        losses, ce, mimic = mutual_learning_losses(
            logits, y, self.temperature, self.kl_weight, self.mode, return_parts=True
        )
        self._epoch_parts += torch.stack([torch.stack(ce).mean(), torch.stack(mimic).mean()])
        return {i: losses[i] for i in own}

    def _all_logits(self, own: dict[int, Tensor]) -> list[Tensor]:
        """Every student's logits on the shared batch: this rank's own (differentiable) and the others',
        gathered in one ``all_gather``."""
        if not own:
            raise RuntimeError("MutualLearning under DDP needs at least one student per rank (cohort size >= processes)")
        world, sample = self.world_size, next(iter(own.values()))
        # one row per student of the rank with the most (member i is row i // world of rank i % world);
        # float32 on the wire (gloo has no bfloat16; bf16 -> fp32 -> bf16 is exact)
        mine = torch.zeros(-(-self.size // world), *sample.shape, dtype=torch.float32, device=sample.device)
        for k, logits in enumerate(own.values()):  # this rank's students, in order
            mine[k] = logits.detach()
        gathered = self.trainer.strategy.all_gather(mine).to(sample.dtype)  # [world, rows, B, C]
        return [own[i] if i in own else gathered[D.member_owner(i, world), i // world] for i in range(self.size)]

    EPOCH_SUMS = (*CohortModule.EPOCH_SUMS, "_epoch_parts")

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._epoch_parts.zero_()

    def _stepping_members(self) -> list[int] | None:
        return list(range(self.size))  # every student, every step

    def on_train_epoch_end(self) -> None:
        self.share_losses()
        steps = int(self._epoch_steps.max())
        if steps > 0:
            means = (self._epoch_loss / self._epoch_steps.clamp(min=1)).tolist()
            self.loss_history.append((self.current_epoch, means))
            ce, mimic = (self._epoch_parts / steps).tolist()
            self.log_dict({"train_ce/mean": ce, "train_mimicry/mean": mimic}, sync_dist=self.sync_logs)
        super().on_train_epoch_end()

    # ------------------------------------------------------------- evaluation
    def _evaluate(self, stage: str, batch: Any, batch_idx: int) -> None:
        if isinstance(batch, Mapping):
            return super()._evaluate(stage, batch, batch_idx)
        x, y = batch
        probs = None
        for i, logits in enumerate(self.member_outputs(x)):  # one forward per student serves both metrics
            getattr(self, f"{stage}_loss").update(i, self.loss_fn(logits, y), weight=len(y))
            if self.num_classes is not None:
                getattr(self, f"{stage}_acc").update(i, logits, y)
                p = logits.float().softmax(1)
                probs = p if probs is None else probs + p
        if probs is not None:  # the ensemble: mean of the students' softmax
            getattr(self, f"{stage}_ensemble_acc").update(probs / self.size, y)

    def _log_eval(self, stage: str) -> None:
        super()._log_eval(stage)
        if self.num_classes is None:
            return
        metric = getattr(self, f"{stage}_ensemble_acc")
        if self._any_rank(bool(metric.update_count)):
            self.log(f"{stage}_acc/ensemble", metric.compute(), sync_dist=self.sync_logs)
            metric.reset()

    # ------------------------------------------------------------- artefacts
    def write_artifacts(self, trainer: Any, pl_module: Any, out: Path) -> dict[str, Path]:
        """The figure ``mutual_losses.png`` (each student's training loss per epoch) in ``out``."""
        if not self.loss_history:
            return {}
        from lightning_colearn import plots  # matplotlib only here

        return {"mutual_losses": plots.plot_student_losses(self.loss_history, out / "mutual_losses.png")}

    def on_train_end(self) -> None:
        super().on_train_end()
        trackers.publish(self.trainer, self, self)  # without a logger nothing is written

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["mutual_loss_history"] = [list(e) for e in self.loss_history]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.loss_history = [(int(e), list(v)) for e, v in checkpoint.get("mutual_loss_history", [])]

    def save_students(self, directory: str | os.PathLike) -> list[Path]:
        """Write each student to ``student_<i>.safetensors`` (weights only, no pickle); returns the paths.

        Load one back into a plain module with :func:`load_student`.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, student in enumerate(self.cohort):
            state = {k: v.detach().cpu().contiguous().clone() for k, v in student.state_dict().items()}
            path = directory / f"student_{i}.safetensors"
            save_file(state, str(path), metadata={"class": type(student).__qualname__, "index": str(i)})
            paths.append(path)
        (directory / "students.json").write_text(
            json.dumps([{"index": i, "class": type(s).__qualname__, "file": p.name} for i, (s, p) in enumerate(zip(self.cohort, paths))], indent=2)
        )
        return paths


def load_student(path: str | os.PathLike, module: nn.Module) -> nn.Module:
    """Load a student saved by :meth:`MutualLearning.save_students` into ``module`` (strict, safetensors only)."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    own = module.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"{path} does not fit {type(module).__name__}: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, tensor in state.items():
        if tensor.shape != own[name].shape or tensor.dtype != own[name].dtype:
            raise ValueError(
                f"{path} does not fit {type(module).__name__} at {name!r}: {tuple(tensor.shape)} {tensor.dtype} "
                f"vs {tuple(own[name].shape)} {own[name].dtype}"
            )
    module.load_state_dict(state)
    return module
