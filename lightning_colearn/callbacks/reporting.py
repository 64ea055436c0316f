"""What a run shows while it trains: the collective's last event in the progress bar, its figures every few epochs.

Both callbacks find their sources by duck typing, so any callback or module can
join: ``progress_postfix() -> {key: text}`` for the bar (the swarm's last move,
a vote's outcome, a federated round's score, a PoFL block, a PBT decision), and
``write_artifacts(trainer, pl_module, out) -> {name: png}`` for the figures
(see :mod:`lightning_colearn.trackers`).

Examples:
    >>> import lightning as L
    >>> from lightning_colearn.callbacks import CohortProgressBar, LivePlots
    >>> trainer = L.Trainer(callbacks=[CohortProgressBar(), LivePlots(every_n_epochs=2)], logger=False)
    >>> type(trainer.progress_bar_callback).__name__
    'CohortProgressBar'
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

from lightning_colearn import trackers

__all__ = ["CohortProgressBar", "LivePlots"]


def _sources(trainer: L.Trainer, pl_module: L.LightningModule, method: str) -> list[Any]:
    """The module and the callbacks that implement ``method``, module first."""
    return [s for s in (pl_module, *trainer.callbacks) if callable(getattr(s, method, None))]


class CohortProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar with the collective's last event in its postfix, e.g. ``round=7: accepted 3/4``.

    Every callback or module with a ``progress_postfix()`` method adds its items to the
    metrics Lightning shows (logged values with ``prog_bar=True``).
    """

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the logger's version: a run has one, it is in the run's directory name
        for source in _sources(trainer, pl_module, "progress_postfix"):
            items.update(source.progress_postfix() or {})
        return items


class LivePlots(Callback):
    """Redraw the collective's figures and send them to the loggers every ``every_n_epochs`` epochs.

    The callbacks draw their figures once at the end of fitting; with this callback a
    tracker (TensorBoard, W&B: one image per step; MLflow: the latest artifact) also
    shows them while the run trains. It redraws when the next epoch starts: by then
    the epoch's validation, every callback and the module have closed the epoch
    (a module's own ``on_train_epoch_end`` runs after the callbacks'), so the figures
    include it. The last epochs' figures come with the end of fitting.

    Args:
        every_n_epochs: epochs between two redraws (``>= 1``).
    """

    def __init__(self, every_n_epochs: int = 1) -> None:
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be an int >= 1, got {every_n_epochs!r}")
        self.every_n_epochs = every_n_epochs

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 0 or trainer.current_epoch % self.every_n_epochs:
            return
        for source in _sources(trainer, pl_module, "write_artifacts"):
            trackers.publish(trainer, pl_module, source)
