"""The stacked optimizer with per-member hyperparameters equals one torch optimizer per member (the oracle)."""

from __future__ import annotations

import pytest
import torch

from lightning_colearn.optim import StackedOptimizer

N, SHAPES = 4, [(3, 5), (5,)]

# each member its own values; at step 10 they change, as population-based training changes them
SETTINGS = {
    torch.optim.SGD: (
        [dict(lr=0.1, momentum=0.9, weight_decay=1e-3), dict(lr=0.05, momentum=0.5, weight_decay=0.0),
         dict(lr=0.2, momentum=0.0, weight_decay=1e-2), dict(lr=0.01, momentum=0.99, weight_decay=1e-4)],
        [dict(momentum=0.0), dict(lr=0.07, momentum=0.8), dict(momentum=0.6), dict(weight_decay=0.0)],
    ),
    torch.optim.Adam: (
        [dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8), dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-3),
         dict(lr=2e-2, betas=(0.95, 0.9999), eps=1e-7), dict(lr=5e-3, betas=(0.5, 0.9), eps=1e-8, weight_decay=1e-2)],
        [dict(betas=(0.7, 0.99)), dict(lr=1e-3), dict(eps=1e-5, weight_decay=1e-3), dict(betas=(0.9, 0.999), lr=1e-2)],
    ),
    torch.optim.AdamW: (
        [dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=1e-2), dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1),
         dict(lr=2e-2, betas=(0.95, 0.9999), weight_decay=0.0), dict(lr=5e-3, betas=(0.5, 0.9), eps=1e-6, weight_decay=1e-3)],
        [dict(weight_decay=0.05), dict(betas=(0.85, 0.995)), dict(lr=1e-3), dict(eps=1e-8)],
    ),
}


@pytest.mark.parametrize("kind", list(SETTINGS), ids=lambda k: k.__name__)
@pytest.mark.parametrize("subset", [False, True], ids=["all", "some members a step"])
def test_per_member_hyperparameters_equal_each_members_torch_optimizer(kind, subset):
    start, later = SETTINGS[kind]
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(N, *s, generator=g, dtype=torch.float64).float() for s in SHAPES]
    stacked = [torch.nn.Parameter(t.clone()) for t in init]
    views = [[torch.nn.Parameter(p.data[i], requires_grad=False) for p in stacked] for i in range(N)]
    opt = StackedOptimizer(stacked, views, kind, start)
    own = [[torch.nn.Parameter(t[i].clone()) for t in init] for i in range(N)]
    oracles = [kind(params, **settings) for params, settings in zip(own, start)]
    for step in range(20):
        if step == 10:
            for i, change in enumerate(later):
                opt.param_groups[i].update(change)
                oracles[i].param_groups[0].update(change)
        grads = [torch.randn(N, *s, generator=g) for s in SHAPES]
        members = [i for i in range(N) if not subset or (step + i) % 3] if subset else None
        for p, grad in zip(stacked, grads):
            p.grad = grad.clone()
        opt.step(members=members)
        for i in members if members is not None else range(N):
            for p, grad in zip(own[i], grads):
                p.grad = grad[i].clone()
            oracles[i].step()
        for i in range(N):
            for p, q in zip(stacked, own[i]):
                torch.testing.assert_close(p.data[i], q.data, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step}, member {i}: {m}")
    for i in range(N):  # the state each member would have in its own optimizer, hyperparameters included
        mine, theirs = opt.member_state_dict(i), oracles[i].state_dict()
        assert {k: v for k, v in mine["param_groups"][0].items() if k in later[i]} == later[i]
        for idx, entry in theirs["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(mine["state"][idx][key].float(), value.float(), rtol=1e-5, atol=1e-6)


def test_a_member_with_momentum_loads_into_a_cohort_without_any():
    """Exploit copies optimizer state: a momentum buffer must find room even if no member had momentum before."""
    p = torch.nn.Parameter(torch.zeros(2, 3))
    views = [[torch.nn.Parameter(p.data[i], requires_grad=False)] for i in range(2)]
    opt = StackedOptimizer([p], views, torch.optim.SGD, {"lr": 0.1})
    source = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.5, momentum=0.9)
    source.param_groups[0]["params"][0].grad = torch.ones(3)
    source.step()
    opt.load_member_state_dict(1, source.state_dict())
    assert opt.param_groups[1]["momentum"] == 0.9 and opt.param_groups[0]["momentum"] == 0
    p.grad = torch.ones(2, 3)
    opt.step()
    source.step()
    # member 1 (weights 0) steps with the loaded buffer (1) and lr: buf = 0.9 * 1 + 1, w = -0.5 * 1.9
    torch.testing.assert_close(p.data[1], torch.full((3,), -0.95))
    torch.testing.assert_close(p.data[0], torch.full((3,), -0.1))  # member 0: plain SGD
