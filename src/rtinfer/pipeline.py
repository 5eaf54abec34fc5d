"""The pipeline: source → stages → sinks, with acknowledgement only after flush.

Two tasks run a pipeline. The *reader* reads up to ``read_size`` events at a
time from the source and starts the composed handler on them as one task per
batch; the *writer* takes those tasks in the order they were started, writes
each batch's results to every sink and its dead letters to the dead-letter
sink, and from time to time flushes every sink and only then acknowledges the
source positions of everything written before the flush. So:

- **at least once**: a position is acknowledged only after every sink has
  flushed what was derived from it; a crash before that means redelivery;
- **order**: results leave in source order (hence per-key order);
- **bounded**: at most ``max_in_flight`` batches are read and not yet written
  (the reader takes a slot before it reads, the writer gives it back once the
  batch is written); when every slot is busy the source is not read at all;
- **dead letters alone**: a stage drops a bad event from its batch with a
  reason; the rest of the batch carries on, and the dead letter is written
  (and flushed) before its position is acknowledged;
- **state with offsets**: a stage with ``async def checkpoint(positions)`` is
  awaited after every flush and before the acknowledgement of ``positions``,
  so state it commits there always covers what the source is told to forget;
- **deadlines**: with ``slo`` (seconds), every event read without a deadline gets
  ``ingest_time + slo``; the model stage runs the earliest deadline first and
  never runs an expired event (its ``expired`` policy says what happens then);
  with ``shed_expired``, an event whose deadline has passed when it is read (or
  would pass within twice the recent read-to-written time) is dead-lettered at once,
  undecoded (stage ``intake``): a backlog older than the deadline is set aside at
  the cost of a write, and the pipeline catches up with the events it can still
  answer in time; with ``shed_ranges`` too, after a read that held late events the
  source is moved (:meth:`~rtinfer.types.Source.skip`) past every entry it has not
  delivered but the newest ``read_size``, unread, and one dead letter per range names
  them: setting aside then costs nothing per event;
- **failing sinks** (:class:`SinkResilience`): a sink's ``write``/``flush`` that
  fails with a transient error is retried with jittered backoff, paid from a
  retry budget (about 10% extra calls at most); one that keeps failing opens its
  circuit breaker, and the pipeline stops reading until a probe succeeds. A
  flush that failed is tried again only after everything written since the last
  good flush is written again (a sink may have lost its buffer), so nothing is
  acknowledged that was not flushed. Other errors fail the run, unacknowledged.

:meth:`Pipeline.stop` stops intake; what was read is finished, flushed and
acknowledged before :meth:`Pipeline.run` returns. The pipeline is ``DRAINING``
from the moment intake stops (a stop, or the end of the source) until it is
closed.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from .exceptions import CircuitOpen, RtinferError
from .observability.latency import LatencyHistogram
from .observability.looplag import LoopLag
from .observability.metrics import Metrics
from .resilience.breaker import CircuitBreaker
from .resilience.retry import Backoff, Retry, RetryBudget, is_transient
from .stages import Stage, Undeliverable, compose
from .types import Batch, DeadLetter, Event, Position, Sink, Skipped, Source

__all__ = [
    "Lifecycle",
    "Pipeline",
    "RunSummary",
    "SinkResilience",
    "dead_letter_record",
    "skipped_record",
]

log = logging.getLogger("rtinfer.pipeline")


class Lifecycle(enum.Enum):
    """Where a pipeline is in its life; each state only moves forward."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    CLOSED = "closed"


class RunSummary:
    """What a finished run did; :meth:`as_dict` is the ``--summary-json`` document."""

    __slots__ = ("batch_size_mean", "dead_letters", "duration_s", "events_in", "events_out",
                 "latency", "skipped")  # fmt: skip

    def __init__(
        self,
        *,
        events_in: int,
        events_out: int,
        dead_letters: int,
        duration_s: float,
        latency: LatencyHistogram,
        batch_size_mean: float,
        skipped: int = 0,
    ) -> None:
        self.events_in = events_in
        self.events_out = events_out
        self.dead_letters = dead_letters
        self.duration_s = duration_s
        self.latency = latency
        self.batch_size_mean = batch_size_mean
        #: Of ``dead_letters``, the events set aside unread, by range (``slo.shed_by: range``).
        self.skipped = skipped

    @property
    def throughput_eps(self) -> float:
        return self.events_in / self.duration_s if self.duration_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "events_in": self.events_in,
            "events_out": self.events_out,
            "dead_letters": self.dead_letters,
            "skipped": self.skipped,
            "duration_s": round(self.duration_s, 3),
            "throughput_eps": round(self.throughput_eps, 1),
            "latency_ms": self.latency.summary_ms(),
            "batch_size_mean": round(self.batch_size_mean, 2),
        }


