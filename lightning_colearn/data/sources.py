"""Data sources: any map-style data set as ``(input, target)`` samples, its labels found once.

:class:`~lightning_colearn.data.CohortDataModule` reads every data set, preset or
not, through one of two sources that :func:`as_source` picks:

* :class:`TensorSource`: inputs and targets held as tensors (``from_tensors``, a
  ``TensorDataset``, numeric Hugging Face columns, the MNIST presets). A batch is
  one ``index_select`` per tensor.
* :class:`SampleSource`: any other map-style data set (torchvision, a user's own
  ``Dataset``, a Hugging Face data set with image or text columns). A batch is
  its samples (one ``__getitems__`` call when the data set defines it, as
  PyTorch's DataLoader does), collated with ``collate_fn``.

Both serve ``(x, y)`` where ``y`` comes from the labels the source resolved
(:func:`find_labels`), so string labels arrive as class indices and ``labels=``
overrides what the samples carry. Labels are looked up without reading the
data: ``labels=`` (an array, a column or attribute name, or a callable applied
to each sample), else a ``targets`` / ``labels`` attribute or a Hugging Face
``label`` / ``labels`` column, else ``Subset`` / ``ConcatDataset`` parents; only
when none exists is every sample read, once, for its second item.

Classes: integer labels in ``[0, K)`` are kept as they are (``K = max + 1``);
any other labels (strings, negative or sparse integers, bools) are mapped to
``0..K-1`` in sorted order, and :attr:`Source.classes` maps them back.
Floating-point labels are regression targets (``task="auto"``), served as
float columns ``[B, k]`` (``k = 1`` for one value per sample: the shape a model with
``k`` outputs gives, so ``mse_loss`` and ``MeanSquaredError`` compare like with
like instead of broadcasting ``[B, 1]`` against ``[B]``); they cannot drive a
label-based partition.

Examples:
    >>> import torch
    >>> source = as_source((torch.randn(6, 3), ["cat", "dog", "cat", "eel", "dog", "cat"]))
    >>> source.task, source.classes, source.labels.tolist()
    ('classification', ['cat', 'dog', 'eel'], [0, 1, 0, 2, 1, 0])
    >>> x, y = source.batch(torch.tensor([1, 3]))
    >>> x.shape, y.tolist()
    (torch.Size([2, 3]), [1, 2])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, IterableDataset, Subset, TensorDataset, default_collate

__all__ = ["SampleSource", "Source", "TASKS", "TensorSource", "as_source", "find_labels", "resolve_targets", "to_memory"]

TASKS = ("auto", "classification", "regression")
#: Label attributes looked up on a data set (torchvision: ``targets``; SVHN and others: ``labels``).
LABEL_ATTRIBUTES = ("targets", "labels")
#: Hugging Face label columns looked up when ``labels=`` names none.
LABEL_COLUMNS = ("label", "labels")


class Source(Dataset):
    """What every source has: ``len``, per-sample ``(x, y)``, batches, and the labels the partitions read.

    Attributes:
        targets: what is served as ``y``: class indices (int64) for classification, float
            values for regression; ``None`` when the source has no labels (samples are then
            served as they come).
        classes: ``classes[k]`` is the original label of class ``k`` (``None`` without classes).
        task: ``"classification"``, ``"regression"`` or ``None`` (no labels).
    """

    targets: Tensor | None = None
    classes: list | None = None
    task: str | None = None

    @property
    def labels(self) -> Tensor | None:
        """Every sample's class index (int64), what label-based partitions read; ``None`` without classes."""
        return self.targets if self.task == "classification" else None

    def _set_targets(self, resolved: tuple[Tensor | None, list | None, str | None]) -> None:
        self.targets, self.classes, self.task = resolved

    def batch(self, index: Tensor, transform: Callable | None = None, collate_fn: Callable | None = None) -> Any:
        """The samples at ``index`` (a 1-D int64 tensor) as one batch, ``transform`` applied to each input."""
        raise NotImplementedError

    def batches(self, index: Sequence[Tensor], transform: Callable | None = None, collate_fn: Callable | None = None) -> list:
        """One batch per index tensor (a step's batch of every member)."""
        return [self.batch(i, transform, collate_fn) for i in index]

    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample's input."""
        raise NotImplementedError


