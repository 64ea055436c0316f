"""The ``colearn`` command: Hydra composes a run from ``conf/``, :func:`train` runs it.

``train(cfg)`` is plain Python (tests and notebooks call it with a composed
config); :func:`main` is the thin ``@hydra.main`` entry point. This is the
only module that imports Hydra.

Examples::

    colearn                                             # 4 MLPs on the embedded MNIST sample
    colearn experiment=baseline                         # the PyTorch logistic-regression tutorial
    colearn cohort.size=8 model=convnet trainer.precision=bf16-mixed
    colearn -m seed=0,1,2 model=logistic_regression,mlp
    colearn hydra.run.dir=outputs/my_run ckpt_path=last # resume that run from its last checkpoint
    colearn experiment=swarm_mnist trainer.strategy=ddp_spawn trainer.devices=2 trainer.accelerator=cpu
"""

from __future__ import annotations

import functools
import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from lightning_colearn import trackers
from lightning_colearn.callbacks.checkpoint import CheckpointWriteError, EpochCheckpoint
from lightning_colearn.callbacks.reporting import CohortProgressBar, LivePlots
from lightning_colearn.data.datasets import DatasetNotFoundError
from lightning_colearn.ledger import LedgerError
from lightning_colearn._checks import is_int_at_least

__all__ = ["ConfigError", "main", "train", "validate_config"]

ALGORITHMS = ("independent", "swarm", "mutual", "voting", "fedavg", "scaffold", "pofl", "pbt")

# conf/hydra/launcher/joblib.yaml shadows the joblib plugin's config of that name on purpose (so that
# `hydra/launcher=joblib` runs 2 jobs at a time) and lists every field itself; Hydra's notice that it
# still matches the plugin's schema by name is about that, and repeats in every job.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/joblib' is validated against ConfigStore schema",
                        category=UserWarning)
# Lightning's own pytree helper (lightning/pytorch/utilities/_pytree.py) builds torch's LeafSpec, which the
# torch installed here deprecates with a FutureWarning: printed in every run's training and test stages, and
# nothing a run can act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


class ConfigError(ValueError):
    """A config value is not allowed; the message names the field, the value and what is allowed."""


