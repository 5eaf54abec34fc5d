"""The Kafka source and sink, against a real Kafka-compatible broker (tansu, see kafka_broker).

Every test uses topics and groups of its own. Without a broker (or without
confluent-kafka) the tests that need one are skipped locally and fail in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

import kafka_broker
from conftest import (
    SAFETY,
    RangeRecorder,
    Reading,
    RecordingSink,
    payload,
    python_model,
    shedding_pipeline,
    wait_until,
)
from kafka_broker import FAST_CONSUMER, create_topics, delete_topics
from rtinfer.batching import MicroBatcher
from rtinfer.exceptions import ConfigError
from rtinfer.pipeline import Pipeline
from rtinfer.stages import Decode, Outputs, Predict, Vectorize
from rtinfer.types import DEAD_REASON_HEADER, Event, Position, Sink, Skipped, Source

if TYPE_CHECKING:
    from confluent_kafka import Message

    from rtinfer.sources.kafka import KafkaSource

#: The session's broker (bootstrap servers), started by kafka_broker.
kafka = kafka_broker.kafka

Topics = Callable[..., str]


@pytest.fixture
def topic(kafka: str) -> Iterator[Topics]:
    """``topic(label, partitions=1)``: a new topic for this test, deleted after it."""
    prefix = f"rtinfer-test-{uuid.uuid4().hex[:10]}"
    made: list[str] = []

    def make(label: str = "in", partitions: int = 1) -> str:
        name = f"{prefix}-{label}"
        create_topics(kafka, [name], partitions)
        made.append(name)
        return name

    yield make
    delete_topics(kafka, made)


def group() -> str:
    return f"rtinfer-test-{uuid.uuid4().hex[:10]}"


def source(kafka: str, topic: str, group: str, **options: Any) -> KafkaSource:
    from rtinfer.sources.kafka import KafkaSource

    config = {**FAST_CONSUMER, **options.pop("config", {})}
    return KafkaSource(kafka, topic, group=group, config=config, **options)


def produce(
    kafka: str,
    topic: str,
    messages: Sequence[dict[str, Any]],
) -> list[tuple[int, int, int]]:
    """Produce ``messages`` (``produce()`` keyword arguments) in order, and wait for them.

    Returns ``(partition, offset, timestamp in ms)`` of each.
    """
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": kafka, "enable.idempotence": True, "acks": "all"})
    delivered: list[Message] = []
    errors: list[Any] = []

    def report(error: Any, message: Message) -> None:
        (errors if error is not None else delivered).append(error or message)

    for options in messages:
        producer.produce(topic, on_delivery=report, **options)
    assert producer.flush(SAFETY) == 0
    assert not errors, errors
    out = []
    for message in delivered:
        partition, offset = message.partition(), message.offset()
        assert partition is not None
        assert offset is not None
        out.append((partition, offset, message.timestamp()[1]))
    return out


def spread(n: int, partitions: int) -> list[dict[str, Any]]:
    """``n`` messages ``b"v<i>"``, message ``i`` to partition ``i % partitions``."""
    return [{"value": b"v%d" % i, "partition": i % partitions} for i in range(n)]


async def read(src: KafkaSource, n: int, *, max_events: int = 100) -> list[Event]:
    """Read until ``n`` events have come (a hang fails after the safety net)."""
    events: list[Event] = []

    async def collect() -> None:
        while len(events) < n:
            events.extend(await src.read(max_events))

    await asyncio.wait_for(collect(), SAFETY)
    return events


def where(events: Sequence[Event]) -> list[tuple[int, int]]:
    """``(partition, offset)`` of each event, in order."""
    out = []
    for event in events:
        assert event.position is not None
        assert isinstance(event.position.offset, int)
        out.append((event.position.partition, event.position.offset))
    return out


def positions(events: Sequence[Event]) -> list[Position]:
    return [e.position for e in events if e.position is not None]


def committed(kafka: str, group: str, topic: str, partitions: int) -> dict[int, int | None]:
    """The group's committed offset of each partition (``None``: nothing committed)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": kafka, "group.id": group})  # joins nothing
    try:
        found = consumer.committed(
            [TopicPartition(topic, p) for p in range(partitions)], timeout=SAFETY
        )
    finally:
        consumer.close()
    return {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in found}


