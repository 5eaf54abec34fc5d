"""Where events come from: implementations of :class:`rtinfer.types.Source`.

The in-process broker and files need nothing more; the broker connectors are imported
on first use, so a missing extra only matters to whoever uses that connector.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .file import JsonLinesSource
from .memory import BrokerSource

if TYPE_CHECKING:
    from .kafka import KafkaSource
    from .mqtt import MqttSource
    from .nats import NatsSource
    from .redis import RedisStreamSource

__all__ = [
    "BrokerSource",
    "JsonLinesSource",
    "KafkaSource",
    "MqttSource",
    "NatsSource",
    "RedisStreamSource",
]

_LAZY = {
    "KafkaSource": ".kafka",
    "MqttSource": ".mqtt",
    "NatsSource": ".nats",
    "RedisStreamSource": ".redis",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module, __name__), name)
