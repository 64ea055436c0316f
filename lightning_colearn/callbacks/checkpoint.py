"""EpochCheckpoint: ``last.ckpt`` after every training epoch, written atomically.

Lightning 2.6's ``ModelCheckpoint(save_last=True, save_top_k=0)`` writes
``last.ckpt`` only together with a top-k checkpoint, that is, only when
training ends: a run killed half-way had nothing to resume from, and
``ckpt_path="last"`` silently started over (a PoFL ledger then got its first
rounds twice). It also writes the file in place, so a kill during the write
would leave half a checkpoint where a whole one was. This subclass saves
``last.ckpt`` at every training epoch end (after the epoch's validation and
after every other callback's epoch-end hook, since Lightning runs checkpoint
callbacks last) through a temporary file and an atomic rename. With
``every_n_train_steps`` it also saves after every n-th step, inside epochs and
rounds (a resumed run continues from that very step: the loader's position and
the round in progress are in the checkpoint). An epoch's last step is saved at
the epoch's end instead, with the epoch-end state (validation, decisions):
Lightning resumes a checkpoint taken after an epoch's last batch as a finished
epoch, without running that epoch's end (a plain ``ModelCheckpoint`` whose
``every_n_train_steps`` hits an epoch's last batch loses it that way).

Examples:
    >>> import tempfile
    >>> EpochCheckpoint(tempfile.mkdtemp()).save_last
    True
"""

from __future__ import annotations

import contextlib
import os

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["CheckpointWriteError", "EpochCheckpoint"]


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only directory); nothing already saved was touched."""


class EpochCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` keeping only ``last.ckpt``, rewritten (atomically) after every training epoch."""

    def __init__(self, dirpath: str | os.PathLike, every_n_train_steps: int | None = None) -> None:
        if every_n_train_steps is not None and (isinstance(every_n_train_steps, bool) or not isinstance(every_n_train_steps, int)
                                                or every_n_train_steps < 1):
            raise ValueError(f"every_n_train_steps must be None or an int >= 1, got {every_n_train_steps!r}")
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0)
        self.every_n_steps = every_n_train_steps
        self._saved_at_batch_end: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        # (not ModelCheckpoint's own step saving: under manual optimization, as a CohortModule trains, it warns
        # at every save that the weights are those after the step, which is what a resume needs)
        n = self.every_n_steps
        if not n or trainer.global_step % n or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # (an epoch's last batch: saved when the epoch ends, see the module's docstring)
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._saved_at_batch_end = trainer.global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._saved_at_batch_end == trainer.global_step == self._last_global_step_saved:
            self._last_global_step_saved = -1  # saved after a batch (max_steps ended the epoch early): again, with the epoch's end
        if not self._should_skip_saving_checkpoint(trainer):  # skips a step already saved at an epoch end
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        tmp = f"{filepath}.tmp"
        try:
            trainer.save_checkpoint(tmp, self.save_weights_only)
        except OSError as err:  # a full disk, a read-only or vanished directory: the last good checkpoint stays
            if trainer.is_global_zero:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
            raise CheckpointWriteError(
                f"checkpoint {filepath} could not be written ({err.strerror or err}); the previous checkpoint there, "
                "if any, is intact: free space (or fix the directory) and resume with ckpt_path=last") from err
        if trainer.is_global_zero:
            os.replace(tmp, filepath)  # a kill leaves the previous checkpoint or this one, never half of one
        trainer.strategy.barrier("EpochCheckpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)
