"""Bytes to validated data, one event at a time, so one bad payload is dead-lettered alone."""

from __future__ import annotations

import operator
import typing
from collections.abc import Callable
from typing import Any

import msgspec

from ..exceptions import ConfigError
from ..types import DEAD_REASON_HEADER, Batch

__all__ = ["Decode", "Undeliverable"]


class Undeliverable:
    """Dead-letter the events their source marked undeliverable (delivered too many times).

    A broker source that counts deliveries (Redis Streams, NATS JetStream) hands such an
    event over once more, with the header ``rtinfer-dead-reason``; the pipeline puts
    this stage first, so the event is dead-lettered, and then acknowledged, instead of
    failing again.
    """

    __slots__ = ("name",)

    def __init__(self) -> None:
        self.name = "source"

    def __call__(self, batch: Batch) -> Batch:
        rows: list[int] = []
        reasons: list[str] = []
        for i, event in enumerate(batch.events):
            headers = event.headers
            if headers and DEAD_REASON_HEADER in headers:
                rows.append(i)
                reasons.append(headers[DEAD_REASON_HEADER].decode("utf-8", "replace"))
        batch.drop(rows, self.name, reasons)
        return batch


class Decode:
    """Decode each event's bytes (JSON or MessagePack) and validate them against a schema.

    ``schema`` is a ``msgspec.Struct`` type (``None``: any JSON value, as dicts and
    lists). ``codec="raw"`` keeps the bytes as they are (``data`` is the payload; a
    stage of yours makes the model input from it; no schema, ids by position). An
    event that does not decode or validate is dead-lettered with msgspec's message,
    which names the field. ``id_field`` gives the event its id (else its position
    does); ``event_time_field`` its event time, in ``event_time_unit`` (``s`` or
    ``ms``) since the epoch.
    """

    __slots__ = ("_decode", "_fast", "_get_id", "_get_time", "_scale", "name", "schema")

    def __init__(
        self,
        schema: type[Any] | None = None,
        *,
        codec: str = "json",
        id_field: str | None = "id",
        event_time_field: str | None = None,
        event_time_unit: str = "ms",
    ) -> None:
        self.name = "decode"
        self.schema = schema
        target: Any = schema if schema is not None else Any
        self._decode: Callable[[bytes], Any]
        if codec == "json":
            self._decode = msgspec.json.Decoder(target).decode
        elif codec in ("msgpack", "messagepack"):
            self._decode = msgspec.msgpack.Decoder(target).decode
        elif codec == "raw":
            if schema is not None:
                raise ConfigError("the raw codec takes no schema", key="decode.schema")
            self._decode = bytes
        else:
            raise ConfigError(
                f"unknown codec {codec!r}; use json, msgpack or raw", key="decode.codec"
            )
        if event_time_unit not in ("s", "ms"):
            raise ConfigError(
                f"event_time_unit must be 's' or 'ms', got {event_time_unit!r}",
                key="decode.event_time_unit",
            )
        self._scale = 1e-3 if event_time_unit == "ms" else 1.0
        dict_like = schema is None or (isinstance(schema, type) and issubclass(schema, dict))
        self._get_id = _getter(id_field, dict_like)
        self._get_time = _getter(event_time_field, dict_like)
        # The common case, decided once: a Struct whose id is a required str and whose event
        # time (if any) a required number. Then every decoded event has both, of those types,
        # and the per-event loop needs no checks.
        self._fast: tuple[Callable[[Any], str], Callable[[Any], float] | None] | None = None
        if (
            id_field is not None
            and _required_field(schema, id_field) in (str,)
            and (
                event_time_field is None
                or _required_field(schema, event_time_field) in (int, float)
            )
        ):
            self._fast = (
                operator.attrgetter(id_field),
                operator.attrgetter(event_time_field) if event_time_field else None,
            )

    def __call__(self, batch: Batch) -> Batch:
        if self._fast is not None:
            return self._decode_structs(batch, *self._fast)
        decode, get_id, get_time, scale = self._decode, self._get_id, self._get_time, self._scale
        bad: list[int] = []
        reasons: list[str] = []
        for i, event in enumerate(batch.events):
            try:
                data = event.data = decode(event.value)
            except msgspec.DecodeError as exc:  # includes ValidationError
                bad.append(i)
                reasons.append(f"undecodable or invalid: {exc}")
                continue
            if get_id is not None:
                event.id = _as_id(get_id(data))
            if event.id is None and event.position is not None:
                p = event.position
                event.id = f"{p.source}/{p.partition}/{p.offset}"
            if get_time is not None:
                t = get_time(data)
                if isinstance(t, int | float):
                    event.event_time = t * scale
        batch.drop(bad, self.name, reasons)
        return batch

    def _decode_structs(
        self,
        batch: Batch,
        get_id: Callable[[Any], str],
        get_time: Callable[[Any], float] | None,
    ) -> Batch:
        decode, scale = self._decode, self._scale
        bad: list[int] = []
        reasons: list[str] = []
        for i, event in enumerate(batch.events):
            try:
                data = decode(event.value)
            except msgspec.DecodeError as exc:  # includes ValidationError
                bad.append(i)
                reasons.append(f"undecodable or invalid: {exc}")
                continue
            event.data = data
            event.id = get_id(data)
            if get_time is not None:
                event.event_time = get_time(data) * scale
        batch.drop(bad, self.name, reasons)
        return batch


def _required_field(schema: Any, name: str) -> Any:
    """The type of a Struct's required field ``name``, or ``None``."""
    if not (isinstance(schema, type) and issubclass(schema, msgspec.Struct)):
        return None
    for field in msgspec.structs.fields(schema):
        if field.name == name and field.required:
            kind = field.type
            if typing.get_origin(kind) is typing.Annotated:  # constrained: Annotated[int, Meta]
                kind = typing.get_args(kind)[0]
            return kind
    return None


def _as_id(value: Any) -> str | None:
    """An event id from its id field: a string as is, an integer as its digits."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _getter(field: str | None, dict_like: bool) -> Callable[[Any], Any] | None:
    if field is None:
        return None
    if dict_like:

        def get(data: Any) -> Any:
            return data.get(field) if isinstance(data, dict) else None

        return get
    attr = operator.attrgetter(field)

    def get_attr(data: Any) -> Any:
        try:
            return attr(data)
        except AttributeError:
            return None

    return get_attr
