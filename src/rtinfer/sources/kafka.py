"""Read Kafka topics as a pipeline source, as one member of a consumer group.

:class:`KafkaSource` gives at-least-once delivery with confluent-kafka (librdkafka):

- offsets are never committed automatically (``enable.auto.commit=false``,
  ``enable.auto.offset.store=false``): :meth:`~KafkaSource.ack`, which the
  pipeline calls only after every sink flushed, stores ``offset + 1`` of the
  highest acknowledged position of each partition, and an asynchronous commit
  follows;
- when partitions are revoked (a rebalance) the source waits, up to
  ``revoke_wait_s``, for the pipeline to acknowledge what it read from them,
  then commits **synchronously**; what is still unacknowledged then is read
  again by the partition's next owner (at least once). :meth:`~KafkaSource.aclose`
  commits synchronously too;
- every call into the consumer runs on one dedicated thread, never on the
  event loop, and a cancelled :meth:`~KafkaSource.read` keeps what its consume
  call brings for the next read;
- with ``max_deliveries``, an event that keeps killing its worker (or stalling it
  until it loses its partitions) is dead-lettered once it was in flight alone that
  many times without being acknowledged: each partition's starts are counted in a
  compacted topic (:mod:`.kafka_deliveries`), and after an unclean start the
  partition's next events are handed out one at a time until the culprit shows.

Per-key order follows partitions: one partition is read by one member of the
group at a time, in offset order. ``confluent-kafka`` is imported when a source
is built, not when this module is, so ``rtinfer`` imports without the ``kafka``
extra (:mod:`rtinfer.connectors.kafka` holds what the source and the sink share).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ..connectors.kafka import client_config, require_kafka
from ..exceptions import ConfigError, RtinferError
from ..types import DEAD_REASON_HEADER, Event, Position, Skipped
from .kafka_deliveries import DeliveryLog, Start

if TYPE_CHECKING:
    from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
    from confluent_kafka._types import HeadersType

    from ..sinks.kafka import KafkaSink

__all__ = ["CONSUMER_DEFAULTS", "KafkaSource"]

logger = logging.getLogger(__name__)

#: librdkafka settings this source uses unless ``config`` says otherwise.
CONSUMER_DEFAULTS: Mapping[str, Any] = {
    # A new group (no committed offset) starts at the beginning: nothing is skipped.
    "auto.offset.reset": "earliest",
    # Prefetch at most 8 MiB: what librdkafka holds while the pipeline is not reading.
    "queued.max.messages.kbytes": 8192,
    "client.id": "rtinfer",
}

# Settings that would break the at-least-once contract, with the value it needs.
_FIXED_CONSUMER = {"enable.auto.commit": False, "enable.auto.offset.store": False}
# Settings the source owns (given as arguments, or callbacks it relies on).
_OWNED_CONSUMER = {
    "bootstrap.servers": "bootstrap_servers",
    "group.id": "group",
    "error_cb": "the source's error handling",
    "on_commit": "the source's commit handling",
}

_Key = tuple[str, int]  # (position source "kafka://<topic>", partition)


class KafkaSource:
    """Events from the Kafka ``topics`` at ``bootstrap_servers``, read as a member of ``group``.

    Each message becomes an :class:`~rtinfer.types.Event`: ``value`` is the
    message value (``b""`` for a tombstone), ``key`` its key, ``headers`` its
    headers (a dict of bytes; the last value of a repeated header wins; a header
    named :data:`DEAD_REASON_HEADER` is dropped, since only a source may set it),
    ``ingest_time`` the message timestamp in seconds (the time of reading when
    the message has none), and ``position``
    ``Position("kafka://<topic>", partition, offset)``.

    ``config`` holds further librdkafka settings (security, timeouts, tuning);
    they override :data:`CONSUMER_DEFAULTS`. ``enable.auto.commit`` and
    ``enable.auto.offset.store`` are always ``false``, ``group.id`` and
    ``bootstrap.servers`` come from the arguments. ``topics`` may name a regex
    subscription (``"^payments-.*"``).

    - :meth:`start` creates the consumer and subscribes; the group is joined
      during the first :meth:`read`.
    - :meth:`read` waits (``consume`` on the consumer thread, ``poll_timeout_s``
      at a time) until at least one message has arrived and returns up to
      ``max_events`` events. A read cancelled while its consume call runs leaves
      that call running; the next read returns what it brought. Partition-EOF
      notices are skipped, other non-fatal errors are logged, a fatal error is
      raised.
    - :meth:`ack` records the highest acknowledged offset of each partition and
      has the consumer thread store ``offset + 1`` and commit asynchronously. It
      does not wait for the commit (a commit lost in a crash means a redelivery,
      never a loss).
    - On revocation, the source waits up to ``revoke_wait_s`` for the pipeline
      to acknowledge what it read from the revoked partitions, commits
      synchronously, and drops the events of those partitions that it had
      fetched but not yet handed out; events still unacknowledged are read
      again by the new owner. Lost partitions (this member was thrown out of
      the group) cannot be committed; their unacknowledged events are read again.
    - :meth:`aclose` commits synchronously what was acknowledged, then leaves
      the group.

    ``max_deliveries`` (``None``: no limit): Kafka keeps no delivery count per
    message, so the source counts, per partition, the starts at one committed offset
    that ended without it being acknowledged, in the compacted topic
    ``deliveries_topic`` (created if missing). A start that follows an unclean one at
    the same offset is *careful*: that partition's next ``careful_events`` events (set
    it to what the pipeline holds in flight at most) are handed out one at a time, each
    committed and recorded before the next. An event that was alone in flight in
    ``max_deliveries`` unclean starts is handed out with :data:`DEAD_REASON_HEADER`
    and the pipeline dead-letters it. See ``docs/kafka.md``.

    Exactly once: :meth:`commit_with` a transactional :class:`~rtinfer.sinks.kafka.KafkaSink`
    and :meth:`ack` commits the offsets inside the sink's transaction, with the results
    written since the last ack, instead of committing them itself. A partition revoked
    while its events are still in an open transaction fails the source (the transaction
    is aborted when the pipeline closes; a restart reads them again).
    """

    __slots__ = (
        "_acked",
        "_assigned",
        "_broken",
        "_careful",
        "_closed",
        "_commit_queued",
        "_cond",
        "_config",
        "_consumer",
        "_doomed",
        "_executor",
        "_fatal",
        "_first_read",
        "_handed",
        "_log",
        "_polling",
        "_ready",
        "_settled",
        "_sought",
        "_sources",
        "_starts",
        "_stored",
        "_transactions",
        "_unblocked",
        "_unsettled",
        "careful_events",
        "group",
        "max_deliveries",
        "name",
        "poll_timeout_s",
        "revoke_wait_s",
        "topics",
    )

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        topics: str | Sequence[str],
        *,
        group: str = "rtinfer",
        config: Mapping[str, Any] | None = None,
        max_deliveries: int | None = None,
        deliveries_topic: str = "rtinfer-deliveries",
        careful_events: int = 1024,
        revoke_wait_s: float = 5.0,
        poll_timeout_s: float = 0.1,
    ) -> None:
        require_kafka("the Kafka source")
        if max_deliveries is not None and max_deliveries < 1:
            raise ConfigError(f"max_deliveries must be at least 1 (or unset), got {max_deliveries}")
        if careful_events < 1:
            raise ConfigError(f"careful_events must be at least 1, got {careful_events}")
        if max_deliveries is not None and not deliveries_topic:
            raise ConfigError("max_deliveries needs a deliveries_topic to count in")
        topic_list = [topics] if isinstance(topics, str) else list(topics)
        if not topic_list or not all(topic_list):
            raise ConfigError(f"the Kafka source needs at least one topic name, got {topics!r}")
        if not group:
            raise ConfigError("the Kafka source needs a consumer group name (group)")
        if revoke_wait_s < 0:
            raise ValueError(f"revoke_wait_s must be at least 0, got {revoke_wait_s}")
        if poll_timeout_s <= 0:
            raise ValueError(f"poll_timeout_s must be above 0, got {poll_timeout_s}")
        self.topics = topic_list
        self.group = group
        self.revoke_wait_s = revoke_wait_s
        self.poll_timeout_s = poll_timeout_s
        self.name = "kafka://" + ",".join(topic_list)
        self._config = client_config(
            "the Kafka source",
            bootstrap_servers,
            config,
            defaults=CONSUMER_DEFAULTS,
            fixed=_FIXED_CONSUMER,
            owned=_OWNED_CONSUMER,
        )
        self._config["group.id"] = group
        self.max_deliveries = max_deliveries
        self.careful_events = careful_events
        self._log = (
            DeliveryLog(self._config["bootstrap.servers"], group, deliveries_topic, self._config)
            if max_deliveries is not None
            else None
        )
        self._consumer: Consumer | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._polling: asyncio.Future[None] | None = None
        self._closed = False
        self._fatal: KafkaError | None = None
        self._commit_queued = False
        self._sources: dict[str, str] = {}  # topic -> "kafka://<topic>"
        # Shared between the event loop and the consumer thread, under _cond's lock;
        # neither side holds it while calling into librdkafka.
        self._cond = threading.Condition()
        self._ready: list[Event] = []  # fetched, not yet handed to the pipeline
        self._assigned: set[_Key] = set()
        # Per assigned partition, for the current assignment only:
        self._first_read: dict[_Key, int] = {}  # offset of the first event read
        self._handed: dict[_Key, int] = {}  # highest offset handed to the pipeline
        self._acked: dict[_Key, int] = {}  # highest offset acknowledged
        self._stored: dict[_Key, int] = {}  # highest offset + 1 stored for commit
        # where skip() last sought: the consumer's position is unknown until it fetches
        self._sought: dict[_Key, int] = {}
        self._transactions: KafkaSink | None = None  # commits offsets in its transactions
        self._broken: str | None = None  # why exactly-once cannot go on (see _on_revoke)
        # With max_deliveries, per partition of the current assignment:
        self._starts: dict[_Key, tuple[bytes, Start]] = {}  # the record of this start
        self._careful: dict[_Key, int] = {}  # events below this offset go out one at a time
        self._doomed: dict[_Key, tuple[int, str]] = {}  # the offset to dead-letter, and why
        self._unsettled: set[_Key] = set()  # a careful event is out: the next one waits
        self._settled: dict[_Key, int] = {}  # highest careful offset committed and recorded
        self._unblocked = asyncio.Event()  # set when a careful event settles

    def commit_with(self, sink: KafkaSink) -> None:
        """Commit offsets inside ``sink``'s transactions (exactly once); call before start."""
        if not sink.transactional:
            raise ConfigError(
                f"{self.name}: {sink.name} is not transactional; give it a transactional_id "
                "to commit offsets through it"
            )
        if self._log is not None:
            raise ConfigError(
                f"{self.name}: max_deliveries is not supported with exactly-once (a "
                "transactional sink) yet; leave it unset there"
            )
        self._transactions = sink

    # -- the consumer thread ---------------------------------------------------------

    def _open(self) -> None:
        from confluent_kafka import Consumer, KafkaException

        config = dict(self._config)
        config["error_cb"] = self._on_error
        config["on_commit"] = self._on_commit
        try:
            consumer = Consumer(config)
        except KafkaException as exc:
            raise ConfigError(f"the Kafka source: invalid configuration: {exc}") from exc
        try:
            consumer.subscribe(
                self.topics,
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            if self._log is not None:
                self._log.open()
        except BaseException:
            consumer.close()
            if self._log is not None:
                self._log.close()
            raise
        self._consumer = consumer

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():
            self._fatal = error
            logger.error("%s: fatal Kafka error: %s", self.name, error)
        else:
            logger.warning("%s: Kafka error (librdkafka retries): %s", self.name, error)

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        from confluent_kafka import KafkaError

        if error is not None and error.code() != KafkaError._NO_OFFSET:
            logger.warning(
                "%s: committing offsets failed (%s); the next commit covers them, and a crash "
                "before it means redelivery",
                self.name,
                error,
            )

    def _key(self, topic: str, partition: int) -> _Key:
        source = self._sources.get(topic)
        if source is None:
            source = self._sources[topic] = f"kafka://{topic}"
        return (source, partition)

    def _topic_partition(self, key: _Key, offset: int) -> TopicPartition:
        from confluent_kafka import TopicPartition

        return TopicPartition(key[0].removeprefix("kafka://"), key[1], offset)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [self._key(tp.topic, tp.partition) for tp in partitions]
        with self._cond:
            for key in keys:
                self._assigned.add(key)
                self._clear(key)
        logger.info("%s: assigned %s", self.name, _describe(keys))

    def _forget(self, keys: set[_Key]) -> int:
        """Drop the partitions ``keys`` (under the lock); return how many fetched events went."""
        before = len(self._ready)
        self._ready = [
            e for e in self._ready if e.position is None or _position_key(e.position) not in keys
        ]
        self._assigned -= keys
        for key in keys:
            self._clear(key)
        return before - len(self._ready)

    def _clear(self, key: _Key) -> None:
        """Forget what this assignment knew of the partition ``key`` (under the lock)."""
        for state in (
            self._first_read,
            self._handed,
            self._acked,
            self._stored,
            self._starts,
            self._careful,
            self._doomed,
            self._settled,
            self._sought,
        ):
            state.pop(key, None)
        self._unsettled.discard(key)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = {self._key(tp.topic, tp.partition) for tp in partitions}
        waited = False
        with self._cond:
            if not self._closed and self.revoke_wait_s > 0 and not self._drained(keys):
                logger.info(
                    "%s: partitions %s revoked; waiting up to %.1f s for the pipeline to "
                    "acknowledge what it read from them",
                    self.name,
                    _describe(keys),
                    self.revoke_wait_s,
                )
                waited = True
                self._cond.wait_for(lambda: self._closed or self._drained(keys), self.revoke_wait_s)
            drained = self._drained(keys)
            offsets = [
                self._topic_partition(k, self._acked[k] + 1) for k in keys if k in self._acked
            ]
            clean = self._clean_exits(keys)
            dropped = self._forget(keys)
            if self._transactions is not None:
                offsets = []  # acknowledged = committed, inside the sink's transactions
                if not drained and not self._closed:
                    # Their results may be in the open transaction; committing it now
                    # would duplicate what the new owner writes. Only an abort is safe.
                    self._broken = (
                        f"partitions {_describe(keys)} were revoked with events in an open "
                        f"transaction after waiting {self.revoke_wait_s:.1f} s; the transaction "
                        "is aborted and they are read again (raise revoke_wait_s above the "
                        "pipeline's longest batch)"
                    )
                    self._cond.notify_all()
        if offsets:
            self._commit_now(consumer, offsets, "on revocation")
        self._record_exits(clean)
        if not drained and not self._closed:
            logger.warning(
                "%s: partitions %s revoked with events read and not yet acknowledged%s; their "
                "new owner reads them again",
                self.name,
                _describe(keys),
                f" after waiting {self.revoke_wait_s:.1f} s" if waited else "",
            )
        logger.info(
            "%s: revoked %s (%d fetched events dropped, their next owner reads them)",
            self.name,
            _describe(keys),
            dropped,
        )

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = {self._key(tp.topic, tp.partition) for tp in partitions}
        with self._cond:
            self._forget(keys)
        logger.warning(
            "%s: partitions %s lost (this member left the group: session timeout or "
            "max.poll.interval.ms exceeded); what was not committed is read again by their "
            "next owner",
            self.name,
            _describe(keys),
        )

    def _drained(self, keys: Iterable[_Key]) -> bool:
        return all(self._acked.get(k, -1) >= self._handed[k] for k in keys if k in self._handed)

    # -- delivery counts (max_deliveries) --------------------------------------------

    def _clean_exits(self, keys: Iterable[_Key]) -> dict[bytes, Start]:
        """The records of the started partitions among ``keys`` left with everything
        acknowledged: ``starts=0`` at the offset committed (under the lock)."""
        records = {}
        for key in keys:
            started = self._starts.pop(key, None)
            if started is None or self._acked.get(key, -1) < self._handed.get(key, -1):
                continue
            acked = self._acked.get(key)
            offset = started[1].offset if acked is None else acked + 1
            records[started[0]] = Start(offset, 0)
        return records

    def _record_exits(self, records: dict[bytes, Start]) -> None:
        if self._log is None or not records:
            return
        try:
            self._log.put(records)
        except RtinferError as exc:  # the next owner counts one start too many: logged
            logger.warning("%s: %s", self.name, exc)

    def _begin(self, key: _Key, topic: str, partition: int, offset: int) -> None:
        """Record the start of the partition ``key`` at ``offset``, its first event this
        assignment, and decide whether it is careful and what to dead-letter (consumer
        thread; called before any of its events is handed out)."""
        log = self._log
        assert log is not None
        assert self.max_deliveries is not None
        name = log.key(topic, partition)
        previous = log.get(name)
        record = previous.next(offset) if previous is not None else Start(offset, 1)
        log.put({name: record})
        where = f"{topic}[{partition}] at offset {offset}"
        with self._cond:
            if key not in self._assigned:
                return
            self._starts[key] = (name, record)
            if not record.careful:
                return
            self._careful[key] = offset + self.careful_events
            if record.alone >= self.max_deliveries:
                self._doomed[key] = (
                    offset,
                    f"in flight alone in {record.alone} starts of its partition that ended "
                    f"without it being acknowledged (max_deliveries is {self.max_deliveries}): "
                    "it crashes or stalls the worker",
                )
        if record.alone >= self.max_deliveries:
            logger.error(
                "%s: %s was in flight alone in %d starts that ended without it being "
                "acknowledged; it goes to the dead letters",
                self.name,
                where,
                record.alone,
            )
        else:
            logger.warning(
                "%s: %s starts again without progress (%d starts); its next %d events go out "
                "one at a time, to find the one that stops the worker",
                self.name,
                where,
                record.starts,
                self.careful_events,
            )

    def _settle(self, keys: list[_Key]) -> None:
        """Commit and record the acknowledged careful events of ``keys`` (consumer thread)."""
        consumer, log = self._consumer, self._log
        if consumer is None or log is None:
            return
        with self._cond:
            keys = [k for k in keys if k in self._starts and k in self._acked]
            offsets = [self._topic_partition(k, self._acked[k] + 1) for k in keys]
            records = {}
            for key in keys:
                offset = self._acked[key] + 1
                self._stored[key] = max(self._stored.get(key, -1), offset)
                careful = offset < self._careful.get(key, offset)
                records[self._starts[key][0]] = Start(offset, 1, careful=careful)
        if offsets:
            self._commit_now(consumer, offsets, "of a careful event")  # a failure: logged
            log.put(records)
        with self._cond:
            for key in keys:
                if key in self._acked:
                    self._settled[key] = self._acked[key]
                    self._unsettled.discard(key)

    def _commit_now(self, consumer: Consumer, offsets: list[TopicPartition], when: str) -> None:
        from confluent_kafka import KafkaException

        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            logger.warning(
                "%s: committing offsets %s failed (%s); what they cover is read again",
                self.name,
                when,
                exc,
            )

    def _pending_offsets(self) -> list[TopicPartition]:
        """``offset + 1`` of each assigned partition acknowledged beyond what was stored."""
        with self._cond:
            self._commit_queued = False
            offsets = []
            for key, acked in self._acked.items():
                if acked + 1 > self._stored.get(key, -1):
                    self._stored[key] = acked + 1
                    offsets.append(self._topic_partition(key, acked + 1))
            return offsets

    def _store_and_commit(self) -> None:
        """Store what was acknowledged and commit it asynchronously (consumer thread)."""
        from confluent_kafka import KafkaException

        consumer = self._consumer
        if consumer is None or self._transactions is not None:
            return
        offsets = self._pending_offsets()
        if not offsets:
            return
        try:
            consumer.store_offsets(offsets=offsets)
            consumer.commit(asynchronous=True)
        except KafkaException as exc:  # revoked meanwhile: the revocation committed them
            logger.debug("%s: storing offsets failed: %s", self.name, exc)
        except Exception:  # never let a background commit vanish silently
            logger.exception("%s: storing offsets failed", self.name)

    def _poll(self, max_events: int) -> None:
        """Consume until at least one message arrives or the wait ends (consumer thread)."""
        from confluent_kafka import KafkaException

        consumer = self._consumer
        if consumer is None:
            return
        self._store_and_commit()
        messages = consumer.consume(1, self.poll_timeout_s)
        if messages and max_events > 1:
            messages += consumer.consume(max_events - 1, 0)  # what is already fetched
        if self._fatal is not None:
            raise KafkaException(self._fatal)
        if messages:
            self._take(messages)

    def _take(self, messages: list[Message]) -> None:
        from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaError, KafkaException

        events: list[Event] = []
        now = time.time()
        with self._cond:
            assigned = set(self._assigned)  # after the rebalance callbacks this call served
        for msg in messages:
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                if error.fatal():
                    raise KafkaException(error)
                logger.warning("%s: %s", self.name, error)
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            assert topic is not None
            assert partition is not None
            assert offset is not None
            key = self._key(topic, partition)
            if key not in assigned:  # revoked while this consume call ran
                continue
            raw = msg.headers()
            headers = _headers(raw) if raw else None
            if self._log is not None:
                if key not in self._starts:
                    self._begin(key, topic, partition, offset)
                doomed = self._doomed.get(key)
                if doomed is not None and doomed[0] == offset:
                    headers = {**(headers or {}), DEAD_REASON_HEADER: doomed[1].encode()}
            kind, stamp = msg.timestamp()
            events.append(
                Event(
                    msg.value() or b"",
                    key=msg.key(),
                    headers=headers or None,
                    ingest_time=now if kind == TIMESTAMP_NOT_AVAILABLE else stamp / 1000,
                    position=Position(key[0], partition, offset),
                )
            )
        if events:
            with self._cond:
                self._ready.extend(events)

    def _close_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        try:
            with self._cond:
                offsets = [self._topic_partition(k, a + 1) for k, a in self._acked.items()]
                if self._transactions is not None:
                    offsets = []  # committed already, in the sink's transactions
                unacked = sum(1 for k, h in self._handed.items() if h > self._acked.get(k, -1))
                clean = self._clean_exits(list(self._starts))
            if offsets:
                self._commit_now(consumer, offsets, "on close")
            self._record_exits(clean)
            if unacked:
                logger.info(
                    "%s: closing with events of %d partitions read and not acknowledged; "
                    "they are read again",
                    self.name,
                    unacked,
                )
        finally:
            consumer.close()  # leaves the group; revocation runs (without waiting)
            if self._log is not None:
                self._log.close()

    # -- the event loop --------------------------------------------------------------

    async def start(self) -> None:
        """Create the consumer and subscribe (again after a close); the group is joined on read."""
        if self._consumer is not None:
            return
        self._closed = False
        self._fatal = None
        with self._cond:
            self._ready = []
            self._assigned.clear()
        executor = ThreadPoolExecutor(1, thread_name_prefix="rtinfer-kafka")
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._open)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self._executor = executor

    async def read(self, max_events: int) -> list[Event]:
        """Wait for messages and return up to ``max_events`` events; ``[]`` only once closed."""
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {max_events}")
        while True:
            if self._closed:  # what was fetched and not handed out is read again later
                return []
            held = False
            with self._cond:
                if self._ready:
                    self._unblocked.clear()
                    events = self._hand_out(max_events)
                    if events:
                        return events
                    held = True  # only careful partitions' events, waiting for an ack
            if held:
                await self._unblocked.wait()
                continue
            executor = self._executor
            if executor is None:
                raise RuntimeError(f"{self.name}: call start() before read()")
            polling = self._polling
            if polling is None:
                polling = asyncio.wrap_future(executor.submit(self._poll, max_events))
                self._polling = polling
            try:
                # Shielded: a cancelled read leaves the consume call running; what it
                # brings waits in the buffer for the next read.
                await asyncio.shield(polling)
            finally:
                if polling.done() and self._polling is polling:
                    self._polling = None

    def _hand_out(self, max_events: int) -> list[Event]:
        """Take up to ``max_events`` fetched events (under the lock) and note them as in flight."""
        if self._careful:
            events = self._hand_out_carefully(max_events)
        else:
            events = self._ready[:max_events]
            del self._ready[:max_events]
        for event in events:
            assert event.position is not None
            key = _position_key(event.position)
            offset = event.position.offset
            assert isinstance(offset, int)
            self._handed[key] = offset
            self._first_read.setdefault(key, offset)
        return events

    def _hand_out_carefully(self, max_events: int) -> list[Event]:
        """:meth:`_hand_out`'s choice while some partitions are careful: one event of each
        such partition, once its previous one has settled; the others as usual."""
        taken: list[Event] = []
        kept: list[Event] = []
        held: set[_Key] = set()
        careful, handed, settled = self._careful, self._handed, self._settled
        for event in self._ready:
            if len(taken) >= max_events:
                kept.append(event)
                continue
            assert event.position is not None
            key = _position_key(event.position)
            until = careful.get(key)
            if until is not None:
                if key in held or (key in handed and settled.get(key, -1) < handed[key]):
                    held.add(key)
                    kept.append(event)
                    continue
                offset = event.position.offset
                assert isinstance(offset, int)
                if offset >= until:
                    del careful[key]  # past the window: as usual from here
                else:
                    held.add(key)
                    self._unsettled.add(key)
            taken.append(event)
        self._ready = kept
        return taken

    async def skip(self, record: Callable[[list[Skipped]], Awaitable[None]], keep: int = 0) -> int:
        """Move past every message of the assigned partitions not yet handed out but the
        newest ``keep`` (shared among the partitions), unread; return how many.

        On the consumer's thread: each partition's run, from the first message not handed
        out (fetched and waiting here, or the consumer's position) to the high watermark
        less those kept, is found; ``record`` is awaited with the runs; then what waits here
        of them is dropped and the consumer seeks past each. Nothing is committed here: the
        commit of a later message covers the run, and a member that dies first leaves it to
        be read again. The messages stay in the topic within its retention. Not with
        ``max_deliveries`` (its counts follow every offset): then nothing is skipped.
        """
        executor = self._executor
        if executor is None or self._consumer is None or self._closed or self._log is not None:
            return 0
        runs = await asyncio.wrap_future(executor.submit(self._find_skip, keep))
        if not runs:
            return 0
        await record(
            [Skipped(k[0], k[1], first, end - 1, end - first) for k, (first, end) in runs.items()]
        )
        await asyncio.wrap_future(executor.submit(self._seek_past, runs))
        return sum(end - first for first, end in runs.values())

    def _find_skip(self, keep: int) -> dict[_Key, tuple[int, int]]:
        """:meth:`skip`'s runs ``[first, end)`` per partition (consumer thread)."""
        consumer = self._consumer
        if consumer is None:
            return {}
        with self._cond:
            keys = sorted(self._assigned)
            sought = dict(self._sought)
            waiting: dict[_Key, int] = {}
            for event in self._ready:  # in offset order per partition
                assert event.position is not None
                offset = event.position.offset
                assert isinstance(offset, int)
                waiting.setdefault(_position_key(event.position), offset)
        if not keys:
            return {}
        kept = -(-keep // len(keys)) if keep > 0 else 0
        partitions = [self._topic_partition(key, 0) for key in keys]
        runs: dict[_Key, tuple[int, int]] = {}
        for key, tp in zip(keys, consumer.position(partitions), strict=True):
            first = waiting.get(key, tp.offset)
            if first < 0:
                # Nothing handed out since the last skip sought past a run (librdkafka's
                # position is unknown until then): the run starts where it sought. Without
                # this a partition was skipped only every other time under a lasting
                # overload, and its backlog aged past the deadline meanwhile (measured on
                # tansu at five times capacity: 71-74% in time, against 22-35%).
                first = sought.get(key, -1)
                if first < 0:  # nothing consumed yet: where it starts is not known here
                    continue
                # ... and it skips only to what a fetch reported, never asking the broker.
                _, high = consumer.get_watermark_offsets(tp, cached=True)
            else:
                # The high watermark the last fetch reported (what a seek may skip is what
                # was fetched; tansu's ListOffsets answers wrongly here), else asked of the
                # broker.
                _, high = consumer.get_watermark_offsets(tp, cached=True)
                if high < 0:
                    _, high = consumer.get_watermark_offsets(tp, timeout=5.0, cached=False)
            if high - kept > first:
                runs[key] = (first, high - kept)
        return runs

    def _seek_past(self, runs: dict[_Key, tuple[int, int]]) -> None:
        """Drop what waits here of ``runs`` and seek past them (consumer thread)."""
        consumer = self._consumer
        if consumer is None:
            return
        with self._cond:
            kept = []
            for event in self._ready:
                assert event.position is not None
                run = runs.get(_position_key(event.position))
                offset = event.position.offset
                assert isinstance(offset, int)
                if run is None or offset >= run[1]:
                    kept.append(event)
            self._ready = kept
            assigned = set(self._assigned)
            for key, (_, end) in runs.items():
                if key in assigned:
                    self._sought[key] = end
        for key, (_, end) in runs.items():
            if key in assigned:
                consumer.seek(self._topic_partition(key, end))

    async def ack(self, positions: Sequence[Position]) -> None:
        """Record the highest acknowledged offset per partition; commit it in the background.

        Positions of partitions no longer assigned to this member are ignored (the
        new owner reads them again), and so are positions read before the current
        assignment of their partition began.
        """
        if self._broken is not None:
            raise RtinferError(f"{self.name}: {self._broken}")
        if not positions or self._executor is None:
            return
        highest: dict[_Key, int] = {}
        for position in positions:
            offset = position.offset
            if not isinstance(offset, int):
                raise TypeError(f"{self.name}: cannot ack {position!r}, its offset is not an int")
            key = _position_key(position)
            if offset > highest.get(key, -1):
                highest[key] = offset
        if self._transactions is not None:
            await self._ack_in_transaction(highest)
            return
        with self._cond:
            changed = False
            for key, offset in highest.items():
                first = self._first_read.get(key)
                if key not in self._assigned or first is None or offset < first:
                    continue
                if offset > self._acked.get(key, -1):
                    self._acked[key] = offset
                    changed = True
            if not changed:
                return
            self._cond.notify_all()  # a revocation may be waiting for these
            settle = [k for k in highest if k in self._unsettled]
            queue = not self._commit_queued and not settle
            self._commit_queued = self._commit_queued or queue
        if settle:  # a careful event: committed and recorded before the next goes out
            await asyncio.wrap_future(self._executor.submit(self._settle, settle))
            self._unblocked.set()
        elif queue:
            self._executor.submit(self._store_and_commit)

    async def _ack_in_transaction(self, highest: dict[_Key, int]) -> None:
        """Commit ``offset + 1`` of each partition in the sink's transaction, then record it."""
        assert self._transactions is not None
        consumer = self._consumer
        if consumer is None:
            return
        with self._cond:
            wanted = {
                key: offset
                for key, offset in highest.items()
                if key in self._assigned
                and (first := self._first_read.get(key)) is not None
                and offset >= first
                and offset > self._acked.get(key, -1)
            }
        if not wanted:
            return
        offsets = [self._topic_partition(key, offset + 1) for key, offset in wanted.items()]
        await self._transactions.commit_transaction(offsets, consumer.consumer_group_metadata())
        with self._cond:
            for key, offset in wanted.items():
                if key in self._assigned and offset > self._acked.get(key, -1):
                    self._acked[key] = offset
                    self._stored[key] = offset + 1
            self._cond.notify_all()  # a revocation may be waiting for these

    async def lag(self) -> int | None:
        """Messages of this member's partitions not yet committed by the group.

        Each member reports its own partitions; summed over the group's workers (in
        Prometheus) it is the group's lag. Asked on the consumer's thread, between polls.
        """
        executor = self._executor
        if executor is None or self._closed:
            return None
        return await asyncio.wrap_future(executor.submit(self._lag))

    def _lag(self) -> int | None:
        consumer = self._consumer
        if consumer is None:
            return None
        partitions = consumer.assignment()
        if not partitions:
            return 0
        total = 0
        for tp in consumer.committed(partitions, timeout=2.0):
            # The high watermark the last fetch reported (no broker round trip; tansu's
            # ListOffsets answers wrongly here), else asked of the broker.
            low, high = consumer.get_watermark_offsets(tp, cached=True)
            if high < 0:
                low, high = consumer.get_watermark_offsets(tp, timeout=2.0, cached=False)
            total += max(0, high - (tp.offset if tp.offset >= 0 else low))
        return total

    @property
    def assignment(self) -> list[tuple[str, int]]:
        """The ``(topic, partition)`` pairs assigned to this member now, sorted."""
        with self._cond:
            keys = sorted(self._assigned)
        return [(source.removeprefix("kafka://"), partition) for source, partition in keys]

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called."""
        return self._closed

    async def aclose(self) -> None:
        """Commit what was acknowledged (synchronously), leave the group, stop the thread.

        Events read and not acknowledged are not committed: they are read again.
        """
        self._closed = True
        self._unblocked.set()  # a read waiting for a careful event's ack returns
        with self._cond:
            self._cond.notify_all()  # a revocation waiting for acks stops waiting
        polling, self._polling = self._polling, None
        if polling is not None:
            await asyncio.gather(polling, return_exceptions=True)
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_consumer)
        finally:
            executor.shutdown(wait=False)
            with self._cond:
                self._ready = []
                self._assigned.clear()

    def __repr__(self) -> str:
        return f"<KafkaSource {self.name} group={self.group!r}>"


def _position_key(position: Position) -> _Key:
    return (position.source, position.partition)


def _headers(raw: HeadersType) -> dict[str, bytes] | None:
    """A message's headers as a dict of bytes (a repeated name: the last value wins).

    A header named :data:`DEAD_REASON_HEADER` is dropped: only a source says an
    event is undeliverable.
    """
    pairs = raw.items() if isinstance(raw, dict) else raw
    headers = {
        name: value if isinstance(value, bytes) else (value or "").encode() for name, value in pairs
    }
    headers.pop(DEAD_REASON_HEADER, None)
    return headers or None


def _describe(keys: Iterable[_Key]) -> str:
    parts = sorted(f"{s.removeprefix('kafka://')}[{p}]" for s, p in keys)
    return ", ".join(parts) if parts else "nothing"
