"""Plots as PNG files: member curves from a metrics CSV, digit grids with predictions, label distributions.

The only module that imports matplotlib, and only inside the functions
(with the non-interactive Agg backend unless a notebook chose one), so
importing the package stays fast and works without a display.

Examples:
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = [
    "log_figure",
    "plot_label_distribution",
    "plot_pbt",
    "plot_member_curves",
    "plot_predictions",
    "plot_rounds",
    "plot_student_losses",
    "plot_swarm",
    "plot_vote_results",
    "plot_votes",
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


def plot_predictions(images: Tensor, labels: Tensor, preds: Tensor, out: str | os.PathLike, title: str | None = None,
                     class_names: list[str] | None = None):
    """A grid of images (``[N, 1 or 3, H, W]``) titled with the predicted class (red where wrong); returns ``out``.

    Colour images are shown min-max scaled per image (normalised inputs have no fixed range).
    """
    plt = _pyplot()
    n = len(images)
    cols = min(8, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.5 * rows), squeeze=False)

    def name(k: int) -> str:
        return str(class_names[k])[:10] if class_names is not None and 0 <= k < len(class_names) else str(k)

    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        image = images[k].detach().float().cpu()
        if image.ndim == 3 and image.shape[0] == 3:
            low, high = image.min(), image.max()
            ax.imshow(((image - low) / (high - low).clamp_min(1e-12)).permute(1, 2, 0).numpy())
        else:
            ax.imshow(image.squeeze(0).numpy(), cmap="gray")
        right = int(preds[k]) == int(labels[k])
        ax.set_title(name(int(preds[k])) + ("" if right else f" ({name(int(labels[k]))})"), color="green" if right else "red", fontsize=8)
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


def plot_pbt(pbt: Any, out: str | os.PathLike):
    """Population-based training: each member's hyperparameters over the run, one panel per numeric one, and
    the scores; every exploit is marked where the copying member lands, and the final best member's schedule
    (its lineage: the values it inherited from the members it copied) is drawn bold. Returns ``out``.

    ``pbt`` is a :class:`~lightning_colearn.callbacks.PopulationBasedTraining` after training (its ``trace``,
    ``lineage`` and ``schedule()``).
    """
    plt = _pyplot()
    names = [n for n in pbt.space if all(isinstance(v[n], (int, float)) and not isinstance(v[n], bool)
                                         for _, _, values in pbt.trace for v in values)]
    fig, axes = plt.subplots(len(names) + 1, 1, figsize=(7, 2.2 * (len(names) + 1)), sharex=True, squeeze=False)
    axes = axes[:, 0]
    steps = [step for step, _, _ in pbt.trace]
    n = len(pbt.trace[0][2]) if pbt.trace else 0
    best = pbt.best_member if pbt.last_scores is not None else None
    lineage = pbt.schedule(best) if best is not None else []
    end = steps[-1] if steps else 0
    for ax, name in zip(axes, names):
        for i in range(n):
            ax.step(steps, [values[i][name] for _, _, values in pbt.trace], where="post", lw=0.8, alpha=0.45)
        for k, r in enumerate(pbt.lineage):
            ax.plot(r["step"], r["new"][name], "x", color="black", ms=4, label="exploit (copy, then explore)" if k == 0 else None)
        if lineage:
            xs = [e["step"] for e in lineage] + [end]
            ax.step(xs, [e[name] for e in lineage] + [lineage[-1][name]], where="post", color="crimson", lw=2.2,
                    label=f"best member {best}'s schedule")
        if type(pbt.space[name]).__name__ == "LogUniform":
            ax.set_yscale("log")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    if names:
        axes[0].legend(fontsize=7, loc="best")
        axes[0].set_title("population-based training: hyperparameters per member")
    scored = [(step, scores) for step, scores, _ in pbt.trace if not all(math.isnan(v) for v in scores)]
    ax = axes[-1]
    for i in range(n):
        ax.plot([s for s, _ in scored], [v[i] for _, v in scored], marker=".", lw=0.8, alpha=0.6)
    ax.set_ylabel(f"score ({pbt.monitor if pbt.metric is None else type(pbt.metric).__name__})")
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
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


def plot_vote_results(results: list[dict], out: str | os.PathLike, criterion: str = "score"):
    """colearn's ``plot_results``: each learner's vote score and test score over rounds; returns ``out``.

    ``results`` is :attr:`CollectiveVoting.results`. The vote score plotted per
    round is each learner's score of its current model after the round (the
    proposal's score if accepted, the previous score if not); accepted rounds are
    marked with a dot, rejected rounds with a cross.
    """
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    rounds = [r["round"] for r in results]
    n = len(results[0]["scores"]) if results else 0
    after = [r["scores"] if r["accepted"] else r["current"] for r in results]
    for j in range(n):
        top.plot(rounds, [a[j] for a in after], lw=1, alpha=0.8, label=f"learner {j}" if n <= 12 else None)
        # per-learner test split scores; else the shared evaluation set's accuracy (Lightning's validation)
        tests = [(r["round"], (r["test"] or r.get("val"))[j]) for r in results if r["test"] or r.get("val")]
        if tests:
            bottom.plot(*zip(*tests), lw=1, alpha=0.8, marker=".")
    mean_after = [sum(a) / len(a) if a else math.nan for a in after]
    for r, m in zip(results, mean_after):
        top.plot(r["round"], m, "o" if r["accepted"] else "x", color="black" if r["accepted"] else "red", ms=4)
    top.set_ylabel(f"vote {criterion}")
    top.set_title("collective voting: dot = accepted round, cross = rejected")
    bottom.set_ylabel(f"test {criterion}" if any(r["test"] for r in results) else "val_acc (shared test set)")
    bottom.set_xlabel("round")
    bottom.xaxis.get_major_locator().set_params(integer=True)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    if n:
        top.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    return _save(fig, out)


def plot_votes(results: list[dict], out: str | os.PathLike):
    """colearn's ``plot_votes``: a learners x rounds heat-map of the votes (yes, no, proposer); returns ``out``."""
    import numpy as np
    from matplotlib.colors import ListedColormap

    plt = _pyplot()
    n = len(results[0]["votes"]) if results else 0
    # 0 = no, 1 = yes, 2 = proposer (does not vote); an explicit int array: no object arrays or masked
    # NaN tricks, which is what broke the original's plot on current numpy.
    grid = np.zeros((n, len(results)), dtype=np.int64)
    for k, r in enumerate(results):
        for j, v in enumerate(r["votes"]):
            grid[j, k] = 2 if v is None else int(bool(v))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(results) + 2), max(2.5, 0.4 * n + 1.5)))
    ax.imshow(grid, cmap=ListedColormap(["#d9534f", "#5cb85c", "#cccccc"]), vmin=0, vmax=2, aspect="auto",
              interpolation="nearest")
    for k, r in enumerate(results):
        ax.text(k, -0.75, "A" if r["accepted"] else "R", ha="center", va="center", fontsize=7)
        for j, v in enumerate(r["votes"]):
            if v is None:
                ax.text(k, j, "P", ha="center", va="center", fontsize=7)
    ax.set_ylim(n - 0.5, -1.25)
    ax.set_yticks(range(n), [f"learner {j}" for j in range(n)])
    ax.set_xticks(range(len(results)), [str(r["round"]) for r in results], fontsize=7)
    ax.set_xlabel("round")
    ax.set_title("votes: green yes, red no, P proposer\nA accepted, R rejected", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def plot_rounds(history: list[dict], out: str | os.PathLike, title: str | None = None, target: float | None = None):
    """Server score per federated round; per-miner candidate scores and appended blocks for PoFL; returns ``out``.

    ``history`` is :attr:`FederatedAveraging.history` or :attr:`ProofOfLearning.history`.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    points = [(r["round"] + 1, r["score"]) for r in history if r.get("score") is not None]
    if points:
        ax.plot(*zip(*points), marker="o", ms=3, color="black", label="server score (global model / block)")
    miners = max((len(r.get("scores") or []) for r in history), default=0)
    for m in range(miners):
        pts = [(r["round"] + 1, r["scores"][m]) for r in history if r["scores"][m] is not None]
        if pts:
            ax.plot(*zip(*pts), ls="", marker=".", ms=4, alpha=0.6, label=f"miner {m}" if miners <= 10 else None)
    blocks = [r["round"] + 1 for r in history if r.get("block") is not None]
    for k, x in enumerate(blocks):
        ax.axvline(x, color="tab:green", lw=0.5, alpha=0.4, label="block appended" if k == 0 else None)
    if target is not None:
        ax.axhline(target, color="tab:red", ls="--", lw=0.8, label=f"target {target:g}")
    ax.set_xlabel("round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("score on the shared evaluation set")
    ax.set_title(title or "federated rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    return _save(fig, out)


def plot_label_distribution(
    counts: Any,
    out: str | os.PathLike,
    *,
    class_names: Sequence | None = None,
    member_names: Sequence | None = None,
    title: str | None = None,
) -> Path:
    """How a data set's classes are spread over the members, as one PNG of two panels; returns ``out``.

    ``counts[i, c]`` is member ``i``'s number of samples of class ``c`` (an
    int array, tensor or nested list ``[members, classes]``, e.g. what a
    Dirichlet partition gave each client). Left: one stacked horizontal bar
    per member, a colour per class (named in a legend up to 20 classes, on a
    colour bar beyond). Right: the same counts as a members x classes
    heat-map, each cell annotated with its count up to 20 x 20. Members are
    named on the axis up to 50 of them, classes up to 50; beyond, the axes
    show indices. flwr-datasets' ``plot_label_distributions`` draws one or
    the other (``plot_type="bar"`` or ``"heatmap"``); here both, side by side.

    Args:
        counts: non-negative integers ``[members, classes]`` (whole-number floats are accepted).
        out: the PNG file to write (parent directories are created).
        class_names: one name per class (default: the class indices).
        member_names: one name per member (default: the member indices).
        title: the figure's title (default: ``"label distribution: <M> members, <C> classes"``).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> out = Path(tempfile.mkdtemp()) / "labels.png"
        >>> plot_label_distribution([[30, 0, 5], [2, 40, 1]], out, class_names=["cat", "dog", "bird"]) == out
        True
        >>> plot_label_distribution([[1, -2]], out)
        Traceback (most recent call last):
            ...
        ValueError: counts must be >= 0, got -2 (member 0, class 1)
    """
    import numpy as np

    grid = _label_counts(counts)
    members, classes = grid.shape
    class_labels = _names("class_names", class_names, classes, "class", grid.shape)
    member_labels = _names("member_names", member_names, members, "member", grid.shape)
    if title is not None and not isinstance(title, str):
        raise ValueError(f"title must be a str or None, got {title!r}")

    from matplotlib.collections import PolyCollection
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    colors = _class_colors(classes)
    annotate = members <= 20 and classes <= 20
    name_members, name_classes = members <= 50, classes <= 50
    legend = classes <= 20
    height = min(12.0, max(3.5, 1.6 + 0.3 * members)) if name_members else 8.0
    if legend:
        height += 0.3 * math.ceil(classes / min(classes, 10))
    heat_width = max(3.5, 0.38 * classes + 1.5) if annotate else min(8.0, max(4.5, 2.0 + 0.15 * classes))
    fig, (bars, heat) = plt.subplots(1, 2, figsize=(min(18.0, 6.0 + heat_width), height), sharey=True, layout="constrained",
                                     gridspec_kw={"width_ratios": [6.0, heat_width - 1.0]})

    # left: member i's bar runs from 0 to its total, a segment per class; one collection per class, where
    # barh() would make a patch per segment (100,000 of them for 1,000 members of 100 classes)
    thickness = 0.8 if name_members else 1.0
    ends = np.cumsum(grid, axis=1)
    y = np.arange(members)
    for c in range(classes):
        left, right = ends[:, c] - grid[:, c], ends[:, c]
        boxes = np.stack([np.stack([left, y - thickness / 2], 1), np.stack([right, y - thickness / 2], 1),
                          np.stack([right, y + thickness / 2], 1), np.stack([left, y + thickness / 2], 1)], 1)
        bars.add_collection(PolyCollection(boxes[grid[:, c] > 0], facecolors=colors[c], edgecolors="none",
                                           antialiased=name_members))
    bars.set_xlim(0, max(1, int(ends[:, -1].max())) * 1.02)
    bars.set_xlabel("samples")
    bars.set_ylabel("member")
    bars.grid(axis="x", alpha=0.3)
    bars.set_axisbelow(True)

    # right: the heat-map (its image sets the shared y limits: member 0 on top, like the bars read)
    # nearest: smoothing would blend neighbouring classes' cells when 1,000 members shrink to a few pixels each
    shown = heat.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=max(1, int(grid.max())))
    fig.colorbar(shown, ax=heat, label="samples", shrink=0.9 if members > 3 else 1.0)
    heat.set_xlabel("class")
    if annotate:
        cmap, norm = shown.get_cmap(), shown.norm
        size = 8 if classes <= 10 else 6.5
        for i in range(members):
            for c in range(classes):
                r, g, b, _ = cmap(norm(grid[i, c]))
                ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                heat.text(c, i, str(grid[i, c]), ha="center", va="center", fontsize=size, color=ink)

    if name_members:
        bars.set_yticks(y, member_labels, fontsize=8 if members <= 20 else 6.5)
    else:
        bars.yaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    if name_classes:
        tilt = classes > 12 or max(len(n) for n in class_labels) > 4
        heat.set_xticks(range(classes), class_labels, fontsize=8 if classes <= 20 else 6.5,
                        rotation=45 if tilt else 0, ha="right" if tilt else "center", rotation_mode="anchor")
    else:
        heat.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    heat.set_ylim(members - 0.5, -0.5)

    if legend:
        handles = [Patch(facecolor=colors[c], label=class_labels[c]) for c in range(classes)]
        ncol = min(classes, 10)
        rows = math.ceil(classes / ncol)
        # a legend fills column by column: this order reads 0 1 2 ... along each row
        handles = [handles[r * ncol + k] for k in range(ncol) for r in range(rows) if r * ncol + k < classes]
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=8,
                   title="class", title_fontsize=8, frameon=False)
    else:  # too many classes to name: a colour bar of class indices under the bars
        scale = plt.cm.ScalarMappable(norm=BoundaryNorm(np.arange(classes + 1) - 0.5, classes), cmap=ListedColormap(colors))
        bar = fig.colorbar(scale, ax=[bars, heat], location="bottom", label="class (bar colours)", shrink=0.5, aspect=40,
                           ticks=MaxNLocator(nbins=10, integer=True))
        bar.minorticks_off()
    fig.suptitle(title or f"label distribution: {members} member{'s' * (members != 1)}, "
                          f"{classes} class{'es' * (classes != 1)}")
    return _save(fig, out)


def _label_counts(counts):
    """``counts`` as a 2-D int64 numpy array of non-negative values, or a ValueError saying what was wrong."""
    import numpy as np

    if isinstance(counts, Tensor):
        counts = counts.detach().cpu()
        counts = counts.double() if counts.is_floating_point() else counts
    try:
        grid = np.asarray(counts)
    except ValueError as err:  # numpy >= 1.24: a ragged nested list
        raise ValueError(f"counts must be a rectangular [members, classes] array, "
                         f"got a ragged {type(counts).__name__}: {err}") from None
    if grid.ndim != 2 or 0 in grid.shape:
        raise ValueError(f"counts must be 2-D [members, classes] with at least one of each, got shape {grid.shape}")
    if grid.dtype.kind == "f":
        whole = np.isfinite(grid) & (grid == np.round(grid))
        if not whole.all():
            i, c = np.argwhere(~whole)[0]
            raise ValueError(f"counts must be whole numbers, got {grid[i, c]} (member {i}, class {c})")
    elif grid.dtype.kind not in "iu":
        raise ValueError(f"counts must be integers, got dtype {grid.dtype}")
    if (grid < 0).any():
        i, c = np.argwhere(grid < 0)[0]
        raise ValueError(f"counts must be >= 0, got {grid[i, c]:g} (member {i}, class {c})")
    return grid.astype(np.int64)


def _names(argument: str, names, n: int, one: str, shape: tuple[int, int]) -> list[str]:
    """``names`` as ``n`` strings (default ``"0"`` ... ``"n-1"``), or a ValueError naming ``argument``."""
    if names is None:
        return [str(k) for k in range(n)]
    if isinstance(names, (str, bytes)) or not hasattr(names, "__len__") or len(names) != n:
        seen = f"{len(names)}: " if hasattr(names, "__len__") and not isinstance(names, (str, bytes)) else ""
        shown = repr(names) if len(repr(names)) <= 80 else repr(names)[:77] + "..."
        raise ValueError(f"{argument} must be a sequence of {n} names, one per {one} (counts has shape {shape}), "
                         f"got {seen}{shown}")
    return [str(name) for name in names]


def _class_colors(classes: int) -> list:
    """One colour per class: tab10's up to 10, tab20's dark then light shades up to 20 (neighbours differ), else a ramp."""
    import matplotlib

    if classes <= 10:
        return [matplotlib.colormaps["tab10"](c) for c in range(classes)]
    if classes <= 20:
        order = [*range(0, 20, 2), *range(1, 20, 2)]
        return [matplotlib.colormaps["tab20"](order[c]) for c in range(classes)]
    ramp = matplotlib.colormaps["turbo"]
    return [ramp(0.05 + 0.9 * c / (classes - 1)) for c in range(classes)]


def log_figure(trainer, name: str, path: str | os.PathLike) -> None:
    """Send a saved PNG to every logger of ``trainer`` that keeps figures: see :func:`lightning_colearn.trackers.log_figure`."""
    from lightning_colearn.trackers import log_figure as _log_figure

    _log_figure(trainer, name, path)
