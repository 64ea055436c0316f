"""The stacked backend: the loop is the oracle for forward, optimizer steps, training, checkpoints and errors."""

from __future__ import annotations

import copy
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.testing import assert_close

from helpers import BNNet, fast_trainer, states
from lightning_colearn import Cohort, CohortDataModule, CohortModule
from lightning_colearn.functional import CohortMismatchError
from lightning_colearn.functional.stacked import clip_grad_norms_
from lightning_colearn.models import ColearnConvNet, ConvNet, LogisticRegression, MLP
from lightning_colearn.module import choose_backend
from lightning_colearn.optim import StackedOptimizer
from lightning_colearn.stacked import StackedModel

TOL = dict(rtol=1e-4, atol=1e-5)
# After 20 training steps: float32 sums in another order (one bmm instead of N matmuls) drift apart a little,
# most where Adam divides by a tiny second moment (measured: 1.5e-5 on 1 of 100k weights, Adam + amsgrad).
TRAIN_TOL = dict(rtol=1e-4, atol=1e-4)


class Odd(nn.Module):
    """A layer without a batched form (LayerNorm, a bare parameter): the engine uses vmap."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 8)
        self.norm = nn.LayerNorm(8)
        self.scale = nn.Parameter(torch.ones(8))
        self.out = nn.Linear(8, 10)

    def forward(self, x):
        return self.out(self.norm(self.fc(x.flatten(1))) * self.scale)


class Centred(nn.Module):
    """A forward that mixes samples (subtracts the batch mean): folding members into the batch would be wrong."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x - x.mean(0, keepdim=True))


def members(cls, n=4, seed=0):
    torch.manual_seed(seed)
    return [cls() for _ in range(n)]


def pair(cls, n=4, seed=0):
    """The same members on both backends."""
    built = members(cls, n, seed)
    return Cohort(copy.deepcopy(built)), Cohort(copy.deepcopy(built), backend="stacked")


# ------------------------------------------------------------------ forward
@pytest.mark.parametrize("cls", [LogisticRegression, MLP, ConvNet, ColearnConvNet, BNNet, Odd])
@pytest.mark.parametrize("train", [False, True])
def test_forward_equals_loop(cls, train):
    """Every member's output (and BatchNorm running statistics) equal the member-by-member forward."""
    loop, stacked = pair(cls)
    loop.train(train), stacked.train(train)
    x = torch.randn(4, 6, 1, 28, 28)
    want = torch.stack([m(x[i]) for i, m in enumerate(loop)])
    assert_close(stacked.stacked_forward(x, per_member=True), want, **TOL)
    shared = torch.stack([m(x[0]) for m in loop])
    assert_close(stacked(x[0]), shared, **TOL)
    for a, b in zip(states_of(loop), states_of(stacked)):
        for k in a:
            assert_close(a[k], b[k], **TOL)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 0, 1, 1), (2, 1, 1, 2), (1, 2, 2, 1)])
def test_stacked_conv2d_equals_member_convs(monkeypatch, channels_last, stride, padding, dilation, groups):
    """The grouped convolution, in either memory format, gives each member its own conv's output and gradients."""
    import lightning_colearn.functional.stacked as FS

    monkeypatch.setattr(FS, "CHANNELS_LAST", channels_last)
    torch.manual_seed(0)
    n, batch = 3, 5
    w = torch.randn(n, 4, 4 // groups, 3, 3, requires_grad=True)
    b = torch.randn(n, 4, requires_grad=True)
    x = torch.randn(batch * n, 4, 9, 9, requires_grad=True)  # sample-major: row b * n + i is member i's
    out = FS.conv2d(x, w, b, stride, padding, dilation, groups)
    assert out.is_contiguous()  # the model's own forward sees the usual layout
    want = torch.stack([F.conv2d(x[i::n], w[i], b[i], stride, padding, dilation, groups) for i in range(n)], 1)
    assert_close(out, want.flatten(0, 1), **TOL)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, b), g)
    expected = torch.autograd.grad(want.flatten(0, 1), (x, w, b), g)
    for a, e in zip(got, expected):
        assert_close(a, e, **TOL)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed on CPU runs the channels-last kernel too
        low = FS.conv2d(x, w, b, stride, padding, dilation, groups)
    assert low.dtype == torch.bfloat16
    assert_close(low.float(), out, rtol=0.05, atol=0.1)


