"""The in-process broker: rtinfer's embedded default, and what unit tests run on.

It is a small log broker with the semantics of Kafka, so that a pipeline
tested here behaves the same on Kafka:

- **Topics** hold one or more **partitions**, each an append-only log whose
  records get consecutive **offsets** from 0. Publishing to an unknown topic
  creates it with ``default_partitions`` (Kafka's ``auto.create.topics.enable``).
- **Partitioning**: a record with a key goes to ``zlib.crc32(key) % partitions``,
  so one key always lands on one partition and keeps its order; a record
  without a key goes round-robin. (Kafka hashes with murmur2, so the same key
  may sit on a different partition number there; the guarantee is the same.)
- **Retention** keeps at most ``retention`` records per partition. Offsets keep
  counting; a consumer whose position was trimmed away resumes at the earliest
  kept offset (Kafka's ``auto.offset.reset=earliest``).
- **Consumer groups**: the members of a group share the partitions of the
  topics they subscribe to. Each partition is owned by exactly one member
  (range assignment per topic, members in join order), and the partitions are
  reassigned whenever a member joins or leaves. A member resumes a newly
  assigned partition at the group's committed offset (earliest if none), and
  keeps its position on partitions it keeps.
- **Commits** are Kafka's: committing ``N`` for a partition says that every
  record below ``N`` is done. A member may commit only partitions it owns; a
  commit for a partition it lost in a rebalance is refused, and
  :meth:`Consumer.commit` returns the refused partitions (where Kafka raises
  ``CommitFailedError``). Because a new owner resumes at the committed offset,
  records fetched but not committed by a member that left or lost the
  partition are **delivered again**: delivery is at-least-once.
- **End of stream** (not a Kafka notion; finite demos and tests need it):
  after :meth:`Broker.end_topic`, a fetch that has read every assigned
  partition of its (ended) topics to the end returns ``[]``. A closed
  consumer's fetch returns ``[]`` too.

It runs on one asyncio event loop and is not thread-safe: call it only from
the loop's thread. Publishing is synchronous and never blocks;
:meth:`Consumer.fetch` waits without polling, woken by a publish, a rebalance,
an end of topic or a close. Records are stored as parallel lists per
partition and fetched as list slices (:class:`Chunk`), so the cost per record
is an append when published and a slice when fetched.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from itertools import count, repeat
from typing import NamedTuple

from .exceptions import Closed

__all__ = ["Broker", "Chunk", "Consumer", "Record"]

logger = logging.getLogger(__name__)

Headers = Mapping[str, bytes]
TopicPartition = tuple[str, int]

#: Trimmed records are reclaimed in bulk once at least this many (and at least
#: half of what a partition holds) are waiting, so trimming costs O(1) per record.
_COMPACT_MIN = 1024


class Record(NamedTuple):
    """One record as a consumer receives it; ``timestamp`` is seconds since the epoch."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Headers | None
    timestamp: float


class Chunk(NamedTuple):
    """Consecutive records of one partition as parallel lists, from offset ``offset``.

    What :meth:`Consumer.fetch_chunks` returns: the bulk form of :class:`Record`,
    for readers that turn records into their own objects anyway.
    """

    topic: str
    partition: int
    offset: int
    values: list[bytes]
    keys: list[bytes | None]
    headers: list[Headers | None]
    timestamps: list[float]


class _Log:
    """One partition: parallel lists of the records from offset ``first``.

    ``values[head:]`` are the records still kept; those before ``head`` were
    trimmed by retention and wait to be reclaimed in bulk.
    """

    __slots__ = (
        "first",
        "head",
        "headers",
        "keys",
        "partition",
        "retention",
        "timestamps",
        "topic",
        "values",
        "waiters",
    )

    def __init__(self, topic: str, partition: int, retention: int | None) -> None:
        self.topic = topic
        self.partition = partition
        self.retention = retention
        self.first = 0
        self.head = 0
        self.values: list[bytes] = []
        self.keys: list[bytes | None] = []
        self.headers: list[Headers | None] = []
        self.timestamps: list[float] = []
        self.waiters: set[Consumer] = set()

    @property
    def start(self) -> int:
        return self.first + self.head

    @property
    def end(self) -> int:
        return self.first + len(self.values)

    def appended(self) -> None:
        """Apply retention and wake the consumers waiting on this partition."""
        retention = self.retention
        if retention is not None and len(self.values) - self.head > retention:
            self._trim(retention)
        waiters = self.waiters
        if waiters:
            for consumer in waiters:
                consumer._wake()
            waiters.clear()

    def _trim(self, retention: int) -> None:
        size = len(self.values)
        head = self.head = size - retention
        if head >= _COMPACT_MIN and head * 2 >= size:
            del self.values[:head], self.keys[:head], self.headers[:head]
            del self.timestamps[:head]
            self.first += head
            self.head = 0


