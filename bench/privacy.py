"""Benchmark: what differential privacy costs, in speed and in accuracy, on Fashion-MNIST.

1. Speed. Member-samples per second of private members (``CohortModule(privacy=...)``: DP-SGD through Opacus,
   per-sample gradients, clipping to ``max_grad_norm``, Gaussian noise) against the same members without
   privacy, on the loop backend (the stacked backend refuses privacy: the line it prints is shown), for an
   MLP and a ConvNet, cohorts of 4 and 12 members, batch 64 per member (expected: Poisson), SGD. Both sides
   draw Poisson batches (``sampling="poisson"``) from the same seeds, so they train on exactly the same
   samples, and the samples counted are the ones drawn. The window runs from the end of the warm-up steps to
   the end of the last timed step (Lightning's per-step overhead included, Trainer setup and Opacus' wrapping
   not). Runs are interleaved (DP, plain, plain, DP, ...) ``--repeats`` times with fresh models; the median is
   printed with the CPU share other processes took during the runs (the largest over the repeats), as on a
   small shared machine they can slow a run down many times over. The accountants' cost is not in the window:
   every epoch a private cohort logs each member's ε, and the time that takes (RDP accountant) is printed apart.
2. Accuracy against ε (δ = 1e-5), ε in ``EPSILONS`` (∞: the same run without privacy, same Poisson batches):

   * collective voting, 5 learners, full Fashion-MNIST (each learner 90 % of its share to train, 10 % to
     vote), MLP, SGD, ``VOTING_ROUNDS`` rounds of one proposer pass each, so each learner trains
     ``VOTING_ROUNDS / 5`` epochs: ``privacy=dict(target_epsilon=ε, epochs=VOTING_ROUNDS // 5)``, the noise
     computed by the module for those epochs; per-example clipping ``VOTING_CLIP``;
   * DP-FedAvg, 100 clients (600 images each), 10 a round, one local epoch of SGD (batch 20),
     ``FED_ROUNDS`` rounds, every update clipped to ``FED_CLIP`` (fixed), the noise multiplier for ε over
     the planned rounds from ``noise_for_target(ε, δ, sample_rate=10 / 100, epochs=1, steps=FED_ROUNDS)``
     and ``target_epsilon=ε`` as the budget.

   Printed per run: the noise multiplier, the ε reached (voting: the largest over the learners), the
   accuracy of the shared model on the 10,000 test images, and the run's seconds; with several seeds, one
   row per seed and the mean.

Run: ``.venv/bin/python bench/privacy.py`` (about 20 minutes on an idle 2-core CPU; ``--quick`` for a smoke
test in well under 30 s, ``--seeds 0 1 2`` for more seeds, ``--only speed`` or ``--only accuracy``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial

import lightning as L
import torch

from cohort_throughput import _ForeignLoad  # bench/cohort_throughput.py (scripts run from bench/)
from common import quiet_lightning  # bench/common.py
from lightning_colearn import CohortDataModule, CohortModule, CollectiveVoting, FederatedAveraging
from lightning_colearn.models import MLP, ConvNet
from lightning_colearn.privacy import noise_for_target

DELTA = 1e-5
EPSILONS = (1.0, 3.0, 8.0, math.inf)
MODELS = {"MLP": MLP, "ConvNet": ConvNet}


@dataclass(frozen=True)
class Settings:
    """Every size the benchmark uses; :data:`FULL` and :data:`QUICK`."""

    # speed
    models: tuple[str, ...] = ("MLP", "ConvNet")
    sizes: tuple[int, ...] = (4, 12)
    batch: int = 64
    warmup: int = 3
    steps: int = 20
    speed_samples: int | None = None  # training images for the speed runs (None: all 60,000)
    speed_lr: float = 0.05
    speed_noise: float = 1.0
    # accuracy
    epsilons: tuple[float, ...] = EPSILONS
    learners: int = 5
    voting_samples: int | None = None
    voting_rounds: int = 20
    voting_lr: float = 0.1
    voting_clip: float = 3.0
    clients: int = 100
    per_round: int = 10
    fed_samples: int | None = None
    fed_batch: int = 20
    fed_rounds: int = 40
    fed_lr: float = 0.1
    fed_clip: float = 0.5


FULL = Settings()
QUICK = Settings(models=("MLP",), sizes=(2,), warmup=1, steps=3, speed_samples=2_000, epsilons=(1.0, math.inf),
                 voting_samples=4_000, voting_rounds=5, clients=20, per_round=5, fed_samples=400, fed_rounds=2)


def trainer(callbacks: list, **limits) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks, **limits)


# ----------------------------------------------------------------------------------------------- speed
class _SampleTimer(L.Callback):
    """Seconds and member-samples from the end of step ``warmup`` to the end of step ``warmup + steps``."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.t0 = self.t1 = None
        self.samples = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.warmup < step <= self.warmup + self.steps:  # a timed step: its batch counts
            self.samples += sum(len(y) for _, y in batch.values())
        if step == self.warmup:
            self.t0 = time.perf_counter()
        elif step == self.warmup + self.steps:
            self.t1 = time.perf_counter()


