"""Benchmark: PopulationBasedTraining on Fashion-MNIST, against fixed random hyperparameters and Ray Tune's PBT.

A population of 16 MLPs (``lightning_colearn.models.MLP``, 784-128-10) trains ``E`` = 8 epochs each with
SGD (batch 64) on the same 12,000 Fashion-MNIST training images; ``lr``, ``weight_decay`` and ``momentum``
are explored in :data:`SPACE`. Three ways to spend the same budget (``E`` epochs per member, same space):

* **PBT (ours)**: ``CohortModule(MLP, size=16, backend="stacked")`` with ``PopulationBasedTraining(SPACE,
  interval=1, quantile_fraction=0.25, resample_probability=0.25)``: after every epoch but the last, the
  bottom quarter copies a random member of the top quarter (weights and optimizer state) and perturbs its
  hyperparameters (x0.8 / x1.2, or a fresh draw with probability 0.25, clipped to the space).
* **fixed (same samples)**: the same cohort, the same initial weights and the same 16 hyperparameter
  samples (``PopulationBasedTraining(SPACE, interval=10**9)`` with the same seed: it samples, never
  exploits): 16 independent members with fixed random hyperparameters.
* **Ray Tune PBT**: ``ray.tune.Tuner`` with ``tune.schedulers.PopulationBasedTraining(time_attr=
  "training_iteration", perturbation_interval=1, quantile_fraction=0.25, resample_probability=0.25)``
  (asynchronous, Ray's default), 16 trials (``num_samples=16``, started from the same 16 samples through
  ``BasicVariantGenerator(points_to_evaluate=...)``), the same space as ``tune.loguniform`` /
  ``tune.uniform`` mutations (clipped to its bounds by a ``custom_explore_fn``, as ours clips; Ray does not
  clip on its own, and a momentum above 1 diverges). Each trial is a function trainable: the same MLP, a
  plain PyTorch loop over the same tensors (loaded once in the driver, passed with
  ``tune.with_parameters``), one ``tune.report`` per epoch with a ``tune.Checkpoint`` (model and optimizer
  state) that ``tune.get_checkpoint()`` restores after an exploit; ``stop={"training_iteration": E}``.
  ``ray.init(num_cpus=2)``, 1 CPU and 1 torch thread per trial, so 2 trials run at a time and Ray pauses
  and resumes the others from their checkpoints; ``TuneConfig(reuse_actors=True)``, as Ray's own warning
  recommends for PBT: with Ray's default (``--ray-default-actors``) every resume starts a new actor
  process, and the same run took 661 s instead of about 30 s. The storage is a temporary directory.

Data: the training images and a validation split of 5,000 other images are drawn (seed 0, the same for
every run) from the 60,000 Fashion-MNIST training images; **every PBT ranks its members by accuracy on
the validation split** (ours: the datamodule's shared evaluation set, logged as ``val_acc/member_i``;
Ray: the ``acc`` each trial reports). **Accuracies in the table are on the 10,000 Fashion-MNIST test
images**, which no method sees while training: "best" is the test accuracy of the member (trial) with
the best final validation accuracy, "mean" the mean test accuracy of all 16. Neither PBT decides after
the last epoch (ours skips the run's last step; Ray stops its trials at epoch ``E`` before its
scheduler sees that result), so no member ends as an untrained copy of another.

Wall time: ours, from building the Trainer to the end of the test evaluation (fit, 16 members in one
stacked computation, torch's default threads: 2 here); Ray, ``Tuner.fit()`` from start to end
(``ray.init`` is printed apart). Printed under each table: the CPU share other processes took during
each run (Ray's own processes count as the run's). On a 2-core machine other jobs hurt ours most (its
2 threads wait for each other: at about 50 % other load the same fit took 146 s instead of 16 s; Ray's
one-thread trials barely slowed), so time on an idle machine. Targets: PBT's best member beats the
best fixed member; ours is >= 10x faster than Ray Tune with equal or better accuracy (best acc not
lower than Ray's by more than ``ACC_TOLERANCE``, 0.5 points: one seed's noise on 10,000 test images is
about 0.3 points; the difference is printed).

Run from ``bench/``: ``/tmp/ray-venv/bin/python pbt.py`` (a Python with ``ray[tune]``: ``pip install
'.[bench]'``, or, as here, a venv of its own that sees this one's packages; about 1.5 minutes
on an idle 2-core CPU, 12 more with ``--ray-default-actors``); ``--no-ray`` skips Ray (also skipped,
with a line saying so, when ``ray`` is not importable); ``--quick`` for a smoke test (4 members, 2
epochs, 2,000 images, no Ray unless ``--ray``) in well under 30 s; ``--seeds 0 1 2`` for more seeds
(one table per seed, then the means, which the targets are judged on); ``--epochs``, ``--train-samples``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, replace
from functools import partial
from typing import Self

import lightning as L
import torch
import torch.nn.functional as F

from common import machine_busy_ticks, quiet_lightning  # bench/common.py (scripts run from bench/)
from lightning_colearn import CohortDataModule, CohortModule, PopulationBasedTraining
from lightning_colearn.data.datasets import preset
from lightning_colearn.models import MLP

SPACE = {
    "lr": {"type": "loguniform", "low": 1e-3, "high": 0.5},
    "weight_decay": {"type": "loguniform", "low": 1e-6, "high": 1e-2},
    "momentum": {"type": "uniform", "low": 0.0, "high": 0.95},
}
QUANTILE, RESAMPLE = 0.25, 0.25
BATCH, EVAL_BATCH = 64, 1000
DATA_SEED = 0  # the train / validation draw, the same for every seed
ACC_TOLERANCE = 0.005
SPEEDUP_TARGET = 10.0


@dataclass(frozen=True)
class Settings:
    """Every size the benchmark uses; :data:`FULL` and :data:`QUICK`."""

    members: int = 16
    epochs: int = 8
    train: int = 12_000
    val: int = 5_000
    ray: bool = True


FULL = Settings()
QUICK = Settings(members=4, epochs=2, train=2_000, val=1_000, ray=False)


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Data:
    """Normalised ``[N, 1, 28, 28]`` images and labels: training, validation (PBT ranks on it), test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(train: int, val: int) -> Data:
    """``train`` and ``val`` disjoint images drawn from the Fashion-MNIST training set; the 10,000 test images."""
    train_set, test_set = preset("fashion_mnist")  # /usr/share/datasets/fashion-mnist (or $COLEARN_DATA)
    order = torch.randperm(len(train_set.labels), generator=torch.Generator().manual_seed(DATA_SEED))
    tr, va = order[:train].sort().values, order[train:train + val].sort().values
    x, y = train_set.inputs, train_set.labels
    return Data(x[tr].contiguous(), y[tr].contiguous(), x[va].contiguous(), y[va].contiguous(),
                test_set.inputs.contiguous(), test_set.labels.contiguous())


