"""Shared pieces of the benchmarks: a training-loop timer, the plain PyTorch reference loop, and quiet output."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn


class FitTimer(Callback):
    """Wall time of the training loop only (no Trainer setup, no test)."""

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def plain_loop(models: Sequence[nn.Module], dm, steps: int, lr: float) -> float:
    """The reference: for each shared batch, each model does forward, loss, backward, SGD step; returns seconds."""
    optimizers = [torch.optim.SGD(m.parameters(), lr=lr) for m in models]
    done, start = 0, time.perf_counter()
    while done < steps:
        for x, y in dm.train_dataloader():
            for model, opt in zip(models, optimizers):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            done += 1
            if done == steps:
                break
    return time.perf_counter() - start


def quiet_lightning() -> None:
    """Keep Lightning's per-fit notices ("GPU available", tips, few-workers warnings) out of the printed tables."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def machine_busy_ticks() -> int | None:
    """Clock ticks every CPU of the machine spent busy since boot (``/proc/stat``, minus idle and iowait);
    ``None`` where there is no ``/proc``. Two readings bracket a run to tell how loaded the machine was."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)