def run_speed(model: str, dm: CohortDataModule, n: int, private: bool, s: Settings, seed: int) -> dict:
    """One timed run: member-samples per second, and (private) the epoch-end ε log's seconds for all members."""
    L.seed_everything(seed, verbose=False)
    privacy = dict(noise_multiplier=s.speed_noise, max_grad_norm=1.0, delta=DELTA) if private else None
    module = CohortModule(MODELS[model], size=n, optimizer=partial(torch.optim.SGD, lr=s.speed_lr), privacy=privacy)
    timer = _SampleTimer(s.warmup, s.steps)
    with _ForeignLoad() as load:
        trainer([timer], max_steps=s.warmup + s.steps, max_epochs=-1).fit(module, datamodule=dm)
    if timer.t0 is None or timer.t1 is None:
        raise RuntimeError(f"the timer did not see steps {s.warmup} and {s.warmup + s.steps}")
    accounting = None
    if private:  # what the module does at every epoch end: every member's epsilon, for the log
        start = time.perf_counter()
        for i in range(n):
            module.private.epsilon(i)
        accounting = time.perf_counter() - start
    return {"rate": timer.samples / (timer.t1 - timer.t0), "samples": timer.samples, "load": load.fraction or 0.0,
            "accounting": accounting}


def speed(s: Settings, repeats: int, seed: int) -> None:
    try:
        CohortModule(MLP, size=2, backend="stacked", privacy=dict(noise_multiplier=1.0))
        refusal = "(no error)"
    except ValueError as err:
        refusal = str(err)
    print(f"\n## Speed: private members (DP-SGD, Opacus) against plain members, loop backend\n\n"
          f"batch {s.batch} per member (Poisson, both sides), SGD lr {s.speed_lr}, DP: noise multiplier "
          f"{s.speed_noise}, max_grad_norm 1; {s.warmup} warm-up + {s.steps} timed steps, median of {repeats} "
          f"interleaved repeats. `backend=\"stacked\"` with privacy: {refusal}\n")
    print("| model | members | plain: member-samples/s | DP: member-samples/s | DP / plain | epoch-end ε log (DP) "
          "| other processes' CPU (max) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model in s.models:
        for n in s.sizes:
            dm = CohortDataModule("fashion_mnist", num_members=n, batch_size=s.batch, splits=(1.0, 0.0, 0.0),
                                  sampling="poisson", max_train_samples=s.speed_samples, seed=seed)
            dm.setup("fit")
            if dm.steps_per_epoch() < s.warmup + s.steps:
                raise ValueError(f"{n} members: {dm.steps_per_epoch()} steps an epoch, fewer than the {s.warmup + s.steps} "
                                 "a measurement needs (the window must not hold an epoch end)")
            runs = {True: [], False: []}
            for r in range(repeats):
                for private in ((True, False) if r % 2 == 0 else (False, True)):
                    runs[private].append(run_speed(model, dm, n, private, s, seed))
            assert {x["samples"] for x in runs[True]} == {x["samples"] for x in runs[False]}, "the two sides drew other batches"
            plain, dp = (statistics.median(x["rate"] for x in runs[p]) for p in (False, True))
            accounting = statistics.median(x["accounting"] for x in runs[True])
            load = max(x["load"] for x in runs[True] + runs[False])
            print(f"| {model} | {n} | {plain:,.0f} | {dp:,.0f} | {dp / plain:.2f} | {accounting:.2f} s "
                  f"({1000 * accounting / n:.0f} ms a member) | {100 * load:.0f} % |", flush=True)


# -------------------------------------------------------------------------------------------- accuracy
def run_voting(dm: CohortDataModule, eps: float, s: Settings, seed: int) -> dict:
    L.seed_everything(seed, verbose=False)
    epochs = s.voting_rounds // s.learners  # each learner trains in the rounds it proposes in
    privacy = None if math.isinf(eps) else dict(target_epsilon=eps, delta=DELTA, epochs=epochs, max_grad_norm=s.voting_clip)
    module = CohortModule(MLP, size=s.learners, optimizer=partial(torch.optim.SGD, lr=s.voting_lr), privacy=privacy)
    voting = CollectiveVoting(threshold=0.5, seed=seed)
    start = time.perf_counter()
    fit = trainer([voting], max_epochs=s.voting_rounds)
    fit.fit(module, datamodule=dm)
    accuracy = fit.test(module, datamodule=dm, verbose=False)[0]["test_acc/mean"]
    private = module.private is not None
    return {"noise": module.private.noise[0] if private else 0.0,
            "spent": max(module.private.epsilon(i) for i in range(s.learners)) if private else math.inf,
            "rounds": len(voting.results), "accepted": sum(r["accepted"] for r in voting.results),
            "accuracy": accuracy, "seconds": time.perf_counter() - start}


def run_fedavg(dm: CohortDataModule, eps: float, s: Settings, seed: int) -> dict:
    L.seed_everything(seed, verbose=False)
    dp, sigma = None, 0.0
    if not math.isinf(eps):
        sigma = noise_for_target(eps, DELTA, sample_rate=s.per_round / s.clients, epochs=1, steps=s.fed_rounds)
        dp = dict(noise_multiplier=sigma, clip_norm=s.fed_clip, adaptive=False, target_epsilon=eps, delta=DELTA)
    module = CohortModule(MLP, size=s.clients, optimizer=partial(torch.optim.SGD, lr=s.fed_lr))
    fed = FederatedAveraging(clients_per_round=s.per_round, aggregator="fedavg", dp=dp, seed=seed)
    start = time.perf_counter()
    trainer([fed], max_epochs=s.fed_rounds).fit(module, datamodule=dm)
    return {"noise": sigma, "spent": fed.dp_epsilon() if dp else math.inf, "rounds": len(fed.history),
            "accuracy": fed.history[-1]["score"], "seconds": time.perf_counter() - start}


def _table(title: str, rows: list[tuple[int, float, dict]], epsilons: tuple[float, ...], extra: str | None) -> None:
    print(f"\n{title}\n")
    head = "| target ε | seed | noise multiplier | ε reached | rounds |" + (f" {extra} |" if extra else "") + " test accuracy | run s |"
    print(head)
    print("|" + " ---: |" * (head.count("|") - 1))
    seeds = sorted({seed for seed, _, _ in rows})
    for eps in epsilons:
        mine = [(seed, r) for seed, e, r in rows if e == eps]
        for seed, r in mine:
            cells = [f"{eps:g}", str(seed), f"{r['noise']:.3f}", f"{r['spent']:.3f}", str(r["rounds"])]
            if extra:
                cells.append(f"{r['accepted']}/{r['rounds']}")
            cells += [f"{r['accuracy']:.3f}", f"{r['seconds']:.0f}"]
            print("| " + " | ".join(cells) + " |")
        if len(seeds) > 1:
            accs = [r["accuracy"] for _, r in mine]
            cells = [f"**{eps:g}**", "mean", "", f"{max(r['spent'] for _, r in mine):.3f} (max)", ""]
            if extra:
                cells.append("")
            cells += [f"**{statistics.mean(accs):.3f}** ({min(accs):.3f}-{max(accs):.3f})", ""]
            print("| " + " | ".join(cells) + " |")


def accuracy(s: Settings, seeds: list[int]) -> None:
    print(f"\n## Accuracy against ε (δ {DELTA:g}), Fashion-MNIST, MLP; ε ∞: the same run without privacy")
    voting_rows, fed_rows = [], []
    for seed in seeds:
        dm = CohortDataModule("fashion_mnist", num_members=s.learners, batch_size=s.batch, eval_batch_size=1000,
                              splits=(0.9, 0.1, 0.0), sampling="poisson", max_train_samples=s.voting_samples, seed=seed)
        for eps in s.epsilons:
            voting_rows.append((seed, eps, run_voting(dm, eps, s, seed)))
        dm.setup("fit")
        sizes = dm.member_sizes("train")
        clients = CohortDataModule("fashion_mnist", num_members=s.clients, batch_size=s.fed_batch, eval_batch_size=1000,
                                   splits=(1.0, 0.0, 0.0), max_train_samples=s.fed_samples, seed=seed)
        for eps in s.epsilons:
            fed_rows.append((seed, eps, run_fedavg(clients, eps, s, seed)))
    epochs = s.voting_rounds // s.learners
    _table(f"Collective voting: {s.learners} learners ({sizes[0]:,} training images each, q = {s.batch}/{sizes[0]}, "
           f"Poisson), {s.voting_rounds} rounds (each learner proposes {epochs} times: privacy epochs={epochs}), "
           f"SGD lr {s.voting_lr}, per-example clip {s.voting_clip}, threshold 0.5; ε reached: the largest over the "
           f"learners", voting_rows, s.epsilons, "accepted")
    per_client = (s.fed_samples or 60_000) // s.clients
    _table(f"DP-FedAvg: {s.clients} clients ({per_client} images each), {s.per_round} a round (q = "
           f"{s.per_round / s.clients:g}), {s.fed_rounds} rounds of one local epoch (SGD lr {s.fed_lr}, batch "
           f"{s.fed_batch}), updates clipped to {s.fed_clip} (fixed), server-side noise; the noise multiplier from "
           f"noise_for_target(ε, δ, sample_rate={s.per_round / s.clients:g}, epochs=1, steps={s.fed_rounds})",
           fed_rows, s.epsilons, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test (well under 30 s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the accuracy runs (default 0)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved speed repeats (default 3; --quick 1)")
    parser.add_argument("--only", choices=["speed", "accuracy"], default=None, help="one part only")
    args = parser.parse_args()
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1, got {repeats}")
    quiet_lightning()
    s = QUICK if args.quick else FULL
    print(f"`{' '.join(['.venv/bin/python bench/privacy.py', *sys.argv[1:]])}`: torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, seeds {args.seeds}{', QUICK sizes' if args.quick else ''}")
    print(f"settings: {s}")
    start = time.perf_counter()
    if args.only in (None, "speed"):
        speed(s, repeats, args.seeds[0])
    if args.only in (None, "accuracy"):
        accuracy(s, args.seeds)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