def dead_letter_record(dead: DeadLetter, pipeline: str) -> dict[str, Any]:
    """The record written to the dead-letter sink: why, where from, and the payload itself."""
    event = dead.event
    try:
        value: str = event.value.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError:
        value = base64.b64encode(event.value).decode("ascii")
        encoding = "base64"
    position = event.position or Position("unknown", 0, -1)
    event_id = event.id or f"{position.source}/{position.partition}/{position.offset}"
    return {
        "id": event_id,
        "pipeline": pipeline,
        "stage": dead.stage,
        "reason": dead.reason,
        "source": position.source,
        "partition": position.partition,
        "offset": position.offset,
        "key": event.key.decode("utf-8", "replace") if event.key is not None else None,
        "value": value,
        "value_encoding": encoding,
        "time": time.time(),
    }


def skipped_record(skipped: Skipped, pipeline: str, reason: str) -> dict[str, Any]:
    """The dead letter of a range of entries set aside unread: where they are, and how many.
    Its ``offset`` and ``last_offset`` bound them (inclusive); ``value`` is ``None``, for
    the entries are still in the source."""
    return {
        "id": f"{skipped.source}/{skipped.partition}/{skipped.first}..{skipped.last}",
        "pipeline": pipeline,
        "stage": "intake",
        "reason": reason,
        "source": skipped.source,
        "partition": skipped.partition,
        "offset": skipped.first,
        "last_offset": skipped.last,
        "count": skipped.entries,
        "key": None,
        "value": None,
        "value_encoding": None,
        "time": time.time(),
    }


