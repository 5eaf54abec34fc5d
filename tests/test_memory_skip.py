"""Shedding by range on the in-process broker: a consumer moves past the records published
before an instant (``Consumer.published_before``, ``seek_forward``), ``BrokerSource.skip``
records the runs first, and a pipeline with ``shed_ranges`` loses nothing."""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import SAFETY, Ledger, Reading, RecordingSink, committed_positions, payload
from conftest import python_model as linear_model
from rtinfer.batching import MicroBatcher
from rtinfer.broker import Broker
from rtinfer.pipeline import Pipeline
from rtinfer.sources import BrokerSource
from rtinfer.stages import Decode, Outputs, Predict, Vectorize
from rtinfer.types import Skipped


def stamped(broker: Broker, topic: str, stamps: list[float], partition: int = 0) -> None:
    for i, stamp in enumerate(stamps):
        broker.publish(topic, b"v%d" % i, timestamp=stamp, partition=partition)


def test_a_consumer_finds_and_skips_the_run_published_before_an_instant() -> None:
    broker = Broker()
    broker.create_topic("t", partitions=2)
    stamped(broker, "t", [1.0, 2.0, 3.0, 9.0, 4.0], partition=0)  # the run ends at 9.0
    stamped(broker, "t", [8.0, 9.0], partition=1)
    consumer = broker.consumer("t", "g")
    # Partition 1 first (fewest records); from its position on, nothing of it is old.
    assert [(r.partition, r.offset) for r in consumer.fetch_nowait(1)] == [(1, 0)]
    assert consumer.published_before(5.0) == {("t", 0): (0, 3)}
    assert consumer.seek_forward(("t", 0), 3)
    assert not consumer.seek_forward(("t", 0), 2)  # never back
    assert not consumer.seek_forward(("t", 7), 3)  # not owned
    assert consumer.published_before(5.0) == {}
    rest = consumer.fetch_nowait(10)
    assert sorted((r.partition, r.offset) for r in rest) == [(0, 3), (0, 4), (1, 1)]
    assert broker.committed("g", "t") == [0, 0]  # a skip commits nothing by itself


async def test_the_source_records_the_runs_before_it_moves_past_them() -> None:
    broker = Broker()
    broker.create_topic("t", partitions=2)
    stamped(broker, "t", [1.0, 1.0, 1.0, 50.0], partition=0)
    stamped(broker, "t", [1.0, 50.0], partition=1)
    source = BrokerSource(broker, "t", group="g")
    await source.start()
    seen: list[list[Skipped]] = []

    async def record(ranges: list[Skipped]) -> None:
        seen.append(sorted(ranges))

    async def fail(ranges: list[Skipped]) -> None:
        raise ConnectionError("the dead-letter sink is gone")

    with pytest.raises(ConnectionError):
        await source.skip(10.0, fail)
    # Not recorded, not moved: the same runs are found again.
    assert (await source.skip(10.0, record)) == 4
    assert seen == [[Skipped("memory://t", 0, 0, 2, 3), Skipped("memory://t", 1, 0, 0, 1)]]
    events = await asyncio.wait_for(source.read(10), SAFETY)
    assert sorted((e.position.partition, e.position.offset) for e in events if e.position) == [
        (0, 3),
        (1, 1),
    ]
    await source.ack([e.position for e in events if e.position])
    assert broker.committed("g", "t") == [4, 2]  # the later commit covers the runs
    await source.aclose()


async def test_a_pipeline_on_the_broker_sheds_a_late_backlog_by_range() -> None:
    broker = Broker()
    broker.create_topic("readings", partitions=1)
    n_old, n_fresh, read_size = 120, 30, 8
    old = time.time() - 60
    for i in range(n_old):
        broker.publish("readings", payload(i), timestamp=old)
    for i in range(n_old, n_old + n_fresh):
        broker.publish("readings", payload(i))
    broker.end_topic("readings")
    source = BrokerSource(broker, "readings", group="g")
    ledger = Ledger(lambda: committed_positions(broker, "g", "readings"))
    sink = RecordingSink(ledger=ledger)
    dead = RecordingSink("dead", ledger=ledger, dead=True)
    pipeline = Pipeline(
        source,
        [
            Decode(Reading),
            Vectorize(["x", "y"]),
            Predict(MicroBatcher(linear_model(), max_batch_size=16, max_delay=0)),
            Outputs(),
        ],
        [sink],
        dead_letters=dead,
        read_size=read_size,
        max_in_flight=1,
        slo=1.0,
        shed_expired=True,
        shed_ranges=True,
    )
    summary = await asyncio.wait_for(pipeline.run(), SAFETY)

    assert summary.events_out == n_fresh
    assert summary.skipped == n_old - read_size
    assert summary.dead_letters == n_old
    assert sorted(p.offset for p in sink.flushed) == list(range(n_old, n_old + n_fresh))
    one_by_one = [r for r in dead.flushed_results if r["value"] is not None]
    ranges = [r for r in dead.flushed_results if r["value"] is None]
    assert len(one_by_one) == read_size
    assert [(r["offset"], r["last_offset"], r["count"]) for r in ranges] == [
        (read_size, n_old - 1, n_old - read_size)
    ]
    # Every record is done: the commit covers the range too.
    assert broker.committed("g", "readings") == [n_old + n_fresh]
