"""Retries that cannot amplify an outage: jittered exponential backoff under a retry budget.

A retry helps when a failure is brief (a dropped connection, a broker's leader
moving); during an outage it multiplies the load on whatever is already failing. So
every retry here is paid for from a :class:`RetryBudget`, a token bucket that each
first attempt fills by ``ratio`` (default 0.1) of a token and each retry empties by
one: retries stay at about 10% of the calls on top of a small allowance per second
(``min_per_second``, so a quiet service can still retry). When the budget is spent the
error is raised at once. Waits between attempts follow :class:`Backoff` ("full
jitter": a random wait between 0 and an exponentially growing cap), so callers that
failed together do not come back together, and no wait runs past the call's deadline.

::

    budget = RetryBudget(ratio=0.1)
    retry = Retry("sink:kafka", attempts=3, budget=budget)
    await retry.run(lambda: sink.flush(), deadline=event.deadline)

One budget may be shared by every :class:`Retry` in front of one dependency.
Retries are counted in ``rtinfer_retries_total{operation}`` and the ones the budget
refused in ``rtinfer_retries_denied_total{operation}``.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..observability.metrics import Metrics

__all__ = ["Backoff", "Retry", "RetryBudget", "is_transient"]

T = TypeVar("T")
Clock = Callable[[], float]


_LASTING = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def is_transient(exc: BaseException) -> bool:
    """The default ``retry_on``: network and timeout errors, which a retry may outlive.

    ``Overloaded`` (and so an open breaker or a spent quota), bad inputs and passed
    deadlines are not retried: a retry would only add load or fail the same way.
    """
    if isinstance(exc, _LASTING):  # a missing file or a refused permission stays so
        return False
    if isinstance(exc, OSError | TimeoutError):
        return True
    # redis-py's and some brokers' connection errors do not derive from OSError.
    return type(exc).__name__ in {"ConnectionError", "TimeoutError", "KafkaConnectionError"}


class RetryBudget:
    """A token bucket that caps retries at ``ratio`` of the calls (plus a small floor).

    Each call deposits ``ratio`` tokens (:meth:`deposit`); each retry withdraws one
    (:meth:`withdraw`, false when fewer than one is left). ``min_per_second`` tokens are
    also added per second of ``clock`` time, and the bucket holds at most ``max_tokens``,
    so a burst of failures after a long quiet spell cannot spend a large saving. Over any
    period, retries <= ``ratio * calls + min_per_second * seconds`` + ``max_tokens``.
    Shared by threads safely.
    """

    __slots__ = ("_clock", "_last", "_lock", "_tokens", "max_tokens", "min_per_second", "ratio")

    def __init__(
        self,
        ratio: float = 0.1,
        *,
        min_per_second: float = 1.0,
        max_tokens: float = 10.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if not 0 <= ratio <= 1:
            raise ValueError(f"ratio must be between 0 and 1 (0.1: 10% extra load), got {ratio}")
        if min_per_second < 0:
            raise ValueError(f"min_per_second must be 0 or more, got {min_per_second}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1 (one retry), got {max_tokens}")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.max_tokens = max_tokens
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = max_tokens
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.max_tokens, self._tokens + (now - self._last) * self.min_per_second)
        self._last = now

    def deposit(self) -> None:
        """Count one call (a first attempt)."""
        with self._lock:
            self._refill()
            self._tokens = min(self.max_tokens, self._tokens + self.ratio)

    def withdraw(self) -> bool:
        """Take the token for one retry; false (and nothing taken) when the budget is spent."""
        with self._lock:
            self._refill()
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True

    @property
    def tokens(self) -> float:
        """Retries the budget would allow now."""
        with self._lock:
            self._refill()
            return self._tokens


class Backoff:
    """Exponential backoff with full jitter: attempt ``n`` waits ``uniform(0, cap_n)``.

    ``cap_n = min(max_delay, base * multiplier ** n)`` seconds, ``n`` counting from 0
    for the wait before the first retry.
    """

    __slots__ = ("base", "max_delay", "multiplier", "rng")

    def __init__(
        self,
        base: float = 0.01,
        *,
        multiplier: float = 2.0,
        max_delay: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        if base <= 0 or max_delay < base or multiplier < 1:
            raise ValueError(
                f"need 0 < base <= max_delay and multiplier >= 1, got base={base}, "
                f"max_delay={max_delay}, multiplier={multiplier}"
            )
        self.base = base
        self.multiplier = multiplier
        self.max_delay = max_delay
        self.rng = rng or random.Random()  # noqa: S311  # jitter needs no secrecy

    def cap(self, attempt: int) -> float:
        """The longest wait before retry number ``attempt`` (from 0)."""
        return min(self.max_delay, self.base * self.multiplier**attempt)

    def delay(self, attempt: int) -> float:
        """A random wait before retry number ``attempt`` (from 0)."""
        return self.rng.uniform(0.0, self.cap(attempt))


class Retry:
    """Runs an async call up to ``attempts`` times, paying each retry from ``budget``.

    ``retry_on`` says which errors are worth a retry (default :func:`is_transient`);
    any other error, a spent budget, or a wait that would end past the call's deadline
    raises the last error at once. ``sleep`` and ``wall`` (the ``time.time()`` clock of
    deadlines) are injectable for tests. Without a ``budget`` retries are unbounded by
    load: give one to anything that faces an outage.
    """

    __slots__ = (
        "_m_denied",
        "_m_retries",
        "attempts",
        "backoff",
        "budget",
        "name",
        "retry_on",
        "sleep",
        "wall",
    )

    def __init__(
        self,
        name: str,
        *,
        attempts: int = 3,
        backoff: Backoff | None = None,
        budget: RetryBudget | None = None,
        retry_on: Callable[[BaseException], bool] = is_transient,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        wall: Clock = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1 (1: no retry), got {attempts}")
        self.name = name
        self.attempts = attempts
        self.backoff = backoff or Backoff()
        self.budget = budget
        self.retry_on = retry_on
        self.sleep = sleep
        self.wall = wall
        metrics = metrics or Metrics()
        self._m_retries = metrics.retries.labels(name)
        self._m_denied = metrics.retries_denied.labels(name)

    async def run(self, call: Callable[[], Awaitable[T]], *, deadline: float | None = None) -> T:
        """Await ``call()``, retrying as configured; ``deadline`` is a ``time.time()`` instant."""
        if self.budget is not None:
            self.budget.deposit()
        attempt = 0
        while True:
            try:
                return await call()
            except Exception as exc:
                attempt += 1
                if attempt >= self.attempts or not self.retry_on(exc):
                    raise
                wait = self.backoff.delay(attempt - 1)
                if deadline is not None and self.wall() + wait >= deadline:
                    raise
                if self.budget is not None and not self.budget.withdraw():
                    self._m_denied.inc()
                    raise
                self._m_retries.inc()
            await self.sleep(wait)
