"""How late the event loop runs what is due: the length of its turns, as a metric.

Everything a process does on its event loop waits for the turn in progress to end: a
request read, an answer written, a finished batch handed back. Under overload a turn
lasts as long as reading and answering every socket that became ready meanwhile (10 to
40 ms were measured refusing 30,000 to 50,000 requests a second), and a request that
needs several turns is late however fast its model. :class:`LoopLag` makes that
visible: a timer due every ``interval`` seconds records how late it ran in
``rtinfer_event_loop_lag_seconds``. Its cost is one timer callback per interval.

High lag with the model's threads idle says the front, not the model, is the
bottleneck: add worker processes, or refuse earlier (a proxy capping connections).
"""

from __future__ import annotations

import asyncio

from prometheus_client import Histogram

__all__ = ["LoopLag"]

#: Seconds between two samples.
INTERVAL_S = 0.1


class LoopLag:
    """Samples the running loop's lateness into ``histogram`` (:meth:`start`, :meth:`stop`)."""

    __slots__ = ("_due", "_handle", "_histogram", "_loop", "interval", "last")

    def __init__(self, histogram: Histogram, interval: float = INTERVAL_S) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be more than 0 seconds, got {interval}")
        self._histogram = histogram
        self.interval = interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        #: The latest sample, in seconds (0 before the first).
        self.last = 0.0

    def start(self) -> None:
        """Sample the running loop from now on (again: nothing more)."""
        if self._handle is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._arm(self._loop.time())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + self.interval
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self.last = max(0.0, now - self._due)
        self._histogram.observe(self.last)
        self._arm(now)
