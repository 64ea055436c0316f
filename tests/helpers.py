"""Test helpers shared across test files (on sys.path through pytest's `pythonpath = ["tests"]`)."""

from __future__ import annotations

import lightning as L


def fast_trainer(root=None, **kwargs) -> L.Trainer:
    """A quiet CPU Trainer without logger, checkpoints or validation; ``kwargs`` override any default."""
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
    )
    return L.Trainer(**{**defaults, **kwargs})
