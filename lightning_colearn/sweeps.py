"""A Hydra callback that sums up a multirun: its best job, in ``sweep_results.json`` and in the trackers.

Part of the CLI layer (it imports Hydra); ``conf/config.yaml`` installs it as
``hydra.callbacks.sweep_summary``, so every ``colearn -m`` sweep (basic,
joblib, Optuna, SLURM) ends with one line naming its best job::

    sweep: best test_acc/mean=0.8412 (seed=2) of 3 jobs; multirun/2026-12-05/10-00-00/sweep_results.json

Each job's value is the ``optimized_metric`` key of its ``results.json``; higher
is better unless the sweeper says ``direction: minimize`` (or the metric is a
loss). The trackers the jobs used record it too: MLflow as tags of the sweep's
experiment (and ``best_of_sweep`` on the best run), TensorBoard as a scalar in
``<sweep dir>/tensorboard/sweep``, W&B as the summary of a run named ``sweep``
in the sweep's group.

The callback also prepares a shared MLflow store before the jobs start (its
tables and the sweep's experiment), so jobs that run at once do not race to
create them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lightning_colearn.cli import _logger_nodes, notices

__all__ = ["SweepSummary", "summarise"]


def _direction(config: DictConfig, metric: str) -> str:
    direction = OmegaConf.select(config, "hydra.sweeper.direction", default=None)
    if isinstance(direction, str):
        return direction
    if direction is not None and len(direction) == 1:
        return str(direction[0])
    return "minimize" if "loss" in metric else "maximize"


def summarise(sweep_dir: str | Path, metric: str, direction: str = "maximize") -> dict[str, Any]:
    """Each job's ``metric`` from ``<sweep_dir>/**/results.json`` and the best one.

    Returns ``{"metric", "direction", "jobs": [{"dir", "run_name", "overrides", "value"}], "best"}``
    (``best`` is ``None`` when no job reported a finite value).
    """
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    sweep_dir = Path(sweep_dir)
    jobs = []
    # a job's dir holds Hydra's .hydra/ (trackers' copies of results.json elsewhere in the sweep dir are not jobs)
    for job_dir in sorted(d.parent for d in sweep_dir.glob("**/.hydra")):
        if not (job_dir / "results.json").is_file():
            continue  # a job that failed before its results
        value = json.loads((job_dir / "results.json").read_text()).get(metric)
        config = OmegaConf.load(job_dir / "config.yaml") if (job_dir / "config.yaml").is_file() else OmegaConf.create()
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
        jobs.append({"dir": str(job_dir), "run_name": OmegaConf.select(config, "tracking.run_name", default=job_dir.name),
                     "overrides": overrides, "value": value})
    scored = [j for j in jobs if isinstance(j["value"], (int, float)) and math.isfinite(j["value"])]
    pick = max if direction == "maximize" else min
    best = pick(scored, key=lambda j: j["value"]) if scored else None
    return {"metric": metric, "direction": direction, "jobs": jobs, "best": best}


def _logger_kinds(config: DictConfig) -> dict[str, DictConfig]:
    kinds = {}
    for node in _logger_nodes(config).values():
        target = str(node.get("_target_", "")).lower()  # MLFlowLogger, TensorBoardLogger, WandbLogger or trackers.wandb_logger
        for kind in ("mlflow", "tensorboard", "wandb"):
            if kind in target:
                kinds[kind] = node
    return kinds


class SweepSummary(Callback):
    """Hydra callback: prepare the shared trackers of a multirun, and record its best job when it ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        node = _logger_kinds(config).get("mlflow")
        if node is None:
            return
        with notices(bool(config.get("verbose", False))):
            from mlflow import MlflowClient

            client = MlflowClient(str(node.tracking_uri))  # creates the store's tables once, here
            name = str(node.experiment_name)
            if client.get_experiment_by_name(name) is None:
                client.create_experiment(name, artifact_location=str(node.artifact_location))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        metric = config.get("optimized_metric")
        if not metric:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        summary = summarise(sweep_dir, metric, _direction(config, metric))
        path = sweep_dir / "sweep_results.json"
        path.write_text(json.dumps(summary, indent=2))
        best = summary["best"]
        if best is None:
            print(f"sweep: no job reported a finite {metric}; {path}")
            return
        print(f"sweep: best {metric}={best['value']:.4f} ({best['run_name']}) of {len(summary['jobs'])} jobs; {path}")
        with notices(bool(config.get("verbose", False))):
            for kind, node in _logger_kinds(config).items():
                getattr(self, f"_record_{kind}")(node, summary, sweep_dir)

    @staticmethod
    def _record_mlflow(node: DictConfig, summary: dict[str, Any], sweep_dir: Path) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(str(node.tracking_uri))
        experiment = client.get_experiment_by_name(str(node.experiment_name))
        if experiment is None:
            return
        best, metric = summary["best"], summary["metric"]
        client.set_experiment_tag(experiment.experiment_id, f"best {metric}", str(best["value"]))
        client.set_experiment_tag(experiment.experiment_id, "best run", str(best["run_name"]))
        for run in client.search_runs([experiment.experiment_id]):
            if run.info.run_name == best["run_name"]:
                client.set_tag(run.info.run_id, "best_of_sweep", "true")

    @staticmethod
    def _record_tensorboard(node: DictConfig, summary: dict[str, Any], sweep_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(Path(str(node.save_dir)) / "sweep"))
        writer.add_scalar(f"sweep/best {summary['metric']}", summary["best"]["value"], 0)
        writer.add_text("sweep/best run", str(summary["best"]["run_name"]), 0)
        writer.close()

    @staticmethod
    def _record_wandb(node: DictConfig, summary: dict[str, Any], sweep_dir: Path) -> None:
        import wandb

        run = wandb.init(project=str(node.project), group=node.get("group"), name="sweep", job_type="sweep-summary",
                         dir=str(node.save_dir), mode="offline" if node.get("offline", True) else "online",
                         settings=wandb.Settings(silent=True))
        run.summary[f"best {summary['metric']}"] = summary["best"]["value"]
        run.summary["best run"] = summary["best"]["run_name"]
        run.finish()