def states_of(cohort):
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in cohort]


def test_engine_modes():
    """Known layers run batched; LayerNorm or a bare parameter fall back to vmap."""
    assert StackedModel(members(MLP, 2)).mode == "batched"
    assert StackedModel(members(ConvNet, 2)).mode == "batched"
    assert StackedModel(members(BNNet, 2)).mode == "batched"
    assert StackedModel(members(Odd, 2)).mode == "vmap"


class ConvBN(nn.Module):
    """Conv2d and BatchNorm2d: the sample-major folding and per-member running statistics."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 5)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 12 * 12, 10)

    def forward(self, x):
        return self.fc(torch.nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1))


@pytest.mark.parametrize("cls", [ConvNet, ConvBN, BNNet])
def test_members_run_in_passes_when_activations_are_large(monkeypatch, cls):
    """Above LARGEST_ACTIVATION the members run in equal passes: outputs, gradients and running statistics
    equal one pass (and the loop's), for all members or a subset."""
    import lightning_colearn.stacked as S

    loop, one = pair(cls, n=5)
    _, passes = pair(cls, n=5)
    x = torch.randn(5, 6, 1, 28, 28)
    for c in (one, passes):
        with torch.no_grad():  # the first forward measures the activations (eval: no running statistics change)
            c.eval().stacked_forward(x[:, :2], per_member=True)
        c.train()
    monkeypatch.setattr(S, "LARGEST_ACTIVATION", 2 * 6 * passes.engine._row_bytes)  # 2 members of 6 samples
    assert passes.engine.members_per_pass(6) == 2 and one.engine.members_per_pass(1) == 5
    for subset in (None, [4, 0, 3]):
        rows = list(range(5)) if subset is None else subset
        out = passes.stacked_forward(x[rows], subset, per_member=True)  # passes of 2, 2, 1 (or 2, 1)
        monkeypatch.setattr(S, "LARGEST_ACTIVATION", 10**12)
        want = one.stacked_forward(x[rows], subset, per_member=True)
        monkeypatch.setattr(S, "LARGEST_ACTIVATION", 2 * 6 * passes.engine._row_bytes)
        assert_close(out, want, **TOL)
        assert_close(out, torch.stack([loop[i].train()(x[i]) for i in rows]), **TOL)
        grads = torch.autograd.grad(out.square().sum(), passes.stacked_parameters())
        expected = torch.autograd.grad(want.square().sum(), one.stacked_parameters())
        for g, e in zip(grads, expected):
            assert_close(g, e, **TOL)
    for a, b, c in zip(states_of(passes), states_of(one), states_of(loop)):
        for k in a:
            assert_close(a[k], b[k], **TOL)
            assert_close(a[k], c[k], **TOL)


def test_a_failed_first_forward_measures_nothing():
    """The pass size is learnt from a forward that went through, not from one that raised half-way."""
    engine = StackedModel(members(ConvNet, 3))
    with pytest.raises(RuntimeError):
        engine(torch.randn(2, 1, 14, 14))  # too small for the ConvNet's fc layer: fails after conv1 ran
    assert engine._row_bytes is None and engine.members_per_pass(64) == 3
    engine(torch.randn(2, 1, 28, 28))
    assert engine._row_bytes == 10 * 24 * 24 * 4  # conv1's output per image and member, the largest
    assert engine.members_per_pass(10**6) == 1


def test_forward_that_mixes_samples_falls_back_to_vmap():
    """A forward that is not per-sample is detected on first use and runs with vmap, matching the loop."""
    loop, stacked = pair(Centred, n=3)
    x = torch.randn(3, 5, 4)
    with pytest.warns(UserWarning, match="mixes samples"):
        got = stacked.stacked_forward(x, per_member=True)
    assert stacked.engine.mode == "vmap"
    assert_close(got, torch.stack([m(x[i]) for i, m in enumerate(loop)]), **TOL)


def test_subset_forward_touches_only_its_members():
    """Running members [2, 0] gives their outputs; the others' BatchNorm statistics are bit-for-bit unchanged."""
    loop, stacked = pair(BNNet, n=4)
    stacked.train()
    before = states_of(stacked)
    x = torch.randn(2, 5, 784)
    out = stacked.stacked_forward(x, members=[2, 0], per_member=True)
    loop.train()
    assert_close(out, torch.stack([loop[2](x[0]), loop[0](x[1])]), **TOL)
    after = states_of(stacked)
    for i in (1, 3):
        assert all(torch.equal(before[i][k], after[i][k]) for k in before[i])
    assert not torch.equal(before[2]["bn.running_mean"], after[2]["bn.running_mean"])
    assert int(after[2]["bn.num_batches_tracked"]) == 1 and int(after[1]["bn.num_batches_tracked"]) == 0


def test_dropout_is_independent_per_member():
    """Members with equal weights draw different dropout masks (and the vmap path does too)."""
    for extra in ([], [nn.LayerNorm(64)]):  # LayerNorm forces the vmap path
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 64), *extra, nn.Dropout(0.5))
        cohort = Cohort(net, size=3, backend="stacked")  # deep copies: equal weights
        cohort.engine._checked = True  # the eval-mode check would be fine too; skip it to test training mode only
        cohort.train()
        out = cohort(torch.ones(2, 8))
        masks = out == 0
        assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


