"""Vectorised cohorts: the stacked backend against the loop backend and a plain PyTorch loop.

What it measures
    member-samples per second (``N * 64 * steps / seconds``) of training N
    members (SGD, lr 0.01, batch 64 per member, per-member IID streams of the
    Fashion-MNIST training set, or the embedded ``mnist_small`` without it) for logistic regression, the 784-128-10 MLP and
    Nytorch's ConvNet at N = 1, 4, 12, 48:

    * **loop**: ``CohortModule(model, size=N, backend="loop")`` in a real Trainer;
    * **stacked**: the same with ``backend="stacked"``;
    * **plain**: the reference, a plain PyTorch loop over N models with one
      ``torch.optim.SGD`` each (forward, loss, backward, step per member).

    All three read the same ``CombinedLoader``, so data loading costs the same;
    the Trainer sides include Lightning's per-step overhead. Each side runs
    ``--warmup`` steps, then ``--steps`` timed steps (timed from the end of the
    last warm-up step to the end of the last timed step); the three are
    interleaved ``--repeats`` times with fresh models. Rates are the medians
    over repeats; the ratios are the medians of each repeat's own ratio (its
    sides ran back to back), because this VM's speed drifts by up to 2x over
    minutes and a ratio of medians taken at different moments mixes the drift in.

    Peak memory: each (model, N, side) also runs alone in a fresh subprocess
    for a few steps; the largest RSS seen after a training step minus the RSS
    it had before building the models (torch imported, data loaded) is the
    training memory. The subprocesses run with glibc's mmap threshold fixed at
    128 KiB (``MALLOC_MMAP_THRESHOLD_``): by default glibc raises the threshold
    after the first large free, so a stacked ``[N, ...]`` gradient freed and
    reallocated each step lands on the heap and the RSS keeps the old one too
    (measured: MLP, N = 48, +18 MiB, the gradient's size, on the second step
    only, although no tensor holds it). With the fixed threshold every tensor
    over 128 KiB is mapped when allocated and unmapped when freed, so the RSS
    follows the live tensors on both sides alike. Printed per member two ways:
    the total divided by N, and the marginal cost of one more member (the
    slope from the previous N), which leaves out what a process pays once
    (MKL's GEMM buffers, Lightning's Trainer); each for the whole RSS and for
    its anonymous part (heap, tensors). The rest of the RSS is file-backed,
    mostly libtorch's code: the first call of a kernel maps its pages (the
    first ``torch.stack`` in a process: 1.1 MiB), shared with every process
    and dropped under memory pressure, and the stacked side calls kernels the
    loop never does. Logistic regression's stacked side also keeps its
    members' original parameters as free heap blocks (31 KiB each, under the
    mmap threshold, so glibc does not return them when the stacked tensors
    replace them): 0.37 MiB at N = 12.

    Per-step floor (skip with ``--no-floor``): what a Trainer step costs with
    nothing to train (a LightningModule whose step calls ``manual_backward``
    and the optimizer on one parameter, on the same loader: Lightning's loop,
    its backward and optimizer hooks, and the data loading), and one
    stacked step outside Lightning (forward, loss, backward, SGD step on
    batches loaded beforehand). Their sum is the
    fastest a stacked Trainer step can be, so ``plain / (floor + raw)`` is the
    highest stacked/plain ratio reachable through a Trainer on this machine.

Targets at N = 12 (stacked / plain): logistic regression >= 4x, MLP >= 1.5x,
ConvNet >= 1.0x; stacked memory per member no more than the loop's.

How to run (from the repository root, machine otherwise idle)::

    .venv/bin/python bench/vectorised.py                 # full table (~5 min on 2 cores)
    .venv/bin/python bench/vectorised.py --quick         # smoke run
    .venv/bin/python bench/vectorised.py --models lr --sizes 12 --repeats 5
    .venv/bin/python bench/vectorised.py --models colearn --sizes 5 12   # colearn's ConvNet (not in the default run)

Member subsets: a second table times a step of 1 and 6 active members out of 12 (stacked), with the
active rows gathered (what the backend does) against computing all 12 and masking the others out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F

from cohort_throughput import _batches, _StepTimer
from common import quiet_lightning  # bench/common.py (scripts run from bench/)
from lightning_colearn import CohortDataModule, CohortModule
from lightning_colearn.data.datasets import DEBIAN_FASHION_MNIST
from lightning_colearn import Cohort
from lightning_colearn.models import ColearnConvNet, ConvNet, LogisticRegression, MLP
from lightning_colearn.module import _stack_members
from lightning_colearn.optim import StackedOptimizer

MODELS = {"lr": LogisticRegression, "mlp": MLP, "convnet": ConvNet, "colearn": ColearnConvNet}
TARGETS = {"lr": 4.0, "mlp": 1.5, "convnet": 1.0, "colearn": 1.0}
BATCH, LR, TARGET_N = 64, 0.01, 12
MEMORY_KINDS = ("rss", "anon")  # the whole resident set and its anonymous part (see _memory_kib)


#: Fashion-MNIST's 60,000 training images when the Debian package is installed: with the embedded 4,000
#: (mnist_small), 48 members get 83 images each, and epoch boundaries every 2 steps would dominate the timing.
DATA = "fashion_mnist" if DEBIAN_FASHION_MNIST.is_dir() else "mnist_small"


def make_datamodule(n: int) -> CohortDataModule:
    root = DEBIAN_FASHION_MNIST if DATA == "fashion_mnist" else None
    return CohortDataModule(DATA, root=root, num_members=n, batch_size=BATCH, partition="iid", splits=(1.0, 0.0, 0.0))


class _RssPeak(L.Callback):
    """The largest RSS and anonymous RSS seen after any training step (KiB); ``ru_maxrss`` would also count data loading."""

    peak = {"rss": 0, "anon": 0}

    @classmethod
    def sample(cls) -> None:
        for key, value in _memory_kib().items():
            cls.peak[key] = max(cls.peak[key], value)

    def on_train_batch_end(self, *args) -> None:
        self.sample()


def run_trainer(model: str, n: int, backend: str, warmup: int, steps: int, seed: int = 0, dm: CohortDataModule | None = None) -> float:
    """Seconds for ``steps`` timed Trainer steps of a cohort on ``backend``."""
    L.seed_everything(seed, verbose=False)
    module = CohortModule(MODELS[model], size=n, optimizer=partial(torch.optim.SGD, lr=LR), backend=backend)
    timer = _StepTimer(warmup, steps)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, max_steps=warmup + steps,
        max_epochs=-1, callbacks=[timer, _RssPeak()],
    )
    gc.collect()
    trainer.fit(module, datamodule=dm or make_datamodule(n))
    if timer.t0 is None or timer.t1 is None:
        raise RuntimeError(f"timer missed steps {warmup} / {warmup + steps} (global_step={trainer.global_step})")
    return timer.t1 - timer.t0


def run_plain(model: str, n: int, warmup: int, steps: int, seed: int = 0, dm: CohortDataModule | None = None) -> float:
    """Seconds for ``steps`` timed steps of a plain PyTorch loop over N models."""
    L.seed_everything(seed, verbose=False)
    models = [MODELS[model]() for _ in range(n)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=LR) for m in models]
    dm = dm or make_datamodule(n)
    dm.setup("fit")
    batches = _batches(dm)

    def step(batch) -> None:
        for i, (m, opt) in enumerate(zip(models, optimizers)):
            x, y = batch[i]
            F.cross_entropy(m(x), y).backward()
            opt.step()
            opt.zero_grad()

    for _ in range(warmup):
        step(next(batches))
        _RssPeak.sample()
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    seconds = time.perf_counter() - t0
    _RssPeak.sample()
    return seconds


def subset_step_seconds(model: str, n: int, active: int, how: str, steps: int = 30) -> float:
    """Seconds per training step of ``active`` of ``n`` stacked members: gathered rows ("index", what
    the backend does) or every member computed with the inactive ones masked out ("mask")."""
    torch.manual_seed(0)
    cohort = Cohort(MODELS[model], size=n, backend="stacked")
    opt = StackedOptimizer(cohort.stacked_parameters(), [list(m.parameters()) for m in cohort], torch.optim.SGD,
                           {"lr": LR, "momentum": 0.9})
    members = list(range(active))
    x, y = torch.randn(n, BATCH, 1, 28, 28), torch.randint(0, 10, (n, BATCH))
    mask = torch.zeros(n)
    mask[members] = 1.0

    def step() -> None:
        opt.zero_grad()
        if how == "index":
            out = cohort.stacked_forward(x[:active], members, per_member=True)
            loss = F.cross_entropy(out.flatten(0, 1), y[:active].flatten(), reduction="none").view(active, -1).mean(1).sum()
            loss.backward()
            opt.step(members=members)
        else:
            out = cohort.stacked_forward(x, per_member=True)
            per_member = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(n, -1).mean(1)
            (per_member * mask).sum().backward()
            with torch.no_grad():  # a masked step: every member computed, inactive rows put back
                kept = [p.detach().clone() for p in cohort.stacked_parameters()]
                opt.step()
                for p, k in zip(cohort.stacked_parameters(), kept):
                    p.copy_(torch.where(mask.view(-1, *[1] * (p.dim() - 1)).bool(), p, k))

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


class _Idle(L.LightningModule):
    """A Trainer step with nothing to train: Lightning's own per-step cost on a given loader.

    It does what any manual-optimization step does (``manual_backward`` of a loss, the optimizer's
    step) on one parameter: ``manual_backward`` alone, with its hooks, costs ~0.35 ms a step here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx) -> torch.Tensor:
        opt = self.optimizers()
        opt.zero_grad()
        loss = (self.anchor * 2).sum()
        self.manual_backward(loss)
        opt.step()
        return loss.detach()

    def configure_optimizers(self):
        return torch.optim.SGD([self.anchor], lr=LR)


