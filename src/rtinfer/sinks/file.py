"""Append results to a JSON Lines file.

:class:`JsonLinesSink` buffers encoded results on ``write`` and appends them
on ``flush``, on a worker thread; with ``fsync=True`` a flush also waits for
the disk, so a flushed (and so acknowledged) result survives a power loss.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import msgspec

from ..types import Event

__all__ = ["JsonLinesSink"]

_encode = msgspec.json.Encoder().encode


class JsonLinesSink:
    """Appends one line per result to the file at ``path`` (parents are created).

    A ``bytes`` result is written as it is (it should hold one line of JSON);
    anything else is encoded as JSON with msgspec.
    """

    __slots__ = ("_buffer", "_file", "_lock", "fsync", "name", "path")

    def __init__(self, path: str | Path, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.name = f"file://{path}"
        self._buffer: list[bytes] = []
        self._file: BinaryIO | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Create the parent directories and open the file for appending."""
        async with self._lock:
            await asyncio.to_thread(self._open)

    def _open(self) -> BinaryIO:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
        return self._file

    async def write(self, events: Sequence[Event]) -> None:
        buffer = self._buffer
        for event in events:
            result = event.result
            buffer.append(result if type(result) is bytes else _encode(result))

    async def flush(self) -> None:
        """Append everything written so far; return once it is in the file (or on disk)."""
        buffer, self._buffer = self._buffer, []
        async with self._lock:  # also waits for an earlier flush still writing
            if buffer:
                buffer.append(b"")
                await asyncio.to_thread(self._append, b"\n".join(buffer))

    def _append(self, data: bytes) -> None:
        file = self._open()
        file.write(data)
        file.flush()
        if self.fsync:
            os.fsync(file.fileno())

    async def aclose(self) -> None:
        """Flush, then close the file."""
        await self.flush()
        async with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __repr__(self) -> str:
        return f"<JsonLinesSink {self.name}>"
