"""Tests for lightning_colearn.data.sources and .loaders in isolation: every data kind, labels, bad inputs, batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

from lightning_colearn.data.loaders import Batches, EpochShuffleSampler, make_loader
from lightning_colearn.data.sources import SampleSource, TensorSource, as_source

datasets = pytest.importorskip("datasets")


# ------------------------------------------------------------------ data sets a user might write
class PairDataset(Dataset):
    """``(x, y)`` samples through ``__getitem__`` only."""

    def __init__(self, x, y) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class BatchReadDataset(PairDataset):
    """Also ``__getitems__`` (a whole batch in one call, as PyTorch's DataLoader uses it); records every call."""

    def __init__(self, x, y) -> None:
        super().__init__(x, y)
        self.calls: list[list[int]] = []

    def __getitems__(self, indices):
        self.calls.append(list(indices))
        return [self[i] for i in indices]


class Unreadable(Dataset):
    """Labels in ``targets`` (and names in ``classes``); reading a sample fails the test."""

    def __init__(self, targets, classes=None) -> None:
        self.targets = targets
        if classes is not None:
            self.classes = classes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        raise AssertionError("the labels must be found without reading a sample")


class BareInputs(Dataset):
    """Samples that are bare input tensors: no labels anywhere."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i):
        return torch.full((2,), float(i))


class DictSamples(Dataset):
    """Mapping samples with two inputs and a ``label`` key."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i):
        return {"a": torch.tensor([float(i)]), "b": torch.tensor([-float(i)]), "label": i % 3}


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from ((torch.zeros(2), 0) for _ in range(4))


def _x(n: int = 12, d: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _everything(source) -> tuple[torch.Tensor, torch.Tensor]:
    return source.batch(torch.arange(len(source)))


# ------------------------------------------------------------------ data kinds
def test_tensor_pair_is_a_tensor_source_serving_the_same_rows():
    x, y = _x(), torch.arange(12) % 4
    source = as_source((x, y))
    assert isinstance(source, TensorSource) and source.task == "classification" and source.classes == [0, 1, 2, 3]
    bx, by = source.batch(torch.tensor([5, 0, 11]))
    assert torch.equal(bx, x[[5, 0, 11]]) and torch.equal(by, y[[5, 0, 11]])
    assert source.input_shape() == (3,)


def test_numpy_float64_inputs_become_float32_and_token_ids_stay_int64():
    x64 = np.random.default_rng(0).normal(size=(10, 4))
    source = as_source((x64, np.arange(10) % 2))
    assert isinstance(source, TensorSource) and source.inputs.dtype == torch.float32
    torch.testing.assert_close(_everything(source)[0], torch.from_numpy(x64).float())
    tokens = np.random.default_rng(1).integers(0, 50, size=(10, 7))
    source = as_source(tokens, labels=np.arange(10) % 2)  # an array x with labels=
    x, y = _everything(source)
    assert x.dtype == torch.int64 and torch.equal(x, torch.from_numpy(tokens)) and y.tolist() == [0, 1] * 5


def test_tensor_dataset_is_a_tensor_source():
    x, y = _x(), torch.arange(12) % 3
    source = as_source(TensorDataset(x, y))
    assert isinstance(source, TensorSource)
    bx, by = _everything(source)
    assert torch.equal(bx, x) and torch.equal(by, y)


def test_plain_dataset_is_read_sample_by_sample_with_labels_from_its_samples():
    x, y = _x(), [int(v) for v in torch.arange(12) % 3]
    source = as_source(PairDataset(x, y))
    assert isinstance(source, SampleSource) and source.labels.tolist() == y and source.classes == [0, 1, 2]
    bx, by = source.batch(torch.tensor([4, 2, 9]))
    assert torch.equal(bx, x[[4, 2, 9]]) and by.tolist() == [y[4], y[2], y[9]]
    assert source.input_shape() == (3,)


def test_getitems_reads_a_whole_step_of_every_part_in_one_call():
    data = BatchReadDataset(_x(20), [i % 2 for i in range(20)])
    source = as_source(data)
    data.calls.clear()  # finding the labels read every sample once
    parts = [np.arange(0, 8), np.arange(8, 14), np.arange(14, 20)]
    batches = Batches(source, parts, batch_size=4, seeds=[1, 2, 3])
    step = batches[0, 1]
    assert len(data.calls) == 1  # every member's samples of step 1, in one call
    assert [len(y) for _, y in step.values()] == [4, 2, 2]
    assert len(data.calls[0]) == 8 and len(set(data.calls[0])) == 8
    served = torch.cat([bx for bx, _ in step.values()])
    assert torch.equal(served, data.x[data.calls[0]])
    Batches(source, [np.arange(20)], batch_size=5, seeds=[0], as_dict=False)[0, 0]  # one part: one call too
    assert len(data.calls) == 2 and len(data.calls[1]) == 5


def test_fake_data_labels_are_read_from_its_samples():
    torchvision = pytest.importorskip("torchvision")
    fake = torchvision.datasets.FakeData(size=10, image_size=(3, 8, 8), num_classes=4,
                                         transform=torchvision.transforms.ToTensor())
    source = as_source(fake)
    assert isinstance(source, SampleSource)
    assert source.targets.tolist() == [fake[i][1] for i in range(10)]
    x, y = source.batch(torch.tensor([3, 7]))
    assert x.shape == (2, 3, 8, 8) and torch.equal(x[1], fake[7][0]) and y.tolist() == [fake[3][1], fake[7][1]]


def test_subset_and_concat_take_their_parents_labels_without_reading_samples():
    parent = Unreadable(torch.tensor([3, 1, 2, 0, 1]), classes=["a", "b", "c", "d"])
    subset = as_source(Subset(parent, [4, 0, 2]))
    assert isinstance(subset, SampleSource)
    assert subset.labels.tolist() == [1, 3, 2] and subset.classes == ["a", "b", "c", "d"]
    concat = as_source(ConcatDataset([Unreadable([0, 1]), Unreadable(np.array([2, 2, 1]))]))
    assert concat.labels.tolist() == [0, 1, 2, 2, 1] and concat.classes == [0, 1, 2]
    nested = as_source(Subset(ConcatDataset([parent, Unreadable([4, 4])]), [5, 1]))
    assert nested.labels.tolist() == [4, 1]


def test_label_attribute_goes_through_the_target_transform_as_torchvision_samples_do():
    data = Unreadable(torch.tensor([0, 1, 2, 3, 4]), classes=["a", "b", "c", "d", "e"])
    data.target_transform = lambda y: "even" if y % 2 == 0 else "odd"  # a torchvision data set's target_transform
    source = as_source(data)
    assert source.classes == ["even", "odd"] and source.labels.tolist() == [0, 1, 0, 1, 0]


def test_hf_numeric_vector_column_is_a_tensor_source():
    rows = _x(8, 5)
    ds = datasets.Dataset.from_dict({"features": rows.tolist(), "label": [0, 1, 2, 0, 1, 2, 0, 1]})
    source = as_source(ds)
    assert isinstance(source, TensorSource)
    x, y = _everything(source)
    torch.testing.assert_close(x, rows)
    assert x.dtype == torch.float32 and y.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]


def test_hf_numeric_columns_are_concatenated_in_the_order_given():
    ds = datasets.Dataset.from_dict({"a": [1.0, 2.0, 3.0], "b": [[10, 11], [20, 21], [30, 31]], "c": [7, 8, 9],
                                     "label": [1, 0, 1]})
    source = as_source(ds, input_column=["b", "a"])
    assert isinstance(source, TensorSource)
    x, _ = _everything(source)
    assert x.tolist() == [[10, 11, 1], [20, 21, 2], [30, 31, 3]] and x.dtype == torch.float32


def test_hf_string_label_column_keeps_its_classes():
    ds = datasets.Dataset.from_dict({"x": [[0.0], [1.0], [2.0], [3.0]], "label": ["dog", "cat", "dog", "ant"]})
    source = as_source(ds)
    assert source.classes == ["ant", "cat", "dog"] and source.labels.tolist() == [2, 1, 2, 0]


def test_hf_class_label_names_become_the_classes():
    features = datasets.Features({"x": datasets.Sequence(datasets.Value("float32")),
                                  "label": datasets.ClassLabel(names=["zebra", "ant", "moth"])})
    ds = datasets.Dataset.from_dict({"x": [[0.0], [1.0], [2.0]], "label": [2, 0, 1]}, features=features)
    source = as_source(ds)
    assert source.classes == ["zebra", "ant", "moth"] and source.labels.tolist() == [2, 0, 1]


@pytest.mark.parametrize("column", [["short", "a longer text", "mid"], [[1, 2], [3, 4, 5], [6]]], ids=["text", "ragged"])
def test_hf_text_or_ragged_column_is_read_sample_by_sample(column):
    ds = datasets.Dataset.from_dict({"input": column, "label": [1, 0, 1]})
    source = as_source(ds)
    assert isinstance(source, SampleSource) and source.labels.tolist() == [1, 0, 1]
    x, y = source[1]
    assert x == column[1] and y.item() == 0
    batch = source.batch(torch.tensor([0, 2]), collate_fn=lambda samples: [list(s) for s in zip(*samples)])
    assert batch[0] == [column[0], column[2]]


def test_dict_samples_take_the_input_column_and_their_label_key():
    source = as_source(DictSamples(), input_column="b")
    assert source.labels.tolist() == [0, 1, 2, 0, 1, 2]
    x, y = source.batch(torch.tensor([4, 5]))
    assert x.tolist() == [[-4.0], [-5.0]] and y.tolist() == [1, 2]
    x, _ = as_source(DictSamples(), input_column=["a", "b"]).batch(torch.tensor([2]))
    assert x.tolist() == [[2.0, -2.0]]


def test_samples_without_labels_are_served_as_they_come():
    source = as_source(BareInputs())
    assert source.targets is None and source.labels is None and source.task is None
    assert torch.equal(source.batch(torch.tensor([1, 3])), torch.tensor([[1.0, 1.0], [3.0, 3.0]]))


# ------------------------------------------------------------------ labels
def test_labels_array_overrides_the_samples_own():
    source = as_source(PairDataset(_x(4), [0, 0, 0, 0]), labels=np.array(["b", "a", "b", "c"]))
    assert source.classes == ["a", "b", "c"] and source.labels.tolist() == [1, 0, 1, 2]
    assert source.batch(torch.tensor([3]))[1].tolist() == [2]


def test_labels_by_attribute_name():
    data = Unreadable([0, 0, 0])
    data.coarse = ["x", "y", "x"]
    source = as_source(data, labels="coarse")
    assert source.classes == ["x", "y"] and source.labels.tolist() == [0, 1, 0]


def test_labels_by_callable_on_each_sample():
    x = _x(6)
    source = as_source(PairDataset(x, list(range(6))), labels=lambda sample: "pos" if sample[0][0] > 0 else "neg")
    assert source.labels.tolist() == [int(v > 0) for v in x[:, 0]] and source.classes == ["neg", "pos"]


def test_string_labels_are_sorted_classes_served_as_indices():
    source = as_source(PairDataset(_x(5), ["pear", "apple", "fig", "apple", "pear"]))
    assert source.classes == ["apple", "fig", "pear"] and source.task == "classification"
    assert source.batch(torch.arange(5))[1].tolist() == [2, 0, 1, 0, 2]


def test_negative_and_sparse_int_labels_are_mapped():
    source = as_source((_x(5), torch.tensor([-1, 7, 7, 3, -1])))
    assert source.classes == [-1, 3, 7] and source.labels.tolist() == [0, 2, 2, 1, 0]
    sparse = as_source((_x(3), np.array([10, 20, 10])))  # non-negative: kept as they are, K = max + 1
    assert sparse.labels.tolist() == [10, 20, 10] and len(sparse.classes) == 21


def test_float_labels_are_regression_targets_one_column_per_sample():
    y = torch.tensor([0.5, -1.25, 3.0, 2.0])
    source = as_source((_x(4), y))
    assert source.task == "regression" and source.labels is None and source.classes is None
    _, by = source.batch(torch.tensor([1, 2]))
    assert by.shape == (2, 1) and by.dtype == torch.float32 and by[:, 0].tolist() == [-1.25, 3.0]
    sample = as_source(PairDataset(_x(4), y.tolist()))
    assert sample.task == "regression" and sample.batch(torch.tensor([0, 3]))[1].tolist() == [[0.5], [2.0]]


def test_task_forces_classification_on_whole_floats_and_regression_on_ints():
    forced = as_source((_x(4), np.array([2.0, 0.0, 1.0, 2.0])), task="classification")
    assert forced.task == "classification" and forced.labels.tolist() == [2, 0, 1, 2] and forced.labels.dtype == torch.int64
    regression = as_source((_x(4), torch.tensor([2, 0, 1, 2])), task="regression")
    assert regression.task == "regression" and regression.targets.tolist() == [[2.0], [0.0], [1.0], [2.0]]


# ------------------------------------------------------------------ bad inputs
def _hf(columns):
    return datasets.Dataset.from_dict(columns)


BAD_INPUTS = {
    "torch_iterable": (lambda: Stream(), {}, TypeError, r"Stream is an iterable-style data set.*map-style"),
    "hf_iterable": (lambda: _hf({"x": [[1.0]], "label": [0]}).to_iterable_dataset(), {}, TypeError,
                    r"IterableDataset is an iterable-style data set"),
    "hf_dataset_dict": (lambda: datasets.DatasetDict({"train": _hf({"x": [[1.0]], "label": [0]})}), {}, TypeError,
                        r"pick one split of the DatasetDict.*\['train'\]"),
    "labels_wrong_length": (lambda: (_x(4), [0, 1, 0]), {}, ValueError, r"y has 3 entries but the data set has 4 samples"),
    "labels_array_wrong_length": (lambda: PairDataset(_x(4), [0] * 4), {"labels": [0, 1]}, ValueError,
                                  r"labels has 2 entries but the data set has 4"),
    "none_in_labels": (lambda: (_x(3), ["a", None, "b"]), {}, ValueError, r"y is missing at sample 1 \(None\)"),
    "none_in_samples": (lambda: PairDataset(_x(3), [1, 0, None]), {}, ValueError, r"labels is missing at sample 2"),
    "unorderable_labels": (lambda: (_x(3), [1, "a", 2]), {}, ValueError, r"y mixes labels that cannot be ordered"),
    "nan_target": (lambda: (_x(3), [0.5, float("nan"), 1.0]), {}, ValueError, r"non-finite regression target at sample 1"),
    "inf_target": (lambda: (_x(3), torch.tensor([0.5, 1.0, float("inf")])), {}, ValueError,
                   r"non-finite regression target at sample 2"),
    "string_x": (lambda: (np.array(["a", "b"]), [0, 1]), {}, ValueError, r"inputs must be numbers.*dtype <U1"),
    "object_x": (lambda: ([[1.0], "b"], [0, 1]), {}, ValueError, r"inputs must be"),
    "empty_dataset": (lambda: PairDataset([], []), {}, ValueError, r"the data set PairDataset is empty"),
    "empty_tensors": (lambda: (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), {}, ValueError, r"empty"),
    "hf_without_labels": (lambda: _hf({"x": [[1.0], [2.0]]}), {}, ValueError,
                          r"no label column \(label or labels\): pass labels='<column>'"),
    "hf_missing_label_column": (lambda: _hf({"x": [[1.0], [2.0]], "y": [0, 1]}), {"labels": "target"}, ValueError,
                                r"labels column 'target' not in the data set's columns \['x', 'y'\]"),
    "hf_missing_input_column": (lambda: _hf({"x": [[1.0], [2.0]], "label": [0, 1]}), {"input_column": "pixels"},
                                ValueError, r"input_column 'pixels' is not a column.*\['x', 'label'\]"),
    "hf_ambiguous_input": (lambda: _hf({"x": [[1.0]], "z": [[2.0]], "label": [0]}), {}, ValueError,
                           r"name the input column\(s\) with input_column=.*\['x', 'z', 'label'\]"),
    "dict_samples_ambiguous": (lambda: DictSamples(), {}, ValueError,
                               r"keys \['a', 'b', 'label'\]: name the input with input_column"),
    "input_column_on_pairs": (lambda: PairDataset(_x(2), [0, 1]), {"input_column": "x"}, TypeError,
                              r"input_column='x' needs samples that are mappings"),
    "missing_label_attribute": (lambda: Unreadable([0, 1]), {"labels": "fine"}, ValueError,
                                r"labels='fine': the data set Unreadable has no attribute 'fine'"),
    "task_nonsense": (lambda: (_x(2), [0, 1]), {"task": "nonsense"}, ValueError,
                      r"data.task must be one of \['auto', 'classification', 'regression'\], got 'nonsense'"),
    "not_a_dataset": (lambda: 42, {}, TypeError, r"map-style data set \(with len\(\) and \[i\]\), got int"),
}


@pytest.mark.parametrize("make,kwargs,error,match", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_are_refused_naming_what_is_wrong(make, kwargs, error, match):
    data = make()
    with pytest.raises(error, match=match):
        source = as_source(data, **kwargs)
        source.batch(torch.tensor([0]))  # dict samples are only read when served


def test_regression_needs_numbers():
    with pytest.raises(ValueError, match=r"regression targets must be numbers, got y of dtype object"):
        as_source((_x(2), ["a", "b"]), task="regression")


# ------------------------------------------------------------------ loaders
def _loop_oracle(dataset, parts, seeds, batch_size, epoch):
    """What one shuffled DataLoader per member, cycled to the longest (max_size_cycle), yields: step by step."""
    per_member = []
    for part, seed in zip(parts, seeds):
        sampler = EpochShuffleSampler(len(part), seed)
        sampler.set_epoch(epoch)
        loader = DataLoader(Subset(dataset, part.tolist()), batch_size=batch_size, sampler=sampler)
        per_member.append([tuple(batch) for batch in loader])  # default_collate gives [x, y]; sources give (x, y)
    steps = max(len(b) for b in per_member)
    return [{i: b[step % len(b)] for i, b in enumerate(per_member)} for step in range(steps)]


def _assert_same_steps(got, expected):
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected)):
        assert a.keys() == b.keys(), step
        for i in a:
            assert type(a[i]) is type(b[i]) is tuple, (step, i, type(a[i]), type(b[i]))
            torch.testing.assert_close(a[i], b[i], rtol=0, atol=0, msg=lambda m: f"step {step} member {i}: {m}")


