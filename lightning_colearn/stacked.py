"""The stacked engine: N same-shape members as ``[N, ...]`` tensors and one forward for all of them.

:class:`StackedModel` holds every parameter and buffer of N members stacked
along a new leading dimension and runs them in one of two ways:

* ``"batched"``: a copy of the member architecture whose ``nn.Linear``,
  ``nn.Conv2d`` and ``BatchNorm`` layers are swapped for stacked layers
  (:mod:`lightning_colearn.functional.stacked`), with the members folded into
  the batch dimension, so the model's own ``forward`` runs once for all
  members. One ``bmm`` replaces N small matmuls; this is where small models
  win (the loop's cost there is kernel-launch and Python overhead).
* ``"vmap"``: ``torch.func.vmap`` over ``torch.func.functional_call`` of one
  member (the torch.func "model ensembling" recipe), for architectures with
  layers the batched path does not know. Dropout draws different masks per
  member (``randomness="different"``).

The batched path is chosen when every layer holding tensors is one it knows;
:meth:`StackedModel.check` compares it against a member-by-member forward on
the first batch and falls back to ``"vmap"`` if a model's ``forward`` mixes
samples in a way folding cannot reproduce.

Only a subset of members can run (``index``): the others cost nothing
(their rows are gathered, not masked; see ``bench/vectorised.py``).

Examples:
    >>> import torch
    >>> from torch import nn
    >>> members = [nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)) for _ in range(5)]
    >>> engine = StackedModel(members)
    >>> engine.mode, engine.tensor("0.weight").shape
    ('batched', torch.Size([5, 3, 4]))
    >>> x = torch.randn(7, 4)
    >>> out = engine(x)                                   # [members, batch, classes]
    >>> torch.allclose(out[3], members[3](x), atol=1e-6)
    True
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from lightning_colearn.functional import stacked as FS

__all__ = ["StackedBatchNorm", "StackedConv2d", "StackedLinear", "StackedMismatchError", "StackedModel", "batched_layers"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

#: Bytes the largest activation of one batched pass may take; more members run in several passes.
#: glibc's malloc serves a block above 32 MiB (its largest mmap threshold) with a fresh ``mmap`` on
#: every allocation, so each step page-faults and zeroes all of it again; smaller blocks are reused
#: from the heap. Measured on this project's 2-core CPU: a ReLU backward of 17 MiB takes 1.8 ms, of
#: 34 MiB 17 ms (4.0 ms into a reused buffer); a stacked training step of 12 ColearnConvNets (34 MiB
#: feature maps at batch 64) 243 ms, 179 ms with mmap switched off, 48 ConvNets 422 against 237 ms.
LARGEST_ACTIVATION = 30 * 2**20


class StackedMismatchError(RuntimeError):
    """The stacked forward does not reproduce the members' own forward (raised by :meth:`StackedModel.check`)."""


class _Context:
    """What the stacked layers of one engine share during a forward: which members run, and the folding."""

    def __init__(self) -> None:
        self.index: Tensor | None = None  # None: every member
        self.member_major = False  # rows [N * B] (linear-only models) or [B * N] (see functional.stacked)


class _StackedLayer(nn.Module):
    def __init__(self, ctx: _Context) -> None:
        super().__init__()
        self._ctx = ctx

    def _take(self, tensor: Tensor | None) -> Tensor | None:
        index = self._ctx.index
        return tensor if tensor is None or index is None else tensor.index_select(0, index)


class StackedLinear(_StackedLayer):
    """N ``nn.Linear`` layers as one ``baddbmm``."""

    def __init__(self, layers: Sequence[nn.Linear], ctx: _Context) -> None:
        super().__init__(ctx)
        self.weight = _stack_parameter([m.weight for m in layers])
        self.bias = None if layers[0].bias is None else _stack_parameter([m.bias for m in layers])

    def forward(self, x: Tensor) -> Tensor:
        return FS.linear(x, self._take(self.weight), self._take(self.bias), self._ctx.member_major)


class StackedConv2d(_StackedLayer):
    """N ``nn.Conv2d`` layers as one grouped convolution."""

    def __init__(self, layers: Sequence[nn.Conv2d], ctx: _Context) -> None:
        super().__init__(ctx)
        first = layers[0]
        self.stride, self.padding, self.dilation, self.groups = first.stride, first.padding, first.dilation, first.groups
        self.weight = _stack_parameter([m.weight for m in layers])
        self.bias = None if first.bias is None else _stack_parameter([m.bias for m in layers])

    def forward(self, x: Tensor) -> Tensor:
        return FS.conv2d(x, self._take(self.weight), self._take(self.bias), self.stride, self.padding, self.dilation, self.groups)


