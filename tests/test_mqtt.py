"""The MQTT source and sink, against a real MQTT 5 broker (``MQTT_URL``).

Each test uses its own topics and client ids (unique names), so tests never
see each other's messages or sessions. The tests are skipped when aiomqtt is
not installed or no broker answers at ``MQTT_URL`` (default
``mqtt://127.0.0.1:1883``; Mosquitto 2.0 or later, for MQTT 5 and shared
subscriptions).

"Nothing else is pending" is checked without waiting for silence: a sentinel
is published, and the next message read must be that sentinel, since a broker
delivers what a session still owes before what is published afterwards.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import msgspec
import pytest

from conftest import SAFETY, Reading, payload, python_model, service_missing

pytest.importorskip("aiomqtt")

import aiomqtt
from paho.mqtt.packettypes import PacketTypes

from rtinfer.batching import MicroBatcher
from rtinfer.connectors.mqtt import MqttLink, new_properties
from rtinfer.exceptions import ConfigError, RtinferError
from rtinfer.pipeline import Pipeline
from rtinfer.sinks.mqtt import SOURCE_ID_PROPERTY, MqttSink
from rtinfer.sources.mqtt import TOPIC_HEADER, MqttSource
from rtinfer.stages import Decode, Outputs, Predict, Vectorize
from rtinfer.types import Event, Position

MQTT_URL = os.environ.get("MQTT_URL", "mqtt://127.0.0.1:1883")


class Mqtt:
    """A publishing connection for one test, and fresh names."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client

    @staticmethod
    def topic() -> str:
        return f"rtinfer-test/{uuid.uuid4().hex[:12]}/in"

    @staticmethod
    def client_id(role: str = "worker") -> str:
        return f"rtinfer-test-{role}-{uuid.uuid4().hex[:12]}"

    async def publish(
        self,
        topic: str,
        values: Sequence[bytes],
        *,
        keys: Sequence[str] | None = None,
        properties: Sequence[tuple[str, str]] = (),
    ) -> None:
        for i, value in enumerate(values):
            props = new_properties(PacketTypes.PUBLISH)
            for pair in properties:
                props.UserProperty = pair
            if keys is not None:
                props.UserProperty = ("rtinfer-key", keys[i])
            await self.client.publish(topic, value, qos=1, properties=props)


@pytest.fixture
async def mqtt() -> AsyncIterator[Mqtt]:
    try:
        broker = re.match(r"mqtts?://(?:[^@/]*@)?([^:/]+)(?::(\d+))?", MQTT_URL)
        assert broker is not None, MQTT_URL
        client = aiomqtt.Client(
            broker.group(1),
            int(broker.group(2) or 1883),
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=2,
        )
        await asyncio.wait_for(client.__aenter__(), 3)
    except Exception as exc:
        service_missing(f"no MQTT broker at {MQTT_URL} ({exc!r}); set MQTT_URL")
    try:
        yield Mqtt(client)
    finally:
        await client.__aexit__(None, None, None)


def source(topic: str, client_id: str | None = None, **options: Any) -> MqttSource:
    return MqttSource(MQTT_URL, topic, client_id=client_id, **options)


async def read_n(src: MqttSource, n: int, *, size: int | None = None) -> list[Event]:
    """Read until ``n`` events arrived (a hang fails after ``SAFETY`` seconds)."""
    events: list[Event] = []

    async def loop() -> None:
        while len(events) < n:
            events.extend(await src.read(size or n - len(events)))

    await asyncio.wait_for(loop(), SAFETY)
    return events


def positions(events: Sequence[Event]) -> list[Position]:
    return [e.position for e in events if e.position is not None]


async def assert_next_is_sentinel(mqtt: Mqtt, src: MqttSource, topic: str) -> None:
    """Nothing is owed to ``src``'s session: the next message read is a fresh sentinel."""
    sentinel = f"sentinel-{uuid.uuid4().hex}".encode()
    await mqtt.publish(topic, [sentinel])
    (event,) = await read_n(src, 1, size=1)
    assert event.value == sentinel
    await src.ack(positions([event]))