# ----------------------------------------------------------- cohort operations
def test_member_views_share_the_stacked_storage():
    """A member's tensors are views of the engine's rows: writing one shows in the other, both ways."""
    _, stacked = pair(MLP, n=3)
    with torch.no_grad():
        stacked[1].fc1.weight.fill_(2.0)
    assert torch.equal(stacked.engine.tensor("fc1.weight")[1], torch.full((128, 784), 2.0))
    with torch.no_grad():
        stacked.engine.tensor("fc2.bias")[2].fill_(3.0)
    assert torch.equal(stacked[2].fc2.bias, torch.full((10,), 3.0))
    assert not stacked[0].fc1.weight.requires_grad  # views: train through the stacked parameters


@pytest.mark.parametrize(
    "op",
    [
        lambda c: c.average(),
        lambda c: c.average(weights=[1.0, 2.0, 3.0, 4.0], members=[0, 1, 2, 3], into=[1]),
        lambda c: c.weighted_sum([0.5, -1.0], members=[0, 3], into=[2]),
        lambda c: c.lerp(1, members=[0, 3], alpha=0.3),
        lambda c: c.broadcast(2),
        lambda c: c.load_member_state(0, c.member_state(3)),
    ],
    ids=["average", "weighted-average", "weighted-sum", "lerp", "broadcast", "load-member-state"],
)
def test_cohort_operations_equal_loop(op):
    """Every Cohort operation gives the same members on both backends, and the stacked rows follow."""
    loop, stacked = pair(BNNet, n=4)
    op(loop), op(stacked)
    for a, b in zip(states_of(loop), states_of(stacked)):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    for i in range(4):
        assert torch.equal(stacked.engine.tensor("fc.weight")[i], stacked[i].fc.weight)


def test_deepcopy_and_dtype_keep_members_tied():
    """deepcopy and .double() move the stacked tensors and keep every member a view of its row."""
    _, stacked = pair(MLP, n=2)
    for cohort in (copy.deepcopy(stacked), stacked.double()):
        with torch.no_grad():
            cohort[1].fc2.bias.fill_(7.0)
        assert torch.equal(cohort.engine.tensor("fc2.bias")[1], cohort[1].fc2.bias)
        assert cohort.engine.tensor("fc2.bias").dtype == cohort[1].fc2.bias.dtype
    assert stacked.engine.tensor("fc1.weight").dtype == torch.float64
    copied = copy.deepcopy(stacked)
    with torch.no_grad():
        copied[0].fc1.weight.zero_()
    assert not torch.equal(stacked[0].fc1.weight, copied[0].fc1.weight)  # a copy, not an alias of the original