def floor_seconds(n: int, warmup: int, steps: int) -> float:
    """Seconds for ``steps`` Trainer steps of :class:`_Idle` on the benchmark's loader for N members."""
    timer = _StepTimer(warmup, steps)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, max_steps=warmup + steps,
        max_epochs=-1, callbacks=[timer],
    )
    trainer.fit(_Idle(), datamodule=make_datamodule(n))
    return timer.t1 - timer.t0


def raw_stacked_seconds(model: str, n: int, warmup: int, steps: int, seed: int = 0) -> float:
    """Seconds for ``steps`` stacked steps outside Lightning (same batches, SGD, the module's loss)."""
    torch.manual_seed(seed)
    cohort = Cohort(MODELS[model], size=n, backend="stacked")
    opt = StackedOptimizer(cohort.stacked_parameters(), [list(m.parameters()) for m in cohort], torch.optim.SGD, {"lr": LR})
    dm = make_datamodule(n)
    dm.setup("fit")
    loader = _batches(dm)
    # loaded before timing (the Trainer floor already pays for loading), the no-copy views the module stacks
    batches = []
    while len(batches) < 8:
        b = next(loader)
        if len({len(b[i][1]) for i in range(n)}) == 1:  # an epoch's short last batches can't be stacked: skip them
            batches.append((_stack_members([b[i][0] for i in range(n)]), torch.stack([b[i][1] for i in range(n)])))

    def step(k: int) -> None:
        xs, ys = batches[k % len(batches)]
        opt.zero_grad()
        out = cohort.stacked_forward(xs, per_member=True)
        F.cross_entropy(out.flatten(0, 1), ys.flatten(), reduction="none").view(n, -1).mean(1).sum().backward()
        opt.step()

    for k in range(warmup):
        step(k)
    t0 = time.perf_counter()
    for k in range(steps):
        step(k)
    return time.perf_counter() - t0


