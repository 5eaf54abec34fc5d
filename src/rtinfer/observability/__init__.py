"""Observability: Prometheus metrics (every name in :mod:`.metrics`), latency histograms,
and the event loop's lag."""

from .latency import LatencyHistogram
from .looplag import LoopLag
from .metrics import Metrics

__all__ = ["LatencyHistogram", "LoopLag", "Metrics"]