class TensorSource(Source):
    """Inputs ``[N, ...]`` and targets ``[N, ...]`` held in memory; a batch is one ``index_select`` each.

    Floating-point inputs are stored in torch's default dtype (numpy and scikit-learn
    hand out float64, which the models' float32 weights would refuse); integer inputs
    (token ids) keep theirs.
    """

    def __init__(self, inputs: Any, targets: Any = None, *, task: str = "auto", classes: Sequence | None = None) -> None:
        inputs = _as_tensor(inputs, "inputs")
        if inputs.ndim == 0:
            raise ValueError(f"inputs must have one row per sample ([N, ...]), got a 0-d value {inputs!r}")
        if len(inputs) == 0:
            raise ValueError(f"the data set is empty: inputs of shape {tuple(inputs.shape)}")
        if inputs.ndim == 1:  # one value per sample is one feature: [N, 1], what a model with in_features=1 takes
            inputs = inputs.unsqueeze(1)
        self.inputs = inputs.to(torch.get_default_dtype()) if inputs.is_floating_point() else inputs
        if targets is None:
            raise ValueError("a tensor data set needs its targets: pass y (labels or regression values), one per row of x")
        self._set_targets(resolve_targets(targets, len(self.inputs), task=task, classes=classes, field="y"))

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.inputs[index], self.targets[index]  # type: ignore[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        # A ready batch; collate_batch passes it through. index_select, not inputs[index]: advanced indexing
        # of a [60000, 1, 28, 28] tensor took 1-8 ms for 64 rows on this project's CPU, index_select 0.01 ms.
        return self.batch(torch.as_tensor(indices, dtype=torch.long))

    def batch(self, index: Tensor, transform: Callable | None = None, collate_fn: Callable | None = None) -> Any:
        x = self.inputs.index_select(0, index)
        y = self.targets.index_select(0, index)  # type: ignore[union-attr]
        if collate_fn is not None:  # a user's collate_fn gets (x, y) samples, as a DataLoader would give it
            rows = x if transform is None else [transform(row) for row in x]
            return collate_fn(list(zip(rows, y)))
        if transform is not None:
            x = torch.stack([torch.as_tensor(transform(row)) for row in x])
        return x, y

    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])


