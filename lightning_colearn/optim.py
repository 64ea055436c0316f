"""One optimizer per member, seen by Lightning as a single optimizer.

Why a container: with one Lightning optimizer per member, manual optimization
counts every ``optimizer.step()`` as a global step (``max_steps=256`` with 12
members would stop after 21 batches) and a ``GradScaler`` would run
``update()`` once per member, unscaling later members with a changed scale.
Behind one :class:`CohortOptimizer` Lightning counts one step per batch, the
scaler unscales every member once, and checkpoints hold every member's state.

The module ends with the federated server optimizers :class:`FedAdam`,
:class:`FedYogi` and :class:`FedAdagrad`, which step a global model on the
round's pseudo-gradient (see :mod:`lightning_colearn.functional.server`).

Examples:
    >>> import torch
    >>> members = [torch.nn.Linear(2, 1) for _ in range(3)]
    >>> opt = CohortOptimizer([torch.optim.SGD(m.parameters(), lr=0.1) for m in members])
    >>> len(opt.param_groups), len(opt.state_dict()["members"])
    (3, 3)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_colearn._checks import is_int_at_least, member_index
from lightning_colearn.functional import stacked as FS
from lightning_colearn.functional.server import (
    _check_betas,
    _check_decay,
    _check_positive,
    fedadagrad_step_,
    fedadam_step_,
    fedyogi_step_,
)

__all__ = ["STACKED_OPTIMIZERS", "CohortOptimizer", "FedAdagrad", "FedAdam", "FedYogi", "StackedOptimizer"]


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

    def step(self, closure: Callable[[], Any] | None = None, members: Sequence[int] | None = None,
             allow_empty: bool = False) -> Any:  # type: ignore[override]
        """Run ``closure`` once, then step every member (or only ``members``; with ``allow_empty``, none for ``[]``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        picked = _stepped_members(members, len(self.optimizers), allow_empty)
        for i in range(len(self.optimizers)) if picked is None else picked:
            self.optimizers[i].step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"members": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        members = _member_states(state_dict, len(self.optimizers))
        # All or nothing: if member k's state does not fit, members 0..k-1 are restored.
        backups = [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]
        for k, (opt, member_state) in enumerate(zip(self.optimizers, members)):
            try:
                opt.load_state_dict(member_state)
            except (ValueError, KeyError, TypeError, RuntimeError) as err:
                for done, backup in zip(self.optimizers[:k], backups):
                    done.load_state_dict(backup)
                raise ValueError(f"optimizer state of member {k} does not fit its optimizer: {err}") from err

    def member_state_dict(self, i: int) -> dict[str, Any]:
        """Member ``i``'s optimizer state (``torch.optim`` format)."""
        return self.optimizers[member_index(i, len(self.optimizers))].state_dict()

    def load_member_state_dict(self, i: int, state_dict: dict[str, Any]) -> None:
        self.optimizers[member_index(i, len(self.optimizers))].load_state_dict(state_dict)

    def reset_member(self, i: int) -> None:
        """Forget member ``i``'s optimizer state (momentum, Adam moments and step count), as a fresh optimizer."""
        self.optimizers[member_index(i, len(self.optimizers))].state.clear()

    def __repr__(self) -> str:
        return f"CohortOptimizer({len(self.optimizers)} x {type(self.optimizers[0]).__name__})"


# ---------------------------------------------------------------- stacked
#: torch optimizers the stacked backend reproduces, with the hyperparameters it reads.
STACKED_OPTIMIZERS: dict[type, tuple[str, ...]] = {
    torch.optim.SGD: ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"),
    torch.optim.Adam: ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"),
    torch.optim.AdamW: ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"),
}
#: Hyperparameters that may differ between members (schedulers change lr per member; population-based
#: training gives each member its own lr, weight decay, momentum, betas and eps). The others are shared.
_PER_MEMBER = ("lr", "weight_decay", "momentum", "betas", "eps")


class StackedOptimizer(Optimizer):
    """SGD or Adam(W) over a stacked cohort's ``[N, ...]`` parameters, numerically each member's own optimizer.

    Args:
        stacked: the stacked parameters (leaves ``[N, ...]``).
        members: each member's (alias) parameters, in the same order; member
            ``i``'s param group holds them and its hyperparameters, so
            ``param_groups[i]["lr"]`` is member ``i``'s learning rate.
        kind: ``torch.optim.SGD``, ``Adam`` or ``AdamW``.
        defaults: the optimizer's keyword arguments (``lr``, ``momentum``, ...).

    ``step(members=[...])`` updates only those members: their rows are
    gathered, stepped and written back, and every other member's parameters
    and state stay bit-for-bit unchanged. ``state_dict()`` has the format of
    :class:`CohortOptimizer` (one ``torch.optim`` state per member), so
    checkpoints load across backends. :attr:`optimizers` are per-member views
    (for lr schedulers and callbacks): ``state_dict``/``load_state_dict`` of
    one member.

    Examples:
        >>> w = torch.nn.Parameter(torch.ones(3, 2))            # 3 members of a 2-vector
        >>> views = [[torch.nn.Parameter(w.data[i], requires_grad=False)] for i in range(3)]
        >>> opt = StackedOptimizer([w], views, torch.optim.SGD, {"lr": 0.5, "momentum": 0.9})
        >>> w.grad = torch.ones(3, 2); opt.step(members=[1]); w.data[:, 0].tolist()
        [1.0, 0.5, 1.0]
    """

    def __init__(self, stacked: Sequence[torch.nn.Parameter], members: Sequence[Sequence[torch.Tensor]],
                 kind: type, defaults: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        if kind not in STACKED_OPTIMIZERS:
            raise ValueError(
                f"the stacked backend steps {', '.join(k.__name__ for k in STACKED_OPTIMIZERS)}; got {kind.__name__} "
                "(use backend='loop' for other optimizers)"
            )
        per_member = [defaults] * len(members) if isinstance(defaults, dict) else list(defaults)
        if len(per_member) != len(members):
            raise ValueError(f"got {len(per_member)} optimizer settings for {len(members)} members")
        hypers = [_stacked_hyperparameters(kind, d) for d in per_member]
        self.kind, self.stacked = kind, list(stacked)
        super().__init__([{"params": list(p), **h} for p, h in zip(members, hypers)], defaults=hypers[0])
        for name in hypers[0]:
            if name not in _PER_MEMBER:
                self._shared(name)  # say now, not at the first step, when members disagree
        n = len(self.param_groups)
        self._state: dict[str, list[torch.Tensor]] = {}
        self._has_buffer = torch.zeros(n, dtype=torch.bool)
        self._hyper_cache: tuple | None = None  # (key, lr, weight decay) of the last step's members
        self.optimizers = [_MemberOptimizer(self, i) for i in range(n)]

    # Optimizer.__init__ and torch's hooks read/write .state; the real state is stacked
    @property  # type: ignore[override]
    def state(self) -> dict:
        return {}

    @state.setter
    def state(self, value: Any) -> None:
        pass

    def _per_member_tensors(self, picked: list[int], device: torch.device) -> dict[str, Any]:
        """The picked members' per-member hyperparameters, rebuilt only when they change: ``lr`` and
        ``weight_decay`` as float64 ``[n]`` tensors; SGD's ``momentum``, Adam's ``beta1``, ``beta2``, ``eps`` as
        one float when every picked member has the same value (the fast path), else as ``[n]`` tensors."""
        sgd = self.kind is torch.optim.SGD
        columns = ("lr", "weight_decay", "momentum") if sgd else ("lr", "weight_decay", "beta1", "beta2", "eps")
        rows = tuple(_hyper_row(self.param_groups[i], sgd) for i in picked)
        key = (tuple(picked), rows, device)
        cached = self._hyper_cache
        if cached is None or cached[0] != key:
            values = torch.tensor(rows, dtype=torch.float64, device=device)
            out: dict[str, Any] = {}
            for k, name in enumerate(columns):
                same = all(row[k] == rows[0][k] for row in rows)
                out[name] = values[:, k] if name in ("lr", "weight_decay") or not same else rows[0][k]
            cached = (key, out)
            self._hyper_cache = cached
        return cached[1]

    def _shared(self, name: str) -> Any:
        first = self.param_groups[0][name]
        if all(g[name] is first or g[name] == first for g in self.param_groups):  # called every step: no reprs then
            return first
        values = {repr(g[name]) for g in self.param_groups}
        if len(values) > 1:
            raise ValueError(
                f"members' {self.kind.__name__} {name} differ ({sorted(values)}); the stacked backend needs one "
                f"value for all members (only {', '.join(_PER_MEMBER)} may differ)"
            )
        return self.param_groups[0][name]

    def _ensure_state(self) -> None:
        zeros = lambda: [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.stacked]  # noqa: E731
        if self.kind is torch.optim.SGD:
            # a buffer as soon as any member has momentum (population-based training may turn it on mid-run)
            if "momentum_buffer" not in self._state and any(g["momentum"] != 0 for g in self.param_groups):
                self._state["momentum_buffer"] = zeros()
            return
        if self._state:
            return
        else:
            self._state["exp_avg"], self._state["exp_avg_sq"] = zeros(), zeros()
            if self.param_groups[0]["amsgrad"]:
                self._state["max_exp_avg_sq"] = zeros()
            self._state["step"] = [torch.zeros(len(self.param_groups), device=p.device) for p in self.stacked]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, members: Sequence[int] | None = None,
             allow_empty: bool = False) -> Any:  # type: ignore[override]
        """Run ``closure`` once, then step every member (or only ``members``; with ``allow_empty``, none for ``[]``)
        whose gradients exist."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        n = len(self.param_groups)
        picked = _stepped_members(members, n, allow_empty)
        if picked == [] or any(p.grad is None for p in self.stacked):
            return loss
        self._ensure_state()
        device = self.stacked[0].device
        rows = None if picked is None else torch.tensor(picked, device=device)
        take = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))  # noqa: E731
        params = [take(p.data) for p in self.stacked]
        grads = [take(p.grad) for p in self.stacked]
        state = {k: [take(t) for t in v] for k, v in self._state.items()}
        picked = list(range(n)) if picked is None else picked
        hyper = self._per_member_tensors(picked, device)
        lr, wd = hyper["lr"], hyper["weight_decay"]
        maximize = bool(self._shared("maximize"))
        if self.kind is torch.optim.SGD:
            has = self._has_buffer.to(device)
            has_rows = has if rows is None else has.index_select(0, rows)
            momentum = hyper["momentum"]
            if isinstance(momentum, torch.Tensor) or momentum != 0:
                FS.sgd_step_(params, grads, state["momentum_buffer"], has_rows, lr, wd, momentum=momentum,
                             dampening=self._shared("dampening"), nesterov=self._shared("nesterov"), maximize=maximize)
                moving = [i for i in picked if self.param_groups[i]["momentum"] != 0]
                self._has_buffer[moving] = True
            else:  # no picked member has momentum: plain SGD, any buffers (from earlier momentum) left alone
                FS.sgd_step_(params, grads, [], has_rows, lr, wd, momentum=0.0, dampening=self._shared("dampening"),
                             nesterov=self._shared("nesterov"), maximize=maximize)
        else:
            FS.adam_step_(params, grads, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq", []),
                          state["step"], lr, wd, beta1=hyper["beta1"], beta2=hyper["beta2"], eps=hyper["eps"],
                          amsgrad=self._shared("amsgrad"), maximize=maximize,
                          decoupled_weight_decay=bool(self._shared("decoupled_weight_decay")))
        if rows is not None:  # gathered rows were copies: write back only the stepped members
            for p, new in zip(self.stacked, params):
                p.data.index_copy_(0, rows, new)
            for key, tensors in self._state.items():
                for full, new in zip(tensors, state[key]):
                    full.index_copy_(0, rows, new)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.stacked:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    # ------------------------------------------------------------ member states
    def member_state_dict(self, i: int) -> dict[str, Any]:
        """Member ``i``'s state in ``torch.optim`` format (what its own optimizer's ``state_dict()`` would be)."""
        i = member_index(i, len(self.param_groups))
        state: dict[int, dict[str, torch.Tensor]] = {}
        started = bool(self._state) and (self.kind is not torch.optim.SGD and bool(self._state["step"][0][i] > 0)
                                         or self.kind is torch.optim.SGD and bool(self._has_buffer[i]))
        if started:
            for k in range(len(self.stacked)):
                state[k] = {key: (t[k][i].clone() if key != "step" else t[k][i].clone().cpu())
                            for key, t in self._state.items()}
        group = {k: copy.deepcopy(v) for k, v in self.param_groups[i].items() if k != "params"}
        group["params"] = list(range(len(self.stacked)))
        return {"state": state, "param_groups": [group]}

    @torch.no_grad()
    def load_member_state_dict(self, i: int, state_dict: dict[str, Any]) -> None:
        """Load a ``torch.optim`` state (e.g. a loop cohort member's) into member ``i``; all checked before written."""
        i = member_index(i, len(self.param_groups))
        if not isinstance(state_dict, dict):
            raise ValueError(f"optimizer state of member {i} must be a torch.optim state dict, got {type(state_dict).__name__}")
        groups, state = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(groups, list) or len(groups) != 1 or not isinstance(state, dict):
            raise ValueError(f"optimizer state of member {i} must hold one param group and a state dict, got {sorted(state_dict)}")
        k = len(self.stacked)
        if len(groups[0].get("params", [])) != k:
            raise ValueError(f"optimizer state of member {i} has {len(groups[0].get('params', []))} parameters, the member has {k}")
        self._ensure_state()
        if (self.kind is torch.optim.SGD and "momentum_buffer" not in self._state
                and any(isinstance(e, dict) and "momentum_buffer" in e for e in state.values())):
            # a member with momentum comes into a cohort whose members have none (yet): room for its buffer
            self._state["momentum_buffer"] = [torch.zeros_like(p) for p in self.stacked]
        keys = set(self._state) - ({"step"} if self.kind is torch.optim.SGD else set())
        for idx, entry in state.items():
            # torch.optim keys parameters by int (str after a JSON round trip)
            if not (is_int_at_least(idx, 0) or isinstance(idx, str) and idx.isdigit()) or int(idx) >= k:
                raise ValueError(f"optimizer state of member {i}: parameter index {idx!r} is not one of 0..{k - 1}")
            if not isinstance(entry, dict) or set(entry) != keys:
                got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
                raise ValueError(f"optimizer state of member {i}, parameter {idx}: expected keys {sorted(keys)}, got {got}")
            for key, value in entry.items():
                want = self._state[key][int(idx)][i]
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"optimizer state of member {i}, parameter {idx}, {key!r}: expected a tensor, "
                                     f"got {type(value).__name__}")
                if key != "step" and tuple(value.shape) != tuple(want.shape):
                    raise ValueError(f"optimizer state of member {i}, parameter {idx}, {key!r}: shape {tuple(value.shape)}, expected {tuple(want.shape)}")
                if value.is_floating_point() and not bool(value.isfinite().all()):
                    raise ValueError(f"optimizer state of member {i}, parameter {idx}, {key!r} holds NaN or inf values")
        if state and len(state) != k:
            raise ValueError(f"optimizer state of member {i} covers {len(state)} of its {k} parameters")
        group = self.param_groups[i]
        before = dict(group)
        group.update({key: v for key, v in groups[0].items() if key != "params"})
        try:  # hyperparameters the stacked step shares must still agree across members
            lr = group.get("lr")
            try:  # a number or a 0-d tensor, as torch.optim takes
                value = float(lr) if not isinstance(lr, (bool, str)) else math.nan
            except (TypeError, ValueError, RuntimeError):
                value = math.nan
            if not 0 <= value < math.inf:
                raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
            for name in group:
                if name != "params" and name not in _PER_MEMBER and name in self.defaults:
                    self._shared(name)
        except ValueError as err:
            group.clear()
            group.update(before)
            raise ValueError(f"optimizer state of member {i}: {err}") from None
        for key, tensors in self._state.items():
            for idx, t in enumerate(tensors):
                entry = state.get(idx, state.get(str(idx)))
                t[i] = entry[key].to(t.device, t.dtype) if entry is not None else 0
        if self.kind is torch.optim.SGD:
            self._has_buffer[i] = bool(state)

    def reset_member(self, i: int) -> None:
        """Forget member ``i``'s optimizer state (momentum, Adam moments and step count), as a fresh optimizer."""
        i = member_index(i, len(self.param_groups))
        for tensors in self._state.values():
            for t in tensors:
                t[i] = 0
        self._has_buffer[i] = False

    def state_dict(self) -> dict[str, Any]:
        return {"members": [self.member_state_dict(i) for i in range(len(self.param_groups))]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        members = _member_states(state_dict, len(self.param_groups))
        backup = self.state_dict()
        for i, member_state in enumerate(members):
            try:
                self.load_member_state_dict(i, member_state)
            except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as err:
                for j, old in enumerate(backup["members"][:i]):
                    self.load_member_state_dict(j, old)
                raise ValueError(f"optimizer state of member {i} does not fit its optimizer: {err}") from err

    def __repr__(self) -> str:
        return f"StackedOptimizer({len(self.param_groups)} x {self.kind.__name__})"


class _MemberOptimizer(Optimizer):
    """One member of a :class:`StackedOptimizer`, for an lr scheduler or a callback's snapshot (cannot step alone)."""

    def __init__(self, parent: StackedOptimizer, index: int) -> None:
        self.parent, self.index = parent, index
        self.defaults = parent.defaults
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = {}, {}
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}
        self.state = {}

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return [self.parent.param_groups[self.index]]

    def step(self, closure: Any = None) -> Any:  # pragma: no cover - a view cannot step alone
        raise RuntimeError("a stacked cohort member's optimizer steps with the whole StackedOptimizer (step(members=[i]))")

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return self.parent.member_state_dict(self.index)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.parent.load_member_state_dict(self.index, state_dict)


