"""Circuit breakers: stop calling a dependency that keeps failing, and probe it to recover.

A breaker is **closed** while calls succeed. It **opens** when too many fail: a run of
``consecutive_failures`` failures, or (with ``failure_rate``) that share of the last
``window`` calls once at least ``min_calls`` have been seen. While open, every call fails
at once with :class:`~rtinfer.exceptions.CircuitOpen` (an ``Overloaded``: fronts answer
503 with ``Retry-After``, a fallback chain moves to its next step), and the dependency
gets time to recover. After ``open_seconds`` it is **half-open**: up to ``probes`` calls
go through; as many successes close it, any failure opens it again.

A call counts as a failure when it raises an error ``is_failure`` accepts (by default
every exception but the caller's own mistakes: bad inputs, a spent quota, another open
breaker) or, with ``slow_call_seconds``, when it succeeds but takes longer than that: a
model that answers too late is as useless as one that fails. A cancelled call counts as
nothing.

::

    breaker = CircuitBreaker("model:fraud", consecutive_failures=5, open_seconds=5)
    with breaker.guard():           # sync or async code alike
        outputs = await batcher.submit(inputs)
    outputs = await breaker.call(batcher.submit, inputs)   # the same

The state is exported as ``rtinfer_breaker_state{breaker}`` (0 closed, 1 half-open,
2 open, read at each scrape), with ``rtinfer_breaker_transitions_total{breaker,state}``
and ``rtinfer_breaker_rejected_total{breaker}``. Time comes from ``clock`` (monotonic
seconds), so tests drive it by hand. A breaker may be shared by threads.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

from ..exceptions import CircuitOpen, ModelInputError, QuotaExceeded
from ..observability.metrics import Metrics

__all__ = ["BreakerState", "CircuitBreaker", "counts_as_failure"]

P = ParamSpec("P")
T = TypeVar("T")

Clock = Callable[[], float]


class BreakerState(enum.Enum):
    """Where a breaker stands; ``value`` is what ``rtinfer_breaker_state`` exports."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2

    @property
    def label(self) -> str:
        """The lower-case name used in metrics and messages (``half_open``)."""
        return self.name.lower()


def counts_as_failure(exc: BaseException) -> bool:
    """The default ``is_failure``: every exception but the caller's own mistakes.

    Bad inputs (:class:`ModelInputError`), a client's spent quota and another open
    breaker say nothing about the dependency's health.
    """
    return isinstance(exc, Exception) and not isinstance(
        exc, ModelInputError | QuotaExceeded | CircuitOpen
    )