# ----------------------------------------------------------------- optimizer
OPTIMIZERS = [
    partial(torch.optim.SGD, lr=0.1),
    partial(torch.optim.SGD, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2),
    partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, maximize=True),
    partial(torch.optim.Adam, lr=1e-2),
    partial(torch.optim.Adam, lr=1e-2, weight_decay=1e-2, amsgrad=True),
    partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1),
]


def stacked_optimizer(cohort, factory):
    return StackedOptimizer(cohort.stacked_parameters(), [list(m.parameters()) for m in cohort], factory.func, factory.keywords)


@pytest.mark.parametrize("factory", OPTIMIZERS, ids=lambda f: f"{f.func.__name__}-{sorted(f.keywords.items())}")
def test_optimizer_steps_equal_member_optimizers(factory):
    """Steps of every member, then of a subset, equal each member's own torch optimizer; skipped members stay bit-for-bit."""
    loop, stacked = pair(MLP, n=3)
    loop_opts = [factory(m.parameters()) for m in loop]
    opt = stacked_optimizer(stacked, factory)
    generator = torch.Generator().manual_seed(0)
    for step, subset in enumerate([None, None, [1], [0, 2], None]):
        grads = [[torch.randn(p.shape, generator=generator) for p in m.parameters()] for m in loop]
        for m, g in zip(loop, grads):
            for p, gi in zip(m.parameters(), g):
                p.grad = gi.clone()
        for j, p in enumerate(stacked.stacked_parameters()):
            p.grad = torch.stack([g[j] for g in grads])
        before = states_of(stacked)
        for i in subset or range(3):
            loop_opts[i].step()
        opt.step(members=subset)
        for i, (a, b) in enumerate(zip(states_of(loop), states_of(stacked))):
            for k in a:
                assert_close(a[k], b[k], **TOL)
                if subset is not None and i not in subset:
                    assert torch.equal(before[i][k], b[k]), f"step {step}: member {i} moved"
    for i in range(3):  # the optimizer states agree too, in torch's format
        mine, theirs = opt.member_state_dict(i), loop_opts[i].state_dict()
        assert mine["state"].keys() == theirs["state"].keys()
        for k, entry in theirs["state"].items():
            for key, value in entry.items():
                assert_close(mine["state"][k][key], value, **TOL)


