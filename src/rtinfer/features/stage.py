"""The feature stage: a :class:`~.definition.FeatureSet` computed on a live stream.

::

    stages:
      - type: python
        use: rtinfer.features:FeatureStage
        args: {definition: features.yaml, store: file://state/features}

Each batch's events are read into rows (:mod:`.rows`), grouped by source
partition (each partition has its own state and watermark) and run through the
:class:`~.engine.Engine` in order; the values go to ``batch.inputs[input]``
(appended as columns when an earlier stage already made that input) and, with
``emit="result"`` or ``"both"``, to each event's result record.

With a ``store`` (:mod:`.state`), the state survives restarts: after each batch
the changed keys are encoded as a frame, and :meth:`FeatureStage.checkpoint`,
which the pipeline awaits after flushing its sinks and before acknowledging the
source, commits the frames of every acknowledged batch, with their offsets. A
partition's state is read back the first time the partition appears (after a
restart, or when it moves here from another worker), and its events at or
below the committed offset, already counted and flushed, are skipped.

The stage is synchronous on purpose: it must see batches in source order, so
put it before any stage that awaits (enrichment, the model).
"""

from __future__ import annotations

import asyncio
import operator
import re
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..exceptions import ConfigError, RtinferError
from ..types import Batch, DeadLetter, Event, Position, Sink
from .definition import FeatureSet, load_definition
from .engine import Engine, Partition
from .rows import RowReader
from .state import Frame, StateStore, encode_frame, open_store

__all__ = ["FeatureStage", "offset_order"]

PartitionId = tuple[str, int]
_NO_PARTITION: PartitionId = ("", 0)
_PID = operator.attrgetter("source", "partition")
_INT = frozenset((int,))
_STREAM_ID = re.compile(r"^(\d+)-(\d+)$")
_MAX_PENDING = 100_000  # frames waiting for an acknowledgement: a pipeline that never checkpoints


def offset_order(offset: int | str) -> Any:
    """A sort key for source offsets: integers as they are, Redis stream ids numerically."""
    if isinstance(offset, str) and (match := _STREAM_ID.match(offset)):
        return (int(match.group(1)), int(match.group(2)))
    return offset