class CircuitBreaker:
    """Closed, open, half-open, around any call (see the module's docstring).

    ``name`` labels the metrics and messages (``model:fraud``, ``sink:kafka``,
    ``cache:redis``). Keyword-only settings:

    - ``consecutive_failures``: failures in a row that open it (default 5);
    - ``failure_rate``: also open when this share (0 to 1) of the last ``window`` calls
      failed, once ``min_calls`` calls are in the window (default ``None``: off);
    - ``open_seconds``: how long it stays open before probing (default 5);
    - ``probes``: calls let through while half-open, and successes needed to close;
    - ``slow_call_seconds``: a successful call slower than this counts as a failure;
    - ``is_failure``: which exceptions count (default :func:`counts_as_failure`);
    - ``clock``: monotonic seconds, for tests; ``metrics``: where to export the state.
    """

    __slots__ = (
        "_clock",
        "_consecutive",
        "_lock",
        "_m_rejected",
        "_m_transitions",
        "_opened_at",
        "_probe_successes",
        "_probes_in_flight",
        "_state",
        "_window",
        "_window_failures",
        "consecutive_failures",
        "failure_rate",
        "is_failure",
        "metrics",
        "min_calls",
        "name",
        "open_seconds",
        "probes",
        "slow_call_seconds",
    )

    def __init__(
        self,
        name: str,
        *,
        consecutive_failures: int = 5,
        failure_rate: float | None = None,
        window: int = 100,
        min_calls: int = 20,
        open_seconds: float = 5.0,
        probes: int = 1,
        slow_call_seconds: float | None = None,
        is_failure: Callable[[BaseException], bool] = counts_as_failure,
        clock: Clock = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        if consecutive_failures < 1:
            raise ValueError(f"consecutive_failures must be at least 1, got {consecutive_failures}")
        if failure_rate is not None and not 0 < failure_rate <= 1:
            raise ValueError(f"failure_rate must be in (0, 1], got {failure_rate}")
        if window < 1 or not 1 <= min_calls <= window:
            raise ValueError(
                f"need 1 <= min_calls <= window, got min_calls={min_calls}, window={window}"
            )
        if open_seconds <= 0:
            raise ValueError(f"open_seconds must be more than 0, got {open_seconds}")
        if probes < 1:
            raise ValueError(f"probes must be at least 1, got {probes}")
        if slow_call_seconds is not None and slow_call_seconds <= 0:
            raise ValueError(f"slow_call_seconds must be more than 0, got {slow_call_seconds}")
        self.name = name
        self.consecutive_failures = consecutive_failures
        self.failure_rate = failure_rate
        self.min_calls = min_calls
        self.open_seconds = open_seconds
        self.probes = probes
        self.slow_call_seconds = slow_call_seconds
        self.is_failure = is_failure
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._consecutive = 0
        self._window: deque[bool] = deque(maxlen=window)  # True: a failure
        self._window_failures = 0
        self._probes_in_flight = 0
        self._probe_successes = 0
        self.metrics = metrics or Metrics()
        self.metrics.breaker_state.labels(name).set_function(lambda: self.state.value)
        self._m_transitions = {
            s: self.metrics.breaker_transitions.labels(name, s.label) for s in BreakerState
        }
        self._m_rejected = self.metrics.breaker_rejected.labels(name)

    # -- state ------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker reads half-open once ``open_seconds`` passed)."""
        with self._lock:
            return self._current()

    def _current(self) -> BreakerState:
        if (
            self._state is BreakerState.OPEN
            and self._clock() - self._opened_at >= self.open_seconds
        ):
            self._enter(BreakerState.HALF_OPEN)
        return self._state

    def _enter(self, state: BreakerState) -> None:
        self._state = state
        self._m_transitions[state].inc()
        self._probes_in_flight = 0
        self._probe_successes = 0
        if state is BreakerState.OPEN:
            self._opened_at = self._clock()
        elif state is BreakerState.CLOSED:
            self._consecutive = 0
            self._window.clear()
            self._window_failures = 0

    def retry_after(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when it is not open)."""
        with self._lock:
            if self._current() is not BreakerState.OPEN:
                return 0.0
            return max(0.0, self._opened_at + self.open_seconds - self._clock())

    # -- calls ------------------------------------------------------------------

    def acquire(self) -> bool:
        """Ask to make one call: raise :class:`CircuitOpen` if refused.

        Returns whether the call is a half-open probe; pass that to :meth:`release`,
        which must follow every successful ``acquire`` (:meth:`guard` does both).
        """
        with self._lock:
            state = self._current()
            if state is BreakerState.CLOSED:
                return False
            if state is BreakerState.HALF_OPEN and self._probes_in_flight < self.probes:
                self._probes_in_flight += 1
                return True
            wait = max(0.0, self._opened_at + self.open_seconds - self._clock())
        self._m_rejected.inc()
        raise CircuitOpen(
            f"circuit breaker {self.name!r} is {state.label} after repeated failures; "
            + (
                f"it lets a probe through in {wait:.1f} s"
                if state is BreakerState.OPEN
                else f"its {self.probes} probe call(s) are still running"
            )
            + "; retry then, or add a fallback step",
            breaker=self.name,
            retry_after=max(wait, 0.1),
        )

    def release(self, probe: bool, error: BaseException | None, seconds: float) -> None:
        """Report how a call admitted by :meth:`acquire` ended.

        ``error`` is what it raised (``None``: it succeeded); ``seconds`` how long it took.
        A cancellation (not an ``Exception``) frees the probe and counts as nothing.
        """
        if error is not None and not isinstance(error, Exception):
            if probe:
                with self._lock:
                    self._probes_in_flight = max(0, self._probes_in_flight - 1)
            return
        failed = self.is_failure(error) if error is not None else False
        if not failed and self.slow_call_seconds is not None:
            failed = seconds > self.slow_call_seconds
        with self._lock:
            if probe:
                self._probes_in_flight = max(0, self._probes_in_flight - 1)
            if self._state is BreakerState.HALF_OPEN:
                if not probe:
                    return  # a call admitted before the breaker opened: old news
                if failed:
                    self._enter(BreakerState.OPEN)
                else:
                    self._probe_successes += 1
                    if self._probe_successes >= self.probes:
                        self._enter(BreakerState.CLOSED)
                return
            if self._state is BreakerState.OPEN:
                return  # admitted before it opened
            self._record(failed)

    def _record(self, failed: bool) -> None:
        window = self._window
        if len(window) == window.maxlen and window[0]:
            self._window_failures -= 1
        window.append(failed)
        if failed:
            self._window_failures += 1
            self._consecutive += 1
        else:
            self._consecutive = 0
        if self._consecutive >= self.consecutive_failures or (
            self.failure_rate is not None
            and len(window) >= self.min_calls
            and self._window_failures >= self.failure_rate * len(window)
        ):
            self._enter(BreakerState.OPEN)

    def record_success(self) -> None:
        """Count a success of a call made without :meth:`acquire` (a closed-state report)."""
        self.release(False, None, 0.0)

    def record_failure(self, error: BaseException) -> None:
        """Count a failure of a call made without :meth:`acquire` (a closed-state report)."""
        self.release(False, error, 0.0)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """``with breaker.guard(): ...``: refuse at once when open, else time and record."""
        probe = self.acquire()
        started = self._clock()
        try:
            yield
        except BaseException as exc:
            self.release(probe, exc, self._clock() - started)
            raise
        self.release(probe, None, self._clock() - started)

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Await ``fn(*args, **kwargs)`` through the breaker."""
        with self.guard():
            return await fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} {self.state.label}>"
