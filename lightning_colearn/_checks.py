"""Argument checks shared by every layer (no torch, no Lightning): predicates whose callers word their own
errors, and the member-index check every cohort-level API words the same way."""

from __future__ import annotations

import numbers
import operator


def is_int_at_least(value: object, minimum: int) -> bool:
    """True for an integer (Python or numpy, not bool) that is ``>= minimum``.

    Examples:
        >>> is_int_at_least(3, 1), is_int_at_least(True, 0), is_int_at_least(2.0, 1)
        (True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


def member_index(index: object, size: int) -> int:
    """``index`` as a member index in ``[0, size)``; a negative one counts from the end, as for a list.

    Any integer (Python, numpy, a 0-d integer tensor: ``operator.index``), never a bool, a float or a
    string (``int(1.7)`` would quietly pick member 1); anything else is an ``IndexError``.

    Examples:
        >>> member_index(-1, 3), member_index(2, 3)
        (2, 2)
        >>> member_index(1.0, 3)
        Traceback (most recent call last):
        ...
        IndexError: member index must be an int in [0, 2] (or -3..-1 from the end), got 1.0
    """
    try:
        value = None if isinstance(index, bool) else operator.index(index)
    except TypeError:
        value = None
    if value is None or not -size <= value < size:
        raise IndexError(f"member index must be an int in [0, {size - 1}] (or {-size}..-1 from the end), got {index!r}")
    return value % size
