"""The CLI's runs reach real, offline tracker stores: TensorBoard event files, an MLflow SQLite store, a W&B offline run.

Every algorithm runs a few batches with ``logger=[tensorboard,mlflow]`` and the
stores are read back with the trackers' own readers (TensorBoard's
``EventAccumulator``, ``MlflowClient``): the metrics, the collective's events,
the resolved config as hyperparameters, the figures and the run's files must be
there. The W&B run is read from its offline ``.wandb`` file (see
:func:`wandb_records`), since W&B ships no reader for it in Python. The sweep
case (a multirun of 2 jobs grouped in each tracker) is in ``test_cli.py``, which
runs the ``colearn`` script.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_colearn import trackers
from lightning_colearn.callbacks import CohortProgressBar, LivePlots
from lightning_colearn.cli import ConfigError, train

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (make_cfg: tests/conftest.py)

FEW = ["trainer=debug", "trainer.max_epochs=2", "++trainer.limit_train_batches=4", "trainer.enable_progress_bar=true",
       "trainer.log_every_n_steps=1",
       "data.batch_size=32", "data.eval_batch_size=200"]
# Per algorithm: overrides that make its collective events happen in 2 epochs of 4 batches, the metric those
# events log, the figure its callback (or module) draws, and how its progress-bar postfix starts.
ALGORITHMS = {
    "independent": ([], "val_acc/mean", None, None),
    "swarm": (["algorithm.callbacks.swarm.every_n_steps=2"], "swarm/best_member", "swarm", "swarm=move "),
    "mutual": ([], "train_mimicry/mean", "mutual_losses", None),
    "voting": ([], "vote/accepted", "voting_votes", "round=1: "),
    "fedavg": ([], "fedavg/score", "fedavg_rounds", "round=1: score "),
    "scaffold": ([], "scaffold/score", "scaffold_rounds", "round=1: score "),
    "pofl": (["algorithm.threshold=0.0"], "pofl/blocks", "pofl_rounds", "block="),
    "pbt": (["cohort.size=4"], "pbt/exploits", "pbt", "pbt=decision 1: "),
}


def tensorboard_run(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    return events


def tensorboard_hparams(events) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


def mlflow_artifacts(client, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path or None):
        found |= mlflow_artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def wandb_records(path: Path):
    """The protobuf records of a W&B run file (``run-<id>.wandb``).

    The file is W&B's 7-byte header (``:W&B``, magic, version) and then LevelDB's log
    format: 32 KiB blocks of records, each with a 7-byte header (CRC, length, type: full,
    first, middle, last), a record split over blocks when it does not fit.
    """
    from wandb.proto import wandb_internal_pb2

    data, block, pos, parts = path.read_bytes(), 32768, 7, b""
    if len(data) < 7:  # (not written yet)
        return
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a record still being written: the file so far
            return
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def wandb_run(run_dir: Path, timeout: float = 60.0) -> dict:
    """What an offline W&B run holds: its name and group, config keys, history keys, files.

    W&B's service process writes the run file on its own schedule: ``finish()`` can return before the
    file holds the run's records. The run is read once the file ends with the run's exit record.
    """
    (file,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(file)):
        assert time.monotonic() < deadline, f"{file} has no exit record after {timeout} s"
        time.sleep(0.1)
    found = {"config": set(), "history": set(), "files": set(), "name": None, "group": None}
    for record in wandb_records(file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            found["name"], found["group"] = record.run.display_name, record.run.run_group
        elif kind == "config":
            found["config"] |= {u.key or "/".join(u.nested_key) for u in record.config.update}
        elif kind == "history":
            found["history"] |= {i.key or "/".join(i.nested_key) for i in record.history.item}
        elif kind == "files":
            found["files"] |= {f.path for f in record.files.files}
    return found


# -------------------------------------------------------------------------------- every algorithm
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_each_algorithm_reaches_tensorboard_and_mlflow(make_cfg, tmp_path, capsys, algorithm):
    from mlflow import MlflowClient

    extra, event_metric, figure, postfix = ALGORITHMS[algorithm]
    cfg = make_cfg(f"algorithm={algorithm}", *FEW, *extra, "logger=[tensorboard,mlflow]", "plot_every_n_epochs=1")
    results = train(cfg)
    out = tmp_path / "out"
    assert cfg.tracking.run_name == "out"  # outside a Hydra run: the output dir's name

    # TensorBoard: <out>/tensorboard/<run name>
    events = tensorboard_run(out / "tensorboard" / "out")
    tags = events.Tags()
    assert {"val_acc/mean", "test_acc/mean", event_metric} <= set(tags["scalars"]), tags["scalars"]
    assert events.Scalars("test_acc/mean")[-1].value == pytest.approx(results["test_acc/mean"])
    hparams = tensorboard_hparams(events)
    assert hparams["algorithm/name"] == algorithm and hparams["optimizer/lr"] == pytest.approx(cfg.optimizer.lr)
    assert {"plots/predictions", "plots/label_distribution"} <= set(tags["images"]), tags["images"]
    if figure is not None:
        assert f"plots/{figure}" in tags["images"]
        steps = {image.step for image in events.Images(f"plots/{figure}")}
        assert len(steps) >= 2, steps  # plot_every_n_epochs=1: redrawn after epoch 1 and at the end

    # MLflow: <out>/mlflow.db, experiment "colearn", one run named like the TensorBoard one
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("colearn")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "out" and run.info.status == "FINISHED"
    assert run.data.metrics["test_acc/mean"] == pytest.approx(results["test_acc/mean"])
    assert event_metric in run.data.metrics
    assert run.data.params["algorithm/name"] == algorithm and float(run.data.params["optimizer/lr"]) == cfg.optimizer.lr
    artifacts = mlflow_artifacts(client, run.info.run_id)
    assert {"results.json", "config.yaml", "partition.csv", "plots/predictions.png", "plots/label_distribution.png"} <= artifacts
    if figure is not None:
        assert f"plots/{figure}.png" in artifacts
    if algorithm == "pofl":
        assert "ledger.db" in artifacts
        ledger = Path(client.download_artifacts(run.info.run_id, "ledger.db", str(tmp_path)))
        assert ledger.read_bytes() == (out / "ledger.db").read_bytes()

    # the progress bar's postfix shows the collective's last event
    if postfix is not None:
        assert postfix in capsys.readouterr().out  # (Lightning's bar writes to stdout)


def test_wandb_offline_run_holds_metrics_config_figures_and_files(make_cfg, tmp_path):
    pytest.importorskip("wandb")
    cfg = make_cfg("algorithm=swarm", *FEW, "algorithm.callbacks.swarm.every_n_steps=2", "logger=wandb")
    results = train(cfg)
    (run_dir,) = (tmp_path / "out" / "wandb").glob("offline-run-*")
    run = wandb_run(run_dir)
    assert run["name"] == "out" and run["group"] == ""  # a single run: no sweep group
    assert {"seed", "algorithm", "optimizer", "trainer"} <= run["config"]  # the resolved config
    assert {"test_acc/mean", "val_acc/mean", "swarm/best_member", "plots/swarm/_type", "plots/predictions/_type"} <= run["history"]
    assert {"colearn/results.json", "colearn/config.yaml", "colearn/swarm_moves.csv"} <= run["files"]
    saved = json.loads((run_dir / "files" / "colearn" / "results.json").read_text())
    assert saved == pytest.approx(results)
    assert any(p.name.startswith("plots") or "swarm" in p.name for p in (run_dir / "files" / "media" / "images").rglob("*.png"))


# ------------------------------------------------------------------------------------ building blocks
def test_live_plots_rejects_a_cadence_below_one():
    with pytest.raises(ValueError, match="every_n_epochs must be an int >= 1, got 0"):
        LivePlots(every_n_epochs=0)


@pytest.mark.parametrize("bad", ["-1", "1.5", "true"])
def test_plot_cadence_config_is_checked(make_cfg, bad):
    with pytest.raises(ConfigError, match=r"plot_every_n_epochs must be an int >= 0 \(0: plots at the end only\), got"):
        train(make_cfg(f"plot_every_n_epochs={bad}", "trainer=debug"))


def test_a_logger_entry_without_a_target_is_named(make_cfg):
    with pytest.raises(ConfigError, match=r"logger\.mine must be a logger config with a _target_.*got \{'save_dir': 'x'\}"):
        train(make_cfg("+logger.mine.save_dir=x", "trainer=debug"))


def test_a_logger_the_tracker_refuses_is_named(make_cfg):
    with pytest.raises(ConfigError, match=r"^logger\.csv: .*no_such_argument"):
        train(make_cfg("logger=csv", "+logger.csv.no_such_argument=1", "trainer=debug"))


def test_progress_bar_postfix_lists_every_source_and_drops_the_version():
    class Source:
        def __init__(self, items):
            self.items = items

        def progress_postfix(self):
            return self.items

    class Trainer:
        callbacks = [Source({"round": "3: accepted 2/4"}), Source({})]
        progress_bar_metrics = {"val_acc/mean": 0.5}

    bar = CohortProgressBar()
    from unittest import mock

    with mock.patch("lightning.pytorch.callbacks.progress.progress_bar.get_standard_metrics", return_value={"v_num": 3}):
        items = bar.get_metrics(Trainer(), Source({"pbt": "decision 1: 2 exploits, best 0.5"}))
    assert items == {"val_acc/mean": 0.5, "round": "3: accepted 2/4", "pbt": "decision 1: 2 exploits, best 0.5"}


def test_run_dir_prefers_a_logger_directory_then_the_root(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger

    mlflow = MLFlowLogger(experiment_name="e", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    csv = CSVLogger(tmp_path / "csv", name="", version="")
    assert trackers.run_dir(L.Trainer(logger=[mlflow, csv], default_root_dir=tmp_path / "root")) == tmp_path / "csv"
    # an MLflow database has no directory of its own: the trainer's root
    assert trackers.run_dir(L.Trainer(logger=[mlflow], default_root_dir=tmp_path / "root")) == tmp_path / "root"
    assert trackers.run_dir(L.Trainer(logger=False)) is None  # no logger: nothing is written


def test_log_artifact_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="log_artifact: .*missing.json is not a file"):
        trackers.log_artifact([], tmp_path / "missing.json")


def test_tracking_names_come_from_the_output_dir_outside_hydra(make_cfg, tmp_path):
    cfg = make_cfg("logger=[tensorboard,mlflow,wandb]")
    assert (cfg.tracking.run_name, cfg.tracking.sweep, cfg.tracking.dir) == ("out", None, str((tmp_path / "out").resolve()))
    assert cfg.logger.mlflow.experiment_name == "colearn"
    assert cfg.logger.mlflow.tracking_uri == f"sqlite:///{(tmp_path / 'out').resolve()}/mlflow.db"
    assert OmegaConf.to_container(cfg.logger.wandb, resolve=True)["offline"] is True
