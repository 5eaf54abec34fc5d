"""Observability: Prometheus metrics (every name in :mod:`.metrics`) and latency histograms."""

from .latency import LatencyHistogram
from .metrics import Metrics

__all__ = ["LatencyHistogram", "Metrics"]
