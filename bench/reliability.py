"""Reliability: faults injected into real runs and files, and what happened to each.

Faults (each row: fault, what happened, outcome):

* **kills**: a ``colearn`` run (every algorithm, both cohort backends) that
  checkpoints after every step (``checkpoint_every_n_steps=1``) is killed with
  SIGKILL at a random point after its first checkpoint (so at a random step,
  mostly inside an epoch and a round), then resumed with ``ckpt_path=last``. *recovered* if its final weights equal an uninterrupted
  run's bit for bit (``OMP_NUM_THREADS=1`` everywhere) and, for PoFL, its
  ledger verifies with the same block digests; else *lost*.
* **corrupt or hostile files**: a truncated, tampered, NaN-holding or pickled
  cohort file (``Cohort.load``), a truncated checkpoint to resume from, a
  ledger with a changed score. *rejected* if refused with a message and the
  target is unchanged; else *lost*.
* **NaN members**: a voting proposal, a FedAvg client and a member state with
  NaN weights. *rejected* if the NaN never reaches another member.
* **bad configs**: one-line ``colearn`` errors for bad values.
* **DDP exits**: ``--ddp-runs`` CLI runs with ``trainer.strategy=ddp_spawn`` and as many
  under ``torchrun`` (``trainer.strategy=ddp``), 2 processes each, cycling swarm, voting and
  PoFL; two CPU-burning processes run beside every other one. *ok* if the command exits 0
  with its ``results.json``; else *lost*.
* **two writers and full disks**: a second process appends to a ledger under a writer's
  proposed block; a ledger append and a checkpoint on a full (tmpfs) disk; a run dir on a
  read-only mount. *rejected* if refused with a message naming what happened, with every
  earlier block and the last good checkpoint intact.

Then RSS per round for the big cohorts (64 logistic regressions through 50
FedAvg rounds, 16 ConvNets voting for 12 rounds; stacked backend).

Every outcome must read "recovered" or "rejected"; nothing "lost".

Run: ``.venv/bin/python bench/reliability.py`` (about 4 minutes on 2 cores;
``--algorithms voting pofl --backends loop`` for a shorter run).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import lightning as L
import torch

from lightning_colearn import Cohort, CohortDataModule, CohortModule, CollectiveVoting, FederatedAveraging, Ledger
from lightning_colearn.models import ConvNet, LogisticRegression, MLP

COLEARN = Path(sys.executable).with_name("colearn")
ALGORITHMS = {  # small runs with several epochs, so a kill lands mid-run
    "independent": ["algorithm=independent"],
    "swarm": ["algorithm=swarm", "cohort.size=4", "algorithm.callbacks.swarm.every_n_steps=2",
              "algorithm.callbacks.swarm.n_particles=3"],
    "mutual": ["algorithm=mutual", "cohort.size=3"],
    "voting": ["algorithm=voting", "cohort.size=4"],
    "fedavg": ["algorithm=fedavg", "cohort.size=8", "algorithm.clients_per_round=4"],
    "pofl": ["algorithm=pofl", "cohort.size=8", "algorithm.miners=2", "algorithm.clients_per_round=4",
             "algorithm.threshold=0.0"],
}
COMMON = ["trainer=debug", "trainer.max_epochs=6", "++trainer.limit_train_batches=6", "plots=false", "test=false",
          "data.batch_size=32", "data.eval_batch_size=200", "logger=none", "checkpoint_every_n_steps=1"]
STEPS_PER_EPOCH = 6


def _colearn(args: list[str], wait: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    if wait:
        return subprocess.run([str(COLEARN), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=600)
    return subprocess.Popen([str(COLEARN), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def _ledger_digests(run: Path) -> list[str] | None:
    path = run / "ledger.db"
    if not path.exists():
        return None
    ledger = Ledger(path, readonly=True)
    try:
        if not ledger.verify():
            return ["<verify failed>"]
        return [ledger.block(i).digest for i in range(len(ledger))]
    finally:
        ledger.close()


def kill_and_resume(algorithm: str, backend: str, root: Path, seed: int) -> tuple[str, str]:
    overrides = [*ALGORITHMS[algorithm], *COMMON, f"cohort.backend={backend}"]
    straight, killed = root / f"{algorithm}-{backend}-straight", root / f"{algorithm}-{backend}-killed"
    _colearn([*overrides, f"hydra.run.dir={straight}"])
    rng = random.Random(seed)
    for attempt in range(4):  # a run that finished before the kill is retried with a shorter delay
        proc = _colearn([*overrides, f"hydra.run.dir={killed}"], wait=False)
        deadline = time.time() + 300
        while not (killed / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4) / (attempt + 1))
        proc.kill()
        if proc.wait() == -9:
            break
    else:
        return "never killed mid-run (finished first)", "lost"
    step = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    resumed = _colearn([*overrides, "ckpt_path=last", f"hydra.run.dir={killed}"])
    if resumed.returncode != 0:
        return f"resume failed: {resumed.stderr.strip().splitlines()[-1]}", "lost"
    a, b = _weights(straight), _weights(killed)
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    chains = _ledger_digests(straight), _ledger_digests(killed)
    tmp_left = list(killed.glob("**/*.tmp"))
    where = "inside an epoch" if step % STEPS_PER_EPOCH else "at an epoch's end"
    what = f"killed (SIGKILL) after step {step} ({where}), resumed: " + ("same weights" if same else "weights differ")
    if chains[0] is not None:
        what += f", ledger {'same' if chains[0] == chains[1] else 'DIFFERENT'} ({len(chains[1] or [])} blocks, verified)"
    if tmp_left:
        what += f", {len(tmp_left)} half-written files"
    ok = same and chains[0] == chains[1] and not tmp_left
    return what, "recovered" if ok else "lost"


# ------------------------------------------------------------------ files
def _states(cohort: Cohort) -> list[dict[str, torch.Tensor]]:
    return [cohort.member_state(i) for i in range(len(cohort))]


def _unchanged(before, cohort) -> bool:
    return all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(before, _states(cohort)))


def file_faults(root: Path) -> list[tuple[str, str, str]]:
    from safetensors.torch import load_file, save_file

    rows = []
    torch.manual_seed(0)
    source, target = Cohort(MLP, size=3), Cohort(MLP, size=3, backend="stacked")
    path = root / "cohort.safetensors"

    def attempt(name: str, prepare, **load_kwargs) -> None:
        sha = source.save(path)
        prepare(sha)
        before = _states(target)
        try:
            target.load(path, **load_kwargs)
            rows.append((name, "loaded", "lost"))
        except ValueError as err:
            rows.append((name, str(err).split(";")[0][:90], "rejected" if _unchanged(before, target) else "lost"))

    def truncate(_):
        path.write_bytes(path.read_bytes()[:-200])

    def tamper_nan(_):
        t = load_file(str(path))
        t["1.fc1.weight"][0, 0] = math.nan
        save_file(t, str(path), metadata={"format": "lightning_colearn.cohort/1", "members": "3"})
        Path(f"{path}.sha256").unlink()

    def tamper_value(_):
        t = load_file(str(path))
        t["0.fc2.bias"] += 1
        save_file(t, str(path), metadata={"format": "lightning_colearn.cohort/1", "members": "3"})

    def pickled(_):
        import pickle

        path.write_bytes(pickle.dumps({"fc1.weight": torch.zeros(1)}))
        Path(f"{path}.sha256").unlink()

    attempt("cohort file truncated", truncate)
    attempt("cohort file with NaN weights", tamper_nan)
    attempt("cohort file changed, digest kept apart", tamper_value)
    attempt("pickle instead of safetensors", pickled)

    # a ledger with one block's score changed behind its back
    ledger_path = root / "ledger.db"
    ledger = Ledger(ledger_path)
    for r in range(3):
        ledger.append(round=r, winner=0, scores=[0.5 + r / 10], weights=source.member_state(0))
    ledger.close()
    with sqlite3.connect(ledger_path) as conn:
        conn.execute("UPDATE blocks SET scores = '[0.99]' WHERE idx = 1")
    ledger = Ledger(ledger_path, readonly=True)
    report = ledger.verify()
    ledger.close()
    rows.append(("ledger block's score changed", str(report), "rejected" if not report and report.first_bad == 1 else "lost"))
    return rows


def checkpoint_fault(root: Path) -> tuple[str, str, str]:
    run = root / "ckpt-run"
    _colearn([*COMMON, "trainer.max_epochs=1", f"hydra.run.dir={run}"])
    last = run / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    proc = _colearn([*COMMON, "trainer.max_epochs=2", "ckpt_path=last", f"hydra.run.dir={run}"])
    message = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    ok = proc.returncode == 2 and message.startswith("colearn: error: ckpt_path") and last.read_bytes() == data[: len(data) // 2]
    return "checkpoint truncated, then resumed from", message[:90], "rejected" if ok else "lost"


# -------------------------------------------------------------- NaN members
def nan_faults() -> list[tuple[str, str, str]]:
    rows = []
    quiet = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                 enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)

    class Poison(L.Callback):  # member 0 goes NaN after its training
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if 0 in pl_module.stepped_members and batch_idx + 1 == trainer.num_training_batches:
                with torch.no_grad():
                    pl_module.cohort[0].fc1.weight.fill_(math.nan)

    L.seed_everything(0, verbose=False)
    module = CohortModule(MLP, size=4, optimizer=partial(torch.optim.SGD, lr=0.05))
    vote = CollectiveVoting(threshold=0.5, steps_per_round=2, vote_batches=1)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, callbacks=[Poison(), vote], **quiet)
    trainer.fit(module, datamodule=CohortDataModule(num_members=4, batch_size=32))
    record = vote.results[0]
    finite = all(torch.isfinite(t).all() for i in range(4) for t in module.cohort.member_state(i).values())
    rows.append(("voting proposal with NaN weights", f"accepted={record['accepted']}, reason: {record['reason']}",
                 "rejected" if not record["accepted"] and finite else "lost"))

    L.seed_everything(0, verbose=False)
    module = CohortModule(MLP, size=4, optimizer=partial(torch.optim.SGD, lr=0.05))
    fed = FederatedAveraging(clients_per_round=4)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, callbacks=[Poison(), fed], **quiet)
    trainer.fit(module, datamodule=CohortDataModule(num_members=4, batch_size=32))
    finite = all(torch.isfinite(t).all() for i in range(4) for t in module.cohort.member_state(i).values())
    rows.append(("FedAvg client with NaN weights", fed.history[0]["reason"], "rejected" if finite else "lost"))

    cohort = Cohort(MLP, size=2, backend="stacked")
    before = _states(cohort)
    bad = cohort.member_state(0)
    bad["fc2.bias"][3] = math.inf
    try:
        cohort.load_member_state(1, bad)
        rows.append(("member state with Inf loaded", "loaded", "lost"))
    except ValueError as err:
        rows.append(("member state with Inf loaded", str(err)[:90], "rejected" if _unchanged(before, cohort) else "lost"))
    return rows


# ------------------------------------------------------------- bad configs
BAD_CONFIGS = [["cohort.size=0"], ["optimizer.lr=nan"], ["seed=-1"], ["cohort.backend=gpu"], ["data.alpha=-1", "data.partition=dirichlet"],
               ["algorithm=swarm", "cohort.size=2"], ["trainer.max_epochs=0"]]


def config_faults(root: Path) -> list[tuple[str, str, str]]:
    rows = []
    for overrides in BAD_CONFIGS:
        run = root / f"bad-{len(rows)}"
        proc = _colearn([*overrides, *COMMON[:1], f"hydra.run.dir={run}"])
        lines = proc.stderr.strip().splitlines()
        one_line = proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("colearn: error:")
        rows.append((" ".join(overrides), lines[-1][:90] if lines else "", "rejected" if one_line else "lost"))
    return rows


# ------------------------------------------------------------------ memory
def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class _RoundRss(L.Callback):
    def __init__(self) -> None:
        self.rss: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        gc.collect()
        self.rss.append(rss_mib())


def big_cohorts() -> list[tuple[str, list[float]]]:
    quiet = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                 enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    out = []
    L.seed_everything(0, verbose=False)
    module = CohortModule(LogisticRegression, size=64, optimizer=partial(torch.optim.SGD, lr=0.05), backend="stacked")
    probe = _RoundRss()
    L.Trainer(max_epochs=50, callbacks=[FederatedAveraging(clients_per_round=16), probe], **quiet).fit(
        module, datamodule=CohortDataModule(num_members=64, batch_size=32))
    out.append(("64 x LR, FedAvg, 50 rounds", probe.rss))
    L.seed_everything(0, verbose=False)
    module = CohortModule(ConvNet, size=16, optimizer=partial(torch.optim.Adam, lr=1e-3), backend="stacked")
    probe = _RoundRss()
    L.Trainer(max_epochs=12, limit_train_batches=2, callbacks=[probe, CollectiveVoting(vote_batches=1, steps_per_round=2)],
              **quiet).fit(module, datamodule=CohortDataModule(num_members=16, batch_size=32))
    out.append(("16 x ConvNet, voting, 12 rounds", probe.rss))
    return out


# ------------------------------------------------------------------ DDP exits
DDP_ALGORITHMS = {
    "swarm": ["algorithm=swarm", "algorithm.callbacks.swarm.every_n_steps=2"],
    "voting": ["algorithm=voting"],
    "pofl": ["algorithm=pofl", "algorithm.threshold=0.0"],
}
DDP_COMMON = ["trainer=debug", "trainer.max_epochs=2", "trainer.devices=2", "trainer.accelerator=cpu", "plots=false",
              "logger=none", "data.batch_size=32", "data.eval_batch_size=200"]


def ddp_exits(root: Path, runs: int) -> list[tuple[str, str, str]]:
    """``runs`` CLI ddp_spawn runs and ``runs`` torchrun runs; every other one beside two CPU burners."""
    rows = []
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    for launcher in ("ddp_spawn", "torchrun"):
        for i in range(runs):
            name = list(DDP_ALGORITHMS)[i % len(DDP_ALGORITHMS)]
            run = root / f"ddp-{launcher}-{i}"
            if launcher == "ddp_spawn":
                cmd = [str(COLEARN), *DDP_ALGORITHMS[name], *DDP_COMMON, "trainer.strategy=ddp_spawn"]
            else:
                cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(COLEARN), *DDP_ALGORITHMS[name],
                       *DDP_COMMON, "trainer.strategy=ddp"]
            burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 if i % 2 else 0)]
            try:
                done = subprocess.run([*cmd, f"hydra.run.dir={run}"], env=env, capture_output=True, text=True, timeout=600)
            finally:
                for b in burners:
                    b.kill()
                    b.wait()
            has_results = (run / "results.json").is_file()
            load = ", beside 2 CPU burners" if burners else ""
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            what = f"exit {done.returncode}, results.json {'written' if has_results else 'MISSING'}{load}"
            ok = done.returncode == 0 and has_results
            rows.append((f"{launcher} {name} #{i}", what if ok else f"{what}: {tail}", "ok" if ok else "lost"))
    return rows


# ------------------------------------------------------------------ two writers, full disks
def _mount(path: Path, size_kib: int, readonly: bool = False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size_kib}k" + (",ro" if readonly else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


def writer_and_disk_faults(root: Path) -> list[tuple[str, str, str]]:
    from lightning_colearn.callbacks import CheckpointWriteError, EpochCheckpoint

    rows = []
    weights = lambda r: {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(r))}  # noqa: E731
    # a second writer process appends while this one holds a proposed block
    path = root / "two-writers.db"
    with Ledger(path) as ledger:
        ledger.append(round=0, winner=0, scores=[0.5], weights=weights(0))
        block, data = ledger.propose(round=1, winner=0, scores=[0.6], weights=weights(1))
        other = (f"import torch\nfrom lightning_colearn import Ledger\nwith Ledger({str(path)!r}) as l:\n"
                 "    l.append(round=7, winner=0, scores=[0.9], weights={'w': torch.zeros(64, 64)})")
        subprocess.run([sys.executable, "-c", other], check=True, timeout=120)
        try:
            ledger.commit(block, data)
            what, outcome = "both blocks written", "lost"
        except Exception as err:  # noqa: BLE001 - the row reports whatever happened
            what = f"{type(err).__name__}: {str(err)[:90]}..."
            outcome = "rejected"
    with Ledger(path, readonly=True) as ledger:
        if not (ledger.verify() and len(ledger) == 2):
            outcome = "lost"
    rows.append(("ledger: a second writer process", what, outcome))

    mounts = []
    try:
        disk = root / "full-disk"
        if _mount(disk, 256):
            mounts.append(disk)
            stored, what = 0, "the disk never filled"
            with Ledger(disk / "ledger.db") as ledger:
                try:
                    for r in range(100):
                        ledger.append(round=r, winner=0, scores=[0.5], weights=weights(r))
                        stored += 1
                except Exception as err:  # noqa: BLE001
                    what = f"{type(err).__name__} after {stored} blocks: {str(err)[-40:]}"
            with Ledger(disk / "ledger.db", readonly=True) as ledger:
                intact = bool(ledger.verify()) and len(ledger) == stored
            rows.append(("ledger: disk full during an append", what + (", chain intact" if intact else ", CHAIN DAMAGED"),
                         "rejected" if intact and stored < 100 else "lost"))

            probe = root / "probe"
            _fit_epochs(probe, 1, EpochCheckpoint)
            size = (probe / "last.ckpt").stat().st_size
            small = root / "small-disk"
            if _mount(small, (size * 3 // 2) // 1024 + 4):
                mounts.append(small)
                try:
                    _fit_epochs(small, 3, EpochCheckpoint)
                    what, outcome = "no error", "lost"
                except CheckpointWriteError as err:
                    kept = torch.load(small / "last.ckpt", map_location="cpu", weights_only=True)
                    intact = kept["epoch"] == 0 and not list(small.glob("*.tmp"))
                    what = f"CheckpointWriteError ({err.__cause__.strerror}); epoch 0's checkpoint " + ("intact" if intact else "DAMAGED")
                    outcome = "rejected" if intact else "lost"
                rows.append(("checkpoint: disk full", what, outcome))
            ro = root / "read-only"
            if _mount(ro, 64, readonly=True):
                mounts.append(ro)
                done = _colearn(["trainer=debug", f"hydra.run.dir={ro / 'run'}"])
                line = done.stderr.strip()
                rows.append(("run dir on a read-only mount", f"exit {done.returncode}: {line[:100]}",
                             "rejected" if done.returncode == 2 and "not writable" in line else "lost"))
        else:
            rows.append(("full disk / read-only mount", "cannot mount tmpfs here (needs root): not measured", "skipped"))
    finally:
        for m in reversed(mounts):
            subprocess.run(["umount", str(m)], capture_output=True)
    return rows


def _fit_epochs(dirpath: Path, epochs: int, checkpoint_cls) -> None:
    module = CohortModule(lambda: MLP(hidden=16), size=2, num_classes=10)
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[checkpoint_cls(dirpath)])
    trainer.fit(module, datamodule=CohortDataModule(num_members=2, batch_size=32, max_train_samples=128, seed=0))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--backends", nargs="+", default=["loop", "stacked"], choices=["loop", "stacked"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ddp-runs", type=int, default=20, help="CLI ddp_spawn runs, and as many torchrun runs")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        jobs = [(a, b) for a in args.algorithms for b in args.backends]
        with ThreadPoolExecutor(max_workers=2) as pool:  # two processes at a time on 2 cores
            results = list(pool.map(lambda ab: kill_and_resume(ab[0], ab[1], root, args.seed), jobs))
        rows += [(f"kill {a} ({b})", what, outcome) for (a, b), (what, outcome) in zip(jobs, results)]
        rows += file_faults(root)
        rows.append(checkpoint_fault(root))
        rows += nan_faults()
        rows += [(f"config {o}", w, r) for o, w, r in config_faults(root)]
        rows += writer_and_disk_faults(root)
        rows += ddp_exits(root, args.ddp_runs)
    width = max(len(r[0]) for r in rows)
    print(f"{'fault':{width}}  {'outcome':9}  what happened")
    for fault, what, outcome in rows:
        print(f"{fault:{width}}  {outcome:9}  {what}")
    lost = [r for r in rows if r[2] == "lost"]
    print(f"\n{len(rows)} rows: {sum(r[2] == 'recovered' for r in rows)} recovered, "
          f"{sum(r[2] == 'rejected' for r in rows)} rejected, {sum(r[2] == 'ok' for r in rows)} ok, {len(lost)} lost")
    print("\nRSS per round (MiB), stacked backend:")
    for name, rss in big_cohorts():
        marks = {1: rss[0], 10: rss[9], len(rss) // 2: rss[len(rss) // 2 - 1], len(rss): rss[-1]}
        print(f"  {name}: " + ", ".join(f"round {k}: {v:.0f}" for k, v in sorted(marks.items()))
              + f"; growth after round 5: {max(rss[5:]) - rss[4]:+.1f} MiB")
    if lost:
        sys.exit(1)


if __name__ == "__main__":
    main()
