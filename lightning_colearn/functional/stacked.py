"""Batched kernels for N same-shape members whose tensors are stacked as ``[N, ...]``.

Nothing here knows about modules or Lightning. Layers take inputs with the
members folded into the batch, so a model's own ``forward`` (``flatten(1)``,
``relu``, pooling: anything that treats samples independently) runs
unchanged on all members at once. Two foldings:

* sample-major ``[B * N, ...]`` (row ``b * N + i`` is sample ``b`` of member
  ``i``): convolutions and batch norms see ``[B, N * C, H, W]`` as a free
  view, no copies between layers;
* member-major ``[N * B, ...]`` (``linear(..., member_major=True)``): a
  per-member input ``[N, B, ...]`` folds for free, best for models made of
  linear layers only. Optimizer
steps take lists of stacked parameters, gradients and states and give each
member exactly the update its own ``torch.optim`` optimizer would.

Examples:
    >>> import torch
    >>> w, b = torch.randn(3, 2, 4), torch.randn(3, 2)      # 3 members of nn.Linear(4, 2)
    >>> x = torch.randn(5 * 3, 4)                          # 5 samples per member, folded sample-major
    >>> out = linear(x, w, b)
    >>> torch.allclose(out[1::3], torch.nn.functional.linear(x[1::3], w[1], b[1]), atol=1e-6)
    True
    >>> out = linear(x, w, b, member_major=True)           # ... or member-major
    >>> torch.allclose(out[5:10], torch.nn.functional.linear(x[5:10], w[1], b[1]), atol=1e-6)
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["adam_step_", "batch_norm", "conv2d", "grad_norms", "linear", "clip_grad_norms_", "sgd_step_"]


def _per_member(values: Tensor, like: Tensor) -> Tensor:
    """``values`` ([N]) shaped to broadcast against ``like`` ([N, ...])."""
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


# ------------------------------------------------------------------ layers
#: Below this many output features the forward is computed as ``(W @ x^T)^T``: MKL's batched
#: ``x @ W^T`` is slow for a narrow output. Measured on this project's 2-core CPU, 12 members, batch 64,
#: speed-up of the transposed form: 784 -> 2, 8, 10, 12: 1.5x, 2.1x, 2.7x, 1.7x; 784 -> 16 ... 128:
#: 0.91x to 0.98x (so the usual form there); 128 -> 10: 1.4x to 2x at 4 to 48 members.
NARROW_OUTPUT = 16


class _Linear(torch.autograd.Function):
    # Autograd's backward of ``x @ W.transpose(1, 2)`` computes ``x^T @ g`` and transposes it, a
    # batched matmul that runs ~4x slower on CPU than ``g^T @ x`` for the skinny shapes of small
    # classifiers (measured: 750 us vs 160 us for 12 x [64, 784] -> 10); this asks for the fast one.
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if weight.shape[1] < NARROW_OUTPUT:  # [N, out, B], then back to [N, B, out]
            xt = x.transpose(1, 2)
            out = torch.bmm(weight, xt) if bias is None else torch.baddbmm(bias.unsqueeze(2), weight, xt)
            return out.transpose(1, 2).contiguous()
        wt = weight.transpose(1, 2)
        return torch.bmm(x, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, wt)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        gx = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        gw = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        gb = grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, member_major: bool = False) -> Tensor:
    """``nn.Linear`` for N members: ``x`` ``[B * N, ..., in]`` (or ``[N * B, ..., in]``), ``weight`` ``[N, out, in]``, ``bias`` ``[N, out]``."""
    n = weight.shape[0]
    if member_major:
        xs = x.reshape(n, -1, x.shape[-1])  # [N, B * ..., in], a view
    else:
        xs = x.reshape(-1, n, *x.shape[1:]).transpose(0, 1).reshape(n, -1, x.shape[-1])
    device = x.device.type
    if torch.is_autocast_enabled(device):  # what autocast does for F.linear: every operand in its dtype
        dtype = torch.get_autocast_dtype(device)
        xs, weight, bias = xs.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            out = _Linear.apply(xs, weight, bias)
    else:
        out = _Linear.apply(xs, weight, bias)
    if member_major:
        return out.reshape(*x.shape[:-1], out.shape[-1])
    return out.reshape(n, -1, *x.shape[1:-1], out.shape[-1]).transpose(0, 1).reshape(*x.shape[:-1], out.shape[-1])


#: Whether the grouped convolution runs in channels-last memory format (the input copied into it, the
#: output copied back, so the model's own ``forward`` still sees contiguous ``[B * N, C, H, W]``).
#: oneDNN's grouped convolution, above all its weight gradient, is much faster channels-last; the two
#: copies cost less than it saves. Measured on this project's 2-core CPU (AMD EPYC, MKL on AVX-512),
#: forward and backward of 12 stacked ConvNets on 64 images each, median of 15, interleaved:
#: 103.7 ms contiguous, 76.6 ms channels-last (85.3 with only the first convolution channels-last),
#: against 92.3 ms for the 12 members' convolutions one by one.
CHANNELS_LAST = True


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int = 1) -> Tensor:
    """``nn.Conv2d`` for N members as one grouped convolution.

    ``x`` ``[B * N, C, H, W]`` is viewed as ``[B, N * C, H, W]`` and the
    members' kernels ``[N, out, C / groups, k, k]`` become ``N * groups``
    groups: member ``i``'s output channels see only member ``i``'s input.
    The output is contiguous whatever :data:`CHANNELS_LAST` says.

    Examples:
        >>> import torch
        >>> w, b = torch.randn(3, 4, 2, 3, 3), torch.randn(3, 4)   # 3 members of nn.Conv2d(2, 4, 3)
        >>> x = torch.randn(5 * 3, 2, 8, 8)                         # 5 images per member, sample-major
        >>> out = conv2d(x, w, b, 1, 0, 1)
        >>> out.shape, out.is_contiguous()
        (torch.Size([15, 4, 6, 6]), True)
        >>> torch.allclose(out[2::3], torch.nn.functional.conv2d(x[2::3], w[2], b[2]), atol=1e-5)
        True
    """
    n, out_channels = weight.shape[:2]
    xs = x.reshape(-1, n * x.shape[1], *x.shape[2:])
    if CHANNELS_LAST:
        xs = xs.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(xs, weight.reshape(n * out_channels, *weight.shape[2:]),
                 None if bias is None else bias.reshape(-1), stride, padding, dilation, n * groups)
    return y.contiguous().reshape(-1, out_channels, *y.shape[2:])


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """``BatchNorm`` for N members: every member normalises its own samples with its own statistics.

    ``x`` ``[B * N, C, ...]``; ``running_*``, ``weight``, ``bias`` ``[N, C]``.
    The members become ``N * C`` channels of one ``F.batch_norm`` call, so the
    running statistics (updated in place) stay per member.
    """
    n, c = (weight if weight is not None else running_mean).shape
    xs = x.reshape(-1, n * c, *x.shape[2:])
    flat = [None if t is None else t.reshape(-1) for t in (running_mean, running_var, weight, bias)]
    return F.batch_norm(xs, flat[0], flat[1], flat[2], flat[3], training, momentum, eps).reshape(x.shape)


# --------------------------------------------------------------- gradients
def grad_norms(grads: Sequence[Tensor]) -> Tensor:
    """Each member's total 2-norm over its gradients ``[N, ...]``: ``[N]`` (what ``clip_grad_norm_`` computes per member)."""
    return torch.stack([g.reshape(g.shape[0], -1).float().pow(2).sum(1) for g in grads]).sum(0).sqrt()