def _memory_kib() -> dict[str, int]:
    """This process's resident set (``rss``) and its anonymous part (``anon``: heap, tensors, stacks), in KiB."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                fields[key] = int(value.split()[0])
    return {"rss": fields["VmRSS"], "anon": fields["RssAnon"]}


def memory_child(model: str, n: int, side: str, steps: int) -> None:
    """In a fresh process: RSS and anonymous RSS before building the models, and their peaks after a few steps (KiB, JSON)."""
    quiet_lightning()
    dm = make_datamodule(n)
    dm.setup("fit")  # data loaded (and kept: the run reuses it) and torch warmed up before the baseline
    torch.zeros(1).requires_grad_().sum().backward()
    base = _memory_kib()
    if side == "plain":
        run_plain(model, n, 1, steps, dm=dm)
    else:
        run_trainer(model, n, side, 1, steps, dm=dm)
    print(json.dumps({"base": base, "peak": _RssPeak.peak}))


#: glibc's mmap threshold in the memory subprocesses (see the module docstring).
MMAP_THRESHOLD = 128 * 1024


def measure_memory(model: str, n: int, side: str, steps: int) -> dict[str, float]:
    """Training memory in MiB of one side, from a fresh subprocess: ``{"rss": ..., "anon": ...}``."""
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", model, str(n), side, "--steps", str(steps)],
        check=True, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)},
    ).stdout.strip().splitlines()[-1]
    sample = json.loads(out)
    return {key: (sample["peak"][key] - sample["base"][key]) / 1024 for key in MEMORY_KINDS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["lr", "mlp", "convnet"], choices=list(MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 4, 12, 48])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: by model and N)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-floor", action="store_true", help="skip the per-step floor table")
    parser.add_argument("--quick", action="store_true", help="smoke run: N = 1, 4; few steps; 1 repeat")
    parser.add_argument("--memory-child", nargs=3, metavar=("MODEL", "N", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        model, n, side = args.memory_child
        return memory_child(model, int(n), side, args.steps or 10)
    if args.quick:
        args.sizes, args.repeats, args.warmup = [1, 4], 1, 2
    quiet_lightning()
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; data {DATA}; batch {BATCH} per member, SGD lr {LR}; "
          f"member-samples/s, median of {args.repeats}")
    header = (f"{'model':8} {'N':>3} {'plain':>9} {'loop':>9} {'stacked':>9} {'loop/plain':>10} {'stacked/plain':>13} "
              f"{'stacked/loop':>12}")
    print(header)
    verdicts, memory_rows = [], []
    plain_step: dict[str, float] = {}  # ms per step of the plain loop at N = TARGET_N
    sides = ("plain", "loop", "stacked")
    for model in args.models:
        previous: tuple[int, dict[str, dict[str, float]]] | None = None  # (N, total MiB per side) of the previous size
        for n in args.sizes:
            steps = args.steps or (3 if args.quick else max(10, min(200, 60_000 // (n * BATCH) // (40 if model == "convnet" else 1))))
            times: dict[str, list[float]] = {side: [] for side in sides}
            for _ in range(args.repeats):
                times["plain"].append(run_plain(model, n, args.warmup, steps))
                times["loop"].append(run_trainer(model, n, "loop", args.warmup, steps))
                times["stacked"].append(run_trainer(model, n, "stacked", args.warmup, steps))
            rate = {k: n * BATCH * steps / statistics.median(v) for k, v in times.items()}
            ratios = {f"{a}/{b}": statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))  # rate a / rate b
                      for a, b in (("loop", "plain"), ("stacked", "plain"), ("stacked", "loop"))}
            print(f"{model:8} {n:>3} {rate['plain']:>9.0f} {rate['loop']:>9.0f} {rate['stacked']:>9.0f} "
                  f"{ratios['loop/plain']:>10.2f} {ratios['stacked/plain']:>13.2f} {ratios['stacked/loop']:>12.2f}", flush=True)
            if not args.no_memory:
                total = {side: measure_memory(model, n, side, 3 if args.quick else 10) for side in sides}
                marginal = None
                if previous is not None and n > previous[0]:
                    marginal = {side: {k: (total[side][k] - previous[1][side][k]) / (n - previous[0]) for k in MEMORY_KINDS}
                                for side in sides}
                previous = (n, total)
                memory_rows.append((model, n, total, marginal))
                if n == TARGET_N:
                    for kind, what in (("rss", "RSS"), ("anon", "anonymous RSS")):
                        mem = {side: total[side][kind] / n for side in sides}
                        verdicts.append(f"{model} {what} per member (total / N) stacked {mem['stacked']:.2f} MiB vs loop "
                                        f"{mem['loop']:.2f} MiB -> {'met' if mem['stacked'] <= mem['loop'] else 'missed'}")
                        if marginal is not None:
                            verdicts.append(f"{model} marginal {what} per member stacked {marginal['stacked'][kind]:.2f} MiB "
                                            f"vs loop {marginal['loop'][kind]:.2f} MiB -> "
                                            f"{'met' if marginal['stacked'][kind] <= marginal['loop'][kind] else 'missed'}")
            if n == TARGET_N:
                plain_step[model] = statistics.median(times["plain"]) / steps * 1e3
                speedup = ratios["stacked/plain"]
                verdicts.append(f"{model} stacked/plain at N={n}: {speedup:.2f} (target >= {TARGETS[model]}) -> "
                                f"{'met' if speedup >= TARGETS[model] else 'missed'}")
    if memory_rows:
        print("\nMiB per member: total / N, and marginal (slope from the previous N); plain / loop / stacked")
        print(f"{'model':8} {'N':>3} {'RSS / N':>20} {'anonymous / N':>20} {'marginal RSS':>20} {'marginal anonymous':>20}")
        for model, n, total, marginal in memory_rows:
            cells = [" / ".join(f"{total[side][k] / n:.2f}" for side in sides) for k in MEMORY_KINDS]
            cells += [" / ".join(f"{marginal[side][k]:.2f}" for side in sides) if marginal else "-" for k in MEMORY_KINDS]
            print(f"{model:8} {n:>3} " + " ".join(f"{c:>20}" for c in cells), flush=True)
    for v in verdicts:
        print("target:", v)
    if not args.no_floor and plain_step:
        n, steps = TARGET_N, 3 if args.quick else 200
        print(f"\nper-step floor at N={n}: ms per step, median of {args.repeats}; best reachable = plain / (floor + raw stacked)")
        print(f"{'model':8} {'plain':>7} {'Trainer floor':>13} {'raw stacked':>11} {'best stacked/plain':>18} {'target':>6}")
        floor = statistics.median(floor_seconds(n, args.warmup, steps) for _ in range(args.repeats)) / steps * 1e3
        for model, plain in plain_step.items():
            raw = statistics.median(raw_stacked_seconds(model, n, args.warmup, steps) for _ in range(args.repeats)) / steps * 1e3
            print(f"{model:8} {plain:>7.2f} {floor:>13.2f} {raw:>11.2f} {plain / (floor + raw):>18.2f} {TARGETS[model]:>6}",
                  flush=True)
    if not args.quick:
        print("\nmember subsets (stacked, N=12, SGD momentum): ms per step, gathered rows vs masked full cohort")
        print(f"{'model':8} {'active':>6} {'index':>8} {'mask':>8} {'mask/index':>10}")
        for model in [m for m in args.models if m in ("mlp", "convnet")]:
            for active in (1, 6):
                idx, msk = (subset_step_seconds(model, 12, active, how) * 1e3 for how in ("index", "mask"))
                print(f"{model:8} {active:>6} {idx:>8.2f} {msk:>8.2f} {msk / idx:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
