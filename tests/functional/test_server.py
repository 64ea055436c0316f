"""Tests for lightning_colearn.functional.server and the server optimizers of lightning_colearn.optim.

Every rule is checked against its paper's equations written out by hand here,
in the paper's own sign convention (``Delta = aggregate - x``), on a few tiny clients.
"""

from __future__ import annotations

import io
import math
import re

import pytest
import torch

from lightning_colearn.functional.aggregation import fedavg
from lightning_colearn.functional.arithmetic import CohortMismatchError
from lightning_colearn.functional.server import (
    fedadagrad_step_,
    fedadam_step_,
    fedyogi_step_,
    is_identity_server,
    pseudo_gradient,
    scaffold_client_variate,
    scaffold_correction,
    scaffold_server_update,
    scaffold_server_variate,
)
from lightning_colearn.optim import FedAdagrad, FedAdam, FedYogi

# Three clients whose local training pulls the global model halfway to their own optimum.
OPTIMA = [
    [torch.tensor([1.0, -2.0]), torch.tensor([[0.5]])],
    [torch.tensor([3.0, 0.0]), torch.tensor([[-1.0]])],
    [torch.tensor([-1.0, 4.0]), torch.tensor([[2.0]])],
]
START = [torch.tensor([0.2, 0.1]), torch.tensor([[-0.3]])]


def _round_aggregate(x: list[torch.Tensor], r: int) -> list[torch.Tensor]:
    """FedAvg of the clients after one round from ``x``; client ``r % 3`` drifts further each round."""
    models = []
    for i, optimum in enumerate(OPTIMA):
        pull = 0.5 + 0.1 * ((r + i) % 3)
        models.append([xk + pull * (ak.to(xk.dtype) - xk) for xk, ak in zip(x, optimum)])
    return fedavg(models, weights=[1, 2, 3])


# ------------------------------------------------------------ hand references
def _reference_adaptive(kind: str, rounds: int, *, lr: float, beta1: float, beta2: float, tau: float):
    """Reddi et al. (2021), Algorithm 2, coordinate by coordinate in Python floats, with Delta = aggregate - x."""
    x = [t.double().flatten().tolist() for t in START]
    m = [[0.0] * len(t) for t in x]
    v = [[tau**2] * len(t) for t in x]
    for r in range(rounds):
        shaped = [torch.tensor(flat, dtype=torch.float64).reshape(t.shape) for flat, t in zip(x, START)]
        agg = [t.flatten().tolist() for t in _round_aggregate(shaped, r)]
        for k in range(len(x)):
            for j in range(len(x[k])):
                delta = agg[k][j] - x[k][j]
                m[k][j] = beta1 * m[k][j] + (1 - beta1) * delta
                if kind == "adagrad":
                    v[k][j] = v[k][j] + delta**2
                elif kind == "yogi":
                    sign = (v[k][j] > delta**2) - (v[k][j] < delta**2)
                    v[k][j] = v[k][j] - (1 - beta2) * delta**2 * sign
                else:
                    v[k][j] = beta2 * v[k][j] + (1 - beta2) * delta**2
                x[k][j] = x[k][j] + lr * m[k][j] / (math.sqrt(v[k][j]) + tau)
    return [torch.tensor(flat, dtype=torch.float64).reshape(t.shape) for flat, t in zip(x, START)]


HYPER = {"lr": 0.3, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}


def _make(kind: str, params, **overrides):
    h = {**HYPER, **overrides}
    if kind == "adam":
        return FedAdam(params, lr=h["lr"], betas=(h["beta1"], h["beta2"]), tau=h["tau"])
    if kind == "yogi":
        return FedYogi(params, lr=h["lr"], betas=(h["beta1"], h["beta2"]), tau=h["tau"])
    return FedAdagrad(params, lr=h["lr"], beta1=h["beta1"], tau=h["tau"])


def _server_round(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, r: int) -> None:
    agg = _round_aggregate([p.detach() for p in params], r)
    for p, g in zip(params, pseudo_gradient(params, agg)):
        p.grad = g
    opt.step()