def test_optimizer_state_round_trip_and_reset():
    """A member's state loads into another member and reset_member forgets it (a fresh optimizer's first step)."""
    _, stacked = pair(MLP, n=2)
    opt = stacked_optimizer(stacked, partial(torch.optim.Adam, lr=1e-2))
    for p in stacked.stacked_parameters():
        p.grad = torch.ones_like(p)
    opt.step(members=[0])
    state = opt.member_state_dict(0)
    assert float(state["state"][0]["step"]) == 1 and opt.member_state_dict(1)["state"] == {}
    opt.load_member_state_dict(1, state)
    assert_close(opt.member_state_dict(1)["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    opt.reset_member(1)
    assert opt.member_state_dict(1)["state"] == {}


def test_optimizer_refuses_bad_state_and_keeps_its_own():
    """A state with a wrong shape is refused with the member named; nothing already loaded changes."""
    _, stacked = pair(MLP, n=2)
    opt = stacked_optimizer(stacked, partial(torch.optim.SGD, lr=0.1, momentum=0.9))
    for p in stacked.stacked_parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    good = opt.state_dict()
    bad = copy.deepcopy(good)
    bad["members"][1]["state"][0]["momentum_buffer"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"member 1.*shape \(3,\)"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    for a, b in zip(good["members"], after["members"]):
        assert all(torch.equal(a["state"][k]["momentum_buffer"], b["state"][k]["momentum_buffer"]) for k in a["state"])
    with pytest.raises(ValueError, match="holds 1 members but this cohort has 2"):
        opt.load_state_dict({"members": good["members"][:1]})


def test_per_member_clipping():
    """Clipping is per member (torch's clip_grad_norm_ member by member), never one norm across members."""
    grads = [torch.tensor([[30.0, 40.0], [0.3, 0.4]]), torch.tensor([[1.0], [0.0]])]
    want = [[g[i].clone() for g in grads] for i in range(2)]
    for member in want:
        params = [nn.Parameter(torch.zeros_like(g)) for g in member]
        for p, g in zip(params, member):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(params, 1.0)
    norms = clip_grad_norms_(grads, 1.0)
    assert_close(norms, torch.tensor([(2500.0 + 1.0) ** 0.5, 0.5]))
    for i in range(2):
        for g, w in zip(grads, want[i]):
            assert_close(g[i], w)
    assert torch.equal(grads[0][1], torch.tensor([0.3, 0.4]))  # under the threshold: untouched by member 0's norm


# ----------------------------------------------------------------- training
def run(backend, factory=partial(torch.optim.SGD, lr=0.05, momentum=0.9), cls=MLP, n=3, steps=20, root=None, **kwargs):
    L.seed_everything(0, verbose=False)
    module = CohortModule(cls, size=n, optimizer=factory, backend=backend, gradient_clip_val=kwargs.pop("clip", None))
    trainer = fast_trainer(root, max_steps=steps, **kwargs)
    trainer.fit(module, datamodule=CohortDataModule(num_members=n, batch_size=16, seed=0))
    return module, trainer


@pytest.mark.parametrize("factory", [OPTIMIZERS[2], OPTIMIZERS[4], OPTIMIZERS[5]], ids=["sgd-nesterov", "adam-amsgrad", "adamw"])
def test_training_equals_loop(factory):
    """20 Trainer steps with per-member clipping: same weights, same optimizer states, one global step per batch."""
    a, ta = run("loop", factory, clip=0.5)
    b, tb = run("stacked", factory, clip=0.5)
    assert ta.global_step == tb.global_step == 20  # max_steps counts batches, not member updates
    for x, y in zip(states(a), states(b)):
        for k in x:
            assert_close(x[k], y[k], **TRAIN_TOL)
    sa, sb = ta.optimizers[0].state_dict(), tb.optimizers[0].state_dict()
    for ma, mb in zip(sa["members"], sb["members"]):
        for k, entry in ma["state"].items():
            for key, value in entry.items():
                assert_close(mb["state"][k][key], value, **TRAIN_TOL)
    assert_close(a.last_loss, b.last_loss, **TRAIN_TOL)


def test_training_with_batchnorm_and_conv_equals_loop():
    """BatchNorm running statistics and a ConvNet train the same stacked and looped."""
    for cls in (BNNet, ConvNet):
        a, _ = run("loop", cls=cls, steps=6)
        b, _ = run("stacked", cls=cls, steps=6)
        for x, y in zip(states(a), states(b)):
            for k in x:
                assert_close(x[k], y[k], **TOL)


class Rotated(CohortModule):
    """Member i trains on member i + 1's batch: an overridden ``member_batch``."""

    def member_batch(self, batch, member):
        return super().member_batch(batch, (member + 1) % self.size)


def test_overridden_member_batch_is_honoured_by_both_backends():
    def train(cls, backend):
        L.seed_everything(0, verbose=False)
        module = cls(MLP, size=3, optimizer=partial(torch.optim.SGD, lr=0.1), backend=backend)
        fast_trainer(max_steps=3).fit(module, datamodule=CohortDataModule(num_members=3, batch_size=16, seed=0))
        return states(module)

    loop, stacked, plain = train(Rotated, "loop"), train(Rotated, "stacked"), train(CohortModule, "stacked")
    for x, y in zip(loop, stacked):
        for k in x:
            assert_close(x[k], y[k], **TOL)
    assert not torch.equal(stacked[0]["fc1.weight"], plain[0]["fc1.weight"])


def test_stacked_batch_without_a_member_entry_is_a_clear_error():
    module = CohortModule(LogisticRegression, size=2, backend="stacked")
    batch = {0: (torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))}
    with pytest.raises(KeyError, match=r"no entry for member 1 \(members in batch: \[0\]\)"):
        module.cohort_losses(batch, 0)


def test_only_active_members_train():
    """With active_members set, the others' weights and optimizer states are bit-for-bit unchanged."""
    L.seed_everything(0, verbose=False)
    module = CohortModule(MLP, size=3, optimizer=partial(torch.optim.Adam, lr=1e-2), backend="stacked")
    module.active_members = [1]
    before = states(module)
    trainer = fast_trainer(max_steps=4)
    trainer.fit(module, datamodule=CohortDataModule(num_members=3, batch_size=16, seed=0))
    after = states(module)
    assert all(torch.equal(before[i][k], after[i][k]) for i in (0, 2) for k in before[i])
    assert not torch.equal(before[1]["fc1.weight"], after[1]["fc1.weight"])
    opt = trainer.optimizers[0]
    assert opt.member_state_dict(0)["state"] == {} and float(opt.member_state_dict(1)["state"][0]["step"]) == 4


@pytest.mark.parametrize("cls", [MLP, ConvNet])
def test_bf16_mixed_runs_stacked(cls):
    """precision='bf16-mixed' trains a stacked cohort on CPU to finite weights close to the loop's."""
    a, _ = run("loop", steps=4, precision="bf16-mixed", cls=cls)
    b, _ = run("stacked", steps=4, precision="bf16-mixed", cls=cls)
    for x, y in zip(states(a), states(b)):
        for k in x:
            assert torch.isfinite(y[k]).all()
            assert_close(x[k], y[k], rtol=0.05, atol=0.02)


def test_lr_scheduler_per_member():
    """A per-member lr scheduler steps each member's learning rate on the stacked backend too."""
    L.seed_everything(0, verbose=False)
    module = CohortModule(MLP, size=2, optimizer=partial(torch.optim.SGD, lr=0.1), backend="stacked",
                          lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))
    trainer = fast_trainer(max_epochs=2, limit_train_batches=2)
    trainer.fit(module, datamodule=CohortDataModule(num_members=2, batch_size=16, seed=0))
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == pytest.approx([0.025, 0.025])


# --------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("first,second", [("stacked", "loop"), ("loop", "stacked")])
def test_checkpoint_cross_loading(tmp_path, first, second):
    """A checkpoint of one backend (weights and Adam states) resumes on the other and ends where an uninterrupted run ends."""
    factory = partial(torch.optim.Adam, lr=1e-2)
    epochs = dict(steps=-1, limit_train_batches=4)  # checkpoints at epoch ends: the data order is reproducible there
    whole, _ = run(first, factory, max_epochs=2, **epochs)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    run(first, factory, max_epochs=1, root=tmp_path, enable_checkpointing=True, callbacks=[ckpt], **epochs)
    L.seed_everything(0, verbose=False)
    resumed = CohortModule(MLP, size=3, optimizer=factory, backend=second)
    trainer = fast_trainer(tmp_path, max_epochs=2, limit_train_batches=4)
    trainer.fit(resumed, datamodule=CohortDataModule(num_members=3, batch_size=16, seed=0), ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.global_step == 8
    assert float(trainer.optimizers[0].member_state_dict(2)["state"][0]["step"]) == 8  # the Adam states came across
    for x, y in zip(states(whole), states(resumed)):
        for k in x:
            assert_close(x[k], y[k], **TRAIN_TOL)


def test_state_dict_keys_match_loop():
    """A stacked cohort's state_dict has the loop's keys and shapes, so either loads into the other."""
    loop, stacked = pair(BNNet, n=2)
    a, b = loop.state_dict(), stacked.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    loop.load_state_dict(b)
    stacked.load_state_dict(a)
    assert torch.equal(stacked.engine.tensor("bn.running_var"), torch.stack([m.bn.running_var for m in loop]))


# -------------------------------------------------------------------- errors
def test_heterogeneous_cohort_refused():
    """backend='stacked' with members of different architectures names the members and the tensor."""
    with pytest.raises(CohortMismatchError, match=r"backend='stacked' needs members of one architecture.*members 0 and 1"):
        Cohort([MLP(), LogisticRegression()], backend="stacked")
    with pytest.raises(CohortMismatchError, match="one architecture"):
        CohortModule([MLP(), LogisticRegression()], backend="stacked")


def test_bad_backend_and_optimizer_errors():
    """Unknown backends, unsupported optimizers and members that disagree on momentum get clear errors."""
    with pytest.raises(ValueError, match=r"backend must be one of \['loop', 'stacked'\], got 'fast'"):
        Cohort(MLP, size=2, backend="fast")
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'loop', 'stacked'\], got 'gpu'"):
        CohortModule(MLP, size=2, backend="gpu")
    with pytest.raises(ValueError, match=r"partial\(torch.optim.SGD\|Adam\|AdamW.*RMSprop"):
        CohortModule(MLP, size=2, optimizer=partial(torch.optim.RMSprop, lr=0.1), backend="stacked")
    with pytest.raises(ValueError, match=r"one optimizer type for all members"):
        CohortModule(MLP, size=2, optimizer=[partial(torch.optim.SGD, lr=0.1), partial(torch.optim.Adam)], backend="stacked")
    # momentum may differ per member (population-based training); nesterov is one setting for all
    module = CohortModule(MLP, size=2, backend="stacked",
                          optimizer=[partial(torch.optim.SGD, lr=0.1, momentum=0.9), partial(torch.optim.SGD, lr=0.2, momentum=0.5)])
    module.configure_optimizers()
    module = CohortModule(MLP, size=2, backend="stacked",
                          optimizer=[partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True), partial(torch.optim.SGD, lr=0.2, momentum=0.5)])
    with pytest.raises(ValueError, match=r"members' SGD nesterov differ"):
        module.configure_optimizers()
    with pytest.raises(RuntimeError, match="needs backend='stacked'"):
        Cohort(MLP, size=2).stacked_forward(torch.zeros(1, 784))