@torch.no_grad()
def accuracy(outputs, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Accuracy of each model on ``(x, y)``; ``outputs(x_chunk)`` returns one logits tensor per model."""
    correct = None
    for start in range(0, len(y), EVAL_BATCH):
        chunk = slice(start, start + EVAL_BATCH)
        hits = torch.stack([(logits.argmax(-1) == y[chunk]).sum() for logits in outputs(x[chunk])])
        correct = hits if correct is None else correct + hits
    return (correct.double() / len(y)).tolist()


class OtherLoad:
    """CPU time *other* processes used while a run went on, as a fraction of the machine's cores (Linux).

    Like ``cohort_throughput._ForeignLoad``; with ``children=True`` this process's descendants (Ray's
    raylet, GCS and workers) count as ours too: a thread reads their CPU times from ``/proc`` every
    ``interval`` seconds (a worker that ends is counted up to its last reading, so the share is at most
    slightly high). Other jobs on a small machine can slow a run down many times over.
    """

    def __init__(self, children: bool = False, interval: float = 0.5) -> None:
        self.children, self.interval = children, interval
        self.fraction: float | None = None

    def __enter__(self) -> Self:
        self._start = self._machine()
        self._first: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = None
        if self.children and self._start is not None:
            self._read_tree(initial=True)
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        self._own = os.times()
        return self

    def __exit__(self, *exc) -> None:
        times = os.times()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._read_tree()
        end = self._machine()
        if self._start is None or end is None:
            return
        ticks = os.sysconf("SC_CLK_TCK")
        own = times.user + times.system - self._own.user - self._own.system
        own += sum(self._last[pid] - self._first[pid] for pid in self._last) / ticks
        wall = end[1] - self._start[1]
        self.fraction = max(0.0, (end[0] - self._start[0]) / ticks - own) / (wall * (os.cpu_count() or 1))

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._read_tree()

    def _read_tree(self, initial: bool = False) -> None:
        """The CPU ticks (user + system) of every descendant of this process, now (``initial``: the baselines)."""
        parents, cpu = {}, {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
                parents[int(entry)], cpu[int(entry)] = int(stat[1]), int(stat[11]) + int(stat[12])
            except (OSError, ValueError, IndexError):  # ended meanwhile
                continue
        me = os.getpid()
        for pid, up in parents.items():
            while up not in (0, 1, me) and up in parents:
                up = parents[up]
            if up == me and pid != me:
                self._first.setdefault(pid, cpu[pid] if initial else 0)  # a process born during the run: from 0
                self._last[pid] = cpu[pid]

    @staticmethod
    def _machine() -> tuple[int, float] | None:
        busy = machine_busy_ticks()
        return None if busy is None else (busy, time.perf_counter())


# ---------------------------------------------------------------------------------------------- ours
@dataclass
class Result:
    test: list[float]  # each member's (trial's) test accuracy
    val: list[float]  # each member's final validation accuracy (what picks the best)
    seconds: float
    load: float | None  # the CPU share other processes took meanwhile (OtherLoad)
    exploits: int | None = None
    values: list[dict] | None = None  # the members' initial hyperparameters (fixed run)

    @property
    def best(self) -> float:
        """The test accuracy of the member with the best validation accuracy (ties: the first)."""
        return self.test[max(range(len(self.val)), key=lambda i: (self.val[i], -i))]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.test)


def run_ours(s: Settings, data: Data, seed: int, explore: bool) -> Result:
    """The cohort with PBT (``explore``) or with the same samples fixed (a PBT that never decides)."""
    L.seed_everything(seed, verbose=False)
    dm = CohortDataModule.from_tensors(
        data.x_train, data.y_train, test=(data.x_val, data.y_val), num_members=s.members, stream="shared",
        splits=(1.0, 0.0, 0.0), batch_size=BATCH, eval_batch_size=EVAL_BATCH, seed=seed)
    pbt = PopulationBasedTraining(SPACE, interval=1 if explore else 10**9, unit="epoch", monitor="val_acc", mode="max",
                                  quantile_fraction=QUANTILE, resample_probability=RESAMPLE, seed=seed)
    module = CohortModule(MLP, size=s.members, optimizer=partial(torch.optim.SGD, lr=0.1), backend="stacked")
    with OtherLoad() as load:
        start = time.perf_counter()
        trainer = L.Trainer(accelerator="cpu", max_epochs=s.epochs, callbacks=[pbt], logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0)
        trainer.fit(module, datamodule=dm)
        module.eval()
        test = accuracy(module.member_outputs, data.x_test, data.y_test)
        seconds = time.perf_counter() - start
    val = [float(trainer.callback_metrics[f"val_acc/member_{i}"]) for i in range(s.members)]  # the last epoch's
    initial = pbt.initial_values  # the samples every member started from
    return Result(test, val, seconds, load.fraction, exploits=len(pbt.lineage), values=initial)


# ----------------------------------------------------------------------------------------------- Ray
def ray_trial(config: dict, data: Data = None) -> None:
    """One Ray Tune trial: the MLP, SGD, a plain loop; one report (and checkpoint) per epoch."""
    from ray import tune

    torch.set_num_threads(1)
    epochs = config["epochs"]
    torch.manual_seed(config["init_seed"])
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                          weight_decay=config["weight_decay"])
    epoch = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint:  # a restart, or an exploit: another trial's weights and optimizer state
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, "state.pt"), weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        epoch = state["epoch"]
    for group in opt.param_groups:  # the (perturbed) config wins over the restored optimizer's values
        group.update(lr=config["lr"], momentum=config["momentum"], weight_decay=config["weight_decay"])
    trial = zlib.crc32(tune.get_context().get_trial_id().encode())
    n = len(data.y_train)
    while epoch < epochs:
        shuffle = torch.Generator().manual_seed(config["init_seed"] * 1_000_003 + trial * 101 + epoch)
        order = torch.randperm(n, generator=shuffle)
        model.train()
        for start in range(0, n, BATCH):
            idx = order[start:start + BATCH]
            opt.zero_grad()
            F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
        epoch += 1
        model.eval()
        metrics = {"acc": accuracy(lambda x: [model(x)], data.x_val, data.y_val)[0], "epoch": epoch,
                   **{name: opt.param_groups[0][name] for name in SPACE}}
        if epoch == epochs:
            metrics["test_acc"] = accuracy(lambda x: [model(x)], data.x_test, data.y_test)[0]
        with tempfile.TemporaryDirectory() as folder:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch},
                       os.path.join(folder, "state.pt"))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def run_ray(s: Settings, data: Data, seed: int, initial: list[dict], reuse_actors: bool = True) -> tuple[Result, float]:
    """Ray Tune's PBT over 16 trials started from ``initial``; returns the result and ``ray.init``'s seconds."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0, no experiment box on stdout
    import ray
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining as RayPBT
    from ray.tune.search.basic_variant import BasicVariantGenerator

    bounds = {name: (spec["low"], spec["high"]) for name, spec in SPACE.items()}
    domains = {name: (tune.loguniform if spec["type"] == "loguniform" else tune.uniform)(spec["low"], spec["high"])
               for name, spec in SPACE.items()}

    def clip(config: dict) -> dict:  # the same bounds as ours (Ray multiplies by 0.8 / 1.2 without clipping)
        for name, (low, high) in bounds.items():
            config[name] = min(max(config[name], low), high)
        return config

    storage = tempfile.mkdtemp(prefix="colearn-pbt-ray-")
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    init_seconds = time.perf_counter() - start
    try:
        random.seed(seed)  # Ray's PBT draws its decisions from Python's random
        scheduler = RayPBT(time_attr="training_iteration", perturbation_interval=1, hyperparam_mutations=domains,
                           quantile_fraction=QUANTILE, resample_probability=RESAMPLE, custom_explore_fn=clip)
        points = [{**values, "init_seed": seed * 1000 + i} for i, values in enumerate(initial)]
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(ray_trial, data=data), {"cpu": 1}),
            param_space={**domains, "init_seed": seed * 1000, "epochs": s.epochs},
            tune_config=tune.TuneConfig(
                metric="acc", mode="max", num_samples=s.members, scheduler=scheduler, reuse_actors=reuse_actors,
                search_alg=BasicVariantGenerator(points_to_evaluate=points, random_state=seed)),
            run_config=tune.RunConfig(
                name="pbt", storage_path=storage, stop={"training_iteration": s.epochs}, verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=4, checkpoint_score_attribute="acc")),
        )
        with OtherLoad(children=True) as load:
            start = time.perf_counter()
            results = tuner.fit()
            seconds = time.perf_counter() - start
        errors = [str(r.error) for r in results if r.error is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} Ray trial(s) failed; first: {errors[0][-2000:]}")
        finals = [r.metrics for r in results]
        short = [m.get("epoch") for m in finals if m.get("epoch") != s.epochs or "test_acc" not in m]
        if short:
            raise RuntimeError(f"Ray trials ended before epoch {s.epochs}: {short}")
        exploits = getattr(scheduler, "_num_perturbations", None)  # the scheduler's own count (a private field)
        result = Result([m["test_acc"] for m in finals], [m["acc"] for m in finals], seconds, load.fraction, exploits)
        return result, init_seconds
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)


