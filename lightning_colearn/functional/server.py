"""Server-side federated update rules: adaptive server optimizers and SCAFFOLD's control variates.

A round of federated learning ends with the server holding the global model
``x`` and the clients' aggregated model (e.g. :func:`~lightning_colearn.functional.aggregation.fedavg`
of their models). Plain FedAvg installs the aggregate as the new global model.
The rules here instead treat the *pseudo-gradient* ``g = x - aggregate`` as a
gradient on ``x`` and take an optimizer step with it:

- :func:`fedadam_step_`, :func:`fedyogi_step_` and :func:`fedadagrad_step_`
  are FedAdam, FedYogi and FedAdagrad (Reddi et al., 2021, "Adaptive
  Federated Optimization", Algorithm 2). :class:`lightning_colearn.optim.FedAdam`,
  ``FedYogi`` and ``FedAdagrad`` are ``torch.optim.Optimizer`` wrappers around them.
- FedAvgM (Hsu et al., 2019, "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification") is plain
  ``torch.optim.SGD(lr=server_lr, momentum=beta)`` on the pseudo-gradient.
- :func:`is_identity_server` recognises the SGD that makes all of this FedAvg,
  so a caller can install the aggregate as is.
- :func:`scaffold_correction`, :func:`scaffold_client_variate`,
  :func:`scaffold_server_update` and :func:`scaffold_server_variate` are SCAFFOLD (Karimireddy et al., 2020,
  "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
  Algorithm 1).

Conventions: the arguments are lists of floating tensors in one order (e.g.
``list(module.parameters())``); these rules move parameters, so integer
tensors (counters) are refused rather than guessed at. Arithmetic is done in
float64 and the result written back (or returned) in the dtype of the tensor
it replaces, as in :mod:`~lightning_colearn.functional.aggregation`: a server
step runs once a round, so the cost is nothing next to the clients' training,
and a float16 or bfloat16 model is rounded once per tensor and step instead
of after every operation (the square of a ``1e-4`` pseudo-gradient is 0 in
float16 arithmetic, not in float64).

Examples:
    >>> import torch
    >>> x = [torch.tensor([1.0, 1.0])]                        # the global model
    >>> g = pseudo_gradient(x, [torch.tensor([0.5, 2.0])])    # x - aggregate
    >>> g
    [tensor([ 0.5000, -1.0000])]
    >>> m, v = [torch.zeros(2)], [torch.full((2,), 1e-3 ** 2)]  # m starts at 0, v at tau^2
    >>> fedadam_step_(x, g, m, v, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    >>> x   # a first step moves each coordinate about lr against g, whatever g's scale: (1 - 0.9) / sqrt(1 - 0.99) = 1
    [tensor([0.9020, 1.0990])]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_colearn.functional.aggregation import _as_int, _as_real, _check_weights
from lightning_colearn.functional.arithmetic import CohortMismatchError

__all__ = [
    "fedadagrad_step_",
    "fedadam_step_",
    "fedyogi_step_",
    "is_identity_server",
    "pseudo_gradient",
    "scaffold_client_variate",
    "scaffold_correction",
    "scaffold_server_update",
    "scaffold_server_variate",
]


# ----------------------------------------------------------------- validation
def _real(value: object) -> float:
    """``value`` as a float; NaN (which fails every range check) for a bool, a string or a non-number."""
    return math.nan if isinstance(value, bool) else _as_real(value)


def _check_positive(name: str, value: object) -> float:
    """``value`` as a float after checking it is finite and > 0; the error names ``name`` and the value."""
    number = _real(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def _check_decay(name: str, value: object) -> float:
    """``value`` as a float after checking it is in ``[0, 1)`` (a moment's decay rate)."""
    number = _real(value)
    if not 0 <= number < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return number


def _check_betas(betas: object) -> tuple[float, float]:
    """``betas`` as a pair of floats in ``[0, 1)``, as Adam's ``betas``."""
    if isinstance(betas, (str, bytes, Mapping, Tensor)) or not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), each in [0, 1), got {betas!r}")
    if not all(0 <= _real(b) < 1 for b in betas):
        raise ValueError(f"betas must be a pair (beta1, beta2), each in [0, 1), got {betas!r}")
    return float(betas[0]), float(betas[1])


