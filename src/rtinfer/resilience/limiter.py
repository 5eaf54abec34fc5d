"""Admission control: an adaptive concurrency limit in front of a model, with priorities.

:class:`AdaptiveLimiter` lets at most ``limit`` calls run at once and moves ``limit``
with the latency it measures, in the manner of Netflix's Gradient2: it keeps a
long-term average of the call time (the latency the model gives when it is not
queueing) and compares each new sample with it. While samples stay near the average
the limit grows by a small queue allowance (``queue_size``); when they rise, the
limit shrinks in proportion (by at most half per step, smoothed), so the queue in
front of the model, and with it the latency, stays short. When the callers do not use
half the limit it stops growing (it would learn nothing). A ``latency_target``
(``rtinfer serve`` sets a third of ``--slo-ms``) is a setpoint: a call faster than it
never shrinks the limit (a micro-batched model's latency rises with its queue by design,
and shedding calls that would meet the SLO only loses work), and a slower one shrinks it
by ``target / rtt`` at least, even once the long-term average has followed a lasting
overload up.

With a ``latency_target``, the limit also has a ceiling from Little's law: twice the
target times the calls answered a second (over the last :data:`CEILING_WINDOW_S`, and
never under :data:`CEILING_FLOOR`). More calls in flight than that wait, on average,
longer than twice the target, wherever they wait. It matters where the samples cannot
see the wait: a model cheaper than its request's HTTP keeps its call time short while
the requests queue in front of the event loop, and the gradient alone would let the
limit grow with them (measured: three times the answers in time at 1.5 and 2 times
capacity). A window that ends with less than half the limit in flight only raises it.
A quiet window (an answer left no call in flight, none was refused or waits, and
``calm`` says what runs around the calls keeps time: ``rtinfer serve``'s event loop is
not late, as it is where the loop is the bottleneck and the ceiling must hold) measured
the callers' pace, not the model's: it lifts the ceiling and brings the limit back
towards its start by ``smoothing``, so what an overload taught does not outlive it.
Without that, one burst at 40% load left the limit at the floor of 20 for good, and
every later burst of 150 (a 0.15 s pause upstream, then its backlog at once) was 90%
refused where the first had been answered within the SLO (``rtinfer serve``, 120-layer
stand-in on one core).

A call's sample is its time since admission, or, when its caller knows it
(:attr:`Permit.service`, what ``rtinfer serve`` sets from the batcher), its time in front
of and in the model alone: under overload a busy event loop's turns are most of a
request's time, and a limit that shrank for them would starve the model while admitting
fewer shortens none of them.

Two traffic classes: ``critical`` calls are admitted up to the limit,
``best_effort`` ones only up to ``best_effort_share`` of it (default 80%), so under
load best-effort traffic is shed first and critical traffic keeps its room.

Over the limit, :meth:`AdaptiveLimiter.try_acquire` (what a request front wants)
raises :class:`~rtinfer.exceptions.Overloaded` with ``retry_after`` at once: HTTP 503
and ``Retry-After``, gRPC ``UNAVAILABLE``. :meth:`AdaptiveLimiter.acquire`
(what a stream wants) waits for room instead, critical waiters first, so the stream's
queue fills and its source pauses: nothing is dropped.

::

    limiter = AdaptiveLimiter("fraud", initial_limit=16)
    async with limiter.admit(Priority.BEST_EFFORT):          # raises Overloaded when full
        outputs = await batcher.submit(inputs)
    async with limiter.admit(Priority.CRITICAL, wait=True):  # a stream waits for room
        outputs = await batcher.submit(inputs, wait=True)

:class:`ClientQuota` is a per-client token bucket for the 429 answer: ``check(client)``
raises :class:`~rtinfer.exceptions.QuotaExceeded` when a client is over its rate.

Metrics: ``rtinfer_limiter_limit{limiter}``, ``rtinfer_limiter_in_flight{limiter}`` and
``rtinfer_limiter_rejected_total{limiter,priority,reason}``. ``clock`` (monotonic
seconds) is injectable, so tests decide every latency. Use a limiter from one event loop.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from ..exceptions import DeadlineExceeded, Overloaded, QuotaExceeded
from ..observability.metrics import Metrics

__all__ = ["AdaptiveLimiter", "ClientQuota", "Permit", "Priority", "parse_priority"]

Clock = Callable[[], float]

#: Seconds of answers behind each new ceiling (see the module).
CEILING_WINDOW_S = 0.1
#: The ceiling never goes below this many calls in flight.
CEILING_FLOOR = 20.0


class Priority(enum.Enum):
    """A traffic class. Best-effort traffic is shed before critical traffic."""

    CRITICAL = "critical"
    BEST_EFFORT = "best_effort"


def parse_priority(value: str | bytes | None, default: Priority = Priority.CRITICAL) -> Priority:
    """A priority from a header or config value (``critical``, ``best_effort``/``best-effort``).

    ``None`` or an empty value gives ``default``; anything else is a ``ValueError`` that
    names the accepted values.
    """
    if value is None:
        return default
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    text = value.strip().lower().replace("-", "_")
    if not text:
        return default
    try:
        return Priority(text)
    except ValueError:
        raise ValueError(f"unknown priority {value!r}; use 'critical' or 'best_effort'") from None


class Permit:
    """One admitted call. Call :meth:`release` exactly once when it ends."""

    __slots__ = ("_limiter", "in_flight", "priority", "released", "service", "started")

    def __init__(
        self, limiter: AdaptiveLimiter, priority: Priority, started: float, in_flight: int
    ) -> None:
        self._limiter = limiter
        self.priority = priority
        self.started = started
        #: Calls in flight when this one was admitted, itself included.
        self.in_flight = in_flight
        self.released = False
        #: The call's time in front of and in the model alone, when its caller knows it
        #: (seconds; the batcher's :class:`~rtinfer.batching.ServiceTime`): the sample
        #: instead of the time since admission, which also counts the turns a busy event
        #: loop takes to read, hand over and answer the call, and that no limit shortens.
        self.service: float | None = None

    def release(self, *, ok: bool = True, dropped: bool = False) -> None:
        """End the call. ``ok``: it succeeded, so its time is a latency sample.

        ``dropped``: it timed out or missed its deadline, a sign of overload, so the
        limit is cut. A call that failed otherwise (``ok=False``) teaches nothing.
        """
        if self.released:
            return
        self.released = True
        self._limiter._release(self, ok=ok, dropped=dropped)


class AdaptiveLimiter:
    """An adaptive concurrency limit with two priorities (see the module's docstring).

    Settings (keyword-only): ``initial_limit``, ``min_limit`` and ``max_limit`` (calls);
    ``best_effort_share`` (0 to 1) of the limit open to best-effort calls; ``tolerance``:
    how much slower than the long-term average a sample may be before the limit shrinks
    (1.5); ``smoothing`` (0 to 1) of each step applied (0.2); ``long_window``: samples in
    the long-term average (600); ``queue_size``: the allowance added per step, a function of
    the limit (default ``sqrt(limit)``, at least 1); ``backoff_ratio``: the cut on a dropped
    call (0.9; once per call time at most); ``retry_after``: the seconds a refused caller is
    told to wait; ``latency_target``: seconds under which a call's time is no reason to
    shrink the limit (``None``: every sample counts); ``calm``: whether what runs around
    the calls keeps time now (``rtinfer serve``: its event loop's lag is short), without
    which no window counts as quiet (see the module).
    """

    def __init__(
        self,
        name: str,
        *,
        initial_limit: float = 20,
        min_limit: float = 1,
        max_limit: float = 1000,
        best_effort_share: float = 0.8,
        tolerance: float = 1.5,
        smoothing: float = 0.2,
        long_window: int = 600,
        queue_size: Callable[[float], float] | None = None,
        backoff_ratio: float = 0.9,
        retry_after: float = 1.0,
        latency_target: float | None = None,
        calm: Callable[[], bool] | None = None,
        clock: Clock = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        if not 1 <= min_limit <= initial_limit <= max_limit:
            raise ValueError(
                "need 1 <= min_limit <= initial_limit <= max_limit, got "
                f"min_limit={min_limit}, initial_limit={initial_limit}, max_limit={max_limit}"
            )
        if not 0 < best_effort_share <= 1:
            raise ValueError(f"best_effort_share must be in (0, 1], got {best_effort_share}")
        if tolerance < 1:
            raise ValueError(f"tolerance must be at least 1, got {tolerance}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        if latency_target is not None and latency_target <= 0:
            raise ValueError(f"latency_target must be more than 0 seconds, got {latency_target}")
        if long_window < 1:
            raise ValueError(f"long_window must be at least 1 sample, got {long_window}")
        if not 0 < backoff_ratio < 1:
            raise ValueError(f"backoff_ratio must be in (0, 1), got {backoff_ratio}")
        self.name = name
        self.min_limit = float(min_limit)
        self.max_limit = float(max_limit)
        self.best_effort_share = best_effort_share
        self.tolerance = tolerance
        self.smoothing = smoothing
        self.long_window = long_window
        self.queue_size = queue_size or (lambda limit: max(1.0, math.sqrt(limit)))
        self.backoff_ratio = backoff_ratio
        self.retry_after = retry_after
        self.latency_target = latency_target
        self._calm = calm
        self._clock = clock
        self._limit = self._initial = float(initial_limit)
        self._in_flight = 0
        self._heads = 0  # heads let through this turn of the loop (see refuses_head)
        self._long_rtt = 0.0
        self._samples = 0
        self._last_cut = -math.inf  # when a dropped call last cut the limit
        # The ceiling from Little's law (see the module): calls answered since the window
        # began, when it began, and the ceiling they gave.
        self._answered = 0
        self._window = clock()
        self._idled = False  # an answer in the window left no call in flight
        self._refusals = 0  # calls refused in the window
        self._ceiling = self.max_limit
        self._waiters: dict[Priority, deque[asyncio.Future[Permit]]] = {
            Priority.CRITICAL: deque(),
            Priority.BEST_EFFORT: deque(),
        }
        # The same queues by name (an Enum key hashes in Python: slow on the hot path).
        self._critical_waiters = self._waiters[Priority.CRITICAL]
        self._best_effort_waiters = self._waiters[Priority.BEST_EFFORT]
        self.metrics = metrics or Metrics()
        self.metrics.limiter_limit.labels(name).set_function(lambda: self._limit)
        self.metrics.limiter_in_flight.labels(name).set_function(lambda: self._in_flight)
        self._m_rejected = {
            p: self.metrics.limiter_rejected.labels(name, p.value, "limit") for p in Priority
        }
        # The same by name (see the waiters): counted on every refusal.
        self._m_rejected_critical = self._m_rejected[Priority.CRITICAL]
        self._m_rejected_best_effort = self._m_rejected[Priority.BEST_EFFORT]

    @property
    def limit(self) -> int:
        """Calls admitted at once now (critical); best-effort calls get a share of it."""
        return math.floor(self._limit)

    @property
    def in_flight(self) -> int:
        """Calls admitted and not yet released."""
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Callers waiting for room (:meth:`acquire`: a stream whose source has paused)."""
        return sum(not f.done() for waiters in self._waiters.values() for f in waiters)

    @property
    def long_rtt(self) -> float:
        """The long-term average call time, in seconds (0 before the first sample)."""
        return self._long_rtt

    def _room(self, priority: Priority, taken: int = 0) -> bool:
        used = self._in_flight + taken
        if priority is Priority.CRITICAL:
            return used + 1 <= self._limit  # below floor(limit): room for one
        return used < self._limit * self.best_effort_share

    def _queued(self, priority: Priority) -> bool:
        """Whether callers of this priority or a higher one wait (they go first)."""
        for p in (Priority.CRITICAL, Priority.BEST_EFFORT):
            waiters = self._waiters[p]
            while waiters and waiters[0].done():  # left while waiting
                waiters.popleft()
            if waiters:
                return True
            if p is priority:
                return False
        return False

    def _admit(self, priority: Priority) -> Permit:
        self._in_flight += 1
        return Permit(self, priority, self._clock(), self._in_flight)

    def refuses(self, priority: Priority = Priority.CRITICAL) -> bool:
        """Whether :meth:`try_acquire` would refuse a call of ``priority`` now; a refusal
        is counted (``rtinfer_limiter_rejected_total``). For a front that refuses before it
        builds the request: rtinfer's HTTP server asks with only the request's head read."""
        if self._room(priority) and (self._no_waiters() or not self._queued(priority)):
            return False
        return self._refused(priority)

    def refuses_head(self, priority: Priority = Priority.CRITICAL) -> bool:
        """As :meth:`refuses`, for a request of which only the head is read (call it on
        the loop). One let through holds its place until the loop's next turn: every
        head read in one turn comes before any of their requests is admitted (that
        happens in their tasks, which the loop runs after its reads), so without it a
        turn that read a hundred heads while one place was free would let all hundred
        through, to be refused later at several times the cost. Its place is given back
        when the loop next runs its callbacks, before the requests' tasks run, whether or
        not its request is ever admitted: nothing is held longer."""
        if self._room(priority, self._heads) and (self._no_waiters() or not self._queued(priority)):
            if not self._heads:
                asyncio.get_running_loop().call_soon(self._clear_heads)
            self._heads += 1
            return False
        return self._refused(priority)

    def _clear_heads(self) -> None:
        self._heads = 0

    def _refused(self, priority: Priority) -> bool:
        """Count a refusal (``True``)."""
        self._refusals += 1
        if priority is Priority.CRITICAL:
            self._m_rejected_critical.inc()
        else:
            self._m_rejected_best_effort.inc()
        return True

    def try_acquire(self, priority: Priority = Priority.CRITICAL) -> Permit:
        """Admit a call now, or raise :class:`Overloaded` (with ``retry_after``) at once."""
        if not self.refuses(priority):
            return self._admit(priority)
        raise Overloaded(
            f"model {self.name!r} is at its concurrency limit ({self._in_flight} calls in "
            f"flight, limit {self.limit}"
            + (
                f", {math.floor(self._limit * self.best_effort_share)} for best-effort calls"
                if priority is Priority.BEST_EFFORT
                else ""
            )
            + f"); {priority.value} call shed, retry after {self.retry_after:g} s",
            retry_after=self.retry_after,
        )

    async def acquire(self, priority: Priority = Priority.CRITICAL) -> Permit:
        """Admit a call, waiting for room if need be (critical waiters go first)."""
        if self._room(priority) and not self._queued(priority):
            return self._admit(priority)
        future: asyncio.Future[Permit] = asyncio.get_running_loop().create_future()
        self._waiters[priority].append(future)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                future.result().release(ok=False)  # admitted as the caller left
            raise

    @asynccontextmanager
    async def admit(
        self, priority: Priority = Priority.CRITICAL, *, wait: bool = False
    ) -> AsyncIterator[Permit]:
        """``async with limiter.admit(priority):`` the call, released however it ends.

        ``wait=False`` raises :class:`Overloaded` when there is no room; ``wait=True``
        waits. A ``TimeoutError`` or :class:`DeadlineExceeded` from the call counts as
        dropped (the limit is cut); another error teaches nothing.
        """
        permit = await self.acquire(priority) if wait else self.try_acquire(priority)
        try:
            yield permit
        except BaseException as exc:
            permit.release(ok=False, dropped=isinstance(exc, TimeoutError | DeadlineExceeded))
            raise
        permit.release()

    def _release(self, permit: Permit, *, ok: bool, dropped: bool) -> None:
        self._in_flight -= 1
        if dropped:
            # One cut per call time at most: the calls of one batch miss their deadline
            # together, and sixty cuts for one late batch would take the limit to its floor.
            now = self._clock()
            if now - self._last_cut >= self._long_rtt:
                self._last_cut = now
                self._limit = max(self.min_limit, self._limit * self.backoff_ratio)
        elif ok:
            service = permit.service
            now = self._clock()
            if self.latency_target is not None:
                self._count_answer(now)
            self._sample(now - permit.started if service is None else service, permit.in_flight)
        self._wake()

    def _count_answer(self, now: float) -> None:
        """Every :data:`CEILING_WINDOW_S`: the most calls in flight that the answers of the
        window allow within twice the latency target, on average (Little's law)."""
        self._answered += 1
        elapsed = now - self._window
        if elapsed < CEILING_WINDOW_S:
            if not self._in_flight:
                self._idled = True
            return
        assert self.latency_target is not None
        ceiling = max(CEILING_FLOOR, 2.0 * self.latency_target * self._answered / elapsed)
        quiet = (
            self._idled
            and not self._refusals
            and self._no_waiters()
            and self._calm is not None
            and self._calm()
        )
        self._idled, self._refusals = False, 0
        self._answered = 0
        self._window = now
        if quiet:
            # The callers left the model idle and none was refused: the answers were
            # their pace, not what the model can do, and what an overload taught is
            # stale. The ceiling goes and the limit returns towards its start, so that a
            # backlog released at once after a pause upstream finds a quiet server's room.
            self._ceiling = self.max_limit
            if self._limit < self._initial:
                self._limit += (self._initial - self._limit) * self.smoothing
        elif ceiling > self._ceiling or self._in_flight >= self._limit / 2:
            # A window that left most of the limit unused only raises the ceiling.
            self._ceiling = ceiling
            if self._limit > ceiling:
                self._limit = max(self.min_limit, ceiling)

    def _sample(self, rtt: float, in_flight: int) -> None:
        rtt = max(rtt, 1e-9)
        self._samples += 1
        if self._samples == 1:
            self._long_rtt = rtt
        else:
            window = min(self._samples, self.long_window)
            self._long_rtt += (rtt - self._long_rtt) / window
        if self._long_rtt / rtt > 2:
            # Latency fell well below the average (load went away): let it catch up.
            self._long_rtt *= 0.95
        if in_flight < self._limit / 2:
            return  # the callers leave most of the limit unused: nothing to learn
        target = self.latency_target
        gradient = min(1.0, self.tolerance * self._long_rtt / rtt)
        if target is not None:
            # A setpoint: within it no reason to shed; past it, shrink in proportion
            # however slow the long-term average has become meanwhile.
            gradient = 1.0 if rtt <= target else min(gradient, target / rtt)
        gradient = max(0.5, gradient)
        target = self._limit * gradient + self.queue_size(self._limit)
        limit = self._limit * (1 - self.smoothing) + target * self.smoothing
        self._limit = max(self.min_limit, min(self.max_limit, self._ceiling, limit))

    def _no_waiters(self) -> bool:
        return not self._critical_waiters and not self._best_effort_waiters

    def _wake(self) -> None:
        if self._no_waiters():
            return
        for priority in (Priority.CRITICAL, Priority.BEST_EFFORT):
            waiters = self._waiters[priority]
            while waiters and self._room(priority):
                future = waiters.popleft()
                if not future.done():
                    future.set_result(self._admit(priority))
            if waiters:
                return  # critical callers still wait: best-effort ones wait behind them

    def __repr__(self) -> str:
        return (
            f"<AdaptiveLimiter {self.name!r} limit={self.limit} in_flight={self._in_flight} "
            f"long_rtt={1e3 * self._long_rtt:.2f}ms>"
        )


class ClientQuota:
    """A token bucket per client: ``rate`` calls per second, bursts of up to ``burst``.

    :meth:`check` takes a token for ``client`` or raises :class:`QuotaExceeded`
    (HTTP 429) with the seconds until one is free. At most ``max_clients`` buckets are
    kept, the least recently seen forgotten first (a forgotten client starts full).
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        max_clients: int = 10_000,
        clock: Clock = time.monotonic,
        metrics: Metrics | None = None,
        name: str = "quota",
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be more than 0 calls per second, got {rate}")
        burst = rate if burst is None else burst
        if burst < 1:
            raise ValueError(f"burst must be at least 1 call, got {burst}")
        if max_clients < 1:
            raise ValueError(f"max_clients must be at least 1, got {max_clients}")
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when
        self.metrics = metrics or Metrics()
        self._m_rejected = self.metrics.limiter_rejected.labels(name, "any", "quota")

    def check(self, client: str) -> None:
        """Count one call of ``client``; raise :class:`QuotaExceeded` if it is over quota."""
        now = self._clock()
        buckets = self._buckets
        entry = buckets.get(client)
        if entry is None:
            tokens = self.burst
        else:
            tokens = min(self.burst, entry[0] + (now - entry[1]) * self.rate)
            buckets.move_to_end(client)
        if tokens < 1:
            buckets[client] = (tokens, now)
            self._m_rejected.inc()
            wait = (1 - tokens) / self.rate
            raise QuotaExceeded(
                f"client {client!r} is over its quota of {self.rate:g} calls per second "
                f"(bursts of {self.burst:g}); retry after {wait:.2f} s",
                client=client,
                retry_after=wait,
            )
        buckets[client] = (tokens - 1, now)
        while len(buckets) > self.max_clients:
            buckets.popitem(last=False)