def ray_available() -> str | None:
    """``None`` if ``ray[tune]`` imports, else why not."""
    try:
        import ray  # noqa: F401
        from ray import tune  # noqa: F401
    except ImportError as err:
        return str(err)
    return None


# ---------------------------------------------------------------------------------------------- main
def table(rows: dict[str, tuple[float, float, float]]) -> None:
    """``{method: (best acc, mean acc, wall seconds)}``, ours first, as markdown; "vs ours": wall time / ours'."""
    ours = next(iter(rows.values()))[2]
    print("| method | best acc | mean acc | wall s | vs ours |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (best, mean, seconds) in rows.items():
        print(f"| {name} | {best:.4f} | {mean:.4f} | {seconds:.1f} | {seconds / ours:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, no Ray unless --ray (a smoke test, < 30 s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default 0); targets on the means")
    parser.add_argument("--no-ray", action="store_true", help="skip Ray Tune")
    parser.add_argument("--ray", action="store_true", help="run Ray Tune with --quick too")
    parser.add_argument("--ray-default-actors", action="store_true",
                        help="Ray with its default reuse_actors=False (a new actor process per trial resume; slow)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per member (default 8; --quick 2)")
    parser.add_argument("--train-samples", type=int, default=None,
                        help="training images (default 12,000; --quick 2,000)")
    args = parser.parse_args()
    s = QUICK if args.quick else FULL
    s = replace(s, ray=(s.ray or args.ray) and not args.no_ray)
    if args.epochs is not None:
        s = replace(s, epochs=args.epochs)
    if args.train_samples is not None:
        s = replace(s, train=args.train_samples)
    if s.epochs < 1 or s.train < s.members:
        parser.error(f"need --epochs >= 1 and --train-samples >= {s.members}")
    quiet_lightning()
    why_not = ray_available() if s.ray else None
    if why_not is not None:
        print(f"Ray Tune is not importable here ({why_not}): skipping the Ray Tune comparison "
              "(run with /tmp/ray-venv/bin/python, or a Python with ray[tune])")
        s = replace(s, ray=False)
    ray_version = ""
    if s.ray:
        import ray

        ray_version = f", ray {ray.__version__}"
    print(f"`{' '.join(['python pbt.py', *sys.argv[1:]])}`: torch {torch.__version__}{ray_version}, "
          f"threads {torch.get_num_threads()}, seeds {args.seeds}{', QUICK sizes' if args.quick else ''}")
    print(f"settings: {s.members} MLPs (784-128-10), SGD, batch {BATCH}, {s.epochs} epochs each; Fashion-MNIST: "
          f"{s.train:,} training images, {s.val:,} validation images (PBT ranks on them), "
          "10,000 test images (reported)")
    print(f"space: {SPACE}; PBT every epoch, quantile {QUANTILE}, resample probability {RESAMPLE}, factors 0.8 / 1.2")
    start = time.perf_counter()
    data = load_data(s.train, s.val)
    runs: list[dict[str, Result]] = []
    for seed in args.seeds:
        fixed = run_ours(s, data, seed, explore=False)
        ours = run_ours(s, data, seed, explore=True)
        run = {"PBT (ours)": ours, "fixed (same samples)": fixed}
        notes = [f"ours: {ours.exploits} exploits"]
        if s.ray:
            run["Ray Tune PBT"], init_seconds = run_ray(s, data, seed, fixed.values, not args.ray_default_actors)
            notes.append(f"Ray: {run['Ray Tune PBT'].exploits} exploits, reuse_actors={not args.ray_default_actors}, "
                         f"ray.init {init_seconds:.1f} s (not in its wall time)")
        runs.append(run)
        print(f"\nseed {seed} ({'; '.join(notes)}):\n")
        rows = {name: (r.best, r.mean, r.seconds) for name, r in run.items()}
        table(rows)
        loads = ", ".join(f"{name} {100 * r.load:.0f} %" for name, r in run.items() if r.load is not None)
        if loads:
            print(f"\nCPU share other processes took during each run (of {os.cpu_count()} cores): {loads}")
    if len(runs) > 1:
        print(f"\nmean over seeds {args.seeds}:\n")
        keys = ("best", "mean", "seconds")
        rows = {name: tuple(statistics.fmean(getattr(r[name], key) for r in runs) for key in keys)
                for name in runs[0]}
        table(rows)
    ours, fixed = rows["PBT (ours)"], rows["fixed (same samples)"]
    verdict = "PASS" if ours[0] > fixed[0] else "FAIL"
    print(f"\n{verdict}: PBT's best member {ours[0]:.4f} vs the best fixed member {fixed[0]:.4f} "
          f"({100 * (ours[0] - fixed[0]):+.2f} points; target: higher)")
    if "Ray Tune PBT" in rows:
        theirs = rows["Ray Tune PBT"]
        speedup, gap = theirs[2] / ours[2], ours[0] - theirs[0]
        verdict = "PASS" if speedup >= SPEEDUP_TARGET and gap >= -ACC_TOLERANCE else "FAIL"
        print(f"{verdict}: ours {speedup:.1f}x faster than Ray Tune (target >= {SPEEDUP_TARGET:.0f}x), best acc "
              f"{ours[0]:.4f} vs {theirs[0]:.4f} ({100 * gap:+.2f} points; target >= {-100 * ACC_TOLERANCE:.1f}), "
              f"mean acc {ours[1]:.4f} vs {theirs[1]:.4f}")
    else:
        print("(Ray Tune skipped: no speed / accuracy comparison with it)")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