async def wait_committed(
    kafka: str, group: str, topic: str, expected: dict[int, int | None]
) -> None:
    """Wait until the group's committed offsets are ``expected`` (commits are asynchronous)."""
    seen: dict[int, int | None] = {}

    async def poll() -> None:
        nonlocal seen
        while True:
            seen = await asyncio.to_thread(committed, kafka, group, topic, len(expected))
            if seen == expected:
                return
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), SAFETY)
    except TimeoutError:
        raise AssertionError(f"committed offsets stayed {seen}, expected {expected}") from None


def consume_all(kafka: str, topic: str, partitions: int, n: int) -> list[Message]:
    """The first ``n`` messages of ``topic`` (all partitions, no group), blocking."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": kafka, "group.id": "checker", "enable.auto.commit": False}
        | FAST_CONSUMER
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    got: list[Message] = []
    try:
        deadline = SAFETY * 3
        waited = 0.0
        while len(got) < n and waited < deadline:
            for message in consumer.consume(n - len(got), 0.1):
                assert message.error() is None, message.error()
                got.append(message)
            waited += 0.1  # a safety net counted in polls, never a timing assertion
    finally:
        consumer.close()
    assert len(got) == n, f"found {len(got)} of {n} messages in {topic}"
    return got


def header(message: Message, name: str) -> bytes | None:
    raw = message.headers() or []
    for key, value in raw.items() if isinstance(raw, dict) else raw:
        if key == name:
            return value if isinstance(value, bytes) else None
    return None


# -- the source -------------------------------------------------------------------------


def test_they_implement_the_protocols() -> None:
    pytest.importorskip("confluent_kafka")
    from rtinfer.sinks.kafka import KafkaSink
    from rtinfer.sources.kafka import KafkaSource

    assert isinstance(KafkaSource("localhost:9092", "t"), Source)
    assert isinstance(KafkaSink("localhost:9092", "t"), Sink)


async def test_read_turns_messages_into_events(kafka: str, topic: Topics) -> None:
    name = topic("in", partitions=3)
    sent = produce(
        kafka,
        name,
        [
            {"value": b"v0", "key": b"card-1", "partition": 0,
             "headers": [("trace", b"t-9"), (DEAD_REASON_HEADER, b"forged")]},
            {"value": b"v1", "partition": 1},
            {"value": None, "key": b"gone", "partition": 2},  # a tombstone
        ],
    )  # fmt: skip
    src = source(kafka, name, group())
    assert src.name == f"kafka://{name}"
    await asyncio.sleep(1.0)  # so that the time of reading is far from the messages' times
    await src.start()
    try:
        events = sorted(await read(src, 3), key=lambda e: where([e]))
        assert [e.value for e in events] == [b"v0", b"v1", b""]
        assert [e.key for e in events] == [b"card-1", None, b"gone"]
        # Only a source may say an event is undeliverable: the forged header is dropped.
        assert [e.headers for e in events] == [{"trace": b"t-9"}, None, None]
        assert [e.position for e in events] == [Position(f"kafka://{name}", p, 0) for p in range(3)]
        # The message's timestamp, not the time of reading (a second later, below): within
        # a few ms, as tansu may store its own append time rather than the producer's.
        for event, (_, _, ms) in zip(events, sent, strict=True):
            assert abs(event.ingest_time - ms / 1000) < 0.25, (event.ingest_time, ms)
        assert src.assignment == [(name, p) for p in range(3)]
    finally:
        await src.aclose()


async def test_nothing_is_committed_until_ack(kafka: str, topic: Topics) -> None:
    name, members = topic("in", partitions=3), group()
    produce(kafka, name, spread(6, 3))
    first = source(kafka, name, members)
    await first.start()
    read_first = where(await read(first, 6))
    await first.aclose()  # "dies" without acknowledging anything
    assert committed(kafka, members, name, 3) == {0: None, 1: None, 2: None}

    second = source(kafka, name, members)
    await second.start()
    try:
        assert sorted(where(await read(second, 6))) == sorted(read_first)
    finally:
        await second.aclose()


async def test_acknowledged_offsets_are_committed_and_the_next_member_reads_the_rest(
    kafka: str, topic: Topics
) -> None:
    name, members = topic("in", partitions=3), group()
    produce(kafka, name, spread(12, 3))  # offsets 0..3 in each partition
    first = source(kafka, name, members)
    await first.start()
    try:
        events = await read(first, 12)
        done = [e for e in events if e.position is not None and e.position.offset in (0, 1)]
        await first.ack(positions(done))  # in read order, as the pipeline does
        await wait_committed(kafka, members, name, {0: 2, 1: 2, 2: 2})
    finally:
        await first.aclose()
    assert committed(kafka, members, name, 3) == {0: 2, 1: 2, 2: 2}

    second = source(kafka, name, members)
    await second.start()
    try:
        rest = await read(second, 6)
        assert sorted(where(rest)) == [(p, o) for p in range(3) for o in (2, 3)]
        await second.ack(positions(rest))
    finally:
        await second.aclose()
    assert committed(kafka, members, name, 3) == {0: 4, 1: 4, 2: 4}


async def test_ack_commits_after_the_highest_offset_and_never_goes_back(
    kafka: str, topic: Topics
) -> None:
    name, members = topic(), group()
    produce(kafka, name, spread(5, 1))
    src = source(kafka, name, members)
    await src.start()
    try:
        events = await read(src, 5)
        at = {e.position.offset: e.position for e in events if e.position is not None}
        await src.ack([at[3], at[1]])  # not contiguous, not sorted: the highest counts
        await wait_committed(kafka, members, name, {0: 4})
        await src.ack([at[0]])  # behind what was acknowledged: changes nothing
        await src.ack([])
    finally:
        await src.aclose()
    assert committed(kafka, members, name, 1) == {0: 4}


async def test_a_cancelled_read_loses_nothing(kafka: str, topic: Topics) -> None:
    name = topic()
    src = source(kafka, name, group())
    await src.start()
    got: list[Event] = []
    try:
        for i in range(6):
            reading = asyncio.ensure_future(src.read(100))
            # The message arrives while the read waits; the read is cancelled at varying
            # points of its consume call (before, during, or after the message came).
            await asyncio.to_thread(produce, kafka, name, [{"value": b"v%d" % i}])
            for _ in range(i):
                await asyncio.sleep(0)
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                got.extend(await reading)
        got.extend(await read(src, 6 - len(got)))
        assert where(got) == [(0, o) for o in range(6)]  # each once, in order
        assert [e.value for e in got] == [b"v%d" % i for i in range(6)]
    finally:
        await src.aclose()


async def test_revocation_commits_what_was_acknowledged_and_the_new_owner_reads_the_rest(
    kafka: str, topic: Topics, caplog: pytest.LogCaptureFixture
) -> None:
    name, members = topic("in", partitions=2), group()
    produce(kafka, name, spread(20, 2))  # offsets 0..9 in both partitions
    first = source(kafka, name, members, revoke_wait_s=0.3)
    await first.start()
    second = source(kafka, name, members)
    pending: list[asyncio.Future[list[Event]]] = []
    try:
        events = await read(first, 20)
        acked = [p for p in positions(events) if p.partition == 0 or int(p.offset) < 5]
        await first.ack(acked)  # partition 1, offsets 5..9: still in flight

        await second.start()
        with caplog.at_level(logging.INFO, logger="rtinfer.sources.kafka"):
            # Both members read, which is when librdkafka runs their rebalance callbacks.
            first_reads = asyncio.ensure_future(first.read(100))
            second_reads = asyncio.ensure_future(second.read(100))
            pending += [first_reads, second_reads]
            await wait_until(lambda: bool(second.assignment), "the second member's partitions")
        assert "revoked with events read and not yet acknowledged" in caplog.text
        # The revocation committed what was acknowledged, synchronously.
        assert committed(kafka, members, name, 2) == {0: 10, 1: 5}

        first_reads.cancel()
        await asyncio.gather(first_reads, return_exceptions=True)
        await first.aclose()  # the second member now owns both partitions
        taken = await asyncio.wait_for(second_reads, SAFETY)
        if len(taken) < 5:
            taken += await read(second, 5 - len(taken))
        assert sorted(where(taken)) == [(1, o) for o in range(5, 10)]
        await second.ack(positions(taken))
    finally:
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await first.aclose()
        await second.aclose()
    assert committed(kafka, members, name, 2) == {0: 10, 1: 10}


async def test_a_revocation_waits_for_the_pipeline_to_acknowledge(
    kafka: str, topic: Topics, caplog: pytest.LogCaptureFixture
) -> None:
    name, members = topic("in", partitions=2), group()
    produce(kafka, name, spread(4, 2))
    first = source(kafka, name, members, revoke_wait_s=SAFETY)
    second = source(kafka, name, members)
    await first.start()
    pending: list[asyncio.Future[list[Event]]] = []
    try:
        events = await read(first, 4)  # in flight: nothing acknowledged yet
        await second.start()
        with caplog.at_level(logging.DEBUG, logger="rtinfer.sources.kafka"):
            pending.append(asyncio.ensure_future(first.read(100)))
            pending.append(asyncio.ensure_future(second.read(100)))
            await wait_until(lambda: "waiting up to" in caplog.text, "the revocation to wait")
            assert not second.assignment
            await first.ack(positions(events))  # the pipeline catches up
            await wait_until(lambda: bool(second.assignment), "the second member's partitions")
        assert "not yet acknowledged" not in caplog.text
        assert committed(kafka, members, name, 2) == {0: 2, 1: 2}
    finally:
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await first.aclose()
        await second.aclose()


async def test_a_missing_topic_is_logged_and_the_read_keeps_waiting(
    kafka: str, caplog: pytest.LogCaptureFixture
) -> None:
    src = source(kafka, f"rtinfer-test-missing-{uuid.uuid4().hex[:10]}", group())
    await src.start()
    try:
        with caplog.at_level(logging.WARNING, logger="rtinfer.sources.kafka"):
            reading = asyncio.ensure_future(src.read(10))
            try:
                await wait_until(lambda: "UNKNOWN_TOPIC_OR_PART" in caplog.text, "a logged error")
                assert not reading.done()  # not fatal: librdkafka retries
            finally:
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
    finally:
        await src.aclose()


async def test_read_after_close_returns_nothing(kafka: str, topic: Topics) -> None:
    src = source(kafka, topic(), group())
    await src.start()
    await src.aclose()
    assert src.closed
    assert await src.read(10) == []


# -- the sink ---------------------------------------------------------------------------


def result_event(
    result: object,
    *,
    key: bytes | None = None,
    id: str | None = None,
    position: Position | None = None,
) -> Event:
    event = Event(b"", key=key, ingest_time=0.0, position=position)
    event.result = result
    event.id = id
    return event


async def test_flush_delivers_value_key_and_source_id(kafka: str, topic: Topics) -> None:
    from rtinfer.sinks.kafka import SOURCE_ID_HEADER, KafkaSink

    name = topic("out")
    sink = KafkaSink(kafka, name)
    assert sink.name == f"kafka://{name}"
    await sink.start()
    try:
        await sink.write(
            [
                result_event({"id": "e1", "score": 0.5}, key=b"card-1", id="e1"),
                result_event(b"raw bytes", id="e2"),
            ]
        )
        await sink.write([result_event([1, 2], position=Position("kafka://in", 2, 7))])
        await sink.flush()
        await sink.flush()  # nothing more written: nothing more sent
    finally:
        await sink.aclose()
    messages = await asyncio.to_thread(consume_all, kafka, name, 1, 3)
    assert [(m.value(), m.key(), header(m, SOURCE_ID_HEADER)) for m in messages] == [
        (b'{"id":"e1","score":0.5}', b"card-1", b"e1"),
        (b"raw bytes", None, b"e2"),
        (b"[1,2]", None, b"kafka://in/2/7"),  # no id: its position stands for it
    ]


async def test_flush_raises_when_a_delivery_fails() -> None:
    pytest.importorskip("confluent_kafka")
    from rtinfer.sinks.kafka import KafkaDeliveryError, KafkaSink

    with socket_nobody_listens_on() as port:
        sink = KafkaSink(f"127.0.0.1:{port}", "out", config={"message.timeout.ms": 300})
        await sink.start()
        try:
            await sink.write([result_event(i, id=f"e{i}") for i in range(3)])
            with pytest.raises(KafkaDeliveryError, match="3 results were not delivered") as info:
                await asyncio.wait_for(sink.flush(), SAFETY)
            assert len(info.value.errors) == 3
            # Final: the failed messages are gone, so no later flush may pretend otherwise.
            with pytest.raises(KafkaDeliveryError):
                await asyncio.wait_for(sink.flush(), SAFETY)
        finally:
            await sink.aclose()


async def test_a_failed_produce_fails_the_run_and_acknowledges_nothing(
    kafka: str, topic: Topics
) -> None:
    from rtinfer.sinks.kafka import KafkaDeliveryError, KafkaSink
    from rtinfer.sources.kafka import KafkaSource

    inbox, members = topic("in"), group()
    produce(kafka, inbox, [{"value": payload(i)} for i in range(5)])
    with socket_nobody_listens_on() as port:
        pipeline = Pipeline(
            KafkaSource(kafka, inbox, group=members, config=FAST_CONSUMER),
            [Decode(Reading), Vectorize(["x", "y"]), Predict(MicroBatcher(python_model())),
             Outputs()],
            [KafkaSink(f"127.0.0.1:{port}", "out", config={"message.timeout.ms": 300})],
        )  # fmt: skip
        with pytest.raises(KafkaDeliveryError):
            await asyncio.wait_for(pipeline.run(), SAFETY)
    assert pipeline.events_in == 5
    assert committed(kafka, members, inbox, 1) == {0: None}


@contextlib.contextmanager
def socket_nobody_listens_on() -> Iterator[int]:
    """A loopback port that is bound (so nobody else takes it) but never accepts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        yield port