def _stacked_hyperparameters(kind: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    probe = kind([torch.zeros(1, requires_grad=True)], **kwargs)  # torch validates the values and fills defaults
    for flag in ("foreach", "fused", "capturable", "differentiable"):
        if probe.defaults.get(flag):
            raise ValueError(f"{kind.__name__}({flag}=True) has no stacked form; leave {flag} unset")
    hyper = {k: probe.defaults[k] for k in STACKED_OPTIMIZERS[kind] if k in probe.defaults}
    if kind is torch.optim.AdamW:
        hyper["decoupled_weight_decay"] = True
    if kind is not torch.optim.SGD:
        hyper.setdefault("decoupled_weight_decay", False)
    return hyper


def _hyper_row(group: dict[str, Any], sgd: bool) -> tuple[float, ...]:
    """A param group's per-member hyperparameters as floats: lr, weight decay, then SGD's momentum or Adam's
    beta1, beta2, eps (a 0-d tensor lr, as torch.optim takes, becomes its value)."""
    number = lambda v: float(v.item() if isinstance(v, torch.Tensor) else v)  # noqa: E731
    head = (number(group["lr"]), number(group["weight_decay"]))
    if sgd:
        return (*head, number(group["momentum"]))
    return (*head, *(number(b) for b in group["betas"]), number(group["eps"]))


def _member_states(state_dict: Any, n: int) -> list[Any]:
    members = state_dict.get("members") if isinstance(state_dict, dict) else None
    if not isinstance(members, list):
        raise ValueError(
            "optimizer state must be a CohortOptimizer state ({'members': [...]}), "
            f"got keys {sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__}"
        )
    if len(members) != n:
        raise ValueError(f"optimizer state holds {len(members)} members but this cohort has {n}")
    return members


def _stepped_members(members: Sequence[int] | None, n: int, allow_empty: bool = False) -> list[int] | None:
    """The distinct members ``step(members=...)`` names, sorted; None for all of them (``None`` or every index).

    An empty ``members`` is a mistake unless ``allow_empty``: then it is a step of no member (under DDP a
    rank whose members all sit a step out still steps with the others, so Lightning counts steps alike)."""
    if members is None:
        return None
    members = list(members)
    if not members:
        if allow_empty:
            return []
        raise ValueError("step(members=...) needs at least one member index, got none (pass members=None for all)")
    picked = sorted({member_index(m, n) for m in members})
    return None if picked == list(range(n)) else picked


# ------------------------------------------------------------ server optimizers
class _AdaptiveServerOptimizer(Optimizer):
    """FedAdam, FedYogi and FedAdagrad: one step a round on the pseudo-gradient set as ``p.grad``.

    Every parameter's state is ``exp_avg`` (``m``, starting at 0) and the
    second moment (``v``, starting at ``tau**2``), tensors of the parameter's
    shape and dtype in ``self.state[p]``, so ``state_dict()`` /
    ``load_state_dict()`` carry them and a resumed server continues exactly.
    The step itself is a function of :mod:`lightning_colearn.functional.server`.
    """

    _second_moment = "exp_avg_sq"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)  # fills the defaults, refuses a parameter held twice
        group = self.param_groups[-1]
        try:
            self._check_group(group)
            for k, p in enumerate(group["params"]):
                if not p.is_floating_point():
                    raise TypeError(f"{type(self).__name__} steps floating parameters only; parameter {k} is {p.dtype}")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _step_group(self, group: dict[str, Any], params: list, grads: list, exp_avgs: list, seconds: list) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run ``closure`` once, then one server step for every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, seconds = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if not state:  # m_{-1} = 0 and v_{-1} = tau^2 (Reddi et al.: v_{-1} >= tau^2)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state[self._second_moment] = torch.full_like(
                        p, float(group["tau"]) ** 2, memory_format=torch.preserve_format
                    )
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                seconds.append(state[self._second_moment])
            if params:
                self._step_group(group, params, grads, exp_avgs, seconds)
        return loss


