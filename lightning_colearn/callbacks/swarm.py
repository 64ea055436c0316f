"""ParticleSwarm: gradient descent plus particle-swarm moves on whole members.

Every ``every_n_steps`` optimizer steps, ``n_particles`` members are drawn,
ranked by fitness, and each one that is not the best moves toward the best:
``member <- alpha * best + (1 - alpha) * member`` (Nytorch's
``ParticleModule`` example, as a Lightning callback; classic accelerated PSO,
Yang 2010, with ``move="all"`` and ``sigma > 0``).

Choices, all documented and tested:

* **fitness**: by default each member's most recent training loss (lower is
  better, as Nytorch); or a torchmetrics ``metric`` on held-out batches, its
  direction read from ``higher_is_better``.
* **selection**: without replacement (default) or with replacement (Nytorch).
  A member drawn ``k`` times moves ``k`` times, i.e. once with
  ``1 - (1 - alpha) ** k``; drawing the best twice does not move it.
* **buffers** (e.g. BatchNorm running statistics): ``"move"`` like parameters
  (default: the model is one vector), ``"copy"`` from the best, or ``"keep"``.
  Integer buffers (``num_batches_tracked``) are never interpolated; ``"copy"``
  copies them.
* **optimizer state** of moved members: kept (default: momentum carries on from
  the moved point) or reset (``reset_optimizer=True``: the member's optimizer
  forgets its state, as a fresh particle). Moves are in place, so the
  optimizer always refers to the live parameters, never to stale copies.

Moves use fused ``torch._foreach_lerp_`` calls over all moved members, under
``no_grad``: no state-dict round trips, no new modules, no autograd graph.

Example::

    trainer = L.Trainer(max_steps=256, callbacks=[ParticleSwarm(every_n_steps=16, n_particles=6, alpha=0.5)])
    trainer.fit(CohortModule(ConvNet, size=12, optimizer=partial(torch.optim.SGD, lr=0.01)), datamodule=dm)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torchmetrics import Metric

from lightning_colearn._seeded import PicklableGenerator
from lightning_colearn.functional import arithmetic as FA
from lightning_colearn.functional.swarm import gaussian_perturb_, move_toward_, plan_moves, select_particles
from lightning_colearn.metrics.cohort import higher_is_better
from lightning_colearn.metrics.scoring import score
from lightning_colearn.module import CohortModule
from lightning_colearn._checks import is_int_at_least
from lightning_colearn import trackers
from lightning_colearn._io import write_csv

__all__ = ["ParticleSwarm"]

BUFFER_MODES = ("move", "copy", "keep")
MOVE_MODES = ("selected", "all")


class ParticleSwarm(PicklableGenerator, Callback):
    """Particle-swarm moves between the members of a :class:`CohortModule`.

    Args:
        every_n_steps: optimizer steps between moves (>= 1).
        n_particles: members drawn per move, in ``[2, cohort size]``.
        alpha: pull toward the best, ``0 < alpha < 1``.
        replacement: draw members with replacement (Nytorch) instead of without.
        move: ``"selected"`` moves the drawn non-best members; ``"all"`` moves every
            member except the best (classic APSO), the best still chosen among the drawn.
        sigma: std of Gaussian noise added to moved members' parameters (0: none).
        buffers: ``"move"``, ``"copy"`` or ``"keep"`` (see module docstring).
        reset_optimizer: forget moved members' optimizer state.
        metric: torchmetrics metric for fitness on held-out data (default: last training loss).
        maximize: direction for a ``metric`` without ``higher_is_better``.
        fitness_batches: held-out batches per fitness evaluation (with ``metric``).
        fitness_dataloader: held-out data (default: the datamodule's ``holdout_dataloader()``).
        seed: seeds member selection and noise (its state is checkpointed).
    """

    def __init__(
        self,
        every_n_steps: int = 16,
        n_particles: int = 6,
        alpha: float = 0.5,
        *,
        replacement: bool = False,
        move: str = "selected",
        sigma: float = 0.0,
        buffers: str = "move",
        reset_optimizer: bool = False,
        metric: Metric | None = None,
        maximize: bool | None = None,
        fitness_batches: int = 1,
        fitness_dataloader: Any = None,
        seed: int = 0,
    ) -> None:
        errors = []
        if not is_int_at_least(every_n_steps, 1):
            errors.append(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        if not is_int_at_least(n_particles, 2):
            errors.append(f"n_particles must be an int >= 2 (and <= cohort size), got {n_particles!r}")
        if not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
            errors.append(f"alpha must be in (0, 1), got {alpha!r}")
        if move not in MOVE_MODES:
            errors.append(f"move must be one of {list(MOVE_MODES)}, got {move!r}")
        if buffers not in BUFFER_MODES:
            errors.append(f"buffers must be one of {list(BUFFER_MODES)}, got {buffers!r}")
        if not isinstance(sigma, (int, float)) or not sigma >= 0:
            errors.append(f"sigma must be >= 0, got {sigma!r}")
        if not is_int_at_least(fitness_batches, 1):
            errors.append(f"fitness_batches must be an int >= 1, got {fitness_batches!r}")
        if metric is not None and not isinstance(metric, Metric):
            errors.append(f"metric must be a torchmetrics.Metric, got {type(metric).__name__}")
        if errors:
            raise ValueError("ParticleSwarm: " + "; ".join(errors))
        self.maximize = higher_is_better(metric, maximize) if metric is not None else False
        self.every_n_steps, self.n_particles, self.alpha = every_n_steps, n_particles, float(alpha)
        self.replacement, self.move_mode, self.sigma = replacement, move, float(sigma)
        self.buffers, self.reset_optimizer = buffers, reset_optimizer
        self.metric, self.fitness_batches, self.fitness_dataloader = metric, fitness_batches, fitness_dataloader
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        #: One record per move: step, chosen, fitness, best, moved.
        self.history: list[dict[str, Any]] = []
        #: Per-move wall time in seconds (for the benchmark's share of training time).
        self.move_seconds: list[float] = []
        #: ``(step, [val_acc per member])`` at every validation, for the plot.
        self.curves: list[tuple[int, list[float]]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, n_particles=self.n_particles, alpha=self.alpha, seed=self.seed
        )

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.check_module(pl_module)

    def check_module(self, pl_module: L.LightningModule) -> None:
        """Raise a clear error unless this swarm can run on ``pl_module`` (called at ``setup``, and by the CLI before training)."""
        if not isinstance(pl_module, CohortModule):
            raise TypeError(f"ParticleSwarm needs a CohortModule, got {type(pl_module).__name__}")
        size = pl_module.size
        if not self.replacement and self.n_particles > size:
            raise ValueError(f"ParticleSwarm: n_particles must be in [2, {size}] (the cohort size), got {self.n_particles}")
        try:
            pl_module.cohort.check_compatible()
        except FA.CohortMismatchError as err:
            raise ValueError(f"ParticleSwarm needs members of the same architecture: {err}") from err

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: CohortModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.should_move(trainer):
            self.move(trainer, pl_module)

    def should_move(self, trainer: L.Trainer) -> bool:
        """Move after every ``every_n_steps``-th optimizer step (override for other schedules)."""
        return trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0

    # ------------------------------------------------------------------ moves
    def move(self, trainer: L.Trainer, pl_module: CohortModule) -> dict[str, Any]:
        """Draw, rank and move once; returns the move's record (also appended to :attr:`history`)."""
        start = time.perf_counter()
        chosen = select_particles(pl_module.size, self.n_particles, self.generator, self.replacement)
        fitness = self.fitness(trainer, pl_module, chosen)
        best, times = plan_moves(chosen, fitness, self.maximize)
        if self.move_mode == "all":
            times = {i: times.get(i, 1) for i in range(pl_module.size) if i != best}
        best, times = pl_module.decide((best, times))  # under DDP: rank 0's plan, on every rank
        pl_module.sync_members([best, *times])  # the moved members and the best, from the ranks that train them
        self.apply_move(pl_module, best, times)
        if self.reset_optimizer:
            self._reset_optimizer_state(trainer, pl_module, list(times))
        record = {
            "step": trainer.global_step,
            "chosen": chosen.tolist(),
            "fitness": fitness.tolist(),
            "best": best,
            "moved": sorted(times),
        }
        self.history.append(record)
        self.move_seconds.append(time.perf_counter() - start)
        logged = {"swarm/best_member": float(best), "swarm/best_fitness": float(fitness[chosen.tolist().index(best)])}
        logged.update({f"swarm/fitness/member_{int(m)}": float(f) for m, f in zip(chosen, fitness)})
        logged["swarm/moved"] = float(len(times))
        pl_module.log_dict(logged, on_step=True, on_epoch=False)
        return record

    def fitness(self, trainer: L.Trainer, pl_module: CohortModule, chosen: Tensor) -> Tensor:
        """Fitness of each drawn member (one value per entry of ``chosen``)."""
        if self.metric is None:
            pl_module.share_losses()  # under DDP: every member's loss from the rank that trains it
            return pl_module.last_loss.detach().cpu()[chosen]
        members = sorted(set(chosen.tolist()))
        # each member is scored by the rank that trains it (no weights move for fitness)
        values = pl_module.gather_member_values(lambda ms: [self._score(trainer, pl_module, m) for m in ms], members)
        scores = dict(zip(members, values))
        return torch.tensor([scores[int(m)] for m in chosen])

    @torch.no_grad()
    def apply_move(self, pl_module: CohortModule, best: int, times: dict[int, int]) -> None:
        """Move members ``times`` toward ``best`` in place (parameters, then buffers per ``buffers``)."""
        if not times:
            return
        cohort = pl_module.cohort
        params = {i: [p for p in cohort[i].parameters()] for i in [best, *times]}
        move_toward_({i: params[i] for i in times}, params[best], self.alpha, times)
        if self.buffers != "keep":
            bufs = {i: list(cohort[i].buffers()) for i in [best, *times]}
            if self.buffers == "move":
                move_toward_({i: bufs[i] for i in times}, bufs[best], self.alpha, times)
            else:
                FA.copy_([bufs[i] for i in times], bufs[best])
        if self.sigma > 0:
            gaussian_perturb_([params[i] for i in times], self.sigma, self.generator)

    def _score(self, trainer: L.Trainer, pl_module: CohortModule, member: int) -> float:
        return score(
            pl_module.cohort[member], self._holdout(trainer), self.metric, pl_module.device,
            max_batches=self.fitness_batches, select=lambda batch: pl_module.member_batch(batch, member),
        )

    def _holdout(self, trainer: L.Trainer):
        if self.fitness_dataloader is not None:
            return self.fitness_dataloader
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "holdout_dataloader"):
            raise ValueError(
                "ParticleSwarm(metric=...) needs held-out data: pass fitness_dataloader=... or use a "
                "CohortDataModule (its members' vote splits are the held-out data)"
            )
        self.fitness_dataloader = dm.holdout_dataloader()
        return self.fitness_dataloader

    @staticmethod
    def _reset_optimizer_state(trainer: L.Trainer, pl_module: CohortModule, members: list[int]) -> None:
        for i in members:
            pl_module.reset_member_optimizer(i)

    # --------------------------------------------------------------- results
    def write_history(self, path: str | Path) -> Path:
        """Write the moves as CSV (step, best, chosen, fitness, moved), atomically."""
        rows = [{"step": r["step"], "best": r["best"], "chosen": " ".join(map(str, r["chosen"])),
                 "fitness": " ".join(f"{v:.6g}" for v in r["fitness"]), "moved": " ".join(map(str, r["moved"]))}
                for r in self.history]
        return write_csv(path, rows, ["step", "best", "chosen", "fitness", "moved"])

    def on_validation_end(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        if trainer.sanity_checking:
            return
        keys = [f"val_acc/member_{i}" for i in range(pl_module.size)]
        if all(k in trainer.callback_metrics for k in keys):
            self.curves.append((trainer.global_step, [float(trainer.callback_metrics[k]) for k in keys]))

    def write_artifacts(self, trainer: L.Trainer, pl_module: CohortModule, out: Path) -> dict[str, Path]:
        """``swarm_moves.csv`` and the figure ``swarm.png`` in ``out``; returns the figure by name."""
        if self.history:
            self.write_history(out / "swarm_moves.csv")
        if not (self.curves or self.history):
            return {}
        from lightning_colearn import plots  # matplotlib only here

        return {"swarm": plots.plot_swarm(self.curves, self.history, out / "swarm.png")}

    def progress_postfix(self) -> dict[str, str]:
        """The last move, for the progress bar: ``{"swarm": "move 3: best 2, 4 moved"}``."""
        if not self.history:
            return {}
        last = self.history[-1]
        return {"swarm": f"move {len(self.history)}: best {last['best']}, {len(last['moved'])} moved"}

    def on_fit_end(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        # Without a logger nothing is written (the working directory is not the run's):
        # history and curves stay on the callback; write_history() saves them on demand.
        trackers.publish(trainer, pl_module, self)

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "history": list(self.history), "curves": list(self.curves)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            self.generator.set_state(state_dict["generator"])
            self.history = list(state_dict["history"])
            self.curves = [tuple(c) for c in state_dict.get("curves", [])]
        except (KeyError, RuntimeError, TypeError) as err:
            raise ValueError(f"ParticleSwarm checkpoint state is corrupt or from another version: {err}") from err
