"""The id that names an event across deliveries, which every broker sink writes out."""

from __future__ import annotations

from ..types import Event

__all__ = ["source_id"]


def source_id(event: Event) -> str | None:
    """The id that identifies ``event`` across deliveries, or ``None``.

    The event's id; without one, its position when that names a place in a
    log (``<source>/<partition>/<offset>``). An MQTT position names a delivery
    (packet ids are reused), so it never stands in for an id: consumers that
    de-duplicate on it (or NATS, which drops a repeated ``Nats-Msg-Id``) would
    take different events for one.
    """
    if event.id is not None:
        return event.id
    p = event.position
    if p is not None and not p.source.startswith("mqtt://"):
        return f"{p.source}/{p.partition}/{p.offset}"
    return None
