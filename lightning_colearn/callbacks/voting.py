"""CollectiveVoting: colearn's collective learning protocol as a Lightning callback.

Learners who keep their data to themselves train one shared model (colearn,
Fetch.ai 2021: ``collective_learning_round``). All learners start from equal
weights. Every round (one Lightning epoch):

1. a proposer (round-robin by default, at random, or every learner at once)
   trains on its own training data, one pass (or ``steps_per_round`` steps),
   while the others do not train;
2. every *other* learner scores the proposal on its own vote split with the
   vote criterion (any torchmetrics ``Metric``) and votes yes only if the
   proposal is strictly better than its current model;
3. the proposal is accepted when ``yes >= threshold * voters``: every learner
   adopts it (parameters and buffers). Otherwise the proposer's weights *and*
   optimizer state are restored exactly, and no other learner changes.

What we do differently from the original, on purpose:

* proposals and learners never share storage: acceptance copies in place,
  rejection restores a snapshot, so a rejected proposal cannot leak;
* the proposer's optimizer state is reverted with its weights;
* votes use the voter's whole vote split (``vote_batches`` to limit);
* the proposer does not vote on its own proposal;
* a proposal with NaN/Inf weights is rejected without being scored.

Each learner's score of its current model is cached: after an accepted round
it is the score the learner just gave the proposal, after a rejected one it is
unchanged, so a round scores the proposal once per learner and nothing else.
Learner optimizer states are their own: accepting a proposal does not touch
a voter's optimizer state (colearn semantics). Learning-rate schedulers are
not reverted. A resumed run equals an uninterrupted one when it resumes from a
checkpoint taken between rounds (the epoch-end checkpoints Lightning writes by
default); a checkpoint taken in the middle of a round does not hold the
proposer's pre-round snapshot.

Example::

    trainer = L.Trainer(max_epochs=20, callbacks=[CollectiveVoting(threshold=0.5,
                        criterion=MulticlassAccuracy(num_classes=10, average="micro"))])
    trainer.fit(CohortModule(ColearnConvNet, size=5, optimizer=partial(torch.optim.Adam, lr=1e-3)),
                datamodule=CohortDataModule(num_members=5))
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_colearn._seeded import PicklableGenerator
from lightning_colearn._checks import is_int_at_least
from lightning_colearn import trackers
from lightning_colearn._io import write_csv
from lightning_colearn.callbacks.rounds import is_last_batch, own_pass_steps, resumed_mid_epoch
from lightning_colearn.functional import arithmetic as FA
from lightning_colearn.functional.voting import best_voted, cast_votes, is_accepted
from lightning_colearn.metrics.cohort import higher_is_better
from lightning_colearn.metrics.scoring import score_many
from lightning_colearn.module import CohortModule

__all__ = ["CollectiveVoting", "PROPOSERS"]

PROPOSERS = ("round_robin", "random", "all")


class CollectiveVoting(PicklableGenerator, Callback):
    """colearn's vote-to-accept protocol between the learners (members) of a :class:`CohortModule`.

    Args:
        threshold: fraction of voters whose yes accepts a proposal, in ``[0, 1]``:
            accepted when ``yes >= threshold * voters`` (voters: every learner but the proposer).
        criterion: vote criterion, a torchmetrics ``Metric`` (default: micro accuracy over the
            module's ``num_classes``). Cloned per vote; "better" follows ``higher_is_better``.
        maximize: direction for a criterion without ``higher_is_better`` (otherwise an error).
        proposer: ``"round_robin"`` (learner ``round % N``), ``"random"`` (seeded), or ``"all"``
            (every learner trains and proposes; the best-voted proposal, if accepted, wins).
        steps_per_round: proposer steps per round (default: one pass over its own training data);
            a round never outlasts its epoch.
        vote_batches: score on at most this many batches of each vote split (default: all).
        vote_dataloaders: one held-out loader per learner (default: the datamodule's ``vote_dataloader(i)``).
        test_dataloaders: one loader per learner for the per-round test score (default: the datamodule's
            per-learner test splits when all are non-empty; ``[]`` for none).
        sync_start: copy learner 0 into every learner when training starts, so all start equal.
        seed: seeds the random proposer order (its state is checkpointed).
    """

    def __init__(
        self,
        threshold: float = 0.5,
        criterion: Metric | None = None,
        *,
        maximize: bool | None = None,
        proposer: str = "round_robin",
        steps_per_round: int | None = None,
        vote_batches: int | None = None,
        vote_dataloaders: list[Any] | None = None,
        test_dataloaders: list[Any] | None = None,
        sync_start: bool = True,
        seed: int = 0,
    ) -> None:
        errors = []
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            errors.append(f"threshold must be a number in [0, 1], got {threshold!r}")
        if criterion is not None and not isinstance(criterion, Metric):
            errors.append(f"criterion must be a torchmetrics.Metric, got {type(criterion).__name__}")
        if proposer not in PROPOSERS:
            errors.append(f"proposer must be one of {list(PROPOSERS)}, got {proposer!r}")
        if steps_per_round is not None and not is_int_at_least(steps_per_round, 1):
            errors.append(f"steps_per_round must be an int >= 1 or None, got {steps_per_round!r}")
        if vote_batches is not None and not is_int_at_least(vote_batches, 1):
            errors.append(f"vote_batches must be an int >= 1 or None, got {vote_batches!r}")
        if errors:
            raise ValueError("CollectiveVoting: " + "; ".join(errors))
        if criterion is not None:
            try:
                self.maximize: bool | None = higher_is_better(criterion, maximize)
            except ValueError as err:
                raise ValueError(f"CollectiveVoting: criterion {err}") from err
        else:
            self.maximize = True if maximize is None else bool(maximize)  # accuracy
        self.threshold, self.criterion, self.proposer = float(threshold), criterion, proposer
        self.steps_per_round, self.vote_batches, self.sync_start, self.seed = steps_per_round, vote_batches, sync_start, seed
        self.vote_dataloaders, self.test_dataloaders = vote_dataloaders, test_dataloaders
        self.generator = torch.Generator().manual_seed(seed)
        #: Rounds completed.
        self.round = 0
        #: One record per round (see :meth:`table`).
        self.results: list[dict[str, Any]] = []
        #: Each learner's score of its current model on its own vote split (``None``: not yet scored).
        self.current: list[float] | None = None
        self._synced = False
        self._in_round = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(threshold=self.threshold, proposer=self.proposer, seed=self.seed)

    # ------------------------------------------------------------------ setup
    def check_module(self, pl_module: L.LightningModule) -> None:
        """Raise a clear error unless voting can run on ``pl_module`` (at ``setup``, and by the CLI before training)."""
        if not isinstance(pl_module, CohortModule):
            raise TypeError(f"CollectiveVoting needs a CohortModule, got {type(pl_module).__name__}")
        if pl_module.size < 2:
            raise ValueError(f"CollectiveVoting needs at least 2 learners (one proposes, the others vote), got cohort size {pl_module.size}")
        try:
            pl_module.cohort.check_compatible()
        except FA.CohortMismatchError as err:
            raise ValueError(f"CollectiveVoting needs learners of one architecture (they adopt each other's weights): {err}") from err
        if self.criterion is None and pl_module.num_classes is None:
            raise ValueError("CollectiveVoting: pass criterion=... (the module has no num_classes for the default accuracy)")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.check_module(pl_module)
        if self.criterion is None:
            self.criterion = MulticlassAccuracy(num_classes=int(pl_module.num_classes), average="micro")
        if stage != "fit":
            return
        n = pl_module.size
        self.vote_dataloaders = self._loaders(trainer.datamodule, n, self.vote_dataloaders, "vote", required=True)
        self.test_dataloaders = self._loaders(trainer.datamodule, n, self.test_dataloaders, "test", required=False)
        if self.current is not None and len(self.current) != n:
            raise ValueError(f"CollectiveVoting state holds {len(self.current)} learners, the cohort has {n}")

    def check_data(self, datamodule: L.LightningDataModule, size: int) -> None:
        """Raise a clear error unless every one of ``size`` learners has vote data (the CLI calls it before training)."""
        self._loaders(datamodule, size, self.vote_dataloaders, "vote", required=True)

    @staticmethod
    def _loaders(dm: Any, n: int, given: list[Any] | None, split: str, required: bool) -> list[Any]:
        if given is not None:
            if len(given) not in ((n,) if required else (0, n)):
                raise ValueError(f"CollectiveVoting: {split}_dataloaders needs one loader per learner ({n}), got {len(given)}")
            return list(given)
        if dm is None or not hasattr(dm, "member_split"):
            if required:
                raise ValueError(
                    "CollectiveVoting needs each learner's vote data: pass vote_dataloaders=[...] (one per learner) "
                    "or use a CohortDataModule with a vote split (data.splits[1] > 0)"
                )
            return []
        sizes = dm.member_sizes(split)
        empty = [i for i, s in enumerate(sizes) if s == 0]
        if empty and required:
            raise ValueError(
                f"CollectiveVoting: learner {empty[0]} has an empty {split} split (data.splits={list(dm.splits)}, "
                f"{split} sizes {sizes}); every voter needs vote data: raise data.splits[1] or use fewer learners"
            )
        if empty:
            return []  # no per-learner test scores without every learner's test data
        return [dm.member_dataloader(i, split) for i in range(n)]

    def on_fit_start(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        if self.sync_start and not self._synced:  # not on resume: the checkpoint's learners are already equal
            pl_module.cohort.broadcast(0)
        self._synced = True

    # ----------------------------------------------------------------- rounds
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        n = pl_module.size
        if self.current is None or any(c is None for c in self.current):
            start = time.perf_counter()
            current = self.current or [None] * n
            missing = [i for i, c in enumerate(current) if c is None]
            fresh = dict(zip(missing, self._own_scores(trainer, pl_module, missing)))
            self.current = [fresh.get(i, c) for i, c in enumerate(current)]
            self._initial_seconds = time.perf_counter() - start
        else:
            self._initial_seconds = 0.0
        proposers = self.pick_proposers(n, pl_module.retired_members)
        if not proposers:  # every learner's privacy budget is spent: nothing left to propose
            pl_module.active_members, self._in_round = [], False
            trainer.should_stop = True
            return
        optimizers = pl_module.member_optimizers()
        self._snapshots = {
            p: (pl_module.cohort.member_state(p), copy.deepcopy(optimizers[p].state_dict())) for p in proposers
        }
        self._remaining = {p: self._budget(trainer, p) for p in proposers}
        self._proposers = proposers
        pl_module.active_members = list(proposers)
        self._in_round = True
        self._round_start = time.perf_counter()

    def pick_proposers(self, n: int, retired: set[int]) -> list[int]:
        """This round's proposers: learner ``round % n`` (or the next one still training), a seeded random one, or all.

        A learner whose privacy budget is spent (``retired``) no longer proposes, as in colearn; it still votes
        and receives accepted proposals.
        """
        eligible = [i for i in range(n) if i not in retired]
        if not eligible:
            return []
        if self.proposer == "all":
            return eligible
        if self.proposer == "random":
            return [eligible[int(torch.randint(len(eligible), (1,), generator=self.generator))]]
        return [next(i % n for i in range(self.round, self.round + n) if i % n not in retired)]

    def _budget(self, trainer: L.Trainer, learner: int) -> float:
        if self.steps_per_round is not None:
            return self.steps_per_round
        return own_pass_steps(trainer, learner)  # one pass over its own data

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: CohortModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._in_round:
            return
        for p in pl_module.stepped_members:
            if p in self._remaining:
                self._remaining[p] -= 1
        pl_module.active_members = [p for p in self._proposers if self._remaining[p] > 0]
        epoch_ends = is_last_batch(trainer, batch_idx) or (trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps)
        # The vote ends the round inside the epoch, so the epoch's validation and checkpoint see its outcome.
        if not pl_module.active_members or epoch_ends:
            self.end_round(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        if self._in_round:  # an epoch without batches
            self.end_round(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        pl_module.active_members = None  # a later fit without this callback trains every member again

    def end_round(self, trainer: L.Trainer, pl_module: CohortModule) -> dict[str, Any]:
        """Vote on the round's proposal(s), accept or restore; returns the round's record."""
        if not self._in_round:
            raise RuntimeError("CollectiveVoting.end_round: no round in progress (rounds start at on_train_epoch_start)")
        vote_start = time.perf_counter()
        train_seconds = vote_start - self._round_start
        self._in_round = False
        pl_module.active_members = []  # nobody trains until the next round starts
        n, cohort = pl_module.size, pl_module.cohort
        pl_module.sync_members(self._proposers)  # under DDP: every voter's rank gets the proposals
        current = torch.tensor(self.current, dtype=torch.float64)
        proposals = {}
        for p in self._proposers:
            finite = FA.is_finite(cohort.member_tensors(p))
            scores = torch.full((n,), math.nan, dtype=torch.float64)
            if finite:  # a non-finite proposal is rejected unscored: scoring it would only produce NaN
                voters_of_p = [j for j in range(n) if j != p]
                scores[voters_of_p] = torch.tensor(self._score_on(trainer, pl_module, p, voters_of_p), dtype=torch.float64)
            votes = cast_votes(scores, current, self.maximize)  # the proposer's NaN: it does not vote
            proposals[p] = {"scores": scores, "votes": votes, "yes": int(votes.sum()), "finite": finite}
        voters = n - 1
        winner = self._proposers[best_voted(
            [proposals[p]["yes"] for p in self._proposers],
            [_mean_others(proposals[p]["scores"], p) for p in self._proposers],
            self.maximize,
        )]
        accepted = proposals[winner]["finite"] and is_accepted(proposals[winner]["yes"], voters, self.threshold)
        winner, accepted = pl_module.decide((winner, accepted))  # under DDP: taken once, on rank 0
        chosen = proposals[winner]
        optimizers = pl_module.member_optimizers()
        for p in self._proposers:
            if not (accepted and p == winner):
                state, opt_state = self._snapshots[p]
                cohort.load_member_state(p, state, allow_nonfinite=True)
                optimizers[p].load_state_dict(opt_state)
        if accepted:
            cohort.broadcast(winner)
            # every learner now holds the proposal: its vote score is the learner's new current score;
            # the proposer did not vote, so its own vote split is scored now (only in accepted rounds)
            chosen["scores"][winner] = self._score_on(trainer, pl_module, winner, [winner])[0]
            self.current = chosen["scores"].tolist()
        self._snapshots = {}
        vote_seconds = time.perf_counter() - vote_start
        test_start = time.perf_counter()
        tests = self._own_scores(trainer, pl_module, list(range(n)), "test") if self.test_dataloaders else []
        reason = "accepted" if accepted else ("non-finite weights" if not chosen["finite"] else "not enough yes votes")
        record = {
            "round": self.round,
            "step": trainer.global_step,
            "proposer": winner,
            "candidates": {p: proposals[p]["yes"] for p in self._proposers},
            "scores": chosen["scores"].tolist(),
            "current": current.tolist(),
            "votes": [None if j == winner else bool(v) for j, v in enumerate(chosen["votes"].tolist())],
            "yes": chosen["yes"],
            "voters": voters,
            "accepted": bool(accepted),
            "reason": reason,
            "test": tests,
            "train_seconds": train_seconds,
            "vote_seconds": vote_seconds,
            "initial_seconds": self._initial_seconds,  # scoring learners' starting models (first round, once)
            "test_seconds": time.perf_counter() - test_start,
        }
        if pl_module.private is not None:  # private learners: who no longer proposes (budget spent), and each one's epsilon
            record["retired"] = sorted(pl_module.retired_members)
            record["epsilon"] = [pl_module.private.epsilon(i) for i in range(n)]
        self.results.append(record)
        self.round += 1
        self._log(pl_module, record)
        return record

    def _score_on(self, trainer: L.Trainer, pl_module: CohortModule, model: int, learners: list[int], split: str = "vote") -> list[float]:
        """Score member ``model``'s weights on each of ``learners``' ``split`` data (batched across learners;
        under DDP each learner's data is scored on the rank that trains the learner)."""
        return pl_module.gather_member_values(lambda mine: self._scores(trainer, pl_module, model, mine, split), learners)

    def _own_scores(self, trainer: L.Trainer, pl_module: CohortModule, learners: list[int], split: str = "vote") -> list[float]:
        """Each learner's own current model on its own ``split`` data (under DDP, on the rank that trains it)."""
        def scores(mine: list[int]) -> list[float]:
            return [self._scores(trainer, pl_module, i, [i], split)[0] for i in mine]

        return pl_module.gather_member_values(scores, learners)

    def _scores(self, trainer: L.Trainer, pl_module: CohortModule, model: int, learners: list[int], split: str) -> list[float]:
        loaders = self.vote_dataloaders if split == "vote" else self.test_dataloaders
        return score_many(
            pl_module.cohort[model], [loaders[j] for j in learners], self.criterion, pl_module.device,
            max_batches=self.vote_batches if split == "vote" else None,
            select=lambda k, batch: pl_module.member_batch(batch, learners[k]),
            context=trainer.precision_plugin.forward_context,
        )

    def _log(self, pl_module: CohortModule, record: dict[str, Any]) -> None:
        logged = {
            "vote/accepted": float(record["accepted"]),
            "vote/proposer": float(record["proposer"]),
            "vote/yes_fraction": record["yes"] / record["voters"],
        }
        logged.update({f"vote_score/member_{j}": s for j, s in enumerate(record["scores"]) if not math.isnan(s)})
        logged.update({f"vote_test/member_{j}": s for j, s in enumerate(record["test"])})
        pl_module.log_dict(logged, on_step=False, on_epoch=True, sync_dist=pl_module.sync_logs)

    def on_validation_end(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        # Lightning validates after the round's last batch, i.e. after the vote: keep each learner's
        # accuracy on the shared evaluation set with the round it follows (the plots' test panel).
        if trainer.sanity_checking or not self.results or "val" in self.results[-1]:
            return
        keys = [f"val_acc/member_{i}" for i in range(pl_module.size)]
        if all(k in trainer.callback_metrics for k in keys):
            self.results[-1]["val"] = [float(trainer.callback_metrics[k]) for k in keys]

    # --------------------------------------------------------------- results
    def table(self) -> list[dict[str, Any]]:
        """The results as flat rows (one per round): what :meth:`write_results` writes as CSV."""
        rows = []
        for r in self.results:
            row = {k: r[k] for k in ("round", "step", "proposer", "accepted", "yes", "voters", "reason")}
            for j, s in enumerate(r["scores"]):
                row[f"score_{j}"] = s
            for j, v in enumerate(r["votes"]):
                row[f"vote_{j}"] = "" if v is None else int(v)
            for j, s in enumerate(r["test"]):
                row[f"test_{j}"] = s
            for j, s in enumerate(r.get("val", [])):
                row[f"val_acc_{j}"] = s
            row.update({k: r.get(k, 0.0) for k in ("train_seconds", "vote_seconds", "initial_seconds", "test_seconds")})
            rows.append(row)
        return rows

    def write_results(self, path: str | Path) -> Path:
        """Write :meth:`table` as CSV, atomically (a crash leaves the old file or the new one)."""
        rows = self.table()
        return write_csv(path, rows, None if rows else ["round", "step", "proposer", "accepted"])

    def write_artifacts(self, trainer: L.Trainer, pl_module: CohortModule, out: Path) -> dict[str, Path]:
        """``voting_results.csv``, the figures ``voting_results.png`` and ``voting_votes.png`` (the vote heat-map) in ``out``."""
        if not self.results:
            return {}
        from lightning_colearn import plots  # matplotlib only here

        self.write_results(out / "voting_results.csv")
        return {name: plot(self.results, out / f"{name}.png")
                for name, plot in (("voting_results", plots.plot_vote_results), ("voting_votes", plots.plot_votes))}

    def progress_postfix(self) -> dict[str, str]:
        """The last round, for the progress bar: ``{"round": "7: accepted 3/4"}`` (yes votes of the voters)."""
        if not self.results:
            return {}
        last = self.results[-1]
        outcome = "accepted" if last["accepted"] else "rejected"
        return {"round": f"{last['round']}: {outcome} {last['yes']}/{last['voters']}"}

    def on_fit_end(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        # Without a logger nothing is written (the working directory is not the run's):
        # results stay on the callback; write_results() and the plots save them on demand.
        trackers.publish(trainer, pl_module, self)

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "generator": self.generator.get_state(),
            "results": list(self.results),
            "current": self.current,
            "synced": self._synced,
            # a checkpoint inside a round (every_n_train_steps, mid-epoch): the proposers' pre-round snapshots
            # and their steps left, so the resumed round reverts and votes as the uninterrupted one
            "round_in_progress": {
                "proposers": list(self._proposers), "remaining": dict(self._remaining),
                "snapshots": {p: {"model": m, "optimizer": o} for p, (m, o) in self._snapshots.items()},
                "initial_seconds": self._initial_seconds,
            } if getattr(self, "_in_round", False) else None,
        }

    def on_train_start(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        resume, self._resume_round = getattr(self, "_resume_round", None), None
        if resume is not None and resumed_mid_epoch(trainer):  # inside a round: its state from the checkpoint
            self._proposers, self._remaining = resume["proposers"], resume["remaining"]
            self._snapshots = {p: (v["model"], v["optimizer"]) for p, v in resume["snapshots"].items()}
            self._initial_seconds, self._in_round = resume["initial_seconds"], True
            self._round_start = time.perf_counter()
            pl_module.active_members = [p for p in self._proposers if self._remaining[p] > 0]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            round_, results, current = int(state_dict["round"]), list(state_dict["results"]), state_dict["current"]
            if round_ != len(results) or (current is not None and not isinstance(current, list)):
                raise ValueError(f"round {round_} with {len(results)} recorded rounds")
            resume = state_dict.get("round_in_progress")
            if resume is not None:
                proposers, remaining, snapshots = resume["proposers"], resume["remaining"], resume["snapshots"]
                if not (isinstance(proposers, list) and set(remaining) == set(proposers) == set(snapshots)
                        and all(isinstance(v, Mapping) and isinstance(v["model"], Mapping) and isinstance(v["optimizer"], Mapping)
                                for v in snapshots.values())):
                    raise ValueError(f"round_in_progress must hold each proposer's steps left and snapshot, got proposers "
                                     f"{proposers!r}, remaining for {sorted(remaining)!r}, snapshots of {sorted(snapshots)!r}")
            self.generator.set_state(state_dict["generator"])
        except (KeyError, RuntimeError, TypeError, ValueError) as err:
            raise ValueError(f"CollectiveVoting checkpoint state is corrupt or from another version: {err}") from err
        self._resume_round = resume
        self.round, self.results, self.current, self._synced = round_, results, current, bool(state_dict["synced"])


def _mean_others(scores: torch.Tensor, proposer: int) -> float:
    others = torch.cat([scores[:proposer], scores[proposer + 1:]])
    return float(others.mean()) if len(others) else math.nan
