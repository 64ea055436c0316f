"""The ``colearn`` Hydra CLI: every shipped config runs, the baseline learns, resume is exact, errors are one line.

In-process tests compose the real configs with Hydra's compose API and call
:func:`lightning_colearn.cli.train`; the command-line tests run the installed
``colearn`` script in subprocesses (started in the background, see :func:`_colearn_jobs`).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf

import lightning_colearn.conf
from lightning_colearn.cli import _USER_ERRORS, ConfigError, train
from lightning_colearn.data.datasets import DEBIAN_FASHION_MNIST, default_root
from lightning_colearn.plots import read_metrics_csv

CONF = Path(lightning_colearn.conf.__file__).resolve().parent  # the repository's conf/ (shipped as the package)
COLEARN = Path(sys.executable).with_name("colearn")
FASHION_MNIST_FILE = DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz"
# A few small batches per run: the keys of trainer=debug, added (++) where the trainer config lacks them.
FEW_BATCHES = [
    "trainer.max_epochs=1",
    "++trainer.limit_train_batches=3",
    "++trainer.limit_val_batches=1",
    "++trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "data.batch_size=32",
    "data.eval_batch_size=100",
]


def _mnist_on_disk() -> bool:
    """Full MNIST where conf/data/mnist.yaml (root: null) looks first: IDX files in the root or its MNIST/raw."""
    root = default_root()
    return any((folder / name).is_file() for folder in (root, root / "MNIST" / "raw")
               for name in ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"))


def _contains(composed, own) -> bool:
    """``own`` (a config file's value) is in ``composed``: equal, or for mappings every key of it, recursively
    (a file that extends another through its defaults list composes to more keys than it writes)."""
    if isinstance(own, dict) and isinstance(composed, dict):
        return all(k in composed and _contains(composed[k], v) for k, v in own.items())
    return composed == own


def token_sequences(n: int = 300, length: int = 12, vocab: int = 50):
    """Integer token sequences whose class is which half of the vocabulary they draw from (a data=custom factory)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (n,), generator=generator)
    tokens = torch.randint(1, vocab // 2, (n, length), generator=generator) + labels[:, None] * (vocab // 2)
    return torch.utils.data.TensorDataset(tokens, labels)


def _cifar10_on_disk() -> bool:
    return (default_root() / "cifar-10-batches-py" / "data_batch_1").is_file()


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """These runs are tiny; two intra-op threads on a busy 2-core machine make them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ every config file on disk
def _config_files() -> list:
    params = []
    for path in sorted(CONF.glob("*/*.yaml")):
        group, name = path.parent.name, path.stem
        marks = []
        if (group, name) == ("data", "mnist"):
            marks.append(pytest.mark.skipif(not _mnist_on_disk(), reason=f"full MNIST not under {default_root()} (needs internet)"))
        if (group, name) == ("data", "fashion_mnist"):
            marks.append(pytest.mark.skipif(not FASHION_MNIST_FILE.is_file(), reason=f"{FASHION_MNIST_FILE} missing"))
        if (group, name) == ("data", "cifar10"):
            marks.append(pytest.mark.skipif(not _cifar10_on_disk(), reason=f"CIFAR-10 not under {default_root()} (needs internet)"))
        params.append(pytest.param(group, name, marks=marks, id=f"{group}={name}"))
    return params


def test_every_config_group_is_found():
    groups = {p.parent.name for p in CONF.glob("*/*.yaml")}
    assert {"algorithm", "cohort", "model", "optimizer", "data", "trainer", "logger", "experiment"} <= groups


@pytest.mark.parametrize("group,name", _config_files())
def test_config_file_composes_and_trains(make_cfg, tmp_path, group, name):
    overrides = [f"{group}={name}", "trainer=debug", *FEW_BATCHES, "plots=false"]
    if group == "trainer":
        overrides.remove("trainer=debug")
    if (group, name) == ("data", "fashion_mnist"):
        overrides.append("data.max_train_samples=2000")
    if (group, name) == ("data", "custom"):  # a template: the data set's _target_ is the user's to give
        overrides += ["data.dataset._target_=lightning_colearn.data.datasets.sklearn_dataset", "+data.dataset.name=iris"]
    if (group, name) == ("model", "embedding_bag"):  # token ids, not images
        overrides += ["data=custom", "data.dataset._target_=test_cli.token_sequences"]
    cfg = make_cfg(*overrides)
    results = train(cfg)

    out = tmp_path / "out"
    assert 0.0 <= results["test_acc/mean"] <= 1.0
    assert math.isfinite(results["test_loss/mean"])
    assert json.loads((out / "results.json").read_text()) == pytest.approx(results)
    saved = OmegaConf.load(out / "config.yaml")
    assert OmegaConf.to_container(saved) == OmegaConf.to_container(cfg, resolve=True)
    # the group's file was really applied (keys the overrides above did not touch)
    own = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{name}.yaml"), resolve=False)
    if group not in ("experiment", "hparams_search"):  # (their files are @package _global_)
        touched = {o.lstrip("+").split("=")[0] for o in overrides}
        for key, value in own.items():
            overridden = any(t == f"{group}.{key}" or t.startswith(f"{group}.{key}.") for t in touched)
            if key != "defaults" and not overridden and "${" not in str(value):
                assert _contains(OmegaConf.to_container(saved[group])[key], value), f"{group}.{key}"
    metrics_csv = out / "logs" / "version_0" / "metrics.csv"
    if "csv" in (saved.get("logger") or {}):  # trainer.test logs into the same file (validation may not run in 3 steps)
        assert read_metrics_csv(metrics_csv)["test_acc/mean"][0][1] == pytest.approx(results["test_acc/mean"])
    else:
        assert not (out / "logs").exists()
    assert (out / "checkpoints" / "last.ckpt").is_file()


# --------------------------------------------------------------------------------- baseline
@pytest.mark.slow
def test_baseline_experiment_learns_mnist(make_cfg, tmp_path):
    cfg = make_cfg("experiment=baseline", "seed=0")
    assert (cfg.cohort.size, cfg.optimizer.lr, cfg.data.batch_size, cfg.trainer.max_epochs) == (1, 1e-3, 128, 10)
    assert cfg.model._target_.endswith("LogisticRegression")
    results = train(cfg)

    out = tmp_path / "out"
    assert results["test_acc/mean"] >= 0.85, results
    assert not any("member_1" in k for k in results)  # one member
    for plot in ("predictions.png", "val_acc.png"):
        assert (out / "plots" / plot).stat().st_size > 1000, plot
    val_acc = read_metrics_csv(out / "logs" / "version_0" / "metrics.csv")["val_acc/member_0"]
    assert [epoch for epoch, _ in val_acc] == list(range(10))
    assert val_acc[-1][1] > val_acc[0][1]  # it learns from epoch to epoch


def test_bf16_mixed_on_cpu(make_cfg, tmp_path):
    cfg = make_cfg("trainer=debug", "trainer.precision=bf16-mixed", "trainer.accelerator=cpu", "plots=false")
    results = train(cfg)
    assert math.isfinite(results["test_loss/mean"])
    assert 0.0 <= results["test_acc/mean"] <= 1.0
    assert OmegaConf.load(tmp_path / "out" / "config.yaml").trainer.precision == "bf16-mixed"


# ----------------------------------------------------------------------------------- resume
def _tensors(obj, prefix="") -> dict:
    """Every tensor in a nested checkpoint entry, by path, as exact (dtype, shape, values) for ``==``."""
    if isinstance(obj, torch.Tensor):
        return {prefix: (obj.dtype, tuple(obj.shape), obj.flatten().tolist())}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in _tensors(value, f"{prefix}/{key}").items()}


@pytest.mark.slow
def test_resume_from_last_checkpoint_matches_uninterrupted_run(make_cfg, tmp_path):
    small = ["cohort.size=2", "model=logistic_regression", "trainer=debug", "++trainer.limit_train_batches=5",
             "test=false", "plots=false"]
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    train(make_cfg(*small, "trainer.max_epochs=2", out=resumed))
    first_half = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert first_half["global_step"] == 10
    train(make_cfg(*small, "trainer.max_epochs=4", "ckpt_path=last", out=resumed))
    train(make_cfg(*small, "trainer.max_epochs=4", out=straight))

    a = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert a["global_step"] == 20
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("cohort.") and k.endswith("weight") for k in a["state_dict"])
    differing = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert differing == []
    assert _tensors(a["optimizer_states"]) and _tensors(a["optimizer_states"]) == _tensors(b["optimizer_states"])
    # the weights moved after the resume (the second call did train epochs 2 and 3)
    assert any(not torch.equal(first_half["state_dict"][k], a["state_dict"][k]) for k in a["state_dict"])
    # the resumed part logs to the next version, the interrupted part's metrics are kept
    epochs = [e for e, _ in read_metrics_csv(resumed / "logs" / "version_1" / "metrics.csv")["val_acc/mean"]]
    assert epochs == [2, 3]
    assert (resumed / "logs" / "version_0" / "metrics.csv").is_file()


# ----------------------------------------------------------------------- the colearn command
ERROR_CASES = {  # id: (overrides, field named in the message, bad value shown in it)
    "cohort_size": (["cohort.size=0"], "cohort.size", "0"),
    "negative_lr": (["optimizer.lr=-0.1"], "optimizer.lr", "-0.1"),
    "unknown_model": (["model=nonexistent"], "model", "nonexistent"),
    "bad_partition": (["data.partition=bogus"], "data.partition", "bogus"),
    # download=false: the outcome must not depend on whether this machine has internet
    "missing_data": (["data=mnist", "data.root={tmp}/nope", "data.download=false"], "data.root", "{tmp}/nope"),
    "zero_epochs": (["trainer.max_epochs=0"], "trainer.max_epochs", "0"),
    "zero_batch": (["data.batch_size=0"], "data.batch_size", "0"),
    "missing_ckpt": (["ckpt_path={tmp}/missing.ckpt"], "ckpt_path", "{tmp}/missing.ckpt"),
    "swarm_too_many_particles": (["algorithm=swarm", "cohort.size=2"], "n_particles", "got 4"),
    "swarm_alpha": (["algorithm=swarm", "algorithm.callbacks.swarm.alpha=1.5"], "alpha", "1.5"),
    "fedavg_aggregator": (["algorithm=fedavg", "algorithm.aggregator=mean"], "aggregator", "'mean'"),
    "voting_one_learner": (["algorithm=voting", "cohort=single"], "algorithm.callbacks.voting", "cohort size 1"),
    "voting_no_vote_data": (["algorithm=voting", "data.splits=[0.9,0.0,0.1]"], "algorithm.callbacks.voting", "empty vote split"),
    "backend_name": (["cohort.backend=fast"], "cohort.backend", "'fast'"),
    "pbt_quantile": (["algorithm=pbt", "algorithm.callbacks.pbt.quantile_fraction=0.9"], "quantile_fraction", "0.9"),
    "pbt_space": (["algorithm=pbt", "algorithm.callbacks.pbt.hyperparameters.lr.low=0"], "hyperparameters.lr", "low=0"),
    "pbt_one_member": (["algorithm=pbt", "cohort=single"], "algorithm.callbacks.pbt", "a cohort of 1"),
    "stacked_heterogeneous": (["algorithm=mutual", "cohort=heterogeneous_3", "cohort.backend=stacked"], "cohort.backend", "members 0 and 2"),
}
# Every case is checked in-process (test_bad_config_is_one_clear_error); these also through the installed
# command, one per place an error can come from: the config check, Hydra's composition, the data, a callback.
COMMAND_ERROR_CASES = ("cohort_size", "unknown_model", "missing_data", "voting_no_vote_data")
CLI_JOBS = {
    **{case: [*ERROR_CASES[case][0], "trainer=debug", "hydra.run.dir={tmp}/run"] for case in COMMAND_ERROR_CASES},
    "multirun": ["-m", "seed=0,1", "model=logistic_regression,mlp", "trainer=debug", "plots=false",
                 "hydra.sweep.dir={tmp}/multi"],
    "default_run": ["trainer=debug", "hydra.run.dir={tmp}/run"],
    # a sweep of 2 jobs into all three trackers: one MLflow experiment, one W&B group, one TensorBoard directory
    "tracked_sweep": ["-m", "seed=0,1", "algorithm=swarm", "trainer=debug", "plots=false", "trainer.log_every_n_steps=1",
                      "algorithm.callbacks.swarm.every_n_steps=2", "logger=[tensorboard,mlflow,wandb]",
                      "hydra.sweep.dir={tmp}/multi"],
    "verbose_run": ["trainer=debug", "verbose=true", "plots=false", "test=false", "hydra.run.dir={tmp}/run"],
}


def _colearn(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["OMP_NUM_THREADS"] = "1"  # several run at once
    return subprocess.run([str(COLEARN), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module", autouse=True)
def _colearn_jobs(request, tmp_path_factory):
    """Start the ``colearn`` subprocesses of the selected tests when this module starts.

    Most of each one is importing torch, so they run in the background, two at a
    time, while the in-process tests above run.
    """
    wanted = set()
    for item in request.session.items:  # the tests selected in this session (-k, node ids)
        callspec = getattr(item, "callspec", None)
        if getattr(item, "module", None) is request.module and callspec is not None and "cli_job" in callspec.params:
            wanted.add(callspec.params["cli_job"])
    jobs = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for name in [n for n in CLI_JOBS if n in wanted]:  # in the order the tests need them
            tmp = tmp_path_factory.mktemp(name)
            args = [a.format(tmp=tmp) for a in CLI_JOBS[name]]
            jobs[name] = (tmp, pool.submit(_colearn, args, tmp))
        yield jobs
        for _, future in jobs.values():
            future.cancel()


@pytest.fixture
def cli_run(_colearn_jobs, cli_job) -> tuple[Path, subprocess.CompletedProcess]:
    """``(cwd, completed process)`` of the ``colearn`` job named by the test's ``cli_job`` parameter."""
    tmp, future = _colearn_jobs[cli_job]
    return tmp, future.result()


def test_colearn_script_is_installed():
    assert COLEARN.is_file(), f"{COLEARN} missing: pip install -e ."


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_config_is_one_clear_error(case, make_cfg, tmp_path):
    """What the command prints as its one error line: the field, the value and what is allowed; nothing written."""
    overrides, field, value = ERROR_CASES[case]
    overrides, value = [o.format(tmp=tmp_path) for o in overrides], value.format(tmp=tmp_path)
    try:
        cfg = make_cfg(*overrides, "trainer=debug")
    except HydraException as err:  # composition: Hydra's own one-line error (an unknown config name)
        message = str(err)
    else:
        with pytest.raises(_USER_ERRORS) as info:
            train(cfg)
        message = str(info.value)
    assert field in message, message
    assert re.search(rf"(?<![\w.-]){re.escape(value)}(?![\w.])", message), message
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("cli_job", COMMAND_ERROR_CASES)
def test_bad_override_exits_with_a_one_line_error(cli_run, cli_job):
    tmp, proc = cli_run
    output = proc.stdout + proc.stderr
    _, field, value = ERROR_CASES[cli_job]
    value = value.format(tmp=tmp)
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    assert field in output, output
    assert re.search(rf"(?<![\w.-]){re.escape(value)}(?![\w.])", output), output
    assert "results:" not in proc.stdout
    assert not (tmp / "run" / "results.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("cli_job", ["multirun"])
def test_multirun_sweeps_seeds_and_models(cli_run):
    tmp, proc = cli_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    multi = tmp / "multi"
    assert sorted(p.name for p in multi.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    combos = set()
    for job in range(4):
        results = json.loads((multi / str(job) / "results.json").read_text())
        assert 0.0 <= results["test_acc/mean"] <= 1.0
        cfg = OmegaConf.load(multi / str(job) / "config.yaml")
        assert Path(cfg.paths.output_dir).resolve() == (multi / str(job)).resolve()
        combos.add((cfg.seed, cfg.model._target_.rsplit(".", 1)[1]))
    assert combos == {(s, m) for s in (0, 1) for m in ("LogisticRegression", "MLP")}


@pytest.mark.slow
@pytest.mark.parametrize("cli_job", ["default_run"])
def test_default_run_reports_results(cli_run):
    tmp, proc = cli_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = (tmp / "run").resolve()
    assert "results:" in proc.stdout
    assert str(run) in proc.stdout
    results = json.loads((run / "results.json").read_text())
    assert f"test_acc/mean={results['test_acc/mean']:.4f}" in proc.stdout
    cfg = OmegaConf.load(run / "config.yaml")
    assert (cfg.cohort.size, cfg.model._target_) == (4, "lightning_colearn.models.MLP")  # the documented default
    assert (run / "logs" / "version_0" / "metrics.csv").is_file()
    assert (run / "plots" / "predictions.png").is_file()
    assert not (tmp / "outputs").exists()  # hydra.run.dir was honoured
    assert "deprecated" not in proc.stderr, proc.stderr  # no deprecation notices from the libraries underneath
    # nothing a user cannot act on: no Lightning tip, "GPU available", "`Trainer.fit` stopped", log_every_n_steps
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [], proc.stderr
    allowed = ("data: ", "results: ", "  test: ", "  config: ", "  metrics: ", "  plot: ")  # what the run reports, line by line
    assert [line for line in proc.stdout.splitlines() if line.strip() and not line.startswith(allowed)] == [], proc.stdout


@pytest.mark.parametrize("cli_job", ["verbose_run"])
def test_verbose_brings_the_notices_back(cli_run):
    tmp, proc = cli_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "GPU available" in proc.stderr and "`Trainer.fit` stopped" in proc.stderr, proc.stderr


def test_train_restores_the_notice_levels_it_quiets(make_cfg, tmp_path):
    """train() may run inside a user's process (a notebook, a sweep): its quiet must not outlive it."""
    import logging

    from lightning_colearn.cli import NOTICE_LOGGERS

    log = logging.getLogger(next(iter(NOTICE_LOGGERS)))
    before = log.level
    log.setLevel(logging.INFO)
    try:
        train(make_cfg("trainer=debug", *FEW_BATCHES, "plots=false", "test=false", out=tmp_path))
        assert log.level == logging.INFO
    finally:
        log.setLevel(before)


def test_mutual_learning_on_the_heterogeneous_cohort(make_cfg, tmp_path):
    cfg = make_cfg("algorithm=mutual", "cohort=heterogeneous_3", "trainer=debug", *FEW_BATCHES, "plots=false")
    results = train(cfg)
    assert {"test_acc/ensemble", "test_acc/member_2"} <= set(results)
    state = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert "cohort.members.0.conv1.weight" in state and "cohort.members.2.fc1.weight" in state  # ConvNet, ConvNet, MLP


def test_heterogeneous_cohort_size_must_match_members(make_cfg):
    with pytest.raises(ConfigError, match="cohort.size is 2 but cohort.members lists 3"):
        train(make_cfg("cohort=heterogeneous_3", "cohort.size=2", "trainer=debug"))


def test_voting_experiment_writes_its_results_and_plots(make_cfg, tmp_path, capsys):
    cfg = make_cfg("experiment=voting_mnist", "model=logistic_regression", "trainer=debug", *FEW_BATCHES,
                   "trainer.max_epochs=2", "data.max_train_samples=1000")
    assert (cfg.cohort.size, cfg.optimizer.lr, cfg.algorithm.callbacks.voting.threshold) == (5, 1e-3, 0.5)
    train(cfg)
    log_dir = tmp_path / "out" / "logs" / "version_0"
    rows = (log_dir / "voting_results.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("round,step,proposer,accepted")
    printed = capsys.readouterr().out
    for plot in ("voting_results.png", "voting_votes.png"):
        assert (log_dir / plot).is_file() and plot in printed  # listed where the run says its plots went
    assert "vote/accepted" in read_metrics_csv(log_dir / "metrics.csv")


def test_pofl_experiment_writes_a_ledger_the_ledger_command_verifies(make_cfg, tmp_path, capsys):
    from lightning_colearn import ledger_cli

    cfg = make_cfg("experiment=pofl_mnist", "cohort.size=8", "algorithm.miners=2", "algorithm.clients_per_round=4",
                   "algorithm.threshold=0.0", "trainer=debug", *FEW_BATCHES, "trainer.max_epochs=2")
    train(cfg)
    ledger = tmp_path / "out" / "ledger.db"
    assert ledger_cli.main(["verify", str(ledger)]) == 0
    assert "OK: 2 blocks verified" in capsys.readouterr().out
    log_dir = tmp_path / "out" / "logs" / "version_0"
    assert (log_dir / "pofl_rounds.png").is_file() and len((log_dir / "pofl_rounds.csv").read_text().splitlines()) == 3


def test_fedavg_experiment_takes_the_aggregator_from_the_command_line(make_cfg):
    cfg = make_cfg("experiment=fedavg_mnist", "data.partition=dirichlet", "data.alpha=0.1", "algorithm.aggregator=trimmed_mean")
    assert cfg.algorithm.callbacks.fedavg.aggregator == "trimmed_mean"
    assert (cfg.cohort.size, cfg.algorithm.clients_per_round, cfg.data.batch_size) == (100, 20, 20)
    results = train(make_cfg("experiment=fedavg_mnist", "cohort.size=10", "algorithm.clients_per_round=5",
                             "algorithm.aggregator=trimmed_mean", "trainer=debug", *FEW_BATCHES, "plots=false"))
    assert 0.0 <= results["test_acc/mean"] <= 1.0


def test_pbt_from_the_command_line(make_cfg, tmp_path):
    """algorithm=pbt: the population tunes lr and weight decay; lineage, schedule and plot land in the log dir."""
    cfg = make_cfg("algorithm=pbt", "optimizer=sgd", "optimizer.lr=0.05", "cohort.backend=stacked", "trainer=debug",
                   *FEW_BATCHES, "trainer.max_epochs=2", "plots=false", out=tmp_path)
    results = train(cfg)
    assert 0.0 <= results["test_acc/mean"] <= 1.0
    logs = tmp_path / "logs" / "version_0"
    schedule = (logs / "pbt_schedule.csv").read_text().splitlines()
    assert schedule[0] == "step,lr,weight_decay" and len(schedule) >= 2
    assert (logs / "pbt_lineage.csv").is_file() and (logs / "pbt.png").is_file()


@pytest.mark.parametrize("algorithm", ["independent", "swarm"])
def test_stacked_backend_from_the_command_line(make_cfg, tmp_path, algorithm):
    """cohort.backend=stacked trains the same cohort as the loop (the stacked rows hold the members)."""
    results = {}
    for backend in ("loop", "stacked"):
        cfg = make_cfg(f"algorithm={algorithm}", f"cohort.backend={backend}", "trainer=debug", *FEW_BATCHES, "plots=false",
                       out=tmp_path / backend)
        results[backend] = train(cfg)
    assert results["loop"].keys() == results["stacked"].keys()
    for key, value in results["loop"].items():
        assert math.isclose(value, results["stacked"][key], rel_tol=1e-3, abs_tol=1e-3), key
    a = torch.load(tmp_path / "loop" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "stacked" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()  # one checkpoint format for both backends
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)


def test_corrupt_checkpoint_is_one_clear_error_and_stays_as_it_was(make_cfg, tmp_path):
    """Resuming from a truncated checkpoint is a one-line ConfigError naming the file; the file is not touched."""
    train(make_cfg("trainer=debug", *FEW_BATCHES, "plots=false", "test=false"))
    last = tmp_path / "out" / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"ckpt_path: '.*last.ckpt' is not a readable checkpoint \(.*\); nothing was changed"):
        train(make_cfg("trainer=debug", *FEW_BATCHES, "plots=false", "test=false", "ckpt_path=last"))
    assert last.read_bytes() == data[: len(data) // 2]


# ------------------------------------------------------------------------------ a sweep in the trackers
@pytest.mark.parametrize("cli_job", ["tracked_sweep"])
def test_a_sweep_lands_in_one_experiment_group_and_directory(cli_run):
    from mlflow import MlflowClient
    from test_trackers import tensorboard_run, wandb_run

    tmp, proc = cli_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "", proc.stderr  # no tracker banners, database notices or sync hints
    multi = tmp / "multi"
    summary = json.loads((multi / "sweep_results.json").read_text())
    values = {job["run_name"]: job["value"] for job in summary["jobs"]}
    assert len(values) == 2 and all("seed=0" in n or "seed=1" in n for n in values), values
    best_name = max(values, key=values.get)
    assert (summary["best"]["run_name"], summary["best"]["value"]) == (best_name, values[best_name])
    assert f"sweep: best test_acc/mean={values[best_name]:.4f} ({best_name}) of 2 jobs" in proc.stdout

    # MLflow: one experiment for the sweep, a run per job named by its overrides, the best recorded
    client = MlflowClient(f"sqlite:///{multi.resolve()}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]  # (every MLflow store has one)
    assert experiment.name == f"colearn/{multi}"
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(values)
    for name, run in runs.items():
        assert run.data.metrics["test_acc/mean"] == pytest.approx(values[name])
        assert "swarm/best_member" in run.data.metrics
    assert float(experiment.tags["best test_acc/mean"]) == pytest.approx(values[best_name])
    assert runs[best_name].data.tags.get("best_of_sweep") == "true"

    # TensorBoard: <sweep>/tensorboard/<run name> per job, and the sweep's best
    for name in values:
        assert tensorboard_run(multi / "tensorboard" / name).Scalars("test_acc/mean")[-1].value == pytest.approx(values[name])
    assert tensorboard_run(multi / "tensorboard" / "sweep").Scalars("sweep/best test_acc/mean")[0].value == pytest.approx(values[best_name])

    # W&B: every job's offline run (and the sweep's summary run) in one group
    found = [wandb_run(d) for d in sorted((multi / "wandb").glob("offline-run-*"))]
    assert sorted(r["name"] for r in found) == sorted([*values, "sweep"])
    assert {r["group"] for r in found} == {str(multi)}
    assert all("test_acc/mean" in r["history"] for r in found if r["name"] != "sweep")


@pytest.mark.parametrize("bad", ["0", "1.5", "true"])
def test_checkpoint_step_interval_is_checked(make_cfg, bad):
    with pytest.raises(ConfigError, match=r"checkpoint_every_n_steps must be null \(after every epoch only\) or an int >= 1, got"):
        train(make_cfg(f"checkpoint_every_n_steps={bad}", "trainer=debug"))
