"""Where events come from: implementations of :class:`rtinfer.types.Source`."""

from __future__ import annotations

from .file import JsonLinesSource
from .memory import BrokerSource

__all__ = ["BrokerSource", "JsonLinesSource"]
