"""A live terminal view of a running pipeline: throughput, latency, and whatever else is counted.

On a terminal it is a ``rich`` table redrawn twice a second; otherwise (a log
file, CI) one plain line every few seconds. Latency percentiles are over the
last interval, taken from the difference between two copies of the
pipeline's latency histogram, so the view costs the hot path nothing.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from ..pipeline import Pipeline

__all__ = ["LiveView"]

Extra = Callable[[], dict[str, str]]


class LiveView:
    """Redraws figures about ``pipeline`` until cancelled; ``extra`` adds rows (name → text)."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        title: str = "rtinfer",
        extra: Extra | None = None,
        stream: TextIO | None = None,
        interval: float | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.title = title
        self.extra = extra
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval or (0.5 if self.tty else 2.0)

    def rows(self, state: dict[str, float], previous: object) -> dict[str, str]:
        """The figures since the last redraw, as name → text."""
        p = self.pipeline
        now = time.perf_counter()
        elapsed = max(now - state["time"], 1e-9)
        rate = (p.events_out + p.dead_count - state["done"]) / elapsed
        window = p.latency.since(previous)  # type: ignore[arg-type]
        state["time"], state["done"] = now, p.events_out + p.dead_count
        rows = {
            "state": p.state.value,
            "events in / out / dead": f"{p.events_in:,} / {p.events_out:,} / {p.dead_count:,}",
            "events/s": f"{rate:,.0f}",
            "latency p50 / p99": (
                f"{window.quantile(0.5) * 1e3:.2f} / {window.quantile(0.99) * 1e3:.2f} ms"
                if window.count
                else "-"
            ),
        }
        if self.extra is not None:
            rows.update(self.extra())
        return rows

    def _table(self, rows: dict[str, str]) -> Table:
        table = Table(title=self.title, show_header=False, min_width=50)
        table.add_column(style="bold")
        table.add_column(justify="right")
        for name, value in rows.items():
            table.add_row(name, value)
        return table

    async def run(self) -> None:
        """Redraw until cancelled."""
        state = {"time": time.perf_counter(), "done": 0.0}
        previous = self.pipeline.latency.copy()
        if not self.tty:
            while True:
                await asyncio.sleep(self.interval)
                rows = self.rows(state, previous)
                previous = self.pipeline.latency.copy()
                print("  ".join(f"{k}: {v}" for k, v in rows.items()), file=self.stream)
        console = Console(file=self.stream)
        with Live(console=console, auto_refresh=False, transient=False) as live:
            try:
                while True:
                    await asyncio.sleep(self.interval)
                    rows = self.rows(state, previous)
                    previous = self.pipeline.latency.copy()
                    live.update(self._table(rows), refresh=True)
            finally:  # cancelled at the end of the run: leave the final figures on screen
                live.update(self._table(self.rows(state, previous)), refresh=True)
