"""Tests for CohortDataModule on a user's own data: tensors, torch / torchvision / Hugging Face data sets, DataModules."""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from lightning_colearn.data import CohortDataModule
from lightning_colearn.data.datamodule import SPLITS
from lightning_colearn.data.sources import TensorSource

FASHION = Path("/usr/share/datasets/fashion-mnist")


class BareInputs(Dataset):
    """Samples that are bare input tensors: no labels to partition by."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i):
        return torch.full((3,), float(i))


class AddNoise:
    """A random per-sample augmentation (a class: DataLoader workers may pickle it)."""

    def __call__(self, x):
        return x + torch.rand(x.shape)


def _setup(dm: CohortDataModule) -> CohortDataModule:
    dm.setup("fit")
    return dm


def _x(n: int, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _take(loader, count: int) -> list:
    out = []
    for batch in loader:
        out.append(batch[0] if isinstance(batch, tuple) and len(batch) == 3 and isinstance(batch[0], dict) else batch)
        if len(out) == count:
            break
    return out


def _assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b)):
        if isinstance(x, dict):
            assert x.keys() == y.keys(), step
            for member in x:
                assert type(x[member]) is type(y[member]) is tuple, (step, member)
                torch.testing.assert_close(x[member], y[member], msg=lambda m: f"step {step} member {member}: {m}")
        else:
            assert type(x) is type(y) is tuple, step
            torch.testing.assert_close(x, y, msg=lambda m: f"step {step}: {m}")


def _all_split_indices(dm: CohortDataModule) -> np.ndarray:
    return np.concatenate([dm.member_split(i, s) for i in range(dm.num_members) for s in SPLITS])


# ------------------------------------------------------------------ from_tensors, string labels
def test_from_tensors_string_labels_with_a_test_set_of_fewer_classes_coded_like_train():
    y = np.array(["cat", "dog", "eel"] * 20)
    test_y = np.array(["eel", "dog"] * 4)
    dm = _setup(CohortDataModule.from_tensors(_x(60, 4), y, test=(_x(8, 4, seed=1), test_y), num_members=2, batch_size=8))
    assert dm.classes == ["cat", "dog", "eel"] and dm.num_classes == 3
    assert dm.test_set.classes == dm.classes
    _, served = zip(*dm.eval_dataloader())
    assert torch.cat(served).tolist() == [2, 1] * 4  # "eel" is class 2 and "dog" class 1, as in training
    assert dm.eval_dataset[0] is dm.test_set  # no hold-out when a test set is given
    assert len(_all_split_indices(dm)) == 60


def test_from_tensors_test_class_unknown_to_train_is_named():
    dm = CohortDataModule.from_tensors(_x(30, 2), np.array(["cat", "dog"] * 15),
                                       test=(_x(4, 2), np.array(["dog", "fox", "cat", "dog"])), num_members=2)
    with pytest.raises(ValueError, match=r"test_dataset has class 'fox', which the training set does not have"):
        dm.setup("fit")


def test_test_set_of_ints_coded_like_mapped_training_classes():
    # training labels -1, 1, 3 are mapped to classes [-1, 1, 3]; the test set holds only 1 and 3
    dm = CohortDataModule.from_tensors(_x(30, 2), np.array([-1, 1, 3] * 10), test=(_x(4, 2), np.array([1, 3, 3, 1])),
                                       num_members=2)
    dm.setup("fit")
    assert dm.classes == [-1, 1, 3] and dm.test_set.targets.tolist() == [1, 2, 2, 1]


# ------------------------------------------------------------------ held-out test_fraction
def test_test_fraction_is_held_out_of_every_member_and_seeded():
    x, y = _x(100, 3), torch.arange(100) % 4
    dm = _setup(CohortDataModule.from_tensors(x, y, num_members=3, partition="dirichlet", alpha=1.0, test_fraction=0.2, seed=1))
    source, held = dm.eval_dataset
    assert source is dm.train_set and len(held) == 20
    members = _all_split_indices(dm)
    assert not set(held.tolist()) & set(members.tolist())
    assert sorted(held.tolist() + members.tolist()) == list(range(100))
    xs, ys = zip(*dm.eval_dataloader())
    assert torch.equal(torch.cat(xs), x[held]) and torch.equal(torch.cat(ys), y[held])
    again = _setup(CohortDataModule.from_tensors(x, y, num_members=3, partition="dirichlet", alpha=1.0, test_fraction=0.2, seed=1))
    assert np.array_equal(again.eval_dataset[1], held)
    other = _setup(CohortDataModule.from_tensors(x, y, num_members=3, partition="dirichlet", alpha=1.0, test_fraction=0.2, seed=2))
    assert not np.array_equal(other.eval_dataset[1], held)


def test_no_test_set_and_no_test_fraction_means_no_eval_loader():
    dm = _setup(CohortDataModule.from_tensors(_x(20, 3), torch.arange(20) % 2, num_members=2, test_fraction=0))
    assert len(_all_split_indices(dm)) == 20 and dm.eval_dataset is None
    assert dm.val_dataloader() == [] and dm.test_dataloader() == []
    with pytest.raises(ValueError, match=r"no shared evaluation set: data.test_fraction is 0 and there is no test_dataset"):
        dm.eval_dataloader()


# ------------------------------------------------------------------ shapes
def _fake_images(shape) -> Dataset:
    torchvision = pytest.importorskip("torchvision")
    return torchvision.datasets.FakeData(size=12, image_size=shape, num_classes=3, transform=torchvision.transforms.ToTensor())


SHAPES = {
    "mnist_like": (lambda: (_x(12, 1, 28, 28), torch.arange(12) % 10),
                   {"in_features": 784, "in_channels": 1, "image_size": 28, "num_classes": 10}),
    "cifar_like": (lambda: _fake_images((3, 32, 32)), {"in_features": 3072, "in_channels": 3, "image_size": 32}),
    "non_square": (lambda: (_x(12, 3, 16, 24), torch.arange(12) % 2),
                   {"in_features": 1152, "in_channels": 3, "image_size": (16, 24), "num_classes": 2}),
    "tokens": (lambda: (torch.arange(84).reshape(12, 7) % 50, torch.arange(12) % 2),
               {"in_features": 7, "vocab_size": 50, "num_classes": 2}),
}


@pytest.mark.parametrize("make,expected", SHAPES.values(), ids=SHAPES.keys())
def test_shapes_of_user_data(make, expected):
    dm = _setup(CohortDataModule(make(), num_members=2, test_fraction=0))
    shapes = dm.shapes()
    assert {k: shapes.get(k) for k in expected} == expected
    assert ("vocab_size" in shapes) == ("vocab_size" in expected)  # float images are not token ids
    assert dm.input_shape == tuple(next(iter(dm.member_dataloader(0)))[0].shape[1:])


def test_shapes_of_sklearn_tabular_and_regression_data():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    x, y = sklearn_datasets.load_digits(return_X_y=True)
    digits = _setup(CohortDataModule.from_tensors(x, y, num_members=2))
    assert digits.shapes() == {"in_features": 64, "num_classes": 10} and digits.task == "classification"
    assert digits.train_set.inputs.dtype == torch.float32
    x, y = sklearn_datasets.load_diabetes(return_X_y=True)
    diabetes = _setup(CohortDataModule.from_tensors(x, y, num_members=2, batch_size=16))
    assert diabetes.shapes() == {"in_features": 10} and diabetes.task == "regression" and diabetes.num_classes is None
    bx, by = next(iter(diabetes.member_dataloader(0)))
    assert bx.shape == (16, 10) and by.shape == (16, 1) and by.dtype == torch.float32


# ------------------------------------------------------------------ partitions on unlabelled / regression data
def _unlabelled():
    return BareInputs()


def _regression():
    return _x(40, 3), _x(40, seed=1)


@pytest.mark.parametrize("scheme", ["dirichlet", "pathological", "shards", "inner_dirichlet"])
@pytest.mark.parametrize("data,seen", [(_unlabelled, "no labels"), (_regression, "regression targets")], ids=["no_labels", "regression"])
def test_label_partitions_refuse_data_without_classes(scheme, data, seen):
    dm = CohortDataModule(data(), num_members=2, partition=scheme, sizes=[0.5, 0.5] if scheme == "inner_dirichlet" else None)
    with pytest.raises(ValueError, match=rf"data\.partition='{scheme}' needs class labels, but the data set has {seen}"):
        dm.setup("fit")


@pytest.mark.parametrize("scheme", ["iid", "linear"])
@pytest.mark.parametrize("data", [_unlabelled, _regression], ids=["no_labels", "regression"])
def test_label_free_partitions_work_without_classes(scheme, data):
    dm = _setup(CohortDataModule(data(), num_members=2, partition=scheme, batch_size=4, test_fraction=0))
    assert sorted(_all_split_indices(dm).tolist()) == list(range(40))
    batch = _take(dm.train_dataloader(), 1)[0]
    assert sorted(batch) == [0, 1]
    table = dm.partition_table()
    assert table.classes is None and table.sizes("train").tolist() == dm.member_sizes("train")


def test_natural_partition_takes_groups_as_an_array_or_a_column_name():
    datasets = pytest.importorskip("datasets")
    writers = np.array(["ann", "bob", "cy", "dee", "eve", "fay"] * 6)
    dm = _setup(CohortDataModule.from_tensors(_x(36, 2), torch.arange(36) % 2, num_members=3, partition="natural",
                                              groups=writers, test_fraction=0))
    owners = {}
    for i in range(3):
        for w in writers[np.concatenate([dm.member_split(i, s) for s in SPLITS])]:
            assert owners.setdefault(w, i) == i  # a writer's samples all go to one member
    assert len(owners) == 6
    hf = datasets.Dataset.from_dict({"x": _x(36, 2).tolist(), "label": [i % 2 for i in range(36)], "writer": writers.tolist()})
    by_name = _setup(CohortDataModule(hf, num_members=3, partition="natural", groups="writer", input_column="x", test_fraction=0))
    for i in range(3):
        assert np.array_equal(by_name.member_split(i, "train"), dm.member_split(i, "train"))


def test_sizes_partition_passes_member_sizes_through():
    dm = _setup(CohortDataModule.from_tensors(_x(50, 2), torch.arange(50) % 2, num_members=2, partition="sizes",
                                              sizes=[30, 20], test_fraction=0))
    assert [sum(len(dm.member_split(i, s)) for s in SPLITS) for i in range(2)] == [30, 20]


# ------------------------------------------------------------------ Fashion-MNIST: torchvision == preset
@pytest.mark.parametrize("stream", ["per_member", "shared"])
def test_torchvision_fashion_mnist_equals_the_preset(fashion_root, stream):
    from torchvision import datasets, transforms

    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))])
    train = datasets.FashionMNIST(str(fashion_root), train=True, transform=to_tensor)
    test = datasets.FashionMNIST(str(fashion_root), train=False, transform=to_tensor)
    common = dict(num_members=3, partition="dirichlet", alpha=0.5, seed=7, max_train_samples=2000, batch_size=32, stream=stream)
    mine = _setup(CohortDataModule(train, test_dataset=test, **common))
    preset = _setup(CohortDataModule("fashion_mnist", root=str(fashion_root), **common))
    assert not isinstance(mine.train_set, TensorSource) and isinstance(preset.train_set, TensorSource)
    assert mine.classes == preset.classes == train.classes
    assert mine.shapes() == preset.shapes()
    for i in range(3):
        for split in SPLITS:
            assert np.array_equal(mine.member_split(i, split), preset.member_split(i, split)), (i, split)
    _assert_same_batches(_take(mine.train_dataloader(), 2), _take(preset.train_dataloader(), 2))
    _assert_same_batches(_take(mine.eval_dataloader(), 1), _take(preset.eval_dataloader(), 1))
    _assert_same_batches(_take(mine.vote_dataloader(1), 1), _take(preset.vote_dataloader(1), 1))


def test_in_memory_reads_once_and_gives_the_same_batches(fashion_root):
    from torch.utils.data import Subset
    from torchvision import datasets, transforms

    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))])
    train = Subset(datasets.FashionMNIST(str(fashion_root), train=True, transform=to_tensor), range(1500))
    common = dict(num_members=3, partition="pathological", labels_per_member=3, seed=1, batch_size=32)
    read = _setup(CohortDataModule(train, **common))
    held = _setup(CohortDataModule(train, in_memory=True, **common))
    assert isinstance(held.train_set, TensorSource) and not isinstance(read.train_set, TensorSource)
    assert held.classes == read.classes and held.shapes() == read.shapes()
    for i in range(3):
        assert np.array_equal(held.member_split(i, "train"), read.member_split(i, "train"))
    _assert_same_batches(_take(held.train_dataloader(), 3), _take(read.train_dataloader(), 3))
    _assert_same_batches(_take(held.eval_dataloader(), 2), _take(read.eval_dataloader(), 2))


def test_in_memory_refuses_ragged_inputs_and_unlabelled_samples():
    class Ragged(Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return torch.zeros(2 + i % 2), i % 2

    with pytest.raises(ValueError, match=r"in_memory needs inputs of one shape to stack, got shapes \[\(2,\), \(3,\)\]"):
        CohortDataModule(Ragged(), num_members=2, in_memory=True, test_fraction=0.0, splits=(1.0, 0.0, 0.0)).setup("fit")
    with pytest.raises(ValueError, match="in_memory needs the data set's labels"):
        CohortDataModule(BareInputs(), num_members=2, in_memory=True, splits=(1.0, 0.0, 0.0)).setup("fit")
    with pytest.raises(ValueError, match="data.in_memory must be True or False, got 'yes'"):
        CohortDataModule(num_members=2, in_memory="yes")


# ------------------------------------------------------------------ from_datamodule
class UserDataModule(L.LightningDataModule):
    """A user's own DataModule: TensorDatasets, batch size 16, a collate_fn that counts its calls."""

    def __init__(self, val: bool = True, test: bool = True) -> None:
        super().__init__()
        self.with_val, self.with_test, self.collated, self.setups = val, test, 0, []

    def setup(self, stage=None) -> None:
        self.setups.append(stage)
        self.train = TensorDataset(_x(96, 5), torch.arange(96) % 3)
        self.val = TensorDataset(_x(20, 5, seed=1), torch.arange(20) % 3)
        self.test = TensorDataset(_x(12, 5, seed=2), torch.arange(12) % 3)

    def collate(self, samples):
        self.collated += 1
        return default_collate(samples)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=16, shuffle=True, collate_fn=self.collate)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=10) if self.with_val else []

    def test_dataloader(self):
        return DataLoader(self.test, batch_size=6) if self.with_test else []