@pytest.mark.parametrize("epoch", [0, 3])
def test_per_member_batches_equal_one_loader_per_member_cycled(epoch):
    x, y = _x(23, 2, seed=4), [i % 3 for i in range(23)]
    data = PairDataset(x, y)
    source = as_source(data)
    assert isinstance(source, SampleSource)
    parts = [np.arange(0, 11), np.arange(11, 15), np.arange(15, 23)]  # 3, 1 and 2 batches of 4
    seeds = [5, 6, 7]
    batches = Batches(source, parts, batch_size=4, seeds=seeds)
    assert len(batches) == 3
    got = [batches[epoch, step] for step in range(len(batches))]
    _assert_same_steps(got, _loop_oracle(data, parts, seeds, 4, epoch))


def test_tensor_fast_path_gives_the_sample_paths_batches():
    x, y = _x(30, 3, seed=2), torch.arange(30) % 4
    fast = as_source(TensorDataset(x, y))
    slow = as_source(PairDataset(x, y))
    assert isinstance(fast, TensorSource) and isinstance(slow, SampleSource)
    parts = [np.arange(0, 17), np.arange(17, 30)]
    a, b = (Batches(s, parts, batch_size=5, seeds=[1, 2]) for s in (fast, slow))
    assert a.gather and not b.gather
    for epoch in (0, 1):
        _assert_same_steps([a[epoch, s] for s in range(len(a))], [b[epoch, s] for s in range(len(b))])
    shared_a, shared_b = (Batches(s, [np.arange(30)], batch_size=7, seeds=[9], as_dict=False) for s in (fast, slow))
    for step in range(len(shared_a)):
        assert type(shared_a[1, step]) is type(shared_b[1, step]) is tuple
        torch.testing.assert_close(shared_a[1, step], shared_b[1, step], rtol=0, atol=0)


