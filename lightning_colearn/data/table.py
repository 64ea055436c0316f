"""What a partition gave each member: samples per split and per class, as numbers, text and one summary line.

Examples:
    >>> import numpy as np
    >>> table = PartitionTable({"train": np.array([[3, 0], [1, 2]]), "vote": np.array([[1, 0], [0, 1]])}, ["cat", "dog"])
    >>> table.sizes("train").tolist(), table.classes_per_member("train").tolist()
    ([3, 3], [1, 2])
    >>> table.summary()
    '2 members; train samples min / median / max 3 / 3 / 3; classes per member 1 / 1.5 / 2 of 2'
    >>> print(table)
    member  train  vote  train:cat  train:dog
         0      3     1          3          0
         1      3     1          1          2
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PartitionTable"]


@dataclass(frozen=True)
class PartitionTable:
    """Per member and split: sample counts per class (``[members, classes]``), or totals only (``[members, 1]``).

    Attributes:
        counts: ``{split: array[members, classes]}``; a regression data set (no classes) has one column of totals.
        classes: the class names (``None`` for regression).
    """

    counts: Mapping[str, np.ndarray]
    classes: Sequence | None = None

    @property
    def num_members(self) -> int:
        return len(next(iter(self.counts.values())))

    def sizes(self, split: str = "train") -> np.ndarray:
        """Samples of ``split`` per member."""
        return np.asarray(self.counts[split]).sum(1)

    def classes_per_member(self, split: str = "train") -> np.ndarray:
        """How many classes each member holds in ``split`` (0 without classes)."""
        if self.classes is None:
            return np.zeros(self.num_members, dtype=np.int64)
        return (np.asarray(self.counts[split]) > 0).sum(1)

    def summary(self, split: str = "train") -> str:
        """One line: members, min / median / max samples of ``split``, and classes per member."""
        sizes = self.sizes(split)
        line = f"{self.num_members} members; {split} samples min / median / max {_stats(sizes)}"
        if self.classes is not None:
            line += f"; classes per member {_stats(self.classes_per_member(split))} of {len(self.classes)}"
        return line

    def rows(self) -> list[dict[str, int]]:
        """One dict per member: ``member``, each split's size, then ``train:<class>`` counts."""
        rows = []
        for m in range(self.num_members):
            row = {"member": m, **{split: int(self.sizes(split)[m]) for split in self.counts}}
            if self.classes is not None and "train" in self.counts:
                row.update({f"train:{c}": int(n) for c, n in zip(self.classes, np.asarray(self.counts["train"])[m])})
            rows.append(row)
        return rows

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`rows` as CSV; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return path

    def __str__(self) -> str:
        rows = self.rows()
        header = list(rows[0])
        cells = [[str(r[h]) for h in header] for r in rows]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
        lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
        return "\n".join(lines)


def _stats(values: np.ndarray) -> str:
    median = float(np.median(values))
    return f"{int(values.min())} / {int(median) if median.is_integer() else median} / {int(values.max())}"
