"""Kill -9, then resume: every algorithm (the backends alternating) ends exactly like an uninterrupted run.

For each (algorithm, cohort backend) a real ``colearn`` subprocess, which
checkpoints after every step (``checkpoint_every_n_steps=1``), is killed
with SIGKILL at a seeded-random moment after its first checkpoint appears
(so mostly inside an epoch, and inside a round),
then resumed the documented way (the same overrides, ``ckpt_path=last``, the
same ``hydra.run.dir``) and compared with an uninterrupted run of the same
overrides in another directory: the final weights bit for bit, the
algorithm's results CSV (its decision columns; timings differ), the PoFL
ledger (its blocks, without their wall-clock ``time``/``hash``), and no
``*.tmp`` file left behind.

Every run has ``OMP_NUM_THREADS=1`` (the same thread count, so the same
floating-point reductions). The runs start in a module fixture, at most two
processes at a time, and the tests read their results. The uninterrupted runs
of algorithms that take the same extra overrides are the jobs of one
``colearn -m`` (one process instead of one per run: each start imports torch
and Lightning); the tests check each job composed the killed run's config.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from lightning_colearn.ledger import Ledger

pytestmark = pytest.mark.slow

COLEARN = Path(sys.executable).with_name("colearn")
ALGORITHMS = ("independent", "swarm", "mutual", "voting", "fedavg", "pofl")
BACKENDS = ("loop", "stacked")
EPOCHS, BATCHES = 6, 4  # after the first checkpoint (step 1) 23 steps remain for the kill to land in
FINAL_STEP = EPOCHS * BATCHES  # one optimizer step per batch
SMALL = [
    "trainer=debug",
    f"trainer.max_epochs={EPOCHS}",
    f"++trainer.limit_train_batches={BATCHES}",
    "++trainer.limit_val_batches=1",
    "cohort.size=4",
    "data.batch_size=32",
    "data.eval_batch_size=100",
    "test=false",
    "plots=false",
    "checkpoint_every_n_steps=1",
]
PER_ALGORITHM = {
    "independent": [],
    "swarm": ["algorithm.callbacks.swarm.every_n_steps=3"],  # moves at steps 3, 6, 9, ...: across epoch ends
    "mutual": [],
    "voting": [],
    # two epochs per round: some epoch-end checkpoints are taken in the middle of a round
    "fedavg": ["algorithm.clients_per_round=2", "algorithm.local_epochs=2"],
    "pofl": ["algorithm.miners=2", "algorithm.clients_per_round=3", "algorithm.local_epochs=2", "algorithm.threshold=0.7"],
}
# what each algorithm writes into <run>/logs/version_<n>/ besides Lightning's metrics.csv
RESULTS_CSV = {
    "independent": set(),
    "swarm": {"swarm_moves.csv"},
    "mutual": set(),
    "voting": {"voting_results.csv"},
    "fedavg": {"fedavg_rounds.csv"},
    "pofl": {"pofl_rounds.csv"},
}
KILL_DELAYS = (0.5, 0.1, 0.0)  # upper bounds of the random delay, one per attempt (a run that finished first is retried)
TIMEOUT = 600.0

def _cases(marks_for=None) -> list:
    """Every algorithm once, the backends alternating: a real kill tests atomic files and the documented resume,
    which do not depend on the backend; resuming to the same weights from any step on both backends is
    tests/test_step_resume.py's (in one process, every algorithm and strategy), and bench/reliability.py
    kills every algorithm on both."""
    return [
        pytest.param(a, b, marks=marks_for(a, b) if marks_for else (), id=f"{a}-{b}")
        for i, a in enumerate(ALGORITHMS) for b in [BACKENDS[i % len(BACKENDS)]]
    ]


def _overrides(algorithm: str, backend: str) -> list[str]:
    return [f"algorithm={algorithm}", f"cohort.backend={backend}", *SMALL, *PER_ALGORITHM[algorithm]]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["OMP_NUM_THREADS"] = "1"  # every run, killed, resumed and uninterrupted: the same thread count
    return env


def _run(args: list[str], run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(COLEARN), *args, f"hydra.run.dir={run}"], cwd=run.parent, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)


def _multirun(algorithms: list[str], backends: list[str], sweep: Path) -> subprocess.CompletedProcess:
    """The uninterrupted runs of algorithms that share their extra overrides: one ``colearn -m``, a job per case.

    Each job composes exactly the config a single ``colearn <overrides>`` run does (the tests check the saved
    config.yaml), in ``<sweep>/<algorithm>-<backend>``; one process saves importing torch and Lightning per run.
    """
    extra = PER_ALGORITHM[algorithms[0]]
    args = ["-m", f"algorithm={','.join(algorithms)}", f"cohort.backend={','.join(backends)}", *SMALL, *extra,
            f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${algorithm.name}-${cohort.backend}"]
    sweep.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.run([str(COLEARN), *args], cwd=sweep.parent, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)


@dataclass
class Kill:
    """What happened to the run that was killed (its last attempt, and how many it took)."""

    returncode: int | None = None
    attempts: int = 0
    delay: float = 0.0
    first_step: int | None = None  # global_step of the first checkpoint seen
    step: int | None = None  # global_step of the checkpoint the resumed run starts from
    retried: list[str] = field(default_factory=list)  # why earlier attempts were not kept
    output: str = ""


def _kill_after_first_checkpoint(args: list[str], run: Path, rng: random.Random) -> Kill:
    """Start ``colearn``, wait for ``last.ckpt``, sleep a random delay, SIGKILL; retry sooner if that came too late."""
    kill = Kill()
    for max_delay in KILL_DELAYS:
        shutil.rmtree(run, ignore_errors=True)
        kill.attempts += 1
        kill.delay = rng.uniform(0.0, max_delay)
        kill.first_step = kill.step = None
        log = run.with_name(run.name + ".log")
        with open(log, "w") as out:
            proc = subprocess.Popen([str(COLEARN), *args, f"hydra.run.dir={run}"], cwd=run.parent, env=_env(),
                                    stdout=out, stderr=subprocess.STDOUT)
        try:
            ckpt, deadline = run / "checkpoints" / "last.ckpt", time.monotonic() + TIMEOUT
            while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if ckpt.exists():
                seen = time.monotonic()
                kill.first_step = torch.load(ckpt, weights_only=True)["global_step"]  # written atomically
                time.sleep(max(0.0, kill.delay - (time.monotonic() - seen)))
            proc.kill()  # SIGKILL (nothing if it already exited)
            kill.returncode = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        kill.output = log.read_text()
        if kill.returncode == -9 and ckpt.exists():
            kill.step = torch.load(ckpt, weights_only=True)["global_step"]
        if kill.returncode == 0:
            kill.retried.append(f"finished before the kill (delay {kill.delay:.3f} s)")
        elif kill.step == FINAL_STEP and kill.first_step is not None and kill.first_step < FINAL_STEP:
            # there were earlier checkpoints, but the kill came after training: no resume from mid-run was tested
            kill.retried.append(f"killed after training ended (delay {kill.delay:.3f} s)")
        else:
            break
    return kill


@dataclass
class Case:
    killed: Kill
    run: Path  # killed, then resumed in place
    straight: Path  # the uninterrupted run


def _kill_and_resume(algorithm: str, backend: str, tmp: Path) -> tuple[Kill, subprocess.CompletedProcess | None]:
    args = _overrides(algorithm, backend)
    killed = _kill_after_first_checkpoint(args, tmp / "run", random.Random(f"kill-resume:{algorithm}:{backend}"))
    (tmp / "kill.json").write_text(json.dumps({k: v for k, v in vars(killed).items() if k != "output"}, indent=1))
    if killed.returncode != -9:
        return killed, None
    return killed, _run([*args, "ckpt_path=last"], tmp / "run")  # the documented resume


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict[tuple[str, str], tuple[Path, Future, Path, Future]]:
    """Start the kill/resume and the uninterrupted runs of the selected cases, two processes at a time.

    ``{(algorithm, backend): (case dir, kill/resume future, uninterrupted run dir, its multirun's future)}``.
    """
    wanted = []
    for item in request.session.items:  # the cases of the tests selected in this session (-k, node ids)
        callspec = getattr(item, "callspec", None)
        if getattr(item, "module", None) is request.module and callspec is not None:
            case = (callspec.params["algorithm"], callspec.params["backend"])
            if case not in wanted:
                wanted.append(case)
    groups: dict[tuple[str, ...], list[tuple[str, str]]] = {}  # algorithms with the same extra overrides
    for algorithm, backend in wanted:
        groups.setdefault(tuple(PER_ALGORITHM[algorithm]), []).append((algorithm, backend))
    root = tmp_path_factory.mktemp("kill_resume")
    jobs, multiruns = {}, {}
    with ThreadPoolExecutor(max_workers=2) as pool:  # each job runs one process at a time
        for algorithm, backend in wanted:
            tmp = root / f"{algorithm}-{backend}"
            tmp.mkdir()
            kill_resume = pool.submit(_kill_and_resume, algorithm, backend, tmp)
            key = tuple(PER_ALGORITHM[algorithm])
            if key not in multiruns:
                cases = groups[key]
                sweep = root / "straight" / str(len(multiruns))
                algorithms, backends = list(dict.fromkeys(a for a, _ in cases)), list(dict.fromkeys(b for _, b in cases))
                multiruns[key] = (sweep, pool.submit(_multirun, algorithms, backends, sweep))
            sweep, straight = multiruns[key]
            jobs[algorithm, backend] = (tmp, kill_resume, sweep / f"{algorithm}-{backend}", straight)
        yield jobs
        for _, kill_resume, _, straight in jobs.values():
            kill_resume.cancel()
            straight.cancel()


def _case(runs, algorithm: str, backend: str) -> Case:
    """The finished runs of a case; fails unless the kill was real and both later runs succeeded."""
    tmp, kill_resume, straight_dir, straight = runs[algorithm, backend]
    killed, resumed = kill_resume.result()
    assert killed.returncode == -9, (
        f"the run was not killed (return code {killed.returncode} after {killed.attempts} attempts: "
        f"{killed.retried}):\n{killed.output[-3000:]}"
    )
    assert resumed is not None and resumed.returncode == 0, f"resume failed:\n{resumed.stdout[-2000:]}{resumed.stderr[-3000:]}"
    done = straight.result()
    assert done.returncode == 0, f"uninterrupted runs failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    return Case(killed, tmp / "run", straight_dir)


def _last_log_dir(run: Path) -> Path:
    versions = sorted((run / "logs").glob("version_*"), key=lambda p: int(p.name[len("version_"):]))
    assert versions, f"no logs/version_* under {run}"
    return versions[-1]


def _config(run: Path) -> dict:
    """The run's saved (resolved) config.yaml, with the run dir written as ``RUN``, without the tracker names
    (a multirun's job names its sweep; they name runs, they set nothing the training reads)."""
    config = yaml.safe_load((run / "config.yaml").read_text().replace(str(run), "RUN"))
    config.pop("tracking")
    return config


def _decision_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The CSV's header and its rows without the timing / wall-clock columns."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    keep = [c for c in header if "seconds" not in c and c not in ("time", "timestamp", "wall_time")]
    return header, [{c: row[c] for c in keep} for row in rows]


def _blocks(ledger: Ledger) -> list[tuple]:
    """Each block without its wall-clock ``time`` and the ``hash``/``prev_hash`` that cover it."""
    return [(b.index, b.round, b.winner, b.scores, b.digest) for b in ledger]


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize(("algorithm", "backend"), _cases())
def test_run_is_killed_and_resumes(runs, algorithm, backend):
    """The run dies of SIGKILL after a checkpoint, and the documented resume then succeeds from it."""
    case = _case(runs, algorithm, backend)
    assert case.killed.step is not None and case.killed.step > 0, "killed before its first checkpoint"
    assert (case.run / "logs" / "version_1").is_dir(), "the resumed run logs into the next version"
    assert sorted(p.name for p in (case.run / "checkpoints").iterdir()) == ["last.ckpt"]
    # the uninterrupted run (a job of a multirun) composed the same config, apart from its dir and the resume
    resumed, straight = (_config(run) for run in (case.run, case.straight))
    assert resumed.pop("ckpt_path") == "last" and straight.pop("ckpt_path") is None
    assert resumed == straight


@pytest.mark.parametrize(("algorithm", "backend"), _cases())
def test_kill_interrupts_training(runs, algorithm, backend):
    """The kill lands mid-run: the checkpoint the resume starts from is before the last optimizer step."""
    case = _case(runs, algorithm, backend)
    final = torch.load(case.straight / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert final == FINAL_STEP
    assert case.killed.step < final, (
        f"killed after the checkpoint at step {case.killed.step} of {final} (delay {case.killed.delay:.3f} s, "
        f"attempt {case.killed.attempts}): the resumed run had nothing left to train"
    )


@pytest.mark.parametrize(("algorithm", "backend"), _cases())
def test_same_final_weights(runs, algorithm, backend):
    """The killed-then-resumed run's final weights equal the uninterrupted run's, bit for bit."""
    case = _case(runs, algorithm, backend)
    a = torch.load(case.run / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(case.straight / "checkpoints" / "last.ckpt", weights_only=True)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert a["state_dict"].keys() == b["state_dict"].keys() and a["state_dict"]
    differing = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert differing == [], f"killed at step {case.killed.step}"


@pytest.mark.parametrize(("algorithm", "backend"), _cases())
def test_same_results_table(runs, algorithm, backend):
    """The algorithm's results CSV (the resumed run's last log version) has the uninterrupted run's decisions."""
    case = _case(runs, algorithm, backend)
    straight_dir, resumed_dir = _last_log_dir(case.straight), _last_log_dir(case.run)
    assert straight_dir.name == "version_0"
    written = {p.name for p in straight_dir.glob("*.csv")} - {"metrics.csv"}
    assert written == RESULTS_CSV[algorithm]
    for name in sorted(written):
        assert (resumed_dir / name).is_file(), f"{resumed_dir.name}/{name} missing"
        header, rows = _decision_rows(resumed_dir / name)
        expected_header, expected_rows = _decision_rows(straight_dir / name)
        assert header == expected_header, name
        assert rows, f"{name} is empty"
        assert len(rows) == len(expected_rows), name
        for i, (row, expected) in enumerate(zip(rows, expected_rows)):
            assert row == expected, f"{name} row {i} (killed at step {case.killed.step})"


@pytest.mark.parametrize(("algorithm", "backend"), [pytest.param("pofl", b, id=f"pofl-{b}") for b in BACKENDS])
def test_same_ledger(runs, algorithm, backend):
    """PoFL: the killed-then-resumed ledger verifies and holds the uninterrupted run's blocks, none twice."""
    case = _case(runs, algorithm, backend)
    with Ledger(case.run / "ledger.db", readonly=True) as resumed, Ledger(case.straight / "ledger.db", readonly=True) as straight:
        report = resumed.verify()
        assert report.ok, str(report)
        assert straight.verify().ok
        blocks, expected = _blocks(resumed), _blocks(straight)
        assert expected, "these settings must make blocks"
        assert len(blocks) == len(expected), f"{len(blocks)} blocks after the kill, {len(expected)} without one"
        assert blocks == expected
        rounds = [b[1] for b in blocks]
        assert len(set(rounds)) == len(rounds), f"a round was appended twice: {rounds}"
        for i in range(len(expected)):  # the digests cover the weights; the stored bytes load to the same tensors
            a, b = resumed.load(i), straight.load(i)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"block {i}"
    # the rounds table names exactly these blocks, in order
    _, rows = _decision_rows(_last_log_dir(case.run) / "pofl_rounds.csv")
    assert [int(r["block"]) for r in rows if r["block"] != ""] == list(range(len(expected)))


@pytest.mark.parametrize(("algorithm", "backend"), _cases())
def test_no_half_written_files(runs, algorithm, backend):
    """No ``*.tmp`` file is left anywhere under the killed-then-resumed run dir (nor the uninterrupted one)."""
    case = _case(runs, algorithm, backend)
    for run in (case.run, case.straight):
        assert sorted(str(p.relative_to(run)) for p in run.rglob("*.tmp")) == []