async def until(condition: Callable[[], bool], what: str) -> None:
    async def poll() -> None:
        while not condition():  # noqa: ASYNC110 (state changed by socket callbacks)
            await asyncio.sleep(0.005)

    try:
        await asyncio.wait_for(poll(), SAFETY)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


# -- source ----------------------------------------------------------------------------------


async def test_source_reads_values_keys_headers_and_positions(mqtt: Mqtt) -> None:
    topic = mqtt.topic()
    src = source(topic, mqtt.client_id(), end_session_on_close=True)
    await src.start()
    try:
        before = time.time()
        await mqtt.publish(topic, [b"v0", b"v1"], keys=["a", "b"], properties=[("trace", "t1")])
        await mqtt.publish(topic, [b"v2"], properties=[("rtinfer-key-b64", "/wA=")])
        events = await read_n(src, 3)
        after = time.time()
        assert [e.value for e in events] == [b"v0", b"v1", b"v2"]
        assert [e.key for e in events] == [b"a", b"b", b"\xff\x00"]
        assert events[0].headers == {
            "trace": b"t1",
            "rtinfer-key": b"a",
            TOPIC_HEADER: topic.encode(),
        }
        # ingest_time is when this process received the message (MQTT has no broker time).
        assert all(before <= e.ingest_time <= after for e in events)
        assert all(e.event_time is None for e in events)
        assert [p.source for p in positions(events)] == [f"mqtt://{topic}"] * 3
        mids = [p.offset for p in positions(events)]
        assert all(isinstance(m, int) and m > 0 for m in mids)
        assert len(set(mids)) == 3  # unacknowledged deliveries have distinct packet ids
        await src.ack(positions(events))
        await assert_next_is_sentinel(mqtt, src, topic)
    finally:
        await src.aclose()


async def test_wildcard_topic_and_the_topic_header(mqtt: Mqtt) -> None:
    base = mqtt.topic().removesuffix("/in")
    src = source(f"{base}/+/temp", end_session_on_close=True)
    await src.start()
    try:
        await mqtt.publish(f"{base}/dev1/temp", [b"20"])
        await mqtt.publish(f"{base}/dev1/humidity", [b"ignored"])
        await mqtt.publish(f"{base}/dev2/temp", [b"21"])
        events = await read_n(src, 2)
        assert [e.headers[TOPIC_HEADER] for e in events if e.headers] == [
            f"{base}/dev1/temp".encode(),
            f"{base}/dev2/temp".encode(),
        ]
        await src.ack(positions(events))
    finally:
        await src.aclose()


async def test_read_returns_at_most_max_events(mqtt: Mqtt) -> None:
    topic = mqtt.topic()
    src = source(topic)
    await src.start()
    try:
        await mqtt.publish(topic, [b"%d" % i for i in range(5)])
        got: list[Event] = []
        while len(got) < 5:
            batch = await asyncio.wait_for(src.read(2), SAFETY)
            assert 1 <= len(batch) <= 2
            got.extend(batch)
        assert [e.value for e in got] == [b"0", b"1", b"2", b"3", b"4"]
        await src.ack(positions(got))
    finally:
        await src.aclose()


async def test_unacknowledged_messages_come_again_to_the_same_client_id(mqtt: Mqtt) -> None:
    topic, worker = mqtt.topic(), mqtt.client_id()
    first = source(topic, worker)
    await first.start()
    await mqtt.publish(topic, [b"a", b"b", b"c"])
    events = await read_n(first, 3)
    await first.ack(positions(events[:1]))  # only a
    await first.aclose()  # the session stays, owing b and c

    second = source(topic, worker, end_session_on_close=True)
    await second.start()
    try:
        again = await read_n(second, 2)
        assert [e.value for e in again] == [b"b", b"c"]
        await second.ack(positions(again))
        await assert_next_is_sentinel(mqtt, second, topic)
    finally:
        await second.aclose()