KINDS = ["adam", "yogi", "adagrad"]
STEPS = {"adam": fedadam_step_, "yogi": fedyogi_step_, "adagrad": fedadagrad_step_}


@pytest.mark.parametrize("kind", KINDS)
def test_step_functions_match_the_papers_equations_over_several_rounds(kind):
    rounds = 6
    expected = _reference_adaptive(kind, rounds, **HYPER)
    x = [t.double().clone() for t in START]
    m = [torch.zeros_like(t) for t in x]
    v = [torch.full_like(t, HYPER["tau"] ** 2) for t in x]
    for r in range(rounds):
        g = pseudo_gradient(x, _round_aggregate(x, r))
        if kind == "adagrad":
            fedadagrad_step_(x, g, m, v, lr=HYPER["lr"], beta1=HYPER["beta1"], tau=HYPER["tau"])
        else:
            STEPS[kind](x, g, m, v, **HYPER)
    for got, want in zip(x, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.equal(x[0], START[0].double())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_optimizers_match_the_papers_equations_over_several_rounds(kind, dtype):
    rounds = 6
    expected = _reference_adaptive(kind, rounds, **HYPER)
    params = [torch.nn.Parameter(t.to(dtype).clone()) for t in START]
    opt = _make(kind, params)
    for r in range(rounds):
        _server_round(params, opt, r)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    for p, want in zip(params, expected):
        assert p.dtype == dtype
        torch.testing.assert_close(p.detach(), want.to(dtype), **tol)
    second = "sum_sq" if kind == "adagrad" else "exp_avg_sq"
    for p in params:
        assert set(opt.state[p]) == {"exp_avg", second}
        assert opt.state[p]["exp_avg"].dtype == dtype and opt.state[p][second].dtype == dtype


def test_yogi_adam_and_adagrad_differ_on_the_same_rounds():
    finals = {kind: _reference_adaptive(kind, 4, **HYPER)[0] for kind in KINDS}
    assert not torch.allclose(finals["adam"], finals["yogi"])
    assert not torch.allclose(finals["adam"], finals["adagrad"])


@pytest.mark.parametrize("kind", KINDS)
def test_state_starts_at_zero_and_tau_squared(kind):
    w = torch.nn.Parameter(torch.ones(3))
    opt = _make(kind, [w], tau=0.1, beta1=0.5, beta2=0.5)
    assert len(opt.state) == 0
    w.grad = torch.zeros(3)
    opt.step()  # g = 0: m stays 0; v decays (Adam), stays (Yogi: sign(v - 0) * 0, Adagrad: + 0)
    state = opt.state[w]
    assert torch.equal(state["exp_avg"], torch.zeros(3))
    second = state["sum_sq" if kind == "adagrad" else "exp_avg_sq"]
    expected = 0.5 * 0.01 if kind == "adam" else 0.01
    torch.testing.assert_close(second, torch.full((3,), expected))
    assert torch.equal(w.detach(), torch.ones(3))


def test_parameters_without_a_gradient_are_left_alone():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = FedAdam([a, b], lr=0.1)
    a.grad = torch.tensor([1.0, -1.0])
    opt.step()
    assert b not in opt.state and torch.equal(b.detach(), torch.ones(2))
    assert not torch.equal(a.detach(), torch.ones(2))


def test_step_runs_the_closure_and_returns_its_loss():
    w = torch.nn.Parameter(torch.ones(1))
    opt = FedYogi([w])

    def closure():
        w.grad = torch.ones(1)
        return torch.tensor(7.0)

    assert opt.step(closure).item() == 7.0
    assert w.item() < 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_resumes_bit_for_bit(kind):
    def fresh():
        return [torch.nn.Parameter(t.clone()) for t in START]

    straight = fresh()
    opt = _make(kind, straight)
    for r in range(4):
        _server_round(straight, opt, r)

    first = fresh()
    opt = _make(kind, first)
    for r in range(2):
        _server_round(first, opt, r)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt = _make(kind, resumed, lr=123.0)  # the saved hyperparameters replace these
    opt.load_state_dict(saved["optimizer"])
    assert opt.param_groups[0]["lr"] == HYPER["lr"]
    for r in range(2, 4):
        _server_round(resumed, opt, r)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_without_the_state_the_resumed_run_differs():
    straight = [torch.nn.Parameter(t.clone()) for t in START]
    opt = FedAdam(straight, lr=0.3)
    for r in range(4):
        _server_round(straight, opt, r)
    restarted = [torch.nn.Parameter(t.clone()) for t in START]
    opt = FedAdam(restarted, lr=0.3)
    for r in range(2):
        _server_round(restarted, opt, r)
    opt = FedAdam(restarted, lr=0.3)  # forgets m and v
    for r in range(2, 4):
        _server_round(restarted, opt, r)
    assert not torch.equal(straight[0], restarted[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_parameters_keep_their_dtype(dtype):
    w = torch.nn.Parameter(torch.zeros(2, dtype=dtype))
    opt = FedAdam([w], lr=0.1)
    w.grad = torch.tensor([1e-4, -1e-4], dtype=dtype)  # g**2 = 1e-8 underflows in float16, not in float64
    opt.step()
    assert w.dtype == dtype and opt.state[w]["exp_avg"].dtype == dtype
    # the first step is about lr * sign(-g) * (1 - beta1) * |g| / (sqrt((1 - beta2) g^2 + tau^2) + tau)
    g = 1e-4
    step = 0.1 * 0.1 * g / (math.sqrt(0.99e-6 + 0.01 * g**2) + 1e-3)
    torch.testing.assert_close(w.detach().double(), torch.tensor([-step, step], dtype=torch.float64),
                               rtol=2e-2, atol=1e-7)


# --------------------------------------------------------------- FedAvgM / SGD
def test_sgd_with_momentum_on_the_pseudo_gradient_is_fedavgm():
    """Hsu et al. (2019): v = beta v + Delta; x = x + eta v, with Delta = aggregate - x and v starting at 0."""
    eta, beta = 0.7, 0.9
    params = [torch.nn.Parameter(t.double().clone()) for t in START]
    opt = torch.optim.SGD(params, lr=eta, momentum=beta)
    x = [t.double().clone() for t in START]
    v = [torch.zeros_like(t) for t in x]
    for r in range(5):
        _server_round(params, opt, r)
        agg = _round_aggregate(x, r)
        for k in range(len(x)):
            v[k] = beta * v[k] + (agg[k] - x[k])
            x[k] = x[k] + eta * v[k]
        for p, want in zip(params, x):
            torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-12)


def test_identity_sgd_on_the_pseudo_gradient_is_fedavg_up_to_rounding():
    params = [torch.nn.Parameter(t.clone()) for t in START]
    opt = torch.optim.SGD(params, lr=1.0)
    assert is_identity_server(opt)
    agg = _round_aggregate([p.detach() for p in params], 0)
    for p, g in zip(params, pseudo_gradient(params, agg)):
        p.grad = g
    opt.step()
    for p, a in zip(params, agg):
        torch.testing.assert_close(p.detach(), a)
    # ... but not bit for bit in general: x - (x - agg) rounds x - agg first
    w = torch.nn.Parameter(torch.tensor([1.0]))
    w.grad = pseudo_gradient([w], [torch.tensor([1e-8])])[0]
    torch.optim.SGD([w], lr=1.0).step()
    assert w.item() == 0.0


def test_is_identity_server_truth_table():
    w = torch.nn.Parameter(torch.zeros(1))
    u = torch.nn.Parameter(torch.zeros(1))
    assert is_identity_server(torch.optim.SGD([w], lr=1.0))
    assert is_identity_server(torch.optim.SGD([w], lr=1))
    assert is_identity_server(torch.optim.SGD([w], lr=torch.tensor(1.0)))
    assert is_identity_server(torch.optim.SGD([{"params": [w]}, {"params": [u]}], lr=1.0))
    for kwargs in (
        {"lr": 0.5},
        {"lr": 1.0, "momentum": 0.9},
        {"lr": 1.0, "momentum": 0.9, "nesterov": True},
        {"lr": 1.0, "momentum": 0.9, "dampening": 0.1},
        {"lr": 1.0, "weight_decay": 1e-4},
        {"lr": 1.0, "maximize": True},
    ):
        assert not is_identity_server(torch.optim.SGD([w], **kwargs)), kwargs
    assert not is_identity_server(torch.optim.SGD([{"params": [w]}, {"params": [u], "lr": 0.1}], lr=1.0))
    assert not is_identity_server(torch.optim.Adam([w], lr=1.0))
    assert not is_identity_server(FedAdam([w], lr=1.0))

    class MySGD(torch.optim.SGD):
        pass

    assert not is_identity_server(MySGD([w], lr=1.0))
    opt = torch.optim.SGD([w], lr=1.0)
    opt.param_groups[0]["lr"] = 0.9  # a scheduler may change it
    assert not is_identity_server(opt)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got list"):
        is_identity_server([w])


# ------------------------------------------------------------- pseudo_gradient
def test_pseudo_gradient_values_dtype_and_new_tensors():
    x = [torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.tensor([[3.0]], dtype=torch.float64)]
    agg = [torch.tensor([0.5, 3.0]), torch.tensor([[1.0]], dtype=torch.float64)]
    g = pseudo_gradient(x, agg)
    torch.testing.assert_close(g[0], torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(g[1], torch.tensor([[2.0]], dtype=torch.float64))
    assert not g[0].requires_grad and g[0].data_ptr() != x[0].data_ptr()
    assert pseudo_gradient([], []) == []


def test_pseudo_gradient_errors():
    x = [torch.zeros(2), torch.zeros(3)]
    with pytest.raises(CohortMismatchError, match="global_params has 2 tensors, aggregate has 1"):
        pseudo_gradient(x, [torch.zeros(2)])
    with pytest.raises(CohortMismatchError, match=r"global_params and aggregate differ at tensor 1: shape \(3,\) vs \(4,\)"):
        pseudo_gradient(x, [torch.zeros(2), torch.zeros(4)])
    with pytest.raises(TypeError, match="pseudo_gradient takes floating tensors .*aggregate tensor 1 is torch.int64"):
        pseudo_gradient(x, [torch.zeros(2), torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(TypeError, match=r"global_params must be a list of tensors .*got Tensor"):
        pseudo_gradient(torch.zeros(2), x)
    with pytest.raises(TypeError, match="aggregate holds a float at tensor 0, expected a Tensor"):
        pseudo_gradient(x, [1.0, torch.zeros(3)])
    with pytest.raises(TypeError, match="global_params must be a list of tensors .*got dict"):
        pseudo_gradient({"w": torch.zeros(2)}, x)


# ------------------------------------------------------------ argument checks
BAD_LR = [0.0, -0.1, math.nan, math.inf, "0.1", True, None]
BAD_TAU = [0.0, -1e-3, math.inf, math.nan, "x"]


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
def test_optimizer_hyperparameters_are_checked(cls):
    w = torch.nn.Parameter(torch.zeros(1))
    for lr in BAD_LR:
        with pytest.raises(ValueError, match="lr must be a finite number > 0, got " + re.escape(repr(lr))):
            cls([w], lr=lr)
    for tau in BAD_TAU:
        with pytest.raises(ValueError, match=r"tau must be a finite number > 0, got "):
            cls([w], tau=tau)
    if cls is FedAdagrad:
        for beta1 in (1.0, -0.1, math.nan, "0.9", (0.9, 0.99)):
            with pytest.raises(ValueError, match=r"beta1 must be in \[0, 1\), got "):
                cls([w], beta1=beta1)
    else:
        for betas in ((1.0, 0.99), (0.9, 1.0), (0.9, -0.1), (0.9,), (0.9, 0.99, 0.999), 0.9, "ab", (math.nan, 0.9)):
            with pytest.raises(ValueError, match=r"betas must be a pair \(beta1, beta2\), each in \[0, 1\), got "):
                cls([w], betas=betas)


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
def test_param_groups_are_checked_when_added_and_at_every_step(cls):
    w, u = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got -1.0"):
        cls([{"params": [w]}, {"params": [u], "lr": -1.0}])
    opt = cls([w])
    with pytest.raises(ValueError, match="tau must be a finite number > 0, got 0.0"):
        opt.add_param_group({"params": [u], "tau": 0.0})
    assert len(opt.param_groups) == 1  # the bad group was not kept
    opt.add_param_group({"params": [u], "lr": 0.5})
    assert opt.param_groups[1]["lr"] == 0.5
    opt.param_groups[0]["lr"] = math.nan  # edited after construction
    w.grad = torch.ones(1)
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got nan"):
        opt.step()
    with pytest.raises(TypeError, match=rf"{cls.__name__} steps floating parameters only; parameter 0 is torch.int64"):
        cls([torch.zeros(2, dtype=torch.int64)])


def test_sparse_gradients_are_refused():
    w = torch.nn.Parameter(torch.zeros(3))
    w.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match="FedAdam does not support sparse gradients"):
        FedAdam([w]).step()


def test_step_function_errors():
    p, g, m, v = [torch.zeros(2)], [torch.zeros(2)], [torch.zeros(2)], [torch.ones(2)]
    for lr in BAD_LR:
        with pytest.raises(ValueError, match="lr must be a finite number > 0, got "):
            fedadam_step_(p, g, m, v, lr=lr, beta1=0.9, beta2=0.99, tau=1e-3)
    with pytest.raises(ValueError, match=r"beta1 must be in \[0, 1\), got 1.0"):
        fedyogi_step_(p, g, m, v, lr=0.1, beta1=1.0, beta2=0.99, tau=1e-3)
    with pytest.raises(ValueError, match=r"beta2 must be in \[0, 1\), got -0.5"):
        fedadam_step_(p, g, m, v, lr=0.1, beta1=0.9, beta2=-0.5, tau=1e-3)
    with pytest.raises(ValueError, match="tau must be a finite number > 0, got 0"):
        fedadagrad_step_(p, g, m, v, lr=0.1, beta1=0.9, tau=0)
    with pytest.raises(CohortMismatchError, match="params has 1 tensors, grads has 2"):
        fedadam_step_(p, g * 2, m, v, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    with pytest.raises(CohortMismatchError, match=r"params and exp_avgs differ at tensor 0: shape \(2,\) vs \(3,\)"):
        fedyogi_step_(p, g, [torch.zeros(3)], v, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    with pytest.raises(CohortMismatchError, match="params has 1 tensors, sum_sqs has 0"):
        fedadagrad_step_(p, g, m, [], lr=0.1, beta1=0.9, tau=1e-3)
    with pytest.raises(TypeError, match="fedadam_step_ takes floating tensors .*params tensor 0 is torch.int64"):
        fedadam_step_([torch.zeros(2, dtype=torch.int64)], g, m, v, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    assert torch.equal(p[0], torch.zeros(2)) and torch.equal(v[0], torch.ones(2))  # nothing moved


# -------------------------------------------------------------------- SCAFFOLD
def test_scaffold_correction():
    c = [torch.tensor([1.0, 0.0]), torch.tensor([2.0])]
    c_i = [torch.tensor([0.5, 2.0]), torch.tensor([2.0])]
    out = scaffold_correction(c, c_i)
    torch.testing.assert_close(out[0], torch.tensor([0.5, -2.0]))
    torch.testing.assert_close(out[1], torch.tensor([0.0]))
    assert out[0].data_ptr() not in (c[0].data_ptr(), c_i[0].data_ptr())


def _local_sgd(x, a, correction, steps, lr):
    """K plain SGD steps on f(y) = 0.5 ||y - a||^2 with SCAFFOLD's correction: y = y - lr (y - a + c - c_i)."""
    y = [t.double().clone() for t in x]
    for _ in range(steps):
        y = [yk - lr * (yk - ak + dk) for yk, ak, dk in zip(y, a, correction)]
    return y


@pytest.mark.parametrize(("steps", "lr"), [(1, 0.1), (5, 0.1), (20, 0.05)])
def test_scaffold_option_ii_on_a_quadratic_in_closed_form(steps, lr):
    x = [torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([[2.0]], dtype=torch.float64)]
    a = [torch.tensor([3.0, 1.0], dtype=torch.float64), torch.tensor([[-1.0]], dtype=torch.float64)]
    c = [torch.tensor([0.2, -0.1], dtype=torch.float64), torch.tensor([[0.3]], dtype=torch.float64)]
    c_i = [torch.tensor([-0.4, 0.6], dtype=torch.float64), torch.tensor([[0.1]], dtype=torch.float64)]
    correction = scaffold_correction(c, c_i)
    y = _local_sgd(x, a, correction, steps, lr)
    got = scaffold_client_variate(c_i, c, x, y, steps=steps, lr=lr)
    # y_K - (a - d) = (1 - lr)^K (x - (a - d)) with d = c - c_i, so
    # c_i+ = c_i - c + (1 - (1 - lr)^K) (x - a + c - c_i) / (K lr)
    shrink = 1 - (1 - lr) ** steps
    for g, ci, ck, xk, ak in zip(got, c_i, c, x, a):
        torch.testing.assert_close(g, ci - ck + shrink * (xk - ak + ck - ci) / (steps * lr))
    if steps == 1:  # one step: option II is the gradient at x, option I's value
        for g, xk, ak in zip(got, x, a):
            torch.testing.assert_close(g, xk - ak)


def test_scaffold_option_i_returns_the_gradient_at_x():
    x = [torch.tensor([0.5, -1.0])]
    grad = [torch.tensor([1.5, 2.5], dtype=torch.float64)]
    out = scaffold_client_variate([torch.zeros(2)], [torch.ones(2)], x, [torch.zeros(2)], steps=3, lr=0.1,
                                  option="I", grad_at_x=grad)
    assert out[0].dtype == torch.float32  # the dtype of c_i
    torch.testing.assert_close(out[0], torch.tensor([1.5, 2.5]))
    out[0].add_(1)
    assert torch.equal(grad[0], torch.tensor([1.5, 2.5], dtype=torch.float64))


def test_scaffold_server_update_hand_computation():
    x = [torch.tensor([1.0, 0.0])]
    c = [torch.tensor([0.5, 0.5])]
    ys = [[torch.tensor([2.0, 1.0])], [torch.tensor([4.0, -3.0])]]
    dcs = [[torch.tensor([1.0, 2.0])], [torch.tensor([3.0, -2.0])]]
    new_x, new_c = scaffold_server_update(x, c, ys, dcs, num_clients=10, global_lr=0.5)
    # mean(y - x) = mean([1, 1], [3, -3]) = [2, -1]; x + 0.5 * [2, -1] = [2, -0.5]
    torch.testing.assert_close(new_x[0], torch.tensor([2.0, -0.5]))
    # c + (1/10) * ([1, 2] + [3, -2]) = [0.5 + 0.4, 0.5 + 0.0] = |S|/N * mean(dc) = 2/10 * [2, 0]
    torch.testing.assert_close(new_c[0], torch.tensor([0.9, 0.5]))
    new_x, _ = scaffold_server_update(x, c, ys, dcs, num_clients=2, weights=[3, 1])
    # x + (3 [1, 1] + [3, -3]) / 4 = [1, 0] + [1.5, 0] = [2.5, 0]
    torch.testing.assert_close(new_x[0], torch.tensor([2.5, 0.0]))
    assert torch.equal(x[0], torch.tensor([1.0, 0.0]))  # inputs unchanged


@pytest.mark.parametrize("weights", [None, [5, 1, 2]])
def test_scaffold_with_zero_variates_is_fedavg_for_the_server_step(weights):
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(3, 2, generator=g), torch.randn(4, generator=g)]
    ys = [[t + torch.randn(t.shape, generator=g) for t in x] for _ in range(3)]
    zeros = [[torch.zeros_like(t) for t in x] for _ in range(3)]
    c = [torch.zeros_like(t) for t in x]
    new_x, new_c = scaffold_server_update(x, c, ys, zeros, num_clients=3, weights=weights)
    for a, b in zip(new_x, fedavg(ys, weights)):
        torch.testing.assert_close(a, b)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in new_c)


def test_scaffold_server_variate_is_the_variate_half_of_the_server_update():
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(2, 3, generator=g), torch.randn(4, generator=g)]
    c = [torch.randn(2, 3, generator=g), torch.randn(4, generator=g)]
    ys = [[t + 1 for t in x] for _ in range(3)]
    dcs = [[torch.randn(t.shape, generator=g) for t in x] for _ in range(3)]
    _, new_c = scaffold_server_update(x, c, ys, dcs, num_clients=8)
    alone = scaffold_server_variate(c, dcs, num_clients=8)
    for a, b, ck, k in zip(alone, new_c, c, range(2)):
        assert torch.equal(a, b)
        # |S| / N times the mean of the sampled clients' deltas
        torch.testing.assert_close(a, ck + 3 / 8 * torch.stack([dc[k] for dc in dcs]).mean(0))
    with pytest.raises(ValueError, match="scaffold_server_variate needs at least one client's Delta c_i, got none"):
        scaffold_server_variate(c, [], num_clients=2)
    with pytest.raises(ValueError, match=r"num_clients must be >= the number of sampled clients \(3\), got 2"):
        scaffold_server_variate(c, dcs, num_clients=2)
    with pytest.raises(ValueError, match="num_clients must be an integer >= 1, got 0"):
        scaffold_server_variate(c, dcs, num_clients=0)
    with pytest.raises(CohortMismatchError, match=r"c and client_variate_deltas\[0\] differ at tensor 1: shape \(4,\) vs \(5,\)"):
        scaffold_server_variate(c, [[dcs[0][0], torch.zeros(5)]], num_clients=2)
    with pytest.raises(TypeError, match="client_variate_deltas must be a list with one list of tensors per sampled client, got NoneType"):
        scaffold_server_variate(c, None, num_clients=2)


def test_scaffold_weight_zero_client_is_left_out_of_the_model_step():
    x, c = [torch.zeros(1)], [torch.zeros(1)]
    ys = [[torch.tensor([2.0])], [torch.tensor([math.nan])]]
    dcs = [[torch.tensor([1.0])], [torch.tensor([3.0])]]
    new_x, new_c = scaffold_server_update(x, c, ys, dcs, num_clients=4, weights=[1, 0])
    torch.testing.assert_close(new_x[0], torch.tensor([2.0]))
    torch.testing.assert_close(new_c[0], torch.tensor([1.0]))  # every sampled client's variate counts


def test_scaffold_removes_client_drift_that_fedavg_keeps():
    """Two clients f_i(y) = 0.5 h_i (y - a_i)^2: the optimum is sum h a / sum h; FedAvg with local steps drifts."""
    h, a = [1.0, 4.0], [0.0, 1.0]
    optimum = sum(hi * ai for hi, ai in zip(h, a)) / sum(h)
    steps, lr = 10, 0.1

    def local(x, correction, i):
        y = x.clone()
        for _ in range(steps):
            y = y - lr * (h[i] * (y - a[i]) + correction)
        return y

    x_avg = torch.zeros(1, dtype=torch.float64)
    x, c = [torch.zeros(1, dtype=torch.float64)], [torch.zeros(1, dtype=torch.float64)]
    c_is = [[torch.zeros(1, dtype=torch.float64)] for _ in h]
    for _ in range(60):
        x_avg = sum(local(x_avg, 0.0, i) for i in range(2)) / 2
        ys, dcs = [], []
        for i in range(2):
            y = local(x[0], scaffold_correction(c, c_is[i])[0], i)
            new = scaffold_client_variate(c_is[i], c, x, [y], steps=steps, lr=lr)
            dcs.append([new[0] - c_is[i][0]])
            ys.append([y])
            c_is[i] = new
        x, c = scaffold_server_update(x, c, ys, dcs, num_clients=2)
    assert abs(x[0].item() - optimum) < 1e-6
    assert abs(x_avg.item() - optimum) > 0.05  # FedAvg's fixed point is elsewhere


def test_scaffold_errors():
    t = [torch.zeros(2)]
    args = (t, t, t, t)
    for steps in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"steps must be an integer >= 1, got {steps!r}"):
            scaffold_client_variate(*args, steps=steps, lr=0.1)
    for lr in (0, -0.1, math.inf, math.nan, "0.1"):
        with pytest.raises(ValueError, match=r"lr must be a finite number > 0, got "):
            scaffold_client_variate(*args, steps=1, lr=lr)
    for option in ("III", "i", 2, None):
        with pytest.raises(ValueError, match=r"option must be 'I' \(gradient at x\) or 'II' \(from the local steps\), got "):
            scaffold_client_variate(*args, steps=1, lr=0.1, option=option)
    with pytest.raises(ValueError, match="option 'I' needs grad_at_x .*got None"):
        scaffold_client_variate(*args, steps=1, lr=0.1, option="I")
    with pytest.raises(ValueError, match="grad_at_x is used by option 'I' only"):
        scaffold_client_variate(*args, steps=1, lr=0.1, grad_at_x=t)
    with pytest.raises(CohortMismatchError, match=r"c_i and y_i differ at tensor 0: shape \(2,\) vs \(3,\)"):
        scaffold_client_variate(t, t, t, [torch.zeros(3)], steps=1, lr=0.1)
    with pytest.raises(CohortMismatchError, match="c_i has 1 tensors, grad_at_x has 2"):
        scaffold_client_variate(*args, steps=1, lr=0.1, option="I", grad_at_x=t * 2)
    with pytest.raises(TypeError, match="scaffold_correction takes floating tensors .*c_i tensor 0 is torch.int64"):
        scaffold_correction(t, [torch.zeros(2, dtype=torch.int64)])
    with pytest.raises(CohortMismatchError, match="c has 1 tensors, c_i has 2"):
        scaffold_correction(t, t * 2)

    ys = [t, t]
    with pytest.raises(ValueError, match=r"num_clients must be >= the number of sampled clients \(2\), got 1"):
        scaffold_server_update(t, t, ys, ys, num_clients=1)
    with pytest.raises(ValueError, match="num_clients must be an integer >= 1, got 2.0"):
        scaffold_server_update(t, t, ys, ys, num_clients=2.0)
    with pytest.raises(ValueError, match=r"client_variate_deltas must have one entry per client model \(2\), got 1"):
        scaffold_server_update(t, t, ys, ys[:1], num_clients=2)
    with pytest.raises(ValueError, match="scaffold_server_update needs at least one client model"):
        scaffold_server_update(t, t, [], [], num_clients=2)
    for lr in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="global_lr must be a finite number > 0, got "):
            scaffold_server_update(t, t, ys, ys, num_clients=2, global_lr=lr)
    with pytest.raises(ValueError, match=r"weights must have one entry per update \(2\), got shape \(3,\)"):
        scaffold_server_update(t, t, ys, ys, num_clients=2, weights=[1, 1, 1])
    with pytest.raises(CohortMismatchError, match=r"x and client_models\[1\] differ at tensor 0: shape \(2,\) vs \(3,\)"):
        scaffold_server_update(t, t, [t, [torch.zeros(3)]], ys, num_clients=2)
    with pytest.raises(CohortMismatchError, match=r"c has 1 tensors, client_variate_deltas\[0\] has 0"):
        scaffold_server_update(t, t, ys, [[], t], num_clients=2)
    with pytest.raises(TypeError, match="client_models must be a list with one list of tensors per sampled client, got Tensor"):
        scaffold_server_update(t, t, torch.zeros(2, 2), ys, num_clients=2)