class _TwoBetaServerOptimizer(_AdaptiveServerOptimizer):
    """FedAdam and FedYogi: ``lr``, ``betas = (beta1, beta2)`` and ``tau``; they differ in their step function only."""

    _step_function: Callable[..., None]

    def __init__(self, params: Any, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.99), tau: float = 1e-3) -> None:
        _check_positive("lr", lr)
        _check_betas(betas)
        _check_positive("tau", tau)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "tau": tau})

    def _check_group(self, group: dict[str, Any]) -> None:
        _check_positive("lr", group["lr"])
        _check_betas(group["betas"])
        _check_positive("tau", group["tau"])

    def _step_group(self, group: dict[str, Any], params: list, grads: list, exp_avgs: list, seconds: list) -> None:
        beta1, beta2 = _check_betas(group["betas"])
        type(self)._step_function(params, grads, exp_avgs, seconds, lr=group["lr"], beta1=beta1, beta2=beta2, tau=group["tau"])


class FedAdam(_TwoBetaServerOptimizer):
    """FedAdam: Adam on the server's pseudo-gradient (Reddi et al., 2021, "Adaptive Federated Optimization", Algorithm 2).

    With ``g = x - aggregate`` (the paper's ``-Delta_t``), per coordinate::

        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        x = x - lr * m / (sqrt(v) + tau)

    Args:
        params: the global model's parameters (or param groups).
        lr: the server learning rate ``eta > 0``; the paper tunes it per task
            on a grid, so the default 1e-2 is a starting point only.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``; ``(0.9, 0.99)`` as in
            the paper's experiments.
        tau: the adaptivity ``tau > 0``, which bounds the step where ``v`` is
            small (the smaller, the more adaptive); 1e-3, around where the
            paper's experiments put it.

    The server sets each parameter's ``grad`` to the pseudo-gradient
    ``g = x - aggregate`` (:func:`~lightning_colearn.functional.server.pseudo_gradient`)
    and calls ``step()`` once a round. No bias correction: the paper has
    none. The arithmetic is float64, written back in the parameter's dtype;
    the state has the parameter's dtype, as in ``torch.optim`` (for a
    float16 model ``tau**2 = 1e-6`` is a float16 subnormal, about 1% off).

    Examples:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2))            # the global model
        >>> server = FedAdam([w], lr=0.1)
        >>> aggregate = [torch.tensor([1.0, -2.0])]            # e.g. fedavg of the clients' models
        >>> from lightning_colearn.functional import pseudo_gradient
        >>> w.grad = pseudo_gradient([w], aggregate)[0]
        >>> server.step(); w.data                             # about lr * sign(aggregate - x)
        tensor([ 0.0990, -0.0995])
    """

    _step_function = staticmethod(fedadam_step_)