async def test_acks_reach_the_broker_before_close_while_messages_wait(mqtt: Mqtt) -> None:
    topic, worker = mqtt.topic(), mqtt.client_id()
    first = source(topic, worker, receive_maximum=4)
    await first.start()
    n = 20
    await mqtt.publish(topic, [b"%d" % i for i in range(n)])
    done: list[Event] = []
    while len(done) < 10:  # more messages keep arriving while these are acknowledged
        events = await asyncio.wait_for(first.read(3), SAFETY)
        done.extend(events)
        await first.ack(positions(events))
    # Closing with unread bytes on the socket would reset the connection, and the broker
    # would drop the last PUBACKs unread: those messages would then come again.
    await first.aclose()

    second = source(topic, worker, end_session_on_close=True)
    await second.start()
    try:
        rest = await read_n(second, n - len(done))
        assert [e.value for e in done + rest] == [b"%d" % i for i in range(n)]
        await second.ack(positions(rest))
        await assert_next_is_sentinel(mqtt, second, topic)
    finally:
        await second.aclose()


async def test_messages_published_while_away_are_kept_by_the_session(mqtt: Mqtt) -> None:
    topic, worker = mqtt.topic(), mqtt.client_id()
    first = source(topic, worker)
    await first.start()  # subscribes: the session now collects the topic
    await first.aclose()
    await mqtt.publish(topic, [b"while away"])

    second = source(topic, worker, end_session_on_close=True)
    await second.start()
    try:
        (event,) = await read_n(second, 1)
        assert event.value == b"while away"
        await second.ack(positions([event]))
    finally:
        await second.aclose()


CRASHING_WORKER = """
import asyncio, sys
from rtinfer.sources.mqtt import MqttSource

async def main():
    src = MqttSource(sys.argv[1], sys.argv[2], client_id=sys.argv[3])
    await src.start()
    print("ready", flush=True)
    got = []
    while len(got) < 3:
        got += await src.read(3)
    print("read", len(got), flush=True)
    await asyncio.sleep(60)  # killed here, before acknowledging anything

asyncio.run(main())
"""


async def test_a_killed_worker_s_messages_come_again(mqtt: Mqtt) -> None:
    topic, worker = mqtt.topic(), mqtt.client_id()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_WORKER, MQTT_URL, topic, worker,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), SAFETY)
        assert line == b"ready\n"
        await mqtt.publish(topic, [b"x", b"y", b"z"])
        line = await asyncio.wait_for(child.stdout.readline(), SAFETY)
        assert line == b"read 3\n"
    finally:
        child.kill()  # SIGKILL: no DISCONNECT, no acknowledgement
        await child.wait()

    survivor = source(topic, worker, end_session_on_close=True)
    await survivor.start()
    try:
        again = await read_n(survivor, 3)
        assert [e.value for e in again] == [b"x", b"y", b"z"]
        await survivor.ack(positions(again))
        await assert_next_is_sentinel(mqtt, survivor, topic)
    finally:
        await survivor.aclose()


async def test_reconnects_and_acks_only_the_new_delivery(mqtt: Mqtt) -> None:
    topic, worker = mqtt.topic(), mqtt.client_id()
    src = source(topic, worker, end_session_on_close=True)
    await src.start()
    try:
        await mqtt.publish(topic, [b"a", b"b"])
        a, b = await read_n(src, 2)
        await src.ack(positions([a]))
        # Another connection with the same client id takes the session over: the broker
        # disconnects the source, which reconnects and takes the session back.
        intruder = await MqttLink.open(
            MQTT_URL, client_id=worker, clean_start=False, session_expiry_s=60, manual_ack=True
        )
        await intruder.close()
        (b_again,) = await read_n(src, 1)  # b was never acknowledged: delivered again
        assert b_again.value == b"b"
        # The first delivery of b came on the old connection: its ack is skipped (its
        # packet id may name another message by now); the new delivery's ack goes out.
        await src.ack(positions([b, b_again]))
        await assert_next_is_sentinel(mqtt, src, topic)
    finally:
        await src.aclose()


