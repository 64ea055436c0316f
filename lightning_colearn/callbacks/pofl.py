"""ProofOfLearning: proof of federated learning (flexBlock's PoFL) with a verifiable ledger.

Clients are split among ``miners`` (client ``c`` belongs to miner ``c % miners``
unless ``assignment`` says otherwise). Each round:

1. a seeded sample of clients trains locally, each starting from its miner's model;
2. every miner aggregates its own sampled clients' updates (FedAvg by sample
   count, or a robust aggregator) into a candidate; a miner without client
   updates this round has no candidate (it keeps its model and cannot win);
3. consensus: every candidate is scored on the shared evaluation set in one
   pass over it; the best one wins if it passes ``threshold``;
4. the winner becomes a block: validators check its chain link, its weight
   digest and re-score its weights from the block's bytes before adopting it;
   it is appended to the :class:`~lightning_colearn.ledger.Ledger` (one SQLite
   transaction) and every miner adopts it. Without a winner there is no block,
   and each miner keeps its own candidate.

flexBlock's faults fixed here: blocks are linked by hash and persisted,
validated before adoption, the winner's weights are the ones just scored, a
miner without updates cannot crash the round, and ``max_rounds`` bounds the
train-until loop.

Crash safety: a block is written in one transaction, after validation. A run
killed after appending a block but before the epoch's checkpoint replays that
round on resume; the replayed block must equal the one on the chain (same
round, winner and weight digest), which is then not appended twice.

Example::

    trainer = L.Trainer(max_epochs=60, callbacks=[ProofOfLearning(miners=10, clients_per_round=20,
                        threshold=0.6, ledger="outputs/ledger.db")])
    trainer.fit(CohortModule(MLP, size=100), datamodule=CohortDataModule(num_members=100, batch_size=20))
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_colearn.callbacks.federated import sample_counts
from lightning_colearn.callbacks.rounds import ClientRounds
from lightning_colearn.functional import arithmetic as FA
from lightning_colearn.functional.aggregation import aggregate
from lightning_colearn.ledger import BlockRefused, Ledger, LedgerError
from lightning_colearn.metrics.scoring import score, score_models
from lightning_colearn.module import CohortModule
from lightning_colearn._checks import is_int_at_least

__all__ = ["MINER_AGGREGATORS", "ProofOfLearning"]

MINER_AGGREGATORS = ("fedavg", "median", "trimmed_mean")


#: FederatedAveraging's options that have no meaning for PoFL's miners, and why.
_FEDERATED_ONLY = {
    "server_optimizer": "there is no server model to step: the miners' candidates compete as they are aggregated",
    "personal": "a block holds one whole model that every miner adopts",
    "mu": "FedProx's pull toward a global model has no single global model among competing miners",
    "q": "q-FedAvg reweights one server's aggregate; use FederatedAveraging(aggregator='qfedavg')",
    "krum_weighting": "Krum needs more clients per miner than PoFL rounds give (aggregator: fedavg, median, trimmed_mean)",
    "num_byzantine": "Krum and Bulyan need more clients per miner than PoFL rounds give",
    "option": "SCAFFOLD's control variates need one server model; use SCAFFOLD",
    "dp": "DP-FedAvg's noise is calibrated for one server's clipped mean, not for miners' competing candidates",
}


class ProofOfLearning(ClientRounds):
    """Proof of federated learning between miners that aggregate the clients (members) of a :class:`CohortModule`.

    The round arguments (``clients_per_round``, ``local_epochs``, ``max_rounds``, ``target``,
    ``stop_at_target``, ``criterion``, ``maximize``, ``eval_dataloader``, ``eval_batches``,
    ``reset_client_optimizer``, ``seed``) are those of :class:`ClientRounds`.

    Args:
        miners: number of miners (>= 1).
        threshold: a candidate must score at least this (at most, for a minimised criterion) to become a block.
        ledger: path of the SQLite ledger (created or continued), a :class:`Ledger`, or ``None`` (in memory).
        assignment: miner of each client (default: ``client % miners``).
        aggregator: per-miner aggregation: ``fedavg``, ``median`` or ``trimmed_mean`` (with ``trim_ratio``).
        tolerance: how far a validator's re-evaluation may differ from the block's claimed score.
    """

    name = "pofl"

    def __init__(
        self,
        miners: int = 10,
        clients_per_round: int = 20,
        threshold: float = 0.6,
        ledger: str | Path | Ledger | None = None,
        *,
        local_epochs: int = 1,
        assignment: list[int] | None = None,
        aggregator: str = "fedavg",
        trim_ratio: float = 0.1,
        tolerance: float = 1e-5,
        **kwargs: Any,
    ) -> None:
        errors = [f"{name} is not a ProofOfLearning option: {why}" for name, why in _FEDERATED_ONLY.items() if name in kwargs]
        if not is_int_at_least(miners, 1):
            errors.append(f"miners must be an int >= 1, got {miners!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            errors.append(f"threshold must be a finite number, got {threshold!r}")
        if aggregator not in MINER_AGGREGATORS:
            # Krum needs >= 2f + 3 updates per aggregation; a miner gets ~clients_per_round / miners of them
            errors.append(f"aggregator must be one of {list(MINER_AGGREGATORS)} (Krum needs more clients per miner "
                          f"than PoFL rounds give), got {aggregator!r}")
        if isinstance(trim_ratio, bool) or not isinstance(trim_ratio, (int, float)) or not 0 <= trim_ratio < 0.5:
            errors.append(f"trim_ratio must be in [0, 0.5), got {trim_ratio!r}")
        if ledger is not None and not isinstance(ledger, (str, Path, Ledger)):
            errors.append(f"ledger must be a path, a Ledger or None, got {type(ledger).__name__}")
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf:
            errors.append(f"tolerance must be a finite number >= 0, got {tolerance!r}")
        if assignment is not None and (isinstance(assignment, (str, bytes)) or not isinstance(assignment, Sequence)
                                       or not all(is_int_at_least(m, 0) for m in assignment)):
            errors.append(f"assignment must be a list with one miner index (an int >= 0) per client, got {assignment!r}")
        if errors:
            raise ValueError("ProofOfLearning: " + "; ".join(errors))
        super().__init__(clients_per_round, local_epochs, **kwargs)
        self.miners, self.threshold, self.aggregator, self.tolerance = miners, float(threshold), aggregator, float(tolerance)
        self.trim_ratio = float(trim_ratio)
        self.assignment = None if assignment is None else [int(m) for m in assignment]
        self._ledger_spec = ledger
        self.ledger: Ledger | None = ledger if isinstance(ledger, Ledger) else None
        #: Each miner's current model (state dicts; miners adopting one block share its tensors, read-only).
        self.miner_states: list[dict[str, Tensor]] | None = None
        self._ledger_base: int | None = None  # blocks on the ledger before this run's first round

    # ------------------------------------------------------------------ setup
    def check_module(self, pl_module: L.LightningModule) -> None:
        super().check_module(pl_module)
        if self.assignment is not None:
            if len(self.assignment) != pl_module.size:
                raise ValueError(f"ProofOfLearning: assignment needs one miner per client ({pl_module.size}), got {len(self.assignment)}")
            bad = [m for m in self.assignment if not 0 <= m < self.miners]
            if bad:
                raise ValueError(f"ProofOfLearning: assignment holds miner {bad[0]}, miners are 0..{self.miners - 1}")

    def miner_of(self, client: int) -> int:
        return self.assignment[client] if self.assignment is not None else client % self.miners

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if not trainer.is_global_zero:
            self.ledger = None  # under DDP only rank 0 opens and writes the ledger
        elif self.ledger is None:
            path = self._ledger_spec
            self.ledger = Ledger(":memory:" if path is None else path)
        # a scratch copy of one member: validators load a block's weights into it to re-score them
        self._scratch = copy.deepcopy(pl_module.cohort[0])

    def on_fit_start(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.miner_states is None:
            state = pl_module.cohort.member_state(0)
            self.miner_states = [state] * self.miners
        problem = None
        if self.ledger is not None:  # rank 0
            if self._ledger_base is None:  # a new run continues the chain where it is
                self._ledger_base = len(self.ledger)
            known = self._next_block_index()
            if len(self.ledger) < known:
                problem = (f"the ledger at {self.ledger.path} holds {len(self.ledger)} blocks but this run's checkpoint "
                           f"knows {known}: blocks were removed; restore the ledger file or start a new run")
            else:  # before any training: a tampered or damaged chain is not extended (nor trained for)
                try:
                    self.ledger.check_chain()
                except LedgerError as err:
                    problem = f"ProofOfLearning: {err}"
        self._ledger_base, problem = pl_module.decide((self._ledger_base, problem))
        if problem is not None:  # on every rank, so none waits for the others
            raise LedgerError(problem)

    def _next_block_index(self) -> int:
        return self._ledger_base + sum(1 for r in self.history if r.get("block") is not None)

    # ----------------------------------------------------------------- rounds
    def start_round(self, trainer: L.Trainer, pl_module: CohortModule, clients: list[int]) -> None:
        for c in clients:  # each client starts from its miner's model
            pl_module.cohort.load_member_state(c, self.miner_states[self.miner_of(c)])

    def revert_clients(self, trainer: L.Trainer, pl_module: CohortModule, clients: list[int]) -> None:
        for c in clients:  # back to the model the client started the round from: its miner's
            pl_module.cohort.load_member_state(c, self.miner_states[self.miner_of(c)])

    def discard_round(self, trainer: L.Trainer, pl_module: CohortModule, clients: list[int], reason: str) -> dict[str, Any]:
        self.revert_clients(trainer, pl_module, clients)  # no miner has a candidate: each keeps its model
        return {"score": None, "scores": [None] * self.miners, "winner": None, "block": None, "reason": reason}

    def finish_round(self, trainer: L.Trainer, pl_module: CohortModule, clients: list[int]) -> dict[str, Any]:
        start = time.perf_counter()
        cohort = pl_module.cohort
        groups: dict[int, list[int]] = {}
        for c in clients:
            groups.setdefault(self.miner_of(c), []).append(c)
        hosts: dict[int, int] = {}  # miner -> the member now holding its candidate
        for m, members in sorted(groups.items()):
            result = aggregate([cohort.member_tensors(c) for c in members], self.aggregator,
                               sample_counts(trainer, members), trim_ratio=self.trim_ratio)
            if FA.is_finite(result):
                FA.copy_([cohort.member_tensors(members[0])], result)
                hosts[m] = members[0]
        aggregate_seconds = time.perf_counter() - start

        start = time.perf_counter()
        candidates = sorted(hosts)
        # under DDP each candidate is scored on the rank that trains its host member
        values = pl_module.gather_member_values(
            lambda mine: score_models([cohort[h] for h in mine], self.eval_dataloader, self.criterion, pl_module.device,
                                      self.eval_batches, trainer.precision_plugin.forward_context),
            [hosts[m] for m in candidates],
        ) if candidates else []
        scores: list[float | None] = [None] * self.miners
        for m, v in zip(candidates, values):
            scores[m] = v if math.isfinite(v) else None
        ranked = [m for m in candidates if scores[m] is not None]
        best = (max if self.maximize else min)(ranked, key=lambda m: scores[m]) if ranked else None
        passes = best is not None and self._passes(scores[best])
        consensus_seconds = time.perf_counter() - start

        start = time.perf_counter()
        block, reason = None, "no candidate passed the threshold" if candidates else "no client updates"
        if passes:
            state = cohort.member_state(hosts[best])
            outcome = None
            if self.ledger is not None:  # rank 0 validates and writes; every rank learns the outcome
                try:
                    appended, reason = self._append_block(trainer, pl_module, best, scores, state)
                    outcome = (None if appended is None else appended.index, reason, None)
                except LedgerError as err:
                    outcome = (None, None, str(err))
            block, reason, problem = pl_module.decide(outcome)
            if problem is not None:
                raise LedgerError(problem)
            if block is not None:
                self.miner_states = [state] * self.miners  # every miner adopts the block
        if block is None:  # no block: each miner with a candidate keeps it
            for m in candidates:
                self.miner_states[m] = cohort.member_state(hosts[m])
        ledger_seconds = time.perf_counter() - start
        return {
            "score": scores[best] if block is not None else None,
            "scores": scores,
            "winner": best if block is not None else None,
            "block": block,
            "reason": reason,
            "aggregate_seconds": aggregate_seconds,
            "consensus_seconds": consensus_seconds,
            "ledger_seconds": ledger_seconds,
        }

    def _passes(self, value: float) -> bool:
        return value >= self.threshold if self.maximize else value <= self.threshold

    def _append_block(self, trainer, pl_module, winner, scores, state):
        """Validate and append the winner's block (or find it already on the chain after a crash)."""
        ledger = self.ledger
        block, data = ledger.propose(self.round, winner, scores, state)
        index = self._next_block_index()
        if index < len(ledger):  # replaying a round whose block was appended before a crash
            existing = ledger.block(index)
            if (existing.round, existing.winner, existing.digest) != (block.round, block.winner, block.digest):
                raise LedgerError(
                    f"ledger block {index} (round {existing.round}, winner {existing.winner}) differs from this run's "
                    f"replay of round {self.round} (winner {winner}); the ledger belongs to another run"
                )
            # the same record as the run that was not interrupted would write; the replay is only logged
            rank_zero_info(f"ProofOfLearning: round {self.round}'s block {index} was appended before a crash; not appended again")
            return existing, "block appended"
        try:  # one check, inside the append's transaction
            return ledger.commit(block, data, rescore=self._rescorer(trainer, pl_module), tol=self.tolerance), "block appended"
        except BlockRefused as err:
            return None, f"refused by validators: {err}"

    def _rescorer(self, trainer: L.Trainer, pl_module: CohortModule):
        def rescore(weights: dict[str, Tensor]) -> float:
            scratch = self._scratch.to(pl_module.device)
            scratch.load_state_dict({k: v.to(pl_module.device) for k, v in weights.items()})
            return score(scratch, self.eval_dataloader, self.criterion, pl_module.device,
                         max_batches=self.eval_batches, context=trainer.precision_plugin.forward_context)

        return rescore

    def on_train_end(self, trainer: L.Trainer, pl_module: CohortModule) -> None:
        super().on_train_end(trainer, pl_module)
        # The run's model goes into every member (what trainer.test then evaluates): the chain head if this
        # run appended to the chain (a continued ledger's older head belongs to another run), otherwise the
        # miner model that scored best in the last round.
        if self._ledger_base is not None and self._next_block_index() > self._ledger_base:
            model = pl_module.decide(self.ledger.load(len(self.ledger) - 1) if self.ledger is not None else None)
        elif self.history and any(s is not None for s in self.history[-1]["scores"]):
            scores = {m: s for m, s in enumerate(self.history[-1]["scores"]) if s is not None}
            model = self.miner_states[(max if self.maximize else min)(scores, key=scores.get)]
        else:
            return
        for i in range(pl_module.size):
            pl_module.cohort.load_member_state(i, model)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # close a ledger file this callback opened (an in-memory one stays open: closing would lose it)
        if stage == "fit" and self.ledger is not None and self._ledger_spec is not None and not isinstance(self._ledger_spec, Ledger):
            self.ledger.close()
            self.ledger = None

    def progress_postfix(self) -> dict[str, str]:
        """The last round, for the progress bar: ``{"block": "6, score 0.812"}``, or the round's reason for no block."""
        if not self.history:
            return {}
        last = self.history[-1]
        if last.get("block") is None:
            return {"round": f"{last['round']}: no block ({last.get('reason') or 'no candidate'})"}
        return {"block": f"{last['block']}, score {last['score']:.4g}"}

    def log_round(self, pl_module: CohortModule, record: dict[str, Any]) -> None:
        super().log_round(pl_module, record)
        logged = {"pofl/blocks": float(self._next_block_index())}
        logged.update({f"pofl/miner_{m}": s for m, s in enumerate(record["scores"]) if s is not None})
        pl_module.log_dict(logged, on_step=False, on_epoch=True, sync_dist=pl_module.sync_logs)

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["miner_states"] = self.miner_states
        state["ledger_base"] = self._ledger_base
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            miner_states, base = state_dict["miner_states"], state_dict["ledger_base"]
            if base is not None and not is_int_at_least(base, 0):
                raise ValueError(f"ledger_base must be None or an int >= 0, got {base!r}")
            if miner_states is not None and (
                not isinstance(miner_states, list) or len(miner_states) != self.miners
                or not all(isinstance(m, Mapping) and all(isinstance(v, Tensor) for v in m.values()) for m in miner_states)
            ):
                got = f"list of {len(miner_states)}" if isinstance(miner_states, list) else type(miner_states).__name__
                raise ValueError(f"miner_states must be None or {self.miners} state dicts (one per miner), got {got}")
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"ProofOfLearning checkpoint state is corrupt or from another version: {err}") from err
        super().load_state_dict(state_dict)
        self.miner_states, self._ledger_base = miner_states, base