class AddNoise:
    """A random per-sample augmentation (a class: DataLoader workers may pickle it)."""

    def __call__(self, x):
        return x + torch.rand(x.shape)


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_random_transforms_are_a_function_of_seed_epoch_and_step_with_any_workers():
    x, y = _x(16, 2, seed=1), torch.arange(16) % 2
    parts = [np.arange(0, 8), np.arange(8, 16)]

    def loader(source, workers):
        return make_loader(Batches(source, parts, batch_size=4, seeds=[1, 2], transform=AddNoise(), seed=11), workers)

    in_process = _epoch(loader(as_source((x, y)), 0), 0)
    again = _epoch(loader(as_source(PairDataset(x, y)), 0), 0)  # the sample path draws the same noise
    _assert_same_steps(again, in_process)
    workers = loader(as_source((x, y)), 2)
    _assert_same_steps(_epoch(workers, 0), in_process)
    later = _epoch(workers, 1)
    assert not any(torch.equal(a[i][0], b[i][0]) for a, b in zip(in_process, later) for i in a)
    for batch in in_process:  # noise was added: inputs are near, not equal to, the rows
        for i, (bx, _) in batch.items():
            assert not any(torch.equal(row, r) for row in bx for r in x)

    # torch's global generator is left as it was (a DataLoader's iterator draws its own base seed, so look at Batches)
    batches = loader(as_source(PairDataset(x, y)), 0).dataset
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    _assert_same_steps([batches[0, step] for step in range(len(batches))], in_process)
    assert torch.equal(torch.rand(3), expected)


def test_batch_transform_changes_inputs_only():
    x, y = _x(8, 2), torch.arange(8) % 2
    for source in (as_source((x, y)), as_source(PairDataset(x, y))):
        plain = Batches(source, [np.arange(8)], batch_size=4, seeds=[3], as_dict=False)
        scaled = Batches(source, [np.arange(8)], batch_size=4, seeds=[3], as_dict=False, batch_transform=lambda b: b * 10)
        for step in range(2):
            (px, py), (sx, sy) = plain[0, step], scaled[0, step]
            torch.testing.assert_close(sx, px * 10)
            assert torch.equal(sy, py)
