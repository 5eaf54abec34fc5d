"""The broker source and sinks: events in, results out, acknowledgements as commits."""

from __future__ import annotations

import asyncio
import logging
import zlib

import msgspec
import pytest

from rtinfer.broker import Broker
from rtinfer.sinks import BrokerSink, ListSink
from rtinfer.sources import BrokerSource
from rtinfer.types import Event, Position, Sink, Source

SAFETY = 5.0  # seconds: a safety net against a hang, never a timing assertion


def result_event(result: object, key: bytes | None = None) -> Event:
    event = Event(b"", key=key, ingest_time=0.0)
    event.result = result
    return event


def test_they_implement_the_protocols() -> None:
    broker = Broker()
    assert isinstance(BrokerSource(broker, "t"), Source)
    assert isinstance(BrokerSink(broker, "t"), Sink)
    assert isinstance(ListSink(), Sink)


async def test_read_turns_records_into_events() -> None:
    broker = Broker()
    broker.publish("payments", b'{"a":1}', key=b"card", headers={"trace": b"x"}, timestamp=12.5)
    source = BrokerSource(broker, "payments")
    assert source.name == "memory://payments"
    await source.start()
    [event] = await asyncio.wait_for(source.read(10), SAFETY)
    assert event.value == b'{"a":1}'
    assert event.key == b"card"
    assert event.headers == {"trace": b"x"}
    assert event.ingest_time == 12.5
    assert event.position == Position("memory://payments", 0, 0)
    await source.aclose()


async def test_read_waits_for_a_publish() -> None:
    broker = Broker()
    source = BrokerSource(broker, "t")
    await source.start()
    reading = asyncio.ensure_future(source.read(10))
    await asyncio.sleep(0)
    assert not reading.done()
    broker.publish("t", b"late")
    [event] = await asyncio.wait_for(reading, SAFETY)
    assert event.value == b"late"


async def test_ack_commits_the_highest_offset_plus_one_per_partition() -> None:
    broker = Broker(default_partitions=2)
    broker.publish_many("t", [b"%d" % i for i in range(10)])
    source = BrokerSource(broker, "t", group="g")
    await source.start()
    events = await source.read(100)
    assert len(events) == 10
    # Not contiguous (dead letters and filtered events are acknowledged too, or not).
    chosen = [e.position for e in events if e.position is not None and e.position.offset in (0, 3)]
    await source.ack(chosen)
    assert broker.committed("g", "t") == [4, 4]
    await source.ack([])
    assert broker.committed("g", "t") == [4, 4]


async def test_unacknowledged_events_go_to_the_next_member() -> None:
    broker = Broker()
    broker.publish_many("t", [b"%d" % i for i in range(10)])
    first = BrokerSource(broker, "t", group="g", name="first")
    second = BrokerSource(broker, "t", group="g", name="second")
    await first.start()
    await second.start()
    events = await first.read(100)
    await first.ack([e.position for e in events[:6] if e.position is not None])
    await first.aclose()
    assert await first.read(10) == []
    broker.end_topic("t")
    rest = await asyncio.wait_for(second.read(100), SAFETY)
    assert [e.value for e in rest] == [b"6", b"7", b"8", b"9"]
    assert await second.read(100) == []


async def test_an_ack_after_losing_the_partition_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = Broker()
    broker.publish_many("t", [b"a", b"b"])
    first = BrokerSource(broker, "t", group="g", name="first")
    await first.start()
    events = await first.read(10)
    await first.aclose()
    with caplog.at_level(logging.WARNING, logger="rtinfer.sources.memory"):
        await first.ack([e.position for e in events if e.position is not None])
    assert "commit refused for partitions [0]" in caplog.text
    assert broker.committed("g", "t") == [0]


async def test_read_before_start_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match=r"call start\(\) before read\(\)"):
        await BrokerSource(Broker(), "t").read(1)


async def test_broker_sink_publishes_results_by_key() -> None:
    broker = Broker(default_partitions=4)
    sink = BrokerSink(broker, "out")
    assert sink.name == "memory://out"
    await sink.start()
    await sink.write([result_event({"score": 0.5}, key=b"k1"), result_event(b"raw", key=b"k2")])
    await sink.flush()
    await sink.aclose()
    records = broker.consumer("out", "check").fetch_nowait(10)
    by_key = {r.key: r.value for r in records}
    assert msgspec.json.decode(by_key[b"k1"]) == {"score": 0.5}
    assert by_key[b"k2"] == b"raw"
    for r in records:
        assert r.key is not None
        assert r.partition == zlib.crc32(r.key) % 4


async def test_list_sink_keeps_results_and_counts_flushes() -> None:
    sink = ListSink()
    await sink.start()
    await sink.write([result_event({"a": 1}), result_event(2)])
    assert sink.results == [{"a": 1}, 2]
    assert sink.flushed == 0
    await sink.flush()
    await sink.write([result_event("three")])
    assert sink.flushed == 2
    await sink.flush()
    assert sink.flushed == 3
    await sink.aclose()


async def test_broker_source_to_broker_sink_round_trip() -> None:
    broker = Broker(default_partitions=3)
    values = [msgspec.json.encode({"n": i}) for i in range(30)]
    broker.publish_many("in", values, keys=[b"k%d" % (i % 5) for i in range(30)])
    broker.end_topic("in")
    source, sink = BrokerSource(broker, "in"), BrokerSink(broker, "out")
    await source.start()
    while events := await asyncio.wait_for(source.read(7), SAFETY):
        for event in events:
            event.result = {"n": msgspec.json.decode(event.value)["n"] * 10}
        await sink.write(events)
        await sink.flush()
        await source.ack([e.position for e in events if e.position is not None])
    assert broker.lag("rtinfer", "in") == 0
    out = broker.consumer("out", "check").fetch_nowait(100)
    assert sorted(msgspec.json.decode(r.value)["n"] for r in out) == [10 * i for i in range(30)]
