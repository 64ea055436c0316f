"""Batches of a partitioned source: one DataLoader item per step, reproducible from ``(seed, epoch, step)``.

Every loader a :class:`~lightning_colearn.data.CohortDataModule` hands out is an
ordinary ``torch.utils.data.DataLoader`` over :class:`Batches`, whose item
``(epoch, step)`` is a whole step's batch: every member's batch for the
per-member training stream (``{member: (x, y)}``), or one split's batch.

* Order: each part (a member's split) is shuffled by its own
  :class:`EpochShuffleSampler`, a pure function of ``(seed, epoch)``; Lightning
  sets the epoch (``StepSampler.set_epoch``), so a resumed run sees the batches
  of an uninterrupted one. A part shorter than the longest is cycled, as
  Lightning's ``CombinedLoader`` does in ``max_size_cycle`` mode.
* Gathering: a tensor source with no per-sample transform and no ``collate_fn`` gathers a step's rows
  of all members in one ``index_select`` and hands each member a slice (N small
  loaders cost ~0.1 ms each per step, as much as a stacked cohort's whole step
  for small models). Other sources read the step's samples in one call
  (``__getitems__`` when the data set has it) and collate each member's.
* Randomness: per-sample and per-batch transforms run with torch's generator
  seeded from ``(seed, epoch, step)``, so random augmentation is the same in
  every run, with any number of workers, and after a resume.

Examples:
    >>> import torch
    >>> from lightning_colearn.data.sources import TensorSource
    >>> source = TensorSource(torch.arange(10.0).unsqueeze(1), torch.arange(10))
    >>> batches = Batches(source, [torch.arange(0, 6), torch.arange(6, 10)], batch_size=4, seeds=[1, 2])
    >>> len(batches), [len(y) for _, y in batches[0, 1].values()]  # member 1's 4 samples: one batch, cycled
    (2, [2, 4])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_colearn.data.sources import Source, TensorSource

__all__ = ["Batches", "EpochShuffleSampler", "StepLoader", "StepSampler", "make_loader", "seeded"]


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
        return iter(self.order(self.epoch).tolist())

    def order(self, epoch: int) -> Tensor:
        """The epoch's permutation of ``range(num_samples)`` (the identity without shuffling)."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __len__(self) -> int:
        return self.num_samples


class StepSampler(Sampler[tuple[int, int]]):
    """``(epoch, step)`` for every step of an epoch; Lightning sets the epoch as for any sampler.

    :meth:`resume_at` makes the next pass over ``epoch`` start at ``step`` (a run resumed from a
    checkpoint taken inside an epoch continues with the batch it would have trained next).
    """

    def __init__(self, steps: int) -> None:
        self.steps, self.epoch = steps, 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, step: int) -> None:
        self._resume = (epoch, step)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # a generator: the epoch is read at the first batch, not when the DataLoader makes its iterator
        # (on resume Lightning makes the iterator before it sets the restored epoch)
        epoch, start = self.epoch, 0
        if self._resume is not None:
            resume, self._resume = self._resume, None
            if resume[0] == epoch and resume[1] < self.steps:  # (after an epoch's last batch: the next epoch, from 0)
                start = resume[1]
        for step in range(start, self.steps):
            yield epoch, step

    def __len__(self) -> int:
        return self.steps


@contextmanager
def seeded(seed: int):
    """Run a block with torch's CPU generator seeded to ``seed``, then restore its state.

    The default CPU generator directly: ``torch.manual_seed`` also seeds every
    accelerator and took ~0.2 ms here, this ~2 us.
    """
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed % (1 << 63))
    try:
        yield
    finally:
        generator.set_state(state)