def _check_list(name: str, tensors: object, caller: str) -> list[Tensor]:
    """``tensors`` as a list after checking it holds floating tensors only."""
    if tensors is None or isinstance(tensors, (Tensor, str, bytes, Mapping)) or not hasattr(tensors, "__iter__"):
        raise TypeError(f"{name} must be a list of tensors (e.g. list(module.parameters())), got {type(tensors).__name__}")
    tensors = list(tensors)
    for k, tensor in enumerate(tensors):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} holds a {type(tensor).__name__} at tensor {k}, expected a Tensor")
        if not tensor.is_floating_point():
            raise TypeError(
                f"{caller} takes floating tensors (parameters) only; {name} tensor {k} is {tensor.dtype} "
                "(leave counters such as num_batches_tracked out, or copy them from the aggregate)"
            )
    return tensors


def _check_like(name: str, tensors: object, ref_name: str, ref: Sequence[Tensor], caller: str) -> list[Tensor]:
    """``tensors`` as a list after checking it is floating and shaped like ``ref`` tensor by tensor."""
    tensors = _check_list(name, tensors, caller)
    if len(tensors) != len(ref):
        raise CohortMismatchError(f"{ref_name} has {len(ref)} tensors, {name} has {len(tensors)}")
    for k, (a, b) in enumerate(zip(ref, tensors)):
        if a.shape != b.shape:
            raise CohortMismatchError(
                f"{ref_name} and {name} differ at tensor {k}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
            )
    return tensors


# ------------------------------------------------------------ pseudo-gradient
@torch.no_grad()
def pseudo_gradient(global_params: Sequence[Tensor], aggregate: Sequence[Tensor]) -> list[Tensor]:
    """The server's pseudo-gradient ``g = x - aggregate`` (Reddi et al., 2021), one new tensor per parameter.

    ``x`` is the global model the clients started the round from and
    ``aggregate`` their aggregated model (FedAvg, a robust aggregate, ...).
    Stepping any optimizer with ``g`` as the gradient of ``x`` is a server
    optimizer: SGD with ``lr=1`` gives FedAvg, SGD with momentum FedAvgM,
    :class:`~lightning_colearn.optim.FedAdam` FedAdam. The result has the
    dtype and device of ``global_params`` (set it as ``p.grad``); the
    aggregate is cast to that dtype and one subtraction is correctly rounded
    in any dtype, so no float64 is needed.

    Examples:
        >>> import torch
        >>> pseudo_gradient([torch.tensor([1.0, 2.0])], [torch.tensor([0.5, 3.0])])
        [tensor([ 0.5000, -1.0000])]
    """
    x = _check_list("global_params", global_params, "pseudo_gradient")
    agg = _check_like("aggregate", aggregate, "global_params", x, "pseudo_gradient")
    return [p.detach() - a.detach().to(device=p.device, dtype=p.dtype) for p, a in zip(x, agg)]


# ----------------------------------------------------- adaptive server steps
def _check_step_lists(params, grads, exp_avgs, second, second_name, caller):
    params = _check_list("params", params, caller)
    grads = _check_like("grads", grads, "params", params, caller)
    exp_avgs = _check_like("exp_avgs", exp_avgs, "params", params, caller)
    second = _check_like(second_name, second, "params", params, caller)
    return params, grads, exp_avgs, second


@torch.no_grad()
def _adaptive_step_(params, grads, exp_avgs, second, *, lr, beta1, tau, update_second) -> None:
    """Algorithm 2 of Reddi et al. with ``g = -Delta``; ``update_second(v, g2)`` returns the new ``v`` (float64)."""
    for p, g, m, v in zip(params, grads, exp_avgs, second):
        g64 = g.detach().to(dtype=torch.float64, device=p.device)
        m64 = m.to(torch.float64).mul(beta1).add_(g64, alpha=1 - beta1)  # m = b1 m + (1 - b1) g
        v64 = update_second(v.to(torch.float64), g64.square())
        x64 = p.detach().to(torch.float64) - lr * m64 / (v64.sqrt() + tau)  # x = x - lr m / (sqrt(v) + tau)
        m.copy_(m64)
        v.copy_(v64)
        p.copy_(x64)