class StackedBatchNorm(_StackedLayer):
    """N ``BatchNorm`` layers: each member normalises its own samples and keeps its own running statistics."""

    def __init__(self, layers: Sequence[nn.modules.batchnorm._BatchNorm], ctx: _Context) -> None:
        super().__init__(ctx)
        first = layers[0]
        self.eps, self.momentum, self.track_running_stats = first.eps, first.momentum, first.track_running_stats
        self.weight = _stack_parameter([m.weight for m in layers]) if first.affine else None
        self.bias = _stack_parameter([m.bias for m in layers]) if first.affine else None
        if first.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, torch.stack([getattr(m, name).detach() for m in layers]))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def forward(self, x: Tensor) -> Tensor:
        use_batch_stats = self.training or not self.track_running_stats
        updates = self.training and self.track_running_stats
        mean, var = self._take(self.running_mean), self._take(self.running_var)
        weight, bias = self._take(self.weight), self._take(self.bias)
        if weight is None and mean is None:  # neither affine nor tracking: the member count comes from the context
            raise TypeError("StackedBatchNorm needs affine=True or track_running_stats=True")
        out = FS.batch_norm(x, mean if not use_batch_stats or updates else None,
                            var if not use_batch_stats or updates else None,
                            weight, bias, use_batch_stats, self.momentum, self.eps)
        if updates:
            index = self._ctx.index
            with torch.no_grad():
                if index is None:  # F.batch_norm updated the (contiguous) rows in place
                    self.num_batches_tracked.add_(1)
                else:  # the gathered rows were copies: write them back
                    self.running_mean.index_copy_(0, index, mean)
                    self.running_var.index_copy_(0, index, var)
                    self.num_batches_tracked.index_add_(0, index, torch.ones_like(index, dtype=self.num_batches_tracked.dtype))
        return out


def _stack_parameter(tensors: Sequence[Tensor]) -> nn.Parameter:
    return nn.Parameter(torch.stack([t.detach() for t in tensors]), requires_grad=tensors[0].requires_grad)


def _batched_layer(module: nn.Module) -> type[_StackedLayer] | None:
    """The stacked layer for ``module``'s exact type (subclasses may change ``forward``), or None."""
    kind = type(module)
    if kind is nn.Linear:
        return StackedLinear
    if kind is nn.Conv2d and module.padding_mode == "zeros":
        return StackedConv2d
    if kind in _BATCH_NORMS and module.momentum is not None and (module.affine or module.track_running_stats):
        return StackedBatchNorm
    return None


def batched_layers(model: nn.Module) -> dict[str, type[_StackedLayer]] | None:
    """``{path: stacked layer}`` for every submodule of ``model`` that holds tensors, or None if one has no batched form.

    Examples:
        >>> from lightning_colearn.models import ConvNet
        >>> sorted(batched_layers(ConvNet()))
        ['conv1', 'conv2', 'fc']
        >>> batched_layers(nn.LSTM(2, 2)) is None
        True
    """
    found = {}
    for path, module in model.named_modules():
        holds = any(t is not None for t in module._parameters.values()) or any(t is not None for t in module._buffers.values())
        if not holds:
            continue
        layer = _batched_layer(module)
        if layer is None:
            return None
        found[path] = layer
    return found


