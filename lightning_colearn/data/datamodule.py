"""CohortDataModule: any map-style data set, partitioned over the members of a cohort.

The first argument is a preset name (``mnist_small``, ``mnist``, ``fashion_mnist``)
or a data set: ``(x, y)`` tensors or arrays (:meth:`CohortDataModule.from_tensors`),
a ``torch.utils.data.Dataset`` (torchvision's or your own), a Hugging Face
``datasets.Dataset``, or an existing ``LightningDataModule``
(:meth:`CohortDataModule.from_datamodule`). The presets are definitions on the
same path (:func:`~lightning_colearn.data.datasets.preset`), not a second one.

* Labels are found once (:mod:`~lightning_colearn.data.sources`); the training
  pool is partitioned over the members (:mod:`~lightning_colearn.data.partition`,
  every scheme there), and each member's share is split into train / vote /
  test parts: "vote" is the member's own held-out data that judges proposals.
* The shared evaluation set (validation, test, the federated server's score) is
  ``test_dataset``, the preset's test split, the wrapped DataModule's val/test
  loaders, or else a seeded ``test_fraction`` held out of the data set.
* Models take their shapes from :meth:`CohortDataModule.shapes`
  (``in_features``, ``in_channels``, ``image_size``, ``num_classes``).

Training batches come in one of two streams, both reproducible from
``(seed, member, epoch)`` (:mod:`~lightning_colearn.data.loaders`):

* ``stream="per_member"``: each member draws from its own train split; a batch
  is a dict ``{member_index: (x, y)}`` (the shorter members cycled, so an epoch
  is the longest member's pass). Tensor data gathers all members' rows of a
  step in one ``index_select``;
* ``stream="shared"``: one loader over the union of the members' train
  splits; a batch is ``(x, y)`` and every member sees it.

Examples:
    >>> dm = CohortDataModule("mnist_small", num_members=4, partition="pathological", labels_per_member=2)
    >>> dm.setup("fit")
    >>> [len(dm.member_split(i, "train")) for i in range(4)]
    [640, 640, 640, 640]
    >>> batch = next(iter(dm.train_dataloader()))[0]
    >>> sorted(batch)[:2], batch[0][0].shape, dm.shapes()
    ([0, 1], torch.Size([64, 1, 28, 28]), {'in_features': 784, 'in_channels': 1, 'image_size': 28, 'num_classes': 10})
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_colearn._checks import is_int_at_least
from lightning_colearn.data.datasets import DATASETS, preset
from lightning_colearn.data.loaders import Batches, EpochShuffleSampler, make_loader
from lightning_colearn.data.partition import LABEL_SCHEMES, PARTITIONS, partition, split_member
from lightning_colearn.data.sources import TASKS, Source, as_source, find_labels, to_memory
from lightning_colearn.data.table import PartitionTable

__all__ = ["CohortDataModule", "EpochShuffleSampler", "SPLITS", "STREAMS"]

SPLITS = ("train", "vote", "test")
STREAMS = ("per_member", "shared")
SAMPLINGS = ("shuffle", "poisson")
_PRIMITIVE = (str, int, float, bool, type(None))


class CohortDataModule(L.LightningDataModule):
    """Serves a data set partitioned over ``num_members`` members.

    Args:
        dataset: a preset name (``mnist_small`` embedded, ``mnist``, ``fashion_mnist``), ``(x, y)``
            tensors/arrays, a map-style data set (torch, torchvision, Hugging Face), or a
            ``LightningDataModule`` whose training set is partitioned (see :meth:`from_datamodule`).
            An ``IterableDataset`` is refused: a partition needs ``len`` and indexing.
        num_members: members in the cohort (the partition's part count).
        partition: one of :data:`~lightning_colearn.data.partition.PARTITIONS` (``iid``, ``dirichlet``,
            ``shards``, ``pathological``, ``linear``, ``square``, ``exponential``, ``sizes``,
            ``inner_dirichlet``, ``natural``); ``dirichlet``, ``shards``, ``pathological`` and
            ``inner_dirichlet`` read class labels.
        alpha: Dirichlet concentration (``dirichlet``, ``inner_dirichlet``); smaller is more skewed.
        labels_per_member: classes per member (``pathological``).
        splits: fractions of each member's share for train / vote / test.
        batch_size: training batch size per member.
        eval_batch_size: batch size of vote / validation / test loaders (default: ``batch_size``).
        stream: ``per_member`` (each member its own batches) or ``shared`` (one batch for all).
        root: where the preset data sets live.
        download: whether torchvision may download them.
        max_train_samples: use only ``n`` samples of the training pool (a seeded choice).
        num_workers: DataLoader worker processes (each computes whole steps; results do not depend on it).
        seed: seeds the hold-out, the partition, the splits, the shuffling and the transforms' randomness.
        test_dataset: the shared evaluation set, a data set of the same kinds as ``dataset``
            (default: the preset's test split, else ``test_fraction`` of ``dataset`` held out).
        test_fraction: fraction of ``dataset`` held out as the evaluation set when there is no
            ``test_dataset`` (0: none; validation and the federated server then need one).
        labels: every training sample's label: an array, a column (Hugging Face) or attribute name,
            or a callable ``sample -> label``; default: found (``targets``, ``labels``, a ``label``
            column, the second item of each sample).
        input_column: the input column(s) of a Hugging Face data set or of dict samples.
        task: ``auto`` (floating-point labels are regression targets), ``classification`` or ``regression``.
        shards_per_member: shards dealt to each member (``shards``).
        min_size: fewest training-pool samples a member may get (default: one per non-empty split).
        self_balancing: ``dirichlet``: members above the mean size get no more classes' shares.
        sizes: member sizes (``sizes``, ``inner_dirichlet``): sample counts, or fractions summing to 1.
        groups: one group id per training sample (``natural``; e.g. writer or user): an array, a
            column or attribute name, or a callable ``sample -> group``.
        train_transform: applied to each input sample in training.
        eval_transform: applied to each input sample in every other loader.
        train_batch_transform: applied to each training batch's inputs after collation (in the loader).
        eval_batch_transform: the same for every other loader (so votes and the server's evaluation see what
            Lightning's loops see).
        collate_fn: collates a list of ``(x, y)`` samples into a batch (e.g. padding sequences); tensor data
            then gives up its one-gather batches.
        sampling: ``shuffle`` (each member's training split reshuffled per epoch, fixed batch sizes) or
            ``poisson`` (each sample joins a step's batch with probability ``batch_size / len(split)``:
            the sampling DP-SGD's privacy accounting assumes; see :class:`~lightning_colearn.data.loaders.Batches`).
        in_memory: read every sample of a non-tensor data set once at setup into tensors (its own
            transforms run once), so training gathers batches as tensor data does; for data sets whose
            samples do not change from read to read (put random augmentation in ``train_transform``).
        cache_eval: MiB of evaluation, vote and held-out batches of a non-tensor data set kept in memory
            after their first read (they are read again every round; needs a deterministic
            ``eval_transform``); 0 reads them every time.
    """

    def __init__(
        self,
        dataset: Any = "mnist_small",
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
        test_dataset: Any = None,
        test_fraction: float = 0.1,
        labels: Any = None,
        input_column: str | Sequence[str] | None = None,
        task: str = "auto",
        shards_per_member: int = 2,
        min_size: int | None = None,
        self_balancing: bool = False,
        sizes: Sequence[float] | None = None,
        groups: Any = None,
        train_transform: Callable | None = None,
        eval_transform: Callable | None = None,
        train_batch_transform: Callable | None = None,
        eval_batch_transform: Callable | None = None,
        collate_fn: Callable | None = None,
        in_memory: bool = False,
        cache_eval: int = 512,
        sampling: str = "shuffle",
    ) -> None:
        super().__init__()
        errors = _check_arguments(locals())
        if errors:
            raise ValueError("; ".join(errors))
        # objects (data sets, arrays, transforms) stay out of hparams: a checkpoint must load with weights_only=True
        self.save_hyperparameters(ignore=[k for k, v in _arguments(locals()).items() if not _primitive(k, v)])
        self.dataset, self.test_dataset = dataset, test_dataset
        self.num_members, self.partition = num_members, partition
        self.alpha, self.labels_per_member, self.shards_per_member = alpha, labels_per_member, shards_per_member
        self.splits = tuple(float(s) for s in splits)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.stream, self.root, self.download = stream, root, download
        self.max_train_samples, self.num_workers, self.seed = max_train_samples, num_workers, seed
        self.test_fraction, self.labels, self.input_column, self._task_arg = test_fraction, labels, input_column, task
        self.min_size, self.self_balancing, self.sizes, self.groups = min_size, self_balancing, sizes, groups
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.train_batch_transform, self.eval_batch_transform = train_batch_transform, eval_batch_transform
        self.collate_fn, self.cache_eval, self.in_memory, self.sampling = collate_fn, cache_eval, in_memory, sampling
        self._wrapped: L.LightningDataModule | None = dataset if isinstance(dataset, L.LightningDataModule) else None
        self._batch_size_given = True
        self._wrapped_stages: set[str] = set()
        self._members: list[dict[str, np.ndarray]] | None = None
        self.train_set: Source | None = None
        self.test_set: Source | None = None
        self._eval_index: np.ndarray | None = None  # the held-out part of train_set when test_set is None
        self._pool: np.ndarray | None = None
        self._raw_train: Any = None  # the training data set as given (group columns are read from it)
        self._eval_loaders: dict[Any, DataLoader] = {}

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_tensors(cls, x: Any, y: Any, *, test: tuple[Any, Any] | None = None, **kwargs: Any) -> CohortDataModule:
        """Partition in-memory ``x`` ``[N, ...]`` and ``y`` ``[N]`` (tensors or arrays; labels of any hashable type).

        ``test=(x_test, y_test)`` gives the shared evaluation set (else ``test_fraction`` is held out).

        Examples:
            >>> dm = CohortDataModule.from_tensors(torch.randn(100, 5), torch.arange(100) % 3, num_members=2, batch_size=8)
            >>> dm.setup("fit"); dm.shapes(), dm.member_sizes("train")
            ({'in_features': 5, 'num_classes': 3}, [36, 36])
        """
        if "test_dataset" in kwargs:
            raise TypeError("from_tensors takes the evaluation set as test=(x_test, y_test), not test_dataset=")
        return cls((x, y), test_dataset=None if test is None else _pair(test, "test"), **kwargs)

    @classmethod
    def from_datamodule(cls, datamodule: L.LightningDataModule, num_members: int, partition: str = "iid", **kwargs: Any) -> CohortDataModule:
        """Partition the training set of an existing ``LightningDataModule`` over ``num_members`` members.

        Its ``train_dataloader().dataset`` is partitioned (with that loader's batch size and
        collate function unless given); its ``val_dataloader`` / ``test_dataloader`` stay the
        shared evaluation set, served as they are, so the voting and federated callbacks run on
        it unchanged. Its batch hooks (``on_before_batch_transfer`` ...) are not called.
        """
        if not isinstance(datamodule, L.LightningDataModule):
            raise TypeError(f"from_datamodule takes a LightningDataModule, got {type(datamodule).__name__}")
        dm = cls(datamodule, num_members, partition, **kwargs)
        dm._batch_size_given = "batch_size" in kwargs
        return dm

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        # Only a download needs doing once, on one process; otherwise setup() reads (or explains) the files.
        if self._wrapped is not None:
            self._wrapped.prepare_data()
        elif isinstance(self.dataset, str) and self.dataset != "mnist_small" and self.download:
            preset(self.dataset, self.root, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self._wrapped is not None:
            self._setup_wrapped(stage)
        if self._members is not None:
            return
        train, test = self._sources()
        if self.in_memory:
            train, test = to_memory(train, self.num_workers), None if test is None else to_memory(test, self.num_workers)
        pool = np.arange(len(train))
        if test is None and self._wrapped is None and self.test_fraction > 0:
            held = np.random.default_rng([self.seed, 104_729]).permutation(len(train))
            count = int(round(self.test_fraction * len(train)))
            if not 0 < count < len(train):
                raise ValueError(f"data.test_fraction={self.test_fraction} of {len(train)} samples holds out {count}; "
                                 "it must leave at least one sample on each side (or pass test_dataset=...)")
            self._eval_index, pool = np.sort(held[:count]), np.sort(held[count:])
        if self.max_train_samples is not None and self.max_train_samples < len(pool):
            pool = np.sort(np.random.default_rng(self.seed).permutation(pool)[: self.max_train_samples])
        self.train_set, self.test_set, self._pool = train, test, pool
        self._members = self._partition(pool)

    def _sources(self) -> tuple[Source, Source | None]:
        common = dict(input_column=self.input_column, task=self._task_arg, num_workers=self.num_workers)
        if isinstance(self.dataset, str):
            return preset(self.dataset, self.root, self.download)
        if self._wrapped is not None:
            self._raw_train = self._wrapped_train_dataset()
            return as_source(self._raw_train, labels=self.labels, **common), None
        self._raw_train = self.dataset
        train = as_source(self.dataset, labels=self.labels, **common)
        if self.test_dataset is None:
            return train, None
        labels = self.labels if isinstance(self.labels, str) else None  # a column name names the test set's column too
        test = as_source(self.test_dataset, labels=labels, **common)
        return train, _align_classes(train, test)

    def _partition(self, pool: np.ndarray) -> list[dict[str, np.ndarray]]:
        scheme = self.partition
        labels = self.train_set.labels  # type: ignore[union-attr]
        if scheme in LABEL_SCHEMES and labels is None:
            seen = "regression targets" if self.train_set.task == "regression" else "no labels"  # type: ignore[union-attr]
            raise ValueError(
                f"data.partition={scheme!r} needs class labels, but the data set has {seen}; pass labels=... "
                f"or use one of {[p for p in PARTITIONS if p not in LABEL_SCHEMES]}"
            )
        groups = None
        if scheme == "natural":
            groups = self._groups(pool)
        try:
            parts = partition(
                labels.numpy()[pool] if labels is not None else len(pool), self.num_members, scheme,
                seed=self.seed, alpha=self.alpha, labels_per_member=self.labels_per_member,
                shards_per_member=self.shards_per_member, self_balancing=self.self_balancing,
                sizes=self.sizes, groups=groups,
                min_size=self.min_size if self.min_size is not None else sum(1 for f in self.splits if f > 0),
            )
        except ValueError as err:
            raise ValueError(f"data.partition={scheme!r}: {err}") from err
        members = []
        for i, part in enumerate(parts):
            pieces = split_member(pool[part], self.splits, seed=self.seed * 7919 + i)
            members.append(dict(zip(SPLITS, pieces)))
            if len(pieces[0]) == 0:
                raise ValueError(f"member {i} got no training samples; use fewer members or another partition")
        return members

    def _groups(self, pool: np.ndarray) -> np.ndarray:
        if self.groups is None:
            raise ValueError("data.partition='natural' needs groups=... (one group id per sample, e.g. writer or user: "
                             "an array, a column or attribute name, or a callable sample -> group)")
        data = self._raw_train if not isinstance(self._raw_train, (str, tuple, Tensor, np.ndarray)) else None
        if isinstance(self.groups, str) or callable(self.groups) and not isinstance(self.groups, (Tensor, np.ndarray)):
            if data is None:
                raise ValueError(f"data.groups={self.groups!r} names a column or reads samples, but the data set is tensors: "
                                 "pass the group ids as an array")
            found, _ = find_labels(data, self.groups, num_workers=self.num_workers)
        else:
            found = self.groups
        values = np.asarray(found.numpy() if isinstance(found, Tensor) else found, dtype=object if isinstance(found, list) else None)
        if values.ndim != 1 or len(values) != len(self.train_set):  # type: ignore[arg-type]
            raise ValueError(f"data.groups must hold one group id per training sample ({len(self.train_set)}), "  # type: ignore[arg-type]
                             f"got shape {values.shape}")
        return values[pool]

    def _setup_wrapped(self, stage: str | None) -> None:
        key = stage or "fit"
        if key not in self._wrapped_stages:
            self._wrapped.trainer = self.trainer  # type: ignore[union-attr]  # some DataModules read it in setup
            self._wrapped.setup(stage)  # type: ignore[union-attr]
            self._wrapped_stages.add(key)

    def _wrapped_train_dataset(self) -> Any:
        loader = self._wrapped.train_dataloader()  # type: ignore[union-attr]
        if not isinstance(loader, DataLoader):
            raise TypeError(f"from_datamodule needs train_dataloader() to return one DataLoader, got {type(loader).__name__}")
        if not self._batch_size_given and loader.batch_size is not None:
            self.batch_size = loader.batch_size
            self.eval_batch_size = self.hparams.get("eval_batch_size") or loader.batch_size
        if self.collate_fn is None and loader.collate_fn is not torch.utils.data.default_collate:
            self.collate_fn = loader.collate_fn
        return loader.dataset

    # --------------------------------------------------------------- indices
    def member_split(self, member: int, split: str = "train") -> np.ndarray:
        """Indices (into :attr:`train_set`) of member ``member``'s ``split`` (train / vote / test)."""
        self._check_setup()
        _check_choice("split", split, SPLITS)
        if not 0 <= member < self.num_members:
            raise IndexError(f"member must be in [0, {self.num_members - 1}], got {member}")
        return self._members[member][split]  # type: ignore[index]

    def member_sizes(self, split: str = "train") -> list[int]:
        """Number of samples of ``split`` per member (FedAvg's weights)."""
        return [len(self.member_split(i, split)) for i in range(self.num_members)]

    def sample_rates(self) -> list[float]:
        """Each member's expected fraction of its training data in one step's batch (DP-SGD's sampling rate ``q``):
        ``batch_size / len(train split)``, or over the union of the splits for the shared stream."""
        if self.stream == "shared":
            return [min(1.0, self.batch_size / sum(self.member_sizes("train")))] * self.num_members
        return [min(1.0, self.batch_size / n) for n in self.member_sizes("train")]

    def steps_per_epoch(self) -> int:
        """Training steps in one epoch (the longest member's pass; the shared stream's pass)."""
        sizes = [sum(self.member_sizes("train"))] if self.stream == "shared" else self.member_sizes("train")
        return max(-(-n // self.batch_size) for n in sizes)

    # ---------------------------------------------------------------- shapes
    @property
    def task(self) -> str | None:
        """``classification``, ``regression`` or ``None`` (no labels); before setup, the ``task=`` asked for."""
        return self.train_set.task if self.train_set is not None else self._task_arg

    @property
    def classes(self) -> list | None:
        """The original label of each class index (strings stay strings), or ``None`` without classes."""
        self._check_setup()
        return self.train_set.classes  # type: ignore[union-attr]

    @property
    def num_classes(self) -> int | None:
        classes = self.classes
        return None if classes is None else len(classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample as a model receives it (after ``eval_transform``)."""
        self._check_setup()
        x = _inputs(self._view(self.train_set, [self._pool[:1]], 1, train=False)[0, 0])  # type: ignore[index]
        return tuple(x.shape[1:])

    def shapes(self) -> dict[str, Any]:
        """The keyword arguments models take their shapes from: ``in_features`` always, ``in_channels`` and
        ``image_size`` (an int if square, else ``(H, W)``) for ``[C, H, W]`` inputs, ``vocab_size`` for
        integer token sequences held as tensors, ``num_classes`` for classification."""
        shape = self.input_shape
        out: dict[str, Any] = {"in_features": int(math.prod(shape))}
        if len(shape) == 3:
            out["in_channels"] = shape[0]
            out["image_size"] = shape[1] if shape[1] == shape[2] else (shape[1], shape[2])
        inputs = getattr(self.train_set, "inputs", None)
        if len(shape) == 1 and isinstance(inputs, Tensor) and not inputs.is_floating_point() and len(inputs):
            out["vocab_size"] = int(inputs.max()) + 1
        if self.num_classes is not None:
            out["num_classes"] = self.num_classes
        return out

    def partition_table(self) -> PartitionTable:
        """Per member: samples of each split, per class (:class:`~lightning_colearn.data.table.PartitionTable`)."""
        self._check_setup()
        labels = self.train_set.labels  # type: ignore[union-attr]
        counts = {}
        for split in SPLITS:
            per = [self.member_split(i, split) for i in range(self.num_members)]
            if labels is None:
                counts[split] = np.array([[len(p)] for p in per], dtype=np.int64)
            else:
                codes = labels.numpy()
                counts[split] = np.stack([np.bincount(codes[p], minlength=self.num_classes) for p in per])
        return PartitionTable(counts, None if labels is None else list(self.classes))  # type: ignore[arg-type]

    # ----------------------------------------------------------- dataloaders
    def train_dataloader(self):
        self._check_setup()
        if self.stream == "shared":
            union = np.sort(np.concatenate([m["train"] for m in self._members]))  # type: ignore[union-attr]
            return make_loader(self._view(self.train_set, [union], self.batch_size, train=True, seeds=[self.seed]),
                               self.num_workers, self._training_progress)
        seeds = [self.seed * 7919 + i + 1 for i in range(self.num_members)]  # member_dataloader's seeds
        parts = [m["train"] for m in self._members]  # type: ignore[union-attr]
        batches = self._view(self.train_set, parts, self.batch_size, train=True, seeds=seeds, as_dict=True)
        return CombinedLoader(make_loader(batches, self.num_workers, self._training_progress), mode="max_size_cycle")

    def _training_progress(self) -> tuple[int, int]:
        """The trainer's current epoch and how many of its batches it has processed: where a checkpoint taken
        now resumes (what the training loader saves; see :class:`~lightning_colearn.data.loaders.StepLoader`)."""
        loop = self.trainer.fit_loop
        return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.processed

    def val_dataloader(self):
        if self._wrapped is not None:
            return self._wrapped_loader("val_dataloader")
        return self.eval_dataloader() if self._has_eval_set() else []

    def test_dataloader(self):
        if self._wrapped is not None:
            return self._wrapped_loader("test_dataloader")
        return self.eval_dataloader() if self._has_eval_set() else []

    def eval_dataloader(self) -> Any:
        """The shared evaluation set, in order: ``test_dataset``, the preset's test split, the held-out
        ``test_fraction``, or the wrapped DataModule's validation (else test) loader."""
        self._check_setup()
        if self._wrapped is not None:
            for hook in ("val_dataloader", "test_dataloader"):
                loader = self._wrapped_loader(hook)
                if loader:
                    return loader
            raise ValueError(f"the wrapped {type(self._wrapped).__name__} has no val_dataloader or test_dataloader "
                             "to evaluate on; give it one, or pass eval_dataloader=... to the callback")
        if not self._has_eval_set():
            raise ValueError("no shared evaluation set: data.test_fraction is 0 and there is no test_dataset; "
                             "pass test_dataset=... or set test_fraction > 0")
        if self.test_set is not None:
            return self._eval_loader("eval", self.test_set, np.arange(len(self.test_set)))
        return self._eval_loader("eval", self.train_set, self._eval_index)

    @property
    def eval_dataset(self) -> tuple[Source, np.ndarray] | None:
        """The evaluation source and its indices (``None`` for a wrapped DataModule's own loaders)."""
        self._check_setup()
        if self._wrapped is not None or not self._has_eval_set():
            return None
        if self.test_set is not None:
            return self.test_set, np.arange(len(self.test_set))
        return self.train_set, self._eval_index  # type: ignore[return-value]

    def member_dataloader(self, member: int, split: str = "train", shuffle: bool | None = None) -> DataLoader:
        """A loader over one member's ``split``; training splits shuffle per epoch, others keep order."""
        indices = self.member_split(member, split)
        shuffle = split == "train" if shuffle is None else shuffle
        if split != "train" and not shuffle:
            return self._eval_loader((split, member), self.train_set, indices)
        batch = self.batch_size if split == "train" else self.eval_batch_size
        seed = self.seed * 7919 + member + 1
        return make_loader(self._view(self.train_set, [indices], batch, train=split == "train",
                                      seeds=[seed] if shuffle else None, rng_seed=seed), self.num_workers)

    def holdout_dataloader(self) -> DataLoader:
        """The union of all members' vote splits, in order: held-out data every member is judged on alike."""
        self._check_setup()
        union = np.sort(np.concatenate([m["vote"] for m in self._members]))  # type: ignore[union-attr]
        if len(union) == 0:
            raise ValueError("no held-out data: data.splits gives the vote split 0; use e.g. splits=[0.8, 0.1, 0.1]")
        return self._eval_loader("holdout", self.train_set, union)

    def vote_dataloader(self, member: int) -> DataLoader:
        """Member ``member``'s own held-out vote split (judges other members' proposals)."""
        return self.member_dataloader(member, "vote")

    def _view(self, source: Source, parts: list, batch_size: int, *, train: bool, seeds: list[int] | None = None,
              as_dict: bool = False, rng_seed: int | None = None) -> Batches:
        return Batches(
            source, parts, batch_size, seeds,
            transform=self.train_transform if train else self.eval_transform,
            batch_transform=self.train_batch_transform if train else self.eval_batch_transform,
            collate_fn=self.collate_fn, seed=self.seed if rng_seed is None else rng_seed, as_dict=as_dict,
            cache_bytes=0 if train else self.cache_eval << 20, poisson=train and self.sampling == "poisson",
        )

    def _eval_loader(self, key: Any, source: Source, indices: np.ndarray) -> DataLoader:
        """An evaluation loader (in order, eval transforms), made once per key: its cache of read batches is kept."""
        if key not in self._eval_loaders:
            self._eval_loaders[key] = make_loader(self._view(source, [indices], self.eval_batch_size, train=False),
                                                  self.num_workers)
        return self._eval_loaders[key]

    def _has_eval_set(self) -> bool:
        return self.test_set is not None or self._eval_index is not None

    def _wrapped_loader(self, hook: str) -> Any:
        from lightning.pytorch.utilities.model_helpers import is_overridden

        if not is_overridden(hook, self._wrapped, L.LightningDataModule):
            return []
        return getattr(self._wrapped, hook)()

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


# ------------------------------------------------------------------ helpers
def _arguments(frame_locals: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in frame_locals.items() if k not in ("self", "__class__")}


def _primitive(name: str, value: Any) -> bool:
    if name in ("labels", "groups", "input_column", "dataset", "test_dataset"):  # per-sample lists stay out
        return isinstance(value, (str, type(None)))
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, _PRIMITIVE) for v in value)
    return isinstance(value, _PRIMITIVE)


def _check_arguments(args: dict[str, Any]) -> list[str]:
    """Every constructor argument checked at once; messages name the ``data.<field>``, the value and what is allowed."""
    errors = []
    dataset = args["dataset"]
    if isinstance(dataset, str) and dataset not in DATASETS:
        errors.append(f"data.dataset must be one of the presets {list(DATASETS)} or a data set object "
                      f"(tensors, a torch / torchvision / Hugging Face data set, a LightningDataModule), got {dataset!r}")
    if dataset is None:
        errors.append("data.dataset is None: give a preset name or a data set")
    for field, value, allowed in (("partition", args["partition"], PARTITIONS), ("stream", args["stream"], STREAMS),
                                  ("task", args["task"], TASKS), ("sampling", args["sampling"], SAMPLINGS)):
        if value not in allowed:
            errors.append(f"data.{field} must be one of {list(allowed)}, got {value!r}")
    for field, minimum in (("num_members", 1), ("batch_size", 1), ("labels_per_member", 1), ("shards_per_member", 1),
                           ("num_workers", 0), ("seed", 0), ("cache_eval", 0)):
        if not is_int_at_least(args[field], minimum):
            errors.append(f"data.{field} must be an int >= {minimum}, got {args[field]!r}")
    for field, minimum in (("eval_batch_size", 1), ("min_size", 0)):
        if args[field] is not None and not is_int_at_least(args[field], minimum):
            errors.append(f"data.{field} must be an int >= {minimum} or None, got {args[field]!r}")
    if args["max_train_samples"] is not None and not is_int_at_least(args["max_train_samples"], max(args["num_members"], 1)
                                                                     if isinstance(args["num_members"], int) else 1):
        errors.append(f"data.max_train_samples must be an int >= num_members ({args['num_members']}), got {args['max_train_samples']!r}")
    try:
        splits = tuple(float(s) for s in args["splits"])
    except (TypeError, ValueError):
        splits = ()
    if len(splits) != 3 or any(not s >= 0 for s in splits) or not np.isclose(sum(splits), 1.0) or splits[0] <= 0:
        errors.append(f"data.splits must be 3 fractions (train, vote, test) >= 0 summing to 1 with train > 0, got {args['splits']!r}")
    fraction = args["test_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        errors.append(f"data.test_fraction must be a number in [0, 1), got {fraction!r}")
    alpha = args["alpha"]
    if args["partition"] in ("dirichlet", "inner_dirichlet") and (
            isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf):
        errors.append(f"data.alpha must be a finite number > 0 for the {args['partition']} partition, got {alpha!r}")
    for flag in ("self_balancing", "in_memory"):
        if not isinstance(args[flag], bool):
            errors.append(f"data.{flag} must be True or False, got {args[flag]!r}")
    if args["partition"] == "sizes" and args["sizes"] is None:
        errors.append("data.sizes is needed by partition='sizes': one sample count (or fraction) per member")
    for field in ("train_transform", "eval_transform", "train_batch_transform", "eval_batch_transform", "collate_fn"):
        if args[field] is not None and not callable(args[field]):
            errors.append(f"data.{field} must be a callable or None, got {type(args[field]).__name__}")
    if isinstance(dataset, L.LightningDataModule) and args["test_dataset"] is not None:
        errors.append("data.test_dataset: a wrapped LightningDataModule evaluates on its own val/test loaders; drop test_dataset")
    return errors


def _check_choice(field: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"data.{field} must be one of {list(allowed)}, got {value!r}")


def _pair(value: Any, field: str) -> tuple[Any, Any]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{field} must be a pair (x, y) of tensors or arrays, got {type(value).__name__}")
    return tuple(value)  # type: ignore[return-value]


def _inputs(batch: Any) -> Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, Tensor):
        raise TypeError(f"the data set's inputs must collate into a tensor, got {type(x).__name__}: add a transform "
                        "(e.g. torchvision.transforms.ToTensor()) or a collate_fn")
    return x


def _align_classes(train: Source, test: Source) -> Source:
    """Code the test set's classes as the training set codes them (a string class must mean one index in both)."""
    if train.task != "classification" or test.task != "classification" or test.classes == train.classes:
        return test
    identity = train.classes == list(range(len(train.classes))) and test.classes == list(range(len(test.classes)))  # type: ignore[arg-type]
    if identity:  # integer classes on both sides: the union, as integers
        wider = train.classes if len(train.classes) >= len(test.classes) else test.classes  # type: ignore[arg-type]
        train.classes = test.classes = list(wider)  # type: ignore[arg-type]
        return test
    index = {c: k for k, c in enumerate(train.classes)}  # type: ignore[arg-type]
    # only the classes the test samples have: integer labels keep 0..max as classes, absent ones included
    present = [test.classes[k] for k in test.targets.unique().tolist()]  # type: ignore[index, union-attr]
    unknown = [c for c in present if c not in index]
    if unknown:
        raise ValueError(f"test_dataset has class {unknown[0]!r}, which the training set does not have "
                         f"(training classes: {train.classes})")
    remap = torch.tensor([index.get(c, -1) for c in test.classes], dtype=torch.long)  # type: ignore[union-attr]
    test._set_targets((remap[test.targets], list(train.classes), "classification"))  # type: ignore[arg-type, index]
    return test
