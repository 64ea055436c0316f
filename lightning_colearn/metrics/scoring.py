"""Score one model on held-out data with a torchmetrics metric (votes, swarm fitness, consensus).

:func:`score_many` scores one model on several learners' data sets at once:
their batches are concatenated into chunks of about ``chunk`` samples, so a
vote over five small vote splits is a few large forward passes instead of
many small ones (each learner's metric still sees only its own samples). This
relies on the model treating samples independently in eval mode, as
classifiers do (BatchNorm uses its running statistics there). Forward passes
of a convolutional model never exceed :data:`CHUNK` samples, the batch size
that is fastest per sample; other models take up to :data:`DENSE_CHUNK` (see
:func:`chunk_size`). A batch of :data:`WHOLE_BATCH` samples or more is
forwarded as it is, never copied into a chunk. Metrics are updated over
several batches at once (up to :data:`UPDATE_ELEMENTS` held-back outputs), as
the value of a torchmetrics metric does not depend on how its samples were
split into updates.

Examples:
    >>> import torch
    >>> from torchmetrics.classification import MulticlassAccuracy
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(4, 3)
    >>> data = [[(torch.randn(8, 4), torch.randint(0, 3, (8,)))] for _ in range(2)]
    >>> acc = MulticlassAccuracy(num_classes=3, average="micro")
    >>> score_many(model, data, acc) == [score(model, d, acc) for d in data]
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn
from torchmetrics import Metric

__all__ = ["CHUNK", "DENSE_CHUNK", "chunk_size", "score", "score_many", "score_models"]

#: Samples per forward pass when scoring a convolutional model. Measured on this project's 2-core CPU
#: (eval mode, no_grad): ConvNet and ColearnConvNet cost ~0.037 / ~0.094 ms per sample at 128-512
#: samples but about twice that at 1,000-2,000 (their feature maps, 23 KB per sample and up, fall out
#: of cache); ``score_models`` of 3 ConvNets on 1,000 digits: 111 ms in chunks of 256, 120 of 512, 175 whole.
CHUNK = 256
#: Samples per forward pass for a model without convolutions, whose activations are a few hundred
#: floats per sample: splitting only adds passes. ``score_models`` of 10 MLPs (784-128-10) on 1,000
#: digits, same CPU, median of 15: 23.6 ms in chunks of 256, 21.5 of 512, 20.1 whole.
DENSE_CHUNK = 2048
#: Batches of at least this many samples are forwarded as they come: concatenating them would copy
#: their inputs for no faster pass. Same CPU, an MLP scored on Fashion-MNIST's 10,000 test images in
#: batches of 1,000: 16.1 ms when they were concatenated into chunks of ~2,048, 12.8 ms for the passes alone.
WHOLE_BATCH = 256
#: Model outputs held back before the metrics are updated, in elements over all pending outputs: each
#: metric then gets one ``update`` over several batches instead of one per batch (torchmetrics
#: metrics accumulate over updates, so the value is the same). 10 accuracies over 10 batches of 1,000
#: (10 classes): 8.6 ms updated per batch, 3.5 ms per metric; 2**22 elements hold 16 MB of fp32 logits.
UPDATE_ELEMENTS = 1 << 22


def chunk_size(model: nn.Module) -> int:
    """Samples per scoring forward pass for ``model``: :data:`CHUNK` if it has a convolution, else :data:`DENSE_CHUNK`.

    Examples:
        >>> from lightning_colearn.models import MLP, ConvNet
        >>> chunk_size(MLP()), chunk_size(ConvNet())
        (2048, 256)
    """
    convolutional = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return CHUNK if convolutional else DENSE_CHUNK


# Clones of each criterion, reused (reset) from call to call: deep-copying a torchmetrics metric costs
# ~2 ms, a fifth of a whole vote on small vote splits. Weak keys: a criterion's clones go with it.
_CLONES: WeakKeyDictionary[Metric, list[Metric]] = WeakKeyDictionary()


def _fresh_clones(metric: Metric, n: int, device: torch.device) -> list[Metric]:
    pool = _CLONES.setdefault(metric, [])
    while len(pool) < n:
        clone = metric.clone()
        # A score is one process's business (under DDP each rank scores its own members, and the ranks
        # then exchange the floats): never a collective inside compute(), which only one rank would call.
        clone.distributed_available_fn = _local_only
        pool.append(clone)
    clones = pool[:n]
    for m in clones:
        m.reset()
    return [m if m.device == device else m.to(device) for m in clones]  # .to() walks every state: ~0.2 ms each


def _local_only() -> bool:
    return False


class _Updates:
    """Metric updates held back and applied per metric over several batches at once (see :data:`UPDATE_ELEMENTS`)."""

    def __init__(self, metrics: Sequence[Metric]) -> None:
        self.metrics = metrics
        self.outputs: list[list[Tensor]] = [[] for _ in metrics]
        self.targets: list[list[Tensor]] = [[] for _ in metrics]
        self.held = 0

    def add(self, i: int, output: Any, target: Any) -> None:
        if not isinstance(output, Tensor) or not isinstance(target, Tensor):  # nothing to concatenate
            self.metrics[i].update(output, target)
            return
        self.outputs[i].append(output)
        self.targets[i].append(target)
        self.held += output.numel()
        if self.held >= UPDATE_ELEMENTS:
            self.flush()

    def flush(self) -> None:
        for metric, outputs, targets in zip(self.metrics, self.outputs, self.targets):
            if outputs:
                metric.update(_cat(outputs), _cat(targets))
                outputs.clear()
                targets.clear()
        self.held = 0


def _cat(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _pair(batch: Any, where: str) -> tuple[Any, Any]:
    """``(inputs, targets)`` out of an evaluation batch, or an error saying what the batch was instead."""
    if not isinstance(batch, (list, tuple)) or len(batch) != 2:
        got = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (list, tuple)) else type(batch).__name__
        raise ValueError(f"{where} must be an (inputs, targets) pair, got {got}")
    x, y = batch
    if isinstance(x, Tensor) and isinstance(y, Tensor) and x.dim() and y.dim() and len(x) != len(y):
        raise ValueError(f"{where}: inputs hold {len(x)} samples but targets {len(y)}")
    return x, y


def _forward(model: nn.Module, x: Tensor, chunk: int) -> Tensor:
    if len(x) <= chunk:
        return model(x)
    return torch.cat([model(part) for part in x.split(chunk)])


def score(
    model: nn.Module,
    batches: Iterable[Any],
    metric: Metric,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    select: Callable[[Any], Any] | None = None,
    context: Callable[[], AbstractContextManager] | None = None,
) -> float:
    """``metric`` of ``model`` over ``batches`` (``(x, y)`` pairs), in eval mode; the model's mode is restored.

    ``metric`` is cloned (the clones are kept and reset for the next call), so the
    caller's instance is never updated. ``select`` picks ``(x, y)`` out of a batch
    (e.g. one member's part of a dict batch); ``context`` is entered around the forward passes (e.g. the Trainer's
    precision context, so votes run in the same precision as validation).
    A loader that yields no batch is an error, not a silent zero.
    """
    pick = None if select is None else (lambda _, batch: select(batch))
    return score_many(model, [batches], metric, device, max_batches, pick, context)[0]


@torch.no_grad()
def score_many(
    model: nn.Module,
    sources: Sequence[Iterable[Any]],
    metric: Metric,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    select: Callable[[int, Any], Any] | None = None,
    context: Callable[[], AbstractContextManager] | None = None,
    chunk: int | None = None,
) -> list[float]:
    """``metric`` of ``model`` on each of ``sources`` (one value per source), with batched forward passes.

    ``select(i, batch)`` picks ``(x, y)`` out of a batch of source ``i``; at
    most ``max_batches`` batches are read per source; forward passes take at
    most ``chunk`` samples (default: :func:`chunk_size`).
    """
    chunk = chunk_size(model) if chunk is None else chunk
    device = torch.device(device) if device is not None else next(model.parameters()).device
    updates = _Updates(_fresh_clones(metric, len(sources), device))
    seen = [0] * len(sources)
    pending: list[tuple[int, Tensor, Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        x = _cat([x for _, x, _ in pending])
        out = _forward(model, x.to(device), chunk)
        for (i, _, y), logits in zip(pending, out.split([len(x) for _, x, _ in pending])):
            updates.add(i, logits, y.to(device))
        pending.clear()

    was_training = model.training
    model.eval()
    try:
        with (context or nullcontext)():
            queued = 0
            for i, source in enumerate(sources):
                for k, batch in enumerate(source):
                    if max_batches is not None and k == max_batches:
                        break
                    x, y = _pair(select(i, batch) if select is not None else batch, f"batch {k} of held-out source {i}")
                    whole = len(x) >= WHOLE_BATCH
                    if whole:  # forwarded alone: the small batches queued before it go first
                        flush()
                        queued = 0
                    pending.append((i, x, y))
                    seen[i] += 1
                    queued += len(x)
                    if whole or queued >= chunk:
                        flush()
                        queued = 0
            flush()
            updates.flush()
    finally:
        model.train(was_training)
    empty = [i for i, s in enumerate(seen) if s == 0]
    if empty:
        raise ValueError(f"cannot score a model on no data: held-out source {empty[0]} yielded no batches")
    return [float(m.compute()) for m in updates.metrics]


@torch.no_grad()
def score_models(
    models: Sequence[nn.Module],
    batches: Iterable[Any],
    metric: Metric,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    context: Callable[[], AbstractContextManager] | None = None,
) -> list[float]:
    """``metric`` of each of ``models`` on the same ``batches``, read once (consensus over candidates).

    Examples:
        >>> import torch
        >>> from torchmetrics.classification import MulticlassAccuracy
        >>> models = [torch.nn.Linear(4, 3) for _ in range(2)]
        >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
        >>> acc = MulticlassAccuracy(num_classes=3, average="micro")
        >>> score_models(models, data, acc) == [score(m, data, acc) for m in models]
        True
    """
    if not models:
        return []
    device = torch.device(device) if device is not None else next(models[0].parameters()).device
    updates = _Updates(_fresh_clones(metric, len(models), device))
    chunks = [chunk_size(m) for m in models]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    seen = 0
    try:
        with (context or nullcontext)():
            for k, batch in enumerate(batches):
                if max_batches is not None and k == max_batches:
                    break
                x, y = _pair(batch, f"evaluation batch {k}")
                x, y = x.to(device), y.to(device)
                for i, (model, chunk) in enumerate(zip(models, chunks)):
                    updates.add(i, _forward(model, x, chunk), y)
                seen += 1
            updates.flush()
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)
    if not seen:
        raise ValueError("cannot score models on no data: the evaluation loader yielded no batches")
    return [float(m.compute()) for m in updates.metrics]
