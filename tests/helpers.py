"""Test helpers shared across test files (on sys.path through pytest's `pythonpath = ["tests"]`)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn


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


def states(module) -> list[dict[str, torch.Tensor]]:
    """A detached copy of every member's state dict."""
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in module.cohort]


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-for-bit equality of two state dicts."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_nested(a, b) -> bool:
    """Bit-for-bit equality of nested (optimizer) state dicts."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_nested(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_nested(x, y) for x, y in zip(a, b))
    return a == b


class BNNet(nn.Module):
    """A tiny classifier with BatchNorm buffers (running statistics)."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 16)
        self.bn = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 10)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x.flatten(1)))))


class Probe(Callback):
    """Test code at round boundaries; list it before the algorithm's callback, so it acts first.

    ``before(trainer, module)`` runs at every epoch start (before the algorithm starts its round);
    ``trained(trainer, module)`` after every epoch's last batch (before the algorithm votes or aggregates).
    """

    def __init__(self, before=None, trained=None):
        self.before, self.trained = before, trained

    def on_train_epoch_start(self, trainer, pl_module):
        if self.before:
            self.before(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.trained and batch_idx + 1 == trainer.num_training_batches:
            self.trained(trainer, pl_module)
