"""Result files written atomically: a crash leaves the previous file or the new one, never half of one."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], fields: Sequence[str] | None = None) -> Path:
    """Write ``rows`` as CSV through a temporary file and an atomic rename; returns the path.

    ``fields`` defaults to every key of every row, in first-seen order (a row without a field leaves it empty).

    Examples:
        >>> import tempfile
        >>> out = write_csv(Path(tempfile.mkdtemp()) / "r.csv", [{"a": 1}, {"a": 2, "b": 3}])
        >>> out.read_text().splitlines()
        ['a,b', '1,', '2,3']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(fields) if fields is not None else list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` through a temporary file, fsync and an atomic rename; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path
