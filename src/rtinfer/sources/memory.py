"""Read a topic of the in-process broker (:mod:`rtinfer.broker`) as a pipeline source.

:class:`BrokerSource` is a member of a consumer group: several sources with
the same ``group`` share the topic's partitions, and acknowledging commits
offsets, so what a source read but did not acknowledge before it closed is
read again by the member that takes its partitions over.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from itertools import count

from ..broker import Broker, Consumer
from ..types import Event, Position, Skipped

__all__ = ["BrokerSource"]

logger = logging.getLogger(__name__)


class BrokerSource:
    """Events from ``topic`` of ``broker``, read as a member of consumer group ``group``.

    ``ingest_time`` is the record's broker timestamp (when it was published),
    and positions are ``Position("memory://<topic>", partition, offset)``.
    ``ack`` commits, per partition, the highest acknowledged offset plus one.
    ``name`` names the group member (default ``"<group>-<n>"``).
    """

    __slots__ = ("_broker", "_consumer", "_member", "group", "name", "topic")

    def __init__(
        self, broker: Broker, topic: str, *, group: str = "rtinfer", name: str | None = None
    ) -> None:
        self._broker = broker
        self.topic = topic
        self.group = group
        self._member = name
        self.name = f"memory://{topic}"
        self._consumer: Consumer | None = None

    async def start(self) -> None:
        """Join the consumer group (the group rebalances)."""
        if self._consumer is None:
            self._consumer = self._broker.consumer(self.topic, self.group, name=self._member)

    async def read(self, max_events: int) -> list[Event]:
        """Wait for events; ``[]`` once the topic has ended and was read, or after close."""
        consumer = self._consumer
        if consumer is None:
            raise RuntimeError(f"{self.name}: call start() before read()")
        events: list[Event] = []
        append = events.append
        source = self.name
        for _, partition, offset, values, keys, headers, stamps in await consumer.fetch_chunks(
            max_events
        ):
            for off, value, key, head, stamp in zip(
                count(offset), values, keys, headers, stamps, strict=False
            ):
                append(
                    Event(
                        value,
                        key=key,
                        headers=head,
                        ingest_time=stamp,
                        position=Position(source, partition, off),
                    )
                )
        return events

    async def skip(self, record: Callable[[list[Skipped]], Awaitable[None]], keep: int = 0) -> int:
        """Move past every record not yet read but the newest ``keep`` (shared among the
        partitions owned), unread; return how many.

        ``record`` is awaited with the runs first; then each partition still owned is moved
        forward to the end of its run (never back). Nothing is committed here: the commit
        of a later record covers the run. The records stay in the topic for a replay,
        within its retention.
        """
        consumer = self._consumer
        if consumer is None:
            return 0
        topic, source = self.topic, self.name
        ends = self._broker.end_offsets(topic)
        owned = [p for t, p in consumer.assignment() if t == topic]
        kept = -(-keep // len(owned)) if owned and keep > 0 else 0
        runs = {
            p: (first, ends[p] - kept)
            for p in owned
            if ends[p] - kept > (first := consumer.position(topic, p))
        }
        if not runs:
            return 0
        await record(
            [Skipped(source, p, first, end - 1, end - first) for p, (first, end) in runs.items()]
        )
        for p, (_, end) in runs.items():
            consumer.seek_forward((topic, p), end)
        return sum(end - first for first, end in runs.values())

    async def lag(self) -> int | None:
        """Records of the topic the group has not committed yet."""
        return self._broker.lag(self.group, self.topic)

    async def ack(self, positions: Sequence[Position]) -> None:
        """Commit, per partition, the highest offset in ``positions`` plus one.

        A commit for a partition this member lost in a rebalance is refused by
        the broker and logged: the partition's new owner reads those events again.
        """
        consumer = self._consumer
        if consumer is None or not positions:
            return
        highest: dict[int, int] = {}
        for position in positions:
            offset = position.offset
            if not isinstance(offset, int):
                raise TypeError(f"{self.name}: cannot ack {position!r}, its offset is not an int")
            partition = position.partition
            if highest.get(partition, -1) < offset:
                highest[partition] = offset
        topic = self.topic
        refused = consumer.commit({(topic, p): o + 1 for p, o in highest.items()})
        if refused:
            logger.warning(
                "%s: commit refused for partitions %s, no longer owned by %r after a "
                "rebalance; their new owner will deliver those events again",
                self.name,
                sorted(p for _, p in refused),
                consumer.name,
            )

    async def aclose(self) -> None:
        """Leave the consumer group: unacknowledged events go to the remaining members."""
        if self._consumer is not None:
            self._consumer.close()

    def __repr__(self) -> str:
        return f"<BrokerSource {self.name} group={self.group!r}>"
