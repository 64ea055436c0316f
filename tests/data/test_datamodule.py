"""Tests for lightning_colearn.data.datamodule: CohortDataModule and EpochShuffleSampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_colearn.data.datamodule import SPLITS, CohortDataModule, EpochShuffleSampler

N = 4


def _dm(**kwargs) -> CohortDataModule:
    params = dict(dataset="mnist_small", num_members=N, partition="pathological", labels_per_member=2, batch_size=64, seed=0)
    params.update(kwargs)
    dm = CohortDataModule(**params)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def shards_dm() -> CohortDataModule:
    return _dm()


def _first_batches(loader, count: int = 3):
    out = []
    for i, batch in enumerate(loader):
        if i == count:
            break
        out.append(batch)
    return out


def _rows(images: torch.Tensor) -> list[bytes]:
    return [row.numpy().tobytes() for row in images.reshape(len(images), -1)]


# ------------------------------------------------------------------ splits
def test_splits_disjoint_across_members_and_splits(shards_dm):
    all_parts = [shards_dm.member_split(i, s) for i in range(N) for s in SPLITS]
    joined = np.concatenate(all_parts)
    assert len(np.unique(joined)) == len(joined)
    # shards with N * k = 8 < 10 classes uses the samples of 8 classes, no more
    labels = shards_dm.train_set.labels.numpy()
    assert len(joined) == int(np.isin(labels, np.unique(labels[joined])).sum())
    assert len(np.unique(labels[joined])) == 8


def test_iid_splits_cover_the_training_set():
    dm = _dm(partition="iid")
    joined = np.concatenate([dm.member_split(i, s) for i in range(N) for s in SPLITS])
    assert np.array_equal(np.sort(joined), np.arange(4000))
    assert dm.member_sizes("train") == [800] * N
    assert dm.member_sizes("vote") == [100] * N
    assert dm.member_sizes("test") == [100] * N


def test_each_member_has_its_shard_labels_in_every_split(shards_dm):
    labels = shards_dm.train_set.labels.numpy()
    for i in range(N):
        train_labels = set(labels[shards_dm.member_split(i, "train")].tolist())
        assert len(train_labels) == 2
        for split in ("vote", "test"):
            assert set(labels[shards_dm.member_split(i, split)].tolist()) <= train_labels


def test_member_split_errors():
    dm = CohortDataModule(num_members=2)
    with pytest.raises(RuntimeError, match="call setup"):
        dm.member_split(0)
    dm.setup()
    with pytest.raises(ValueError, match="data.split must be one of"):
        dm.member_split(0, "validation")
    with pytest.raises(IndexError, match=r"member must be in \[0, 1\]"):
        dm.member_split(2)


def test_setup_is_idempotent(shards_dm):
    before = shards_dm.member_split(0, "train").copy()
    shards_dm.setup("fit")
    shards_dm.setup("test")
    assert np.array_equal(shards_dm.member_split(0, "train"), before)


def test_max_train_samples_limits_the_pool():
    dm = _dm(partition="iid", max_train_samples=400)
    joined = np.concatenate([dm.member_split(i, s) for i in range(N) for s in SPLITS])
    assert len(joined) == 400 and len(np.unique(joined)) == 400
    assert not np.array_equal(np.sort(joined), np.arange(400))  # a seeded random subset, not the first 400


# ------------------------------------------------------------- per_member stream
def test_per_member_batches_come_from_each_members_own_train_split(shards_dm):
    labels = shards_dm.train_set.labels.numpy()
    own_rows = {}
    for i in range(N):
        split = shards_dm.member_split(i, "train")
        own_rows[i] = set(_rows(shards_dm.train_set.images[split]))
        assert len(own_rows[i]) == len(split)  # images are distinct, so rows identify samples
    seen = {i: [] for i in range(N)}
    loader = shards_dm.train_dataloader()
    for batch, _, _ in loader:
        assert isinstance(batch, dict) and sorted(batch) == list(range(N))
        for i, (x, y) in batch.items():
            assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32
            assert len(x) == len(y) <= 64
            shard_labels = set(labels[shards_dm.member_split(i, "train")].tolist())
            assert set(y.tolist()) <= shard_labels
            rows = _rows(x)
            assert set(rows) <= own_rows[i], f"member {i} got a sample outside its train split"
            seen[i].extend(rows)
    # equal member sizes: one epoch is exactly one pass over each member's split
    for i in range(N):
        assert len(seen[i]) == len(own_rows[i]) and set(seen[i]) == own_rows[i]


def test_per_member_labels_match_images(shards_dm):
    loader = shards_dm.member_dataloader(1, "train")
    x, y = next(iter(loader))
    ds = shards_dm.train_set
    index_of = {row: j for j, row in enumerate(_rows(ds.images))}
    for row, label in zip(_rows(x), y):
        assert ds.labels[index_of[row]].item() == label.item()


# ---------------------------------------------------------------- shared stream
def test_shared_stream_yields_tuples_over_the_union_of_train_splits():
    dm = _dm(stream="shared", batch_size=128)
    union = np.sort(np.concatenate([dm.member_split(i, "train") for i in range(N)]))
    loader = dm.train_dataloader()
    assert isinstance(loader, DataLoader)
    allowed = set(_rows(dm.train_set.images[union]))
    seen = []
    for batch in loader:
        assert isinstance(batch, tuple) and len(batch) == 2
        x, y = batch
        assert x.shape[1:] == (1, 28, 28) and len(x) == len(y) <= 128
        seen.extend(_rows(x))
    assert len(seen) == len(union) and set(seen) == allowed


# ---------------------------------------------------------------- determinism
def test_same_seed_gives_identical_batches():
    a = _first_batches(_dm().train_dataloader())
    b = _first_batches(_dm().train_dataloader())
    for (ba, _, _), (bb, _, _) in zip(a, b):
        for i in range(N):
            assert torch.equal(ba[i][0], bb[i][0]) and torch.equal(ba[i][1], bb[i][1])


def test_different_seed_gives_different_partition_and_batches():
    a, b = _dm(seed=0), _dm(seed=1)
    assert not np.array_equal(a.member_split(0, "train"), b.member_split(0, "train"))
    xa, _ = next(iter(a.member_dataloader(0)))
    xb, _ = next(iter(b.member_dataloader(0)))
    assert not torch.equal(xa, xb)


def test_members_are_shuffled_with_different_seeds():
    dm = _dm(partition="iid")
    s0, s1 = (dm.member_dataloader(i).dataset.samplers[0] for i in (0, 1))
    assert isinstance(s0, EpochShuffleSampler) and s0.seed != s1.seed


def test_set_epoch_changes_the_order_and_is_reproducible(shards_dm):
    loader = shards_dm.member_dataloader(2, "train")
    assert callable(loader.sampler.set_epoch)  # what Lightning calls before every epoch
    epoch0 = [y.clone() for _, y in loader]
    loader.sampler.set_epoch(1)
    epoch1 = [y.clone() for _, y in loader]
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, epoch1))
    assert sorted(torch.cat(epoch0).tolist()) == sorted(torch.cat(epoch1).tolist())  # same samples
    loader.sampler.set_epoch(0)
    again = [y.clone() for _, y in loader]
    assert all(torch.equal(a, b) for a, b in zip(epoch0, again))


def test_set_epoch_on_combined_loader_samplers(shards_dm):
    loader = shards_dm.train_dataloader()
    first = next(iter(loader))[0]
    for dl in loader.flattened:
        dl.sampler.set_epoch(3)
    later = next(iter(loader))[0]
    assert all(not torch.equal(first[i][0], later[i][0]) for i in range(N))


def test_epoch_shuffle_sampler():
    s = EpochShuffleSampler(10, seed=5)
    assert len(s) == 10
    p0 = list(s)
    assert sorted(p0) == list(range(10)) and p0 != list(range(10))
    assert list(s) == p0  # pure function of (seed, epoch)
    s.set_epoch(1)
    assert list(s) != p0 and sorted(s) == list(range(10))
    assert list(EpochShuffleSampler(10, seed=5)) == p0
    assert list(EpochShuffleSampler(10, seed=6)) != p0
    assert list(EpochShuffleSampler(4, seed=5, shuffle=False)) == [0, 1, 2, 3]


# ------------------------------------------------------------- eval loaders
def test_vote_and_eval_loaders_keep_order(shards_dm):
    vote = shards_dm.vote_dataloader(3)
    ys = torch.cat([y for _, y in vote])
    assert torch.equal(ys, shards_dm.train_set.labels[shards_dm.member_split(3, "vote")])
    xs, ys = zip(*shards_dm.eval_dataloader())
    assert torch.equal(torch.cat(ys), shards_dm.test_set.labels)
    assert torch.cat(xs).shape == (1000, 1, 28, 28)
    assert shards_dm.val_dataloader().dataset.batch_size == shards_dm.test_dataloader().dataset.batch_size == 64


def test_eval_batch_size():
    dm = _dm(eval_batch_size=250)
    assert dm.eval_dataloader().dataset.batch_size == 250
    assert dm.member_dataloader(0, "vote").dataset.batch_size == 250
    assert dm.member_dataloader(0, "train").dataset.batch_size == 64
    assert [len(x) for x, _ in dm.eval_dataloader()] == [250] * 4


def test_small_dirichlet_members_still_get_vote_and_test_samples():
    dm = CohortDataModule("mnist_small", num_members=20, partition="dirichlet", alpha=0.1, seed=0)
    dm.setup()
    assert min(dm.member_sizes("train")) >= 3  # guard: some members are really small here
    assert min(dm.member_sizes("vote")) >= 1
    assert min(dm.member_sizes("test")) >= 1


def test_train_only_members_need_one_sample_so_skewed_federated_partitions_load():
    # 100 clients, alpha 0.1 (the federated example): needing 3 samples per member would refuse it
    dm = CohortDataModule("mnist_small", num_members=100, partition="dirichlet", alpha=0.1, splits=(1.0, 0.0, 0.0))
    dm.setup()
    sizes = dm.member_sizes("train")
    assert min(sizes) >= 1 and sum(sizes) == 4000 and max(sizes) > 5 * min(sizes)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"dataset": "cifar10"}, "dataset"),
        ({"partition": "random"}, "partition"),
        ({"stream": "broadcast"}, "stream"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"num_members": 0}, "num_members"),
        ({"labels_per_member": 0}, "labels_per_member"),
        ({"num_workers": -1}, "num_workers"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
        ({"max_train_samples": 2, "num_members": 3}, "max_train_samples"),
        ({"splits": (0.5, 0.2, 0.2)}, "splits"),
        ({"splits": (0.8, 0.2)}, "splits"),
        ({"splits": (0.0, 0.5, 0.5)}, "splits"),
        ({"splits": (1.2, -0.1, -0.1)}, "splits"),
        ({"partition": "dirichlet", "alpha": 0.0}, "alpha"),
    ],
)
def test_validation_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"data\.{field}\b"):
        CohortDataModule(**kwargs)


def test_dataloader_before_setup_raises():
    dm = CohortDataModule(num_members=2)
    with pytest.raises(RuntimeError, match="call setup"):
        dm.train_dataloader()


def test_hyperparameters_saved():
    dm = CohortDataModule(num_members=3, partition="dirichlet", alpha=0.3, seed=7)
    assert dm.hparams.num_members == 3 and dm.hparams.alpha == 0.3 and dm.hparams.seed == 7


@pytest.mark.parametrize("partition", [dict(partition="iid"), dict(partition="dirichlet", alpha=0.3)], ids=["iid", "dirichlet"])
def test_gathered_member_batches_equal_one_loader_per_member(partition):
    """The one-gather per-member stream yields exactly the batches of N member loaders cycled by a CombinedLoader."""
    from lightning.pytorch.utilities import CombinedLoader

    dm = CohortDataModule("mnist_small", num_members=5, batch_size=64, seed=3, **partition)
    dm.setup("fit")
    new = dm.train_dataloader()
    old = CombinedLoader({i: dm.member_dataloader(i, "train") for i in range(5)}, mode="max_size_cycle")
    assert len(new.flattened[0]) == max(len(d) for d in old.flattened)
    for epoch in range(2):  # a new permutation per epoch, set the way Lightning sets it
        for loader in (*new.flattened, *old.flattened):
            loader.sampler.set_epoch(epoch)
        steps = 0
        for (a, _, _), (b, _, _) in zip(new, old):
            assert a.keys() == b.keys()
            for i in a:
                assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1]), (epoch, steps, i)
            steps += 1
        assert steps == len(new.flattened[0])


def test_per_member_batch_transfer_matches_lightnings_generic_move(tmp_path) -> None:
    """The fast path for {member: (x, y)} gives what Lightning's generic move gives; other batches take Lightning's;
    a fit with a CohortModule warns nothing about the hook."""
    import warnings

    import lightning as L

    from lightning_colearn import CohortModule
    from lightning_colearn.models import LogisticRegression

    dm = CohortDataModule("mnist_small", num_members=3, batch_size=4)
    cpu = torch.device("cpu")
    per_member = {i: (torch.randn(4, 784), torch.randint(0, 10, (4,))) for i in range(3)}
    moved = dm.transfer_batch_to_device(per_member, cpu, 0)
    generic = L.LightningDataModule.transfer_batch_to_device(dm, per_member, cpu, 0)
    assert moved.keys() == generic.keys() == per_member.keys()
    for k in per_member:
        assert type(moved[k]) is tuple and all(a is b for a, b in zip(moved[k], generic[k]))  # the same tensors on the CPU
    for other in ((per_member[0][0], per_member[0][1]), {"x": per_member[0][0]}, {0: [per_member[0][0], per_member[0][1]]}):
        assert type(dm.transfer_batch_to_device(other, cpu, 0)) is type(other)  # Lightning's move keeps the collection
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(default_root_dir=tmp_path, max_steps=2, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(
            CohortModule(LogisticRegression, size=3), datamodule=dm)
    assert not [w for w in caught if "transfer_batch_to_device" in str(w.message)]
