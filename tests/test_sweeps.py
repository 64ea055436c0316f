"""Hydra sweeps on real launchers: joblib (local parallel), submitit SLURM (config only) and Optuna.

The two multiruns run the installed ``colearn`` script on a few batches; they start in the
background when this module starts (both at once: their time is mostly importing torch), while
the in-process config tests run. The config tests compose ``conf/`` (the package
``lightning_colearn.conf``) from its directory, so this process does not import torch at all
and leaves both cores to the multiruns.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"  # shipped as the package `lightning_colearn.conf`
COLEARN = Path(sys.executable).with_name("colearn")
# One epoch of 3 small batches (trainer=debug), no plots, no logger.
TINY = ["trainer=debug", "plots=false", "logger=none", "data.batch_size=32", "data.eval_batch_size=100"]
SWEEPS = {
    "joblib": ["-m", "hydra/launcher=joblib", "seed=0,1", *TINY],
    # mutual: both sampled parameters change the training at once, so the two trials score differently
    "optuna": ["-m", "hparams_search=mutual_optuna", "hydra.sweeper.n_trials=2", *TINY],
}
SLURM_FIELDS = ("partition", "timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb")


@pytest.fixture(scope="module", autouse=True)
def sweeps(request, tmp_path_factory):
    """``name -> (sweep dir, Popen, log file)`` of the selected tests' multiruns, started at once."""
    wanted = set()
    for item in request.session.items:  # the tests selected in this session (-k, node ids)
        callspec = getattr(item, "callspec", None)
        if getattr(item, "module", None) is request.module and callspec is not None and "sweep" in callspec.params:
            wanted.add(callspec.params["sweep"])
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["OMP_NUM_THREADS"] = "1"  # three tiny runs share two cores
    jobs = {}
    for name in [n for n in SWEEPS if n in wanted]:
        tmp = tmp_path_factory.mktemp(name)
        with (tmp / "colearn.log").open("w") as log:  # a file, not a pipe: nobody reads while they run
            proc = subprocess.Popen([str(COLEARN), *SWEEPS[name], f"hydra.sweep.dir={tmp / 'multi'}"], cwd=tmp,
                                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        jobs[name] = (tmp / "multi", proc, tmp / "colearn.log")
    yield jobs
    for _, proc, _ in jobs.values():
        if proc.poll() is None:  # a failed or interrupted session: end the run and its joblib workers
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def finished(sweeps, sweep) -> Path:
    """The sweep dir of the test's ``sweep`` multirun, once it has exited successfully."""
    multi, proc, log = sweeps[sweep]
    proc.wait(timeout=600)
    assert proc.returncode == 0, log.read_text()
    return multi


@pytest.fixture
def make_cfg():
    """``make_cfg(*overrides)``: the real config with its ``hydra`` node, composed as ``colearn`` would."""
    GlobalHydra.instance().clear()

    def _make(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)

    yield _make
    GlobalHydra.instance().clear()


def _job_dirs(multi: Path) -> list[Path]:
    return sorted((p for p in multi.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


# ------------------------------------------------------------------ in-process: the configs compose
def test_launcher_and_search_configs_are_package_data():
    # (the multiruns below find joblib.yaml and mutual_optuna.yaml through the installed package)
    shipped = {p.relative_to(CONF).as_posix() for p in CONF.glob("**/*.yaml")}
    assert {"hydra/launcher/joblib.yaml", "hydra/launcher/slurm.yaml", "hparams_search/swarm_optuna.yaml",
            "hparams_search/voting_optuna.yaml", "hparams_search/mutual_optuna.yaml"} <= shipped
    pyproject = (CONF.parent / "pyproject.toml").read_text()
    assert '"lightning_colearn.conf" = ["*.yaml", "**/*.yaml"]' in pyproject


def test_slurm_launcher_composes_with_documented_fields(make_cfg):
    cfg = make_cfg("hydra/launcher=slurm")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "slurm"
    text = (CONF / "hydra" / "launcher" / "slurm.yaml").read_text()
    for field in SLURM_FIELDS:
        assert field in launcher, field
        line = next(line for line in text.splitlines() if line.startswith(f"{field}:"))
        assert "#" in line, f"{field} has no comment"
    assert "tasks_per_node=4" in text and "trainer.devices=4" in text and "trainer.strategy=ddp" in text
    # the README's DDP example composes to the values it promises
    cfg = make_cfg("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
                   "hydra.launcher.tasks_per_node=4", "trainer.accelerator=gpu", "trainer.devices=4",
                   "trainer.strategy=ddp")
    assert (cfg.hydra.launcher.partition, cfg.hydra.launcher.gpus_per_node, cfg.hydra.launcher.tasks_per_node) == ("gpu", 4, 4)
    assert (cfg.trainer.devices, cfg.trainer.strategy) == (4, "ddp")


@pytest.mark.parametrize("name,algorithm,experiment", [
    ("swarm_optuna", "swarm", "swarm_mnist"),
    ("voting_optuna", "voting", "voting_mnist"),
    ("mutual_optuna", "mutual", None),
    ("pbt_space_optuna", "independent", None),
])
def test_optuna_search_params_name_real_fields(make_cfg, name, algorithm, experiment):
    overrides = ([f"experiment={experiment}"] if experiment else []) + [f"hparams_search={name}"]
    cfg = make_cfg(*overrides)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and isinstance(sweeper.sampler.seed, int)
    assert (sweeper.direction, sweeper.n_jobs) == ("maximize", 1)
    assert cfg.optimized_metric == "test_acc/mean"
    assert cfg.algorithm.name == algorithm
    assert len(sweeper.params) >= 1
    parser = OverridesParser.create()
    for key, space in sweeper.params.items():
        assert OmegaConf.select(cfg, key) is not None, f"{name}: {key} is not a field of the composed config"
        assert parser.parse_override(f"{key}={space}").is_sweep_override(), f"{name}: {key}={space}"
    text = (CONF / "hparams_search" / f"{name}.yaml").read_text()
    assert f"hparams_search={name}" in text.split("defaults:")[0]  # usage in the header comment


# ------------------------------------------------------------------ the multiruns
@pytest.mark.slow
@pytest.mark.parametrize("sweep", ["joblib"])
def test_joblib_multirun_runs_two_jobs_two_at_a_time(finished):
    jobs = _job_dirs(finished)
    assert [p.name for p in jobs] == ["0", "1"]
    seeds = set()
    for job in jobs:
        results = json.loads((job / "results.json").read_text())
        assert 0.0 <= results["test_acc/mean"] <= 1.0
        seeds.add(OmegaConf.load(job / "config.yaml").seed)
        hydra = OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra
        assert hydra.runtime.choices["hydra/launcher"] == "joblib"
        assert hydra.launcher.n_jobs == 2  # our conf/hydra/launcher/joblib.yaml, not the plugin's (-1)
    assert seeds == {0, 1}
    launcher = OmegaConf.load(finished / "multirun.yaml").hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert launcher.n_jobs == 2


@pytest.mark.slow
@pytest.mark.parametrize("sweep", ["optuna"])
def test_optuna_sweep_runs_trials_and_writes_the_best(finished):
    jobs = _job_dirs(finished)
    assert [p.name for p in jobs] == ["0", "1"]
    values, params = [], []
    for job in jobs:
        values.append(json.loads((job / "results.json").read_text())["test_acc/mean"])
        cfg = OmegaConf.load(job / "config.yaml")
        params.append((cfg.algorithm.module.temperature, cfg.algorithm.module.kl_weight))
    assert params[0] != params[1]  # two sampled points
    best = OmegaConf.load(finished / "optimization_results.yaml")
    assert best.name == "optuna"
    assert set(best.best_params) == {"algorithm.module.temperature", "algorithm.module.kl_weight"}
    assert best.best_value == pytest.approx(max(values))  # direction: maximize
    winner = params[values.index(max(values))]
    assert (best.best_params["algorithm.module.temperature"], best.best_params["algorithm.module.kl_weight"]) == pytest.approx(winner)
