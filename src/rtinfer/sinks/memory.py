"""In-process sinks: publish results to the in-process broker, or keep them in a list.

:class:`BrokerSink` writes each result as a record of a broker topic;
:class:`ListSink` keeps results in memory, for tests and notebooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from ..broker import Broker
from ..types import Event

__all__ = ["BrokerSink", "ListSink"]

_encode = msgspec.json.Encoder().encode


class BrokerSink:
    """Publishes each event's ``result`` to ``topic``, keyed by the event's key.

    A ``bytes`` result is published as it is; anything else is encoded as JSON.
    Publishing is synchronous, so a record is in the broker once ``write``
    returns and ``flush`` has nothing to wait for.
    """

    __slots__ = ("_broker", "name", "topic")

    def __init__(self, broker: Broker, topic: str) -> None:
        self._broker = broker
        self.topic = topic
        self.name = f"memory://{topic}"

    async def start(self) -> None:
        pass

    async def write(self, events: Sequence[Event]) -> None:
        values: list[bytes] = []
        for event in events:
            result = event.result
            values.append(result if type(result) is bytes else _encode(result))
        self._broker.publish_many(self.topic, values, keys=[e.key for e in events])

    async def flush(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<BrokerSink {self.name}>"


class ListSink:
    """Keeps every written result (the object itself, not its encoding) in ``results``.

    ``flushed`` counts the results that were flushed: ``results[:flushed]``.
    A test helper: assert on what a pipeline wrote, and on when it flushed.
    """

    __slots__ = ("flushed", "name", "results")

    def __init__(self) -> None:
        self.name = "list://"
        self.results: list[Any] = []
        self.flushed = 0

    async def start(self) -> None:
        pass

    async def write(self, events: Sequence[Event]) -> None:
        self.results.extend([event.result for event in events])

    async def flush(self) -> None:
        self.flushed = len(self.results)

    async def aclose(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<ListSink {len(self.results)} results, {self.flushed} flushed>"
