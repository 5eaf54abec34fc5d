"""Every Prometheus metric rtinfer exports, named in one place.

Each :class:`Metrics` owns its own ``CollectorRegistry``: nothing is
registered at import, and two pipelines in one process (or one test session)
never collide. Per-batch figures go through ``prometheus_client``; the
per-event latency goes through :class:`~rtinfer.observability.LatencyHistogram`,
fed a batch at a time and exposed as an ordinary Prometheus histogram.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from .latency import LatencyHistogram

__all__ = ["Metrics"]

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
LOOP_LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _LatencyCollector(Collector):
    """Exposes the pipelines' end-to-end latency histograms."""

    def __init__(self) -> None:
        self.histograms: dict[str, LatencyHistogram] = {}

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "rtinfer_event_latency_seconds",
            "Time from an event's ingestion to its result being written to the sinks.",
            labels=["pipeline"],
        )
        bounds = list(LATENCY_BUCKETS)
        for name, hist in self.histograms.items():
            cum = hist.cumulative(bounds)
            buckets = [(str(b), float(c)) for b, c in zip(bounds, cum, strict=True)]
            buckets.append(("+Inf", float(hist.count)))
            family.add_metric([name], buckets, hist.sum)
        yield family


class Metrics:
    """The metrics of one rtinfer process (pipelines, models, batchers, resilience)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events_in = Counter(
            "rtinfer_events_in", "Events read from a pipeline's source.", ["pipeline"], registry=r
        )
        self.events_out = Counter(
            "rtinfer_events_out",
            "Results written to a pipeline's sinks.",
            ["pipeline"],
            registry=r,
        )
        self.dead_letters = Counter(
            "rtinfer_dead_letters",
            "Events sent to the dead-letter sink, by the stage that gave up on them.",
            ["pipeline", "stage"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "rtinfer_stage_seconds",
            "Time a batch spent in each pipeline stage.",
            ["pipeline", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "rtinfer_batcher_queue_wait_seconds",
            "Time a request waited in a model's micro-batcher before its batch started.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "rtinfer_batch_size",
            "Rows per model call.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.model_seconds = Histogram(
            "rtinfer_model_seconds",
            "Time of one model call on a batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batcher_rejected = Counter(
            "rtinfer_batcher_rejected",
            "Requests a micro-batcher failed, by reason: before running them (deadline, "
            "overloaded), or while their batch ran past their deadline (overrun).",
            ["model", "reason"],
            registry=r,
        )
        self.batcher_queued = Gauge(
            "rtinfer_batcher_queued_rows",
            "Rows waiting in a model's micro-batcher.",
            ["model"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "rtinfer_consumer_lag", "Events of the source not yet acknowledged by this "
            "pipeline's consumer group (undelivered and in flight), where the broker can tell: "
            "what an autoscaler (KEDA) scales on.", ["pipeline", "source"], registry=r,
        )  # fmt: skip
        # -- resilience (rtinfer.resilience) --
        self.breaker_state = Gauge(
            "rtinfer_breaker_state",
            "State of a circuit breaker: 0 closed, 1 half-open, 2 open.",
            ["breaker"],
            registry=r,
        )
        self.breaker_transitions = Counter(
            "rtinfer_breaker_transitions",
            "Circuit breaker state changes, by the state entered (closed, open, half_open).",
            ["breaker", "state"],
            registry=r,
        )
        self.breaker_rejected = Counter(
            "rtinfer_breaker_rejected",
            "Calls a circuit breaker refused at once because it was open (or half-open with "
            "every probe taken).",
            ["breaker"],
            registry=r,
        )
        self.retries = Counter(
            "rtinfer_retries",
            "Retries made after a failed call, by operation.",
            ["operation"],
            registry=r,
        )
        self.retries_denied = Counter(
            "rtinfer_retries_denied",
            "Retries not made because the retry budget was spent (the error was raised).",
            ["operation"],
            registry=r,
        )
        self.cache_hits = Counter(
            "rtinfer_cache_hits",
            "Rows answered from a prediction cache without running the model.",
            ["cache", "model"],
            registry=r,
        )
        self.cache_misses = Counter(
            "rtinfer_cache_misses",
            "Rows a prediction cache did not hold (the model ran on them).",
            ["cache", "model"],
            registry=r,
        )
        self.cache_errors = Counter(
            "rtinfer_cache_errors",
            "Prediction cache operations that failed or were skipped because the shared "
            "store was unreachable (each counted as a miss, never a failed request).",
            ["cache", "operation"],
            registry=r,
        )
        self.limiter_limit = Gauge(
            "rtinfer_limiter_limit",
            "Current adaptive concurrency limit in front of a model.",
            ["limiter"],
            registry=r,
        )
        self.limiter_in_flight = Gauge(
            "rtinfer_limiter_in_flight",
            "Calls admitted by a concurrency limiter and not yet finished.",
            ["limiter"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "rtinfer_event_loop_lag_seconds",
            "How late the event loop ran a timer due every 0.1 s: the length of its turns. "
            "High while the model's threads idle: the front is the bottleneck.",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        self.limiter_rejected = Counter(
            "rtinfer_limiter_rejected",
            "Calls a limiter shed, by priority (critical, best_effort) and reason (limit, quota).",
            ["limiter", "priority", "reason"],
            registry=r,
        )
        self.fallback_outputs = Counter(
            "rtinfer_fallback_outputs",
            "Rows answered by each step of a fallback chain (the first step is the primary).",
            ["chain", "step"],
            registry=r,
        )
        self.fallback_failures = Counter(
            "rtinfer_fallback_failures",
            "Failures of a fallback chain's step that sent its rows on to the next step.",
            ["chain", "step"],
            registry=r,
        )
        # -- model updates (rtinfer.repository) --
        self.canary_requests = Counter(
            "rtinfer_canary_requests",
            "Requests naming no version routed while a model has a canary, by the version "
            "that got them (the candidate's, or 'default').",
            ["model", "version"],
            registry=r,
        )
        self.shadow_compared = Counter(
            "rtinfer_shadow_compared",
            "Requests whose answer a shadow candidate also computed, and that were compared.",
            ["model", "candidate"],
            registry=r,
        )
        self.shadow_mismatch = Counter(
            "rtinfer_shadow_mismatch",
            "Compared requests whose shadow answer differed from the default's by more than "
            "the tolerance.",
            ["model", "candidate"],
            registry=r,
        )
        self.shadow_difference = Histogram(
            "rtinfer_shadow_max_abs_difference",
            "Largest absolute difference between a shadow's answer and the default's, per "
            "compared request (answers that cannot be compared are only mismatches).",
            ["model", "candidate"],
            buckets=(0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.1, 1.0, 10.0),
            registry=r,
        )
        self.shadow_skipped = Counter(
            "rtinfer_shadow_skipped",
            "Requests a shadow did not compare, by reason (busy: too many copies running; "
            "overloaded, deadline, failed: the candidate's).",
            ["model", "candidate", "reason"],
            registry=r,
        )
        self._latency = _LatencyCollector()
        r.register(self._latency)

    def latency(self, pipeline: str) -> LatencyHistogram:
        """The end-to-end latency histogram of one pipeline (created on first use)."""
        hist = self._latency.histograms.get(pipeline)
        if hist is None:
            hist = self._latency.histograms[pipeline] = LatencyHistogram()
        return hist

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return bytes(generate_latest(self.registry))
