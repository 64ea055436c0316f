"""Send a run's figures, files and configuration to the experiment trackers of a Trainer.

Lightning's loggers carry metrics and hyperparameters; figures and files each
tracker takes its own way: TensorBoard as images (``add_image``), MLflow as
run artifacts (``log_artifact``), Weights & Biases as images (``log_image``)
and run files (``save``). The functions here speak to every logger of a
``Trainer`` the way it understands, and skip a logger that has no such notion
(a CSV logger keeps files only in its directory).

Figures come from the objects that draw them: a callback or module that
implements ``write_artifacts(trainer, pl_module, out) -> {name: path}`` writes
its CSVs and PNGs into ``out`` and names the figures; :func:`publish` calls it
with the run's directory and sends the figures on, at the end of fitting and,
with :class:`~lightning_colearn.callbacks.LivePlots`, every few epochs.

Examples:
    >>> import tempfile, lightning as L
    >>> from pathlib import Path
    >>> from lightning.pytorch.loggers import CSVLogger
    >>> from lightning_colearn import trackers
    >>> d = Path(tempfile.mkdtemp())
    >>> trainer = L.Trainer(logger=CSVLogger(d, name="", version=""), default_root_dir=d)
    >>> trackers.run_dir(trainer) == d   # where the run's own files go (the CSV logger's directory)
    True
    >>> _ = (d / "results.json").write_text("{}")
    >>> trackers.log_artifact(trainer.loggers, d / "results.json")   # a CSV logger takes no files: nothing to do
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["finish", "log_artifact", "log_config", "log_figure", "log_results", "publish", "run_dir", "tracker_kind", "wandb_logger"]


def tracker_kind(logger: Any) -> str:
    """``"tensorboard"``, ``"mlflow"``, ``"wandb"``, ``"csv"`` or ``"other"``, from the logger's class (no import of the trackers)."""
    names = {cls.__name__ for cls in type(logger).__mro__}
    for kind, cls in (("tensorboard", "TensorBoardLogger"), ("mlflow", "MLFlowLogger"), ("wandb", "WandbLogger"), ("csv", "CSVLogger")):
        if cls in names:
            return kind
    return "other"


def run_dir(trainer: Any, broadcast: bool = True) -> Path | None:
    """Where rank 0 writes the run's own files (CSVs, PNGs); ``None`` on other ranks or without a logger.

    The first CSV or TensorBoard logger's directory, else the first logger's ``save_dir``
    that is a local directory, else ``trainer.default_root_dir`` (an MLflow database or a
    tracking server has no directory of its own to write into). Every rank must call it:
    rank 0's choice is broadcast, so a rank that skipped it would leave the others waiting.
    ``broadcast=False`` is for rank 0 alone, after the processes have parted (the CLI's end of run).
    """
    loggers = list(getattr(trainer, "loggers", []))
    if not loggers:
        return None
    path = next((lg.log_dir for lg in loggers if tracker_kind(lg) in ("csv", "tensorboard")), None)
    if path is None:
        path = next((lg.save_dir for lg in loggers if tracker_kind(lg) == "wandb" and lg.save_dir), None)
    if path is None:
        path = trainer.default_root_dir
    if broadcast:
        path = trainer.strategy.broadcast(str(path))
    return Path(path) if trainer.is_global_zero else None


def log_figure(trainer: Any, name: str, path: str | os.PathLike) -> None:
    """Send a saved PNG to every logger of ``trainer`` that keeps figures, at ``trainer.global_step``.

    TensorBoard and W&B get an image under ``plots/<name>`` (a new one at every step it is
    sent, so a cadence shows how the figure changed; the prefix keeps ``plots/val_acc`` apart
    from the metrics ``val_acc/...``); MLflow gets the file as the artifact ``plots/<file name>``
    (the latest one sent).
    """
    key = f"plots/{name}"
    for logger in getattr(trainer, "loggers", []):
        kind = tracker_kind(logger)
        if kind == "mlflow":
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="plots")
        elif hasattr(logger, "log_image"):  # WandbLogger, Neptune, Comet, ...
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step)
        elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoardLogger
            import matplotlib.image

            image = matplotlib.image.imread(str(path))[..., :3]
            logger.experiment.add_image(key, image, trainer.global_step, dataformats="HWC")