class FedYogi(_TwoBetaServerOptimizer):
    """FedYogi: Yogi on the server's pseudo-gradient (Reddi et al., 2021, Algorithm 2; Yogi: Zaheer et al., 2018).

    With ``g = x - aggregate`` (the paper's ``-Delta_t``), per coordinate::

        m = beta1 * m + (1 - beta1) * g
        v = v - (1 - beta2) * g**2 * sign(v - g**2)
        x = x - lr * m / (sqrt(v) + tau)

    Yogi's ``v`` changes by ``(1 - beta2) * g**2`` a round where Adam's changes
    by ``(1 - beta2) * |v - g**2|``: after large pseudo-gradients followed by
    small ones, Yogi's effective learning rate grows back more slowly.

    Args:
        params: the global model's parameters (or param groups).
        lr: the server learning rate ``eta > 0``; tuned per task in the paper, 1e-2 is a start.
        betas: ``(beta1, beta2)``, each in ``[0, 1)``; ``(0.9, 0.99)`` as in
            the paper's experiments.
        tau: the adaptivity ``tau > 0``; 1e-3, around where the paper's experiments put it.

    The server sets each parameter's ``grad`` to the pseudo-gradient
    ``g = x - aggregate`` (:func:`~lightning_colearn.functional.server.pseudo_gradient`)
    and calls ``step()`` once a round. No bias correction: the paper has
    none. The arithmetic is float64, written back in the parameter's dtype;
    the state has the parameter's dtype, as in ``torch.optim`` (for a
    float16 model ``tau**2 = 1e-6`` is a float16 subnormal, about 1% off).

    Examples:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> server = FedYogi([w], lr=0.1)
        >>> w.grad = torch.tensor([-1.0, 2.0])                # x - aggregate
        >>> server.step(); server.state[w]["exp_avg_sq"]      # tau^2 + 0.01 * g^2
        tensor([0.0100, 0.0400])
    """

    _step_function = staticmethod(fedyogi_step_)


