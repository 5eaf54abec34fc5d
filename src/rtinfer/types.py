"""The vocabulary of rtinfer: events, batches, and the narrow interfaces that plug in.

Everything in a pipeline speaks one calling convention::

    Handler = Callable[[Batch], Awaitable[Batch]]

A stage takes a batch of events (in source order) and returns it, having added
to it (decoded data, model inputs, model outputs, results) or having moved
some of its events to the batch's dead letters. Stages are composed into one
handler once, at start-up.

Sources, sinks and models are small protocols: a source ``read``s events and
``ack``s them, a sink ``write``s results and ``flush``es them, a model
``load``s, ``warmup``s and ``predict``s on a batch of rows.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import msgspec
import numpy as np
import numpy.typing as npt

__all__ = [
    "DEAD_REASON_HEADER",
    "Arrays",
    "Batch",
    "DeadLetter",
    "Event",
    "Handler",
    "Loader",
    "Model",
    "Position",
    "Sink",
    "Skipped",
    "Source",
    "TensorSpec",
]

#: A source sets this header on an event it will not deliver again (it was delivered too
#: many times); the pipeline dead-letters such an event with the header's value as reason.
DEAD_REASON_HEADER = "rtinfer-dead-reason"

#: Named tensors, one row per item along axis 0: a model's inputs or outputs.
Arrays = dict[str, npt.NDArray[Any]]


class Position(msgspec.Struct, frozen=True, order=True, array_like=True, gc=False):
    """Where an event sits in its source, used to acknowledge it and to find it again.

    ``offset`` is an integer for logs (the in-process broker, Kafka, files) and a
    string where the broker names entries otherwise (a Redis stream id). Positions
    are immutable, hashable and ordered (by source, partition, offset).
    """

    source: str
    partition: int
    offset: int | str

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "partition": self.partition, "offset": self.offset}


class Skipped(NamedTuple):
    """A run of a source's entries that its consumer group moved past unread: the
    ``entries`` entries of ``partition`` from offset ``first`` to ``last`` (inclusive),
    still in the source for whoever replays them (see :class:`Source`)."""

    source: str
    partition: int
    first: int | str
    last: int | str
    entries: int


class _EventValue(msgspec.Struct, gc=False):
    value: bytes


class Event(_EventValue, kw_only=True, gc=False):
    """One event on its way through a pipeline.

    ``value`` holds the payload as it arrived (bytes); ``data`` the decoded
    value once the decode stage has run; ``result`` what the pipeline will
    write to its sinks. Times are seconds since the epoch (``time.time()``),
    so they compare across processes: ``event_time`` is when the event
    happened (from the payload or the broker, ``None`` if unknown),
    ``ingest_time`` when the source received it, and ``deadline`` when its
    answer stops being useful (``None``: no deadline).

    ``Event(value, *, ingest_time, key=None, headers=None, event_time=None,
    deadline=None, position=None)``. It is a ``msgspec.Struct``, several times
    cheaper to make than a plain class, and is not tracked by the garbage
    collector (an event never refers back to itself), so millions of events in
    flight never slow a collection.
    """

    key: bytes | None = None
    headers: Mapping[str, bytes] | None = None
    event_time: float | None = None
    ingest_time: float
    deadline: float | None = None
    position: Position | None = None
    id: str | None = None
    data: Any = None
    result: Any = None

    def describe(self) -> str:
        """A short human description for error messages: its id and where it came from."""
        where = ""
        if self.position is not None:
            p = self.position
            where = f" ({p.source}, partition {p.partition}, offset {p.offset})"
        name = f"event {self.id!r}" if self.id is not None else "event"
        return name + where

    def __repr__(self) -> str:
        return f"<Event id={self.id!r} key={self.key!r} position={self.position!r}>"


class DeadLetter(NamedTuple):
    """An event that could not be processed, the stage that gave up on it, and why."""

    event: Event
    stage: str
    reason: str


class Batch:
    """A run of events from one source, in source order, travelling through the stages together.

    Row ``i`` of ``inputs`` and ``outputs`` belongs to ``events[i]``. A stage that
    cannot process some events calls :meth:`drop`, which moves them to
    ``dead`` and removes their rows, so the rest of the batch carries on.
    ``positions`` keeps every position the batch was read with, dead or alive:
    they are all acknowledged together once the batch's results are flushed.
    """

    __slots__ = ("dead", "events", "inputs", "late", "model_version", "outputs", "positions",
                 "seq", "steps")  # fmt: skip

    def __init__(self, events: list[Event], seq: int = 0) -> None:
        self.events = events
        self.positions: list[Position] = [e.position for e in events if e.position is not None]
        self.seq = seq
        self.dead: list[DeadLetter] = []
        self.inputs: Arrays | None = None
        self.outputs: Arrays | None = None
        #: The version of the model whose outputs these are (set by the model stage).
        self.model_version = ""
        #: Which step of the model's fallback chain answered: ``None`` (no chain: the
        #: model), one name for every row, or a name per row (set by the model stage).
        self.steps: str | list[str] | None = None
        #: Rows whose deadline passed before the model ran them and that were answered
        #: anyway (by the fallback chain, or the model with ``expired: late``): a boolean
        #: per row, or ``None`` when there are none. Results carry ``"late": true``.
        self.late: npt.NDArray[np.bool_] | None = None

    def __len__(self) -> int:
        return len(self.events)

    def drop(self, rows: Sequence[int], stage: str, reasons: str | Sequence[str]) -> None:
        """Move the events at ``rows`` (indices into ``events``) to the dead letters."""
        if not rows:
            return
        if isinstance(reasons, str):
            reasons = [reasons] * len(rows)
        events = self.events
        for i, reason in zip(rows, reasons, strict=True):
            self.dead.append(DeadLetter(events[i], stage, reason))
        gone = set(rows)
        keep = [i for i in range(len(events)) if i not in gone]
        self.events = [events[i] for i in keep]
        if isinstance(self.steps, list):
            steps = self.steps
            self.steps = [steps[i] for i in keep]
        if self.inputs is not None or self.outputs is not None or self.late is not None:
            index = np.asarray(keep, dtype=np.intp)
            if self.inputs is not None:
                self.inputs = {k: v[index] for k, v in self.inputs.items()}
            if self.outputs is not None:
                self.outputs = {k: v[index] for k, v in self.outputs.items()}
            if self.late is not None:
                late = self.late[index]
                self.late = late if late.any() else None

    def drop_all(self, stage: str, reason: str) -> None:
        """Move every remaining event to the dead letters with one reason."""
        self.drop(range(len(self.events)), stage, reason)

    def deadline(self) -> float | None:
        """The earliest deadline among the batch's events, or ``None`` if none has one."""
        deadlines = [e.deadline for e in self.events if e.deadline is not None]
        return min(deadlines) if deadlines else None