async def test_a_reconnection_does_not_duplicate_unread_messages(mqtt: Mqtt) -> None:
    topic, worker = mqtt.topic(), mqtt.client_id()
    src = source(topic, worker, end_session_on_close=True)
    await src.start()
    try:
        await mqtt.publish(topic, [b"a", b"b", b"c"])
        (a,) = await read_n(src, 1, size=1)
        await until(lambda: src.buffered == 2, "b and c to wait, unread")
        intruder = await MqttLink.open(
            MQTT_URL, client_id=worker, clean_start=False, session_expiry_s=60, manual_ack=True
        )
        await intruder.close()
        await mqtt.publish(topic, [b"sentinel"])  # delivered after what the session owes
        # The resumed session delivers a, b and c again; the unread copies of b and c from
        # the old connection are dropped, so nothing comes twice.
        await until(lambda: src.buffered >= 4, "the redeliveries and the sentinel")
        after = await read_n(src, 4)
        assert [e.value for e in after] == [b"a", b"b", b"c", b"sentinel"]
        await src.ack(positions([a, *after]))
        await assert_next_is_sentinel(mqtt, src, topic)
    finally:
        await src.aclose()


async def test_shared_subscription_splits_messages_between_workers(mqtt: Mqtt) -> None:
    topic, group = mqtt.topic(), f"g{uuid.uuid4().hex[:8]}"
    one = source(topic, shared_group=group, end_session_on_close=True)
    two = source(topic, shared_group=group, end_session_on_close=True)
    assert one.subscription == f"$share/{group}/{topic}"
    await one.start()
    await two.start()
    try:
        n = 20
        await mqtt.publish(topic, [b"%d" % i for i in range(n)])
        got: dict[str, list[bytes]] = {"one": [], "two": []}

        async def drain(name: str, src: MqttSource) -> None:
            while True:
                events = await src.read(n)
                got[name].extend(e.value for e in events)
                await src.ack(positions(events))

        tasks = [asyncio.create_task(drain("one", one)), asyncio.create_task(drain("two", two))]
        try:
            await until(lambda: len(got["one"]) + len(got["two"]) >= n, "every message")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert got["one"], "the first member received nothing"
        assert got["two"], "the second member received nothing"
        assert sorted(got["one"] + got["two"]) == sorted(b"%d" % i for i in range(n))
    finally:
        await one.aclose()
        await two.aclose()


async def test_the_buffer_is_bounded_by_receive_maximum(mqtt: Mqtt) -> None:
    topic = mqtt.topic()
    src = source(topic, receive_maximum=4, end_session_on_close=True)
    await src.start()
    try:
        n = 40
        await mqtt.publish(topic, [b"%d" % i for i in range(n)])
        got: list[Event] = []
        largest = 0
        while len(got) < n:
            events = await asyncio.wait_for(src.read(1), SAFETY)
            largest = max(largest, src.buffered + len(events))
            got.extend(events)
            await src.ack(positions(events))
            await asyncio.sleep(0)  # let the PUBACK go and more messages come
        # Messages beyond the window stay with the broker (one packet may be mid-read).
        assert largest <= 4 + 1
        assert [e.value for e in got] == [b"%d" % i for i in range(n)]
    finally:
        await src.aclose()


async def test_a_cancelled_read_loses_nothing(mqtt: Mqtt) -> None:
    topic = mqtt.topic()
    src = source(topic, end_session_on_close=True)
    await src.start()
    try:
        blocked = asyncio.create_task(src.read(10))
        await asyncio.sleep(0.05)  # let it wait on an empty topic
        assert not blocked.done()
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked
        await mqtt.publish(topic, [b"one", b"two"])
        await until(lambda: src.buffered == 2, "the messages to be buffered")
        # A read woken by their arrival and cancelled before it ran takes nothing.
        woken = asyncio.create_task(src.read(10))
        woken.cancel()
        with pytest.raises(asyncio.CancelledError):
            await woken
        events = await read_n(src, 2)
        assert [e.value for e in events] == [b"one", b"two"]
        await src.ack(positions(events))
        await assert_next_is_sentinel(mqtt, src, topic)
    finally:
        await src.aclose()


async def test_aclose_ends_a_blocked_read_with_no_events(mqtt: Mqtt) -> None:
    src = source(mqtt.topic(), end_session_on_close=True)
    await src.start()
    blocked = asyncio.create_task(src.read(10))
    await asyncio.sleep(0.05)
    await src.aclose()
    assert await asyncio.wait_for(blocked, SAFETY) == []
    assert await src.read(10) == []