class FeatureStage:
    """Compute a feature set per key, in event time, with state that survives restarts.

    ``definition``: a :class:`FeatureSet`, a mapping, or the path of a YAML file.
    ``input``/``dtype``: the model input the values go to. ``emit``: ``"inputs"``
    (the default), ``"result"`` (each event's result becomes ``{"id", "key", "time",
    feature: value, ...}``, for a pipeline that only computes features) or
    ``"both"``. ``store``: ``file://DIR`` (or a path), ``redis://HOST:PORT/DB``, a
    :class:`~.state.StateStore`, or ``None`` (state in memory only).
    ``side_output``: a sink (or the path of a JSON Lines file) for events later than
    the allowed lateness when the definition's ``late`` is ``side_output``.
    """

    def __init__(
        self,
        definition: FeatureSet | Mapping[str, Any] | str | Path,
        *,
        input: str = "features",
        dtype: str = "float32",
        emit: str = "inputs",
        store: str | StateStore | None = None,
        side_output: str | Sink | None = None,
        name: str | None = None,
    ) -> None:
        self.definition = load_definition(definition)
        self.engine = Engine(self.definition)
        self.reader = RowReader(self.engine)
        self.name = name or f"features.{self.definition.name}"
        self.input = input
        try:
            self.dtype = np.dtype(dtype)
        except TypeError as exc:
            raise ConfigError(f"{exc}; use a numpy dtype such as float32", key="dtype") from None
        if emit not in ("inputs", "result", "both"):
            raise ConfigError(f"emit must be inputs, result or both, got {emit!r}", key="emit")
        self._inputs = emit in ("inputs", "both")
        self._results = emit in ("result", "both")
        self.store = open_store(store)
        if self.definition.late == "side_output" and side_output is None:
            raise ConfigError(
                "late: side_output needs a side_output (a sink, or a JSON Lines file's path)",
                key="side_output",
            )
        if isinstance(side_output, str | Path):
            from ..sinks.file import JsonLinesSink

            side_output = JsonLinesSink(side_output)
        self.side_output: Sink | None = side_output
        self._side: list[Event] = []
        self.partitions: dict[PartitionId, Partition] = {}
        self._seen: dict[PartitionId, Any] = {}  # highest offset read since the state was loaded
        self._restored: dict[PartitionId, Any] = {}  # committed offset, while events may be below
        self._pending: dict[PartitionId, deque[tuple[Any, bytes]]] = {}
        self._acked: dict[PartitionId, Any] = {}
        self._pending_count = 0
        #: Counters: events too late (by policy), skipped as already applied, keys evicted.
        self.late = 0
        self.skipped = 0
        self.evicted = 0

    def __len__(self) -> int:
        """How many keys have state, over all partitions."""
        return sum(len(p) for p in self.partitions.values())

    async def start(self) -> None:
        if self.side_output is not None:
            await self.side_output.start()

    async def aclose(self) -> None:
        try:
            if self.side_output is not None:
                await self._flush_side()
                await self.side_output.aclose()
        finally:
            if self.store is not None:
                self.store.close()

    # -- the batch path ---------------------------------------------------------------------

    def __call__(self, batch: Batch) -> Batch:
        events = batch.events
        n = len(events)
        reader = self.reader
        at = [e.position for e in events]
        if None in at:
            pids = [(p.source, p.partition) if p is not None else _NO_PARTITION for p in at]
        else:
            pids = list(map(_PID, at))
        positions = batch.positions
        if n and pids.count(pids[0]) == n:  # the common case: one partition
            groups: dict[PartitionId, list[int]] = {pids[0]: list(range(n))}
        else:
            groups = {}
            for i, pid in enumerate(pids):
                groups.setdefault(pid, []).append(i)
        for pid in set(map(_PID, positions)):
            groups.setdefault(pid, [])
        processing = self.definition.time == "processing"
        keys = [e.key for e in events] if reader.needs_event_key else None
        times = None
        if reader.needs_event_time:
            times = (
                [e.ingest_time for e in events] if processing else [e.event_time for e in events]
            )
        key_of, time_of, columns, drop = reader.columns([e.data for e in events], keys, times)
        values: list[Any] = [None] * n
        gone: set[int] = set()  # rows leaving without a dead letter
        for pid, members in groups.items():
            part = self._partition(pid, events, members)
            live = [i for i in members if i not in drop] if drop else members
            restored = self._restored.get(pid)
            if restored is not None:
                live = self._skip_applied(pid, restored, events, live, gone)
            if len(live) == n:  # every event: the columns as they are
                out, late = self.engine.apply_columns(part, key_of, time_of, columns)
                values = out
            else:
                out, late = self.engine.apply_columns(
                    part,
                    [key_of[i] for i in live],
                    [time_of[i] for i in live],
                    [[column[i] for i in live] for column in columns],
                )
                for i, v in zip(live, out, strict=True):
                    values[i] = v
            if late:
                self._late(part, [live[j] for j in late], key_of, time_of, events, drop, gone)
            self.evicted += self.engine.evict(part)
            self._record(pid, part, positions, len(groups) == 1)
        self._finish(batch, values, key_of, time_of, drop, gone)
        return batch

    def _partition(self, pid: PartitionId, events: list[Event], members: list[int]) -> Partition:
        """The partition's state: read from the store when it first appears, or when its
        offsets rewind (its events are being delivered again: the state here is ahead)."""
        part = self.partitions.get(pid)
        first = next((events[i].position for i in members), None)
        seen = self._seen.get(pid)
        if first is not None and seen is not None and offset_order(first.offset) <= seen:
            part = None  # rewound: what was read since the last commit is coming again
        if part is None:
            part = self._load(pid)
        if members:
            last = events[members[-1]].position
            if last is not None:
                self._seen[pid] = offset_order(last.offset)
        return part

    def _load(self, pid: PartitionId) -> Partition:
        part = Partition()
        self._pending_count -= len(self._pending.pop(pid, ()))
        self._restored.pop(pid, None)
        self._seen.pop(pid, None)
        frame = self.store.load(self.namespace(pid)) if self.store is not None else None
        if frame is not None:
            part.max_time = frame.max_time
            part.applied = frame.applied
            for key, buffer in frame.set:
                part.keys[key] = buffer
            if frame.applied is not None:
                self._restored[pid] = offset_order(frame.applied)
        self.partitions[pid] = part
        return part

    def namespace(self, pid: PartitionId) -> str:
        """Where a partition's state is kept in the store."""
        return f"{self.definition.name}.{pid[0]}.{pid[1]}"

    def _skip_applied(
        self, pid: PartitionId, restored: Any, events: list[Event], live: list[int], gone: set[int]
    ) -> list[int]:
        """Leave out the events the restored state already holds (their results were flushed)."""
        keep = []
        for i in live:
            position = events[i].position
            if position is not None and offset_order(position.offset) <= restored:
                gone.add(i)
                self.skipped += 1
            else:
                keep.append(i)
        if keep:  # past the restored offset: no need to look again
            del self._restored[pid]
        return keep

    def _late(
        self,
        part: Partition,
        late: list[int],
        key_of: list[Any],
        time_of: list[Any],
        events: list[Event],
        drop: dict[int, str],
        gone: set[int],
    ) -> None:
        self.late += len(late)
        policy = self.definition.late
        if policy == "update":
            return
        watermark = part.max_time - self.engine.scale * self.definition.out_of_orderness
        lateness = self.definition.allowed_lateness
        for i in late:
            reason = (
                f"late: event time {time_of[i]} is before the watermark {watermark:g} minus "
                f"the allowed lateness of {lateness:g} s"
            )
            if policy == "dead_letter":
                drop[i] = reason
            else:
                gone.add(i)
                event = events[i]
                key = key_of[i]
                event.result = {
                    "id": event.id,
                    "key": key.decode("utf-8", "replace") if isinstance(key, bytes) else key,
                    "time": time_of[i],
                    "watermark": watermark,
                    "reason": reason,
                    "value": event.value.decode("utf-8", "replace"),
                }
                self._side.append(event)

    def _record(
        self, pid: PartitionId, part: Partition, positions: Sequence[Position], alone: bool
    ) -> None:
        """Note the batch's highest offset; with a store, encode the batch's frame.
        ``alone``: ``pid`` is the batch's only partition (every position is its)."""
        if alone:
            offsets = [p.offset for p in positions]
        else:
            offsets = [p.offset for p in positions if (p.source, p.partition) == pid]
        if offsets:
            if _INT.issuperset(map(type, offsets)):
                part.applied = max(offsets)  # offset_order of an integer is itself
            else:
                part.applied = max(offsets, key=offset_order)
        if self.store is not None and (offsets or part.touched or part.evicted):
            keys = part.keys
            frame = Frame(
                part.max_time,
                part.applied,
                [(k, keys[k]) for k in part.touched],
                list(part.evicted),
            )
            self._pending.setdefault(pid, deque()).append(
                (offset_order(part.applied) if part.applied is not None else None,
                 encode_frame(frame))
            )  # fmt: skip
            self._pending_count += 1
            if self._pending_count > _MAX_PENDING:
                raise RtinferError(
                    f"feature stage {self.name!r} holds {self._pending_count} uncommitted state "
                    "frames: nothing calls its checkpoint(); run it in a Pipeline, or call "
                    "await stage.checkpoint(positions) after acknowledging"
                )
        part.touched.clear()
        part.evicted.clear()

    def _finish(
        self,
        batch: Batch,
        values: list[Any],
        key_of: list[Any],
        time_of: list[Any],
        drop: dict[int, str],
        gone: set[int],
    ) -> None:
        events = batch.events
        if drop or gone:
            keep = [i for i in range(len(events)) if i not in drop and i not in gone]
            for i in sorted(drop):
                batch.dead.append(DeadLetter(events[i], self.name, drop[i]))
            index = np.asarray(keep, dtype=np.intp)
            if batch.inputs is not None:
                batch.inputs = {k: v[index] for k, v in batch.inputs.items()}
            if batch.outputs is not None:
                batch.outputs = {k: v[index] for k, v in batch.outputs.items()}
            events = batch.events = [events[i] for i in keep]
            values = [values[i] for i in keep]
            key_of = [key_of[i] for i in keep]
            time_of = [time_of[i] for i in keep]
        width = self.engine.width
        array = np.array(values, dtype=np.float64).reshape(len(values), width)
        if self._inputs:
            column = array.astype(self.dtype, copy=False)
            inputs = batch.inputs if batch.inputs is not None else {}
            if self.input in inputs:
                column = np.hstack([inputs[self.input], column.astype(inputs[self.input].dtype)])
            inputs[self.input] = column
            batch.inputs = inputs
        if self._results:
            names = self.definition.names
            for event, key, time, v in zip(events, key_of, time_of, values, strict=True):
                record = {
                    "id": event.id,
                    "key": key.decode("utf-8", "replace") if isinstance(key, bytes) else key,
                    "time": time,
                }
                record.update(zip(names, v, strict=True))
                event.result = record

    # -- durability -------------------------------------------------------------------------

    async def checkpoint(self, positions: Sequence[Position]) -> None:
        """Commit the state of every batch whose positions are in ``positions`` (or were
        before), with those offsets; flush the side output. The pipeline awaits this
        after its sinks flushed and before it acknowledges ``positions``."""
        acked = self._acked
        pids = list(map(_PID, positions))
        if pids and pids.count(pids[0]) == len(pids):  # the common case: one partition
            offsets: dict[PartitionId, list[Any]] = {pids[0]: [p.offset for p in positions]}
        else:
            offsets = {}
            for pid, position in zip(pids, positions, strict=True):
                offsets.setdefault(pid, []).append(position.offset)
        for pid, of_pid in offsets.items():
            if _INT.issuperset(map(type, of_pid)):
                order = max(of_pid)  # offset_order of an integer is itself
            else:
                order = max(map(offset_order, of_pid))
            if pid not in acked or order > acked[pid]:
                acked[pid] = order
        await self._flush_side()
        if self.store is None:
            return
        ready: dict[str, list[bytes]] = {}
        for pid, queue in self._pending.items():
            done = acked.get(pid)
            frames = []
            while queue and (queue[0][0] is None or (done is not None and queue[0][0] <= done)):
                frames.append(queue.popleft()[1])
            if frames:
                ready[self.namespace(pid)] = frames
                self._pending_count -= len(frames)
        if ready:
            await asyncio.to_thread(self._commit, ready)

    def _commit(self, ready: dict[str, list[bytes]]) -> None:
        assert self.store is not None
        for namespace, frames in ready.items():
            self.store.commit(namespace, frames)

    async def _flush_side(self) -> None:
        if self.side_output is None:
            return
        if self._side:
            events, self._side = self._side, []
            await self.side_output.write(events)
        await self.side_output.flush()
