"""Scoring: batched forward passes and held-back metric updates give the per-batch values."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_colearn.metrics import scoring
from lightning_colearn.metrics.scoring import score, score_many, score_models


class Recorder(nn.Module):
    """A linear classifier that records the size of every batch it is given."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 4)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(4, 6, generator=torch.Generator().manual_seed(seed)))
        self.sizes: list[int] = []

    def forward(self, x):
        self.sizes.append(len(x))
        return self.linear(x)


def batches(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)) for n in sizes]


@torch.no_grad()
def by_batch(model, data, metric) -> float:
    """The metric updated once per loader batch, the way a validation loop does it."""
    metric = metric.clone()
    for x, y in data:
        metric.update(model(x), y)
    return float(metric.compute())


METRICS = [MulticlassAccuracy(num_classes=4, average="micro"), MulticlassF1Score(num_classes=4, average="macro")]


@pytest.mark.parametrize("metric", METRICS, ids=["accuracy", "f1"])
@pytest.mark.parametrize("held", [1, 50, 1 << 22], ids=["every-batch", "some-batches", "all-batches"])
def test_score_models_equals_a_per_batch_update(monkeypatch, metric, held):
    # a small budget flushes the held-back outputs several times in one pass; the value must not change
    monkeypatch.setattr(scoring, "UPDATE_ELEMENTS", held)
    data = batches([7, 30, 1, 12, 25])
    models = [Recorder(seed) for seed in range(3)]
    assert score_models(models, data, metric) == pytest.approx([by_batch(m, data, metric) for m in models], abs=1e-7)
    assert score_models(models, data, metric) == [score(m, data, metric) for m in models]


def test_score_many_forwards_large_batches_whole_and_concatenates_small_ones(monkeypatch):
    monkeypatch.setattr(scoring, "WHOLE_BATCH", 10)
    model = Recorder(0)
    sources = [batches([3, 4, 12, 2], seed=1), batches([5, 11, 3], seed=2)]
    metric = METRICS[0]
    values = score_many(model, sources, metric, chunk=16)
    # 3 + 4 queued, 12 alone (the 7 queued before it first), 2 + 5 queued, 11 alone, 3 at the end
    assert model.sizes == [7, 12, 7, 11, 3]
    assert values == pytest.approx([by_batch(model, s, metric) for s in sources], abs=1e-7)


def test_a_batch_larger_than_the_chunk_is_split_not_concatenated():
    model = Recorder(0)
    data = batches([300, 300])
    value = score_many(model, [data], METRICS[0], chunk=256)[0]
    assert model.sizes == [256, 44, 256, 44]
    assert value == pytest.approx(by_batch(model, data, METRICS[0]), abs=1e-7)


class PairMetric(Metric):
    """A metric whose model output is a pair (logits, auxiliary): it cannot be concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, output, target) -> None:
        logits, _ = output
        self.correct += (logits.argmax(1) == target).sum()
        self.total += len(target)

    def compute(self):
        return self.correct / self.total


class PairModel(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.inner = Recorder(seed)

    def forward(self, x):
        return self.inner(x), x.sum(1)


def test_outputs_that_are_not_tensors_update_the_metric_directly():
    data = batches([5, 9, 4])
    models = [PairModel(seed) for seed in range(2)]
    plain = [by_batch(m.inner, data, MulticlassAccuracy(num_classes=4, average="micro")) for m in models]
    assert score_models(models, data, PairMetric()) == pytest.approx(plain, abs=1e-7)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (3, " must be an (inputs, targets) pair, got int"),
        ((torch.randn(2, 6),), " must be an (inputs, targets) pair, got a tuple of 1"),
        ((torch.randn(2, 6), torch.tensor([0, 1]), 5), " must be an (inputs, targets) pair, got a tuple of 3"),
        ({"x": torch.randn(2, 6)}, " must be an (inputs, targets) pair, got dict"),
        ((torch.randn(2, 6), torch.tensor([0, 1, 2])), ": inputs hold 2 samples but targets 3"),
    ],
    ids=["int", "single", "triple", "dict", "lengths"],
)
def test_a_batch_that_is_not_an_inputs_targets_pair_is_named(batch, message):
    data = batches([4]) + [batch]  # the bad one second: the message says which
    with pytest.raises(ValueError, match=re.escape("evaluation batch 1" + message)):
        score_models([Recorder(0)], data, METRICS[0])
    with pytest.raises(ValueError, match=re.escape("batch 1 of held-out source 0" + message)):
        score(Recorder(0), data, METRICS[0])