def validate_config(cfg: DictConfig) -> None:
    """Check the fields the run depends on before anything is built or trained."""
    _int_field(cfg, "seed", 0)
    _int_field(cfg, "cohort.size", 1)
    name = OmegaConf.select(cfg, "algorithm.name")
    if name not in ALGORITHMS:
        raise ConfigError(f"algorithm.name must be one of {list(ALGORITHMS)}, got {name!r}")
    for key in ("max_epochs", "max_steps"):
        value = OmegaConf.select(cfg, f"trainer.{key}")
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1)):
            raise ConfigError(f"trainer.{key} must be an int >= 1 (or -1 for no limit), got {value!r}")
    backend = OmegaConf.select(cfg, "cohort.backend")
    if backend not in (None, "auto", "loop", "stacked"):
        raise ConfigError(f"cohort.backend must be one of ['loop', 'stacked', 'auto'], got {backend!r}")
    lr = OmegaConf.select(cfg, "optimizer.lr")
    if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0 or not math.isfinite(lr)):
        raise ConfigError(f"optimizer.lr must be a finite number > 0, got {lr!r}")
    strategy, devices = OmegaConf.select(cfg, "trainer.strategy"), OmegaConf.select(cfg, "trainer.devices")
    if isinstance(strategy, str) and strategy.startswith("ddp") and isinstance(devices, int) and devices > cfg.cohort.size:
        raise ConfigError(
            f"trainer.devices must be <= cohort.size ({cfg.cohort.size}) with trainer.strategy={strategy} (the members "
            f"are sharded over the processes), got {devices}"
        )
    steps = cfg.get("checkpoint_every_n_steps")
    if steps is not None and not is_int_at_least(steps, 1):
        raise ConfigError(f"checkpoint_every_n_steps must be null (after every epoch only) or an int >= 1, got {steps!r}")
    every = cfg.get("plot_every_n_epochs", 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ConfigError(f"plot_every_n_epochs must be an int >= 0 (0: plots at the end only), got {every!r}")
    _logger_nodes(cfg)
    ckpt = cfg.get("ckpt_path")
    if ckpt not in (None, "last") and not Path(str(ckpt)).is_file():
        raise ConfigError(f"ckpt_path must be null, 'last' or an existing checkpoint file, got {ckpt!r}")


def _check_checkpoint(ckpt: Any, out: Path) -> None:
    """A checkpoint to resume from must load (weights only, no pickle code); say so in one line, not a traceback."""
    if ckpt is None:
        return
    path = out / "checkpoints" / "last.ckpt" if ckpt == "last" else Path(str(ckpt))
    if ckpt == "last" and not path.exists():
        return  # Lightning warns and starts from scratch: nothing to resume yet
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a checkpoint, pickled code: all unreadable for our purpose
        raise ConfigError(
            f"ckpt_path: {str(path)!r} is not a readable checkpoint ({str(err).splitlines()[0]}); "
            "nothing was changed: restore the file, pick an older one, or start a new run"
        ) from err


def _int_field(cfg: DictConfig, key: str, minimum: int) -> int:
    value = OmegaConf.select(cfg, key)
    if not is_int_at_least(value, minimum):
        raise ConfigError(f"{key} must be an int >= {minimum}, got {value!r}")
    return value


def build(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule]:
    """Instantiate the datamodule and the algorithm's module from a composed config."""
    size = cfg.cohort.size
    members = cfg.cohort.get("members")
    if members is not None and len(members) != size:
        raise ConfigError(f"cohort.size is {size} but cohort.members lists {len(members)} models; make them agree")
    stream = cfg.algorithm.get("data_stream")  # an algorithm may need one shared batch stream
    extra = {"stream": stream} if stream else {}
    privacy = cfg.get("privacy")
    privacy = OmegaConf.to_container(privacy, resolve=True) if privacy else None
    if privacy and privacy.get("poisson_sampling", True):
        extra["sampling"] = "poisson"  # DP-SGD's accounting assumes Poisson sampling of each member's data
    datamodule = _instantiate(cfg.data, "data", num_members=size, **extra)
    try:  # partition now, so a partition that cannot be made fails before training
        datamodule.prepare_data()
        datamodule.setup("fit")
    except ValueError as err:
        raise ConfigError(str(err)) from err
    shapes = datamodule.shapes() if hasattr(datamodule, "shapes") else {}
    if members is not None:  # a heterogeneous cohort: one model config per member
        model = [_built(_model(m, f"cohort.members[{i}]", shapes)) for i, m in enumerate(members)]
    else:
        model = _model(cfg.model, "model", shapes)
    optimizer = _instantiate(cfg.optimizer, "optimizer")
    try:  # build one optimizer on a dummy tensor so torch validates every hyperparameter now
        optimizer([torch.zeros(1, requires_grad=True)])
    except (ValueError, TypeError) as err:
        raise ConfigError(f"optimizer: {err}") from err
    # the members go in positionally: CohortModule(model, ...) and MutualLearning(students, ...)
    backend = cfg.cohort.get("backend")
    field = "cohort.backend" if backend == "stacked" else "algorithm.module"  # what a stacked refusal is about
    module = _instantiate(
        cfg.algorithm.module, field, model, size=None if members is not None else size,
        optimizer=optimizer, **({"backend": backend} if backend is not None else {}),
        **({"privacy": privacy} if privacy is not None else {}),
    )
    return module, datamodule


def _model(node: Any, field: str, shapes: dict[str, Any]) -> Any:
    """The model factory of ``node``, its shape arguments (``in_features``, ``num_classes``, ...) taken from the data.

    A shape argument the config leaves out (or null) is filled in from ``datamodule.shapes()`` when the
    model takes it; one the config sets must agree with the data.
    """
    factory = _instantiate(node, field)
    if isinstance(factory, torch.nn.Module) or not shapes:  # a built model (copied per member) keeps its shapes
        return factory
    target = factory.func if isinstance(factory, functools.partial) else factory
    try:
        accepted = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin or an object without a signature: nothing to fill in
        return factory
    given = dict(factory.keywords) if isinstance(factory, functools.partial) else {}
    fill = {}
    for key, value in shapes.items():
        if key not in accepted:
            continue
        if given.get(key) is None:
            fill[key] = value
        elif _as_shape(given[key]) != _as_shape(value):
            raise ConfigError(f"{field}.{key} is {given[key]!r} but the data gives {value!r}; drop {field}.{key} from the "
                              "config (it comes from the data) or change the data")
    vocabulary = accepted.get("vocab_size")
    if vocabulary is not None and vocabulary.default is inspect.Parameter.empty and given.get("vocab_size") is None \
            and "vocab_size" not in shapes:
        raise ConfigError(f"{field}: {getattr(target, '__name__', target)} takes token ids [B, L] (integers), but the data's "
                          f"inputs are not integer token sequences held as tensors; set {field}.vocab_size or pick another model")
    image_args = {"in_channels", "image_size"} & set(accepted)
    if image_args and "in_channels" not in shapes and all(given.get(k) is None for k in image_args):
        raise ConfigError(f"{field}: {getattr(target, '__name__', target)} takes images [C, H, W], but the data's inputs have "
                          f"{shapes.get('in_features', '?')} features (no channels); pick a model for flat inputs, e.g. model=mlp")
    if not fill:
        return factory
    if isinstance(factory, functools.partial):
        return functools.partial(factory.func, *factory.args, **{**given, **fill})
    raise ConfigError(f"{field} must be a model factory (_partial_: true) so the cohort can build one model per member "
                      "with the data's shapes")


def _built(model: Any) -> Any:
    """One member of a heterogeneous cohort: a factory is called once, a built model is used as is."""
    return model if isinstance(model, torch.nn.Module) or not callable(model) else model()


def _as_shape(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else value


def _logger_nodes(cfg: DictConfig) -> dict[str, Any]:
    """The loggers the config asks for, by name: ``logger=[csv,tensorboard]`` composes ``logger: {csv: ..., tensorboard: ...}``.

    A ``logger`` node that is itself one logger (a ``_target_`` at its top, as a user's own
    config may write it) counts as one logger named ``logger``.
    """
    node = cfg.get("logger")
    if not node:
        return {}
    if not OmegaConf.is_dict(node):
        raise ConfigError(f"logger must be a mapping of logger configs (logger=csv, logger=[csv,tensorboard]), got {node!r}")
    if "_target_" in node:
        return {"logger": node}
    for name, value in node.items():
        if not OmegaConf.is_dict(value) or "_target_" not in value:
            raise ConfigError(f"logger.{name} must be a logger config with a _target_ (e.g. "
                              f"lightning.pytorch.loggers.CSVLogger), got {OmegaConf.to_container(value) if OmegaConf.is_config(value) else value!r}")
    return dict(node.items())


# ------------------------------------------------------------------ tracking names (the ${colearn:...} resolver)
def _tracking_value(key: str, _root_: Any = None) -> Any:
    """``${colearn:run_name}``, ``${colearn:sweep}`` and ``${colearn:dir}`` for conf/logger/*.yaml.

    - ``run_name``: the job's command-line overrides (``seed=1,cohort.size=8``), else the output dir's name;
    - ``sweep``: a multirun's sweep dir (``multirun/2026-12-05/10-00-00``), shared by its jobs; null in a single run;
    - ``experiment``: ``tracking.experiment``, or ``<tracking.experiment>/<sweep>`` in a multirun (one MLflow experiment a sweep);
    - ``dir``: where the local tracker stores live, absolute: the sweep dir in a multirun (one MLflow database,
      one TensorBoard directory, one W&B folder for all its jobs), else the run's output dir.

    Outside a Hydra run (the compose API, ``train(cfg)`` from Python) the run is a single run in ``paths.output_dir``.
    """
    hydra_cfg = _root_.get("hydra")  # a config with its hydra node: the sweep's own, in a Hydra callback
    if hydra_cfg is None and HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        if Path(str(hydra_cfg.runtime.output_dir)).resolve() != Path(str(_root_.paths.output_dir)).resolve():
            hydra_cfg = None  # a Hydra run earlier in this process, not this config's
    multirun = hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN
    if not multirun or key == "run_name":
        output_dir = Path(str(_root_.paths.output_dir)).resolve()
    if key == "sweep":
        return str(hydra_cfg.sweep.dir) if multirun else None
    if key == "experiment":
        return f"{_root_.tracking.experiment}/{hydra_cfg.sweep.dir}" if multirun else str(_root_.tracking.experiment)
    if key == "dir":
        return str(Path(str(hydra_cfg.sweep.dir)).resolve()) if multirun else str(output_dir)
    if key == "run_name":
        overrides = str(hydra_cfg.job.override_dirname) if hydra_cfg is not None else ""
        name = overrides.replace(os.sep, "_").replace("/", "_") or output_dir.name
        if len(name.encode()) > RUN_NAME_BYTES:  # a directory name (TensorBoard's) may hold 255 bytes
            digest = hashlib.sha256(name.encode()).hexdigest()[:10]
            name = name.encode()[:RUN_NAME_BYTES - 11].decode(errors="ignore") + "~" + digest
        return name
    raise ConfigError(f"${{colearn:{key}}}: unknown key {key!r}; allowed: run_name, sweep, experiment, dir")


#: Longest run name kept whole; a longer one keeps its start and gets a hash of the whole (file systems allow 255 bytes).
RUN_NAME_BYTES = 120

OmegaConf.register_new_resolver("colearn", _tracking_value, replace=True)


#: Where Lightning's notices (and this library's, through Lightning's ``rank_zero_info``) are logged.
NOTICE_LOGGERS = {
    "lightning.pytorch.utilities.rank_zero": logging.WARNING,
    "lightning.fabric.utilities.rank_zero": logging.WARNING,
    "lightning.pytorch.loggers.mlflow": logging.ERROR,  # its "Experiment with name ... not found. Creating it." (a warning)
    "mlflow": logging.WARNING,  # "Creating initial MLflow database tables..." when a run starts its local store
    "alembic": logging.WARNING,  # the store's schema migrations
}

#: Trackers' own switches for their notices: W&B's banner and sync hints; MLflow, which sets its loggers' level
#: when it is imported ("Creating initial MLflow database tables...").
QUIET_ENV = {"WANDB_SILENT": "true", "MLFLOW_LOGGING_LEVEL": "WARNING"}


@contextlib.contextmanager
def notices(verbose: bool):
    """Without ``verbose``, keep out of the run's output what a user of the CLI cannot act on: Lightning's notices
    (its tips, "GPU available: False", "`Trainer.fit` stopped", limits the debug configs set on purpose) and the
    ``log_every_n_steps`` warning short debug runs cause. Warnings and errors still show; ``verbose=true`` brings
    every notice back. Levels and filters are restored afterwards (``train`` may run inside a user's process)."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in NOTICE_LOGGERS]
    levels = [log.level for log in loggers]
    saved_env = {key: os.environ.get(key) for key in QUIET_ENV}
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)  # (a value the user set is theirs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*smaller than the logging interval Trainer\(log_every_n_steps")
        for log, level in zip(loggers, NOTICE_LOGGERS.values()):
            log.setLevel(level)
        try:
            yield
        finally:
            for log, level in zip(loggers, levels):
                log.setLevel(level)
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one experiment; writes config, metrics, checkpoints and plots under ``cfg.paths.output_dir``.

    Returns the final test metrics (what a sweeper optimises). Lightning's notices are kept out of the
    output unless ``cfg.verbose`` (see :func:`notices`).
    """
    with notices(bool(cfg.get("verbose", False))):
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, float]:
    validate_config(cfg)
    out = Path(cfg.paths.output_dir)
    _check_writable(out)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module, datamodule = build(cfg)
    callbacks = []
    for name, node in (cfg.algorithm.get("callbacks") or {}).items():
        callback = _instantiate(node, f"algorithm.callbacks.{name}")
        if hasattr(callback, "check_module"):  # fail before training, with the config field named
            try:
                callback.check_module(module)
                if hasattr(callback, "check_data"):
                    callback.check_data(datamodule, module.size)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"algorithm.callbacks.{name}: {err}") from err
        callbacks.append(callback)
    # last.ckpt after every epoch (and every checkpoint_every_n_steps steps): kills resume from there
    callbacks.append(EpochCheckpoint(out / "checkpoints", cfg.get("checkpoint_every_n_steps")))
    if cfg.get("plots", True) and cfg.get("plot_every_n_epochs", 0):
        callbacks.append(LivePlots(cfg.plot_every_n_epochs))
    if OmegaConf.select(cfg, "trainer.enable_progress_bar", default=True):
        callbacks.append(CohortProgressBar())  # the collective's last event in the bar's postfix
    loggers = [_instantiate(node, f"logger.{name}") for name, node in _logger_nodes(cfg).items()]
    for logger in loggers:
        if trackers.tracker_kind(logger) in ("csv", "tensorboard"):
            _ = logger.version  # fixed here: ddp_spawn's processes then log fit and test into this one directory
    trainer: L.Trainer = _instantiate(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False,
                                      default_root_dir=str(out))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if rank_zero_only.rank == 0:  # under strategy=ddp every process runs this function
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
        _describe_partition(datamodule, out, cfg.get("plots", True))
        # the resolved config as hyperparameters, here (before ddp_spawn's processes start, so MLflow and W&B create
        # their run once and every process logs into it); not the CSV logger's: its writer, made here, would go to
        # ddp_spawn's test processes without the metrics file's columns and fail to append (hparams.yaml comes anyway)
        trackers.log_config([lg for lg in loggers if trackers.tracker_kind(lg) != "csv"], resolved)

    _check_checkpoint(cfg.get("ckpt_path"), out)
    results: dict[str, float] = {}
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        if cfg.get("test", True):
            for metrics in trainer.test(module, datamodule=datamodule, verbose=False):
                results.update({k: float(v) for k, v in metrics.items()})
    except BaseException:
        if trainer.is_global_zero:
            trackers.finish(loggers, failed=True)
        raise
    if not trainer.is_global_zero:
        return results
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    run_dir = trackers.run_dir(trainer, broadcast=False)  # (rank 0 alone now: the processes have parted)
    plots = _plots(trainer, module, datamodule, out, run_dir) if cfg.get("plots", True) else []
    _send_files(cfg, trainer, out, run_dir)
    trackers.log_results(loggers, resolved, results)
    trackers.finish(loggers)
    _report(out, results, plots, _metrics_csv(trainer))
    return results


