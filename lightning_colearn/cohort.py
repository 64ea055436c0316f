"""A cohort: N member models that are trained together and combined as wholes.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> cohort = Cohort(lambda: nn.Linear(2, 1), size=3)   # three independently initialised members
    >>> cohort.average()                                    # every member := the mean member
    >>> torch.equal(cohort[0].weight, cohort[2].weight)
    True
    >>> cohort.forward(torch.ones(4, 2)).shape               # outputs stacked over members
    torch.Size([3, 4, 1])
    >>> stacked = Cohort(lambda: nn.Linear(2, 1), size=3, backend="stacked")
    >>> stacked.stacked_parameters()[0].shape                # member i's weight is a view of row i
    torch.Size([3, 1, 2])
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_colearn._checks import is_int_at_least, member_index
from lightning_colearn.functional import arithmetic as F
from lightning_colearn.stacked import StackedMismatchError, StackedModel

__all__ = ["BACKENDS", "Cohort", "MemberSpec"]

#: The ``format`` metadata of files written by :meth:`Cohort.save`.
COHORT_FORMAT = "lightning_colearn.cohort/1"

#: Where a cohort keeps its members' tensors (``"auto"`` is resolved by :class:`~lightning_colearn.CohortModule`).
BACKENDS = ("loop", "stacked")

#: What a cohort can be built from: a module (copied), a class or factory (called), or a list of modules.
MemberSpec = nn.Module | Callable[[], nn.Module] | Sequence[nn.Module]


class Cohort(nn.Module):
    """N member modules, addressable by index, with arithmetic on whole members.

    Args:
        members: one of
            * a list of modules (may differ in architecture: a heterogeneous cohort);
            * an ``nn.Module`` instance and ``size``: ``size`` deep copies, all
              starting from the same weights (colearn's "all start equal");
            * a class or zero-argument factory and ``size``: ``size`` calls,
              each member initialised independently.
        size: number of members when ``members`` is not a list.
        backend: ``"loop"`` (each member owns its tensors; members may differ)
            or ``"stacked"`` (same-architecture members only): every parameter
            and buffer lives in one ``[N, ...]`` tensor of a
            :class:`~lightning_colearn.stacked.StackedModel`, member ``i``'s
            tensors are views of row ``i``, and :meth:`stacked_forward` runs all
            (or some) members in one call. Indexing, ``state_dict`` (same keys
            as the loop backend) and all arithmetic work the same on both; the
            member views do not require grad, so train a stacked cohort through
            :meth:`stacked_forward` and :meth:`stacked_parameters`.

    A member's *state* is its parameters **and** buffers, in ``state_dict``
    order. Arithmetic (:meth:`average`, :meth:`weighted_sum`, :meth:`lerp`,
    :meth:`broadcast`, :meth:`load_member_state`) writes into the existing
    tensors in place, under ``torch.no_grad()``: parameters keep their
    identity, so optimizers never hold stale references. It needs members of
    the same architecture and otherwise raises
    :class:`~lightning_colearn.functional.CohortMismatchError` naming the two
    members and the first tensor that differs.
    """

    def __init__(self, members: MemberSpec, size: int | None = None, backend: str = "loop") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        self.members = nn.ModuleList(_build_members(members, size))
        _check_no_shared_tensors(self.members)
        self.backend = backend
        if backend == "stacked":
            try:
                self.check_compatible()
                _check_same_modules(self.members)
            except F.CohortMismatchError as err:
                raise F.CohortMismatchError(f"backend='stacked' needs members of one architecture: {err}") from None
            self.__dict__["engine"] = StackedModel(self.members)  # not a submodule: state_dict keys stay the members'
            self._tie()

    # ------------------------------------------------------------ stacked
    def _tie(self) -> None:
        """Make every member tensor a view of its row in the engine's stacked tensors."""
        engine: StackedModel = self.engine
        for i, member in enumerate(self.members):
            for name in engine.param_names:
                member.get_parameter(name).data = engine.tensor(name).data[i]
                member.get_parameter(name).requires_grad_(False)
            for name in engine.buffer_names:
                path, _, leaf = name.rpartition(".")
                (member.get_submodule(path) if path else member)._buffers[leaf] = engine.tensor(name)[i]

    def _apply(self, fn, recurse: bool = True):
        if self.backend != "stacked":
            return super()._apply(fn, recurse)
        self.engine._apply(fn, recurse)  # moves the stacked tensors (parameters keep their identity) ...
        self._tie()  # ... and the member views follow
        return self

    def train(self, mode: bool = True) -> Cohort:
        super().train(mode)
        if self.backend == "stacked":
            self.engine.train(mode)
        return self

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self.__dict__.get("backend") == "stacked":  # deepcopy/unpickle copied views and rows apart
            self._tie()

    def stacked_parameters(self) -> list[nn.Parameter]:
        """The ``[N, ...]`` parameter leaves of a stacked cohort, in the members' ``parameters()`` order."""
        self._require_stacked("stacked_parameters")
        return self.engine.stacked_parameters()

    def stacked_forward(self, x: Tensor, members: Sequence[int] | None = None, per_member: bool = False) -> Tensor:
        """Outputs ``[n, B, ...]`` of ``members`` (default: all) in one call; only they are computed.

        ``x`` is a batch all of them see, or with ``per_member=True`` one batch
        per member, ``[n, B, ...]``. On first use the stacked forward is
        checked once against the members' own ``forward`` (see
        :meth:`StackedModel.check`).
        """
        self._require_stacked("stacked_forward")
        if not isinstance(x, Tensor):
            raise TypeError(f"stacked_forward needs a Tensor, got {type(x).__name__}")
        index, n = None, len(self)
        if members is not None:
            indices = self._indices(members)
            n = len(indices)
            if indices != list(range(len(self))):  # every member in order: the stacked tensors themselves
                index = torch.tensor(indices, device=x.device)
        if per_member and (x.dim() < 2 or x.shape[0] != n):
            raise ValueError(f"stacked_forward(per_member=True) needs one batch per member, [{n}, B, ...], "
                             f"got shape {tuple(x.shape)}")
        try:
            if not self.engine._checked:
                self.engine.check(list(self.members), x if members is None or not per_member else x[:1].expand(len(self), *x.shape[1:]), per_member)
            return self.engine(x, index=index, per_member=per_member)
        except StackedMismatchError:  # the members' own forward disagrees: not an input problem
            raise
        except RuntimeError as err:  # torch's message names the batched kernels' shapes, not the member's input
            what = f"[{n}, B, ...] (one batch per member)" if per_member else "[B, ...], what one member's forward takes"
            raise RuntimeError(f"stacked forward of {n} members failed on an input of shape {tuple(x.shape)}; the input "
                               f"must be {what}: {err}") from err

    def member_parameters(self, index: int) -> list[Tensor]:
        """Member ``index``'s parameters as differentiable tensors (stacked: views of the leaves' rows)."""
        if self.backend == "stacked":
            return [p[self._check_index(index)] for p in self.engine.stacked_parameters()]
        return list(self.members[self._check_index(index)].parameters())

    def _require_stacked(self, what: str) -> None:
        if self.backend != "stacked":
            raise RuntimeError(f"Cohort.{what} needs backend='stacked'; this cohort uses backend={self.backend!r}")

    # ------------------------------------------------------------ container
    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, index: int) -> nn.Module:
        return self.members[self._check_index(index)]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.members)

    def forward(self, *args, **kwargs) -> Tensor:
        """Run every member on the same input and stack the outputs: ``[N, ...]``."""
        if self.backend == "stacked" and len(args) == 1 and not kwargs:
            return self.stacked_forward(args[0])
        return torch.stack([member(*args, **kwargs) for member in self.members])

    @property
    def is_homogeneous(self) -> bool:
        """True when all members have the same tensor names, shapes and dtypes."""
        try:
            self.check_compatible()
        except F.CohortMismatchError:
            return False
        return True

    def check_compatible(self, indices: Sequence[int] | None = None) -> None:
        """Raise ``CohortMismatchError`` unless the members at ``indices`` (default: all) can be combined."""
        indices = range(len(self)) if indices is None else indices
        F.check_same_structure({i: self.members[self._check_index(i)].state_dict() for i in indices})

    # ---------------------------------------------------------- member state
    def member_tensors(self, index: int) -> list[Tensor]:
        """The live tensors (parameters and buffers, ``state_dict`` order) of member ``index``."""
        return list(self.members[self._check_index(index)].state_dict(keep_vars=True).values())

    def member_state(self, index: int) -> dict[str, Tensor]:
        """A detached copy of member ``index``'s parameters and buffers."""
        return {k: v.detach().clone() for k, v in self.members[self._check_index(index)].state_dict().items()}

    @torch.no_grad()
    def load_member_state(self, index: int, state: Mapping[str, Tensor], allow_nonfinite: bool = False) -> None:
        """Copy ``state`` into member ``index`` in place.

        The state must have exactly the member's tensor names, shapes and
        dtypes, and (unless ``allow_nonfinite``) no NaN/Inf. Everything is
        checked before anything is written, so a bad state changes nothing.
        """
        own = self._check_member_state(index, state, allow_nonfinite)
        F.copy_([list(own.values())], [state[name].to(tensor.device) for name, tensor in own.items()])

    def _check_member_state(self, index: int, state: Mapping[str, Tensor], allow_nonfinite: bool) -> dict[str, Tensor]:
        member = self.members[self._check_index(index)]
        own = member.state_dict(keep_vars=True)
        if not isinstance(state, Mapping):
            raise TypeError(f"state for member {index} must be a mapping of name -> Tensor (a state_dict), "
                            f"got {type(state).__name__}")
        for name, tensor in state.items():
            if not isinstance(tensor, Tensor):
                raise TypeError(f"state for member {index}: {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
        if set(own) != set(state):  # any key order (safetensors returns keys sorted)
            _raise_keys(index, own, state)
        for name, tensor in state.items():
            if tensor.shape != own[name].shape or tensor.dtype != own[name].dtype:
                raise F.CohortMismatchError(
                    f"state for member {index} does not fit at {name!r}: got {tuple(tensor.shape)} {tensor.dtype}, "
                    f"member has {tuple(own[name].shape)} {own[name].dtype}"
                )
        bad = None if allow_nonfinite else F.first_non_finite(state)
        if bad is not None:
            raise ValueError(f"state for member {index} has NaN/Inf values in {bad!r}; refusing to load it")
        return own

    # -------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> str:
        """Write every member's parameters and buffers to one safetensors file (atomically); returns its SHA-256.

        Keys are ``"<member>.<name>"``. Keep the digest apart from the file
        (as a ledger keeps its head hash) and pass it to :meth:`load` to detect
        a changed file; :meth:`load` also checks it against a ``.sha256`` file
        written next to the weights.

        Examples:
            >>> import tempfile, os
            >>> from torch import nn
            >>> a, b = Cohort(lambda: nn.Linear(2, 1), size=2), Cohort(lambda: nn.Linear(2, 1), size=2)
            >>> path = os.path.join(tempfile.mkdtemp(), "cohort.safetensors")
            >>> sha = a.save(path); b.load(path, sha256=sha)
            >>> torch.equal(a[1].weight, b[1].weight)
            True
        """
        from safetensors.torch import save

        from lightning_colearn._io import write_bytes

        tensors = {f"{i}.{k}": v.cpu().contiguous() for i in range(len(self)) for k, v in self.member_state(i).items()}  # copies
        data = save(tensors, metadata={"format": COHORT_FORMAT, "members": str(len(self))})
        sha = hashlib.sha256(data).hexdigest()
        write_bytes(path, data)
        write_bytes(f"{os.fspath(path)}.sha256", f"{sha}\n".encode())
        return sha

    @torch.no_grad()
    def load(self, path: str | os.PathLike, sha256: str | None = None, allow_nonfinite: bool = False) -> None:
        """Load a file written by :meth:`save` into every member, all or nothing (safetensors, never pickle).

        Refused with a clear error, before any member changes: an unreadable or
        truncated file, a digest that differs from ``sha256`` (or from the
        ``.sha256`` file next to it), another number of members, missing or
        extra tensors, wrong shapes or dtypes, NaN/Inf values.
        """
        from safetensors.torch import load

        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise ValueError(f"cannot read cohort weights {path!r}: {err}") from err
        sha = hashlib.sha256(data).hexdigest()
        expected = {"argument": sha256}
        sidecar = f"{path}.sha256"
        if os.path.exists(sidecar):
            with open(sidecar) as f:
                expected["sidecar file"] = f.read().strip()
        for source, want in expected.items():
            if want is not None and want != sha:
                raise ValueError(f"cohort weights {path!r} have SHA-256 {sha}, but the {source} says {want}; refusing to load them")
        try:
            tensors = load(data)
            # the header (8-byte length, then JSON) holds the metadata: read it from the bytes already in memory
            metadata = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
        except Exception as err:  # safetensors raises its own error types for corrupt or truncated bytes
            raise ValueError(f"cohort weights {path!r} are not a readable safetensors file: {err}") from err
        if metadata.get("format") != COHORT_FORMAT or metadata.get("members") != str(len(self)):
            raise ValueError(
                f"cohort weights {path!r} hold format {metadata.get('format')!r} with {metadata.get('members')} members; "
                f"this cohort needs format {COHORT_FORMAT!r} with {len(self)} members"
            )
        states: list[dict[str, Tensor]] = [{} for _ in range(len(self))]
        for key, tensor in tensors.items():
            member, _, name = key.partition(".")
            if not member.isdigit() or int(member) >= len(self):
                raise ValueError(f"cohort weights {path!r} hold {key!r}, which belongs to no member of this cohort")
            states[int(member)][name] = tensor
        for i, state in enumerate(states):  # check every member before writing any
            self._check_member_state(i, state, allow_nonfinite)
        for i, state in enumerate(states):
            self.load_member_state(i, state, allow_nonfinite)

    # ------------------------------------------------------------ arithmetic
    @torch.no_grad()
    def weighted_sum(
        self,
        weights: Tensor | Sequence[float],
        members: Sequence[int] | None = None,
        into: Sequence[int] | None = None,
    ) -> None:
        """Set each member in ``into`` to ``sum_i weights[i] * member[members[i]]`` (no normalisation)."""
        members, into = self._indices(members), self._indices(into, default=members)
        self.check_compatible(sorted(set(members) | set(into)))
        result = F.weighted_sum([self.member_tensors(i) for i in members], weights)
        F.copy_([self.member_tensors(i) for i in into], result)

    @torch.no_grad()
    def average(
        self,
        weights: Tensor | Sequence[float] | None = None,
        members: Sequence[int] | None = None,
        into: Sequence[int] | None = None,
    ) -> None:
        """Set each member in ``into`` (default: ``members``) to the weighted mean of ``members`` (default: all).

        Weights (e.g. sample counts) are normalised to sum to one.
        """
        members, into = self._indices(members), self._indices(into, default=members)
        self.check_compatible(sorted(set(members) | set(into)))
        result = F.weighted_average([self.member_tensors(i) for i in members], weights)
        F.copy_([self.member_tensors(i) for i in into], result)

    @torch.no_grad()
    def lerp(self, toward: int, members: Sequence[int] | None = None, alpha: float = 0.5) -> None:
        """Move each of ``members`` (default: all others) toward member ``toward``.

        ``member <- alpha * member[toward] + (1 - alpha) * member``, floating
        tensors only, all members in one fused call. A member listed twice
        would be moved twice, which is rarely meant, so duplicates are refused.
        """
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        toward = self._check_index(toward)
        members = [i for i in range(len(self)) if i != toward] if members is None else self._indices(members)
        if len(set(members)) != len(members):
            raise ValueError(f"members must be distinct, got {list(members)}")
        self.check_compatible([toward, *members])
        F.lerp_([self.member_tensors(i) for i in members if i != toward], self.member_tensors(toward), alpha)

    @torch.no_grad()
    def broadcast(self, source: int, to: Sequence[int] | None = None) -> None:
        """Copy member ``source`` into each member of ``to`` (default: every other member)."""
        source = self._check_index(source)
        to = [i for i in range(len(self)) if i != source] if to is None else self._indices(to)
        self.check_compatible([source, *to])
        F.copy_([self.member_tensors(i) for i in to if i != source], self.member_tensors(source))

    # --------------------------------------------------------------- helpers
    def _check_index(self, index: int) -> int:
        return member_index(index, len(self))

    def _indices(self, indices: Sequence[int] | None, default: Sequence[int] | None = None) -> list[int]:
        if indices is None:
            indices = range(len(self)) if default is None else default
        indices = [self._check_index(i) for i in indices]
        if not indices:
            raise ValueError("expected at least one member index, got none")
        return indices


def _check_same_modules(members: Sequence[nn.Module]) -> None:
    """Raise unless every member has member 0's submodule types at the same paths.

    Same tensors are not enough for one stacked forward: it runs member 0's
    modules for everyone, so members that differ only in parameter-free layers
    (``ReLU`` against ``Tanh``) would silently run member 0's.
    """
    ref = [(path, type(m)) for path, m in members[0].named_modules()]
    for i, member in enumerate(members[1:], start=1):
        own = [(path, type(m)) for path, m in member.named_modules()]
        if own != ref:
            k = next((k for k, (a, b) in enumerate(zip(ref, own)) if a != b), min(len(ref), len(own)))
            a, b = (f"{m[k][1].__name__} at {m[k][0] or 'the root'!r}" if k < len(m) else "no module" for m in (ref, own))
            raise F.CohortMismatchError(f"members 0 and {i} differ in their modules: {a} vs {b}")


def _build_members(members: MemberSpec, size: int | None) -> list[nn.Module]:
    if isinstance(members, nn.Module):
        size = _check_size(size, "an nn.Module instance")
        return [members] + [copy.deepcopy(members) for _ in range(size - 1)]
    if isinstance(members, Sequence) and not isinstance(members, str):
        members = list(members)
        if size is not None and size != len(members):
            raise ValueError(f"size={size} but {len(members)} members were given; drop size or make them agree")
        if not members:
            raise ValueError("a cohort needs at least one member, got an empty list")
        for i, m in enumerate(members):
            if not isinstance(m, nn.Module):
                raise TypeError(f"member {i} must be an nn.Module, got {type(m).__name__}")
        return members
    if callable(members):
        size = _check_size(size, "a model class or factory")
        built = [members() for _ in range(size)]
        for i, m in enumerate(built):
            if not isinstance(m, nn.Module):
                raise TypeError(f"the factory must return an nn.Module, got {type(m).__name__} for member {i}")
        return built
    raise TypeError(
        f"members must be an nn.Module, a class/factory or a list of modules, got {type(members).__name__}"
    )


def _check_size(size: int | None, what: str) -> int:
    if size is None:
        raise ValueError(f"size is required when members is {what}")
    if not is_int_at_least(size, 1):
        raise ValueError(f"cohort size must be an int >= 1, got {size!r}")
    return size


def _check_no_shared_tensors(members: Sequence[nn.Module]) -> None:
    # Two members sharing storage would silently move together (colearn's
    # leak of rejected proposals came from exactly this), so refuse it.
    owner: dict[int, tuple[int, str]] = {}
    for i, member in enumerate(members):
        for name, tensor in member.state_dict(keep_vars=True).items():
            if tensor.numel() == 0:
                continue
            key = tensor.untyped_storage().data_ptr()
            if key in owner and owner[key][0] != i:
                j, other = owner[key]
                raise ValueError(
                    f"members {j} and {i} share storage ({other!r} and {name!r}); give each member its own "
                    "module (Cohort(module, size=N) makes independent copies)"
                )
            owner.setdefault(key, (i, name))


def _raise_keys(index: int, own: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> None:
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    raise F.CohortMismatchError(
        f"state for member {index} does not match its tensors: missing {missing[:5]}, unexpected {extra[:5]}"
    )