class StackedModel(nn.Module):
    """N same-shape members' tensors stacked as ``[N, ...]``, run with one forward.

    Args:
        members: modules of one architecture (same ``state_dict`` names, shapes, dtypes).
        mode: ``"auto"`` (batched layers when every tensor-holding layer has a
            batched form, else vmap), ``"batched"`` or ``"vmap"``.

    :meth:`tensor` gives the stacked tensor behind a member ``state_dict``
    key; :meth:`parameters` are the stacked leaves an optimizer steps.
    """

    def __init__(self, members: Sequence[nn.Module], mode: str = "auto") -> None:
        super().__init__()
        if mode not in ("auto", "batched", "vmap"):
            raise ValueError(f"mode must be 'auto', 'batched' or 'vmap', got {mode!r}")
        members = list(members)
        self.size = len(members)
        self.param_names = [name for name, _ in members[0].named_parameters()]
        self.buffer_names = [name for name, _ in members[0].named_buffers()]
        self.names = self.param_names + self.buffer_names
        self._ctx = _Context()
        layers = batched_layers(members[0])
        if mode == "batched" and layers is None:
            raise ValueError(f"{type(members[0]).__name__} has layers without a batched form; use mode='vmap'")
        self.mode = "batched" if mode != "vmap" and layers is not None else "vmap"
        if self.mode == "batched":
            self.net = copy.deepcopy(members[0])
            for path, layer in layers.items():
                stacked = layer([m.get_submodule(path) for m in members], self._ctx)
                if path:
                    _set_submodule(self.net, path, stacked)
                else:  # the member is itself a layer (e.g. a bare nn.Linear)
                    self.net = stacked
            # linear-only models fold member-major: a per-member batch [N, B, ...] then folds without a copy
            self._ctx.member_major = all(layer is StackedLinear for layer in layers.values())
        else:
            self._set_base(members[0])
            for name in self.param_names:
                self.register_parameter(_mangle(name), _stack_parameter([m.get_parameter(name) for m in members]))
            for name in self.buffer_names:
                self.register_buffer(_mangle(name), torch.stack([m.get_buffer(name).detach() for m in members]))
        self._checked = False
        self._row_bytes: int | None = None  # largest activation bytes per sample and member, from the first forward

    def _set_base(self, member: nn.Module) -> None:
        # The module vmap calls: functional_call supplies every tensor, so its own live on the meta
        # device (no memory), and it is not a submodule (device moves and state_dict skip it).
        self.__dict__["base"] = copy.deepcopy(member).to("meta")

    # ---------------------------------------------------------------- tensors
    def tensor(self, name: str) -> Tensor:
        """The stacked ``[N, ...]`` tensor behind member key ``name`` (a leaf ``Parameter`` for parameters)."""
        if self.mode == "batched":
            path, _, leaf = name.rpartition(".")
            return getattr(self.net.get_submodule(path) if path else self.net, leaf)
        return getattr(self, _mangle(name))

    def stacked_parameters(self) -> list[nn.Parameter]:
        """The stacked parameters, in the members' ``parameters()`` order."""
        return [self.tensor(name) for name in self.param_names]

    def train(self, mode: bool = True) -> StackedModel:
        super().train(mode)
        if self.mode == "vmap":
            self.base.train(mode)
        return self

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor, index: Tensor | None = None, per_member: bool = False) -> Tensor:
        """Outputs ``[n, B, ...]`` of the members in ``index`` (default: all, ``n = N``).

        ``x`` is one batch ``[B, ...]`` every member sees, or with
        ``per_member=True`` one batch per member ``[n, B, ...]``. The batched
        path runs the members in passes of at most :meth:`members_per_pass`.
        """
        n = self.size if index is None else len(index)
        if per_member and x.shape[0] != n:
            raise ValueError(f"per-member input must have {n} batches along dim 0 (one per member), got {tuple(x.shape)}")
        if index is not None and n == self.size and torch.equal(index, torch.arange(n, device=index.device)):
            index = None  # every member, in order: use the stacked tensors themselves, no gather
        if self.mode == "vmap":
            return self._vmap_forward(x, index, per_member)
        per_pass = self.members_per_pass(x.shape[1] if per_member else x.shape[0])
        if per_pass >= n:
            return self._batched_forward(x, index, per_member)
        per_pass = -(-n // -(-n // per_pass))  # passes of equal size: 12 members at most 10 a pass run as 6 + 6
        ids = torch.arange(self.size, device=x.device) if index is None else index
        return torch.cat([
            self._batched_forward(x[k:k + per_pass] if per_member else x, ids[k:k + per_pass], per_member)
            for k in range(0, n, per_pass)
        ])

    def members_per_pass(self, batch: int) -> int:
        """How many members one batched pass runs on ``batch`` samples each: all of them unless their largest
        activation would exceed :data:`LARGEST_ACTIVATION` bytes (known after the first forward).

        Examples:
            >>> from lightning_colearn.models import ColearnConvNet
            >>> engine = StackedModel([ColearnConvNet() for _ in range(12)])
            >>> _ = engine(torch.randn(2, 1, 28, 28))            # the first forward measures the activations
            >>> engine.members_per_pass(8), engine.members_per_pass(64)   # feature maps of 46 KB per image
            (12, 10)
        """
        if self._row_bytes is None:
            return self.size
        return max(1, min(self.size, LARGEST_ACTIVATION // (max(1, batch) * self._row_bytes)))

    def _batched_forward(self, x: Tensor, index: Tensor | None, per_member: bool) -> Tensor:
        n = self.size if index is None else len(index)
        if self._ctx.member_major:  # [n * B, ...]
            xs = x if per_member else x.unsqueeze(0).expand(n, *x.shape)
        else:  # sample-major [B * n, ...] (see functional.stacked): convolutions then need no copies
            xs = x.transpose(0, 1) if per_member else x.unsqueeze(1).expand(x.shape[0], n, *x.shape[1:])
        self._ctx.index = index
        sizes: list[int] = []
        hooks = self._measure_rows(sizes) if self._row_bytes is None else []
        try:
            out = self.net(xs.reshape(-1, *xs.shape[2:]))
        finally:
            self._ctx.index = None
            for hook in hooks:
                hook.remove()
        if hooks:  # set only once a forward went through
            self._row_bytes = max(sizes, default=0) or None
        if self._ctx.member_major:
            return out.reshape(n, -1, *out.shape[1:])
        return out.reshape(-1, n, *out.shape[1:]).transpose(0, 1)

    def _measure_rows(self, sizes: list[int]) -> list:
        """Hooks appending to ``sizes`` the bytes per folded row (one sample of one member) of every stacked
        layer's input and output, counted at 4 bytes an element or more (bf16 runs get fp32's passes)."""

        def record(module, inputs, output) -> None:
            for t in (*inputs, output):
                if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0]:
                    sizes.append(t.numel() // t.shape[0] * max(t.element_size(), 4))

        return [m.register_forward_hook(record) for m in self.net.modules() if isinstance(m, _StackedLayer)]

    def _vmap_forward(self, x: Tensor, index: Tensor | None, per_member: bool) -> Tensor:
        take = (lambda t: t) if index is None else (lambda t: t.index_select(0, index))
        params = {name: take(self.tensor(name)) for name in self.param_names}
        buffers = {name: take(self.tensor(name)) for name in self.buffer_names}

        def one(p, b, xi):
            return functional_call(self.base, (p, b), (xi,))

        out = vmap(one, in_dims=(0, 0, 0 if per_member else None), randomness="different")(params, buffers, x)
        if index is not None and self.training:
            with torch.no_grad():  # gathered buffers were copies: write updated running statistics back
                for name, value in buffers.items():
                    self.tensor(name).index_copy_(0, index, value)
        return out

    # ---------------------------------------------------------------- checking
    @torch.no_grad()
    def check(self, members: Sequence[nn.Module], x: Tensor, per_member: bool = False, atol: float = 1e-4) -> None:
        """Compare this engine with a member-by-member forward on ``x`` (eval mode, once).

        The batched path folds the members into the batch; a ``forward`` that
        mixes samples (anything but BatchNorm, which is handled) would give
        different outputs. Then the engine switches to vmap with a warning; if
        vmap disagrees too, this raises.
        """
        if self._checked:
            return
        sample = x[:, :2] if per_member else x[:2]

        def agrees() -> tuple[bool, float]:
            want = torch.stack([m(sample[i] if per_member else sample) for i, m in enumerate(members)]).float()
            got = self(sample, per_member=per_member).float()
            return got.shape == want.shape and torch.allclose(got, want, atol=atol, rtol=1e-3), (got - want).abs().max().item()

        # eval mode (no dropout, running statistics) and full precision (not bf16 noise) make both sides deterministic
        with _eval_mode([self, *members]), torch.autocast(x.device.type, enabled=False):
            ok, diff = agrees()
            if not ok and self.mode == "batched":
                warnings.warn(
                    f"{type(members[0]).__name__}'s forward mixes samples across the batch; the stacked cohort "
                    "runs it with torch.func.vmap instead of batched layers",
                    stacklevel=3,
                )
                self._switch_to_vmap(members[0])
                ok, diff = agrees()
            if not ok:
                raise StackedMismatchError(
                    f"the stacked forward of {type(members[0]).__name__} does not match its members' own forward "
                    f"(max difference {diff:.3g}); use backend='loop'"
                )
        self._checked = True

    def _switch_to_vmap(self, member: nn.Module) -> None:
        tensors = {name: self.tensor(name) for name in self.names}
        del self.net
        self._set_base(member)
        for name, t in tensors.items():
            if isinstance(t, nn.Parameter):
                self.register_parameter(_mangle(name), t)  # the same leaves: optimizers keep their references
            else:
                self.register_buffer(_mangle(name), t)
        self.mode = "vmap"


@contextmanager
def _eval_mode(modules: Sequence[nn.Module]):
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def _mangle(name: str) -> str:
    return name.replace(".", "__")


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)