class TrainOnly(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(TensorDataset(_x(30, 2), torch.arange(30) % 2), batch_size=8)


class DictOfLoaders(L.LightningDataModule):
    def train_dataloader(self):
        return {"a": DataLoader(TensorDataset(_x(30, 2), torch.arange(30) % 2), batch_size=8)}


def test_from_datamodule_partitions_its_train_set_with_its_batch_size_and_collate_fn():
    user = UserDataModule()
    dm = _setup(CohortDataModule.from_datamodule(user, num_members=3, partition="iid"))
    assert user.setups == ["fit"]
    assert sorted(_all_split_indices(dm).tolist()) == list(range(96))  # no hold-out: it evaluates on its own loaders
    assert dm.batch_size == 16 and dm.collate_fn == user.collate
    batch = _take(dm.train_dataloader(), 1)[0]
    assert sorted(batch) == [0, 1, 2] and all(len(x) == 16 for x, _ in batch.values())
    assert user.collated > 0  # the user's collate_fn built those batches
    x, y = batch[0]
    rows = {tuple(r.tolist()): int(label) for r, label in zip(user.train.tensors[0], user.train.tensors[1])}
    assert all(rows[tuple(r.tolist())] == int(label) for r, label in zip(x, y))
    val, test = dm.val_dataloader(), dm.test_dataloader()
    assert val.dataset is user.val and val.batch_size == 10
    assert test.dataset is user.test and test.batch_size == 6
    assert dm.eval_dataloader().dataset is user.val and dm.eval_dataset is None


def test_from_datamodule_keeps_a_batch_size_given():
    dm = _setup(CohortDataModule.from_datamodule(UserDataModule(), num_members=2, batch_size=5, eval_batch_size=7))
    assert dm.batch_size == 5 and dm.eval_batch_size == 7
    assert [len(x) for x, _ in _take(dm.member_dataloader(0), 1)] == [5]


def test_from_datamodule_without_eval_loaders():
    dm = _setup(CohortDataModule.from_datamodule(TrainOnly(), num_members=2))
    assert dm.val_dataloader() == [] and dm.test_dataloader() == []
    with pytest.raises(ValueError, match=r"the wrapped TrainOnly has no val_dataloader or test_dataloader"):
        dm.eval_dataloader()
    only_test = _setup(CohortDataModule.from_datamodule(UserDataModule(val=False), num_members=2))
    assert only_test.eval_dataloader().batch_size == 6  # its test loader when it has no validation loader


def test_from_datamodule_errors():
    with pytest.raises(TypeError, match=r"train_dataloader\(\) to return one DataLoader, got dict"):
        CohortDataModule.from_datamodule(DictOfLoaders(), num_members=2).setup("fit")
    with pytest.raises(ValueError, match=r"data\.test_dataset: a wrapped LightningDataModule"):
        CohortDataModule.from_datamodule(UserDataModule(), num_members=2, test_dataset=TensorDataset(_x(4, 5), torch.arange(4)))
    with pytest.raises(TypeError, match=r"from_datamodule takes a LightningDataModule, got TensorDataset"):
        CohortDataModule.from_datamodule(TensorDataset(_x(4, 5), torch.arange(4)), num_members=2)


# ------------------------------------------------------------------ partition table
def test_partition_table_counts_each_members_labels(tmp_path):
    y = np.array(["ant", "bee", "cat", "dog"])[np.arange(80) % 4]
    dm = _setup(CohortDataModule.from_tensors(_x(80, 2), y, num_members=3, partition="dirichlet", alpha=0.5, seed=3))
    table = dm.partition_table()
    assert table.classes == ["ant", "bee", "cat", "dog"]
    codes = dm.train_set.labels.numpy()
    for split in SPLITS:
        expected = np.stack([np.bincount(codes[dm.member_split(i, split)], minlength=4) for i in range(3)])
        assert np.array_equal(table.counts[split], expected), split
    sizes = dm.member_sizes("train")
    per_member = (table.counts["train"] > 0).sum(1)
    median = float(np.median(per_member))
    assert table.summary() == (f"3 members; train samples min / median / max {min(sizes)} / {int(np.median(sizes))} / {max(sizes)}; "
                               f"classes per member {per_member.min()} / {int(median) if median.is_integer() else median} "
                               f"/ {per_member.max()} of 4")
    path = table.to_csv(tmp_path / "out" / "partition.csv")
    with path.open() as f:
        rows = [{k: int(v) for k, v in row.items()} for row in csv.DictReader(f)]
    assert rows == table.rows()
    assert list(rows[0]) == ["member", "train", "vote", "test", "train:ant", "train:bee", "train:cat", "train:dog"]


# ------------------------------------------------------------------ hparams and checkpoints
def test_hparams_hold_only_primitives_so_checkpoints_load_weights_only(tmp_path):
    from lightning_colearn import CohortModule
    from lightning_colearn.models import LogisticRegression

    y = np.array(["no", "yes"])[np.arange(40) % 2]
    dm = CohortDataModule(TensorDataset(_x(40, 4), torch.arange(40)), num_members=2, labels=y, batch_size=8,
                          groups=np.arange(40) % 4, partition="natural", test_dataset=(_x(6, 4, seed=5), y[:6]),
                          train_transform=AddNoise(), eval_batch_transform=torch.nn.Identity(), collate_fn=default_collate)
    allowed = (str, int, float, bool, type(None))
    for key, value in dm.hparams.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        assert all(isinstance(v, allowed) for v in items), (key, type(value).__name__)
    assert dm.hparams.num_members == 2 and dm.hparams.partition == "natural" and dm.hparams.batch_size == 8
    assert not {"dataset", "labels", "groups", "test_dataset", "train_transform", "collate_fn"} & set(dm.hparams)
    module = CohortModule(partial(LogisticRegression, in_features=4, num_classes=2), size=2)
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(module, datamodule=dm)
    path = tmp_path / "cohort.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["datamodule_hyper_parameters"]["num_members"] == 2


def test_per_sample_label_and_group_lists_stay_out_of_hparams():
    y = ["no", "yes"] * 20
    dm = CohortDataModule(TensorDataset(_x(40, 4), torch.arange(40)), num_members=2, labels=y,
                          groups=[i % 4 for i in range(40)], partition="natural")
    assert "labels" not in dm.hparams and "groups" not in dm.hparams  # 40 (or 60,000) entries are data, not settings


# ------------------------------------------------------------------ worker processes
def test_training_stream_is_the_same_with_worker_processes():
    x, y = _x(24, 3), torch.arange(24) % 3

    def stream(workers: int):
        dm = _setup(CohortDataModule.from_tensors(x, y, num_members=2, partition="iid", batch_size=4, test_fraction=0,
                                                  num_workers=workers, train_transform=AddNoise(), seed=4))
        return _take(dm.train_dataloader(), 100)

    in_process, workers = stream(0), stream(2)
    assert len(in_process) == 3
    _assert_same_batches(workers, in_process)