#: The one calling convention of the pipeline: take a batch, return it.
Handler = Callable[[Batch], Awaitable[Batch]]


class TensorSpec(NamedTuple):
    """A model input or output: its name, numpy dtype, and shape (``None``: any size)."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...]

    def describe_shape(self) -> str:
        return "[" + ", ".join("-1" if d is None else str(d) for d in self.shape) + "]"


@runtime_checkable
class Source(Protocol):
    """Where events come from.

    ``read`` waits until at least one event is available and returns up to
    ``max_events`` of them in order; it returns an empty list only when the
    source has ended (a file read to its end) or was closed. ``ack`` is called
    with the positions of events whose results every sink has flushed, in the
    order they were read; after it returns the source may forget them.

    A source may also have ``async def lag(self) -> int | None``: the events its
    consumer group has not acknowledged yet (undelivered and in flight), when the
    broker can tell. The pipeline exports it as ``rtinfer_consumer_lag``.

    A source may also have ``async def skip(self, record, keep=0) -> int``: move its
    consumer group past every entry not yet delivered to it but the newest ``keep``,
    without delivering them. It first
    awaits ``record(ranges)`` with what it will skip (a list of :class:`Skipped`), and
    moves only once that returned, so a crash leaves the entries recorded or still
    unread; it returns how many it skipped. A pipeline shedding by range (``slo.shed_by:
    range``) calls it before a read when the last read held late events.
    """

    name: str

    async def start(self) -> None: ...

    async def read(self, max_events: int) -> list[Event]: ...

    async def ack(self, positions: Sequence[Position]) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Sink(Protocol):
    """Where results go.

    ``write`` takes events whose ``result`` is set and may buffer them;
    ``flush`` returns only when everything written so far is durable (on disk,
    acknowledged by the broker). Sources are acknowledged only after a flush.
    """

    name: str

    async def start(self) -> None: ...

    async def write(self, events: Sequence[Event]) -> None: ...

    async def flush(self) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Model(Protocol):
    """A model that predicts on a batch of rows.

    ``predict`` is a plain blocking call; the micro-batcher runs it on a worker
    thread, never on the event loop. ``inputs`` and ``outputs`` are known
    after ``load``.
    """

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    def load(self) -> None: ...

    def warmup(self, batch_sizes: Sequence[int]) -> None: ...

    def predict(self, inputs: Arrays) -> Arrays: ...


#: How a model is built from its file (not loaded yet): the signature of
#: :func:`rtinfer.models.load_model` (``path, *, name, version, allow_pickle, **options``).
Loader = Callable[..., Model]
