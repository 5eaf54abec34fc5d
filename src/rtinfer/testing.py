"""Helpers for testing pipelines and stages, in your tests and ours.

:class:`ListSource` feeds a fixed list of payloads and records what was
acknowledged; :class:`~rtinfer.sinks.memory.ListSink` keeps what was written.
For broker semantics (consumer groups, redelivery), use the in-process broker:
it is a real broker, not a mock.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from .types import Event, Position

__all__ = ["ListSource"]


class ListSource:
    """A finite source over in-memory payloads: ``read`` hands them out, then ends.

    ``acked`` lists every acknowledged position, in acknowledgement order.
    ``keys`` (optional) gives each payload its key.
    """

    def __init__(
        self,
        values: Iterable[bytes],
        *,
        keys: Iterable[bytes | None] | None = None,
        name: str = "list",
        deadline_after: float | None = None,
    ) -> None:
        self.name = name
        self._values = list(values)
        self._keys = list(keys) if keys is not None else [None] * len(self._values)
        if len(self._keys) != len(self._values):
            raise ValueError(f"{len(self._keys)} keys for {len(self._values)} values")
        self._next = 0
        self._deadline_after = deadline_after
        self.acked: list[Position] = []
        self.closed = False

    async def start(self) -> None:
        pass

    async def read(self, max_events: int) -> list[Event]:
        if self.closed:
            return []
        start, stop = self._next, min(self._next + max_events, len(self._values))
        self._next = stop
        now = time.time()
        deadline = now + self._deadline_after if self._deadline_after is not None else None
        return [
            Event(
                self._values[i],
                key=self._keys[i],
                ingest_time=now,
                deadline=deadline,
                position=Position(self.name, 0, i),
            )
            for i in range(start, stop)
        ]

    async def ack(self, positions: Sequence[Position]) -> None:
        self.acked.extend(positions)

    async def aclose(self) -> None:
        self.closed = True
