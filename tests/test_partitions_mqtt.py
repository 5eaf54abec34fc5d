"""Partitioned MQTT topics: the sink spreads keys over ``<topic>/<p>``, sources split them.

Against a real MQTT 5 broker (``MQTT_URL``); every test uses topics and client ids of its own.
"""

from __future__ import annotations

import asyncio
import os
import uuid
import zlib
from collections.abc import Sequence
from typing import Any

import pytest

from conftest import SAFETY, service_missing

pytest.importorskip("aiomqtt")

from rtinfer.exceptions import ConfigError, RtinferError
from rtinfer.sinks.mqtt import MqttSink
from rtinfer.sources.mqtt import TOPIC_HEADER, MqttSource
from rtinfer.types import Event, Position

MQTT_URL = os.environ.get("MQTT_URL", "mqtt://127.0.0.1:1883")
P = 4


def names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:12]
    return f"rtinfer-ptest/{tag}/in", f"rtinfer-ptest-{tag}"


def keyed_events(n: int, keys: int = 20, ids: str = "e") -> list[Event]:
    events = []
    for i in range(n):
        event = Event(b"v%d" % i, key=b"card-%d" % (i % keys), ingest_time=0.0)
        event.id = f"{ids}{i}"
        event.result = event.value
        events.append(event)
    return events


async def publish(topic: str, events: list[Event]) -> None:
    sink = MqttSink(MQTT_URL, topic, partitions=P)
    await sink.start()
    try:
        await sink.write(events)
        await sink.flush()
    finally:
        await sink.aclose()


async def started(topic: str, client_id: str, **options: Any) -> MqttSource:
    src = MqttSource(MQTT_URL, topic, client_id=client_id, **options)
    try:
        await src.start()
    except RtinferError as exc:
        service_missing(f"no MQTT broker at {MQTT_URL} ({exc})")
    return src


async def drain(src: MqttSource, expected: int, size: int = 7) -> list[Event]:
    got: list[Event] = []
    while len(got) < expected:
        batch = await asyncio.wait_for(src.read(size), SAFETY)
        assert 0 < len(batch) <= size
        got += batch
    return got


def positions(events: Sequence[Event]) -> list[Position]:
    return [e.position for e in events if e.position is not None]


def number(event: Event) -> int:
    return int(event.value[1:])


async def test_the_sink_puts_each_key_on_its_crc32_topic() -> None:
    topic, cid = names()
    reader = await started(f"{topic}/+", cid, end_session_on_close=True)  # every partition
    try:
        await publish(topic, keyed_events(200))
        got = await drain(reader, 200, size=200)
        seen: dict[bytes, int] = {}
        per_partition: dict[int, list[int]] = {}
        for e in got:
            assert e.key is not None
            assert e.headers is not None
            partition = int(e.headers[TOPIC_HEADER].decode().rpartition("/")[2])
            assert partition == zlib.crc32(e.key) % P
            assert seen.setdefault(e.key, partition) == partition
            per_partition.setdefault(partition, []).append(number(e))
        assert sorted(per_partition) == list(range(P))
        assert all(v == sorted(v) for v in per_partition.values())
        assert sorted(number(e) for e in got) == list(range(200))
    finally:
        await reader.aclose()


async def test_two_workers_split_the_partitions_and_ack_what_they_read() -> None:
    topic, cid = names()
    one = await started(topic, f"{cid}-0", partitions=P, owned_partitions=[0, 2])
    two = await started(topic, f"{cid}-1", partitions=P, owned_partitions=[1, 3])
    assert one.subscriptions == (f"{topic}/0", f"{topic}/2")
    events = keyed_events(120)
    sizes = dict.fromkeys(range(P), 0)
    for e in events:
        assert e.key is not None
        sizes[zlib.crc32(e.key) % P] += 1
    try:
        await publish(topic, events)
        first = await drain(one, sizes[0] + sizes[2])
        second = await drain(two, sizes[1] + sizes[3])
        for got, owned in ((first, {0, 2}), (second, {1, 3})):
            for e in got:
                assert e.position is not None
                assert e.position.partition in owned
                assert e.key is not None
                assert zlib.crc32(e.key) % P == e.position.partition
            by_key: dict[bytes | None, list[int]] = {}
            for e in got:
                by_key.setdefault(e.key, []).append(number(e))
            assert all(v == sorted(v) for v in by_key.values())
        assert sorted(number(e) for e in first + second) == list(range(120))
        await one.ack(positions(first))
        await two.ack(positions(second[:5]))  # the rest stays unacknowledged
    finally:
        await one.aclose()
        await two.aclose()
    # Restarted with the same client ids: only what was not acknowledged comes again.
    one = await started(topic, f"{cid}-0", partitions=P, owned_partitions=[0, 2],
                        end_session_on_close=True)  # fmt: skip
    two = await started(topic, f"{cid}-1", partitions=P, owned_partitions=[1, 3],
                        end_session_on_close=True)  # fmt: skip
    try:
        again = await drain(two, len(second) - 5, size=200)
        assert sorted(number(e) for e in again) == sorted(number(e) for e in second[5:])
        await two.ack(positions(again))
        # Then the next message each one reads is a new one: nothing else was owed.
        fresh = keyed_events(40, ids="new")
        await publish(topic, fresh)
        wanted_one = [e for e in fresh if e.key and zlib.crc32(e.key) % P in (0, 2)]
        new_one = await drain(one, len(wanted_one))
        new_two = await drain(two, len(fresh) - len(wanted_one))
        assert [e.value for e in new_one] == [e.value for e in wanted_one]
        assert sorted(number(e) for e in new_one + new_two) == list(range(40))
        await one.ack(positions(new_one))
        await two.ack(positions(new_two))
    finally:
        await one.aclose()
        await two.aclose()


async def test_workers_take_their_partitions_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic, cid = names()
    monkeypatch.setenv("RTINFER_WORKERS", "3")
    sources = []
    for worker in range(3):
        monkeypatch.setenv("RTINFER_WORKER", str(worker))
        sources.append(
            await started(topic, f"{cid}-{worker}", partitions=P, end_session_on_close=True)
        )
    assert [s.owned_partitions for s in sources] == [(0, 3), (1,), (2,)]
    try:
        events = keyed_events(80)
        await publish(topic, events)
        got: list[Event] = []
        for src in sources:
            expected = sum(
                1 for e in events if e.key and zlib.crc32(e.key) % P in src.owned_partitions
            )
            mine = await drain(src, expected)
            assert {e.position.partition for e in mine if e.position} <= set(src.owned_partitions)
            await src.ack(positions(mine))
            got += mine
        assert sorted(number(e) for e in got) == list(range(80))
    finally:
        for src in sources:
            await src.aclose()
    monkeypatch.setenv("RTINFER_WORKERS", "5")
    monkeypatch.setenv("RTINFER_WORKER", "4")
    with pytest.raises(ConfigError, match="more workers than partitions"):
        MqttSource(MQTT_URL, topic, partitions=P)


def test_partition_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="needs partitions"):
        MqttSource(MQTT_URL, "t", owned_partitions=[0])
    with pytest.raises(ConfigError, match="exclude each other"):
        MqttSource(MQTT_URL, "t", partitions=2, shared_group="g")
    with pytest.raises(ConfigError, match="ends with '#'"):
        MqttSource(MQTT_URL, "t/#", partitions=2)
    with pytest.raises(ConfigError, match="at least 1"):
        MqttSink(MQTT_URL, "t", partitions=0)
