"""The models of the peers' examples, for 1 x 28 x 28 images and 10 classes.

Each takes image batches ``[B, 1, 28, 28]`` (or already flat ``[B, 784]``
for the linear models) and returns logits ``[B, num_classes]``.

Example:
    >>> import torch
    >>> [m()(torch.zeros(2, 1, 28, 28)).shape for m in (LogisticRegression, MLP, ConvNet, ColearnConvNet)]
    [torch.Size([2, 10]), torch.Size([2, 10]), torch.Size([2, 10]), torch.Size([2, 10])]
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ColearnConvNet", "ConvNet", "LogisticRegression", "MLP"]


class LogisticRegression(nn.Module):
    """Multinomial logistic regression, 784 -> 10 (the PyTorch MNIST tutorial's model)."""

    def __init__(self, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """784-128-10 perceptron with ReLU (KD_Lib's and flexBlock's student)."""

    def __init__(self, in_features: int = 784, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class ConvNet(nn.Module):
    """Nytorch's MNIST ConvNet: conv 1->10 k5, ReLU, max-pool 2, conv 10->20 k3, ReLU, fc 2000->10."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_channels, 10, kernel_size=5)  # 28 -> 24, pool -> 12
        self.conv2 = nn.Conv2d(10, 20, kernel_size=3)  # 12 -> 10: 20 * 10 * 10 = 2000
        self.fc = nn.Linear(2000, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))


class ColearnConvNet(nn.Module):
    """colearn's MNIST ConvNet: conv 1->20 k5, pool, conv 20->50 k5, pool, fc 800->500, fc 500->10."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)  # 28 -> 24 -> 12
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)  # 12 -> 8 -> 4: 50 * 4 * 4 = 800
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))
