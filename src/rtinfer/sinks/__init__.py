"""Where results go: implementations of :class:`rtinfer.types.Sink`.

The in-process broker, files and stdout need nothing more; the broker connectors are
imported on first use, so a missing extra only matters to whoever uses that connector.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .file import JsonLinesSink
from .memory import BrokerSink, ListSink
from .stdout import StdoutSink

if TYPE_CHECKING:
    from .kafka import KafkaSink
    from .mqtt import MqttSink
    from .nats import NatsSink
    from .redis import RedisStreamSink

__all__ = [
    "BrokerSink",
    "JsonLinesSink",
    "KafkaSink",
    "ListSink",
    "MqttSink",
    "NatsSink",
    "RedisStreamSink",
    "StdoutSink",
]

_LAZY = {
    "KafkaSink": ".kafka",
    "MqttSink": ".mqtt",
    "NatsSink": ".nats",
    "RedisStreamSink": ".redis",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module, __name__), name)
