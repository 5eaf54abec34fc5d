"""Print results to standard output, one JSON line each: for demos and shell pipes."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

import msgspec

from ..types import Event

__all__ = ["StdoutSink"]

_encode = msgspec.json.Encoder().encode


class StdoutSink:
    """Writes one JSON line per result to ``sys.stdout``, on ``flush``.

    A ``bytes`` result is written as it is (decoded as UTF-8). Lines are
    written and flushed on a worker thread, so a slow reader of the pipe
    does not stall the event loop. ``sys.stdout`` is looked up at each flush,
    so redirecting it (as pytest's ``capsys`` does) works.
    """

    __slots__ = ("_buffer", "_lock", "name")

    def __init__(self) -> None:
        self.name = "stdout://"
        self._buffer: list[bytes] = []
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        pass

    async def write(self, events: Sequence[Event]) -> None:
        buffer = self._buffer
        for event in events:
            result = event.result
            buffer.append(result if type(result) is bytes else _encode(result))

    async def flush(self) -> None:
        buffer, self._buffer = self._buffer, []
        async with self._lock:
            if buffer:
                buffer.append(b"")
                text = b"\n".join(buffer).decode("utf-8", errors="replace")
                await asyncio.to_thread(_print, text)

    async def aclose(self) -> None:
        await self.flush()

    def __repr__(self) -> str:
        return "<StdoutSink>"


def _print(text: str) -> None:
    out = sys.stdout
    out.write(text)
    out.flush()
