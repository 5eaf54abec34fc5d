"""The aggregates, each a function of a buffer column and a window's slice ``[lo, hi)``.

Every aggregate reads the window's values in the buffer's order (event time,
then arrival), with plain Python float operations, so the same events give the
same bits online and offline, however the stream was cut into batches. A window
holds at least the event it is computed for, so no slice is empty, except for a
feature with ``current=False`` (the events before this one), which the engine
gives its :func:`empty_value` instead of calling the aggregate.

``approx_distinct`` reads a column of HyperLogLog codes (:func:`.sketch.code_of`,
made when the event is read), not of values; its estimate depends only on the
set of codes in the window, so it too is the same online and offline.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import islice
from typing import TYPE_CHECKING, Any

from .sketch import DEFAULT_PRECISION, estimate_codes

if TYPE_CHECKING:
    from .definition import Feature

__all__ = ["Aggregate", "aggregate_of", "column_kind", "empty_value"]

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


def _ewm(alpha: float) -> Aggregate:
    def ewm(column: list[Any], lo: int, hi: int) -> float:
        m = float(column[lo])
        for x in islice(column, lo + 1, hi):
            m += alpha * (x - m)
        return m

    return ewm


def _approx_distinct(precision: int) -> Aggregate:
    def approx_distinct(column: list[Any], lo: int, hi: int) -> float:
        return estimate_codes(column[lo:hi], precision)

    return approx_distinct


def aggregate_of(feature: Feature) -> Aggregate:
    """The function computing ``feature``'s aggregate (see :data:`~.definition.AGGREGATES`)."""
    if feature.agg == "ewm":
        assert feature.alpha is not None
        return _ewm(float(feature.alpha))
    if feature.agg == "approx_distinct":
        return _approx_distinct(feature.precision or DEFAULT_PRECISION)
    return _AGGREGATES[feature.agg]


def column_kind(feature: Feature) -> str:
    """How the feature's field is read: ``number`` (a finite float), ``value`` (as it is,
    for ``distinct``), ``hllP`` (a HyperLogLog code of precision P), or ``""`` (no field)."""
    if feature.agg == "count":
        return ""
    if feature.agg == "distinct":
        return "value"
    if feature.agg == "approx_distinct":
        return f"hll{feature.precision or DEFAULT_PRECISION}"
    return "number"


def empty_value(feature: Feature) -> float:
    """The value of a ``current=False`` feature whose window holds no earlier event."""
    if feature.agg in ("count", "sum", "distinct", "approx_distinct"):
        return 0.0
    return math.nan if feature.default is None else float(feature.default)
