"""The models of the peers' examples; each takes its input shape and class count.

The defaults are the 1 x 28 x 28 images and 10 classes of MNIST, with the
parameter names, shapes and initialisation order these models always had
(``torch.manual_seed(s); ConvNet()`` gives the same weights as ever).

* :class:`LogisticRegression`, :class:`MLP`: any ``[B, ...]`` with
  ``in_features`` elements per sample (flattened).
* :class:`ConvNet`, :class:`ColearnConvNet`, :class:`CifarCNN`: images
  ``[B, in_channels, H, W]`` with ``image_size`` ``H`` (square) or ``(H, W)``.
* :class:`EmbeddingBagClassifier`: token ids ``[B, L]``.

Every model returns logits ``[B, num_classes]`` and has a ``num_classes``
attribute (the cohort's accuracy metrics read it). An input of the wrong
shape is an :class:`InputShapeError` naming the model, the shape it expects
per sample and the shape it got. The check compares shapes only (no
device sync) and sees each member's own shape under the stacked backend
(members folded into the batch, or ``torch.func.vmap``).

Examples:
    >>> import torch
    >>> [m()(torch.zeros(2, 1, 28, 28)).shape for m in (LogisticRegression, MLP, ConvNet, ColearnConvNet)]
    [torch.Size([2, 10]), torch.Size([2, 10]), torch.Size([2, 10]), torch.Size([2, 10])]
    >>> MLP(in_features=64)(torch.zeros(2, 64)).shape                       # tabular
    torch.Size([2, 10])
    >>> CifarCNN()(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> ConvNet(in_channels=3, image_size=(32, 24), num_classes=100)(torch.zeros(2, 3, 32, 24)).shape
    torch.Size([2, 100])
    >>> ConvNet().fc.in_features, ColearnConvNet().fc1.in_features, ConvNet(image_size=16).fc.in_features
    (2000, 800, 320)
    >>> EmbeddingBagClassifier(vocab_size=100)(torch.tensor([[5, 7, 0, 0], [1, 2, 3, 4]])).shape
    torch.Size([2, 2])
    >>> MLP(in_features=64)(torch.zeros(8, 784))
    Traceback (most recent call last):
        ...
    lightning_colearn.models.InputShapeError: MLP expects 64 input features per sample, got input of shape (8, 784)
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CifarCNN",
    "ColearnConvNet",
    "ConvNet",
    "EmbeddingBagClassifier",
    "InputShapeError",
    "LogisticRegression",
    "MLP",
    "for_data",
]


class InputShapeError(ValueError, RuntimeError):
    """An input whose shape (or dtype) the model was not built for.

    A ``ValueError`` (the caller's input is wrong) that is also a
    ``RuntimeError``, what torch raised for the same mistake before these
    checks, so code that caught that keeps working (``numpy.AxisError`` is
    a ``ValueError`` and an ``IndexError`` for the same reason).
    """


# ------------------------------------------------------------------ checks
def _as_positive_int(value) -> int | None:
    """``value`` as an int if it is an integer >= 1 (numpy and 0-d tensor integers too, not bools), else None."""
    if isinstance(value, bool):
        return None
    try:
        number = operator.index(value)
    except TypeError:
        return None
    return number if number >= 1 else None


def _positive_int(model: str, name: str, value) -> int:
    """``value`` as an int >= 1, or a ValueError naming ``model``'s argument ``name``."""
    number = _as_positive_int(value)
    if number is None:
        raise ValueError(f"{model}: {name} must be a positive int, got {value!r}")
    return number


def _as_tuple(value) -> tuple | None:
    """The items of a sequence (not a string) as a tuple, else None."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        return tuple(value)
    except TypeError:  # not iterable (a 0-d tensor says so only when iterated)
        return None


def _positive_ints(model: str, name: str, value, min_len: int) -> tuple[int, ...]:
    """``value`` (a sequence of at least ``min_len`` positive ints) as a tuple, or a ValueError."""
    items = _as_tuple(value)
    numbers = None if items is None else tuple(map(_as_positive_int, items))
    if numbers is None or None in numbers:
        raise ValueError(f"{model}: {name} must be a sequence of positive ints, got {value!r}")
    if len(numbers) < min_len:
        raise ValueError(f"{model}: {name} must hold at least {min_len} width{'s' if min_len > 1 else ''}, got {value!r}")
    return numbers


def _image_size(model: str, image_size) -> tuple[int, int]:
    """``image_size`` (an int or ``(H, W)``) as ``(H, W)`` of positive ints, or a ValueError."""
    sides = (image_size, image_size) if _as_positive_int(image_size) is not None else _as_tuple(image_size) or ()
    numbers = tuple(_as_positive_int(side) for side in sides)
    if len(numbers) != 2 or None in numbers:
        raise ValueError(f"{model}: image_size must be a positive int or a pair (H, W) of them, got {image_size!r}")
    return numbers


#: One spatial stage of a network, ``(kernel, stride, padding)`` of a convolution or a (floor-mode) pool.
_Stage = tuple[int, int, int]


def _spatial_out(size: int, stages: Sequence[_Stage]) -> int:
    """The side length after ``stages`` (torch's output-size formula), or 0 when a stage has no output left."""
    for kernel, stride, padding in stages:
        size = (size + 2 * padding - kernel) // stride + 1
        if size < 1:
            return 0
    return size


def _feature_map(model: str, image_size: tuple[int, int], stages: Sequence[_Stage], what: str) -> tuple[int, int]:
    """The ``(h, w)`` left after ``stages``, or a ValueError naming ``image_size`` and the smallest one that fits."""
    out = tuple(_spatial_out(side, stages) for side in image_size)
    if 0 in out:
        smallest = next(n for n in itertools.count(1) if _spatial_out(n, stages))
        raise ValueError(f"{model}: image_size must be at least {smallest} (each side; {what}), "
                         f"got image_size={image_size[0] if image_size[0] == image_size[1] else image_size}")
    return out


def _check_features(model: nn.Module, x: Tensor, in_features: int) -> None:
    """``x`` must be ``[B, ...]`` with ``in_features`` elements per sample (shapes only: no sync)."""
    if x.dim() < 2 or math.prod(x.shape[1:]) != in_features:
        raise InputShapeError(f"{type(model).__name__} expects {in_features} input features per sample, "
                              f"got input of shape {tuple(x.shape)}")


def _check_images(model: nn.Module, x: Tensor) -> None:
    """``x`` must be ``[B, in_channels, H, W]`` with ``(H, W) == model.image_size``."""
    expected = (model.in_channels, *model.image_size)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise InputShapeError(f"{type(model).__name__} expects images of shape {expected} per sample "
                              f"([B, {', '.join(map(str, expected))}]), got input of shape {tuple(x.shape)}")


# ------------------------------------------------------------------ models
class LogisticRegression(nn.Module):
    """Multinomial logistic regression, ``in_features -> num_classes`` (the PyTorch MNIST tutorial's model).

    Args:
        in_features: elements per sample; any ``[B, ...]`` input is flattened to ``[B, in_features]``.
        num_classes: the number of logits.
    """

    def __init__(self, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        name = type(self).__name__
        self.in_features = _positive_int(name, "in_features", in_features)
        self.num_classes = _positive_int(name, "num_classes", num_classes)
        self.linear = nn.Linear(self.in_features, self.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        _check_features(self, x, self.in_features)
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """``in_features``-``hidden``-``num_classes`` perceptron with ReLU; 784-128-10 is KD_Lib's and flexBlock's student.

    Args:
        in_features: elements per sample; any ``[B, ...]`` input is flattened to ``[B, in_features]``.
        hidden: width of the hidden layer.
        num_classes: the number of logits.
    """

    def __init__(self, in_features: int = 784, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        name = type(self).__name__
        self.in_features = _positive_int(name, "in_features", in_features)
        self.hidden = _positive_int(name, "hidden", hidden)
        self.num_classes = _positive_int(name, "num_classes", num_classes)
        self.fc1 = nn.Linear(self.in_features, self.hidden)
        self.fc2 = nn.Linear(self.hidden, self.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        _check_features(self, x, self.in_features)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class ConvNet(nn.Module):
    """Nytorch's MNIST ConvNet: conv ``in_channels``->10 k5, ReLU, max-pool 2, conv 10->20 k3, ReLU, fc -> ``num_classes``.

    The fully connected layer takes ``20 * h * w`` features, ``(h, w)`` what
    the convolutions leave of ``image_size``: 2000 for 28 x 28. Images must be
    at least 10 x 10.

    Args:
        in_channels: image channels.
        image_size: ``H`` of square images or ``(H, W)``; stored as ``(H, W)``.
        num_classes: the number of logits.
        batch_norm: a BatchNorm after each convolution (``bn1``, ``bn2``), e.g. for FedBN's local
            statistics; off by default (the original has none, and its weights stay as they were).
    """

    #: conv 5, max-pool 2, conv 3 as (kernel, stride, padding)
    _STAGES: tuple[_Stage, ...] = ((5, 1, 0), (2, 2, 0), (3, 1, 0))

    def __init__(self, in_channels: int = 1, image_size: int | tuple[int, int] = 28, num_classes: int = 10,
                 batch_norm: bool = False) -> None:
        super().__init__()
        name = type(self).__name__
        self.in_channels = _positive_int(name, "in_channels", in_channels)
        self.image_size = _image_size(name, image_size)
        self.num_classes = _positive_int(name, "num_classes", num_classes)
        h, w = _feature_map(name, self.image_size, self._STAGES, "a 5x5 convolution, a 2x2 max-pool and a 3x3 convolution")
        self.conv1 = nn.Conv2d(self.in_channels, 10, kernel_size=5)  # 28 -> 24, pool -> 12
        self.conv2 = nn.Conv2d(10, 20, kernel_size=3)  # 12 -> 10: 20 * 10 * 10 = 2000
        self.fc = nn.Linear(20 * h * w, self.num_classes)
        if not isinstance(batch_norm, bool):
            raise ValueError(f"{name}: batch_norm must be True or False, got {batch_norm!r}")
        self.batch_norm = batch_norm
        if batch_norm:  # created after the original layers: their initial weights do not change
            self.bn1, self.bn2 = nn.BatchNorm2d(10), nn.BatchNorm2d(20)

    def forward(self, x: Tensor) -> Tensor:
        _check_images(self, x)
        if self.batch_norm:
            x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
            return self.fc(F.relu(self.bn2(self.conv2(x))).flatten(1))
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))


class ColearnConvNet(nn.Module):
    """colearn's MNIST ConvNet: conv ``in_channels``->20 k5, pool, conv 20->50 k5, pool, fc -> 500, fc 500 -> ``num_classes``.

    The first fully connected layer takes ``50 * h * w`` features, ``(h, w)``
    what the convolutions and pools leave of ``image_size``: 800 for 28 x 28.
    Images must be at least 16 x 16.

    Args:
        in_channels: image channels.
        image_size: ``H`` of square images or ``(H, W)``; stored as ``(H, W)``.
        num_classes: the number of logits.
    """

    #: (conv 5, max-pool 2) twice, as (kernel, stride, padding)
    _STAGES: tuple[_Stage, ...] = ((5, 1, 0), (2, 2, 0), (5, 1, 0), (2, 2, 0))

    def __init__(self, in_channels: int = 1, image_size: int | tuple[int, int] = 28, num_classes: int = 10) -> None:
        super().__init__()
        name = type(self).__name__
        self.in_channels = _positive_int(name, "in_channels", in_channels)
        self.image_size = _image_size(name, image_size)
        self.num_classes = _positive_int(name, "num_classes", num_classes)
        h, w = _feature_map(name, self.image_size, self._STAGES, "two 5x5 convolutions, each followed by a 2x2 max-pool")
        self.conv1 = nn.Conv2d(self.in_channels, 20, kernel_size=5)  # 28 -> 24 -> 12
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)  # 12 -> 8 -> 4: 50 * 4 * 4 = 800
        self.fc1 = nn.Linear(50 * h * w, 500)
        self.fc2 = nn.Linear(500, self.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        _check_images(self, x)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class CifarCNN(nn.Module):
    """The CIFAR-10 CNN of FedAvg: the TensorFlow CIFAR-10 tutorial's model without its normalisation layers.

    McMahan et al., "Communication-Efficient Learning of Deep Networks from
    Decentralized Data" (AISTATS 2017), train on CIFAR-10 the model of the
    TensorFlow CIFAR-10 tutorial: per width in ``channels`` a 5x5
    convolution ('same' padding) + ReLU + 3x3 max-pool of stride 2
    (padding 1, so a side ``n`` becomes ``ceil(n / 2)`` like TensorFlow's
    'SAME' pooling), then fully connected layers of ``hidden`` widths with
    ReLU, then a linear layer to ``num_classes`` logits. The defaults are
    the paper's 64, 64 channels and 384, 192 units: 32 x 32 images leave
    64 x 8 x 8 = 4096 features (about 1.76M parameters); the tutorial's
    24 x 24 crops (``image_size=24``) leave 2304 (about 1.07M, the order of
    10^6 parameters the paper gives).

    The tutorial's local response normalisation after each block is left
    out: it is rarely used since Simonyan & Zisserman (ICLR 2015, VGG)
    found it did not improve ImageNet accuracy while costing memory and
    time, and torch has no fused kernel for it: ``F.local_response_norm``
    is a chain of a square, an average pool, a power and a division, four
    more passes over every feature map.

    Args:
        in_channels: image channels.
        image_size: ``H`` of square images or ``(H, W)``; stored as ``(H, W)``. Any size fits.
        num_classes: the number of logits.
        channels: output channels of each convolution block (one block per entry, at least one).
        hidden: widths of the fully connected layers before the output layer (may be empty).
    """

    #: one block: conv 5 ('same'), max-pool 3 stride 2 padding 1, as (kernel, stride, padding)
    _BLOCK: tuple[_Stage, ...] = ((5, 1, 2), (3, 2, 1))

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
        num_classes: int = 10,
        channels: Sequence[int] = (64, 64),
        hidden: Sequence[int] = (384, 192),
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.in_channels = _positive_int(name, "in_channels", in_channels)
        self.image_size = _image_size(name, image_size)
        self.num_classes = _positive_int(name, "num_classes", num_classes)
        self.channels = _positive_ints(name, "channels", channels, min_len=1)
        self.hidden = _positive_ints(name, "hidden", hidden, min_len=0)
        h, w = _feature_map(name, self.image_size, self._BLOCK * len(self.channels), "5x5 convolutions and 3x3 pools")
        widths = (self.in_channels, *self.channels)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, kernel_size=5, padding=2) for a, b in zip(widths, widths[1:]))
        units = (self.channels[-1] * h * w, *self.hidden)
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(units, units[1:]))
        self.head = nn.Linear(units[-1], self.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        _check_images(self, x)
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), kernel_size=3, stride=2, padding=1)
        x = x.flatten(1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return self.head(x)


class EmbeddingBagClassifier(nn.Module):
    """A fastText-style text classifier: the mean of a sequence's token embeddings, then a linear layer.

    Joulin et al., "Bag of Tricks for Efficient Text Classification" (EACL
    2017): a sentence is the average of its word (or n-gram) embeddings,
    fed to a linear classifier. Input ``[B, L]`` of token ids (int64 or
    int32), sequences right- or left-padded with ``padding_idx``; padding is
    left out of the mean (an all-padding row gives the bias alone). With
    ``padding_idx=None`` every position counts.

    Written with ``nn.Embedding`` and a masked mean, not ``nn.EmbeddingBag``,
    so ``torch.func.vmap`` (the stacked backend) can run it.

    Args:
        vocab_size: number of token ids.
        embed_dim: embedding width.
        num_classes: the number of logits.
        padding_idx: the padding token id (negative counts from the end), or None.
    """

    def __init__(self, vocab_size: int, embed_dim: int = 64, num_classes: int = 2, padding_idx: int | None = 0) -> None:
        super().__init__()
        name = type(self).__name__
        self.vocab_size = _positive_int(name, "vocab_size", vocab_size)
        self.embed_dim = _positive_int(name, "embed_dim", embed_dim)
        self.num_classes = _positive_int(name, "num_classes", num_classes)
        pad = None
        if padding_idx is not None:
            try:
                pad = None if isinstance(padding_idx, bool) else operator.index(padding_idx)
            except TypeError:
                pass
            if pad is None or not -self.vocab_size <= pad < self.vocab_size:
                raise ValueError(f"{name}: padding_idx must be None or an int in [{-self.vocab_size}, {self.vocab_size - 1}] "
                                 f"(vocab_size={self.vocab_size}), got {padding_idx!r}")
        self.embedding = nn.Embedding(self.vocab_size, self.embed_dim, padding_idx=pad)
        self.padding_idx = self.embedding.padding_idx  # made non-negative by nn.Embedding
        self.fc = nn.Linear(self.embed_dim, self.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
            raise InputShapeError(f"{type(self).__name__} expects a batch of token ids [B, L] (int64 or int32), "
                                  f"got input of shape {tuple(x.shape)} and dtype {x.dtype}")
        embedded = self.embedding(x)  # [B, L, D]
        if self.padding_idx is None:
            return self.fc(embedded.mean(1))
        keep = (x != self.padding_idx).unsqueeze(-1).to(embedded.dtype)  # [B, L, 1]
        return self.fc((embedded * keep).sum(1) / keep.sum(1).clamp_min(1))


def for_data(model: Callable[..., nn.Module], shapes: Mapping[str, Any] | Any, **kwargs: Any) -> functools.partial:
    """A factory of ``model`` shaped for the data: the entries of ``shapes`` that ``model`` takes, then ``kwargs``.

    ``shapes`` is a data module (its ``shapes()``, e.g. a
    :class:`~lightning_colearn.data.CohortDataModule` after ``setup``) or that dict
    (``in_features``, ``in_channels``, ``image_size``, ``vocab_size``, ``num_classes``); keys the
    model does not take are left out, so one call fits an MLP or a ConvNet to any data.

    Examples:
        >>> factory = for_data(MLP, {"in_features": 64, "in_channels": 1, "image_size": 8, "num_classes": 3}, hidden=16)
        >>> factory().fc1, factory().num_classes
        (Linear(in_features=64, out_features=16, bias=True), 3)
    """
    if not isinstance(shapes, Mapping):
        shapes = shapes.shapes()
    accepted = inspect.signature(model).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    return functools.partial(model, **{k: v for k, v in shapes.items() if takes_all or k in accepted}, **kwargs)
