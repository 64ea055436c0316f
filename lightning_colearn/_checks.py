"""Argument predicates shared by every layer (no torch, no Lightning); callers word their own errors."""

from __future__ import annotations

import numbers


def is_int_at_least(value: object, minimum: int) -> bool:
    """True for an integer (Python or numpy, not bool) that is ``>= minimum``.

    Example:
        >>> is_int_at_least(3, 1), is_int_at_least(True, 0), is_int_at_least(2.0, 1)
        (True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
