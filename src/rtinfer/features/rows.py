"""From a decoded event to the engine's row ``(key, time, value, ...)``, the same online and
offline.

Numeric fields are read as finite floats, so an amount written ``5`` in one file
and ``5.0`` in another gives the same bits; the key must be a string, an
integer or bytes; a field the aggregates count distinct values of must be a
string, a number or bytes (for ``approx_distinct`` the row holds its HyperLogLog
code, :func:`~.sketch.code_of`, not the value). An event that breaks a rule gets a reason naming the
field, and is dead-lettered alone.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from itertools import repeat
from typing import Any

from .engine import Engine
from .sketch import code_of

__all__ = ["RowReader"]

_KEY_TYPES = (str, int, bytes)
_VALUE_TYPES = (str, int, float, bytes)
_KEY_SET = frozenset(_KEY_TYPES)
_TIME_SET = frozenset((int, float))
_VALUE_SET = frozenset(_VALUE_TYPES)

#: A batch as columns: keys, times, one list per engine column, and the reasons of the
#: events left out (by index; their entries in the columns are ``None``).
Columns = tuple[list[Any], list[Any], list[list[Any]], dict[int, str]]


class RowReader:
    """Reads rows from data objects (``msgspec.Struct`` or ``dict``), per an engine's columns.

    ``row(data, key, time)``: ``key`` and ``time`` are used where the definition
    takes them from the event (its broker key, event time or ingest time) rather
    than from a field. Raises ``ValueError`` with the reason for a bad event.
    """

    __slots__ = ("_attr", "_fields", "_item", "_key_field", "_kinds", "_names", "_time_field")

    def __init__(self, engine: Engine) -> None:
        definition = engine.definition
        self._key_field = definition.key
        self._time_field = definition.time if definition.time != "processing" else None
        fields = [name for name, _ in engine.columns]
        if self._key_field is not None:
            fields.insert(0, self._key_field)
        if self._time_field is not None:
            fields.insert(1 if self._key_field is not None else 0, self._time_field)
        self._fields = fields
        self._kinds = [kind for _, kind in engine.columns]
        self._names = [name for name, _ in engine.columns]
        self._attr: Callable[[Any], Any] = self._getter(operator.attrgetter, fields)
        self._item: Callable[[Any], Any] = self._getter(operator.itemgetter, fields)

    @staticmethod
    def _getter(make: Any, fields: list[str]) -> Callable[[Any], Any]:
        if not fields:
            return lambda data: ()
        get = make(*fields)
        if len(fields) == 1:
            return lambda data: (get(data),)
        return get  # type: ignore[no-any-return]

    @property
    def needs_event_key(self) -> bool:
        return self._key_field is None

    @property
    def needs_event_time(self) -> bool:
        return self._time_field is None

    def row(self, data: Any, key: Any = None, time: Any = None) -> tuple[Any, ...]:
        """The engine's row for ``data``; raises ``ValueError`` naming what is wrong."""
        try:
            values = (self._item if isinstance(data, dict) else self._attr)(data)
        except (AttributeError, KeyError, TypeError) as exc:
            raise ValueError(
                f"the event has no field {exc} that the features read "
                f"(fields: {', '.join(self._fields)})"
            ) from None
        at = 0
        if self._key_field is not None:
            key = values[0]
            at = 1
        if self._time_field is not None:
            time = values[at]
            at += 1
        if type(key) not in _KEY_TYPES:
            what = "field " + repr(self._key_field) if self._key_field else "the event's key"
            raise ValueError(f"the feature key ({what}) must be a string, integer or bytes, "
                             f"got {key!r}")  # fmt: skip
        if type(time) not in (int, float) or not math.isfinite(time):
            what = repr(self._time_field) if self._time_field else "event_time"
            raise ValueError(
                f"the event time ({what}) must be a finite number, got {time!r}"
                + ("; set decode.event_time_field" if time is None and not self._time_field else "")
            )
        row = [key, time]
        for value, kind, name in zip(values[at:], self._kinds, self._fields[at:], strict=True):
            if kind == "number":
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    raise ValueError(f"field {name!r} must be a number, got {value!r}") from None
                if not math.isfinite(number):
                    raise ValueError(f"field {name!r} must be finite, got {value!r}")
                row.append(number)
            elif type(value) in _VALUE_TYPES:
                row.append(value if kind == "value" else code_of(value, int(kind[3:])))
            else:
                raise ValueError(
                    f"field {name!r} must be a string, number or bytes to count distinct "
                    f"values, got {value!r}"
                )
        return tuple(row)

    def columns(
        self,
        data: Sequence[Any],
        keys: Sequence[Any] | None = None,
        times: Sequence[Any] | None = None,
    ) -> Columns:
        """A batch's events as the engine's columns, the same values as :meth:`row` of each.

        ``keys`` and ``times``: per event, where the definition takes them from the
        event rather than from a field. Each field is read once for the whole batch
        and checked with C-level passes (types, finiteness); a batch where any check
        fails is read again event by event, to leave out exactly the bad events with
        their reasons.
        """
        try:
            fast = self._columns(data, keys, times)
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError):
            fast = None
        if fast is not None:
            return fast[0], fast[1], fast[2], {}
        return self._columns_by_row(data, keys, times)

    def _columns(
        self, data: Sequence[Any], keys: Sequence[Any] | None, times: Sequence[Any] | None
    ) -> tuple[list[Any], list[Any], list[list[Any]]] | None:
        """The columns, or ``None`` when some event breaks a rule (or raises, for the caller)."""
        n = len(data)
        if n == 0:
            return [], [], [[] for _ in self._kinds]
        if isinstance(data[0], dict):
            if not all(map(isinstance, data, repeat(dict))):
                return None
            get: Callable[[str], Callable[[Any], Any]] = operator.itemgetter
        else:
            if any(map(isinstance, data, repeat(dict))):
                return None
            get = operator.attrgetter
        if self._key_field is not None:
            keys = list(map(get(self._key_field), data))
        if self._time_field is not None:
            times = list(map(get(self._time_field), data))
        if keys is None or times is None or len(keys) != n or len(times) != n:
            return None
        if not _KEY_SET.issuperset(map(type, keys)) or not _TIME_SET.issuperset(map(type, times)):
            return None
        if not all(map(math.isfinite, times)):
            return None
        columns = []
        for name, kind in zip(self._names, self._kinds, strict=True):
            raw = map(get(name), data)
            if kind == "number":
                column = list(map(float, raw))
                if not all(map(math.isfinite, column)):
                    return None
            else:
                column = list(raw)
                if not _VALUE_SET.issuperset(map(type, column)):
                    return None
                if kind != "value":
                    precision = int(kind[3:])
                    column = [code_of(value, precision) for value in column]
            columns.append(column)
        return list(keys), list(times), columns

    def _columns_by_row(
        self, data: Sequence[Any], keys: Sequence[Any] | None, times: Sequence[Any] | None
    ) -> Columns:
        bad: dict[int, str] = {}
        rows: list[tuple[Any, ...] | None] = []
        for i, item in enumerate(data):
            try:
                rows.append(
                    self.row(item, None if keys is None else keys[i],
                             None if times is None else times[i])
                )  # fmt: skip
            except ValueError as exc:
                bad[i] = str(exc)
                rows.append(None)
        width = 2 + len(self._kinds)
        columns = [[r[c] if r is not None else None for r in rows] for c in range(width)]
        return columns[0], columns[1], columns[2:], bad
