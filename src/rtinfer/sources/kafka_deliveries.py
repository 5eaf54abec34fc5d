"""How often a Kafka partition was started at the same offset: the Kafka source's delivery count.

Kafka keeps no delivery count per message, only a committed offset per partition
and group. An event that kills its worker (a crash in native code, memory
exhausted, a hang that costs the worker its partitions) is never acknowledged, so
each next owner of its partition starts at the same committed offset and meets it
again, for ever. :class:`DeliveryLog` keeps, per group and partition, one
:class:`Start` record in a compacted topic (Kafka's own way to keep small state),
so that owners across processes and hosts can tell a partition that keeps being
started at one offset:

- a member writes a :class:`Start` when it hands out the first event of a partition
  it was assigned: the offset, and how many starts at that offset in a row ended
  without the offset being acknowledged;
- when it lets a partition go with everything acknowledged (a clean revocation,
  a close), it writes ``starts=0`` at the offset it committed;
- a start that follows an unclean one at the same offset hands that partition's
  events out **one at a time**, each committed and recorded before the next, for
  as many events as the pipeline can hold in flight: a crash then stops exactly
  at the event that caused it, and ``alone`` counts the crashes with that event
  alone in flight. Only such an event is ever dead-lettered.

The records are written synchronously (produce, then flush) and read back from
the topic before each decision, so a member that takes a partition over sees
what its previous owner wrote. Every call blocks: the source makes them on its
consumer thread.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from ..exceptions import RtinferError

if TYPE_CHECKING:
    from confluent_kafka import Consumer, Producer

__all__ = ["DeliveryLog", "Start"]

logger = logging.getLogger(__name__)

#: Client settings carried over from the source's config to the log's clients.
_SHARED_PREFIXES = ("security.", "sasl.", "ssl.", "client.", "socket.", "broker.")


class Start(msgspec.Struct, frozen=True):
    """A partition's record: the ``offset`` its latest owner started at (or committed, on a
    clean exit), how many ``starts`` in a row at that offset have not ended cleanly
    (including the one under way), whether that start is ``careful`` (events one at a
    time), and ``alone``: how many of the unclean ones had the event at ``offset``
    alone in flight."""

    offset: int
    starts: int
    careful: bool = False
    alone: int = 0

    def next(self, offset: int) -> Start:
        """The record of a new start at ``offset``, following this one."""
        if offset != self.offset or self.starts == 0:
            return Start(offset, 1)
        alone = self.alone + (1 if self.careful and self.starts > 0 else 0)
        return Start(offset, self.starts + 1, careful=True, alone=alone)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Start)


class DeliveryLog:
    """One group's :class:`Start` records in the compacted ``topic`` (created if missing).

    ``config``: the source's librdkafka settings; its security and socket settings are
    used by the log's own producer and reader.
    """

    __slots__ = ("_config", "_producer", "_read_to", "_reader", "_records", "group", "topic")

    def __init__(self, bootstrap_servers: str, group: str, topic: str, config: Mapping[str, Any]):
        self.group = group
        self.topic = topic
        shared = {k: v for k, v in config.items() if k.startswith(_SHARED_PREFIXES)}
        shared["bootstrap.servers"] = bootstrap_servers
        shared.setdefault("logger", config.get("logger"))
        self._config = shared
        self._producer: Producer | None = None
        self._reader: Consumer | None = None
        self._records: dict[bytes, Start] = {}
        self._read_to = 0  # the next offset of the topic to read

    def key(self, topic: str, partition: int) -> bytes:
        """A partition's record key: group, topic and partition."""
        return json.dumps([self.group, topic, partition]).encode()

    def open(self, timeout_s: float = 10.0) -> None:
        """Create the topic if it is missing, and the producer and reader."""
        from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
        from confluent_kafka.admin import AdminClient
        from confluent_kafka.cimpl import NewTopic

        config = {k: v for k, v in self._config.items() if v is not None}
        admin = AdminClient(config)
        futures = admin.create_topics(
            [NewTopic(self.topic, 1, replication_factor=-1, config={"cleanup.policy": "compact"})]
        )
        try:
            futures[self.topic].result(timeout_s)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise RtinferError(
                    f"the Kafka source cannot create its delivery-count topic {self.topic!r} "
                    f"(needed by max_deliveries): {exc}; create it (compacted, one partition) "
                    "or grant the source CreateTopics"
                ) from exc
        self._producer = Producer(
            {**config, "enable.idempotence": True, "acks": "all", "linger.ms": 0}
        )
        self._reader = Consumer(
            {
                **config,
                "group.id": f"{self.group}.rtinfer-deliveries",  # never joined nor committed
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
            }
        )

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.flush(5.0)

    def get(self, key: bytes, timeout_s: float = 10.0) -> Start | None:
        """The latest record of ``key``, after reading the topic up to its end."""
        self._catch_up(timeout_s)
        return self._records.get(key)

    def put(self, records: Mapping[bytes, Start], timeout_s: float = 10.0) -> None:
        """Write ``records`` and wait until the broker has them all."""
        producer = self._producer
        if producer is None or not records:
            return
        failed: list[str] = []

        def report(error: Any, message: Any) -> None:
            if error is not None:
                failed.append(str(error))

        # One record per request: a broker that reports a multi-record batch's high
        # watermark wrongly (tansu 0.6 does) would hide its later records from readers.
        for key, record in records.items():
            producer.produce(self.topic, _encoder.encode(record), key, on_delivery=report)
            left = producer.flush(timeout_s)
            if failed or left:
                raise RtinferError(
                    f"writing delivery counts to {self.topic!r} failed: "
                    + (failed[0] if failed else f"not delivered in {timeout_s:.0f} s")
                )
            self._records[key] = record

    def _catch_up(self, timeout_s: float) -> None:
        from confluent_kafka import TopicPartition

        reader = self._reader
        if reader is None:
            return
        partition = TopicPartition(self.topic, 0)
        low, high = reader.get_watermark_offsets(partition, timeout=timeout_s, cached=False)
        if self._read_to < low:
            self._read_to = low
        if self._read_to >= high:
            return
        reader.assign([TopicPartition(self.topic, 0, self._read_to)])
        try:
            while self._read_to < high:
                message = reader.poll(timeout_s)
                if message is None:
                    raise RtinferError(
                        f"reading delivery counts from {self.topic!r} timed out at offset "
                        f"{self._read_to} of {high}"
                    )
                if message.error() is not None:
                    logger.warning("reading %s: %s", self.topic, message.error())
                    continue
                offset = message.offset()
                assert offset is not None
                self._read_to = offset + 1
                key, value = message.key(), message.value()
                if key is None or not value:
                    continue
                try:
                    self._records[key] = _decoder.decode(value)
                except msgspec.DecodeError:
                    logger.warning("%s: unreadable record at offset %d skipped", self.topic, offset)
        finally:
            reader.unassign()