def test_lightning_members_refused_and_auto_falls_back():
    """LightningModule members cannot be stacked (clear error); auto picks the loop for them and for RMSprop."""

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(784, 10)

        def forward(self, x):
            return self.net(x.flatten(1))

    with pytest.raises(TypeError, match="plain nn.Module members"):
        CohortModule(Classifier, size=2, backend="stacked")
    assert CohortModule(Classifier, size=8, backend="auto").cohort.backend == "loop"
    assert CohortModule(MLP, size=8, backend="auto").cohort.backend == "stacked"
    assert CohortModule(MLP, size=2, backend="auto").cohort.backend == "loop"  # too few members to gain
    assert CohortModule(ConvNet, size=12, backend="auto").cohort.backend == "loop"  # faster on one CPU, slower on another
    assert CohortModule(LogisticRegression, size=12, backend="auto").cohort.backend == "stacked"
    assert CohortModule(MLP, size=8, backend="auto", optimizer=partial(torch.optim.RMSprop, lr=0.1)).cohort.backend == "loop"
    assert choose_backend(Cohort([m for _ in range(4) for m in (MLP(), LogisticRegression())]), partial(torch.optim.SGD, lr=0.1), False) == "loop"
    assert choose_backend(Cohort(Odd, size=8), partial(torch.optim.SGD, lr=0.1), False) == "loop"  # vmap only: not faster


