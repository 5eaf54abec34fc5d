"""Write results to a Kafka topic with an idempotent producer; ``flush`` waits for every ack.

Each result becomes one message: the value is the result (``bytes`` as they are,
anything else as JSON), the key is the event's key (so results of one key land
in one partition, in order), and the header ``rtinfer-source-id`` carries the
event's id, so that consumers of the output can de-duplicate what a redelivery
wrote twice.

With a ``transactional_id`` the sink is transactional, for exactly-once
Kafka → Kafka: results are produced inside a transaction, and the Kafka source
of the same pipeline (:meth:`rtinfer.sources.kafka.KafkaSource.commit_with`)
commits its offsets inside that transaction instead of on its own (see
``docs/kafka.md``, "Exactly once").

``confluent-kafka`` is imported when a sink is built, not when this module is,
so ``rtinfer`` imports without the ``kafka`` extra.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from ..connectors.kafka import client_config, require_kafka
from ..exceptions import ConfigError, RtinferError
from ..types import Event
from .ids import source_id

if TYPE_CHECKING:
    from confluent_kafka import KafkaError, Message, Producer, TopicPartition
    from confluent_kafka._types import HeadersType

__all__ = [
    "PRODUCER_DEFAULTS",
    "SOURCE_ID_HEADER",
    "KafkaDeliveryError",
    "KafkaSink",
    "KafkaTransactionError",
]

logger = logging.getLogger(__name__)

#: The header holding the id of the event a result came from.
SOURCE_ID_HEADER = "rtinfer-source-id"

#: librdkafka settings this sink uses unless ``config`` says otherwise.
PRODUCER_DEFAULTS: Mapping[str, Any] = {
    # The partition of a key as Java clients (and Kafka Streams) compute it.
    "partitioner": "murmur2_random",
    "client.id": "rtinfer",
}

# Settings that would break the at-least-once contract or per-key order.
_FIXED_PRODUCER = {"acks": "all", "enable.idempotence": True}
_OWNED_PRODUCER = {
    "bootstrap.servers": "bootstrap_servers",
    "error_cb": "the sink's error handling",
    "transactional.id": "transactional_id",
}

_encode = msgspec.json.Encoder().encode


class KafkaDeliveryError(RtinferError):
    """Results were not delivered to Kafka; ``errors`` holds librdkafka's reasons."""

    def __init__(self, message: str, errors: Sequence[KafkaError]) -> None:
        super().__init__(message)
        self.errors = list(errors)


class KafkaTransactionError(RtinferError):
    """A transaction could not be committed; it was aborted and its inputs are read again."""