async def test_a_generated_client_id_ends_its_session_on_close(mqtt: Mqtt) -> None:
    src = source(mqtt.topic())
    assert src.end_session_on_close
    await src.start()
    await src.aclose()
    present: list[bool] = []
    probe = await MqttLink.open(
        MQTT_URL,
        client_id=src.client_id,
        clean_start=False,
        session_expiry_s=0,
        on_connect=lambda _link, session_present: present.append(session_present),
    )
    await probe.close()
    assert present == [False]


async def test_no_broker_fails_start_with_the_url() -> None:
    src = MqttSource("mqtt://127.0.0.1:1", "t", connect_timeout_s=1.0)
    with pytest.raises(
        RtinferError, match=re.escape("cannot connect to the MQTT broker at mqtt://127.0.0.1:1")
    ):
        await src.start()
    await src.aclose()  # nothing to close: fine


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="QoS 2 is refused"):
        MqttSource(MQTT_URL, "t", qos=2)
    with pytest.raises(ValueError, match="give the topic alone and the group as shared_group"):
        MqttSource(MQTT_URL, "$share/g/t")
    with pytest.raises(ValueError, match="shared_group 'a/b' is invalid"):
        MqttSource(MQTT_URL, "t", shared_group="a/b")
    with pytest.raises(ValueError, match="'#' the whole last level"):
        MqttSource(MQTT_URL, "a/#/b")
    with pytest.raises(ValueError, match="receive_maximum must be 1 to 65535"):
        MqttSource(MQTT_URL, "t", receive_maximum=0)
    with pytest.raises(ConfigError, match="expected mqtt://host"):
        MqttSource("nats://127.0.0.1:4222", "t")
    with pytest.raises(ValueError, match="no wildcards"):
        MqttSink(MQTT_URL, "out/+")
    with pytest.raises(ValueError, match="qos must be 0, 1 or 2"):
        MqttSink(MQTT_URL, "out", qos=3)


# -- sink ------------------------------------------------------------------------------------


def result_event(
    ident: str | None, result: Any, *, key: bytes | None = None, source: str = "test://in"
) -> Event:
    event = Event(b"", key=key, ingest_time=time.time(), position=Position(source, 0, 7))
    event.id = ident
    event.result = result
    return event


async def test_sink_publishes_on_flush_with_properties(mqtt: Mqtt) -> None:
    topic = mqtt.topic()
    reader = source(topic, end_session_on_close=True)
    await reader.start()
    sink = MqttSink(MQTT_URL, topic)
    await sink.start()
    try:
        await sink.write(
            [
                result_event("a", {"score": 0.5}, key=b"k1"),
                result_event("b", b"raw bytes", key=b"\xff\x00 not text"),
                result_event(None, [1, 2]),  # no id: the (log) position stands for it
                result_event(None, [3], source="mqtt://in"),  # an MQTT position: no id at all
            ]
        )
        assert sink.pending == 4  # write only buffers
        await sink.flush()
        assert sink.pending == 0
        events = await read_n(reader, 4)
    finally:
        await sink.aclose()
        await reader.aclose()
    assert msgspec.json.decode(events[0].value) == {"score": 0.5}
    assert events[1].value == b"raw bytes"
    assert [e.headers.get(SOURCE_ID_PROPERTY) for e in events if e.headers] == [
        b"a",
        b"b",
        b"test://in/0/7",
        None,
    ]
    # The source reads the keys back, text or not.
    assert [e.key for e in events] == [b"k1", b"\xff\x00 not text", None, None]


async def test_sink_refusal_fails_the_flush_and_keeps_the_results(mqtt: Mqtt) -> None:
    sink = MqttSink(MQTT_URL, "$SYS/rtinfer-test")  # clients may not publish to $SYS
    await sink.start()
    try:
        await sink.write([result_event("a", {"n": 1})])
        with pytest.raises(RtinferError, match="refused 1 of 1 results"):
            await sink.flush()
        assert sink.pending == 1
    finally:
        await sink.aclose()


async def test_sink_require_subscribers(mqtt: Mqtt) -> None:
    topic = mqtt.topic()
    sink = MqttSink(MQTT_URL, topic, require_subscribers=True)
    await sink.start()
    try:
        await sink.write([result_event("a", {"n": 1})])
        with pytest.raises(RtinferError, match="No matching subscribers"):
            await sink.flush()
        reader = source(topic, end_session_on_close=True)
        await reader.start()
        try:
            await sink.flush()  # the same result, now that someone listens
            (event,) = await read_n(reader, 1)
            assert msgspec.json.decode(event.value) == {"n": 1}
        finally:
            await reader.aclose()
    finally:
        await sink.aclose()