@torch.no_grad()
def clip_grad_norms_(grads: Sequence[Tensor], max_norm: float) -> Tensor:
    """Clip each member's gradient norm to ``max_norm`` on its own, in place; returns the norms before clipping.

    Same rule as ``torch.nn.utils.clip_grad_norm_`` applied member by member
    (coefficient ``max_norm / (norm + 1e-6)`` clamped to 1), never one norm
    across members.

    Examples:
        >>> g = [torch.tensor([[3.0, 4.0], [0.3, 0.4]])]   # member norms 5 and 0.5
        >>> clip_grad_norms_(g, 1.0).tolist(); g[0]
        [5.0, 0.5]
        tensor([[0.6000, 0.8000],
                [0.3000, 0.4000]])
    """
    norms = grad_norms(grads)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(_per_member(coef, g))
    return norms


# --------------------------------------------------------------- optimizers
@torch.no_grad()
def sgd_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    buffers: Sequence[Tensor],
    has_buffer: Tensor,
    lr: Tensor,
    weight_decay: Tensor,
    *,
    momentum: float | Tensor,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """One ``torch.optim.SGD`` step for each of N members, in place.

    ``params``, ``grads``, ``buffers`` are ``[N, ...]``; ``has_buffer`` ``[N]``
    says which members already hold a momentum buffer (SGD starts it as a copy
    of the first gradient, not at zero); ``lr``, ``weight_decay`` are ``[N]``;
    ``momentum`` is one number or one per member (``[N]``: population-based
    training gives each member its own). ``buffers`` may be empty when
    ``momentum == 0``. ``has_buffer`` is updated.
    """
    if isinstance(momentum, Tensor):
        _sgd_step_per_member_momentum_(params, grads, buffers, has_buffer, lr, weight_decay, momentum,
                                       dampening=dampening, nesterov=nesterov, maximize=maximize)
        return
    decays = bool(weight_decay.any())
    started_all, started_none = bool(has_buffer.all()), not bool(has_buffer.any())
    same_lr = bool((lr == lr[0]).all())
    for i, (p, g) in enumerate(zip(params, grads)):
        d = -g if maximize else g
        d = d + _per_member(weight_decay, p) * p if decays else d
        if momentum != 0:
            buf = buffers[i]
            # torch's in-place ops where every member is alike (no temporaries the size of the parameter)
            if started_all:
                buf.mul_(momentum).add_(d, alpha=1 - dampening)
            elif started_none:
                buf.copy_(d)
            else:  # some members start their buffer now (e.g. a sampled client's first round)
                buf.copy_(torch.where(_per_member(has_buffer, p).bool(), buf * momentum + d * (1 - dampening), d))
            d = d.add(buf, alpha=momentum) if nesterov else buf
        if same_lr:
            p.add_(d, alpha=-float(lr[0]))
        else:  # torch's tensor-lr form, fused: p - lr * d
            p.addcmul_(_per_member(lr, p), d, value=-1)
    if momentum != 0:
        has_buffer.fill_(True)


