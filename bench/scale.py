"""Benchmark: a 12-ConvNet cohort on 1 process against 2 processes (Lightning DDP, gloo), and the collectives' share.

Setup: 12 ConvNets, SGD lr 0.01, batch 64 per member (each member its own
stream), ParticleSwarm every 16 steps (6 particles: one round = 16 steps and
one move), Fashion-MNIST if installed (else the embedded MNIST sample),
validation off. The 1-process run uses both cores for one process (2 torch
threads); the 2-process run is ``torchrun --nproc-per-node 2`` with
``Trainer(strategy="ddp", devices=2)``, one thread each, 6 members per rank.

Prints member-samples/s of both (timed after a warm-up round), their ratio
(2 processes / 1), and the time each rank spends inside collectives per
round (the per-step loss exchange, member syncs, decisions) with its share
of the round. On one 2-core machine 2 processes cannot show more than ~2x;
the collectives' share is what grows with scale.

Run: ``.venv/bin/python bench/scale.py`` (about 2 minutes; ``--rounds 3`` for a quick look).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from common import quiet_lightning  # bench/common.py (scripts run from bench/)
from lightning_colearn import CohortDataModule, CohortModule, ParticleSwarm
from lightning_colearn import distributed as D
from lightning_colearn.data.datasets import DEBIAN_FASHION_MNIST
from lightning_colearn.models import ConvNet

SIZE, BATCH, LR, EVERY = 12, 64, 0.01, 16
WARMUP_ROUNDS = 1


class RoundTimer(Callback):
    """Wall time of the timed rounds (after the warm-up), and the collectives' time inside them."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps, self.start, self.seconds = warmup_steps, None, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup_steps and self.start is None:
            COLLECTIVES.clear()
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


COLLECTIVES: dict[str, float] = defaultdict(float)


def _timed(name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            COLLECTIVES[name] += time.perf_counter() - start

    return wrapper


def _time_collectives(strategy) -> None:
    """Count the wall time of every collective the cohort uses (including waiting for the other rank)."""
    for name in ("all_gather", "reduce", "broadcast", "reduce_boolean_decision", "barrier"):
        setattr(strategy, name, _timed(name, getattr(strategy, name)))
    D.gather_objects = _timed("all_gather_object", D.gather_objects)


def run(world: int, rounds: int, dataset: str) -> dict:
    L.seed_everything(0, verbose=False)
    dm = CohortDataModule(dataset, num_members=SIZE, batch_size=BATCH, splits=(1.0, 0.0, 0.0),
                          max_train_samples=SIZE * BATCH * EVERY * (rounds + WARMUP_ROUNDS))
    module = CohortModule(ConvNet, size=SIZE, optimizer=partial(torch.optim.SGD, lr=LR))
    timer = RoundTimer(EVERY * WARMUP_ROUNDS)
    distributed = dict(strategy="ddp", devices=world) if world > 1 else dict(devices=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=EVERY * (rounds + WARMUP_ROUNDS), limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[ParticleSwarm(every_n_steps=EVERY, n_particles=6), timer],
                        **distributed)
    _time_collectives(trainer.strategy)
    trainer.fit(module, datamodule=dm)
    steps = EVERY * rounds
    return {"world": world, "seconds": timer.seconds, "steps": steps, "rounds": rounds,
            "member_samples_per_s": SIZE * BATCH * steps / timer.seconds,
            "collectives": dict(COLLECTIVES), "rank": trainer.global_rank}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (16 steps each) after one warm-up round")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # set for the torchrun processes
    args = parser.parse_args()
    quiet_lightning()
    dataset = "fashion_mnist" if (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file() else "mnist_small"
    if args.worker is not None:
        result = run(2, args.rounds, dataset)
        args.worker.with_suffix(f".{result['rank']}.json").write_text(json.dumps(result))
        return
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"colearn_scale_{os.getpid()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", __file__,
           "--rounds", str(args.rounds), "--worker", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the 2-process run failed:\n{done.stderr[-3000:]}")
    two = [json.loads(out.with_suffix(f".{r}.json").read_text()) for r in range(2)]
    one = run(1, args.rounds, dataset)  # after the 2-process run: the machine is otherwise idle for each

    print(f"{SIZE} x ConvNet, batch {BATCH} per member, SGD, ParticleSwarm every {EVERY} steps, {dataset}, "
          f"{args.rounds} timed rounds of {EVERY} steps (torch threads: 1 process {torch.get_num_threads()}, 2 processes 1 each)")
    print(f"{'':<24}{'member-samples/s':>18}{'s per round':>14}")
    print(f"{'1 process':<24}{one['member_samples_per_s']:>18,.0f}{one['seconds'] / args.rounds:>14.3f}")
    print(f"{'2 processes (gloo)':<24}{two[0]['member_samples_per_s']:>18,.0f}{two[0]['seconds'] / args.rounds:>14.3f}")
    print(f"ratio 2 / 1: {two[0]['member_samples_per_s'] / one['member_samples_per_s']:.2f}x")
    for r in two:
        per_round = {k: v / args.rounds for k, v in r["collectives"].items()}
        total = sum(per_round.values())
        parts = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in sorted(per_round.items()) if v > 0)
        print(f"rank {r['rank']}: collectives {total * 1e3:.1f} ms per round = {total / (r['seconds'] / args.rounds):.1%} "
              f"of the round ({parts})")


if __name__ == "__main__":
    main()