def test_stacked_forward_input_errors_name_the_expected_shape():
    cohort = Cohort(lambda: nn.Linear(2, 1), size=3, backend="stacked")
    with pytest.raises(RuntimeError, match=r"stacked forward of 3 members failed on an input of shape \(4, 3\); the input "
                                           r"must be \[B, \.\.\.\], what one member's forward takes: "):
        cohort.stacked_forward(torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"per_member=True\) needs one batch per member, \[3, B, \.\.\.\], got shape \(2, 4, 2\)"):
        cohort.stacked_forward(torch.ones(2, 4, 2), per_member=True)
    with pytest.raises(ValueError, match=r"\[2, B, \.\.\.\], got shape \(3, 4, 2\)"):
        cohort.stacked_forward(torch.ones(3, 4, 2), members=[0, 2], per_member=True)
    with pytest.raises(TypeError, match="stacked_forward needs a Tensor, got list"):
        cohort.stacked_forward([[1.0, 2.0]])
    assert cohort.stacked_forward(torch.ones(2, 4, 2), members=[0, 2], per_member=True).shape == (2, 4, 1)


def test_stacked_optimizer_member_arguments_and_loaded_states_are_checked():
    torch.manual_seed(0)
    cohort = Cohort(lambda: nn.Linear(2, 1), size=3, backend="stacked")
    opt = StackedOptimizer(cohort.stacked_parameters(), [list(m.parameters()) for m in cohort], torch.optim.SGD,
                           {"lr": 0.1, "momentum": 0.9})
    for p in cohort.stacked_parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    good = opt.member_state_dict(0)
    for members in ([5], [-4], [True], [0.5]):
        with pytest.raises(IndexError, match=rf"member index must be an int in \[0, 2\] \(or -3\.\.-1 from the end\), got {members[0]!r}"):
            opt.step(members=members)
    with pytest.raises(ValueError, match=r"needs at least one member index, got none \(pass members=None for all\)"):
        opt.step(members=[])
    for call in (lambda: opt.load_member_state_dict(9, good), lambda: opt.reset_member(9), lambda: opt.member_state_dict(-4)):
        with pytest.raises(IndexError, match=r"member index must be an int in \[0, 2\]"):
            call()
    weights = [p.detach().clone() for p in cohort.stacked_parameters()]
    momentum = [t.clone() for t in opt._state["momentum_buffer"]]

    def changed(**edit):
        state = copy.deepcopy(good)
        for key, value in edit.items():
            if key == "state":
                state["state"] = value(state["state"])
            else:
                state["param_groups"][0][key] = value
        return state

    def nan_buffer(state):
        state[0]["momentum_buffer"][0, 0] = float("nan")
        return state

    for bad, message in (
        (changed(state=nan_buffer), r"parameter 0, 'momentum_buffer' holds NaN or inf values"),
        (changed(nesterov=True), r"members' SGD nesterov differ \(\['False', 'True'\]\)"),  # momentum may differ
        (changed(state=lambda s: {7: s[0], 1: s[1]}), r"parameter index 7 is not one of 0..1"),
        (changed(state=lambda s: {"x": s[0], 1: s[1]}), r"parameter index 'x' is not one of 0..1"),
        (changed(lr=float("nan")), r"lr must be a finite number >= 0, got nan"),
        (changed(state=lambda s: {0: {"momentum_buffer": [[0.0, 0.0]]}, 1: s[1]}), r"'momentum_buffer': expected a tensor, got list"),
    ):
        with pytest.raises(ValueError, match=rf"optimizer state of member 1.*{message}"):
            opt.load_member_state_dict(1, bad)
    # nothing was written: same weights, momentum and hyperparameters, and the optimizer still steps
    assert all(torch.equal(a, b) for a, b in zip(momentum, opt._state["momentum_buffer"]))
    assert all(torch.equal(a, b.detach()) for a, b in zip(weights, cohort.stacked_parameters()))
    assert opt.param_groups[1]["momentum"] == 0.9 and opt.param_groups[1]["lr"] == 0.1
    opt.step(members=[1, 1, 2])


def test_members_differing_only_in_parameter_free_layers_cannot_be_stacked():
    # same tensors, different activations: one stacked forward would run member 0's ReLU for both
    members = [nn.Sequential(nn.Linear(2, 3), nn.ReLU()), nn.Sequential(nn.Linear(2, 3), nn.Tanh())]
    with pytest.raises(CohortMismatchError, match=r"one architecture: members 0 and 1 differ in their modules: "
                                                  r"ReLU at '1' vs Tanh at '1'"):
        Cohort(members, backend="stacked")
    longer = [nn.Sequential(nn.Linear(2, 3)), nn.Sequential(nn.Linear(2, 3), nn.Identity())]
    with pytest.raises(CohortMismatchError, match=r"differ in their modules: no module vs Identity at '1'"):
        Cohort(longer, backend="stacked")
    Cohort(members)  # the loop backend runs each member's own modules
