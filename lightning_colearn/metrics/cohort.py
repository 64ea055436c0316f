"""Per-member copies of a torchmetrics ``Metric``, computed together.

Examples:
    >>> import torch
    >>> from torchmetrics.classification import MulticlassAccuracy
    >>> acc = CohortMetric(MulticlassAccuracy(num_classes=3, average="micro"), size=2)
    >>> acc.update(0, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    >>> acc.update(1, torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]))
    >>> acc.compute()
    tensor([0.6667, 1.0000])
    >>> acc.best(acc.compute())
    (1, tensor(1.))
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_colearn._checks import is_int_at_least

__all__ = ["CohortMetric", "higher_is_better"]


def higher_is_better(metric: Metric, maximize: bool | None = None) -> bool:
    """Which way is better for ``metric``: its ``higher_is_better``, or ``maximize`` when it has none.

    Never guessed: a metric that does not say needs an explicit ``maximize``.
    """
    if maximize is not None:
        return bool(maximize)
    direction = getattr(metric, "higher_is_better", None)
    if direction is None:
        raise ValueError(
            f"{type(metric).__name__}.higher_is_better is not set, so 'better' is ambiguous; "
            "pass maximize=True or maximize=False"
        )
    return bool(direction)


class CohortMetric(nn.Module):
    """One clone of ``metric`` per member; ``compute()`` returns a ``[size]`` tensor.

    The clones are registered submodules, so Lightning moves them to the
    device and torchmetrics syncs each across processes.
    """

    def __init__(self, metric: Metric, size: int, maximize: bool | None = None) -> None:
        super().__init__()
        if not isinstance(metric, Metric):
            raise TypeError(f"metric must be a torchmetrics.Metric, got {type(metric).__name__}")
        if not is_int_at_least(size, 1):
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        self.members = nn.ModuleList([metric.clone() for _ in range(size)])
        self.maximize = higher_is_better(metric, maximize)

    def __len__(self) -> int:
        return len(self.members)

    def update(self, member: int, *args, **kwargs) -> None:
        self.members[member].update(*args, **kwargs)

    def compute(self) -> Tensor:
        return torch.stack([torch.as_tensor(m.compute(), dtype=torch.float32).reshape(()) for m in self.members])

    def updated(self) -> list[int]:
        """Members that received at least one update since the last reset."""
        return [i for i, m in enumerate(self.members) if m.update_count > 0]

    def reset(self) -> None:
        for m in self.members:
            m.reset()

    def best(self, values: Tensor) -> tuple[int, Tensor]:
        """Index and value of the best member, following the metric's direction."""
        index = int(values.argmax() if self.maximize else values.argmin())
        return index, values[index]
