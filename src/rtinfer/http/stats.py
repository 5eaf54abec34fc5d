"""The HTTP front's own metrics, and the run summary made from them.

``rtinfer_http_requests{route, status}`` counts answers and
``rtinfer_http_request_seconds{route}`` times them, on the
:class:`~rtinfer.serving.ModelServer`'s registry, so ``/metrics`` shows them
beside the batchers'. Routes are labelled by template (``/v2/models/{name}/infer``)
so the number of series stays bounded whatever paths clients send.

A :meth:`HttpMetrics.snapshot` is plain JSON (counts by status and the
latency histogram's buckets), so the snapshots of several worker processes
merge by adding them up; :func:`summarize` turns them into the run summary.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter, Histogram

from ..observability.metrics import LATENCY_BUCKETS, Metrics

__all__ = ["HttpMetrics", "summarize"]


class HttpMetrics:
    """Counts and times the answers of one HTTP app."""

    __slots__ = ("_counters", "_timers", "requests", "seconds")

    def __init__(self, metrics: Metrics) -> None:
        self.requests = Counter(
            "rtinfer_http_requests",
            "HTTP answers, by route template and status code.",
            ["route", "status"],
            registry=metrics.registry,
        )
        self.seconds = Histogram(
            "rtinfer_http_request_seconds",
            "Time from an HTTP request's arrival to its answer being sent, by route template.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=metrics.registry,
        )
        self._counters: dict[tuple[str, int], Any] = {}
        self._timers: dict[str, Any] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        # The labelled children, looked up once per route and status (a labels() call
        # takes a lock and builds a tuple each time).
        counter = self._counters.get((route, status))
        if counter is None:
            counter = self._counters[route, status] = self.requests.labels(route, str(status))
        timer = self._timers.get(route)
        if timer is None:
            timer = self._timers[route] = self.seconds.labels(route)
        counter.inc()
        timer.observe(seconds)

    def snapshot(self) -> dict[str, Any]:
        """Counts by status and the latency buckets of every route together (JSON-able)."""
        by_status: dict[str, int] = {}
        for family in self.requests.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    status = sample.labels["status"]
                    by_status[status] = by_status.get(status, 0) + int(sample.value)
        buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        for family in self.seconds.collect():
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    le = sample.labels["le"]
                    index = (
                        len(LATENCY_BUCKETS) if le == "+Inf" else LATENCY_BUCKETS.index(float(le))
                    )
                    buckets[index] += int(sample.value)
        return {"by_status": by_status, "cumulative_buckets": buckets}


def summarize(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The run summary of one or more processes' snapshots.

    Latency percentiles are read from the histogram (linear within a bucket),
    so they are as precise as its buckets; ``null`` when nothing was answered.
    """
    by_status: dict[str, int] = {}
    buckets = [0] * (len(LATENCY_BUCKETS) + 1)
    for snap in snapshots:
        for status, count in snap["by_status"].items():
            by_status[status] = by_status.get(status, 0) + int(count)
        for i, count in enumerate(snap["cumulative_buckets"]):
            buckets[i] += int(count)
    requests = sum(by_status.values())
    errors = {s: n for s, n in sorted(by_status.items()) if int(s) >= 400}
    return {
        "requests": requests,
        "errors": sum(errors.values()),
        "errors_by_status": errors,
        "latency_p50_ms": _quantile(buckets, 0.5),
        "latency_p99_ms": _quantile(buckets, 0.99),
    }


def _quantile(cumulative: list[int], q: float) -> float | None:
    total = cumulative[-1]
    if total == 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0
    for i, count in enumerate(cumulative):
        upper = LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else LATENCY_BUCKETS[-1]
        if count >= rank:
            within = count - lower_count
            fraction = 1.0 if within == 0 else (rank - lower_count) / within
            return round(1e3 * (lower_bound + fraction * (upper - lower_bound)), 3)
        lower_bound, lower_count = upper, count
    return round(1e3 * LATENCY_BUCKETS[-1], 3)
