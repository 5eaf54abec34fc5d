"""Read a JSON Lines file as a pipeline source, resuming where it was acknowledged.

:class:`JsonLinesSource` makes one event per non-empty line. With a
``checkpoint`` file, acknowledging writes the number of the next line to
read (atomically: a temporary file, then ``os.replace``), and a restart skips
the lines already acknowledged, so a file is processed at least once, and no
line twice unless the process stopped between a flush and its acknowledgement.
All file access runs on a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from ..types import Event, Position

__all__ = ["JsonLinesSource"]

logger = logging.getLogger(__name__)


class JsonLinesSource:
    """Events from the lines of the file at ``path``, one per non-empty line.

    ``value`` is the line's bytes without its line ending; ``position`` is
    ``Position("file://<path>", 0, n)`` with ``n`` the line's 0-based number
    (blank lines count but make no event). ``read`` returns ``[]`` at the end
    of the file; with ``follow=True`` it instead waits for more lines, like
    ``tail -f``, looking every ``poll_interval`` seconds (a file has no
    readiness notification that works everywhere; a line still being written,
    with no newline yet, waits for its newline). A file truncated or replaced
    while followed is not detected.

    ``checkpoint`` is the path of a small text file holding the next line
    number to read; it is written on ``ack`` and read on ``start``.
    """

    __slots__ = (
        "_acked",
        "_checkpoint_lock",
        "_closed",
        "_file",
        "_inflight",
        "_line",
        "_partial",
        "_read_lock",
        "_resume",
        "_waiter",
        "checkpoint",
        "follow",
        "name",
        "path",
        "poll_interval",
    )

    def __init__(
        self,
        path: str | Path,
        *,
        checkpoint: str | Path | None = None,
        follow: bool = False,
        poll_interval: float = 0.25,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive seconds, got {poll_interval!r}")
        self.path = Path(path)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.follow = follow
        self.poll_interval = poll_interval
        self.name = f"file://{path}"
        self._file: BinaryIO | None = None
        self._line = 0  # number of the next line the file will give
        self._resume = 0  # lines below this were acknowledged before a restart
        self._acked = 0
        self._partial = b""  # the start of a line still being written (follow mode)
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        # A read running on the worker thread; kept when read() is cancelled, so the lines
        # it took from the file are handed out by the next read() instead of being lost.
        self._inflight: asyncio.Future[tuple[list[Event], bool]] | None = None
        self._read_lock = asyncio.Lock()
        self._checkpoint_lock = asyncio.Lock()

    async def start(self) -> None:
        """Open the file and read the checkpoint; the lines it covers will be skipped."""
        if self._file is None:
            self._resume, self._file = await asyncio.to_thread(self._open)
            self._acked = self._resume

    def _open(self) -> tuple[int, BinaryIO]:
        resume = 0
        if self.checkpoint is not None:
            try:
                text = self.checkpoint.read_text().strip()
            except FileNotFoundError:
                text = "0"
            if not text.isdigit():
                raise ValueError(
                    f"checkpoint file '{self.checkpoint}' holds {text!r}, not a line number; "
                    f"delete it to read '{self.path}' from its first line"
                )
            resume = int(text)
        try:
            file = self.path.open("rb")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"JsonLinesSource: input file '{self.path}' does not exist "
                f"(relative paths start from {Path.cwd()}); check the path"
            ) from None
        return resume, file

    async def read(self, max_events: int) -> list[Event]:
        """Up to ``max_events`` events; ``[]`` at the end of the file (unless following)
        or once closed."""
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {max_events!r}")
        if self._file is None and not self._closed:
            raise RuntimeError(f"{self.name}: call start() before read()")
        while not self._closed:
            async with self._read_lock:
                if self._file is None:  # closed while this read waited for the lock
                    break
                task = self._inflight
                if task is None:
                    task = asyncio.ensure_future(asyncio.to_thread(self._read_lines, max_events))
                    self._inflight = task
                # Shielded: a cancelled read leaves the thread's result for the next read.
                events, at_end = await asyncio.shield(task)
                self._inflight = None
            if events or not at_end:
                return events
            if not self.follow:
                break
            await self._sleep()
        return []

    def _read_lines(self, max_events: int) -> tuple[list[Event], bool]:
        """Read lines until ``max_events`` events or the end of the file (worker thread)."""
        file = self._file
        assert file is not None
        events: list[Event] = []
        source = self.name
        now = time.time()
        line = self._line
        resume = self._resume
        at_end = False
        while len(events) < max_events:
            raw = file.readline()
            if not raw:
                at_end = True
                break
            if self._partial:
                raw = self._partial + raw
                self._partial = b""
            if self.follow and not raw.endswith(b"\n"):
                self._partial = raw  # the writer has not finished this line yet
                at_end = True
                break
            number = line
            line += 1
            if number < resume:
                continue
            value = raw.rstrip(b"\r\n")
            if value and not value.isspace():
                events.append(Event(value, ingest_time=now, position=Position(source, 0, number)))
        self._line = line
        return events, at_end

    async def _sleep(self) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(self.poll_interval, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def ack(self, positions: Sequence[Position]) -> None:
        """Record that the lines at ``positions`` are done: write the checkpoint."""
        if not positions:
            return
        done = max(int(p.offset) for p in positions) + 1
        if done <= self._acked:
            return
        self._acked = done
        if self.checkpoint is None:
            return
        async with self._checkpoint_lock:
            await asyncio.to_thread(_write_atomically, self.checkpoint, self._acked)

    async def aclose(self) -> None:
        """Stop reading: a waiting ``read`` returns ``[]``; close the file."""
        self._closed = True
        if self._waiter is not None:
            _wake(self._waiter)
        async with self._read_lock:
            if self._inflight is not None:  # never close the file under the worker thread
                await asyncio.gather(self._inflight, return_exceptions=True)
                self._inflight = None
            if self._file is not None:
                self._file.close()
                self._file = None

    def __repr__(self) -> str:
        return f"<JsonLinesSource {self.name} line={self._line}>"


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _write_atomically(path: Path, line: int) -> None:
    """Replace the checkpoint at ``path`` so that it never holds a partial write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(f"{line}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
