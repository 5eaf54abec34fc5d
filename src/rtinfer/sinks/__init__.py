"""Where results go: implementations of :class:`rtinfer.types.Sink`."""

from __future__ import annotations

from .file import JsonLinesSink
from .memory import BrokerSink, ListSink
from .stdout import StdoutSink

__all__ = ["BrokerSink", "JsonLinesSink", "ListSink", "StdoutSink"]