async def test_sink_reconnects_on_flush_after_losing_its_connection(mqtt: Mqtt) -> None:
    topic = mqtt.topic()
    reader = source(topic, end_session_on_close=True)
    await reader.start()
    sink = MqttSink(MQTT_URL, topic)
    await sink.start()
    try:
        # Another connection with the sink's client id makes the broker drop the sink's.
        intruder = await MqttLink.open(MQTT_URL, client_id=sink.client_id, clean_start=True)
        await until(lambda: not sink.connected, "the broker to drop the sink's connection")
        await intruder.close()
        await sink.write([result_event("a", {"n": 1})])
        sink.url = "mqtt://127.0.0.1:1"  # the broker is unreachable for one flush
        with pytest.raises(RtinferError, match="cannot connect"):
            await sink.flush()
        assert sink.pending == 1  # kept for the next flush
        sink.url = MQTT_URL
        await sink.flush()
        assert sink.connected
        (event,) = await read_n(reader, 1)
        assert msgspec.json.decode(event.value) == {"n": 1}
    finally:
        await sink.aclose()
        await reader.aclose()


# -- without aiomqtt -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "what"),
    [("rtinfer.sources.mqtt", "source"), ("rtinfer.sinks.mqtt", "sink")],
)
def test_missing_aiomqtt_names_the_extra(module: str, what: str) -> None:
    code = (
        "import sys\n"
        "sys.modules['aiomqtt'] = None\n"
        "from rtinfer.exceptions import MissingDependency\n"
        "try:\n"
        f"    import {module}\n"
        "except MissingDependency as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    print('imported')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert out == f"the MQTT {what} needs an optional dependency: pip install 'rtinfer[mqtt]'"


# -- end to end ------------------------------------------------------------------------------


async def test_pipeline_from_a_topic_to_another(mqtt: Mqtt) -> None:
    in_topic, out_topic, worker = mqtt.topic(), mqtt.topic(), mqtt.client_id()
    results_reader = source(out_topic, end_session_on_close=True)
    await results_reader.start()  # subscribed before any result is published
    src = source(in_topic, worker)
    await src.start()  # the session subscribes before the inputs are published
    n = 60
    ids = [f"e{i}" for i in range(n)]
    await mqtt.publish(
        in_topic,
        [payload(i, key=f"k{i % 4}", x=i / n) for i in range(n)],
        keys=[f"k{i % 4}" for i in range(n)],
    )
    pipeline = Pipeline(
        src,
        [
            Decode(Reading),
            Vectorize(["x", "y"]),
            Predict(MicroBatcher(python_model(), max_batch_size=16, max_delay=0.0005)),
            Outputs(),
        ],
        [MqttSink(MQTT_URL, out_topic)],
        read_size=8,
        max_in_flight=3,
    )
    seen = 0

    def count(batch: Any) -> None:
        nonlocal seen
        seen += len(batch.events) + len(batch.dead)
        if seen >= n:
            pipeline.stop()

    pipeline.observe(count)
    try:
        summary = await asyncio.wait_for(pipeline.run(), SAFETY)
        assert summary.events_out == n
        assert summary.dead_letters == 0
        outputs = await read_n(results_reader, n)
    finally:
        await results_reader.aclose()
    results = [msgspec.json.decode(e.value) for e in outputs]
    assert sorted(r["id"] for r in results) == sorted(ids)
    assert all(len(r["probabilities"]) == 2 for r in results)
    assert all(e.headers and e.headers[SOURCE_ID_PROPERTY] == r["id"].encode()
               for e, r in zip(outputs, results, strict=True))  # fmt: skip

    # Every input was acknowledged: the worker's session owes nothing.
    again = source(in_topic, worker, end_session_on_close=True)
    await again.start()
    try:
        await assert_next_is_sentinel(mqtt, again, in_topic)
    finally:
        await again.aclose()