def fedadam_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> None:
    """One FedAdam server step in place (Reddi et al., 2021, Algorithm 2), with ``g`` the pseudo-gradient.

    With ``g = x - aggregate`` (the paper's ``-Delta_t``), for every coordinate::

        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        x = x - lr * m / (sqrt(v) + tau)

    There is no bias correction: the paper has none (the first step is then
    at most ``lr * (1 - beta1) / sqrt(1 - beta2)`` per coordinate, ``lr``
    itself for the paper's 0.9 and 0.99). Start ``m`` at 0 and
    ``v`` at ``tau**2`` (the paper's ``v_{-1} >= tau^2``). ``params``,
    ``exp_avgs`` and ``exp_avg_sqs`` are updated in place; the arithmetic is
    float64 and each tensor is written back in its own dtype.

    Args:
        params: the global model's parameters ``x``.
        grads: the pseudo-gradient ``g``, one tensor per parameter (:func:`pseudo_gradient`).
        exp_avgs: the first moments ``m``.
        exp_avg_sqs: the second moments ``v``.
        lr: the server learning rate ``eta > 0``.
        beta1: the first moment's decay rate, in ``[0, 1)``.
        beta2: the second moment's decay rate, in ``[0, 1)``.
        tau: the adaptivity ``tau > 0``: the smaller, the more adaptive.

    Examples:
        >>> import torch
        >>> x, g = [torch.tensor([0.0])], [torch.tensor([0.2])]
        >>> m, v = [torch.zeros(1)], [torch.full((1,), 1e-6)]
        >>> fedadam_step_(x, g, m, v, lr=1.0, beta1=0.0, beta2=0.0, tau=1e-3)
        >>> x, m, v   # beta = 0: x - g / (|g| + tau)
        ([tensor([-0.9950])], [tensor([0.2000])], [tensor([0.0400])])
    """
    lr = _check_positive("lr", lr)
    beta1, beta2 = _check_decay("beta1", beta1), _check_decay("beta2", beta2)
    tau = _check_positive("tau", tau)
    lists = _check_step_lists(params, grads, exp_avgs, exp_avg_sqs, "exp_avg_sqs", "fedadam_step_")
    _adaptive_step_(*lists, lr=lr, beta1=beta1, tau=tau,
                    update_second=lambda v, g2: v.mul(beta2).add_(g2, alpha=1 - beta2))


def fedyogi_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> None:
    """One FedYogi server step in place (Reddi et al., 2021, Algorithm 2; Yogi: Zaheer et al., 2018).

    As :func:`fedadam_step_` but with Yogi's additive second moment::

        m = beta1 * m + (1 - beta1) * g
        v = v - (1 - beta2) * g**2 * sign(v - g**2)
        x = x - lr * m / (sqrt(v) + tau)

    ``v`` moves toward ``g**2`` by ``(1 - beta2) * g**2`` a round, where
    Adam's moves by ``(1 - beta2) * |v - g**2|``: after large pseudo-gradients
    followed by small ones, the effective learning rate grows back more
    slowly. ``v`` stays ``>= 0`` when it starts so. No bias correction (the paper has none);
    start ``m`` at 0 and ``v`` at ``tau**2``. Float64 arithmetic, written
    back in each tensor's dtype.

    Examples:
        >>> import torch
        >>> x, g = [torch.tensor([0.0])], [torch.tensor([0.2])]
        >>> m, v = [torch.zeros(1)], [torch.full((1,), 1e-6)]
        >>> fedyogi_step_(x, g, m, v, lr=1.0, beta1=0.9, beta2=0.99, tau=1e-3)
        >>> v   # 1e-6 + 0.01 * 0.04: v < g**2, so v grows
        [tensor([0.0004])]
    """
    lr = _check_positive("lr", lr)
    beta1, beta2 = _check_decay("beta1", beta1), _check_decay("beta2", beta2)
    tau = _check_positive("tau", tau)
    lists = _check_step_lists(params, grads, exp_avgs, exp_avg_sqs, "exp_avg_sqs", "fedyogi_step_")
    _adaptive_step_(*lists, lr=lr, beta1=beta1, tau=tau,
                    update_second=lambda v, g2: v - (1 - beta2) * g2 * torch.sign(v - g2))


