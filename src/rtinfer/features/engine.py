"""The one code path that computes feature values, online and offline.

:class:`Engine` is built once from a :class:`~.definition.FeatureSet`; its
:meth:`Engine.apply` takes rows ``(key, time, value, ...)`` in arrival order and
returns each row's feature values, updating a :class:`Partition`'s state. The
online stage and the backfill both call it, row by row in the same order, so a
value never depends on how the stream was cut into batches.

A partition's state is a dict from key to a buffer: ``[times, column, ...]``,
lists sorted by event time (equal times in arrival order), one column per field
the aggregates read. The dict is kept in the order keys were last touched, so
:meth:`Engine.evict` finds idle keys at its front, in time proportional to what
it evicts.

For each row: the watermark moves to the latest time seen minus
``out_of_orderness``; a row older than the watermark minus ``allowed_lateness``
(the *edge*) is too late and left to the late policy (``update`` applies it all
the same). The key's buffer first forgets what no event at or after the edge
can see (:func:`~.windows.cut_of`), then takes the row, then each window's slice
is aggregated. Forgetting and evicting only ever drop what no accepted event can
see, so neither changes a value.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any

from .aggregates import Aggregate, aggregate_of, column_kind, empty_value
from .definition import FeatureSet, Window
from .windows import Cut, Range, cut_of, range_of, scaled

__all__ = ["Engine", "Partition"]

Buffer = list[list[Any]]


class Partition:
    """The state of one source partition: per-key buffers, the latest time, what is applied.

    ``applied`` is the highest source offset whose event is in the state (``None``
    before the first); ``touched`` and ``evicted`` gather the keys changed since the
    stage last recorded them (for the state store).
    """

    __slots__ = ("applied", "evicted", "keys", "max_time", "touched")

    def __init__(self) -> None:
        self.keys: dict[Any, Buffer] = {}
        self.max_time: float = float("-inf")
        self.applied: Any = None
        self.touched: set[Any] = set()
        self.evicted: set[Any] = set()

    def __len__(self) -> int:
        return len(self.keys)


class Engine:
    """Computes a feature set's values row by row; see the module docstring.

    ``columns`` lists the ``(field, kind)`` pairs a row carries after its key and
    time, in order (:func:`~.aggregates.column_kind`): ``number`` fields are read as
    floats, ``value`` ones (``distinct``) as they are, ``hllP`` ones as HyperLogLog
    codes.
    """

    __slots__ = ("_cut", "_groups", "_update", "columns", "definition", "delay", "scale", "width")

    def __init__(self, definition: FeatureSet) -> None:
        self.definition = definition
        in_ms = definition.time not in (None, "processing") and definition.time_unit == "ms"
        self.scale = 1000 if in_ms else 1
        self.delay = scaled(definition.out_of_orderness + definition.allowed_lateness, self.scale)
        self._update = definition.late == "update"
        self.width = len(definition.features)
        columns: list[tuple[str, str]] = []
        groups: dict[Window, tuple[list[Any], list[Any]]] = {}
        for j, feature in enumerate(definition.features):
            column = 0
            if feature.field is not None:
                spec = (feature.field, column_kind(feature))
                if spec not in columns:
                    columns.append(spec)
                column = 1 + columns.index(spec)
            current, before = groups.setdefault(feature.window, ([], []))
            if feature.current:
                current.append((aggregate_of(feature), column, j))
            else:
                before.append((aggregate_of(feature), column, j, empty_value(feature)))
        self.columns = columns
        #: Per window: its slice function, the aggregates over the whole window, and those
        #: over the events before the current one (with their value when there are none).
        self._groups: list[tuple[Range, list[tuple[Aggregate, int, int]],
                                 list[tuple[Aggregate, int, int, float]]]] = [
            (range_of(window, self.scale), current, before)
            for window, (current, before) in groups.items()
        ]  # fmt: skip
        self._cut: Cut = cut_of(list(groups), self.scale)

    def apply(self, part: Partition, rows: list[tuple[Any, ...]]) -> tuple[list[Any], list[int]]:
        """Each row's values (``None`` for a too-late row left to the policy), and the rows
        that were too late."""
        keys = part.keys
        touched = part.touched
        latest = part.max_time
        delay, update, cut, groups = self.delay, self._update, self._cut, self._groups
        width = self.width
        ncols = len(self.columns)
        out: list[Any] = []
        late: list[int] = []
        for i, row in enumerate(rows):
            key = row[0]
            t = row[1]
            if t > latest:
                latest = t
            edge = latest - delay
            if t < edge:
                late.append(i)
                if not update:
                    out.append(None)
                    continue
            state = keys.pop(key, None)
            if state is None:
                state = [[] for _ in range(ncols + 1)]
            keys[key] = state  # last touched: to the end
            touched.add(key)
            times = state[0]
            if times:
                forget = cut(times, edge)
                if forget:
                    for column in state:
                        del column[:forget]
            pos = bisect_right(times, t)
            if pos == len(times):
                times.append(t)
                for c in range(1, ncols + 1):
                    state[c].append(row[c + 1])
            else:
                times.insert(pos, t)
                for c in range(1, ncols + 1):
                    state[c].insert(pos, row[c + 1])
            values = [0.0] * width
            for window, aggregates, earlier in groups:
                lo, hi = window(times, t, pos)
                for aggregate, c, j in aggregates:
                    values[j] = aggregate(state[c], lo, hi)
                for aggregate, c, j, empty in earlier:
                    values[j] = aggregate(state[c], lo, pos) if lo < pos else empty
            out.append(values)
        part.max_time = latest
        return out, late

    def evict(self, part: Partition) -> int:
        """Forget the keys no future accepted event can see; return how many.

        Walks the keys from the least recently touched and stops at the first that is
        still needed, so the work is the evicted keys plus one.
        """
        edge = part.max_time - self.delay
        cut = self._cut
        gone = []
        for key, state in part.keys.items():
            times = state[0]
            if cut(times, edge) < len(times):
                break
            gone.append(key)
        keys = part.keys
        for key in gone:
            del keys[key]
        part.evicted.update(gone)
        part.touched.difference_update(gone)
        return len(gone)