# -- configuration and the missing extra -----------------------------------------------


def test_settings_that_break_delivery_are_refused() -> None:
    pytest.importorskip("confluent_kafka")
    from rtinfer.sinks.kafka import KafkaSink
    from rtinfer.sources.kafka import KafkaSource

    with pytest.raises(ConfigError, match=r"enable\.auto\.commit"):
        KafkaSource("k:9092", "t", config={"enable.auto.commit": True})
    with pytest.raises(ConfigError, match=r"enable\.auto\.offset\.store"):
        KafkaSource("k:9092", "t", config={"enable.auto.offset.store": "true"})
    with pytest.raises(ConfigError, match=r"group\.id"):
        KafkaSource("k:9092", "t", config={"group.id": "other"})
    with pytest.raises(ConfigError, match="max_deliveries must be at least 1"):
        KafkaSource("k:9092", "t", max_deliveries=0)
    with pytest.raises(ConfigError, match="careful_events"):
        KafkaSource("k:9092", "t", max_deliveries=3, careful_events=0)
    with pytest.raises(ConfigError, match="topic"):
        KafkaSource("k:9092", [])
    with pytest.raises(ConfigError, match="bootstrap_servers"):
        KafkaSource("", "t")
    with pytest.raises(ConfigError, match="acks"):
        KafkaSink("k:9092", "t", config={"acks": 1})
    with pytest.raises(ConfigError, match=r"enable\.idempotence"):
        KafkaSink("k:9092", "t", config={"enable.idempotence": False})
    with pytest.raises(ConfigError, match=r"transactional\.id"):
        KafkaSink("k:9092", "t", config={"transactional.id": "x"})
    KafkaSource("k:9092", "t", config={"enable.auto.commit": False})  # the same: accepted
    KafkaSink("k:9092", "t", config={"acks": -1, "linger.ms": 20})