class SampleSource(Source):
    """Any map-style data set, read sample by sample (or by ``__getitems__``), collated per batch.

    Args:
        dataset: the data set; its samples are ``(x, y, ...)`` sequences, mappings (with
            ``input_column``) or bare inputs.
        input_column: for mapping samples (Hugging Face rows, dict samples): the key of the
            input, or a list of keys whose values are concatenated into one feature vector.
        resolved: the labels :func:`find_labels` / :func:`resolve_targets` found (``None``: none).
    """

    def __init__(self, dataset: Any, input_column: str | Sequence[str] | None = None,
                 resolved: tuple[Tensor | None, list | None, str | None] | None = None) -> None:
        self.dataset = dataset
        self.input_column = input_column
        self._set_targets(resolved or (None, None, None))
        if self.targets is not None and len(self.targets) != len(dataset):
            raise ValueError(f"labels has {len(self.targets)} entries but the data set has {len(dataset)} samples")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self._sample(self.dataset[index], index, None)

    def input_shape(self) -> tuple[int, ...]:
        sample = self[0]
        x = sample[0] if isinstance(sample, tuple) else sample
        return tuple(torch.as_tensor(x).shape)

    def _input(self, sample: Any) -> Any:
        column = self.input_column
        if isinstance(sample, Mapping):
            if column is None:
                column = _only_input_key(sample)
            if isinstance(column, str):
                return sample[column]
            return torch.cat([torch.as_tensor(sample[c]).reshape(-1) for c in column]).to(torch.get_default_dtype())
        if column is not None:
            raise TypeError(f"input_column={column!r} needs samples that are mappings (dict rows), got {type(sample).__name__}")
        if isinstance(sample, (tuple, list)):
            return sample[0]
        return sample

    def _sample(self, sample: Any, index: int, transform: Callable | None) -> Any:
        x = self._input(sample)
        if transform is not None:
            x = transform(x)
        if self.targets is not None:
            return x, self.targets[index]
        if isinstance(sample, (tuple, list)) and len(sample) >= 2:
            return (x, *sample[1:])
        return x

    def samples(self, indices: list[int], transform: Callable | None = None) -> list:
        """The samples at ``indices`` as ``(x, y)`` (read in one ``__getitems__`` call when the data set has one)."""
        return [self._sample(s, i, transform) for s, i in zip(self._read(indices), indices)]

    def _read(self, indices: list[int]) -> list:
        getitems = getattr(self.dataset, "__getitems__", None)
        return getitems(indices) if getitems is not None else [self.dataset[i] for i in indices]

    def batch(self, index: Tensor, transform: Callable | None = None, collate_fn: Callable | None = None) -> Any:
        return self.batches([index], transform, collate_fn)[0]

    def batches(self, index: Sequence[Tensor], transform: Callable | None = None, collate_fn: Callable | None = None) -> list:
        flat = torch.cat(list(index))
        indices = flat.tolist()
        raw = self._read(indices)  # one read for the whole step
        cuts = np.cumsum([0] + [len(i) for i in index]).tolist()
        if collate_fn is not None or self.targets is None:
            samples = [self._sample(s, i, transform) for s, i in zip(raw, indices)]
            return [(collate_fn or _collate)(samples[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
        # Known labels: only the inputs go through collation, the targets are one index_select per batch
        # (per-sample target lookups and collating them cost as much as reading the samples).
        first = raw[0] if raw else None
        if (type(first) is tuple or type(first) is list) and self.input_column is None:
            xs = [sample[0] for sample in raw]
        else:
            xs = [self._input(sample) for sample in raw]
        if transform is not None:
            xs = [transform(x) for x in xs]
        ys = self.targets.index_select(0, flat)
        if not xs:  # every batch of the step is empty (Poisson sampling): one sample gives the inputs' shape
            xs = [self._input(self._read([0])[0])] if transform is None else [transform(self._input(self._read([0])[0]))]
            return [(default_collate(xs)[:0], ys[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
        shape = default_collate(xs[:1])[:0]
        return [(default_collate(xs[a:b]) if b > a else shape, ys[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


def to_memory(source: Source, num_workers: int = 0) -> TensorSource:
    """Every sample of ``source`` read once into a :class:`TensorSource` (the data set's own transforms run here, once).

    For data sets whose samples are the same on every read (no random augmentation inside the
    data set: give that to ``train_transform``, which then runs per batch row): training then
    gathers batches as tensor data does, instead of reading samples every step.

    Examples:
        >>> from torch.utils.data import TensorDataset
        >>> plain = as_source(torch.utils.data.Subset(TensorDataset(torch.randn(5, 2), torch.arange(5)), [4, 0]))
        >>> memory = to_memory(plain)
        >>> type(memory).__name__, memory.inputs.shape, memory.targets.tolist()
        ('TensorSource', torch.Size([2, 2]), [4, 0])
    """
    if isinstance(source, TensorSource):
        return source
    if source.targets is None:
        raise ValueError("data.in_memory needs the data set's labels (labels=...): its samples carry none to keep")
    loader = torch.utils.data.DataLoader(_Inputs(source), batch_size=512, num_workers=num_workers, collate_fn=_stack_inputs)
    inputs = torch.cat(list(loader))
    memory = TensorSource(inputs, source.targets, task=source.task or "auto")
    memory._set_targets((source.targets, source.classes, source.task))
    return memory


class _Inputs(Dataset):
    """A sample source's inputs only, as tensors (a class, not a closure: DataLoader workers pickle it)."""

    def __init__(self, source: SampleSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Tensor:
        return torch.as_tensor(self.source._input(self.source.dataset[index]))


def _stack_inputs(inputs: list[Tensor]) -> Tensor:
    shapes = {tuple(x.shape) for x in inputs}
    if len(shapes) > 1:
        raise ValueError(f"data.in_memory needs inputs of one shape to stack, got shapes {sorted(shapes)[:3]}; "
                         "leave in_memory off (or pad them in a transform)")
    return torch.stack(inputs)


# ------------------------------------------------------------------ building
def as_source(
    data: Any,
    *,
    labels: Any = None,
    input_column: str | Sequence[str] | None = None,
    task: str = "auto",
    num_workers: int = 0,
) -> Source:
    """The source for ``data``: a ``(x, y)`` pair of tensors/arrays, a tensor (with ``labels=``), or a map-style data set.

    Args:
        data: ``(x, y)``; a tensor/array ``x`` with ``labels=y``; a ``TensorDataset`` of
            ``(x, y)``; a Hugging Face ``datasets.Dataset``; any map-style ``torch`` data set.
        labels: the labels, overriding what :func:`find_labels` would find (see there).
        input_column: the input column(s) of mapping samples (Hugging Face rows).
        task: ``"auto"`` (floating labels: regression, others: classification),
            ``"classification"`` or ``"regression"``.
        num_workers: processes reading samples when labels must be read from every sample.
    """
    if task not in TASKS:
        raise ValueError(f"data.task must be one of {list(TASKS)}, got {task!r}")
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data, Dataset):
        x, y = data
        if labels is not None:
            raise ValueError("pass the labels once: as the y of (x, y), or as labels=..., not both")
        return TensorSource(x, y, task=task)
    if isinstance(data, (Tensor, np.ndarray)):
        return TensorSource(data, labels, task=task)
    if _is_hf_dataset_dict(data):
        raise TypeError(f"pick one split of the {type(data).__name__} (e.g. ds['train']); it has {list(data)}")
    if _is_hf_dataset(data):
        return _hf_source(data, labels, input_column, task)
    if isinstance(data, (IterableDataset, torch.utils.data.IterableDataset)) or _is_hf_iterable(data):
        raise TypeError(
            f"{type(data).__name__} is an iterable-style data set; a cohort needs a map-style data set "
            "(len() and [i]) to partition: load it into memory, or wrap it in a map-style Dataset"
        )
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise TypeError(
            f"the data set must be a preset name, (x, y) tensors or arrays, or a map-style data set "
            f"(with len() and [i]), got {type(data).__name__}"
        )
    if isinstance(data, TensorDataset) and len(data.tensors) == 2 and labels is None and input_column is None:
        return TensorSource(data.tensors[0], data.tensors[1], task=task)
    if len(data) == 0:
        raise ValueError(f"the data set {type(data).__name__} is empty")
    raw, classes = find_labels(data, labels, num_workers=num_workers)
    resolved = resolve_targets(raw, len(data), task=task, classes=classes) if raw is not None else None
    return SampleSource(data, input_column, resolved)


def find_labels(data: Any, labels: Any = None, *, num_workers: int = 0) -> tuple[Any, list | None]:
    """Every sample's label (an array-like, or ``None`` when the data set has none) and class names if known.

    Looked up in this order, reading samples only in the last case and then each once:
    ``labels`` (an array; a column or attribute name; a callable applied to each sample),
    a ``targets`` or ``labels`` attribute (through the data set's ``target_transform`` if it has one,
    as torchvision serves them), a Hugging Face ``label``/``labels`` column, the
    parents of a ``Subset`` or ``ConcatDataset``, else the second item of every sample.

    Examples:
        >>> from torch.utils.data import Subset, TensorDataset
        >>> base = TensorDataset(torch.zeros(4, 2), torch.tensor([3, 1, 2, 0]))
        >>> base.targets = base.tensors[1]
        >>> find_labels(Subset(base, [2, 0]))[0].tolist()
        [2, 3]
    """
    if labels is not None:
        if isinstance(labels, str):
            return _named_labels(data, labels)
        if callable(labels) and not isinstance(labels, (Tensor, np.ndarray)):
            return _read_labels(data, labels, num_workers), None
        return labels, None
    for name in LABEL_ATTRIBUTES:
        value = getattr(data, name, None)
        if value is not None and not callable(value) and _has_len(value):
            target_transform = getattr(data, "target_transform", None)
            if callable(target_transform):  # torchvision applies it to the label of every sample it serves
                return [target_transform(v) for v in _to_numpy(value).tolist()], None
            return value, _class_names(data)
    if _is_hf_dataset(data):
        for name in LABEL_COLUMNS:
            if name in data.column_names:
                return _named_labels(data, name)
        return None, None
    if isinstance(data, Subset):
        parent, names = find_labels(data.dataset, num_workers=num_workers)
        if parent is None:
            return None, None
        return _take(parent, np.asarray(data.indices, dtype=np.int64)), names
    if isinstance(data, ConcatDataset):
        parts = [find_labels(d, num_workers=num_workers) for d in data.datasets]
        if any(p is None for p, _ in parts):
            return None, None
        return np.concatenate([_to_numpy(p) for p, _ in parts]), parts[0][1]
    return _read_labels(data, _second_item, num_workers), None


def resolve_targets(
    raw: Any, n: int, *, task: str = "auto", classes: Sequence | None = None, field: str = "labels"
) -> tuple[Tensor, list | None, str]:
    """``(targets, classes, task)`` from raw labels: class indices for classification, floats for regression.

    Examples:
        >>> targets, classes, task = resolve_targets(["b", "a", "b"], 3)
        >>> targets.tolist(), classes, task
        ([1, 0, 1], ['a', 'b'], 'classification')
        >>> resolve_targets(np.array([0.5, 1.5]), 2)[2]
        'regression'
    """
    if task not in TASKS:
        raise ValueError(f"data.task must be one of {list(TASKS)}, got {task!r}")
    if raw is None:
        raise ValueError(f"{field} is None: this data set has no labels")
    values = _to_numpy(raw)
    if values.ndim == 0 or len(values) != n:
        seen = "a single value" if values.ndim == 0 else f"{len(values)} entries"
        raise ValueError(f"{field} has {seen} but the data set has {n} samples; give one label per sample")
    if values.dtype == object:
        _check_no_missing(values, field)
    regression = task == "regression" or (task == "auto" and (values.dtype.kind == "f" or values.ndim > 1))
    if regression:
        if values.dtype.kind not in "biuf":
            raise ValueError(f"regression targets must be numbers, got {field} of dtype {values.dtype}")
        targets = torch.as_tensor(values.astype(np.float64, copy=False)).to(torch.get_default_dtype()).reshape(n, -1)
        if not torch.isfinite(targets).all():
            bad = int((~torch.isfinite(targets)).reshape(len(targets), -1).any(1).nonzero()[0])
            raise ValueError(f"{field} has a non-finite regression target at sample {bad} ({values[bad]!r})")
        return targets, None, "regression"
    if values.ndim != 1:
        raise ValueError(f"class labels must be one per sample (1-D), got {field} of shape {values.shape}")
    codes, found = _class_codes(values, field)
    if classes is not None and len(classes) >= len(found) and found == list(range(len(found))):
        found = list(classes)  # integer codes with names for them (torchvision's .classes, Hugging Face ClassLabel)
    return torch.as_tensor(codes), found, "classification"


# ------------------------------------------------------------------ helpers
def _collate(samples: list) -> Any:
    """``default_collate``, but ``(x, y)`` samples give an ``(x, y)`` tuple, as a tensor source serves it
    (``default_collate`` turns tuples into lists; the per-member device transfer expects tuples)."""
    batch = default_collate(samples)
    return tuple(batch) if samples and isinstance(samples[0], tuple) and isinstance(batch, list) else batch


def _class_codes(values: np.ndarray, field: str) -> tuple[np.ndarray, list]:
    if values.dtype.kind in "iu" and len(values) and values.min() >= 0:
        # Integer labels in [0, K) stay as they are: class k is what the data set calls k.
        codes = values.astype(np.int64, copy=False)
        return codes, list(range(int(codes.max()) + 1))
    if values.dtype.kind == "f" and np.all(np.isfinite(values)) and np.all(values == np.round(values)) and (values >= 0).all():
        codes = values.astype(np.int64)  # task="classification" on whole-number floats (e.g. pandas columns)
        return codes, list(range(int(codes.max()) + 1)) if len(codes) else []
    try:
        found, codes = np.unique(values, return_inverse=True)
    except TypeError as err:  # mixed types that do not sort (e.g. 1 and "a")
        raise ValueError(f"{field} mixes labels that cannot be ordered ({err}); give labels of one type") from err
    return codes.astype(np.int64).reshape(-1), [v.item() if hasattr(v, "item") else v for v in found]


def _check_no_missing(values: np.ndarray, field: str) -> None:
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise ValueError(f"{field} is missing at sample {i} ({v!r}); every sample needs a label")


def _to_numpy(raw: Any) -> np.ndarray:
    if isinstance(raw, Tensor):
        return raw.detach().cpu().numpy()
    if isinstance(raw, np.ndarray):
        return raw
    values = list(raw)
    if values and isinstance(values[0], Tensor):
        return torch.stack([torch.as_tensor(v) for v in values]).numpy()
    array = np.asarray(values)
    if array.dtype.kind == "U" or (array.dtype == object and values and all(isinstance(v, str) for v in values)):
        return np.asarray(values, dtype=object)  # strings compare as Python strings (no fixed-width truncation)
    return array


def _take(labels: Any, index: np.ndarray) -> np.ndarray:
    return _to_numpy(labels)[index]


def _has_len(value: Any) -> bool:
    try:
        len(value)
    except TypeError:
        return False
    return not isinstance(value, (str, bytes))


def _class_names(data: Any) -> list | None:
    names = getattr(data, "classes", None)
    return list(names) if isinstance(names, (list, tuple)) and names else None


def _named_labels(data: Any, name: str) -> tuple[Any, list | None]:
    if _is_hf_dataset(data):
        if name not in data.column_names:
            raise ValueError(f"labels column {name!r} not in the data set's columns {list(data.column_names)}")
        feature = data.features[name]
        names = list(feature.names) if type(feature).__name__ == "ClassLabel" else None
        return np.asarray(data[name]), names
    value = getattr(data, name, None)
    if value is None or callable(value) or not _has_len(value):
        raise ValueError(f"labels={name!r}: the data set {type(data).__name__} has no attribute {name!r} holding one label per sample")
    return value, _class_names(data)


def _second_item(sample: Any) -> Any:
    if isinstance(sample, (tuple, list)) and len(sample) >= 2:
        return sample[1]
    if isinstance(sample, Mapping):  # dict samples: the key _only_input_key leaves out of the inputs
        return next((sample[k] for k in LABEL_COLUMNS if k in sample), _NO_LABEL)
    return _NO_LABEL


_NO_LABEL = object()


def _read_labels(data: Any, label_of: Callable[[Any], Any], num_workers: int) -> Any:
    """Read every sample once (``num_workers`` processes) and keep ``label_of(sample)``; ``None`` if samples carry none."""
    loader = torch.utils.data.DataLoader(data, batch_size=256, num_workers=num_workers, collate_fn=_LabelsOf(label_of))
    found: list = []
    for chunk in loader:
        found.extend(chunk)
    if any(v is _NO_LABEL for v in found[:1]):
        return None
    return [v.item() if isinstance(v, Tensor) and v.ndim == 0 else v for v in found]


class _LabelsOf:
    """Collate a batch of samples into their labels (a class, not a lambda: DataLoader workers pickle it)."""

    def __init__(self, label_of: Callable[[Any], Any]) -> None:
        self.label_of = label_of

    def __call__(self, samples: list) -> list:
        return [self.label_of(s) for s in samples]


def _only_input_key(sample: Mapping) -> str:
    keys = [k for k in sample if k not in LABEL_COLUMNS]
    if len(keys) != 1:
        raise ValueError(f"samples are mappings with keys {list(sample)}: name the input with input_column=... "
                         "(a key, or a list of keys to concatenate)")
    return keys[0]


def _as_tensor(value: Any, field: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{field} must be a tensor or an array of numbers, got {type(value).__name__}: {err}") from err
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{field} must be numbers (a tensor or a numeric array), got an array of dtype {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array))


def _is_hf_dataset(data: Any) -> bool:
    module = type(data).__module__ or ""
    return module.startswith("datasets.") and hasattr(data, "column_names") and hasattr(data, "features") and hasattr(data, "__len__")


def _is_hf_dataset_dict(data: Any) -> bool:
    module = type(data).__module__ or ""
    return module.startswith("datasets.") and type(data).__name__ in ("DatasetDict", "IterableDatasetDict")


def _is_hf_iterable(data: Any) -> bool:
    module = type(data).__module__ or ""
    return module.startswith("datasets.") and not hasattr(data, "__len__")


def _hf_source(ds: Any, labels: Any, input_column: str | Sequence[str] | None, task: str) -> Source:
    """A Hugging Face data set: numeric input columns are read into tensors once, others sample by sample."""
    columns = list(ds.column_names)
    raw, names = find_labels(ds, labels) if labels is not None or any(c in columns for c in LABEL_COLUMNS) else (None, None)
    label_column = labels if isinstance(labels, str) else next((c for c in LABEL_COLUMNS if c in columns), None)
    if input_column is None:
        rest = [c for c in columns if c != label_column]
        if len(rest) != 1:
            raise ValueError(f"name the input column(s) with input_column=...: the data set has columns {columns}")
        input_column = rest[0]
    wanted = [input_column] if isinstance(input_column, str) else list(input_column)
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise ValueError(f"input_column {missing[0]!r} is not a column of the data set; its columns are {columns}")
    if raw is None:
        raise ValueError(f"the Hugging Face data set has no label column ({' or '.join(LABEL_COLUMNS)}): "
                         f"pass labels='<column>' (columns: {columns})")
    resolved = resolve_targets(raw, len(ds), task=task, classes=names)
    if all(_numeric_feature(ds.features[c]) for c in wanted):
        table = ds.with_format("torch", columns=wanted)[:]
        parts = [table[c] for c in wanted]
        if all(isinstance(p, Tensor) for p in parts):
            x = parts[0] if isinstance(input_column, str) else torch.cat([p.reshape(len(p), -1).to(torch.get_default_dtype()) for p in parts], 1)
            source = TensorSource(x, resolved[0], task=resolved[2])
            source._set_targets(resolved)
            return source
    return SampleSource(ds, input_column, resolved)


def _numeric_feature(feature: Any) -> bool:
    kind = type(feature).__name__
    if kind == "Value":
        return feature.dtype not in ("string", "large_string", "binary", "large_binary")
    if kind == "ClassLabel":
        return True
    if kind in ("Sequence", "List", "LargeList"):
        inner = getattr(feature, "feature", None)
        return inner is not None and _numeric_feature(inner)
    return kind.startswith("Array")
