"""CohortModule: the loop is the oracle, Lightning's contracts hold, checkpoints restore everything."""

from __future__ import annotations

import copy
import re
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from helpers import fast_trainer
from lightning_colearn import Cohort, CohortDataModule, CohortModule
from lightning_colearn.models import LogisticRegression


def trainer(tmp_path=None, **kwargs) -> L.Trainer:
    return fast_trainer(tmp_path, **{"max_epochs": 1, **kwargs})

def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Classifier(L.LightningModule):
    """A user's existing LightningModule (automatic optimization)."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Linear(784, 10)

    def forward(self, x):
        return self.net(x.flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


@pytest.fixture(scope="module")
def shared_dm():
    dm = CohortDataModule("mnist_small", num_members=1, batch_size=32, stream="shared", splits=(1.0, 0.0, 0.0))
    dm.setup("fit")
    return dm


def test_one_member_equals_training_the_wrapped_module_directly(shared_dm):
    torch.manual_seed(0)
    direct = Classifier()
    member = copy.deepcopy(direct)

    trainer(max_epochs=2, limit_train_batches=10).fit(direct, train_dataloaders=shared_dm.train_dataloader())
    cohort = CohortModule([member])
    trainer(max_epochs=2, limit_train_batches=10).fit(cohort, train_dataloaders=shared_dm.train_dataloader())

    assert_equal_states(weights(direct), weights(cohort.cohort[0]))
    assert not torch.equal(direct.net.weight, Classifier().net.weight)  # it did train


def test_plain_members_equal_a_plain_pytorch_loop():
    dm = CohortDataModule("mnist_small", num_members=3, batch_size=16)
    dm.setup("fit")
    torch.manual_seed(0)
    models = [LogisticRegression() for _ in range(3)]
    reference = copy.deepcopy(models)
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in reference]

    module = CohortModule(models, optimizer=partial(torch.optim.Adam, lr=1e-2))
    trainer(max_steps=6).fit(module, train_dataloaders=dm.train_dataloader())

    for step, (batch, _, _) in enumerate(dm.train_dataloader()):  # CombinedLoader yields (batch, idx, dl_idx)
        if step == 6:
            break
        for i, (model, opt) in enumerate(zip(reference, optimizers)):
            x, y = batch[i]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for i in range(3):
        torch.testing.assert_close(weights(module.cohort[i]), weights(reference[i]), rtol=0, atol=1e-7)


def test_max_steps_counts_batches_not_member_updates():
    module = CohortModule(LogisticRegression, size=4)
    t = trainer(max_steps=5)
    t.fit(module, datamodule=CohortDataModule(num_members=4, batch_size=16))
    assert t.global_step == 5
    opt = t.optimizers[0]
    for member_opt in opt.optimizers:  # every member's Adam took exactly 5 steps
        assert {int(s["step"]) for s in member_opt.state.values()} == {5}


def test_inactive_members_do_not_change():
    torch.manual_seed(0)
    module = CohortModule(LogisticRegression, size=3)
    module.active_members = [1]
    before = [weights(m) for m in module.cohort]
    trainer(max_steps=3).fit(module, datamodule=CohortDataModule(num_members=3, batch_size=16))
    assert_equal_states(before[0], weights(module.cohort[0]))
    assert_equal_states(before[2], weights(module.cohort[2]))
    assert not torch.equal(before[1]["linear.weight"], module.cohort[1].linear.weight)
    assert torch.isnan(module.last_loss[[0, 2]]).all() and torch.isfinite(module.last_loss[1])


def test_bf16_mixed_runs_on_cpu():
    torch.manual_seed(0)
    module = CohortModule(LogisticRegression, size=2)
    before = weights(module.cohort[0])
    t = trainer(max_steps=4, precision="bf16-mixed", limit_val_batches=2)
    t.fit(module, datamodule=CohortDataModule(num_members=2, batch_size=32))
    after = weights(module.cohort[0])
    assert after["linear.weight"].dtype == torch.float32  # master weights stay fp32
    assert torch.isfinite(after["linear.weight"]).all()
    assert not torch.equal(before["linear.weight"], after["linear.weight"])
    t.validate(module, datamodule=CohortDataModule(num_members=2, batch_size=32), verbose=False)
    assert 0.0 <= float(t.callback_metrics["val_acc/mean"]) <= 1.0


def test_checkpoint_restores_every_member_and_optimizer(tmp_path):
    torch.manual_seed(0)
    dm = CohortDataModule(num_members=3, batch_size=32)
    module = CohortModule(LogisticRegression, size=3, optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9))
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, max_epochs=1, limit_train_batches=4, enable_checkpointing=True, callbacks=[ckpt]).fit(module, datamodule=dm)

    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    restored = CohortModule(LogisticRegression, size=3, optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9))
    restored.load_state_dict(checkpoint["state_dict"])
    for i in range(3):
        assert_equal_states(weights(module.cohort[i]), weights(restored.cohort[i]))
    optimizer = restored.configure_optimizers()
    optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    trained = module.trainer.optimizers[0]
    for i in range(3):
        for p_trained, p_restored in zip(module.cohort[i].parameters(), restored.cohort[i].parameters()):
            torch.testing.assert_close(
                trained.optimizers[i].state[p_trained]["momentum_buffer"],
                optimizer.optimizers[i].state[p_restored]["momentum_buffer"],
                rtol=0,
                atol=0,
            )


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    def run(epochs, root, ckpt_path=None, init=None):
        module = CohortModule(LogisticRegression, size=2, optimizer=partial(torch.optim.Adam, lr=1e-2))
        if init is not None:
            module.load_state_dict(init)
        ckpt = ModelCheckpoint(dirpath=root, save_last=True)
        t = trainer(root, max_epochs=epochs, limit_train_batches=5, enable_checkpointing=True, callbacks=[ckpt])
        t.fit(module, datamodule=CohortDataModule(num_members=2, batch_size=16), ckpt_path=ckpt_path)
        return module

    torch.manual_seed(0)
    init = CohortModule(LogisticRegression, size=2).state_dict()
    full = run(4, tmp_path / "full", init=init)
    run(2, tmp_path / "part", init=init)
    resumed = run(4, tmp_path / "part", ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    assert_equal_states(weights(full), weights(resumed))


def test_member_gradients_are_clipped_per_member():
    torch.manual_seed(0)
    models = [LogisticRegression(), LogisticRegression()]
    reference = copy.deepcopy(models)
    module = CohortModule(models, optimizer=partial(torch.optim.SGD, lr=1.0), gradient_clip_val=0.5)
    x = torch.randn(8, 1, 28, 28)
    y = torch.randint(0, 10, (8,))
    # member 0 sees huge inputs (clipped), member 1 tiny ones (below the threshold)
    batch = {0: (x * 100, y), 1: (x * 1e-3, y)}
    # batch_size=None: the loader yields the prepared batch as is
    trainer(max_steps=1).fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))

    for i, (ref, xi) in enumerate([(reference[0], x * 100), (reference[1], x * 1e-3)]):
        F.cross_entropy(ref(xi), y).backward()
        grads = [p.grad for p in ref.parameters()]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        scale = min(1.0, 0.5 / (float(norm) + 1e-6))
        for p, g, q in zip(ref.parameters(), grads, module.cohort[i].parameters()):
            torch.testing.assert_close(q, p - scale * g, rtol=1e-5, atol=1e-6)
        assert (scale < 1.0) == (i == 0)


def test_wrapped_module_logs_are_prefixed_per_member(shared_dm):
    module = CohortModule(Classifier, size=2)
    t = trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2)
    t.fit(module, train_dataloaders=shared_dm.train_dataloader(), val_dataloaders=shared_dm.eval_dataloader())
    metrics = t.callback_metrics
    assert {"loss/member_0", "loss/member_1", "acc/member_0", "acc/member_1", "acc/mean"} <= set(metrics)
    expected = (float(metrics["acc/member_0"]) + float(metrics["acc/member_1"])) / 2
    assert float(metrics["acc/mean"]) == pytest.approx(expected, abs=1e-6)


def test_member_lr_schedulers_step_and_resume(tmp_path):
    module = CohortModule(
        LogisticRegression,
        size=2,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    t = trainer(tmp_path, max_epochs=2, limit_train_batches=2, enable_checkpointing=True, callbacks=[ckpt])
    t.fit(module, datamodule=CohortDataModule(num_members=2, batch_size=16))
    assert [g["lr"] for g in t.optimizers[0].param_groups] == pytest.approx([0.025, 0.025])

    resumed = CohortModule(
        LogisticRegression,
        size=2,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    t2 = trainer(tmp_path, max_epochs=3, limit_train_batches=2, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=tmp_path)])
    t2.fit(resumed, datamodule=CohortDataModule(num_members=2, batch_size=16), ckpt_path=str(tmp_path / "last.ckpt"))
    assert [g["lr"] for g in t2.optimizers[0].param_groups] == pytest.approx([0.0125, 0.0125])


class ManualModule(Classifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


class TwoOptimizers(Classifier):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.Adam(self.parameters())]


def test_construction_errors():
    with pytest.raises(TypeError, match="all LightningModules or all plain"):
        CohortModule([Classifier(), nn.Linear(784, 10)])
    with pytest.raises(ValueError, match="member 0 .*manual optimization"):
        CohortModule([ManualModule()])
    with pytest.raises(TypeError, match="optimizer must be a callable"):
        CohortModule(LogisticRegression, size=2, optimizer=0.1)
    for clip in (0, "1", float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match=rf"gradient_clip_val must be a finite number > 0 or None, got {re.escape(repr(clip))}"):
            CohortModule(LogisticRegression, size=2, gradient_clip_val=clip)
    with pytest.raises(ValueError, match="cohort size must be an int >= 1, got 0"):
        CohortModule(LogisticRegression, size=0)


def test_member_with_two_optimizers_is_refused_at_fit(shared_dm):
    with pytest.raises(ValueError, match="member 0's configure_optimizers must return one optimizer"):
        trainer(max_steps=1).fit(CohortModule(TwoOptimizers, size=1), train_dataloaders=shared_dm.train_dataloader())


@pytest.mark.parametrize("backend", ["loop", "stacked"])
@pytest.mark.parametrize(
    ("optimizers", "message"),
    [
        (partial(torch.optim.SGD, lr=float("nan")), "the optimizer for member 0: lr must be a finite number, got nan"),
        ([partial(torch.optim.Adam, lr=1e-3), partial(torch.optim.Adam, lr=float("inf"))],
         "the optimizer for member 1: lr must be a finite number, got inf"),
        (partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=float("inf")),
         "the optimizer for member 0: weight_decay must be a finite number, got inf"),
    ],
    ids=["nan-lr", "inf-lr-of-one-member", "inf-weight-decay"],
)
def test_a_non_finite_optimizer_setting_is_refused_before_any_step(shared_dm, backend, optimizers, message):
    # torch's optimizers take these (its checks are comparisons, which NaN and inf pass), and the first
    # step turns every weight NaN
    module = CohortModule(LogisticRegression, size=2, optimizer=optimizers, backend=backend)
    before = weights(module.cohort)
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer(max_steps=2).fit(module, train_dataloaders=shared_dm.train_dataloader())
    assert_equal_states(weights(module.cohort), before)


def test_batch_without_a_member_entry_is_a_clear_error():
    module = CohortModule(LogisticRegression, size=2)
    with pytest.raises(KeyError, match="no entry for member 1"):
        module.member_batch({0: (torch.zeros(1), torch.zeros(1))}, 1)


def test_heterogeneous_cohort_trains_and_reports_per_member():
    from lightning_colearn.models import MLP, ConvNet

    module = CohortModule(Cohort([ConvNet(), MLP(), LogisticRegression()]))
    assert not module.cohort.is_homogeneous
    t = trainer(max_steps=2, limit_val_batches=1)
    t.fit(module, datamodule=CohortDataModule(num_members=3, batch_size=16))
    t.validate(module, datamodule=CohortDataModule(num_members=3, batch_size=16), verbose=False)
    assert {f"val_acc/member_{i}" for i in range(3)} <= set(t.callback_metrics)