def fedadagrad_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    sum_sqs: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    tau: float,
) -> None:
    """One FedAdagrad server step in place (Reddi et al., 2021, Algorithm 2; Adagrad: Duchi et al., 2011).

    As :func:`fedadam_step_` but ``v`` sums the squares::

        m = beta1 * m + (1 - beta1) * g
        v = v + g**2
        x = x - lr * m / (sqrt(v) + tau)

    ``beta1 = 0`` is server Adagrad without momentum. No bias correction (the
    paper has none); start ``m`` at 0 and ``v`` at ``tau**2``. Float64
    arithmetic, written back in each tensor's dtype.

    Examples:
        >>> import torch
        >>> x, g = [torch.tensor([0.0])], [torch.tensor([3.0])]
        >>> m, v = [torch.zeros(1)], [torch.zeros(1)]
        >>> for _ in range(2):
        ...     fedadagrad_step_(x, g, m, v, lr=1.0, beta1=0.0, tau=1e-3)
        >>> v, x   # v = 9 + 9; x = -3 / 3.001 - 3 / (sqrt(18) + 0.001)
        ([tensor([18.])], [tensor([-1.7066])])
    """
    lr = _check_positive("lr", lr)
    beta1 = _check_decay("beta1", beta1)
    tau = _check_positive("tau", tau)
    lists = _check_step_lists(params, grads, exp_avgs, sum_sqs, "sum_sqs", "fedadagrad_step_")
    _adaptive_step_(*lists, lr=lr, beta1=beta1, tau=tau, update_second=lambda v, g2: v + g2)


def is_identity_server(optimizer: torch.optim.Optimizer) -> bool:
    """True when stepping ``optimizer`` on the pseudo-gradient is mathematically FedAvg.

    That is a ``torch.optim.SGD`` (exactly that class: a subclass may step
    differently) whose every param group has ``lr == 1``, ``momentum == 0``,
    ``dampening == 0``, ``weight_decay == 0`` and neither ``nesterov`` nor
    ``maximize``: its step is ``x - 1 * (x - aggregate) = aggregate``. A
    caller that gets True installs the aggregate as is, which is FedAvg bit
    for bit; stepping instead would not be, because in floating point
    ``x - (x - aggregate)`` is not always ``aggregate`` (``x - aggregate``
    is rounded first, see the example).

    Examples:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.tensor([1.0]))
        >>> is_identity_server(torch.optim.SGD([w], lr=1.0)), is_identity_server(torch.optim.SGD([w], lr=1.0, momentum=0.9))
        (True, False)
        >>> agg = torch.tensor([1e-8])
        >>> w.grad = pseudo_gradient([w], [agg])[0]   # 1 - 1e-8 rounds to 1 in float32
        >>> torch.optim.SGD([w], lr=1.0).step(); w.data   # not 1e-8
        tensor([0.])
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if type(optimizer) is not torch.optim.SGD:
        return False
    for group in optimizer.param_groups:
        if _real(group.get("lr")) != 1.0:
            return False
        if any(_real(group.get(key, 0)) != 0 for key in ("momentum", "dampening", "weight_decay")):
            return False
        if group.get("nesterov", False) or group.get("maximize", False):
            return False
    return True


# ------------------------------------------------------------------- SCAFFOLD
@torch.no_grad()
def scaffold_correction(c: Sequence[Tensor], c_i: Sequence[Tensor]) -> list[Tensor]:
    """SCAFFOLD's gradient correction ``c - c_i`` (Karimireddy et al., 2020, Algorithm 1).

    Client ``i`` adds it to every local gradient, stepping with
    ``g_i(y) - c_i + c``: the server variate ``c`` estimates the global
    update direction and ``c_i`` the client's own, so the correction removes
    the client's drift toward its local optimum. One new tensor per
    parameter, in the dtype of ``c``.

    Examples:
        >>> import torch
        >>> scaffold_correction([torch.tensor([1.0, 0.0])], [torch.tensor([0.5, 2.0])])
        [tensor([ 0.5000, -2.0000])]
    """
    c = _check_list("c", c, "scaffold_correction")
    c_i = _check_like("c_i", c_i, "c", c, "scaffold_correction")
    return [a.detach() - b.detach().to(device=a.device, dtype=a.dtype) for a, b in zip(c, c_i)]


@torch.no_grad()
def scaffold_client_variate(
    c_i: Sequence[Tensor],
    c: Sequence[Tensor],
    x: Sequence[Tensor],
    y_i: Sequence[Tensor],
    *,
    steps: int,
    lr: float,
    option: str = "II",
    grad_at_x: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Client ``i``'s new control variate ``c_i+`` after its local steps (Karimireddy et al., 2020, Algorithm 1).

    - Option ``"I"``: ``c_i+ = g_i(x)``, the client's gradient at the server
      model ``x`` (an extra pass over its data, computed by the caller and
      passed as ``grad_at_x``).
    - Option ``"II"``: ``c_i+ = c_i - c + (x - y_i) / (steps * lr)``, reusing
      the ``steps`` local SGD steps of learning rate ``lr`` that took the
      client from ``x`` to ``y_i``: cheaper, and the paper's choice in its
      experiments.

    The client then sends ``Delta c_i = c_i+ - c_i`` (with ``y_i - x``) to
    the server (:func:`scaffold_server_update`) and keeps ``c_i+``. Float64
    arithmetic; the result has the dtype of ``c_i``.

    Args:
        c_i: the client's control variate before the round.
        c: the server control variate sent this round.
        x: the server model the client started from.
        y_i: the client's model after its local steps.
        steps: ``K >= 1``, the number of local steps.
        lr: ``eta_l > 0``, the local learning rate.
        option: ``"I"`` or ``"II"``.
        grad_at_x: the client's gradient at ``x``, for option ``"I"`` only.

    Examples:
        >>> import torch
        >>> zeros = [torch.zeros(2)]
        >>> scaffold_client_variate(zeros, zeros, [torch.tensor([1.0, 1.0])], [torch.tensor([0.8, 1.1])], steps=2, lr=0.1)
        [tensor([ 1.0000, -0.5000])]
    """
    if option not in ("I", "II"):
        raise ValueError(f"option must be 'I' (gradient at x) or 'II' (from the local steps), got {option!r}")
    steps = _as_int("steps", steps, 1)
    lr = _check_positive("lr", lr)
    c_i = _check_list("c_i", c_i, "scaffold_client_variate")
    c = _check_like("c", c, "c_i", c_i, "scaffold_client_variate")
    x = _check_like("x", x, "c_i", c_i, "scaffold_client_variate")
    y_i = _check_like("y_i", y_i, "c_i", c_i, "scaffold_client_variate")
    if option == "I":
        if grad_at_x is None:
            raise ValueError("option 'I' needs grad_at_x (the client's gradient at the server model x), got None")
        grads = _check_like("grad_at_x", grad_at_x, "c_i", c_i, "scaffold_client_variate")
        return [g.detach().to(device=ci.device, dtype=ci.dtype).clone() for g, ci in zip(grads, c_i)]
    if grad_at_x is not None:
        raise ValueError("grad_at_x is used by option 'I' only; option 'II' estimates the variate from x - y_i")
    scale = 1.0 / (steps * lr)
    out = []
    for ci, cc, xx, yy in zip(c_i, c, x, y_i):
        d = ci.device
        new = (ci.detach().double() - cc.detach().to(d, torch.float64)
               + (xx.detach().to(d, torch.float64) - yy.detach().to(d, torch.float64)) * scale)
        out.append(new.to(ci.dtype))
    return out