def _check_writable(out: Path, field: str = "paths.output_dir") -> None:
    """Create the output dir and write a probe into it: a read-only or full one is a one-line error before training."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".colearn-write-probe-{os.getpid()}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{field}: {out} is not writable ({err.strerror or err}); choose another directory "
                          "(hydra.run.dir=... or hydra.sweep.dir=...) or free space there") from err


class OutputDirCheck(HydraCallback):
    """Hydra callback (conf/config.yaml): a run or sweep dir that cannot be written is one line on stderr
    (exit status 2), before Hydra writes its own files there and fails with a traceback."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(path: Any, field: str) -> None:
        try:
            _check_writable(Path(str(path)), field)
        except ConfigError as err:
            print(f"colearn: error: {err}", file=sys.stderr)
            sys.exit(2)


def _send_files(cfg: DictConfig, trainer: L.Trainer, out: Path, run_dir: Path | None) -> None:
    """The run's files to the trackers that keep files: results, config, partition, the callbacks' CSVs, the ledger."""
    if not trainer.loggers:
        return
    files = [out / name for name in ("results.json", "config.yaml", "partition.csv")]
    if run_dir is not None:
        files += sorted(p for p in run_dir.glob("*.csv") if p.name != "metrics.csv")  # swarm moves, rounds, votes, lineage
    ledger = OmegaConf.select(cfg, "algorithm.ledger", default=None)
    if ledger and Path(str(ledger)).is_file():
        files.append(Path(str(ledger)))
    for path in files:
        if path.is_file():
            trackers.log_artifact(trainer.loggers, path)