def log_artifact(loggers: Iterable[Any], path: str | os.PathLike, folder: str | None = None) -> None:
    """Attach a file (a ledger, ``results.json``, a CSV) to each logger's run, where the tracker keeps files.

    MLflow: the run artifact ``[folder/]<name>``; W&B: the run file ``colearn/[folder/]<name>``
    (in its own folder: W&B keeps a ``config.yaml`` of its own), uploaded when an offline run
    is synced. TensorBoard and CSV loggers keep no files: skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"log_artifact: {path} is not a file")
    for logger in loggers:
        kind = tracker_kind(logger)
        if kind == "mlflow":
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=folder)
        elif kind == "wandb":
            run = logger.experiment
            copy = Path(run.dir) / "colearn" / (folder or "") / path.name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy)
            run.save(str(copy), base_path=run.dir, policy="now")


def log_config(loggers: Iterable[Any], config: Mapping[str, Any]) -> None:
    """Record a (resolved, nested) configuration as each logger's hyperparameters.

    Nested keys reach the trackers flattened the tracker's way (``optimizer/lr`` in
    TensorBoard and MLflow, a nested config in W&B).
    """
    for logger in loggers:
        logger.log_hyperparams(dict(config))


def log_results(loggers: Iterable[Any], config: Mapping[str, Any], results: Mapping[str, float]) -> None:
    """Pair the configuration with the run's final results where a tracker compares runs that way.

    TensorBoard's HPARAMS tab lists runs by their hyperparameters only once they come with
    metrics: the results go there as ``hp/<key>`` (logged at step 0, beside the real curves).
    MLflow and W&B already hold both (params/config and the test metrics): nothing to add.
    """
    for logger in loggers:
        if tracker_kind(logger) == "tensorboard" and results:
            logger.log_hyperparams(dict(config), metrics={f"hp/{k}": float(v) for k, v in results.items()})


def finish(loggers: Iterable[Any], failed: bool = False) -> None:
    """End each logger's run: flush TensorBoard, mark MLflow's run finished or failed, finish the W&B run.

    Lightning finalizes its loggers when ``fit`` and ``test`` end, but leaves a W&B run
    open (a user may log more); a process that runs several jobs (a Hydra sweep) must end
    it, or the next job's logger would write into it.
    """
    for logger in loggers:
        kind = tracker_kind(logger)
        if kind == "wandb":
            if getattr(logger, "_experiment", None) is not None:
                logger.experiment.finish(exit_code=1 if failed else 0)
        else:
            logger.finalize("failed" if failed else "success")


def publish(trainer: Any, pl_module: Any, source: Any) -> dict[str, Path]:
    """Have ``source`` write its files into :func:`run_dir` and send its figures to the loggers.

    ``source`` implements ``write_artifacts(trainer, pl_module, out) -> {name: png path}``.
    Every rank must call this (see :func:`run_dir`); only rank 0 writes. Returns the figures
    (empty on other ranks and without a logger: nothing is written to the working directory).
    """
    out = run_dir(trainer)
    if out is None:
        return {}
    figures = source.write_artifacts(trainer, pl_module, out) or {}
    for name, path in figures.items():
        log_figure(trainer, name, path)
    return dict(figures)


def wandb_logger(**kwargs: Any) -> Any:
    """Lightning's ``WandbLogger(**kwargs)``, without the ``anonymous`` setting Lightning always passes.

    W&B (>= 0.19) deprecated that setting and warns about it in every run, even as ``None``,
    before its own ``silent`` setting applies; conf/logger/wandb.yaml builds its logger here.
    """
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(**kwargs)
    if logger._wandb_init.get("anonymous") is None:  # (Lightning's own copy of the wandb.init arguments)
        logger._wandb_init.pop("anonymous", None)
    return logger