class FedAdagrad(_AdaptiveServerOptimizer):
    """FedAdagrad: Adagrad with momentum on the server's pseudo-gradient (Reddi et al., 2021, Algorithm 2).

    With ``g = x - aggregate`` (the paper's ``-Delta_t``), per coordinate::

        m = beta1 * m + (1 - beta1) * g
        v = v + g**2
        x = x - lr * m / (sqrt(v) + tau)

    The state's second moment is ``sum_sq`` (a sum, not an average).

    Args:
        params: the global model's parameters (or param groups).
        lr: the server learning rate ``eta > 0``; tuned per task in the paper, 1e-2 is a start.
        beta1: the momentum decay in ``[0, 1)``; 0.9 as FedAdam and FedYogi
            (the paper's algorithm has it; 0 is plain server Adagrad).
        tau: the adaptivity ``tau > 0``; 1e-3, around where the paper's experiments put it.

    The server sets each parameter's ``grad`` to the pseudo-gradient
    ``g = x - aggregate`` (:func:`~lightning_colearn.functional.server.pseudo_gradient`)
    and calls ``step()`` once a round. No bias correction: the paper has
    none. The arithmetic is float64, written back in the parameter's dtype;
    the state has the parameter's dtype, as in ``torch.optim`` (for a
    float16 model ``tau**2 = 1e-6`` is a float16 subnormal, about 1% off).

    Examples:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> server = FedAdagrad([w], lr=1.0, beta1=0.0)
        >>> for _ in range(2):
        ...     w.grad = torch.tensor([3.0]); server.step()
        >>> server.state[w]["sum_sq"]                         # tau^2 + 9 + 9
        tensor([18.])
    """

    _second_moment = "sum_sq"

    def __init__(self, params: Any, lr: float = 1e-2, beta1: float = 0.9, tau: float = 1e-3) -> None:
        _check_positive("lr", lr)
        _check_decay("beta1", beta1)
        _check_positive("tau", tau)
        super().__init__(params, {"lr": lr, "beta1": beta1, "tau": tau})

    def _check_group(self, group: dict[str, Any]) -> None:
        _check_positive("lr", group["lr"])
        _check_decay("beta1", group["beta1"])
        _check_positive("tau", group["tau"])

    def _step_group(self, group: dict[str, Any], params: list, grads: list, exp_avgs: list, seconds: list) -> None:
        fedadagrad_step_(params, grads, exp_avgs, seconds, lr=group["lr"], beta1=group["beta1"], tau=group["tau"])