class KafkaSink:
    """Produces each event's ``result`` to the Kafka ``topic`` at ``bootstrap_servers``.

    The producer is idempotent with ``acks=all`` (always: they cannot be changed
    in ``config``), so a message is acknowledged only once every in-sync replica
    has it, and librdkafka's retries neither duplicate nor reorder messages
    within a partition. ``config`` holds further librdkafka settings (security,
    ``linger.ms``, ``compression.type``, ...) over :data:`PRODUCER_DEFAULTS`.

    :meth:`write` hands each message to librdkafka (which batches and sends it in
    the background) and serves delivery reports (``poll(0)``); when librdkafka's
    queue is full it waits, off the event loop, for room. :meth:`flush` waits,
    off the event loop, until every message written so far has its delivery
    report, and raises :class:`KafkaDeliveryError` if any failed: the pipeline
    then acknowledges nothing. A failure is final for this sink: every later
    flush raises it again (the failed messages are gone from librdkafka's
    queue), so build a new sink, and the inputs are read again.

    ``transactional_id`` makes the sink transactional (exactly once, with a Kafka
    source that commits through it): :meth:`start` registers the id (fencing off an
    earlier producer with the same id, whose open transaction is aborted) and opens
    a transaction; :meth:`commit_transaction` adds the source's offsets to it,
    commits it and opens the next. The id must be unique among the producers
    running at one time and is best stable per worker (``fraud-${RTINFER_WORKER:-0}``).
    :meth:`aclose` aborts a transaction still open: its results are never seen by
    ``read_committed`` consumers, and their inputs, not committed either, are read again.
    """

    __slots__ = (
        "_config",
        "_failures",
        "_fatal",
        "_producer",
        "_stopping",
        "name",
        "timeout_s",
        "topic",
        "transactional_id",
    )

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        topic: str,
        *,
        config: Mapping[str, Any] | None = None,
        transactional_id: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        require_kafka("the Kafka sink")
        if not topic:
            raise ConfigError("the Kafka sink needs a topic name")
        settings = dict(config or {})
        if "acks" in settings:  # "all" has the alias -1, which the generic check would refuse
            acks = settings.pop("acks")
            if str(acks).lower() not in ("all", "-1"):
                raise ConfigError(
                    f"the Kafka sink: acks={acks!r} would weaken delivery; rtinfer needs "
                    "acks=all (leave it out of config)"
                )
        self._config = client_config(
            "the Kafka sink",
            bootstrap_servers,
            settings,
            defaults=PRODUCER_DEFAULTS,
            fixed=_FIXED_PRODUCER,
            owned=_OWNED_PRODUCER,
        )
        if transactional_id is not None:
            if not transactional_id.strip():
                raise ConfigError(
                    "the Kafka sink: transactional_id is empty; name it or leave it out"
                )
            self._config["transactional.id"] = transactional_id
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be above 0, got {timeout_s}")
        self.transactional_id = transactional_id
        self.timeout_s = timeout_s
        self.topic = topic
        self.name = f"kafka://{topic}"
        self._producer: Producer | None = None
        self._failures: list[KafkaError] = []  # appended by delivery callbacks, any thread
        self._fatal: KafkaError | None = None
        self._stopping = False

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():
            self._fatal = error
            logger.error("%s: fatal Kafka error: %s", self.name, error)
        else:
            logger.warning("%s: Kafka error (librdkafka retries): %s", self.name, error)

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._failures.append(error)

    async def start(self) -> None:
        """Create the producer (it connects in the background)."""
        if self._producer is not None:
            return
        from confluent_kafka import KafkaException, Producer

        config = dict(self._config)
        config["error_cb"] = self._on_error
        try:
            producer = Producer(config)
        except KafkaException as exc:
            raise ConfigError(f"the Kafka sink: invalid configuration: {exc}") from exc
        if self.transactional_id is not None:

            def open_transactions() -> None:
                producer.init_transactions(self.timeout_s)
                producer.begin_transaction()

            try:
                await asyncio.to_thread(open_transactions)
            except KafkaException as exc:
                raise KafkaTransactionError(
                    f"{self.name}: could not start transactions as {self.transactional_id!r}: "
                    f"{exc.args[0]}"
                ) from exc
        self._producer = producer
        self._stopping = False

    @property
    def transactional(self) -> bool:
        """Results go out in transactions that also commit the source's offsets."""
        return self.transactional_id is not None

    async def commit_transaction(
        self, offsets: Sequence[TopicPartition], group_metadata: Any
    ) -> None:
        """Commit the open transaction with the source's ``offsets``; open the next one.

        Called by the source's ``ack``, after :meth:`flush`: the results written since
        the last commit and the offsets of the inputs they came from become visible
        together, or (on failure: the transaction is aborted and
        :class:`KafkaTransactionError` raised) not at all.
        """
        from confluent_kafka import KafkaException

        producer = self._check()
        if self.transactional_id is None:
            raise RtinferError(f"{self.name} is not transactional; give it a transactional_id")
        timeout = self.timeout_s

        def commit() -> None:
            try:
                producer.send_offsets_to_transaction(list(offsets), group_metadata, timeout)
                producer.commit_transaction(timeout)
            except KafkaException as exc:
                error = exc.args[0]
                if not error.fatal():
                    try:
                        producer.abort_transaction(timeout)
                        producer.begin_transaction()
                    except KafkaException:
                        logger.exception("%s: aborting the transaction failed", self.name)
                raise KafkaTransactionError(
                    f"{self.name}: the transaction was aborted ({error}); its results are "
                    "discarded and their inputs read again"
                ) from exc
            producer.begin_transaction()

        await asyncio.to_thread(commit)

    def _check(self) -> Producer:
        from confluent_kafka import KafkaException

        producer = self._producer
        if producer is None:
            raise RuntimeError(f"{self.name}: call start() before write() or flush()")
        if self._fatal is not None:
            raise KafkaException(self._fatal)
        return producer

    async def write(self, events: Sequence[Event]) -> None:
        """Hand each event's result to the producer; nothing is waited for but queue room."""
        producer = self._check()
        produce, topic, on_delivery = producer.produce, self.topic, self._on_delivery
        for event in events:
            result = event.result
            value = result if type(result) is bytes else _encode(result)
            ident = source_id(event)
            headers: HeadersType | None = None
            if ident is not None:
                headers = [(SOURCE_ID_HEADER, ident.encode())]
            while True:
                try:
                    produce(topic, value, event.key, headers=headers, on_delivery=on_delivery)
                    break
                except BufferError:  # queue.buffering.max.* reached: wait for deliveries
                    await asyncio.to_thread(producer.poll, 0.05)
        producer.poll(0)

    def _wait_for_reports(self, producer: Producer) -> int:
        """Block until every message has its delivery report; return how many are left."""
        left = producer.flush(0.5)
        while left and not self._stopping:
            left = producer.flush(0.5)
        return left

    async def flush(self) -> None:
        """Return once every message written so far is acknowledged; raise if any failed."""
        producer = self._check()
        if len(producer):
            left = await asyncio.to_thread(self._wait_for_reports, producer)
            if left:
                raise RtinferError(f"{self.name}: closed with {left} messages undelivered")
        if self._failures:
            errors = self._failures
            first = errors[0]
            raise KafkaDeliveryError(
                f"{self.name}: {len(errors)} results were not delivered ({first}); "
                "their inputs are not acknowledged and will be read again",
                errors,
            )
        self._check()

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Wait up to ``timeout_s`` for messages still in flight, then drop the producer.

        A transactional sink aborts its open transaction instead: what it holds was
        never acknowledged (a drain commits everything before the sinks close).
        """
        producer, self._producer = self._producer, None
        self._stopping = True
        if producer is None:
            return
        if self.transactional_id is not None:
            from confluent_kafka import KafkaException

            try:
                await asyncio.to_thread(producer.abort_transaction, timeout_s)
            except KafkaException as exc:
                logger.warning("%s: aborting the open transaction failed: %s", self.name, exc)
            return
        left = await asyncio.to_thread(producer.flush, timeout_s)
        if left:
            logger.warning(
                "%s: closing with %d results undelivered after %.1f s; their inputs were not "
                "acknowledged and will be read again",
                self.name,
                left,
                timeout_s,
            )
            producer.purge()
            producer.poll(0)

    def __repr__(self) -> str:
        return f"<KafkaSink {self.name}>"