class _Topic:
    __slots__ = ("ended", "logs", "name", "next_partition", "subscribers")

    def __init__(self, name: str, partitions: int, retention: int | None) -> None:
        self.name = name
        self.logs = [_Log(name, p, retention) for p in range(partitions)]
        self.ended = False
        self.next_partition = 0
        self.subscribers: set[Consumer] = set()


class _Group:
    __slots__ = ("committed", "members", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: list[Consumer] = []
        self.committed: dict[TopicPartition, int] = {}

    def rebalance(self, topics: Mapping[str, _Topic]) -> None:
        """Range-assign each topic's partitions to its subscribers, in join order."""
        plan: dict[Consumer, list[_Log]] = {m: [] for m in self.members}
        names = sorted({t.name for m in self.members for t in m._topics})
        for name in names:
            logs = topics[name].logs
            subscribers = [m for m in self.members if any(t.name == name for t in m._topics)]
            share, extra = divmod(len(logs), len(subscribers))
            lo = 0
            for i, member in enumerate(subscribers):
                hi = lo + share + (1 if i < extra else 0)
                plan[member].extend(logs[lo:hi])
                lo = hi
        for member, logs in plan.items():
            member._assign(logs, self.committed)
        if logger.isEnabledFor(logging.DEBUG):
            assignment = {m.name: m.assignment() for m in self.members}
            logger.debug("group %r rebalanced: %s", self.name, assignment)


class _Claim:
    """A partition a consumer owns, and the next offset it will fetch from it."""

    __slots__ = ("log", "position")

    def __init__(self, log: _Log, position: int) -> None:
        self.log = log
        self.position = position


class Broker:
    """An in-process log broker with Kafka's topics, partitions and consumer groups.

    ``default_partitions`` is the partition count of auto-created topics;
    ``retention`` the number of records kept per partition (``None``: all).
    See the module documentation for the semantics. Not thread-safe: use it
    from one event loop.
    """

    __slots__ = ("_groups", "_members", "_topics", "default_partitions", "retention")

    def __init__(self, default_partitions: int = 1, retention: int | None = 1_000_000) -> None:
        if default_partitions < 1:
            raise ValueError(f"default_partitions must be at least 1, got {default_partitions!r}")
        _check_retention(retention)
        self.default_partitions = default_partitions
        self.retention = retention
        self._topics: dict[str, _Topic] = {}
        self._groups: dict[str, _Group] = {}
        self._members = count(1)

    # -- topics -------------------------------------------------------------------------

    def create_topic(
        self, name: str, partitions: int | None = None, retention: int | None = None
    ) -> None:
        """Create topic ``name``; ``None`` takes the broker's defaults.

        Creating a topic that exists with the same partition count does nothing;
        with another count it is an error (partitions are fixed once created).
        """
        n = self.default_partitions if partitions is None else partitions
        if n < 1:
            raise ValueError(f"topic {name!r}: partitions must be at least 1, got {n!r}")
        _check_retention(retention)
        topic = self._topics.get(name)
        if topic is not None:
            if len(topic.logs) != n:
                raise ValueError(
                    f"topic {name!r} already exists with {len(topic.logs)} partitions, "
                    f"cannot create it with {n}; use another name or the existing count"
                )
            return
        self._topics[name] = _Topic(name, n, self.retention if retention is None else retention)

    def topics(self) -> list[str]:
        """The names of the topics, sorted."""
        return sorted(self._topics)

    def end_offsets(self, topic: str) -> list[int]:
        """Per partition, the offset the next published record will get."""
        return [log.end for log in self._get(topic).logs]

    def beginning_offsets(self, topic: str) -> list[int]:
        """Per partition, the earliest offset still kept (retention trims older ones)."""
        return [log.start for log in self._get(topic).logs]

    def end_topic(self, name: str) -> None:
        """Mark topic ``name`` finished: readers that reach its end get ``[]``.

        Publishing to it afterwards raises :class:`~rtinfer.exceptions.Closed`.
        """
        topic = self._topic(name)
        topic.ended = True
        for consumer in topic.subscribers:
            consumer._wake()

    def _get(self, name: str) -> _Topic:
        topic = self._topics.get(name)
        if topic is None:
            raise ValueError(
                f"unknown topic {name!r} (topics: {sorted(self._topics)}); "
                "publish to it or call create_topic() first"
            )
        return topic

    def _topic(self, name: str) -> _Topic:
        topic = self._topics.get(name)
        if topic is None:
            if not isinstance(name, str) or not name:
                raise ValueError(f"a topic name must be a non-empty string, got {name!r}")
            topic = self._topics[name] = _Topic(name, self.default_partitions, self.retention)
        return topic

    # -- producing ----------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
        timestamp: float | None = None,
        partition: int | None = None,
    ) -> tuple[int, int]:
        """Append one record and return its ``(partition, offset)``. Never blocks.

        ``timestamp`` defaults to now (``time.time()``); ``partition`` overrides
        the key's partition.
        """
        t = self._topics.get(topic) or self._topic(topic)
        if t.ended:
            raise Closed(f"topic {topic!r} was ended by end_topic(); it takes no more records")
        if type(value) is not bytes:
            raise TypeError(
                f"a record value must be bytes, got {type(value).__name__}; "
                "encode it first (for example msgspec.json.encode(value))"
            )
        logs = t.logs
        if partition is None:
            if key is None:
                partition = t.next_partition
                t.next_partition = (partition + 1) % len(logs)
            elif type(key) is bytes:
                partition = zlib.crc32(key) % len(logs)
            else:
                raise TypeError(f"a record key must be bytes or None, got {type(key).__name__}")
        elif not 0 <= partition < len(logs):
            raise ValueError(
                f"topic {topic!r} has partitions 0 to {len(logs) - 1}, got partition {partition!r}"
            )
        log = logs[partition]
        offset = log.first + len(log.values)
        log.values.append(value)
        log.keys.append(key)
        log.headers.append(None if headers is None else dict(headers))
        log.timestamps.append(time.time() if timestamp is None else timestamp)
        log.appended()
        return partition, offset

    def publish_many(
        self,
        topic: str,
        values: Sequence[bytes],
        *,
        keys: Sequence[bytes | None] | None = None,
        timestamps: Sequence[float] | None = None,
    ) -> None:
        """Append many records at once: the fast path for producers and tests.

        Records are partitioned as by :meth:`publish` (a ``None`` key goes
        round-robin); ``timestamps`` defaults to one ``time.time()`` for all.
        """
        t = self._topics.get(topic) or self._topic(topic)
        if t.ended:
            raise Closed(f"topic {topic!r} was ended by end_topic(); it takes no more records")
        n = len(values)
        for name, seq in (("keys", keys), ("timestamps", timestamps)):
            if seq is not None and len(seq) != n:
                raise ValueError(f"publish_many: got {n} values but {len(seq)} {name}")
        if not all(type(v) is bytes for v in values):
            bad = next(v for v in values if type(v) is not bytes)
            raise TypeError(
                f"a record value must be bytes, got {type(bad).__name__}; "
                "encode it first (for example msgspec.json.encode(value))"
            )
        if keys is not None and not all(k is None or type(k) is bytes for k in keys):
            bad = next(k for k in keys if k is not None and type(k) is not bytes)
            raise TypeError(f"a record key must be bytes or None, got {type(bad).__name__}")
        if n == 0:
            return
        logs = t.logs
        parts = len(logs)
        if parts == 1:
            _extend(
                logs[0],
                values,
                repeat(None, n) if keys is None else keys,
                repeat(time.time(), n) if timestamps is None else timestamps,
            )
            return
        stamps = [time.time()] * n if timestamps is None else list(timestamps)
        if keys is not None:
            self._publish_keyed(t, values, keys, stamps)
            return
        rr = t.next_partition
        t.next_partition = (rr + n) % parts
        for p in range(parts):
            i = (p - rr) % parts
            part = values[i::parts]
            _extend(logs[p], part, repeat(None, len(part)), stamps[i::parts])

    def _publish_keyed(
        self,
        t: _Topic,
        values: Sequence[bytes],
        keys: Sequence[bytes | None],
        timestamps: list[float],
    ) -> None:
        parts = len(t.logs)
        rr = t.next_partition
        index: list[list[int]] = [[] for _ in range(parts)]
        crc32 = zlib.crc32
        for i, key in enumerate(keys):
            if key is None:
                index[rr].append(i)
                rr = (rr + 1) % parts
            else:
                index[crc32(key) % parts].append(i)
        t.next_partition = rr
        for log, rows in zip(t.logs, index, strict=True):
            if rows:
                _extend(
                    log,
                    [values[i] for i in rows],
                    [keys[i] for i in rows],
                    [timestamps[i] for i in rows],
                )

    # -- consuming ----------------------------------------------------------------------

    def consumer(
        self, topics: str | Sequence[str], group: str, *, name: str | None = None
    ) -> Consumer:
        """Join ``group`` as a new member reading ``topics``; the group rebalances.

        Unknown topics are created, as a publish would. ``name`` (unique among
        the group's members) defaults to ``"<group>-<n>"``.
        """
        wanted = [topics] if isinstance(topics, str) else list(topics)
        if not wanted:
            raise ValueError("a consumer needs at least one topic, got none")
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = _Group(group)
        member = f"{group}-{next(self._members)}" if name is None else name
        if any(m.name == member for m in g.members):
            raise ValueError(
                f"group {group!r} already has a member named {member!r}; "
                "close it first or pick another name"
            )
        consumer = Consumer(self, g, member, [self._topic(t) for t in dict.fromkeys(wanted)])
        g.members.append(consumer)
        for t in consumer._topics:
            t.subscribers.add(consumer)
        g.rebalance(self._topics)
        return consumer

    def _leave(self, consumer: Consumer) -> None:
        group = consumer._group
        group.members.remove(consumer)
        for t in consumer._topics:
            t.subscribers.discard(consumer)
        group.rebalance(self._topics)

    def committed(self, group: str, topic: str) -> list[int]:
        """Per partition, the offset ``group`` committed.

        A partition the group never committed reports the earliest kept offset,
        where the group would start reading.
        """
        g = self._groups.get(group)
        done = g.committed if g is not None else {}
        return [done.get((topic, log.partition), log.start) for log in self._get(topic).logs]

    def lag(self, group: str, topic: str) -> int:
        """How many kept records of ``topic`` the group has not committed yet, summed."""
        logs = self._get(topic).logs
        done = self.committed(group, topic)
        return sum(log.end - max(c, log.start) for log, c in zip(logs, done, strict=True))


