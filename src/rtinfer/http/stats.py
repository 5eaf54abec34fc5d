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

import bisect
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ..observability.metrics import LATENCY_BUCKETS, Metrics

__all__ = ["HttpMetrics", "summarize"]


class _Route:
    """One route's answer times: a count per bucket (the last: +Inf), and their sum."""

    __slots__ = ("buckets", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0


class HttpMetrics(Collector):
    """Counts and times the answers of one HTTP app.

    Every request is counted here, so the counting is plain Python (a dict entry and a
    bucket found by bisection, about a third of what ``prometheus_client``'s locked
    counter and histogram cost); the registry reads it when scraped.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._counts: dict[tuple[str, int], int] = {}
        self._routes: dict[str, _Route] = {}
        metrics.registry.register(self)

    def observe(self, route: str, status: int, seconds: float) -> None:
        counts = self._counts
        key = (route, status)
        counts[key] = counts.get(key, 0) + 1
        timer = self._routes.get(route)
        if timer is None:
            timer = self._routes[route] = _Route()
        timer.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1  # le: <= the bound
        timer.sum += seconds

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            "rtinfer_http_requests",
            "HTTP answers, by route template and status code.",
            labels=["route", "status"],
        )
        for (route, status), count in sorted(self._counts.items()):
            requests.add_metric([route, str(status)], count)
        yield requests
        seconds = HistogramMetricFamily(
            "rtinfer_http_request_seconds",
            "Time from an HTTP request's arrival to its answer being sent, by route template.",
            labels=["route"],
        )
        bounds = [str(b) for b in LATENCY_BUCKETS] + ["+Inf"]
        for route, timer in sorted(self._routes.items()):
            cumulative = itertools.accumulate(timer.buckets)
            buckets = [(b, float(c)) for b, c in zip(bounds, cumulative, strict=True)]
            seconds.add_metric([route], buckets, timer.sum)
        yield seconds

    def snapshot(self) -> dict[str, Any]:
        """Counts by status and the latency buckets of every route together (JSON-able)."""
        by_status: dict[str, int] = {}
        for (_, status), count in self._counts.items():
            by_status[str(status)] = by_status.get(str(status), 0) + count
        buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        for timer in self._routes.values():
            for i, count in enumerate(timer.buckets):
                buckets[i] += count
        return {"by_status": by_status, "cumulative_buckets": list(itertools.accumulate(buckets))}


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