class Batches(Dataset):
    """Item ``(epoch, step)``: batch ``step`` of every part (``{part: batch}``), or of the only part.

    Args:
        source: where the samples come from.
        parts: each part's indices into ``source`` (a member's split).
        batch_size: samples per part per step (a part's last batch may be smaller).
        seeds: each part's shuffle seed (``None``: keep the parts in order, as evaluation does).
        transform: applied to every input sample (train augmentation, eval preprocessing).
        batch_transform: applied to every batch's inputs, after collation.
        collate_fn: collates a list of ``(x, y)`` samples (default: ``default_collate``; tensor sources stack
            their rows directly unless one is given).
        seed: seeds the transforms' randomness, with the epoch and the step.
        as_dict: ``{part: batch}`` even for one part (the per-member training stream).
        poisson: Poisson sampling (what DP-SGD's accounting assumes, Abadi et al. 2016): each step every
            sample of a part joins its batch independently with probability ``batch_size / len(part)``,
            drawn from ``(seed, epoch, step)``; batch sizes vary (an empty batch is possible) and a part
            still has ``ceil(len(part) / batch_size)`` steps an epoch.
        cache_bytes: keep up to this many bytes of read batches of unshuffled parts (evaluation
            splits, read every round) instead of reading their samples again; only for sources
            read sample by sample (a tensor source's gather is already cheap), and only while
            transforms are deterministic, as evaluation transforms are.
    """

    def __init__(
        self,
        source: Source,
        parts: Sequence[Any],
        batch_size: int,
        seeds: Sequence[int] | None = None,
        *,
        transform: Callable | None = None,
        batch_transform: Callable | None = None,
        collate_fn: Callable | None = None,
        seed: int = 0,
        as_dict: bool = True,
        poisson: bool = False,
        cache_bytes: int = 0,
    ) -> None:
        self.source, self.batch_size = source, batch_size
        self.parts = [torch.as_tensor(np.asarray(p), dtype=torch.long) for p in parts]
        shuffle = seeds is not None
        self.samplers = [EpochShuffleSampler(len(p), s, shuffle) for p, s in zip(self.parts, seeds or [0] * len(self.parts))]
        self.lengths = [-(-len(p) // batch_size) for p in self.parts]
        self.transform, self.batch_transform, self.collate_fn = transform, batch_transform, collate_fn
        self.seed, self.as_dict, self.poisson = seed, as_dict, poisson
        # the fast path: one index_select for the whole step, each part a slice of it
        self.gather = isinstance(source, TensorSource) and transform is None and collate_fn is None
        self._order: tuple[int, list[Tensor]] | None = None
        self.cache_bytes = cache_bytes if not shuffle and not self.gather else 0
        self._cache: dict[int, Any] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return max(self.lengths, default=0)

    def _epoch_order(self, epoch: int) -> list[Tensor]:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, [p[s.order(epoch)] for s, p in zip(self.samplers, self.parts)])
        return self._order[1]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, step = key
        if step in self._cache:
            return self._cache[step]
        item = self._make(epoch, step)
        if self.cache_bytes:
            size = _nbytes(item)
            if self._cached_bytes + size <= self.cache_bytes:
                self._cache[step] = item
                self._cached_bytes += size
        return item

    def _make(self, epoch: int, step: int) -> Any:
        b = self.batch_size
        if self.poisson:
            index = [self._poisson(part, sampler.seed, epoch, step) for part, sampler in zip(self.parts, self.samplers)]
        else:
            index = [order[(step % n) * b:(step % n + 1) * b] for order, n in zip(self._epoch_order(epoch), self.lengths)]
        random = self.transform is not None or self.batch_transform is not None or not self.gather
        with seeded((self.seed * 1_000_003 + epoch) * 1_000_003 + step) if random else _nothing():
            batches = self._gather(index) if self.gather else self._read(index)
            if self.batch_transform is not None:
                batches = [_map_inputs(self.batch_transform, batch) for batch in batches]
        if self.as_dict:
            return dict(enumerate(batches))
        return batches[0]

    def _poisson(self, part: Tensor, seed: int, epoch: int, step: int) -> Tensor:
        generator = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + step) % (1 << 63))
        rate = min(1.0, self.batch_size / max(len(part), 1))
        return part[torch.rand(len(part), generator=generator) < rate]

    def _gather(self, index: list[Tensor]) -> list[Any]:
        sizes = [len(i) for i in index]
        xs, ys = self.source.batch(torch.cat(index))
        return list(zip(xs.split(sizes), ys.split(sizes)))

    def _read(self, index: list[Tensor]) -> list[Any]:
        if len(index) == 1:
            return [self.source.batch(index[0], self.transform, self.collate_fn)]
        return self.source.batches(index, self.transform, self.collate_fn)


@contextmanager
def _nothing():
    yield


def _map_inputs(transform: Callable, batch: Any) -> Any:
    if isinstance(batch, tuple) and batch:
        return (transform(batch[0]), *batch[1:])
    if isinstance(batch, list) and batch:
        return [transform(batch[0]), *batch[1:]]
    return transform(batch)


def _nbytes(item: Any) -> int:
    if isinstance(item, Tensor):
        return item.numel() * item.element_size()
    if isinstance(item, dict):
        return sum(_nbytes(v) for v in item.values())
    if isinstance(item, (tuple, list)):
        return sum(_nbytes(v) for v in item)
    return 64  # a Python object: small, counted so the cache cannot grow without bound


def _as_is(batch: Any) -> Any:
    return batch


class StepLoader(DataLoader):
    """A DataLoader over :class:`Batches` that Lightning can checkpoint and resume inside an epoch.

    Lightning saves ``state_dict()`` of every loader that has one with each checkpoint and hands it to
    ``load_state_dict`` before training resumes. The position is the trainer's count of the epoch's
    processed batches (``progress()``), not the batches this loader handed out: Lightning's fetcher
    (and DataLoader workers) read ahead, so those include batches not yet trained on.
    """

    def __init__(self, batches: Batches, num_workers: int = 0, progress: Callable[[], tuple[int, int]] | None = None) -> None:
        super().__init__(batches, batch_size=None, sampler=StepSampler(len(batches)), collate_fn=_as_is,
                         num_workers=num_workers, persistent_workers=num_workers > 0)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "step"}``: the epoch and how many of its batches the trainer has processed."""
        epoch, step = self.progress() if self.progress is not None else (self.sampler.epoch, 0)
        return {"epoch": int(epoch), "step": int(step)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        try:
            epoch, step = int(state["epoch"]), int(state["step"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"the checkpoint's training-loader state must be {{'epoch': int, 'step': int}}, got {state!r}") from err
        if not 0 <= step <= len(self.sampler) or epoch < 0:
            raise ValueError(f"the checkpoint's training-loader state {state!r} does not fit this loader "
                             f"(steps per epoch: {len(self.sampler)}): was it saved with other data or batch size?")
        self.sampler.resume_at(epoch, step)


def make_loader(batches: Batches, num_workers: int = 0, progress: Callable[[], tuple[int, int]] | None = None) -> DataLoader:
    """A DataLoader over ``batches``: one item per step, in step order, ``num_workers`` processes.

    With ``progress`` (the trainer's ``(epoch, processed batches)``) it is a resumable
    :class:`StepLoader` (the training loaders); without, an ordinary DataLoader.
    """
    if progress is not None:
        return StepLoader(batches, num_workers, progress)
    return DataLoader(batches, batch_size=None, sampler=StepSampler(len(batches)), collate_fn=_as_is,
                      num_workers=num_workers, persistent_workers=num_workers > 0)