class Consumer:
    """A member of a consumer group, made by :meth:`Broker.consumer`.

    Read by one task at a time (like a Kafka consumer). ``fetch`` returns
    records of the partitions it owns; ``commit`` acknowledges them;
    ``close`` leaves the group, whose remaining members take over its
    partitions from the committed offsets.
    """

    __slots__ = (
        "_broker",
        "_claims",
        "_closed",
        "_group",
        "_rotation",
        "_topics",
        "_waiter",
        "name",
    )

    def __init__(self, broker: Broker, group: _Group, name: str, topics: list[_Topic]) -> None:
        self._broker = broker
        self._group = group
        self._topics = topics
        self.name = name
        self._claims: dict[TopicPartition, _Claim] = {}
        self._closed = False
        self._rotation = 0
        self._waiter: asyncio.Future[None] | None = None

    @property
    def group(self) -> str:
        return self._group.name

    @property
    def closed(self) -> bool:
        return self._closed

    def assignment(self) -> list[TopicPartition]:
        """The ``(topic, partition)`` pairs this member owns, sorted."""
        return sorted(self._claims)

    def position(self, topic: str, partition: int) -> int:
        """The next offset this member will fetch from a partition it owns."""
        claim = self._claims.get((topic, partition))
        if claim is None:
            raise ValueError(
                f"consumer {self.name!r} does not own {topic!r} partition {partition}; "
                f"it owns {self.assignment()}"
            )
        return max(claim.position, claim.log.start)

    async def fetch(self, max_records: int) -> list[Record]:
        """Wait for records and return up to ``max_records`` of them.

        Records come in offset order per partition, shared fairly among the
        partitions that have some. Returns ``[]`` once the consumer is closed,
        or once all its topics are ended and it has read every partition it
        owns to the end (at once, for a member that owns none).
        """
        return _records(await self.fetch_chunks(max_records))

    def fetch_nowait(self, max_records: int) -> list[Record]:
        """Like :meth:`fetch`, but return ``[]`` at once when no record is available."""
        _check_max(max_records)
        return [] if self._closed else _records(self._take(max_records))

    async def fetch_chunks(self, max_records: int) -> list[Chunk]:
        """Like :meth:`fetch`, but as one :class:`Chunk` of parallel lists per partition."""
        _check_max(max_records)
        while not self._closed:
            chunks = self._take(max_records)
            if chunks:
                return chunks
            if all(t.ended for t in self._topics):
                return []  # nothing left to read, and nothing more will come
            if self._waiter is not None:
                raise RuntimeError(
                    f"consumer {self.name!r} is already fetching in another task; "
                    "read a consumer from one task at a time"
                )
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            logs = [claim.log for claim in self._claims.values()]
            for log in logs:
                log.waiters.add(self)
            try:
                await waiter
            finally:
                self._waiter = None
                for log in logs:
                    log.waiters.discard(self)
        return []

    def commit(self, offsets: Mapping[TopicPartition, int]) -> set[TopicPartition]:
        """Commit the next offset to read for each ``(topic, partition)``.

        Committing ``N`` says every record below ``N`` is done: a member taking
        the partition over resumes there. Returns the partitions whose commit
        was refused because this member does not own them (any more, after a
        rebalance, or because it is closed); their records will be delivered
        again to their owner. Where Kafka raises ``CommitFailedError``, this
        returns the refused set, so a source can log it and carry on.
        """
        refused: set[TopicPartition] = set()
        accepted: dict[TopicPartition, int] = {}
        claims = self._claims
        for tp, offset in offsets.items():
            claim = claims.get(tp)
            if claim is None:
                refused.add(tp)
            elif 0 <= offset <= claim.log.end:
                accepted[tp] = offset
            else:
                raise ValueError(
                    f"cannot commit offset {offset!r} for {tp[0]!r} partition {tp[1]}: "
                    f"it holds offsets below {claim.log.end}; commit the offset of the "
                    "last record done plus one (nothing was committed)"
                )
        self._group.committed.update(accepted)
        return refused

    def seek_forward(self, tp: TopicPartition, offset: int) -> bool:
        """Fetch ``tp`` from ``offset`` on, skipping what lies before it; never moves back,
        and does nothing to a partition this member does not own. Commits nothing: the
        next commit past ``offset`` covers what was skipped. Returns whether it moved."""
        claim = self._claims.get(tp)
        if claim is None or offset <= claim.position:
            return False
        claim.position = min(offset, claim.log.end)
        return True

    def close(self) -> None:
        """Leave the group: its partitions go to the remaining members. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._claims = {}
        self._broker._leave(self)
        self._wake()

    def _assign(self, logs: list[_Log], committed: Mapping[TopicPartition, int]) -> None:
        """Own ``logs`` from now on: keep positions on kept partitions, resume new ones
        at the committed offset (0 if none: the fetch moves it to the earliest kept)."""
        old = self._claims
        claims: dict[TopicPartition, _Claim] = {}
        for log in logs:
            tp = (log.topic, log.partition)
            claims[tp] = old.get(tp) or _Claim(log, committed.get(tp, 0))
        self._claims = claims
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _take(self, max_records: int) -> list[Chunk]:
        """Take up to ``max_records`` available records, shared fairly among partitions."""
        claims = list(self._claims.values())
        k = len(claims)
        if not k:
            return []
        first = self._rotation % k
        self._rotation = first + 1
        ready: list[tuple[int, int, _Claim, int]] = []
        for j in range(k):
            claim = claims[(first + j) % k]
            log = claim.log
            start = log.first + log.head
            position = claim.position if claim.position > start else start
            available = log.first + len(log.values) - position
            if available > 0:
                ready.append((available, j, claim, position))
        if not ready:
            return []
        ready.sort()  # fewest first, so what a partition cannot use goes to the others
        chunks: list[Chunk] = []
        left = max_records
        for i, (available, _, claim, position) in enumerate(ready):
            share = -(-left // (len(ready) - i))  # ceil: the shares add up to ``left``
            n = available if available < share else share
            log = claim.log
            lo = position - log.first
            hi = lo + n
            chunks.append(
                Chunk(
                    log.topic,
                    log.partition,
                    position,
                    log.values[lo:hi],
                    log.keys[lo:hi],
                    log.headers[lo:hi],
                    log.timestamps[lo:hi],
                )
            )
            claim.position = position + n
            left -= n
            if not left:
                break
        return chunks

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"owns {self.assignment()}"
        return f"<Consumer {self.name!r} of group {self.group!r}, {state}>"


def _extend(
    log: _Log,
    values: Sequence[bytes],
    keys: Iterable[bytes | None],
    timestamps: Iterable[float],
) -> None:
    log.values.extend(values)
    log.keys.extend(keys)
    log.headers.extend(repeat(None, len(values)))
    log.timestamps.extend(timestamps)
    log.appended()


def _records(chunks: list[Chunk]) -> list[Record]:
    records: list[Record] = []
    for topic, partition, offset, values, keys, headers, timestamps in chunks:
        records += map(
            Record,
            repeat(topic),
            repeat(partition),
            count(offset),
            keys,
            values,
            headers,
            timestamps,
        )
    return records


def _check_max(max_records: int) -> None:
    if max_records < 1:
        raise ValueError(f"max_records must be at least 1, got {max_records!r}")


def _check_retention(retention: int | None) -> None:
    if retention is not None and retention < 1:
        raise ValueError(
            f"retention must be at least 1 record per partition or None (keep all), "
            f"got {retention!r}"
        )
