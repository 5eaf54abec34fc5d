"""Staying fast and correct under overload and faults.

Small pieces, each usable alone, each async-friendly and tested with a fake clock:

- :mod:`.breaker`: :class:`CircuitBreaker` (closed, open, half-open) around any call;
- :mod:`.retry`: :class:`Retry` with jittered exponential :class:`Backoff`, paid from a
  :class:`RetryBudget` (about 10% extra load at most);
- :mod:`.limiter`: :class:`AdaptiveLimiter`, an adaptive concurrency limit with
  :class:`Priority` classes, and :class:`ClientQuota` for per-client quotas;
- :mod:`.cache`: :class:`PredictionCache` over a :class:`MemoryStore` or a
  :class:`RedisStore`, per row, keyed by model version and input hash;
- :mod:`.fallback`: :class:`FallbackChain` of :class:`Step`\\ s, each answer tagged with
  the step that produced it.

Deadlines are the micro-batcher's (:mod:`rtinfer.batching`): it runs the earliest
deadline first and never runs an expired request. See ``docs/resilience.md``.
"""

from .breaker import BreakerState, CircuitBreaker, counts_as_failure
from .cache import MemoryStore, PredictionCache, RedisStore, is_deterministic, row_keys
from .fallback import Answer, FallbackChain, Step
from .limiter import AdaptiveLimiter, ClientQuota, Permit, Priority, parse_priority
from .retry import Backoff, Retry, RetryBudget, is_transient

__all__ = [
    "AdaptiveLimiter",
    "Answer",
    "Backoff",
    "BreakerState",
    "CircuitBreaker",
    "ClientQuota",
    "FallbackChain",
    "MemoryStore",
    "Permit",
    "PredictionCache",
    "Priority",
    "RedisStore",
    "Retry",
    "RetryBudget",
    "Step",
    "counts_as_failure",
    "is_deterministic",
    "is_transient",
    "parse_priority",
    "row_keys",
]