def _sgd_step_per_member_momentum_(params, grads, buffers, has_buffer: Tensor, lr: Tensor, weight_decay: Tensor,
                                   momentum: Tensor, *, dampening: float, nesterov: bool, maximize: bool) -> None:
    """:func:`sgd_step_` with a momentum per member. As ``torch.optim.SGD`` does, a member whose momentum is 0
    steps along its gradient and leaves its buffer (if any) untouched; the others run SGD's momentum rule."""
    moving = momentum != 0
    if bool(moving.all()) and bool(has_buffer.all()):  # the usual case: every buffer updates in place
        for i, (p, g) in enumerate(zip(params, grads)):
            d = -g if maximize else g
            d = d + _per_member(weight_decay, p) * p if bool(weight_decay.any()) else d
            buf, m = buffers[i], _per_member(momentum, p)
            buf.mul_(m).add_(d, alpha=1 - dampening)
            p.addcmul_(_per_member(lr, p), d + m * buf if nesterov else buf, value=-1)
        return
    for i, (p, g) in enumerate(zip(params, grads)):
        d = -g if maximize else g
        d = d + _per_member(weight_decay, p) * p
        buf, m = buffers[i], _per_member(momentum, p)
        started = _per_member(has_buffer, p).bool()
        new = torch.where(started, buf * m + d * (1 - dampening), d)
        on = _per_member(moving, p).bool()
        buf.copy_(torch.where(on, new, buf))
        d = torch.where(on, d + m * new if nesterov else new, d)
        p.addcmul_(_per_member(lr, p), d, value=-1)
    has_buffer |= moving


@torch.no_grad()
def adam_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    lr: Tensor,
    weight_decay: Tensor,
    *,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float | Tensor,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
) -> None:
    """One ``torch.optim.Adam`` (or ``AdamW`` with ``decoupled_weight_decay``) step for each of N members, in place.

    ``steps`` are the members' step counts per parameter (``[N]``, float32
    like torch's), so members that stepped different numbers of times (a
    voting proposer, a sampled client) keep exact bias corrections.
    ``max_exp_avg_sqs`` is used only with ``amsgrad``. ``beta1``, ``beta2`` and
    ``eps`` are numbers, or ``[N]`` tensors (one per member).
    """
    decays = bool(weight_decay.any())
    per_member = isinstance(beta1, Tensor) or isinstance(beta2, Tensor) or isinstance(eps, Tensor)
    if per_member:  # float64 [N] for the bias corrections, float32 copies where they scale the moments
        beta1, beta2, eps = (v.double() if isinstance(v, Tensor) else torch.full_like(lr, v, dtype=torch.float64)
                             for v in (beta1, beta2, eps))
    for i, (p, g) in enumerate(zip(params, grads)):
        g = -g if maximize else g
        steps[i].add_(1)
        if decays:
            if decoupled_weight_decay:
                p.mul_(1 - _per_member(lr.double() * weight_decay.double(), p))
            else:
                g = g + _per_member(weight_decay, p) * p
        if per_member:
            exp_avgs[i].lerp_(g, _per_member(1 - beta1, p))
            exp_avg_sqs[i].mul_(_per_member(beta2, p)).addcmul_(g * _per_member(1 - beta2, p), g)
        else:
            exp_avgs[i].lerp_(g, 1 - beta1)
            exp_avg_sqs[i].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step = steps[i].double()
        step_size = _per_member(lr.double() / (1 - beta1**step), p)
        bc2_sqrt = _per_member((1 - beta2**step).sqrt(), p)
        second = exp_avg_sqs[i]
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], second, out=max_exp_avg_sqs[i])
            second = max_exp_avg_sqs[i]
        # torch's capturable form (bias corrections as tensors): the step size folded into the denominator,
        # so the update is one fused addcdiv_ without temporaries the size of the parameter
        neg_step = -step_size
        denom = (second.sqrt() / (bc2_sqrt * neg_step)).add_((_per_member(eps, p) if per_member else eps) / neg_step)
        p.addcdiv_(exp_avgs[i], denom)