async def test_an_unknown_setting_is_a_config_error_at_start() -> None:
    pytest.importorskip("confluent_kafka")
    from rtinfer.sinks.kafka import KafkaSink
    from rtinfer.sources.kafka import KafkaSource

    src = KafkaSource("127.0.0.1:9", "t", config={"no.such.setting": 1})
    with pytest.raises(ConfigError, match=r"no\.such\.setting"):
        await src.start()
    await src.aclose()
    sink = KafkaSink("127.0.0.1:9", "t", config={"no.such.setting": 1})
    with pytest.raises(ConfigError, match=r"no\.such\.setting"):
        await sink.start()


def test_without_confluent_kafka_the_modules_import_and_building_says_what_to_install() -> None:
    code = """
import sys
sys.modules["confluent_kafka"] = None  # as if the extra were not installed
from rtinfer.exceptions import MissingDependency
from rtinfer.sinks.kafka import KafkaSink
from rtinfer.sources.kafka import KafkaSource
for build in (KafkaSource, KafkaSink):
    try:
        build("localhost:9092", "t")
    except MissingDependency as exc:
        print(exc)
"""
    done = subprocess.run(  # our own interpreter and code
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.splitlines() == [
        "the Kafka source needs an optional dependency: pip install 'rtinfer[kafka]'",
        "the Kafka sink needs an optional dependency: pip install 'rtinfer[kafka]'",
    ]


# -- end to end -------------------------------------------------------------------------


async def test_a_pipeline_from_a_kafka_topic_to_a_kafka_topic(kafka: str, topic: Topics) -> None:
    from rtinfer.sinks.kafka import SOURCE_ID_HEADER, KafkaSink
    from rtinfer.sources.kafka import KafkaSource

    inbox, outbox, members = topic("in", partitions=3), topic("out", partitions=3), group()
    n, keys = 240, 7
    sent = produce(
        kafka,
        inbox,
        [
            {"value": payload(i, key=f"k{i % keys}", seq=i), "key": f"k{i % keys}".encode()}
            for i in range(n)
        ],
    )
    assert len({p for p, _, _ in sent}) > 1  # the keys are spread over the partitions
    batcher = MicroBatcher(python_model(), max_batch_size=64, max_delay=0.0005)
    pipeline = Pipeline(
        KafkaSource(kafka, inbox, group=members, config=FAST_CONSUMER),
        [Decode(Reading), Vectorize(["x", "y"]), Predict(batcher), Outputs()],
        [KafkaSink(kafka, outbox)],
        read_size=32,
        max_in_flight=3,
    )
    running = asyncio.create_task(pipeline.run())
    try:
        messages = await asyncio.to_thread(consume_all, kafka, outbox, 3, n)
    finally:
        pipeline.stop()
        summary = await asyncio.wait_for(running, SAFETY)

    assert summary.events_in == summary.events_out == n
    ids = [header(m, SOURCE_ID_HEADER) for m in messages]
    assert sorted(ids, key=lambda i: int((i or b"e-1")[1:])) == [b"e%d" % i for i in range(n)]
    # Per-key order: each key's results, in their partition's order, follow the inputs.
    by_key: dict[bytes, list[int]] = defaultdict(list)
    for message in sorted(messages, key=lambda m: (m.partition() or 0, m.offset() or 0)):
        key = message.key()
        assert key is not None
        result = msgspec.json.decode(message.value() or b"")
        assert result["probabilities"] == [0.75, 0.25]
        by_key[key].append(int(result["id"][1:]))
    assert set(by_key) == {b"k%d" % k for k in range(keys)}
    for key, seqs in by_key.items():
        assert seqs == sorted(seqs), f"results of {key!r} out of order"
    # Everything read was acknowledged, and committed when the source closed.
    ends = Counter(p for p, _, _ in sent)
    assert committed(kafka, members, inbox, 3) == {p: ends[p] or None for p in range(3)}


async def test_lag_counts_what_the_group_has_not_committed(kafka: str, topic: Topics) -> None:
    name, members = topic("in", partitions=3), group()
    produce(kafka, name, spread(12, 3))
    src = source(kafka, name, members)
    await src.start()
    try:
        events = await read(src, 12)
        assert await src.lag() == 12  # read, but nothing acknowledged yet
        done = [e for e in events if e.position is not None and e.position.offset in (0, 1)]
        await src.ack(positions(done))
        await wait_committed(kafka, members, name, {0: 2, 1: 2, 2: 2})
        assert await src.lag() == 6
    finally:
        await src.aclose()
    assert await src.lag() is None  # closed: nothing to tell


# -- shedding by range (slo.shed_by: range) ---------------------------------------------


async def test_skip_seeks_past_what_was_not_handed_out_after_recording_it(
    kafka: str, topic: Topics
) -> None:
    name, members = topic("in", partitions=1), group()
    produce(kafka, name, spread(10, 1))
    src = source(kafka, name, members)
    await src.start()
    try:
        held = await read(src, 2, max_events=2)  # handed out, not acknowledged
        assert where(held) == [(0, 0), (0, 1)]
        record = RangeRecorder()

        async def fail(ranges: list[Skipped]) -> None:
            raise ConnectionError("the dead-letter sink is gone")

        with pytest.raises(ConnectionError):
            await src.skip(fail, keep=3)
        # Not recorded, not moved: the same run is found again, the newest 3 kept.
        assert await src.skip(record, keep=3) == 5
        assert record.seen == [[Skipped(f"kafka://{name}", 0, 2, 6, 5)]]
        rest = await read(src, 3)
        assert where(rest) == [(0, 7), (0, 8), (0, 9)]
        assert await src.skip(record, keep=3) == 0  # nothing left that is not handed out
        # The commit of what came after covers the run.
        await src.ack(positions([*held, *rest]))
        await wait_committed(kafka, members, name, {0: 10})
    finally:
        await src.aclose()


async def test_skip_drops_what_was_fetched_and_waits_in_the_source(
    kafka: str, topic: Topics
) -> None:
    name, members = topic("in", partitions=1), group()
    produce(kafka, name, spread(10, 1))
    src = source(kafka, name, members)
    await src.start()
    try:
        assert where(await read(src, 1, max_events=1)) == [(0, 0)]
        await asyncio.sleep(0.5)  # the consumer fetches the rest meanwhile
        # A read of 100 cancelled while it polls: the poll goes on, and what it takes
        # waits in the source; the next read hands out only 2 of it.
        reading = asyncio.ensure_future(src.read(100))
        await asyncio.sleep(0)
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        assert where(await read(src, 2, max_events=2)) == [(0, 1), (0, 2)]
        waiting = len(src._ready)  # the case under test: fetched, not handed out
        assert waiting > 0
        record = RangeRecorder()

        assert await src.skip(record, keep=2) == 5
        assert record.seen == [[Skipped(f"kafka://{name}", 0, 3, 7, 5)]]
        assert where(await read(src, 2)) == [(0, 8), (0, 9)]
    finally:
        await src.aclose()


async def test_a_skip_right_after_a_skip_starts_where_the_first_sought(
    kafka: str, topic: Topics
) -> None:
    """Until the pipeline reads again, the consumer's position is unknown after a seek: a
    second skip (a lasting overload) must still move past what arrived meanwhile."""
    name, members = topic("in", partitions=1), group()
    produce(kafka, name, spread(10, 1))
    src = source(kafka, name, members)
    await src.start()
    try:
        assert where(await read(src, 1, max_events=1)) == [(0, 0)]
        record = RangeRecorder()
        assert await src.skip(record, keep=2) == 7  # 1..7 set aside: it seeks to 8
        produce(kafka, name, spread(10, 1))  # offsets 10..19
        consumer, tp = src._consumer, src._topic_partition((f"kafka://{name}", 0), 0)
        assert consumer is not None

        def fetched() -> bool:  # the consumer fetches them in the background
            return consumer.get_watermark_offsets(tp, cached=True)[1] == 20

        await wait_until(fetched, "a fetch reporting the 10 new messages")
        assert await src.skip(record, keep=2) == 10
        assert record.seen[-1] == [Skipped(f"kafka://{name}", 0, 8, 17, 10)]
        assert where(await read(src, 2)) == [(0, 18), (0, 19)]
    finally:
        await src.aclose()


async def test_a_kafka_pipeline_sheds_a_late_backlog_by_range(kafka: str, topic: Topics) -> None:
    name, members = topic("in", partitions=1), group()
    n_old, n_fresh, read_size = 60, 12, 4
    old_ms = int((time.time() - 60) * 1000)  # a minute behind: far past a 10 s deadline
    produce(kafka, name, [{"value": payload(i), "timestamp": old_ms} for i in range(n_old)])
    results, dead = RecordingSink(), RecordingSink("dead")
    # 10 s, not 1: produce() starts an idempotent producer each call, and on tansu its
    # messages arrived 0.5-1 s after their timestamps, so fresh events were sometimes late.
    pipeline = shedding_pipeline(source(kafka, name, members), results, dead, read_size, 10.0)
    running = asyncio.create_task(pipeline.run())
    try:
        # The first read is late: before the next one the backlog is skipped but for one
        # read's worth (read, late too); what arrives after that is answered.
        await wait_until(lambda: len(dead.flushed_results) >= 2 * read_size + 1)
        produce(kafka, name, [{"value": payload(i)} for i in range(n_old, n_old + n_fresh)])
        await wait_until(lambda: len(results.flushed) == n_fresh)
    finally:
        pipeline.stop()
        summary = await asyncio.wait_for(running, SAFETY)
    letters = dead.flushed_results
    ranges = [d for d in letters if d["value"] is None]
    assert [(r["offset"], r["last_offset"], r["count"]) for r in ranges] == [
        (read_size, n_old - read_size - 1, n_old - 2 * read_size)
    ]
    assert len(letters) - len(ranges) == 2 * read_size
    assert summary.skipped == n_old - 2 * read_size
    assert sorted(p.offset for p in results.flushed) == list(range(n_old, n_old + n_fresh))
    await wait_committed(kafka, members, name, {0: n_old + n_fresh})