def _check_clients(name: str, value: object) -> None:
    if value is None or isinstance(value, (Tensor, str, bytes, Mapping)) or not hasattr(value, "__len__"):
        raise TypeError(f"{name} must be a list with one list of tensors per sampled client, got {type(value).__name__}")


@torch.no_grad()
def scaffold_server_variate(
    c: Sequence[Tensor], client_variate_deltas: Sequence[Sequence[Tensor]], *, num_clients: int
) -> list[Tensor]:
    """SCAFFOLD's server variate step alone: ``c + (1 / num_clients) * sum_{i in S} Delta c_i``.

    The variate half of :func:`scaffold_server_update`, for a caller whose
    model step is another aggregator's (e.g. FedAvg weighted by sample
    counts). The sum over the sampled clients ``S`` divided by all ``N``
    clients is the paper's ``|S| / N`` times their mean: ``c`` stays the mean
    of every client's ``c_i``, sampled or not. Float64 arithmetic; the
    result has the dtypes of ``c``.

    Examples:
        >>> import torch
        >>> scaffold_server_variate([torch.zeros(2)], [[torch.tensor([1.0, 1.0])], [torch.tensor([3.0, -1.0])]], num_clients=4)
        [tensor([1., 0.])]
    """
    name = "scaffold_server_variate"
    c = _check_list("c", c, name)
    _check_clients("client_variate_deltas", client_variate_deltas)
    if len(client_variate_deltas) == 0:
        raise ValueError(f"{name} needs at least one client's Delta c_i, got none")
    n = _as_int("num_clients", num_clients, 1)
    if n < len(client_variate_deltas):
        raise ValueError(f"num_clients must be >= the number of sampled clients ({len(client_variate_deltas)}), got {n}")
    dcs = [_check_like(f"client_variate_deltas[{i}]", dc, "c", c, name) for i, dc in enumerate(client_variate_deltas)]
    out = []
    for k, ck in enumerate(c):
        total = torch.stack([dc[k].detach().to(ck.device, torch.float64) for dc in dcs]).sum(dim=0)
        out.append((ck.detach().double() + total / n).to(ck.dtype))
    return out


