"""Plots as PNG files: member curves from a metrics CSV, and digit grids with predictions.

The only module that imports matplotlib, and only inside the functions
(with the non-interactive Agg backend unless a notebook chose one), so
importing the package stays fast and works without a display.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> out = Path(tempfile.mkdtemp()) / "grid.png"
    >>> plot_predictions(torch.zeros(4, 1, 28, 28), torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4]), out).exists()
    True
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections import defaultdict
from pathlib import Path

from torch import Tensor

__all__ = [
    "log_figure",
    "plot_member_curves",
    "plot_predictions",
    "plot_student_losses",
    "plot_swarm",
    "read_metrics_csv",
]


def _pyplot():
    import matplotlib

    if "MPLBACKEND" not in os.environ and not _in_notebook():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython  # type: ignore[import-not-found]
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def read_metrics_csv(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Read Lightning's ``CSVLogger`` file into ``{metric: [(epoch, value), ...]}`` (empty cells skipped)."""
    return {k: [(e, v) for e, _, v in points] for k, points in _read_csv(path).items()}


def _read_csv(path: str | os.PathLike) -> dict[str, list[tuple[int, int, float]]]:
    series: dict[str, list[tuple[int, int, float]]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            epoch, step = int(float(row.get("epoch") or 0)), int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("epoch", "step") or value in ("", None):
                    continue
                series[key].append((epoch, step, float(value)))
    return dict(series)


def plot_member_curves(
    metrics_csv: str | os.PathLike | list[str | os.PathLike],
    out: str | os.PathLike,
    metric: str = "val_acc",
    title: str | None = None,
):
    """Plot ``<metric>/member_<i>`` for every member and the cohort mean; returns ``out``.

    The x axis is the epoch, or the optimizer step when the metric was logged
    more than once per epoch (``val_check_interval``). ``metrics_csv`` may be
    a list of files (a run and its resumptions), read in order.
    """
    files = metrics_csv if isinstance(metrics_csv, list) else [metrics_csv]
    series: dict[str, list[tuple[int, int, float]]] = defaultdict(list)
    for path in files:
        for key, points in _read_csv(path).items():
            series[key].extend(points)
    members = sorted(
        (int(m.group(1)), k) for k in series if (m := re.fullmatch(rf"{re.escape(metric)}/member_(\d+)", k))
    )
    if not members:
        raise ValueError(f"{files[-1]} has no '{metric}/member_<i>' columns (has: {sorted(series)[:8]})")
    first = series[members[0][1]]
    by_step = len({e for e, _, _ in first}) < len(first)

    def xy(points):
        return [s if by_step else e + 1 for e, s, _ in points], [v for _, _, v in points]

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, key in members:
        ax.plot(*xy(series[key]), alpha=0.6, lw=1, label=f"member {i}" if len(members) <= 12 else None)
    if f"{metric}/mean" in series and len(members) > 1:
        ax.plot(*xy(series[f"{metric}/mean"]), color="black", lw=2, label="mean")
    ax.set_xlabel("optimizer step" if by_step else "epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} per member")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, out)


def plot_predictions(images: Tensor, labels: Tensor, preds: Tensor, out: str | os.PathLike, title: str | None = None):
    """A grid of digits titled with the predicted label (red where wrong); returns ``out``."""
    plt = _pyplot()
    n = len(images)
    cols = min(8, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.5 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(images[k].detach().float().cpu().squeeze(0), cmap="gray")
        right = int(preds[k]) == int(labels[k])
        ax.set_title(f"{int(preds[k])}" + ("" if right else f" ({int(labels[k])})"), color="green" if right else "red", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def _save(fig, out: str | os.PathLike) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    return out


def plot_swarm(
    curves: list[tuple[int, list[float]]],
    moves: list[dict],
    out: str | os.PathLike,
    ylabel: str = "val_acc",
    title: str = "members over steps (swarm moves dashed)",
):
    """Member curves over optimizer steps with every swarm move marked; returns ``out``.

    ``curves`` is ``[(step, [value per member]), ...]``; ``moves`` the
    callback's history (``step`` and ``best`` of each move).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if curves:
        steps = [s for s, _ in curves]
        n = len(curves[0][1])
        for i in range(n):
            ax.plot(steps, [v[i] for _, v in curves], lw=1, alpha=0.7, marker=".", label=f"member {i}" if n <= 12 else None)
    for k, m in enumerate(moves):
        ax.axvline(m["step"], color="gray", ls="--", lw=0.6, alpha=0.6, label="swarm move" if k == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    return _save(fig, out)


def plot_student_losses(history: list[tuple[int, list[float]]], out: str | os.PathLike, labels: list[str] | None = None):
    """Each student's mean training loss per epoch (``history`` from ``MutualLearning.loss_history``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [e + 1 for e, _ in history]
    for i in range(len(history[0][1]) if history else 0):
        ax.plot(epochs, [v[i] for _, v in history], marker=".", label=labels[i] if labels else f"student {i}")
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("training loss (CE + mimicry)")
    ax.set_title("deep mutual learning: loss per student")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def log_figure(trainer, name: str, path: str | os.PathLike) -> None:
    """Send a saved PNG to every logger of ``trainer`` that takes images (TensorBoard, W&B, ...)."""
    for logger in getattr(trainer, "loggers", []):
        if hasattr(logger, "log_image"):  # WandbLogger, NeptuneLogger, ...
            logger.log_image(key=name, images=[str(path)], step=trainer.global_step)
        elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoardLogger
            image = _pyplot().imread(str(path))[..., :3]
            logger.experiment.add_image(name, image, trainer.global_step, dataformats="HWC")
