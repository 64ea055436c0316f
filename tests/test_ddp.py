"""Members across 2 CPU processes (gloo) equal one process: weights, metrics and every decision, per algorithm.

The two-process runs are one ``torchrun --nproc-per-node 2 tests/ddp_cases.py``
(Lightning's ``strategy="ddp"``, all cases in the same two processes, so the
process start-up is paid once); each test runs its case in this process and
compares. ``ddp_spawn`` is exercised through the CLI in ``test_cli_ddp_spawn``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddp_cases import CASES, run_case

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
# Both sides run one thread per process, so each member computes the same float sums: weights and
# decisions are bit-for-bit equal. Metrics sum their batches in another order (rank 1's share is added
# to rank 0's), so they agree to float rounding.
METRIC_TOL = 1e-6


# The command line, on a few batches: a swarm over 2 processes (the strategy is added per run).
CLI_SWARM = ["algorithm=swarm", "cohort.size=3", "model=logistic_regression", "trainer=debug", "trainer.max_epochs=2",
                 "++trainer.limit_train_batches=4", "trainer.devices=2",
                 "trainer.accelerator=cpu", "algorithm.callbacks.swarm.every_n_steps=2",
                 "algorithm.callbacks.swarm.n_particles=3", "test=false", "plots=false", "data.batch_size=32"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """``{strategy: (dir, process)}``: the command line above with ddp_spawn and with ddp (Lightning relaunches the
    command for rank 1), started at once, beside the torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    runs, logs = {}, []
    for strategy in ("ddp_spawn", "ddp"):
        out = tmp_path_factory.mktemp(f"cli_{strategy}")
        logs.append((out / "colearn.log").open("w"))
        args = [*CLI_SWARM, f"trainer.strategy={strategy}", f"hydra.run.dir={out / 'run'}", "logger=[csv,tensorboard,mlflow]"]
        runs[strategy] = out, subprocess.Popen([str(Path(sys.executable).with_name("colearn")), *args], cwd=out, env=env,
                                               stdout=logs[-1], stderr=subprocess.STDOUT)
    yield runs
    for _, proc in runs.values():
        if proc.poll() is None:
            proc.kill()
    for log in logs:
        log.close()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, cli_runs) -> Path:
    """Run every case on 2 processes (and the checkpoint crossings); returns where rank 0 saved the results."""
    root = tmp_path_factory.mktemp("ddp")
    one = root / "one"
    run_case("resume_from_one", one, world=1, max_epochs=1, save_checkpoints=True)  # epoch 1 in one process
    out = root / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           str(HERE / "ddp_cases.py"), str(out), "--resume", str(one / "resume_from_one_checkpoints" / "last.ckpt")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    (root / "torchrun.log").write_text(done.stdout + done.stderr)  # the whole of it, for a failure's post-mortem
    assert done.returncode == 0, f"{root / 'torchrun.log'}:\n{done.stderr[-8000:]}"
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """``one_process(case)``: the case's 1-process result, run once per module."""
    done: dict[str, dict] = {}

    def result(case: str) -> dict:
        if case not in done:
            done[case] = run_case(case, tmp_path_factory.mktemp(case), world=1)
        return done[case]

    return result


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same(one, two, where: str = "", tol: float = 0.0) -> None:
    """Equal structures and values (tensors and floats within relative ``tol``, 0: bit-for-bit)."""
    if isinstance(one, torch.Tensor):
        assert isinstance(two, torch.Tensor), where
        if one.is_floating_point():
            torch.testing.assert_close(two, one, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{where}: {m}")
        else:
            assert torch.equal(one, two), where
    elif isinstance(one, float) and isinstance(two, float):
        assert (math.isnan(one) and math.isnan(two)) or math.isclose(one, two, rel_tol=tol, abs_tol=tol), f"{where}: {one} != {two}"
    elif isinstance(one, dict):
        assert isinstance(two, dict) and one.keys() == two.keys(), f"{where}: keys {sorted(one)} != {sorted(two)}"
        for k in one:
            assert_same(one[k], two[k], f"{where}.{k}", tol)
    elif isinstance(one, (list, tuple)):
        assert len(one) == len(two), f"{where}: length {len(one)} != {len(two)}"
        for k, (a, b) in enumerate(zip(one, two)):
            assert_same(a, b, f"{where}[{k}]", tol)
    else:
        assert one == two, f"{where}: {one!r} != {two!r}"


@pytest.mark.parametrize("case", CASES)
def test_two_processes_equal_one(case, two_processes, one_process):
    one = one_process(case)
    two = torch.load(two_processes / f"{case}.pt", weights_only=False)
    assert two["global_step"] == one["global_step"] > 0
    assert_same(one["decisions"], two["decisions"], "decisions")
    assert_same(one["state"], two["state"], "state")
    if case == "wrapped":  # a member's own training logs: per step in one process, epoch means under DDP
        one["metrics"] = {k: v for k, v in one["metrics"].items() if not k.startswith("loss/member_")}
        assert all(f"loss/member_{i}" in two["metrics"] for i in range(3))  # every rank's members reach the logger
        two["metrics"] = {k: v for k, v in two["metrics"].items() if not k.startswith("loss/member_")}
    assert_same(one["metrics"], two["metrics"], "metrics", METRIC_TOL)
    # the runs did something to compare: decisions were taken, members differ from their initial weights
    if case not in ("independent", "independent_stacked", "wrapped"):
        assert any(one["decisions"].values())


def test_ledger_written_once(two_processes, one_process):
    from lightning_colearn.ledger import Ledger

    one = one_process("pofl")
    blocks = [r["block"] for r in one["decisions"]["rounds"] if r["block"] is not None]
    assert blocks, "the case should append blocks"
    ledger = Ledger(two_processes / "ledger.db")
    single = Ledger(one["out"] / "ledger.db")
    try:  # rank 0 alone wrote: each block once, the same rounds and winners as in one process, an intact chain
        assert len(ledger) == len(single) == len(blocks)
        assert ledger.verify().ok
        assert [(b.round, b.winner) for b in map(ledger.block, range(len(ledger)))] == \
            [(b.round, b.winner) for b in map(single.block, range(len(single)))]
    finally:
        ledger.close()
        single.close()


def test_checkpoint_from_two_processes_resumes_in_one(two_processes, one_process, tmp_path):
    uninterrupted = one_process("uninterrupted")
    ckpt = two_processes / "two" / "resume_from_two_checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=False)
    states = checkpoint["optimizer_states"][0]["members"]
    assert all(s["state"] for s in states), "every member's Adam state, from the rank that trained it"
    resumed = run_case("resume_from_two", tmp_path, world=1, ckpt_path=str(ckpt))
    assert resumed["global_step"] == uninterrupted["global_step"]
    assert_same(uninterrupted["decisions"], resumed["decisions"], "decisions")
    assert_same(uninterrupted["state"], resumed["state"], "state")


def test_checkpoint_from_one_process_resumes_in_two(two_processes, one_process):
    uninterrupted = one_process("uninterrupted")
    resumed = torch.load(two_processes / "resume_from_one.pt", weights_only=False)
    assert resumed["global_step"] == uninterrupted["global_step"]
    assert_same(uninterrupted["decisions"], resumed["decisions"], "decisions")
    assert_same(uninterrupted["state"], resumed["state"], "state")


def test_lightning_default_sampler_setting_is_turned_off(two_processes, one_process):
    # Trainer(strategy="ddp", devices=2) as is: Lightning would split the loaders, the module keeps them whole
    two = torch.load(two_processes / "default_sampler" / "independent.pt", weights_only=False)
    assert_same(one_process("independent")["state"], two["state"], "state")


def test_training_loader_split_over_ranks_is_refused(two_processes):
    message = (two_processes / "split_loader_error.txt").read_text()
    assert "DistributedSampler" in message and "every rank must see every training batch" in message


def test_cli_ddp_spawn_runs_the_swarm_on_two_processes(cli_runs, two_processes):
    out, proc = cli_runs["ddp_spawn"]
    assert proc.wait(timeout=600) == 0, (out / "colearn.log").read_text()[-3000:]
    run = out / "run"
    logs = sorted((run / "logs").iterdir())
    assert [p.name for p in logs] == ["version_0"]  # fit's processes and this one log into one version
    moves = (logs[0] / "swarm_moves.csv").read_text().splitlines()
    assert len(moves) == 1 + 4  # header + a move every 2 of 8 steps, written once, by rank 0
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 8
    assert all(s["state"] for s in checkpoint["optimizer_states"][0]["members"])  # members of both ranks
    # the trackers: one MLflow run for the main process and both spawns (fit, test), with metrics and files
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run.resolve()}/mlflow.db")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("colearn").experiment_id])
    assert {"val_acc/mean", "val_loss/member_1"} <= set(mlflow_run.data.metrics)  # (member 1: rank 1's)
    (tb,) = (run / "tensorboard").iterdir()  # named by the overrides, too many for one directory name: cut, hashed
    assert len(tb.name.encode()) <= 120 and tb.name.startswith("++trainer.limit_train_batches=4,") and "~" in tb.name
    assert "results.json" in {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert "val_acc/mean" in (logs[0] / "metrics.csv").read_text().splitlines()[0]


def test_config_refuses_more_processes_than_members():
    from hydra import compose, initialize_config_module

    from lightning_colearn.cli import ConfigError, validate_config

    with initialize_config_module("lightning_colearn.conf", version_base="1.3"):
        cfg = compose("config", overrides=["cohort.size=2", "trainer.strategy=ddp", "trainer.devices=3"])
    with pytest.raises(ConfigError, match=r"trainer.devices must be <= cohort.size \(2\).*got 3"):
        validate_config(cfg)


def test_cli_ddp_equals_ddp_spawn(cli_runs, two_processes):
    (spawned, spawn_proc), (launched, proc) = cli_runs["ddp_spawn"], cli_runs["ddp"]
    assert spawn_proc.wait(timeout=600) == 0 and proc.wait(timeout=600) == 0, (launched / "colearn.log").read_text()[-3000:]
    a = torch.load(spawned / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(launched / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert_same(a["state_dict"], b["state_dict"], "state_dict")
    assert (launched / "run" / "logs" / "version_0" / "swarm_moves.csv").read_text() == \
        (spawned / "run" / "logs" / "version_0" / "swarm_moves.csv").read_text()
    assert json.loads((launched / "run" / "results.json").read_text()) == {}  # test=false; written once, by rank 0