class SinkResilience:
    """How the pipeline treats a failing sink (one retry budget and breaker per sink).

    - ``attempts``: calls per ``write``/``flush`` (1: no retry), waiting
      ``Backoff(backoff, max_delay=max_backoff)`` between them ("full jitter");
    - ``budget``: retries per call allowed on average (0.1: 10% extra load at most,
      plus one a second), so retries never amplify an outage;
    - ``consecutive_failures`` and ``open_seconds``: the sink's circuit breaker
      (``sink:<name>``, its state in ``rtinfer_breaker_state``). While it is open the
      pipeline reads nothing and looks again every ``poll`` seconds; half-open, the
      failed call itself is the probe;
    - ``pause_on``: errors that pause the pipeline until the sink recovers (default:
      transient ones, :func:`~rtinfer.resilience.is_transient`); any other error
      fails the run, leaving unacknowledged what was not flushed;
    - ``clock``: the breakers' and budgets' monotonic clock (tests drive it by hand).
    """

    __slots__ = ("attempts", "backoff", "budget", "clock", "consecutive_failures",
                 "max_backoff", "open_seconds", "pause_on", "poll")  # fmt: skip

    def __init__(
        self,
        *,
        attempts: int = 3,
        backoff: float = 0.01,
        max_backoff: float = 1.0,
        budget: float = 0.1,
        consecutive_failures: int = 5,
        open_seconds: float = 5.0,
        poll: float = 0.05,
        pause_on: Callable[[BaseException], bool] = is_transient,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1 (1: no retry), got {attempts}")
        Backoff(backoff, max_delay=max_backoff)  # checks them
        if poll <= 0:
            raise ValueError(f"poll must be more than 0 seconds, got {poll}")
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.budget = budget
        self.consecutive_failures = consecutive_failures
        self.open_seconds = open_seconds
        self.poll = poll
        self.pause_on = pause_on
        self.clock = clock


class _GuardedSink:
    """One sink behind its retry (with budget) and circuit breaker; see :class:`SinkResilience`.

    ``dirty``: a flush failed, so the sink may have lost what it buffered: the next flush
    first writes again everything written since the last good one.
    """

    __slots__ = ("breaker", "dirty", "label", "pipeline", "policy", "retry", "sink", "unflushed")

    def __init__(self, sink: Sink, label: str, policy: SinkResilience, pipeline: Pipeline) -> None:
        self.sink = sink
        self.label = label
        self.policy = policy
        self.pipeline = pipeline
        self.breaker = CircuitBreaker(
            label,
            consecutive_failures=policy.consecutive_failures,
            open_seconds=policy.open_seconds,
            clock=policy.clock,
            metrics=pipeline.metrics,
        )
        self.retry = Retry(
            label,
            attempts=policy.attempts,
            backoff=Backoff(policy.backoff, max_delay=policy.max_backoff),
            budget=RetryBudget(policy.budget, clock=policy.clock),
            retry_on=policy.pause_on,
            metrics=pipeline.metrics,
        )
        self.dirty = False
        #: Event lists written since the last good flush (what a dirty flush writes again).
        self.unflushed: list[Sequence[Event]] = []

    async def write(self, events: Sequence[Event]) -> None:
        sink = self.sink

        async def write() -> None:
            await sink.write(events)

        await self._run(write)
        self.unflushed.append(events)

    async def flush(self) -> None:
        sink = self.sink

        async def flush() -> None:
            if self.dirty:
                for events in self.unflushed:
                    await sink.write(events)
            try:
                await sink.flush()
            except BaseException:
                self.dirty = True
                raise
            self.dirty = False

        await self._run(flush)
        self.unflushed = []

    async def _run(self, call: Callable[[], Awaitable[None]]) -> None:
        failures = 0
        while True:
            try:
                with self.breaker.guard():
                    await self.retry.run(call)
            except CircuitOpen as exc:
                self.pipeline._pause(self.label)
                await asyncio.sleep(min(exc.retry_after, self.policy.poll))
                continue
            except Exception as exc:
                if not self.policy.pause_on(exc):
                    raise
                log.warning(
                    "sink %s failed (%s: %s); trying again, reading paused if it goes on",
                    self.sink.name,
                    type(exc).__name__,
                    exc,
                )
                await asyncio.sleep(self.retry.backoff.delay(failures))
                failures += 1
                continue
            self.pipeline._resume(self.label)
            return


class _LogDeadLetters:
    """Where dead letters go when no dead-letter sink is configured: the log."""

    name = "log"

    async def start(self) -> None:
        pass

    async def write(self, events: Sequence[Event]) -> None:
        for event in events:
            log.warning("dead letter: %s", event.result)

    async def flush(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


#: With ``shed_expired``, the time left that an event needs to be admitted, in multiples of
#: the recent time from read to written (see :meth:`Pipeline.shed_cutoff`).
SHED_MARGIN = 2.0
#: ... but never more than this share of the pipeline's ``slo``, or one slow batch could
#: set aside every event, fresh ones too, and no batch would run to bring it down again.
SHED_MARGIN_MAX = 0.9

_SHED_REASON = (
    "its deadline had passed when it was read, or would have before its result could be "
    "written (slo.shed: true): set aside unprocessed, for a replay"
)
_SKIP_REASON = (
    "behind a backlog too late to be answered before its deadline (slo.shed_by: range): "
    "left unread in the source, for a replay"
)


class Pipeline:
    """A source, stages and sinks, run with at-least-once delivery.

    ``stages`` are composed once when :meth:`run` starts; a stage with
    ``start``/``aclose`` coroutines (the model stage loads and warms up its
    model there) is started before the source and closed after the sinks.
    ``flush_interval`` (seconds) bounds how long written results wait for a
    flush (and their positions for an acknowledgement) while the pipeline is
    busy; when it is idle, every batch is flushed at once.
    """

    def __init__(
        self,
        source: Source,
        stages: Sequence[Stage],
        sinks: Sequence[Sink],
        *,
        dead_letters: Sink | None = None,
        name: str = "pipeline",
        read_size: int = 256,
        max_in_flight: int = 4,
        flush_interval: float = 0.01,
        lag_interval: float = 1.0,
        slo: float | None = None,
        shed_expired: bool = False,
        shed_ranges: bool = False,
        sink_resilience: SinkResilience | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if slo is not None and not slo > 0:
            raise ValueError(f"slo must be more than 0 seconds, got {slo}")
        if read_size < 1:
            raise ValueError(f"read_size must be at least 1, got {read_size}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.source = source
        self.stages = list(stages)
        self.sinks = list(sinks)
        self.dead_letters: Sink = dead_letters or _LogDeadLetters()
        self.name = name
        self.read_size = read_size
        self.max_in_flight = max_in_flight
        self.flush_interval = flush_interval
        self.lag_interval = lag_interval
        #: Seconds from ingestion to each event's deadline, for events read without one.
        self.slo = slo
        #: Dead-letter events already past their deadline when read, unprocessed.
        self.shed_expired = shed_expired
        #: With ``shed_expired``: after a read that held late events, move the source past
        #: every entry it has not delivered but the newest ``read_size``, unread (its
        #: ``skip``), a dead letter per range.
        self.shed_ranges = shed_ranges
        self._skip: Callable[..., Awaitable[int]] | None = getattr(source, "skip", None)
        if shed_ranges:
            if not shed_expired or slo is None:
                raise ValueError("shed_ranges needs shed_expired and an slo")
            if self._skip is None:
                raise ValueError(
                    f"shed_ranges: the source {source.name} cannot skip a range of its "
                    "entries (it has no skip method); shed event by event instead"
                )
        self.skipped = 0
        # The dead-letter sink is written by the writer and, skipping, by the reader.
        self._dead_lock = asyncio.Lock()
        # When each batch in flight was read (they are written in that order), and the
        # recent time from read to written (see shed_cutoff).
        self._read_times: deque[float] = deque()
        self._transit = 0.0
        self._admitted_at = time.time()  # when a read last admitted an event
        self.sink_resilience = sink_resilience or SinkResilience()
        self.metrics = metrics or Metrics()
        self._loop_lag = LoopLag(self.metrics.loop_lag)
        # Reading stops while any sink named here is failing (its breaker open).
        self._intake = asyncio.Event()
        self._intake.set()
        self._paused_by: set[str] = set()
        labels = [f"sink:{s.name}" for s in self.sinks]
        labels = [  # one breaker (and metric) per sink, even where two share a name
            label if labels.count(label) == 1 else f"{label}#{i}" for i, label in enumerate(labels)
        ]
        policy = self.sink_resilience
        self._guarded = [
            _GuardedSink(s, label, policy, self)
            for s, label in zip(self.sinks, labels, strict=True)
        ]
        self._guarded_dead = _GuardedSink(
            self.dead_letters, f"dead_letters:{self.dead_letters.name}", policy, self
        )
        #: The circuit breaker of each sink (``sink:<name>``) and of the dead-letter sink.
        self.breakers: dict[str, CircuitBreaker] = {
            g.label: g.breaker for g in [*self._guarded, self._guarded_dead]
        }
        #: Start the stages before the run and close them after it. A host that shares
        #: the stages with other callers (a server scoring requests with them) sets it
        #: to False and starts and closes them itself.
        self.owns_stages = True
        self.state = Lifecycle.CREATED
        self.ready = asyncio.Event()
        self.latency = LatencyHistogram()
        self.events_in = 0
        self.events_out = 0
        self.dead_count = 0
        self._stop = asyncio.Event()
        self._reading = False
        self._reader: asyncio.Task[None] | None = None
        self._m_in = self.metrics.events_in.labels(name)
        self._m_out = self.metrics.events_out.labels(name)
        self._m_latency = self.metrics.latency(name)
        self._observers: list[Any] = []

    @property
    def paused(self) -> bool:
        """Reading is paused because a sink is failing (its breaker is open)."""
        return not self._intake.is_set()

    def _pause(self, label: str) -> None:
        if label not in self._paused_by:
            log.warning("pipeline %r stops reading: %s keeps failing", self.name, label)
            self._paused_by.add(label)
            self._intake.clear()

    def _resume(self, label: str) -> None:
        if label in self._paused_by:
            log.warning("pipeline %r reads again: %s recovered", self.name, label)
            self._paused_by.discard(label)
            if not self._paused_by:
                self._intake.set()

    def observe(self, callback: Any) -> None:
        """Call ``callback(batch)`` after each batch is written (live views, demos, tests)."""
        self._observers.append(callback)

    def stop(self) -> None:
        """Stop reading; in-flight events are finished, flushed and acknowledged."""
        self._stop.set()
        self._drain()
        if self._reader is not None and self._reading:
            self._reader.cancel()

    def _drain(self) -> None:
        """Intake is over (stopped, or the source ended): finish what is in flight."""
        if self.state is Lifecycle.RUNNING:
            self.state = Lifecycle.DRAINING
            self.ready.clear()

    async def run(self) -> RunSummary:
        """Run until the source ends or :meth:`stop` is called; return what was done."""
        if self.state is not Lifecycle.CREATED:
            raise RtinferError(f"pipeline {self.name!r} is {self.state.value}; run it only once")
        self.state = Lifecycle.STARTING
        started_stages: list[Any] = []
        started_sinks: list[Sink] = []
        source_started = False
        try:
            for stage in self.stages if self.owns_stages else ():
                start = getattr(stage, "start", None)
                if start is not None:
                    await start()
                    started_stages.append(stage)
            for sink in [*self.sinks, self.dead_letters]:
                await sink.start()
                started_sinks.append(sink)
            await self.source.start()
            source_started = True
            handler = compose(
                [Undeliverable(), *self.stages], metrics=self.metrics, pipeline=self.name
            )
            self.state = Lifecycle.RUNNING
            self.ready.set()
            began = time.perf_counter()
            inflight: asyncio.Queue[asyncio.Future[Batch] | None] = asyncio.Queue(
                self.max_in_flight
            )
            self._read_times.clear()
            self._admitted_at = time.time()
            # One slot per batch between the source and the sinks: taken before a read,
            # given back once the batch's results are written.
            slots = asyncio.Semaphore(self.max_in_flight)
            self._reader = asyncio.create_task(self._read(handler, inflight, slots))
            lag = asyncio.create_task(self._report_lag())
            self._loop_lag.start()
            try:
                await self._write(inflight, slots)
            finally:
                self._loop_lag.stop()
                lag.cancel()
                if not self._reader.done():
                    self._reader.cancel()
                await asyncio.gather(self._reader, lag, return_exceptions=True)
                # After a failure, batches already started are abandoned unacknowledged.
                abandoned = []
                while not inflight.empty():
                    pending = inflight.get_nowait()
                    if pending is not None:
                        pending.cancel()
                        abandoned.append(pending)
                await asyncio.gather(*abandoned, return_exceptions=True)
            self._reader.result()  # a failed source fails the run, after what it read is done
            duration = time.perf_counter() - began
        finally:
            self.ready.clear()
            self.state = Lifecycle.DRAINING
            await self._close(source_started, started_sinks, started_stages)
            self.state = Lifecycle.CLOSED
        batchers = [getattr(s, "batcher", None) for s in self.stages]
        batches = sum(b.batches for b in batchers if b is not None)
        rows = sum(b.rows for b in batchers if b is not None)
        return RunSummary(
            events_in=self.events_in,
            events_out=self.events_out,
            dead_letters=self.dead_count,
            duration_s=duration,
            latency=self.latency,
            batch_size_mean=rows / batches if batches else 0.0,
            skipped=self.skipped,
        )

    async def _close(self, source_started: bool, sinks: list[Sink], stages: list[Any]) -> None:
        closers = [self.source.aclose] if source_started else []
        closers += [s.aclose for s in sinks] + [s.aclose for s in reversed(stages)]
        for close in closers:
            try:
                await close()
            except Exception:  # the run's own outcome is what the caller sees
                log.exception("error while closing pipeline %r", self.name)

    async def _report_lag(self) -> None:
        """Export the source's consumer lag every ``lag_interval`` seconds, if it can tell."""
        lag = getattr(self.source, "lag", None)
        if lag is None:
            return
        gauge = self.metrics.consumer_lag.labels(self.name, self.source.name)
        while True:
            try:
                value = await lag()
            except Exception:  # a metric must never fail the pipeline
                log.warning("could not read the lag of %s", self.source.name, exc_info=True)
                value = None
            if value is not None:
                gauge.set(value)
            await asyncio.sleep(self.lag_interval)

    async def _read(
        self,
        handler: Any,
        inflight: asyncio.Queue[asyncio.Future[Batch] | None],
        slots: asyncio.Semaphore,
    ) -> None:
        seq = 0
        slo = self.slo
        behind = False  # the last read held late events: the backlog is past the edge
        try:
            while not self._stop.is_set():
                # Read only when a batch may start: when every slot is busy the source is
                # not read at all, so no more than max_in_flight batches are ever unwritten.
                await slots.acquire()
                if self._stop.is_set():
                    break
                if behind:
                    await self._skip_backlog()
                self._reading = True
                try:
                    if not self._intake.is_set():  # a sink is failing: read nothing
                        await self._intake.wait()
                    events = await self.source.read(self.read_size)
                except asyncio.CancelledError:
                    if self._stop.is_set():  # stop() interrupted the wait: nothing was read
                        break
                    raise
                finally:
                    self._reading = False
                if not events:
                    break
                if slo is not None:
                    for event in events:
                        if event.deadline is None:
                            event.deadline = event.ingest_time + slo
                self.events_in += len(events)
                self._m_in.inc(len(events))
                seq += 1
                batch = Batch(events, seq)
                if self.shed_expired:
                    now = time.time()
                    self._read_times.append(now)
                    cutoff = self.shed_cutoff(now)
                    late = [
                        i
                        for i, e in enumerate(events)
                        if e.deadline is not None and e.deadline <= cutoff
                    ]
                    if late:
                        batch.drop(late, "intake", _SHED_REASON)
                    behind = self.shed_ranges and bool(late)
                    if batch.events:
                        self._admitted_at = now
                done: asyncio.Future[Batch]
                if batch.events:
                    done = asyncio.create_task(handler(batch))
                else:  # all of it set aside: nothing for the stages to do
                    done = asyncio.get_running_loop().create_future()
                    done.set_result(batch)
                await inflight.put(done)
        except Exception:
            # The source failed: let the writer finish what was read, then fail the run.
            self._drain()
            await inflight.put(None)
            raise
        self._drain()
        await inflight.put(None)

    async def _skip_backlog(self) -> None:
        """Move the source past every entry it has not delivered yet but the newest read's
        worth, recorded first as one dead letter per range.

        Called before a read when the last one held late events: the backlog is past the
        edge, and under a lasting overload the pipeline can only answer in time what
        arrives from now on. Measured on Redis (benchmarks/overload.py):

        - reading the late backlog costs a dead letter each: at twice the demo model's
          capacity, 66% goodput skipping only after reads late as a whole, 87% skipping
          before the next read;
        - skipping everything, not only what is late, costs no goodput under a lasting
          overload (the pipeline stays busy with what arrives) and lets Redis count the
          range from the group's lag: counting only the late part read every entry, 80%
          against 87% at twice capacity, 55% against 86% at three times;
        - keeping the newest read's worth makes the next read a full batch: a 5 ms model,
          whose rows cost less in bigger batches, answered 83-85% in time at twice its
          capacity skipping everything, 93-94% keeping a read.

        A failed skip is logged: those events are then read, and set aside one by one."""
        skip = self._skip
        assert skip is not None

        async def record(ranges: list[Skipped]) -> None:
            letters = [
                Event(
                    b"",
                    ingest_time=time.time(),
                    position=Position(r.source, r.partition, r.first),
                    id=f"{r.source}/{r.partition}/{r.first}..{r.last}",
                    result=skipped_record(r, self.name, _SKIP_REASON),
                )
                for r in ranges
            ]
            async with self._dead_lock:
                await self._guarded_dead.write(letters)
                await self._guarded_dead.flush()

        try:
            count = await skip(record, keep=self.read_size)
        except Exception:
            log.warning(
                "pipeline %r could not skip the late entries of %s; it reads them and sets "
                "them aside one by one",
                self.name,
                self.source.name,
                exc_info=True,
            )
            return
        if count:
            self.skipped += count
            self.dead_count += count
            self.metrics.dead_letters.labels(self.name, "intake").inc(count)

    def shed_cutoff(self, now: float) -> float:
        """With ``shed_expired``: an event whose deadline is before this instant is set
        aside at intake, for it would be late. The margin is ``SHED_MARGIN`` times the
        recent time from read to written: under a lasting overload every event admitted
        comes from the edge of the backlog, with about that much time left, and half of
        them would be late with a margin of the average alone (measured: 63% goodput at
        twice a stream's capacity, 93% with twice the average). It is at most
        ``SHED_MARGIN_MAX`` of the ``slo``: a margin as long as the deadline would set
        aside events as they arrive, so no batch would run and the margin would never
        shrink (measured at ten times a stream's capacity: a pipeline stuck answering
        nothing in one run out of two).

        And when nothing was admitted for a whole ``slo``, the margin is 0 for one read: the
        time from read to written is then only known from batches that ran long ago (a
        burst, a pause), and a batch must run to measure it again. A margin too long for
        what the pipeline can now do would otherwise keep it answering nothing (measured
        at ten times the capacity of a 1 ms model: no answer in time for a whole level)."""
        slo = self.slo
        if slo is None:
            return now + SHED_MARGIN * self._transit
        if now - self._admitted_at > slo:
            return now
        return now + min(SHED_MARGIN * self._transit, SHED_MARGIN_MAX * slo)

    def record_transit(self, seconds: float, batch: Batch) -> None:
        """Follow the time from read to written (smoothed) of batches that ran the stages,
        up to the flush that made their results visible (with a 1 ms model a result waited
        for that flush about as long as the model took). Only batches that ran count:
        one set aside whole took none, and counted, such batches would drag the margin to
        nothing just when most batches are set aside (measured at ten times a stream's
        capacity: 0% goodput counting them, 68% without)."""
        if batch.events:
            self._transit += 0.2 * (seconds - self._transit)

    async def _write(
        self, inflight: asyncio.Queue[asyncio.Future[Batch] | None], slots: asyncio.Semaphore
    ) -> None:
        sinks = self._guarded
        pending: list[Position] = []
        # With shed_expired: (when read, batch) of what the next flush makes visible.
        timed: list[tuple[float, Batch]] = []
        last_flush = time.perf_counter()
        while True:
            task = await inflight.get()
            if task is None:
                break
            batch = await task
            if self.shed_expired:
                timed.append((self._read_times.popleft(), batch))
            if batch.events:
                for sink in sinks:
                    await sink.write(batch.events)
                now = time.time()
                ingest = np.fromiter(
                    (e.ingest_time for e in batch.events), np.float64, len(batch.events)
                )
                latencies = now - ingest
                self.latency.record(latencies)
                self._m_latency.record(latencies)
                self.events_out += len(batch.events)
                self._m_out.inc(len(batch.events))
            if batch.dead:
                async with self._dead_lock:
                    await self._write_dead(batch.dead)
            slots.release()
            pending.extend(batch.positions)
            for observer in self._observers:
                observer(batch)
            if inflight.empty() or time.perf_counter() - last_flush >= self.flush_interval:
                await self._flush_and_ack(pending)
                pending = []
                last_flush = time.perf_counter()
                if timed:
                    flushed = time.time()
                    for read_at, done in timed:
                        self.record_transit(flushed - read_at, done)
                    timed = []
        await self._flush_and_ack(pending)

    async def _write_dead(self, dead: list[DeadLetter]) -> None:
        events = []
        for letter in dead:
            letter.event.result = dead_letter_record(letter, self.name)
            events.append(letter.event)
            self.metrics.dead_letters.labels(self.name, letter.stage).inc()
        self.dead_count += len(dead)
        await self._guarded_dead.write(events)

    async def _flush_and_ack(self, positions: list[Position]) -> None:
        for sink in self._guarded:
            await sink.flush()
        async with self._dead_lock:
            await self._guarded_dead.flush()
        # A stage that keeps durable state (rtinfer.features) commits it here, with the
        # positions it covers, so its state is never behind what the source forgets.
        for stage in self.stages:
            checkpoint = getattr(stage, "checkpoint", None)
            if checkpoint is not None:
                await checkpoint(positions)
        if positions:
            await self.source.ack(positions)
