"""Benchmark: what each experiment tracker costs per training step of the swarm experiment.

The run is the CLI's ``experiment=swarm_mnist`` (12 ConvNets, SGD, batch 64, a swarm move every 16
steps, member accuracy every 32 steps) for ``--steps`` steps, composed and run in this process by
:func:`lightning_colearn.cli.train` with ``logger=none`` and then with each tracker
(``csv``, ``tensorboard``, ``mlflow`` in its local SQLite store, ``wandb`` offline, and all four at once).
Lightning flushes metrics every ``log_every_n_steps=10`` steps (the CLI's default) and at each validation.

What is timed: the training loop from step 8 to the last step (the first steps warm up allocators and the
trackers' first writes), measured by a callback (:class:`StepTimer`); not building the run, nor the test
and plots after it. The trackers' set-up (opening a database, starting W&B's service) happens before the
timer starts, but their first writes and every flush fall inside it. Variants run interleaved, in a
rotated order, ``--repeats`` times; the table gives each variant's median ms per step and its ratio to the
median of ``logger=none`` (target: at most 1.03), and the median time the loop spent inside the loggers'
``log_metrics`` per step (a direct measure, not subject to the run-to-run noise of the ratio: on this
2-core machine two runs of the same variant differ by up to 15 %). conf/logger/mlflow.yaml logs through
MLflow's background queue (``synchronous: false``); ``--variants ... 'mlflow sync'`` adds the
synchronous logger, Lightning's default, for comparison. Printed under the table: the share of the
machine's CPU time other processes took while the benchmark ran.

Run: ``.venv/bin/python bench/loggers.py`` (about 9 minutes on 2 cores; ``--steps 64 --repeats 1`` for a look).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_busy_ticks  # noqa: E402

VARIANTS = {
    "none": "logger=none",
    "csv": "logger=csv",
    "tensorboard": "logger=tensorboard",
    "mlflow": "logger=mlflow",
    "wandb": "logger=wandb",
    "all four": "logger=[csv,tensorboard,mlflow,wandb]",
}
EXTRA = {"mlflow sync": ["logger=mlflow", "logger.mlflow.synchronous=true"]}  # every flush waits for SQLite
WARMUP = 8


class StepTimer(Callback):
    """Seconds from the start of step ``WARMUP`` to the end of training, the steps in between, and the
    seconds spent inside the loggers' ``log_metrics`` in that window (what the training loop waits for;
    a tracker's background threads or processes compete for the cores instead, which only the wall
    time shows)."""

    runs: list[tuple[float, int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == WARMUP and not hasattr(self, "start"):
            self.in_loggers = 0.0
            for logger in trainer.loggers:
                logger.log_metrics = self._timed(logger.log_metrics)
            self.start = time.perf_counter()

    def _timed(self, log_metrics):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return log_metrics(*args, **kwargs)
            finally:
                self.in_loggers += time.perf_counter() - start
        return timed

    def on_train_end(self, trainer, pl_module):
        StepTimer.runs.append((time.perf_counter() - self.start, trainer.global_step - WARMUP, self.in_loggers))


def run_once(logger: list[str], steps: int, out: Path) -> tuple[float, float]:
    """ms per step of one run of the swarm experiment with ``logger``, and of it ms inside the loggers' calls."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from lightning_colearn.cli import train

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="lightning_colearn.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=swarm_mnist", f"trainer.max_steps={steps}", *logger, "plots=false", "test=false",
            "trainer.enable_progress_bar=false", f"paths.output_dir={out}",
            "+algorithm.callbacks.timer._target_=__main__.StepTimer",
        ])
    train(cfg)
    seconds, timed, in_loggers = StepTimer.runs[-1]
    return 1000 * seconds / timed, 1000 * in_loggers / timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=[*VARIANTS, *EXTRA])
    args = parser.parse_args()
    if args.steps <= WARMUP:
        parser.error(f"--steps must be > {WARMUP} (the warm-up steps), got {args.steps}")

    times: dict[str, list[float]] = {v: [] for v in args.variants}
    inside: dict[str, list[float]] = {v: [] for v in args.variants}
    busy0, wall0 = machine_busy_ticks(), time.monotonic()
    own0 = os.times()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = args.variants[r % len(args.variants):] + args.variants[:r % len(args.variants)]
            for v in order:
                overrides = EXTRA[v] if v in EXTRA else [VARIANTS[v]]
                ms, logging_ms = run_once(overrides, args.steps, Path(tmp) / f"{v.replace(' ', '_')}_{r}")
                times[v].append(ms)
                inside[v].append(logging_ms)
                print(f"  repeat {r}: {v:<12} {ms:7.2f} ms/step, {logging_ms:.3f} of them in the loggers", flush=True)
    busy1, wall1, own1 = machine_busy_ticks(), time.monotonic(), os.times()

    base = statistics.median(times["none"]) if "none" in times else None
    print(f"\nswarm_mnist (12 ConvNets, batch 64), {args.steps} steps ({args.steps - WARMUP} timed), "
          f"{args.repeats} repeats, torch threads {__import__('torch').get_num_threads()}")
    print("| logger | median ms/step | vs none | in log_metrics, ms/step (share) | runs (ms/step) |\n"
          "| --- | ---: | ---: | ---: | --- |")
    for v, values in times.items():
        step = statistics.median(values)
        ratio = f"{step / base:.3f}" if base else "-"
        logging_ms = statistics.median(inside[v])
        print(f"| {v} | {step:.2f} | {ratio} | {logging_ms:.3f} ({logging_ms / step:.1%}) | {' '.join(f'{x:.2f}' for x in values)} |")
    if busy0 is not None and busy1 is not None:
        ticks = os.sysconf("SC_CLK_TCK")
        total = (wall1 - wall0) * ticks * os.cpu_count()
        own = (own1.user + own1.system + own1.children_user + own1.children_system
               - own0.user - own0.system - own0.children_user - own0.children_system) * ticks
        print(f"other processes' share of the CPU during the benchmark: {max(0.0, (busy1 - busy0 - own) / total):.1%}")


if __name__ == "__main__":
    main()
