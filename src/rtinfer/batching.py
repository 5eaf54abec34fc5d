"""The dynamic micro-batcher: one per model, shared by every caller of the model.

Callers (stream pipelines, and later HTTP and gRPC requests) :meth:`submit`
named input arrays of one or more rows and get back exactly their own rows of
the outputs, or their own error. Requests queue; a batch of up to
``max_batch_size`` rows starts as soon as a slot is free (at most
``max_in_flight`` batches run at once) and either enough rows are waiting to
fill it or the oldest request has waited ``max_delay``. Under load, batches
fill themselves while the model is busy; at low load a request waits at most
``max_delay``.

It is event-driven: a submit, a finished batch or one timer armed for the
oldest request's ``max_delay`` are the only things that start a batch; there
is no polling loop. The model runs on ``max_in_flight`` threads of its own
(:class:`ModelThreads`), never on the event loop, with the caller's context variables (a
batch of several requests runs with those of its oldest request).

Guarantees (property-tested):

- a batch never holds more than ``max_batch_size`` rows (a larger request is
  split, and its parts reassembled);
- queued work runs earliest deadline first: requests with a deadline, ordered by
  it, then requests without one, in arrival order (first in, first out among
  equal deadlines), so under load the requests that have least time left go
  first;
- a request whose deadline has passed is never put in a batch: it fails with
  :class:`~rtinfer.exceptions.DeadlineExceeded` at submit, when its deadline
  passes while it waits (one timer, armed for the earliest deadline), or at
  batch formation, whichever comes first; nor does a request wait for more
  rows (``max_delay``) when waiting could take it past its deadline;
- every caller gets its own result or its own error: if a batch of several
  requests fails, each request is retried alone, so one poisonous request
  does not fail the others; if a split request fails in one part, its other
  parts are withdrawn rather than run for nothing;
- the queue is bounded (``max_queue_rows``): past it a submit either waits
  for room (``wait=True``, what streams do: backpressure) or fails at once
  with :class:`~rtinfer.exceptions.Overloaded` (what requests do).
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import math
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .exceptions import Closed, DeadlineExceeded, ModelError, Overloaded
from .loop import schedule_normally
from .models.base import CALL_DEADLINE, check_inputs, rows_of
from .observability.metrics import Metrics
from .types import Arrays, Model

__all__ = ["SERVICE_TIME", "MicroBatcher", "ServiceTime", "warmup_sizes"]


#: The GIL switch interval :meth:`MicroBatcher.start` sets, in seconds (Python's default
#: is 5 ms). The model thread needs the GIL to start a call and again when the runtime
#: returns; while the event loop is busy it waits up to one interval each time, so at the
#: default a single call can stall for 10 ms and the batches behind it pile up (the demo at
#: 20,000 events/s: p99 92 ms at 5 ms, 17 ms at 10 us, with the same throughput).
SWITCH_INTERVAL = 1e-5


class ServiceTime:
    """Where the batcher writes a request's time in front of and in the model.

    ``seconds``: from its submit to the end of its model call (the wait in the queue and
    the call, timed on the model's thread), not counting the turn of the event loop its
    answer takes back. Set one in :data:`SERVICE_TIME` before submitting; the batcher
    writes it when the request's batch succeeds (``None`` until then). A server's limiter
    samples it (:attr:`~rtinfer.resilience.Permit.service`): under overload a busy loop's
    turns are most of a request's time, and admitting fewer requests shortens none.
    """

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds: float | None = None


#: The caller's :class:`ServiceTime`, read in the context a request was submitted in.
SERVICE_TIME: contextvars.ContextVar[ServiceTime | None] = contextvars.ContextVar(
    "rtinfer_service_time", default=None
)


def _call_within(
    deadline: float | None, predict: Callable[[Arrays], Arrays], inputs: Arrays
) -> Arrays:
    """``predict(inputs)`` with :data:`CALL_DEADLINE` set (run in a request's context)."""
    CALL_DEADLINE.set(deadline)
    return predict(inputs)


def _latest(batch: Sequence[_Request]) -> float | None:
    """The latest deadline of ``batch`` (``None``: a request has none)."""
    latest = 0.0
    for request in batch:
        if request.deadline is None:
            return None
        if request.deadline > latest:
            latest = request.deadline
    return latest


def warmup_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes worth warming up: powers of two up to the maximum, and the maximum."""
    sizes = {1, max_batch_size}
    size = 2
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


class _Request:
    __slots__ = (
        "abandon", "context", "deadline", "enqueued", "future", "inputs", "rows", "taken",
    )  # fmt: skip

    def __init__(
        self,
        inputs: Arrays,
        rows: int,
        deadline: float | None,
        future: asyncio.Future[Arrays],
        enqueued: float,
        abandon: bool = False,
    ) -> None:
        self.inputs = inputs
        self.rows = rows
        self.deadline = deadline
        self.future = future
        self.enqueued = enqueued
        #: Fail it at its deadline even while its batch runs (the answer would come late).
        self.abandon = abandon
        #: Set when a request with a deadline leaves the deadline heap (batched or failed).
        self.taken = False
        # The caller's context variables (trace spans, deadlines), for the model call.
        # Captured here: a batch starts from whichever task frees a slot or fires the timer.
        self.context = contextvars.copy_context()


class CallCost:
    """A model call's time as ``fixed + per_row * rows``, fitted to its recent calls.

    Exponentially weighted least squares over (rows, seconds) of each call (weight
    ``decay`` per call on the older ones), so it follows a model that slows down or
    speeds up. :meth:`rows_within` says how many rows a call may take to finish within
    a time; the batcher uses it to form no batch that cannot meet the deadline of the
    request that asked to be abandoned at it.
    """

    __slots__ = ("decay", "n", "sx", "sxx", "sxy", "sy")

    def __init__(self, decay: float = 0.95) -> None:
        self.decay = decay
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def add(self, rows: int, seconds: float) -> None:
        d = self.decay
        self.n = self.n * d + 1.0
        self.sx = self.sx * d + rows
        self.sy = self.sy * d + seconds
        self.sxx = self.sxx * d + rows * rows
        self.sxy = self.sxy * d + rows * seconds

    def estimate(self) -> tuple[float, float] | None:
        """``(fixed, per_row)`` seconds, or ``None`` before a few calls were seen."""
        n = self.n
        if n < 3.0:
            return None
        mean_x, mean_y = self.sx / n, self.sy / n
        variance = self.sxx / n - mean_x * mean_x
        if variance > 1e-6 * mean_x * mean_x:
            per_row = (self.sxy / n - mean_x * mean_y) / variance
            fixed = mean_y - per_row * mean_x
            if per_row > 0:
                return max(fixed, 0.0), per_row
        # One batch size only (or noise): all of the time counted per row, which
        # overestimates a larger batch: the cautious side.
        return 0.0, mean_y / max(mean_x, 1.0)

    def rows_within(self, seconds: float) -> int | None:
        """The most rows one call may take to finish within ``seconds`` (``None``: no
        estimate yet)."""
        fit = self.estimate()
        if fit is None:
            return None
        fixed, per_row = fit
        return max(0, int((seconds - fixed) / per_row))


#: What a model thread calls on the loop when a call ends: ``done(key, result, error,
#: seconds)``, ``seconds`` being the call's own time, taken on the thread.
Done = Callable[[Any, Any, "BaseException | None", float], None]


class ModelThreads:
    """The model's own threads: calls handed over on a queue, answered on the event loop.

    What a ``ThreadPoolExecutor`` with ``run_in_executor`` does, for the one job the
    batcher needs, at about half the cost per call (measured here: 24 µs against 42 µs
    a round trip on asyncio): a ``queue.SimpleQueue`` (C, lock-free for one consumer)
    instead of work items, futures and chaining callbacks, and one
    ``call_soon_threadsafe`` per answer. :meth:`call` answers with a plain callback, so a
    finished batch is handled, and the next one handed over, in the loop's first turn
    after the call ends (an awaited future costs two turns more: its callback, then the
    task's step; under overload each turn waits behind every socket ready meanwhile).
    """

    __slots__ = ("_loop", "_queue", "_threads")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int, name: str) -> None:
        self._loop = loop
        self._queue: queue.SimpleQueue[tuple[Any, tuple[Any, ...], Done, Any] | None] = (
            queue.SimpleQueue()
        )
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def run(self, function: Any, *args: Any) -> asyncio.Future[Any]:
        """``function(*args)`` on one of the threads; its result or exception, on the loop."""
        future: asyncio.Future[Any] = self._loop.create_future()
        self._queue.put((function, args, _settle, future))
        return future

    def timed(self, function: Any, *args: Any) -> asyncio.Future[tuple[Any, float]]:
        """As :meth:`run`, with the call's own time: ``(result, seconds)``."""
        future: asyncio.Future[tuple[Any, float]] = self._loop.create_future()
        self._queue.put((function, args, _settle_timed, future))
        return future

    def call(self, done: Done, key: Any, function: Any, *args: Any) -> None:
        """``function(*args)`` on one of the threads, then ``done(key, result, error,
        seconds)`` on the loop (``error``: what it raised, ``result`` then ``None``)."""
        self._queue.put((function, args, done, key))

    def _work(self) -> None:
        schedule_normally()  # started from a batch-scheduled loop (a version loaded later)
        get, call, clock = self._queue.get, self._loop.call_soon_threadsafe, time.perf_counter
        while (item := get()) is not None:
            function, args, done, key = item
            started = clock()
            try:
                outcome: tuple[Any, BaseException | None] = (function(*args), None)
            except BaseException as exc:  # the caller's to handle, on the loop
                outcome = (None, exc)
            try:
                call(done, key, *outcome, clock() - started)
            except RuntimeError:  # the loop is closed: nobody is waiting
                return
            # Hold nothing of the call while waiting for the next (its requests, outputs).
            del item, function, args, done, key, outcome

    def shutdown(self) -> None:
        """Let each thread finish its current call, then end (queued calls run first)."""
        for _ in self._threads:
            self._queue.put(None)


def _settle(
    future: asyncio.Future[Any], result: Any, error: BaseException | None, _seconds: float
) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _settle_timed(
    future: asyncio.Future[Any], result: Any, error: BaseException | None, seconds: float
) -> None:
    _settle(future, (result, seconds), error, seconds)


class MicroBatcher:
    """Groups concurrent requests to one model into batches and runs them off the loop.

    ``max_delay`` is in seconds (``0``: never wait for more rows; batches still
    form while the model is busy). Call :meth:`start` (loads and warms the
    model) before submitting, and :meth:`aclose` at the end.

    ``switch_interval``: :meth:`start` lowers the interpreter's GIL switch interval
    (``sys.setswitchinterval``, process-wide) to this many seconds if it is higher, so
    the model thread gets the GIL back quickly from a busy event loop (see
    :data:`SWITCH_INTERVAL`); ``None`` leaves it alone.
    """

    def __init__(
        self,
        model: Model,
        *,
        max_batch_size: int = 256,
        max_delay: float = 0.001,
        max_in_flight: int = 1,
        max_queue_rows: int | None = None,
        metrics: Metrics | None = None,
        switch_interval: float | None = SWITCH_INTERVAL,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if max_delay < 0:
            raise ValueError(f"max_delay must be 0 or more seconds, got {max_delay}")
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay
        self.max_in_flight = max_in_flight
        self.switch_interval = switch_interval
        self.max_queue_rows = max_queue_rows or max(16 * max_batch_size, 4096)
        if self.max_queue_rows < max_batch_size:
            raise ValueError(
                f"max_queue_rows ({self.max_queue_rows}) must hold at least one full batch "
                f"({max_batch_size})"
            )
        self.metrics = metrics or Metrics()
        # Two queues, so that a request without a deadline (the common case on a stream)
        # costs no more than a deque append: requests with a deadline wait on a heap keyed
        # by (deadline, arrival), and run first; the others wait in arrival order behind.
        self._dated: list[tuple[float, int, _Request]] = []
        self._undated: deque[_Request] = deque()
        # The requests with a deadline in arrival order (taken ones are skipped lazily),
        # for the max_delay timer, which counts from the oldest request.
        self._arrivals: deque[_Request] = deque()
        self._arrival = itertools.count()
        # One timer, for the earliest deadline on the heap: an expired request is failed
        # when its deadline passes, even while every slot is busy.
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at = math.inf
        self._queued_rows = 0
        self._in_flight = 0
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()  # strong references to retry-alone tasks
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._threads: ModelThreads | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._started = False
        #: Model calls made and rows run, for summaries (the histograms have the detail).
        self.batches = 0
        self.rows = 0
        label = model.name
        self._m_wait = self.metrics.queue_wait.labels(label)
        self._m_size = self.metrics.batch_size.labels(label)
        self._m_model = self.metrics.model_seconds.labels(label)
        # Read when scraped: nothing to update per request.
        self.metrics.batcher_queued.labels(label).set_function(lambda: self._queued_rows)
        self._m_expired = self.metrics.batcher_rejected.labels(label, "deadline")
        self._m_overloaded = self.metrics.batcher_rejected.labels(label, "overloaded")
        self._m_overrun = self.metrics.batcher_rejected.labels(label, "overrun")
        #: The model's call time by batch size, for batches that can meet their deadline.
        self.cost = CallCost()

    @property
    def ready(self) -> bool:
        """True once the model is loaded and warmed up, until the batcher is closed."""
        return self._started and not self._closed

    async def start(self) -> None:
        """Load the model and warm up every batch size in use, on the model's thread."""
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        if self.switch_interval is not None and sys.getswitchinterval() > self.switch_interval:
            sys.setswitchinterval(self.switch_interval)
        self._threads = ModelThreads(
            self._loop, self.max_in_flight, f"rtinfer-model-{self.model.name}"
        )
        model = self.model

        def load_and_warm() -> None:
            model.load()
            model.warmup(warmup_sizes(self.max_batch_size))

        try:
            await self._threads.run(load_and_warm)
        except BaseException:
            self._threads.shutdown()
            self._threads = None
            raise
        self._started = True

    async def submit(
        self,
        inputs: Arrays,
        *,
        deadline: float | None = None,
        wait: bool = False,
        abandon: bool = False,
    ) -> Arrays:
        """Run ``inputs`` (named arrays, rows along axis 0) through the model in a batch.

        ``deadline`` is a ``time.time()`` instant after which the request is not
        run. When the queue is full, ``wait=True`` waits for room; otherwise
        :class:`Overloaded` is raised at once. ``abandon=True`` (a request whose caller
        waits no longer than its deadline): if the deadline passes while its batch runs,
        it fails then with :class:`DeadlineExceeded` instead of waiting for the model;
        the batcher keeps one timer per running batch for it, so the caller needs none
        of its own. Otherwise (a stream's batch) the late answer is still returned.
        """
        if not self._started or self._closed:
            raise Closed(
                f"micro-batcher of model {self.model.name!r} is "
                + ("closed" if self._closed else "not started; call start() first")
            )
        rows = check_inputs(self.model.name, self.model.inputs, inputs)
        if rows > self.max_batch_size:
            return await self._submit_split(inputs, rows, deadline, wait, abandon)
        if deadline is not None and deadline <= time.time():
            self._m_expired.inc()
            raise DeadlineExceeded(
                f"deadline passed {1e3 * (time.time() - deadline):.1f} ms before the request "
                f"reached model {self.model.name!r}"
            )
        while self._queued_rows + rows > self.max_queue_rows:
            if not wait:
                self._m_overloaded.inc()
                raise Overloaded(
                    f"model {self.model.name!r} has {self._queued_rows} rows queued "
                    f"(limit {self.max_queue_rows}); retry shortly",
                    retry_after=1.0,
                )
            self._room.clear()
            await self._room.wait()
            if self._closed:
                raise Closed(f"micro-batcher of model {self.model.name!r} was closed")
        assert self._loop is not None
        future: asyncio.Future[Arrays] = self._loop.create_future()
        request = _Request(inputs, rows, deadline, future, self._loop.time(), abandon)
        if deadline is None:
            self._undated.append(request)
        else:
            heapq.heappush(self._dated, (deadline, next(self._arrival), request))
            if self.max_delay > 0:  # only the max_delay timer reads it (and prunes it)
                self._arrivals.append(request)
            if deadline < self._expiry_at:
                self._arm_expiry(deadline)
        self._queued_rows += rows
        self._idle.clear()
        self._pump()
        return await future

    async def _submit_split(
        self, inputs: Arrays, rows: int, deadline: float | None, wait: bool, abandon: bool
    ) -> Arrays:
        step = self.max_batch_size
        tasks = [
            asyncio.ensure_future(
                self.submit(
                    {k: v[start : start + step] for k, v in inputs.items()},
                    deadline=deadline,
                    wait=wait,
                    abandon=abandon,
                )
            )
            for start in range(0, rows, step)
        ]
        try:
            parts = await asyncio.gather(*tasks)
        except BaseException:
            # One part failed (or the caller left): withdraw the others, whose rows
            # would otherwise still be run, for no one, taking the place of live work.
            for task in tasks:
                task.cancel()
            raise
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    # -- dispatch ---------------------------------------------------------------

    def _pump(self) -> None:
        """Start every batch that may start now; arm the timer for the one that may not yet."""
        assert self._loop is not None
        while (self._dated or self._undated) and self._in_flight < self.max_in_flight:
            if (
                self._queued_rows < self.max_batch_size
                and self.max_delay > 0
                # Never wait for more rows past the earliest deadline.
                and not (self._dated and self._dated[0][0] <= time.time() + self.max_delay)
            ):
                due = self._oldest_enqueued() + self.max_delay
                if self._loop.time() < due:
                    if self._timer is None:
                        self._timer = self._loop.call_at(due, self._on_timer)
                    return
            batch = self._take()
            if batch:
                self._dispatch(batch)
        if not self._dated and not self._undated and self._in_flight == 0:
            self._idle.set()

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    def _oldest_enqueued(self) -> float:
        """When the oldest queued request arrived (loop time); the queue is not empty."""
        arrivals = self._arrivals
        while arrivals and arrivals[0].taken:
            arrivals.popleft()
        if len(arrivals) > 2 * len(self._dated) + 64:  # taken ones behind a waiting one
            self._arrivals = arrivals = deque(r for r in arrivals if not r.taken)
        oldest = math.inf
        if arrivals:
            oldest = arrivals[0].enqueued
        if self._undated:
            oldest = min(oldest, self._undated[0].enqueued)
        return oldest

    def _arm_expiry(self, deadline: float) -> None:
        assert self._loop is not None
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry_at = deadline
        delay = max(0.0, deadline - time.time())
        self._expiry = self._loop.call_at(self._loop.time() + delay, self._on_expiry)

    def _on_expiry(self) -> None:
        """Fail every queued request whose deadline has passed; re-arm for the next one."""
        assert self._loop is not None
        self._expiry = None
        self._expiry_at = math.inf
        dated = self._dated
        now_wall = time.time()
        now = self._loop.time()
        removed = False
        while dated and (dated[0][0] <= now_wall or dated[0][2].future.done()):
            request = heapq.heappop(dated)[2]
            request.taken = True
            self._queued_rows -= request.rows
            removed = True
            if not request.future.done():
                self._expire(request, now)
        if dated:
            self._arm_expiry(dated[0][0])
        if removed:
            if self._queued_rows + self.max_batch_size <= self.max_queue_rows:
                self._room.set()
            if not dated and not self._undated and self._in_flight == 0:
                self._idle.set()

    def _expire(self, request: _Request, now: float) -> None:
        self._m_expired.inc()
        request.future.set_exception(
            DeadlineExceeded(
                f"deadline passed after {1e3 * (now - request.enqueued):.1f} ms in the "
                f"queue of model {self.model.name!r}; the request was not run"
            )
        )

    def _take(self) -> list[_Request]:
        """Pop up to a full batch of live requests; fail expired ones without batching them."""
        assert self._loop is not None
        batch: list[_Request] = []
        size = 0
        now_wall = time.time()
        now = self._loop.time()
        dated = self._dated
        undated = self._undated
        limit = self.max_batch_size
        # A request that is abandoned at its deadline (a served one) is worth nothing
        # late: the batch it heads takes no more rows than can be run before then.
        if dated and dated[0][2].abandon:
            fits = self.cost.rows_within(dated[0][0] - now_wall)
            if fits is not None:
                limit = min(limit, max(fits, dated[0][2].rows))
        while True:
            # Earliest deadline first, then the requests without one, in arrival order;
            # stop at the first that does not fit (no overtaking).
            if dated:
                request = dated[0][2]
                if size + request.rows > limit:
                    break
                heapq.heappop(dated)
                request.taken = True
            elif undated:
                request = undated[0]
                if size + request.rows > limit:
                    break
                undated.popleft()
            else:
                break
            self._queued_rows -= request.rows
            if request.future.done():  # the caller gave up (cancelled)
                continue
            if request.deadline is not None and request.deadline <= now_wall:
                self._expire(request, now)
                continue
            self._m_wait.observe(now - request.enqueued)
            batch.append(request)
            size += request.rows
        if self._queued_rows + self.max_batch_size <= self.max_queue_rows:
            self._room.set()
        return batch

    def _dispatch(self, batch: list[_Request]) -> None:
        """Hand ``batch`` to a model thread; :meth:`_finished` takes it from there."""
        assert self._threads is not None
        self._in_flight += 1
        try:
            if len(batch) == 1:
                inputs = batch[0].inputs
            else:
                inputs = {
                    name: np.concatenate([r.inputs[name] for r in batch])
                    for name in batch[0].inputs
                }
        except Exception as exc:
            for request in batch:
                _fail(request, exc)
            self._in_flight -= 1
            return
        watch = self._watch(batch)
        assert self._loop is not None
        self._threads.call(
            self._finished,
            (batch, watch, self._loop.time()),
            batch[0].context.run,
            _call_within,
            _latest(batch),
            self.model.predict,
            inputs,
        )

    def _finished(
        self,
        job: tuple[list[_Request], list[asyncio.TimerHandle | None] | None, float],
        outputs: Arrays | None,
        error: BaseException | None,
        seconds: float,
    ) -> None:
        """A batch's call ended (on the loop): answer its requests, start the next batch."""
        batch, watch, dispatched = job
        if watch is not None and watch[0] is not None:
            watch[0].cancel()
        rows = sum(r.rows for r in batch)
        if error is None:
            try:
                error = self._accept(outputs, rows, seconds)
            except Exception as exc:  # outputs of the wrong kind: no mapping of arrays
                error = exc
        if error is None:
            assert outputs is not None
            offset = 0
            for request in batch:
                end = offset + request.rows
                if not request.future.done():
                    request.future.set_result({k: v[offset:end] for k, v in outputs.items()})
                offset = end
                service = request.context.get(SERVICE_TIME)
                if service is not None:
                    service.seconds = dispatched - request.enqueued + seconds
        elif (
            len(batch) > 1
            and isinstance(error, Exception)
            and not isinstance(error, DeadlineExceeded)
        ):
            # Each request alone, for its own answer or error: one poisonous request
            # fails no other. Several calls, so a task; the slot is freed at its end.
            assert self._loop is not None
            task = self._loop.create_task(self._retry_alone(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            return
        else:
            if not isinstance(error, Exception):  # SystemExit and the like, from the model
                error = ModelError(f"model {self.model.name!r} stopped the call: {error!r}")
            for request in batch:
                _fail(request, error)
        self._in_flight -= 1
        if self._queued_rows >= self.max_batch_size:
            self._pump()  # a full batch waits: nothing to gain by waiting
        else:
            # Let the loop read once more first. A larger batch costs less a row, and
            # where the model shares its core with the loop its thread would only take
            # the core from the reads that fill its next batch.
            assert self._loop is not None
            self._loop.call_soon(self._pump)

    async def _retry_alone(self, batch: list[_Request]) -> None:
        try:
            await self._run_alone(batch)
        except BaseException as exc:  # never leave a caller waiting forever
            for request in batch:
                _fail(request, exc if isinstance(exc, Exception) else Closed("batch cancelled"))
            raise
        finally:
            self._in_flight -= 1
            self._pump()

    def _watch(self, batch: list[_Request]) -> list[asyncio.TimerHandle | None] | None:
        """A timer failing the batch's ``abandon`` requests whose deadline passes while it
        runs (``None``: it holds none); ``[handle]``, re-armed for the next deadline."""
        first = math.inf
        for request in batch:
            if request.abandon and request.deadline is not None and request.deadline < first:
                first = request.deadline
        if first == math.inf:
            return None
        watch: list[asyncio.TimerHandle | None] = [None]
        self._arm_watch(watch, batch, first)
        return watch

    def _arm_watch(
        self, watch: list[asyncio.TimerHandle | None], batch: list[_Request], deadline: float
    ) -> None:
        assert self._loop is not None
        when = self._loop.time() + max(0.0, deadline - time.time())
        watch[0] = self._loop.call_at(when, self._overrun, watch, batch)

    def _overrun(self, watch: list[asyncio.TimerHandle | None], batch: list[_Request]) -> None:
        watch[0] = None
        now = time.time()
        later = math.inf
        for request in batch:
            deadline = request.deadline
            if not request.abandon or deadline is None or request.future.done():
                continue
            if deadline <= now:
                self._m_overrun.inc()
                request.future.set_exception(
                    DeadlineExceeded(
                        f"deadline passed while model {self.model.name!r} ran the request's "
                        "batch; its answer would have come too late"
                    )
                )
            elif deadline < later:
                later = deadline
        if later < math.inf:
            self._arm_watch(watch, batch, later)

    async def _run_alone(self, batch: Sequence[_Request]) -> None:
        """After a batch of several requests failed: give each its own result or error."""
        for request in batch:
            if request.future.done():
                continue
            if request.deadline is not None and request.deadline <= time.time():
                assert self._loop is not None
                self._expire(request, self._loop.time())
                continue
            try:
                outputs = await self._predict(request.inputs, request.context, request.deadline)
            except Exception as exc:
                _fail(request, exc)
            else:
                if not request.future.done():  # the caller may have left while it ran
                    request.future.set_result(outputs)

    async def _predict(
        self, inputs: Arrays, context: contextvars.Context, deadline: float | None
    ) -> Arrays:
        assert self._threads is not None
        outputs, seconds = await self._threads.timed(
            context.run, _call_within, deadline, self.model.predict, inputs
        )
        error = self._accept(outputs, rows_of(inputs), seconds)
        if error is not None:
            raise error
        return outputs  # type: ignore[no-any-return]

    def _accept(self, outputs: Any, rows: int, seconds: float) -> ModelError | None:
        """Count a call of ``rows`` rows that took ``seconds`` (on its thread); the error
        if its outputs do not hold one row per input row."""
        self._m_model.observe(seconds)
        self.cost.add(rows, seconds)
        self._m_size.observe(rows)
        self.batches += 1
        self.rows += rows
        for name, array in outputs.items():
            if not isinstance(array, np.ndarray) or array.shape[:1] != (rows,):
                got: Any = getattr(array, "shape", type(array).__name__)
                return ModelError(
                    f"model {self.model.name!r} output {name!r} has shape {got} for a batch of "
                    f"{rows} rows; every output needs one row per input row"
                )
        return None

    # -- shutdown ---------------------------------------------------------------

    async def drain(self) -> None:
        """Wait until every queued request has been run."""
        await self._idle.wait()

    async def aclose(self) -> None:
        """Finish queued work, then stop the model's threads. Later submits raise Closed."""
        if self._closed:
            return
        if self._started:
            await self.drain()
        self._closed = True
        self._room.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._threads is not None:
            self._threads.shutdown()

    def __repr__(self) -> str:
        return (
            f"<MicroBatcher model={self.model.name!r} max_batch_size={self.max_batch_size} "
            f"max_delay={self.max_delay} queued_rows={self._queued_rows} "
            f"in_flight={self._in_flight}>"
        )


def _fail(request: _Request, exc: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(exc)
