"""One optimizer per member, seen by Lightning as a single optimizer.

Why a container: with one Lightning optimizer per member, manual optimization
counts every ``optimizer.step()`` as a global step (``max_steps=256`` with 12
members would stop after 21 batches) and a ``GradScaler`` would run
``update()`` once per member, unscaling later members with a changed scale.
Behind one :class:`CohortOptimizer` Lightning counts one step per batch, the
scaler unscales every member once, and checkpoints hold every member's state.

Example:
    >>> import torch
    >>> members = [torch.nn.Linear(2, 1) for _ in range(3)]
    >>> opt = CohortOptimizer([torch.optim.SGD(m.parameters(), lr=0.1) for m in members])
    >>> len(opt.param_groups), len(opt.state_dict()["members"])
    (3, 3)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["CohortOptimizer"]


class CohortOptimizer(Optimizer):
    """Steps, zeroes and (de)serialises a list of member optimizers as one.

    ``param_groups`` are the members' own group dicts, live (changing a
    learning rate here changes the member's), ``state`` is a merged read-only view of
    the members' states, and ``step(members=[...])`` steps a subset only.
    Numerically each member is exactly its own optimizer: nothing is shared.
    """

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:
        optimizers = list(optimizers)
        if not optimizers:
            raise ValueError("CohortOptimizer needs at least one member optimizer, got none")
        for i, opt in enumerate(optimizers):
            if not isinstance(opt, Optimizer):
                raise TypeError(f"member {i}'s optimizer must be a torch.optim.Optimizer, got {type(opt).__name__}")
        self.optimizers = optimizers
        # Optimizer.__init__ validates the members' groups and refuses a
        # parameter that two members hold; afterwards param_groups is a live
        # view, because a member's load_state_dict replaces its group dicts.
        self._live = False
        super().__init__([group for opt in optimizers for group in opt.param_groups], defaults={})
        self._live = True

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        if getattr(self, "_live", False):
            return [group for opt in self.optimizers for group in opt.param_groups]
        return self._init_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._init_groups = value

    @property  # type: ignore[override]
    def state(self) -> dict[torch.Tensor, Any]:
        merged: dict[torch.Tensor, Any] = {}
        for opt in self.optimizers:
            merged.update(opt.state)
        return merged

    @state.setter
    def state(self, value: Any) -> None:
        # Optimizer.__init__ assigns an empty state; the members own theirs.
        pass

    def step(self, closure: Callable[[], Any] | None = None, members: Sequence[int] | None = None) -> Any:  # type: ignore[override]
        """Run ``closure`` once, then step every member (or only ``members``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i in range(len(self.optimizers)) if members is None else members:
            self.optimizers[i].step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"members": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        members = state_dict.get("members") if isinstance(state_dict, dict) else None
        if not isinstance(members, list):
            raise ValueError(
                "optimizer state must be a CohortOptimizer state ({'members': [...]}), "
                f"got keys {sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__}"
            )
        if len(members) != len(self.optimizers):
            raise ValueError(
                f"optimizer state holds {len(members)} members but this cohort has {len(self.optimizers)}"
            )
        # All or nothing: if member k's state does not fit, members 0..k-1 are restored.
        backups = [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]
        for k, (opt, member_state) in enumerate(zip(self.optimizers, members)):
            try:
                opt.load_state_dict(member_state)
            except (ValueError, KeyError, TypeError, RuntimeError) as err:
                for done, backup in zip(self.optimizers[:k], backups):
                    done.load_state_dict(backup)
                raise ValueError(f"optimizer state of member {k} does not fit its optimizer: {err}") from err

    def __repr__(self) -> str:
        return f"CohortOptimizer({len(self.optimizers)} x {type(self.optimizers[0]).__name__})"