@torch.no_grad()
def scaffold_server_update(
    x: Sequence[Tensor],
    c: Sequence[Tensor],
    client_models: Sequence[Sequence[Tensor]],
    client_variate_deltas: Sequence[Sequence[Tensor]],
    *,
    num_clients: int,
    global_lr: float = 1.0,
    weights: Sequence[float] | Tensor | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """SCAFFOLD's server step (Karimireddy et al., 2020, Algorithm 1): new global model and server variate.

    With ``S`` the clients sampled this round (``client_models[i] = y_i``,
    ``client_variate_deltas[i] = Delta c_i = c_i+ - c_i``)::

        x+ = x + global_lr * mean_w(y_i - x)
        c+ = c + (1 / num_clients) * sum_{i in S} Delta c_i

    ``mean_w`` is the mean weighted by ``weights``. The paper's is uniform
    (``weights=None``); a caller may pass sample counts to weigh the model
    step like FedAvg (a client of weight 0 is then left out of it). The
    variate step is always the paper's: its sum is
    ``|S| / N`` times the mean of the sampled clients' ``Delta c_i``, since
    every client, sampled or not, holds one ``c_i`` that ``c`` averages.
    With ``global_lr = 1`` and zero variates this is FedAvg's server step.
    The variate half alone is :func:`scaffold_server_variate`. Float64
    arithmetic; results in the dtypes of ``x`` and ``c``.

    Args:
        x: the global model.
        c: the server control variate.
        client_models: ``y_i`` of every sampled client.
        client_variate_deltas: ``Delta c_i`` of the same clients, in the same order.
        num_clients: ``N``, all clients (sampled or not), ``>= len(client_models)``.
        global_lr: ``eta_g > 0``; 1 in most of the paper's experiments.
        weights: one weight per sampled client for the model step, or None.

    Examples:
        >>> import torch
        >>> x, c = [torch.zeros(2)], [torch.zeros(2)]
        >>> ys = [[torch.tensor([1.0, 0.0])], [torch.tensor([3.0, 2.0])]]
        >>> dcs = [[torch.tensor([1.0, 1.0])], [torch.tensor([3.0, -1.0])]]
        >>> scaffold_server_update(x, c, ys, dcs, num_clients=4)
        ([tensor([2., 1.])], [tensor([1., 0.])])
    """
    name = "scaffold_server_update"
    x = _check_list("x", x, name)
    c = _check_like("c", c, "x", x, name)
    _check_clients("client_models", client_models)
    _check_clients("client_variate_deltas", client_variate_deltas)
    if len(client_models) == 0:
        raise ValueError("scaffold_server_update needs at least one client model (y_i of a sampled client), got none")
    if len(client_variate_deltas) != len(client_models):
        raise ValueError(
            f"client_variate_deltas must have one entry per client model ({len(client_models)}), "
            f"got {len(client_variate_deltas)}"
        )
    s = len(client_models)
    n = _as_int("num_clients", num_clients, 1)
    if n < s:
        raise ValueError(f"num_clients must be >= the number of sampled clients ({s}), got {n}")
    global_lr = _check_positive("global_lr", global_lr)
    w = torch.ones(s, dtype=torch.float64) if weights is None else _check_weights(weights, s)
    keep = torch.nonzero(w > 0).flatten().tolist()  # as fedavg: a weight-0 client's model is left out entirely
    w = w[keep] / w[keep].sum()
    ys = [_check_like(f"client_models[{i}]", y, "x", x, name) for i, y in enumerate(client_models)]
    new_c = scaffold_server_variate(c, client_variate_deltas, num_clients=n)
    new_x = []
    for k, xk in enumerate(x):
        x64 = xk.detach().double()
        steps = torch.stack([ys[i][k].detach().to(xk.device, torch.float64) - x64 for i in keep])
        mean_step = torch.tensordot(w.to(xk.device), steps, dims=1)
        new_x.append((x64 + global_lr * mean_step).to(xk.dtype))
    return new_x, new_c
