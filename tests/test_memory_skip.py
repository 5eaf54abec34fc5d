"""Shedding by range on the in-process broker: a consumer seeks forward past records
(``Consumer.seek_forward``), ``BrokerSource.skip`` records the runs it skips first, and a
pipeline with ``shed_ranges`` loses nothing."""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import (
    SAFETY,
    Ledger,
    RangeRecorder,
    RecordingSink,
    committed_positions,
    payload,
    shedding_pipeline,
    wait_until,
)
from rtinfer.broker import Broker
from rtinfer.sources import BrokerSource
from rtinfer.types import Skipped


def stamped(broker: Broker, topic: str, stamps: list[float], partition: int = 0) -> None:
    for i, stamp in enumerate(stamps):
        broker.publish(topic, b"v%d" % i, timestamp=stamp, partition=partition)


def test_a_consumer_seeks_forward_only_on_its_own_partitions() -> None:
    broker = Broker()
    broker.create_topic("t", partitions=2)
    stamped(broker, "t", [1.0] * 5, partition=0)
    consumer = broker.consumer("t", "g")
    assert consumer.seek_forward(("t", 0), 3)
    assert not consumer.seek_forward(("t", 0), 2)  # never back
    assert not consumer.seek_forward(("t", 7), 9)  # not owned
    assert [(r.partition, r.offset) for r in consumer.fetch_nowait(10)] == [(0, 3), (0, 4)]
    assert broker.committed("g", "t") == [0, 0]  # a seek commits nothing by itself


async def test_the_source_records_the_runs_before_it_moves_past_them() -> None:
    broker = Broker()
    broker.create_topic("t", partitions=2)
    stamped(broker, "t", [1.0] * 4, partition=0)
    stamped(broker, "t", [1.0] * 2, partition=1)
    source = BrokerSource(broker, "t", group="g")
    await source.start()
    held = await asyncio.wait_for(source.read(1), SAFETY)  # read, not yet acknowledged
    record = RangeRecorder()

    async def fail(ranges: list[Skipped]) -> None:
        raise ConnectionError("the dead-letter sink is gone")

    with pytest.raises(ConnectionError):
        await source.skip(fail)
    # Not recorded, not moved: the same runs are found again.
    assert await source.skip(record) == 5
    # What was read stays with the pipeline: partition 1's first record (fewest left).
    assert [(e.position.partition, e.position.offset) for e in held if e.position] == [(1, 0)]
    assert record.seen == [[Skipped("memory://t", 0, 0, 3, 4), Skipped("memory://t", 1, 1, 1, 1)]]
    assert await source.skip(record) == 0  # nothing left to skip
    broker.publish("t", b"a", partition=0)
    broker.publish("t", b"b", partition=0)
    broker.publish("t", b"c", partition=0)
    assert await source.skip(record, keep=2) == 2  # one a partition: the newest of 0
    assert record.seen[-1] == [Skipped("memory://t", 0, 4, 5, 2)]
    broker.publish("t", b"fresh", partition=0)
    events = await asyncio.wait_for(source.read(10), SAFETY)
    assert [(e.position.partition, e.position.offset) for e in events if e.position] == [
        (0, 6),
        (0, 7),
    ]
    await source.ack([e.position for e in [*held, *events] if e.position])
    # A later commit covers a run: partition 0's; partition 1's waits for one.
    assert broker.committed("g", "t") == [8, 1]
    await source.aclose()


async def test_a_pipeline_on_the_broker_sheds_a_late_backlog_by_range() -> None:
    broker = Broker()
    broker.create_topic("readings", partitions=1)
    n_old, n_fresh, read_size = 120, 30, 8
    old = time.time() - 60
    for i in range(n_old):
        broker.publish("readings", payload(i), timestamp=old)
    source = BrokerSource(broker, "readings", group="g")
    ledger = Ledger(lambda: committed_positions(broker, "g", "readings"))
    sink = RecordingSink(ledger=ledger)
    dead = RecordingSink("dead", ledger=ledger, dead=True)
    pipeline = shedding_pipeline(source, sink, dead, read_size)
    running = asyncio.create_task(pipeline.run())
    # The first read is late: before the next one, the backlog is skipped but for one
    # read's worth (read, late too); what arrives after that is answered.
    await wait_until(lambda: len(dead.flushed_results) == 2 * read_size + 1)
    for i in range(n_old, n_old + n_fresh):
        broker.publish("readings", payload(i))
    broker.end_topic("readings")
    summary = await asyncio.wait_for(running, SAFETY)

    assert summary.events_out == n_fresh
    assert summary.skipped == n_old - 2 * read_size
    assert summary.dead_letters == n_old
    assert sorted(p.offset for p in sink.flushed) == list(range(n_old, n_old + n_fresh))
    one_by_one = [r for r in dead.flushed_results if r["value"] is not None]
    ranges = [r for r in dead.flushed_results if r["value"] is None]
    assert len(one_by_one) == 2 * read_size
    assert [(r["offset"], r["last_offset"], r["count"]) for r in ranges] == [
        (read_size, n_old - read_size - 1, n_old - 2 * read_size)
    ]
    # Every record is done: the commit covers the range too.
    assert broker.committed("g", "readings") == [n_old + n_fresh]
