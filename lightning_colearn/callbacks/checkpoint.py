"""EpochCheckpoint: ``last.ckpt`` after every training epoch, written atomically.

Lightning 2.6's ``ModelCheckpoint(save_last=True, save_top_k=0)`` writes
``last.ckpt`` only together with a top-k checkpoint, that is, only when
training ends: a run killed half-way had nothing to resume from, and
``ckpt_path="last"`` silently started over (a PoFL ledger then got its first
rounds twice). It also writes the file in place, so a kill during the write
would leave half a checkpoint where a whole one was. This subclass saves
``last.ckpt`` at every training epoch end (after the epoch's validation and
after every other callback's epoch-end hook, since Lightning runs checkpoint
callbacks last) through a temporary file and an atomic rename.

Example:
    >>> import tempfile
    >>> EpochCheckpoint(tempfile.mkdtemp()).save_last
    True
"""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["EpochCheckpoint"]


class EpochCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` keeping only ``last.ckpt``, rewritten (atomically) after every training epoch."""

    def __init__(self, dirpath: str | os.PathLike) -> None:
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):  # skips a step already saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        tmp = f"{filepath}.tmp"
        trainer.save_checkpoint(tmp, self.save_weights_only)
        if trainer.is_global_zero:
            os.replace(tmp, filepath)  # a kill leaves the previous checkpoint or this one, never half of one
        trainer.strategy.barrier("EpochCheckpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)
