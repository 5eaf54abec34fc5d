"""The aggregates, each a function of a buffer column and a window's slice ``[lo, hi)``.

Every aggregate reads the window's values in the buffer's order (event time,
then arrival), with plain Python float operations, so the same events give the
same bits online and offline, however the stream was cut into batches. A window
always holds at least the event it is computed for, so no slice is empty.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = ["Aggregate", "aggregate_of", "is_numeric"]

#: ``(column, lo, hi) -> value``.
Aggregate = Callable[[list[Any], int, int], float]


def _count(column: list[Any], lo: int, hi: int) -> float:
    return float(hi - lo)


def _sum(column: list[Any], lo: int, hi: int) -> float:
    return float(sum(column[lo:hi]))


def _mean(column: list[Any], lo: int, hi: int) -> float:
    return float(sum(column[lo:hi])) / (hi - lo)


def _min(column: list[Any], lo: int, hi: int) -> float:
    return float(min(column[lo:hi]))


def _max(column: list[Any], lo: int, hi: int) -> float:
    return float(max(column[lo:hi]))


def _std(column: list[Any], lo: int, hi: int) -> float:
    """The population standard deviation, in two passes (no cancellation of large sums)."""
    values = column[lo:hi]
    n = len(values)
    mean = float(sum(values)) / n
    return math.sqrt(sum([(x - mean) * (x - mean) for x in values]) / n)


def _last(column: list[Any], lo: int, hi: int) -> float:
    return float(column[hi - 1])


def _distinct(column: list[Any], lo: int, hi: int) -> float:
    return float(len(set(column[lo:hi])))


_AGGREGATES: dict[str, Aggregate] = {
    "count": _count,
    "sum": _sum,
    "mean": _mean,
    "min": _min,
    "max": _max,
    "std": _std,
    "last": _last,
    "distinct": _distinct,
}


def aggregate_of(name: str) -> Aggregate:
    """The function computing aggregate ``name`` (see :data:`~.definition.AGGREGATES`)."""
    return _AGGREGATES[name]


def is_numeric(name: str) -> bool:
    """Whether the aggregate needs numbers (its field's values are read as floats)."""
    return name not in ("count", "distinct")
