"""CohortDataModule: one data set, partitioned over the members of a cohort.

Every member gets its own train / vote / test split of its share
(:mod:`~lightning_colearn.data.partition`); the data set's official test split
is the shared evaluation set for validation and testing.

Training batches come in one of two streams:

* ``stream="per_member"``: each member draws from its own train split; a batch
  is a dict ``{member_index: (x, y)}`` (inside Lightning's ``CombinedLoader``,
  cycling the shorter members so an epoch is the longest member's pass). All
  members' batches of a step are gathered in one ``index_select``
  (:class:`MemberBatches`): N small loaders cost ~0.1 ms each per step, as much
  as a stacked cohort's whole step for small models;
* ``stream="shared"``: one loader over the union of the members' train
  splits; a batch is ``(x, y)`` and every member sees it.

Shuffling is reseeded from ``(seed, member, epoch)`` at every epoch
(:class:`EpochShuffleSampler`), so a run resumed from an epoch-end checkpoint
sees the same batches as an uninterrupted one.

Example:
    >>> dm = CohortDataModule("mnist_small", num_members=4, partition="shards", labels_per_member=2)
    >>> dm.setup("fit")
    >>> [len(dm.member_split(i, "train")) for i in range(4)]
    [640, 640, 640, 640]
    >>> batch = next(iter(dm.train_dataloader()))[0]
    >>> sorted(batch)[:2], batch[0][0].shape
    ([0, 1], torch.Size([64, 1, 28, 28]))
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from lightning_colearn.data.datasets import DATASETS, NORMALISATION, ImageDataset, collate_batch, load_dataset
from lightning_colearn.data.partition import PARTITIONS, partition, split_member
from lightning_colearn._checks import is_int_at_least

__all__ = ["CohortDataModule", "EpochShuffleSampler", "MemberBatches", "SPLITS", "STREAMS"]

SPLITS = ("train", "vote", "test")
STREAMS = ("per_member", "shared")


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation per epoch, a pure function of ``(seed, epoch)``.

    Lightning calls ``set_epoch`` before every epoch (as for
    ``DistributedSampler``), which is what makes resume reproducible.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        self.num_samples, self.seed, self.shuffle, self.epoch = num_samples, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class MemberBatches(Dataset):
    """Item ``(epoch, step)``: every member's training batch ``step`` of ``epoch``, as ``{member: (x, y)}``.

    The same batches as one ``DataLoader`` per member (each with its own
    :class:`EpochShuffleSampler`) combined in ``max_size_cycle`` mode: member
    ``i``'s batch ``step`` is its batch ``step mod len_i`` of the epoch's
    permutation. All members' rows are gathered in one ``index_select``, and
    each member's ``x`` is a slice of that one tensor.

    Args:
        dataset: an in-memory data set with ``images`` and ``labels`` tensors.
        members: each member's indices into ``dataset``.
        batch_size: samples per member per step (a member's last batch may be smaller).
        seeds: each member's shuffle seed.
    """

    def __init__(self, dataset, members: Sequence[np.ndarray], batch_size: int, seeds: Sequence[int]) -> None:
        self.images, self.labels = dataset.images, dataset.labels
        self.members = [torch.as_tensor(np.asarray(m), dtype=torch.long) for m in members]
        self.batch_size = batch_size
        self.samplers = [EpochShuffleSampler(len(m), seed) for m, seed in zip(self.members, seeds)]
        self.lengths = [-(-len(m) // batch_size) for m in self.members]
        self._order: tuple[int, list[torch.Tensor]] | None = None

    def __len__(self) -> int:
        return max(self.lengths)

    def _epoch_order(self, epoch: int) -> list[torch.Tensor]:
        if self._order is None or self._order[0] != epoch:
            order = []
            for sampler, indices in zip(self.samplers, self.members):
                sampler.set_epoch(epoch)
                order.append(indices[torch.as_tensor(list(iter(sampler)), dtype=torch.long)])
            self._order = (epoch, order)
        return self._order[1]

    def __getitem__(self, key: tuple[int, int]) -> dict[int, tuple[Tensor, Tensor]]:
        epoch, step = key
        b = self.batch_size
        parts = [order[(step % n) * b:(step % n + 1) * b] for order, n in zip(self._epoch_order(epoch), self.lengths)]
        index = torch.cat(parts)
        sizes = [len(p) for p in parts]
        xs = self.images.index_select(0, index).split(sizes)
        ys = self.labels.index_select(0, index).split(sizes)
        return {i: (x, y) for i, (x, y) in enumerate(zip(xs, ys))}


class _StepSampler(Sampler[tuple[int, int]]):
    """``(epoch, step)`` for every step of an epoch; Lightning sets the epoch as for any sampler."""

    def __init__(self, steps: int) -> None:
        self.steps, self.epoch = steps, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # a generator: the epoch is read at the first batch, not when the DataLoader makes its iterator
        # (on resume Lightning makes the iterator before it sets the restored epoch)
        epoch = self.epoch
        for step in range(self.steps):
            yield epoch, step

    def __len__(self) -> int:
        return self.steps


def _as_is(batch):
    return batch


class CohortDataModule(L.LightningDataModule):
    """Serves a data set partitioned over ``num_members`` members.

    Args:
        dataset: ``mnist_small`` (embedded), ``mnist`` or ``fashion_mnist``.
        num_members: members in the cohort (the partition's part count).
        partition: ``iid``, ``dirichlet`` (with ``alpha``) or ``shards`` (with ``labels_per_member``).
        splits: fractions of each member's share for train / vote / test.
        batch_size: training batch size per member.
        eval_batch_size: batch size of vote / validation / test loaders (default: ``batch_size``).
        stream: ``per_member`` (each member its own batches) or ``shared`` (one batch for all).
        root, download: where the full data sets live, and whether torchvision may download them.
        max_train_samples: use only the first ``n`` training samples of the data set (after a seeded shuffle).
        seed: seeds the partition, the splits and the shuffling.
    """

    def __init__(
        self,
        dataset: str = "mnist_small",
        num_members: int = 1,
        partition: str = "iid",
        alpha: float = 0.5,
        labels_per_member: int = 2,
        splits: Sequence[float] = (0.8, 0.1, 0.1),
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        stream: str = "per_member",
        root: str | None = None,
        download: bool = False,
        max_train_samples: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_choice("dataset", dataset, DATASETS)
        _check_choice("partition", partition, PARTITIONS)
        _check_choice("stream", stream, STREAMS)
        _check_int("num_members", num_members, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("labels_per_member", labels_per_member, 1)
        _check_int("num_workers", num_workers, 0)
        if eval_batch_size is not None:
            _check_int("eval_batch_size", eval_batch_size, 1)
        if max_train_samples is not None:
            _check_int("max_train_samples", max_train_samples, num_members)
        splits = tuple(float(s) for s in splits)
        if len(splits) != 3 or any(s < 0 for s in splits) or not np.isclose(sum(splits), 1.0) or splits[0] <= 0:
            raise ValueError(f"data.splits must be 3 fractions (train, vote, test) >= 0 summing to 1 with train > 0, got {list(splits)}")
        if partition == "dirichlet" and not alpha > 0:
            raise ValueError(f"data.alpha must be > 0 for the dirichlet partition, got {alpha}")
        self.save_hyperparameters()
        self.dataset, self.num_members, self.partition = dataset, num_members, partition
        self.alpha, self.labels_per_member, self.splits = alpha, labels_per_member, splits
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.stream, self.root, self.download = stream, root, download
        self.max_train_samples, self.num_workers, self.seed = max_train_samples, num_workers, seed
        self._members: list[dict[str, np.ndarray]] | None = None

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        # Only a download needs doing once, on one process; otherwise setup() reads (or explains) the files.
        if self.dataset != "mnist_small" and self.download:
            load_dataset(self.dataset, self.root, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self._members is not None:
            return
        train, test = load_dataset(self.dataset, self.root, self.download)
        mean, std = NORMALISATION[self.dataset]
        pool = np.arange(len(train))
        if self.max_train_samples is not None and self.max_train_samples < len(pool):
            pool = np.sort(np.random.default_rng(self.seed).permutation(pool)[: self.max_train_samples])
        self.train_set = ImageDataset(train, mean, std)
        self.test_set = ImageDataset(test, mean, std)
        labels = train.labels.numpy()[pool]
        parts = partition(
            labels, self.num_members, self.partition,
            seed=self.seed, alpha=self.alpha, labels_per_member=self.labels_per_member,
            min_size=sum(1 for f in self.splits if f > 0),  # one sample for each split a member must have
        )
        self._members = []
        for i, part in enumerate(parts):
            pieces = split_member(pool[part], self.splits, seed=self.seed * 7919 + i)
            self._members.append(dict(zip(SPLITS, pieces)))
            if len(pieces[0]) == 0:
                raise ValueError(f"member {i} got no training samples; use fewer members or another partition")

    # --------------------------------------------------------------- indices
    def member_split(self, member: int, split: str = "train") -> np.ndarray:
        """Indices (into the training set) of member ``member``'s ``split`` (train / vote / test)."""
        self._check_setup()
        _check_choice("split", split, SPLITS)
        if not 0 <= member < self.num_members:
            raise IndexError(f"member must be in [0, {self.num_members - 1}], got {member}")
        return self._members[member][split]  # type: ignore[index]

    def member_sizes(self, split: str = "train") -> list[int]:
        """Number of samples of ``split`` per member (FedAvg's weights)."""
        return [len(self.member_split(i, split)) for i in range(self.num_members)]

    # ----------------------------------------------------------- dataloaders
    def train_dataloader(self):
        self._check_setup()
        if self.stream == "shared":
            union = np.sort(np.concatenate([m["train"] for m in self._members]))  # type: ignore[union-attr]
            return self._loader(self.train_set, union, self.batch_size, shuffle=True, seed=self.seed)
        if hasattr(self.train_set, "images") and hasattr(self.train_set, "labels"):
            batches = MemberBatches(self.train_set, [m["train"] for m in self._members], self.batch_size,  # type: ignore[index]
                                    [self.seed * 7919 + i + 1 for i in range(self.num_members)])  # member_dataloader's seeds
            loader = DataLoader(batches, batch_size=None, sampler=_StepSampler(len(batches)), collate_fn=_as_is,
                                num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
            return CombinedLoader(loader, mode="max_size_cycle")
        loaders = {i: self.member_dataloader(i, "train") for i in range(self.num_members)}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self):
        return self.eval_dataloader()

    def test_dataloader(self):
        return self.eval_dataloader()

    def eval_dataloader(self) -> DataLoader:
        """The shared evaluation set (the data set's official test split), in order."""
        self._check_setup()
        return self._loader(self.test_set, None, self.eval_batch_size, shuffle=False, seed=0)

    def member_dataloader(self, member: int, split: str = "train", shuffle: bool | None = None) -> DataLoader:
        """A loader over one member's ``split``; training splits shuffle per epoch, others keep order."""
        indices = self.member_split(member, split)
        shuffle = split == "train" if shuffle is None else shuffle
        batch = self.batch_size if split == "train" else self.eval_batch_size
        return self._loader(self.train_set, indices, batch, shuffle=shuffle, seed=self.seed * 7919 + member + 1)

    def holdout_dataloader(self) -> DataLoader:
        """The union of all members' vote splits, in order: held-out data every member is judged on alike."""
        self._check_setup()
        union = np.sort(np.concatenate([m["vote"] for m in self._members]))  # type: ignore[union-attr]
        if len(union) == 0:
            raise ValueError("no held-out data: data.splits gives the vote split 0; use e.g. splits=[0.8, 0.1, 0.1]")
        return self._loader(self.train_set, union, self.eval_batch_size, shuffle=False, seed=0)

    def vote_dataloader(self, member: int) -> DataLoader:
        """Member ``member``'s own held-out vote split (judges other members' proposals)."""
        return self.member_dataloader(member, "vote")

    def _loader(self, dataset, indices, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
        data = dataset if indices is None else Subset(dataset, indices.tolist())
        return DataLoader(
            data,
            batch_size=batch_size,
            sampler=EpochShuffleSampler(len(data), seed, shuffle),
            collate_fn=collate_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # A per-member batch {member: (x, y)} moves tensor by tensor: Lightning's generic walk over any
        # collection took ~97 us a step for 12 members, this ~18 us (same tensors, same non_blocking rule).
        # Here, not in CohortModule: Lightning warns when a module overrides this hook and a datamodule is passed.
        if isinstance(batch, dict) and all(
            type(k) is int and type(v) is tuple and len(v) == 2 and isinstance(v[0], Tensor) and isinstance(v[1], Tensor)
            for k, v in batch.items()
        ):
            non_blocking = device.type not in ("cpu", "mps")  # what lightning.fabric's move_data_to_device does
            return {k: (x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking))
                    for k, (x, y) in batch.items()}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _check_setup(self) -> None:
        if self._members is None:
            raise RuntimeError("call setup() first (the Trainer does it for you)")


def _check_choice(field: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"data.{field} must be one of {list(allowed)}, got {value!r}")


def _check_int(field: str, value, minimum: int) -> None:
    if not is_int_at_least(value, minimum):
        raise ValueError(f"data.{field} must be an int >= {minimum}, got {value!r}")
