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
from collections.abc import Callable
from typing import Any

from .engine import Engine
from .sketch import code_of

__all__ = ["RowReader"]

_KEY_TYPES = (str, int, bytes)
_VALUE_TYPES = (str, int, float, bytes)


class RowReader:
    """Reads rows from data objects (``msgspec.Struct`` or ``dict``), per an engine's columns.

    ``row(data, key, time)``: ``key`` and ``time`` are used where the definition
    takes them from the event (its broker key, event time or ingest time) rather
    than from a field. Raises ``ValueError`` with the reason for a bad event.
    """

    __slots__ = ("_attr", "_fields", "_item", "_key_field", "_kinds", "_time_field")

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
