"""Benchmark: ParticleSwarm on Nytorch's example setup, against a plain PyTorch loop.

Setup (Nytorch's MNIST example): 12 ConvNets, SGD lr 0.01, batch 64, 256
training batches shared by all members; every 16 batches 6 members are drawn
and the non-best ones move halfway toward the best (by last training loss).

Prints, per data set (``mnist_small`` and, if installed, full Fashion-MNIST):

* time spent in swarm moves as a share of training time (target < 2 %);
* member-samples/s of CohortModule + Trainer + ParticleSwarm and of a plain
  PyTorch loop over the same 12 models on the same batches (no swarm), and
  their ratio (target >= 0.85);
* final test accuracy of every member, with and without the swarm.

Run: ``.venv/bin/python bench/swarm.py`` (about 5 minutes on 2 cores;
``--steps 64`` for a quick look).
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import lightning as L
import torch

from common import FitTimer, quiet_lightning, plain_loop  # bench/common.py (scripts run from bench/)
from lightning_colearn import CohortDataModule, CohortModule, ParticleSwarm
from lightning_colearn.data.datasets import DEBIAN_FASHION_MNIST
from lightning_colearn.models import ConvNet

SIZE, BATCH, LR = 12, 64, 0.01


def datamodule(dataset: str) -> CohortDataModule:
    dm = CohortDataModule(dataset, num_members=SIZE, batch_size=BATCH, stream="shared", splits=(0.9, 0.1, 0.0))
    dm.setup("fit")
    return dm


def run_ours(dm: CohortDataModule, steps: int, with_swarm: bool, seed: int = 0):
    L.seed_everything(seed, verbose=False)
    module = CohortModule(ConvNet, size=SIZE, optimizer=partial(torch.optim.SGD, lr=LR))
    timer = FitTimer()
    swarm = ParticleSwarm(every_n_steps=16, n_particles=6, alpha=0.5, seed=seed)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[timer, swarm] if with_swarm else [timer],
    )
    trainer.fit(module, datamodule=dm)
    result = trainer.test(module, datamodule=dm, verbose=False)[0]
    accs = [result[f"test_acc/member_{i}"] for i in range(SIZE)]
    moves = sum(swarm.move_seconds) if with_swarm else 0.0
    return timer.seconds, moves, accs


def run_plain(dm: CohortDataModule, steps: int, seed: int = 0) -> float:
    torch.manual_seed(seed)
    return plain_loop([ConvNet() for _ in range(SIZE)], dm, steps, LR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved timing repeats (median)")
    args = parser.parse_args()
    quiet_lightning()
    datasets = ["mnist_small"] + (["fashion_mnist"] if (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists() else [])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {SIZE} ConvNets, batch {BATCH}, {args.steps} steps")
    rows = []
    for name in datasets:
        dm = datamodule(name)
        run_plain(dm, 8)  # warm up kernels and the allocator
        ours_s, plain_s, move_s, accs = [], [], [], None
        for _ in range(args.repeats):
            seconds, moves, accs = run_ours(dm, args.steps, with_swarm=True)
            ours_s.append(seconds)
            move_s.append(moves / seconds)
            plain_s.append(run_plain(dm, args.steps))
        _, _, alone = run_ours(dm, args.steps, with_swarm=False)
        ours, plain = statistics.median(ours_s), statistics.median(plain_s)
        samples = SIZE * BATCH * args.steps
        rows.append((name, samples / ours, samples / plain, plain / ours, statistics.median(move_s), accs, alone))

    print("\n| data | ours member-samples/s | plain loop | ratio (ours/plain) | swarm moves / training time |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, ours, plain, ratio, share, _, _ in rows:
        print(f"| {name} | {ours:,.0f} | {plain:,.0f} | {ratio:.2f} (target >= 0.85) | {100 * share:.3f} % (target < 2 %) |")
    print("\n| data | run | best | worst | mean | every member |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for name, *_, accs, alone in rows:
        for label, a in (("swarm", accs), ("no swarm", alone)):
            every = " ".join(f"{v:.3f}" for v in a)
            print(f"| {name} | {label} | {max(a):.3f} | {min(a):.3f} | {sum(a) / len(a):.3f} | {every} |")


if __name__ == "__main__":
    main()