def _plots(trainer: L.Trainer, module, datamodule, out: Path, run_dir: Path | None) -> list[Path]:
    from lightning_colearn import plots  # matplotlib only when plots are asked for

    made = []
    metrics_csv = _metrics_csv(trainer)
    if metrics_csv is not None and metrics_csv.is_file():
        # a resumed run logs into the next version_<n>: plot all of them, oldest first
        history = sorted(metrics_csv.parent.parent.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
        for metric in ("val_acc", "val_loss"):
            try:
                made.append(plots.plot_member_curves(history or [metrics_csv], out / "plots" / f"{metric}.png", metric))
            except ValueError:  # that metric was not logged (e.g. no classes)
                pass
    made.extend(_prediction_grid(module, datamodule, out, plots))
    if (out / "plots" / "label_distribution.png").is_file():
        made.append(out / "plots" / "label_distribution.png")
    for path in made:  # (the callbacks' own figures reached the trackers when fitting ended)
        trackers.log_figure(trainer, path.stem, path)
    if run_dir is not None:  # plots the algorithm's callbacks saved in the run's directory (e.g. swarm.png)
        made.extend(sorted(run_dir.glob("*.png")))
    return made


def _describe_partition(datamodule: Any, out: Path, plot: bool) -> None:
    """One line on what each member got, ``partition.csv`` with the whole table, and the label-distribution plot."""
    if not hasattr(datamodule, "partition_table"):
        return
    table = datamodule.partition_table()
    print(f"data: {table.summary()}")
    table.to_csv(out / "partition.csv")
    if plot and table.classes is not None:
        from lightning_colearn import plots  # matplotlib only when plots are asked for

        plots.plot_label_distribution(table.counts["train"], out / "plots" / "label_distribution.png",
                                      class_names=[str(c) for c in table.classes], title="training samples per member and class")


def _metrics_csv(trainer: L.Trainer) -> Path | None:
    """The CSV logger's ``metrics.csv`` (the metric plots are drawn from it), if the run has a CSV logger."""
    csv = next((lg for lg in trainer.loggers if trackers.tracker_kind(lg) == "csv"), None)
    return Path(csv.log_dir) / "metrics.csv" if csv is not None else None


def _prediction_grid(module, datamodule, out: Path, plots) -> list[Path]:
    """Member 0's predictions on 32 evaluation images (only for image data: [1 or 3, H, W] inputs and classes)."""
    evaluation = getattr(datamodule, "eval_dataset", None)
    if evaluation is None or not hasattr(module, "cohort") or getattr(datamodule, "num_classes", None) is None:
        return []
    source, indices = evaluation
    # evenly spaced over the evaluation set, so every class shows (the embedded test split is sorted by label)
    picked = torch.as_tensor(indices)[torch.linspace(0, len(indices) - 1, min(32, len(indices))).long()]
    batch = source.batch(picked, datamodule.eval_transform, datamodule.collate_fn)
    images, labels = batch[0], batch[1]
    if datamodule.eval_batch_transform is not None:
        images = datamodule.eval_batch_transform(images)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        return []
    module.eval()
    with torch.no_grad():
        device = next(module.parameters()).device
        logits = module.cohort[0](images.to(device))
    if logits.ndim != 2:
        return []
    grid = out / "plots" / "predictions.png"
    title = "member 0 on test images (true label in brackets when wrong)"
    names = [str(c) for c in datamodule.classes] if datamodule.classes is not None else None
    return [plots.plot_predictions(images, labels, logits.argmax(1).cpu(), grid, title=title, class_names=names)]


def _report(out: Path, results: dict[str, float], plots: list[Path], metrics_csv: Path | None) -> None:
    summary = ", ".join(f"{k}={v:.4f}" for k, v in sorted(results.items()) if k.endswith(("/mean", "/best")))
    print(f"\nresults: {out.resolve()}")
    if summary:
        print(f"  test: {summary}")
    print(f"  config: {out.resolve() / 'config.yaml'}")
    if metrics_csv is not None:
        print(f"  metrics: {metrics_csv.resolve()}")
    for p in plots:
        print(f"  plot: {p.resolve()}")


def _instantiate(node: Any, field: str, *args: Any, **kwargs: Any) -> Any:
    # Constructors validate their arguments; their ValueError/TypeError is a
    # config mistake, reported under the config field that caused it.
    try:
        return instantiate(node, *args, **kwargs)
    except MissingMandatoryValue as err:  # a ??? the user must fill in (data=custom's data set)
        raise ConfigError(f"{err.full_key} is not set (??? in the config): give it on the command line, "
                          f"e.g. {err.full_key}=<value>, or in an experiment file") from err
    except InstantiationException as err:
        raise ConfigError(_named(field, err.__cause__ or err)) from err
    except (ValueError, TypeError, MisconfigurationException) as err:
        raise ConfigError(_named(field, err)) from err


def _named(field: str, err: BaseException) -> str:
    message = str(err)
    # a message that already names its config field (data.x, privacy.x, ...) is kept as it is
    return message if message.startswith((f"{field.split('.')[0]}.", "privacy.", "privacy:")) else f"{field}: {message}"


# Errors a user can cause from the command line: shown as one line, not a traceback.
_USER_ERRORS = (ConfigError, DatasetNotFoundError, CheckpointWriteError, LedgerError)


@hydra.main(version_base="1.3", config_path="pkg://lightning_colearn.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        results = train(cfg)
    except _USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"colearn: error: {err}", file=sys.stderr)
        sys.exit(2)
    metric = cfg.get("optimized_metric")
    return results.get(metric) if metric else None


def main() -> None:
    """Console entry point (``colearn``)."""
    _hydra_main()


if __name__ == "__main__":
    main()
