"""The pipeline engine: ack after flush, redelivery, order, backpressure, dead letters, stop."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import pytest

from conftest import (
    SAFETY,
    Ledger,
    Reading,
    RecordingSink,
    committed_positions,
    payload,
    python_model,
    wait_until,
)
from rtinfer.batching import MicroBatcher
from rtinfer.broker import Broker
from rtinfer.exceptions import RtinferError
from rtinfer.pipeline import Lifecycle, Pipeline
from rtinfer.sinks import ListSink
from rtinfer.sources import BrokerSource
from rtinfer.stages import Decide, Decode, Outputs, Predict, Stage, Vectorize
from rtinfer.testing import ListSource
from rtinfer.types import Batch, Event, Position

GROUP = "scoring"
TOPIC = "readings"


def scoring_stages(
    *, fail_on: float | None = None, model_in_flight: int = 1, max_batch_size: int = 64
) -> list[Stage]:
    """decode → vectorize → model → decide, with the result carrying key and seq."""
    batcher = MicroBatcher(
        python_model(fail_on=fail_on),
        max_batch_size=max_batch_size,
        max_delay=0.0005,
        max_in_flight=model_in_flight,
    )
    return [
        Decode(Reading),
        Vectorize(["x", "y"]),
        Predict(batcher, column_names={"features": ["x", "y"]}),
        Decide(
            output="probabilities",
            thresholds={"review": 0.5, "block": 0.9},
            include=["key", "seq"],
        ),
    ]


def publish(broker: Broker, n: int, *, keys: int = 1, start: int = 0) -> list[str]:
    """Publish ``n`` readings keyed ``k0..k{keys-1}``; returns their ids."""
    values = [payload(i, key=f"k{i % keys}", seq=i) for i in range(start, start + n)]
    broker.publish_many(
        TOPIC, values, keys=[f"k{i % keys}".encode() for i in range(start, start + n)]
    )
    return [f"e{i}" for i in range(start, start + n)]


def ids(results: Sequence[Any]) -> list[str]:
    return [r["id"] for r in results]


def state(pipeline: Pipeline) -> Lifecycle:
    """The pipeline's state now (a call, so the type checker does not narrow it)."""
    return pipeline.state


async def run_with_safety(pipeline: Pipeline) -> Any:
    return await asyncio.wait_for(pipeline.run(), SAFETY)


# -- at least once: acknowledge after flush ------------------------------------------------


async def test_positions_are_committed_only_after_every_sink_flushed() -> None:
    broker = Broker(default_partitions=3)
    published = publish(broker, 300, keys=7)
    broker.end_topic(TOPIC)
    ledger = Ledger(lambda: committed_positions(broker, GROUP, TOPIC))
    first, second = RecordingSink("a", ledger=ledger), RecordingSink("b", ledger=ledger)
    dead = RecordingSink("dead", ledger=ledger, dead=True)
    pipeline = Pipeline(
        BrokerSource(broker, TOPIC, group=GROUP),
        scoring_stages(),
        [first, second],
        dead_letters=dead,
        read_size=16,
        max_in_flight=3,
        flush_interval=0.0,
    )
    summary = await run_with_safety(pipeline)

    assert ledger.checks > 20  # the invariant was checked all along the run
    ledger.check()
    assert summary.events_out == 300
    assert sorted(ids(first.flushed_results)) == sorted(published)
    assert ids(second.flushed_results) == ids(first.flushed_results)
    # Everything is committed at the end, and nothing more than was published.
    assert broker.committed(GROUP, TOPIC) == broker.end_offsets(TOPIC)
    assert broker.lag(GROUP, TOPIC) == 0


async def test_a_blocked_flush_holds_back_the_commit() -> None:
    broker = Broker(default_partitions=2)
    publish(broker, 200, keys=4)
    gate = asyncio.Event()
    ledger = Ledger(lambda: committed_positions(broker, GROUP, TOPIC))
    fast = RecordingSink("fast", ledger=ledger)
    slow = RecordingSink("slow", ledger=ledger, gate=gate)
    pipeline = Pipeline(
        BrokerSource(broker, TOPIC, group=GROUP),
        scoring_stages(),
        [fast, slow],
        read_size=10,
        max_in_flight=2,
    )
    running = asyncio.create_task(pipeline.run())
    await wait_until(lambda: slow.flushing, "the first flush")
    # The first flush is blocked: nothing at all may be committed, however long it takes,
    # and the pipeline stops reading once its batches in flight are full.
    await wait_until(lambda: pipeline.events_in >= 30, "the reader to fill its batches")
    for _ in range(50):
        await asyncio.sleep(0)
    assert broker.committed(GROUP, TOPIC) == [0, 0]
    assert pipeline.events_in < 200
    assert fast.written  # results were written, just not flushed by every sink

    gate.set()
    await wait_until(lambda: sum(broker.committed(GROUP, TOPIC)) == 200, "every commit")
    ledger.check()
    pipeline.stop()
    summary = await asyncio.wait_for(running, SAFETY)
    assert summary.events_out == 200
    assert len(slow.flushed) == 200


@pytest.mark.parametrize("how", ["sink raises", "run cancelled"])
async def test_a_consumer_that_dies_mid_batch_loses_nothing(how: str) -> None:
    broker = Broker(default_partitions=3)
    published = publish(broker, 240, keys=5)
    broker.end_topic(TOPIC)
    ledger = Ledger(lambda: committed_positions(broker, GROUP, TOPIC))
    gate = asyncio.Event()
    if how == "sink raises":
        doomed = RecordingSink("doomed", ledger=ledger, fail_on_write=6)
    else:
        doomed = RecordingSink("doomed", ledger=ledger, gate=gate)
    first = Pipeline(
        BrokerSource(broker, TOPIC, group=GROUP),
        scoring_stages(),
        [doomed],
        read_size=8,
        max_in_flight=3,
        flush_interval=0.0,
    )
    if how == "sink raises":
        with pytest.raises(RuntimeError, match="failed on write 6"):
            await run_with_safety(first)
    else:
        # Let a few batches through, then block a flush and kill the run while it waits.
        def close_gate_after_some(events: Sequence[Event]) -> None:
            if doomed.writes == 4:
                gate.clear()

        gate.set()
        doomed.on_write = close_gate_after_some
        task = asyncio.create_task(first.run())
        await wait_until(lambda: doomed.writes >= 4 and doomed.flushing, "a blocked flush")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, SAFETY)

    assert first.state is Lifecycle.CLOSED
    ledger.check()  # what the dead consumer committed, it had flushed
    committed = committed_positions(broker, GROUP, TOPIC)
    assert 0 < len(committed) < 240  # it died part way through
    assert committed <= doomed.flushed

    # A second member of the same group gets every unacknowledged event again.
    survivor = RecordingSink("survivor")
    second = Pipeline(
        BrokerSource(broker, TOPIC, group=GROUP),
        scoring_stages(),
        [survivor],
        read_size=8,
        max_in_flight=3,
    )
    await run_with_safety(second)
    all_positions = {
        Position(f"memory://{TOPIC}", p, o)
        for p, end in enumerate(broker.end_offsets(TOPIC))
        for o in range(end)
    }
    assert set(survivor.flushed) == all_positions - committed  # exactly the unacknowledged
    delivered = set(ids(doomed.flushed_results)) | set(ids(survivor.flushed_results))
    assert delivered == set(published)  # nothing lost across both runs
    assert broker.committed(GROUP, TOPIC) == broker.end_offsets(TOPIC)


async def test_a_failing_source_fails_the_run_after_what_it_read_is_done() -> None:
    class Breaks(ListSource):
        reads = 0

        async def read(self, max_events: int) -> list[Event]:
            self.reads += 1
            if self.reads == 3:
                raise ConnectionError("the source went away")
            return await super().read(max_events)

    source = Breaks([payload(i) for i in range(20)])
    sink = ListSink()
    pipeline = Pipeline(source, scoring_stages(), [sink], read_size=4)
    with pytest.raises(ConnectionError, match="went away"):
        await run_with_safety(pipeline)
    assert ids(sink.results) == [f"e{i}" for i in range(8)]
    assert sink.flushed == 8
    assert [p.offset for p in source.acked] == list(range(8))
    assert source.closed


async def test_a_stage_that_raises_fails_the_run_and_acknowledges_nothing_of_its_batch() -> None:
    def explode(batch: Batch) -> Batch:
        if any(e.id == "e5" for e in batch.events):
            raise KeyError("bug in a user stage")
        return batch

    source = ListSource([payload(i) for i in range(12)])
    sink = ListSink()
    stages = scoring_stages()
    stages.insert(1, explode)
    pipeline = Pipeline(source, stages, [sink], read_size=4, max_in_flight=1, flush_interval=0)
    with pytest.raises(KeyError, match="bug in a user stage"):
        await run_with_safety(pipeline)
    assert ids(sink.results) == ["e0", "e1", "e2", "e3"]
    assert max(p.offset for p in source.acked) == 3


# -- order and backpressure ----------------------------------------------------------------


async def test_per_key_order_survives_partitions_batches_and_parallel_model_calls() -> None:
    rng = random.Random(3)
    broker = Broker(default_partitions=4)
    n, keys = 600, 9
    # Uneven publishing, so batches mix partitions and keys in varying proportions.
    sent = 0
    while sent < n:
        size = rng.randint(1, 40)
        publish(broker, min(size, n - sent), keys=keys, start=sent)
        sent += size
    broker.end_topic(TOPIC)

    slow_rows = asyncio.Event()  # never set: just a stage that yields at random

    async def jitter(batch: Batch) -> Batch:
        if rng.random() < 0.5:
            await asyncio.sleep(0)
        if rng.random() < 0.1:
            await asyncio.wait([asyncio.ensure_future(slow_rows.wait())], timeout=0.002)
        return batch

    stages = scoring_stages(model_in_flight=3, max_batch_size=8)
    stages.insert(2, jitter)
    sink = ListSink()
    pipeline = Pipeline(
        BrokerSource(broker, TOPIC, group=GROUP), stages, [sink], read_size=13, max_in_flight=5
    )
    summary = await run_with_safety(pipeline)
    assert summary.events_out == n
    by_key: dict[str, list[int]] = defaultdict(list)
    for result in sink.results:
        by_key[result["key"]].append(result["seq"])
    assert len(by_key) == keys
    for key, seqs in by_key.items():
        assert seqs == sorted(seqs), f"key {key} out of order"
        assert len(seqs) == len(set(seqs))
    assert sorted(s for seqs in by_key.values() for s in seqs) == list(range(n))


@pytest.mark.parametrize(("read_size", "max_in_flight"), [(10, 1), (10, 3), (7, 4)])
async def test_a_slow_sink_stops_the_reader(read_size: int, max_in_flight: int) -> None:
    broker = Broker(default_partitions=2)
    publish(broker, 500, keys=3)
    gate = asyncio.Event()
    sink = RecordingSink("slow", gate=gate)
    pipeline = Pipeline(
        BrokerSource(broker, TOPIC, group=GROUP),
        scoring_stages(),
        [sink],
        read_size=read_size,
        max_in_flight=max_in_flight,
        flush_interval=0.0,
    )
    # Read but not yet written: at most max_in_flight batches, the one being written included.
    bound = read_size * max_in_flight
    unwritten: list[int] = []

    def measure(events: Sequence[Event]) -> None:
        unwritten.append(pipeline.events_in - pipeline.events_out)

    sink.on_write = measure
    running = asyncio.create_task(pipeline.run())
    for _ in range(5):  # five slow flushes, each with the reader given every chance to run
        await wait_until(lambda: sink.flushing, "a flush")
        for _ in range(100):
            await asyncio.sleep(0)
        unwritten.append(pipeline.events_in - pipeline.events_out)
        assert pipeline.events_in <= pipeline.events_out + bound
        # The source is simply not read: the group's lag covers everything not read.
        assert broker.lag(GROUP, TOPIC) >= 500 - pipeline.events_in
        gate.set()
        await wait_until(lambda: not sink.flushing, "the flush to finish")
        gate.clear()
    assert max(unwritten) <= bound
    assert pipeline.events_in < 500
    gate.set()
    pipeline.stop()
    summary = await asyncio.wait_for(running, SAFETY)
    assert summary.events_out == summary.events_in


# -- dead letters --------------------------------------------------------------------------


def nan_for(event_id: str) -> Stage:
    """A python stage that puts NaN into the model input of one event."""

    def poison(batch: Batch) -> Batch:
        assert batch.inputs is not None
        for i, event in enumerate(batch.events):
            if event.id == event_id:
                batch.inputs["features"][i, 1] = np.nan
        return batch

    poison.name = "poison"  # type: ignore[attr-defined]
    return poison


async def test_each_bad_event_is_dead_lettered_alone_and_the_rest_carry_on() -> None:
    good = [payload(i, x=0.1 * (i % 10)) for i in range(10)]
    bad = {
        "undecodable": b"\xff\xfe{not json",
        "wrong type": b'{"id": "w", "key": "k", "x": "high", "y": 1.0}',
        "missing field": b'{"id": "m", "key": "k", "y": 1.0}',
        "nan": payload(100, x=0.3),
        "infinite": b'{"id": "inf", "key": "k", "x": 1e999, "y": 1.0}',
        "model fails": payload(101, x=13.0),
    }
    values = good[:3] + list(bad.values()) + good[3:]
    source = ListSource(values, name="list://in")
    ledger = Ledger(lambda: set(source.acked))
    sink = RecordingSink("out", ledger=ledger)
    dead = RecordingSink("dead", ledger=ledger, dead=True)
    stages = scoring_stages(fail_on=13.0)
    stages.insert(2, nan_for("e100"))
    pipeline = Pipeline(source, stages, [sink], dead_letters=dead, name="p", read_size=32)
    summary = await run_with_safety(pipeline)

    assert ids(sink.flushed_results) == [f"e{i}" for i in range(10)]
    assert summary.events_in == 16
    assert summary.events_out == 10
    assert summary.dead_letters == 6
    records = {r["offset"]: r for r in dead.flushed_results}
    assert sorted(records) == [3, 4, 5, 6, 7, 8]  # their positions in the source
    for record in records.values():
        assert record["source"] == "list://in"
        assert record["partition"] == 0
        assert record["pipeline"] == "p"
    undecodable, wrong, missing, nan, inf, fails = (records[i] for i in range(3, 9))
    assert undecodable["stage"] == "decode"
    assert undecodable["value_encoding"] == "base64"
    assert wrong["stage"] == "decode"
    assert "$.x" in wrong["reason"]
    assert wrong["value"] == bad["wrong type"].decode()
    assert missing["stage"] == "decode"
    assert "missing required field `x`" in missing["reason"]
    assert inf["stage"] == "decode"  # msgspec refuses 1e999 ("Number out of range")
    assert nan["stage"] == "model"
    assert nan["id"] == "e100"
    assert "'y' is nan" in nan["reason"]
    assert fails["stage"] == "model"
    assert fails["id"] == "e101"
    assert "cannot score x=13.0" in fails["reason"]
    # Every position, dead or alive, was acknowledged, and only after its flush.
    assert sorted(p.offset for p in source.acked) == list(range(16))
    ledger.check()


async def test_a_model_failure_on_a_batch_of_one_is_a_dead_letter_not_a_crash() -> None:
    source = ListSource([payload(0, x=0.2), payload(1, x=13.0), payload(2, x=0.4)])
    sink, dead = ListSink(), ListSink()
    pipeline = Pipeline(
        source, scoring_stages(fail_on=13.0), [sink], dead_letters=dead, read_size=1
    )
    summary = await run_with_safety(pipeline)
    assert ids(sink.results) == ["e0", "e2"]
    [letter] = dead.results
    assert letter["id"] == "e1"
    assert letter["stage"] == "model"
    assert summary.dead_letters == 1
    assert len(source.acked) == 3


async def test_msgpack_events_decode_and_dead_letter_too() -> None:
    values = [
        msgspec.msgpack.encode({"id": "a", "key": "k", "x": 0.95, "y": 0.0}),
        msgspec.msgpack.encode({"id": "b", "key": "k", "x": "not a number", "y": 0.0}),
        b"\xc1",  # never used in MessagePack
    ]
    source = ListSource(values)
    sink, dead = ListSink(), ListSink()
    batcher = MicroBatcher(python_model(), max_batch_size=8, max_delay=0)
    stages: list[Stage] = [
        Decode(Reading, codec="msgpack"),
        Vectorize(["x", "y"]),
        Predict(batcher),
        Decide(output="probabilities", thresholds={"block": 0.9}),
    ]
    await run_with_safety(Pipeline(source, stages, [sink], dead_letters=dead))
    assert [(r["id"], r["decision"]) for r in sink.results] == [("a", "block")]
    assert [d["offset"] for d in dead.results] == [1, 2]
    assert all(d["stage"] == "decode" for d in dead.results)


async def test_without_a_dead_letter_sink_they_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = ListSource([payload(0), b"garbage"])
    sink = ListSink()
    with caplog.at_level("WARNING", logger="rtinfer.pipeline"):
        summary = await run_with_safety(Pipeline(source, scoring_stages(), [sink]))
    assert summary.dead_letters == 1
    assert "dead letter" in caplog.text
    assert "garbage" in caplog.text
    assert len(source.acked) == 2


# -- graceful stop and lifecycle -----------------------------------------------------------


async def test_stop_mid_stream_finishes_flushes_and_acknowledges_what_was_read() -> None:
    broker = Broker(default_partitions=1)
    publish(broker, 1000)
    states: list[Lifecycle] = []
    write_states: list[Lifecycle] = []
    gate = asyncio.Event()
    sink = RecordingSink("out", gate=gate)

    class Watch:
        name = "watch"

        async def start(self) -> None:
            states.append(pipeline.state)

        async def aclose(self) -> None:
            states.append(pipeline.state)

        def __call__(self, batch: Batch) -> Batch:
            return batch

    def on_write(events: Sequence[Event]) -> None:
        states.append(pipeline.state)
        write_states.append(pipeline.state)

    sink.on_write = on_write
    pipeline = Pipeline(
        BrokerSource(broker, TOPIC, group=GROUP),
        [Watch(), *scoring_stages()],
        [sink],
        read_size=10,
        max_in_flight=3,
        flush_interval=0.0,  # flush after every batch: the first flush holds the writer
    )
    assert state(pipeline) is Lifecycle.CREATED
    running = asyncio.create_task(pipeline.run())
    # The first flush blocks; meanwhile the reader fills its three slots, and stops there.
    await wait_until(lambda: pipeline.events_in == 40, "three batches in flight")
    for _ in range(50):
        await asyncio.sleep(0)
    assert pipeline.events_in == 40
    assert state(pipeline) is Lifecycle.RUNNING
    pipeline.stop()
    assert state(pipeline) is Lifecycle.DRAINING
    gate.set()
    summary = await asyncio.wait_for(running, SAFETY)

    assert state(pipeline) is Lifecycle.CLOSED
    assert summary.events_in == 40  # nothing was read after stop()...
    assert summary.events_out == 40  # ...everything read was written...
    assert len(sink.flushed) == 40  # ...flushed...
    assert broker.committed(GROUP, TOPIC) == [40]  # ...and acknowledged
    assert ids(sink.results) == [f"e{i}" for i in range(40)]
    # Batches in flight when stop() was called were written while draining.
    assert write_states == [Lifecycle.RUNNING] + [Lifecycle.DRAINING] * 3
    # The lifecycle moved forward only, through every state.
    seen = [s for i, s in enumerate(states) if i == 0 or states[i - 1] is not s]
    assert seen == [Lifecycle.STARTING, Lifecycle.RUNNING, Lifecycle.DRAINING]
    assert not pipeline.ready.is_set()

    with pytest.raises(RtinferError, match="run it only once"):
        await pipeline.run()


async def test_stop_while_waiting_for_events_returns_at_once() -> None:
    broker = Broker()
    broker.create_topic(TOPIC)
    sink = ListSink()
    pipeline = Pipeline(BrokerSource(broker, TOPIC, group=GROUP), scoring_stages(), [sink])
    running = asyncio.create_task(pipeline.run())
    await asyncio.wait_for(pipeline.ready.wait(), SAFETY)
    assert state(pipeline) is Lifecycle.RUNNING
    for _ in range(10):
        await asyncio.sleep(0)
    pipeline.stop()
    summary = await asyncio.wait_for(running, SAFETY)
    assert summary.events_in == 0
    broker.publish(TOPIC, payload(0))
    for _ in range(10):
        await asyncio.sleep(0)
    assert sink.results == []
    assert state(pipeline) is Lifecycle.CLOSED


async def test_stop_before_run_reads_nothing() -> None:
    source = ListSource([payload(0)])
    pipeline = Pipeline(source, scoring_stages(), [ListSink()])
    pipeline.stop()
    summary = await run_with_safety(pipeline)
    assert summary.events_in == 0
    assert source.acked == []


async def test_a_failed_start_closes_what_was_started() -> None:
    class BadSink(RecordingSink):
        async def start(self) -> None:
            raise OSError("disk full")

    good = RecordingSink("good")
    source = ListSource([payload(0)])
    pipeline = Pipeline(source, scoring_stages(), [good, BadSink("bad")])
    with pytest.raises(OSError, match="disk full"):
        await run_with_safety(pipeline)
    assert good.closed
    assert not source.closed  # never started, so never closed
    assert state(pipeline) is Lifecycle.CLOSED


def test_invalid_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="read_size"):
        Pipeline(ListSource([]), [], [], read_size=0)
    with pytest.raises(ValueError, match="max_in_flight"):
        Pipeline(ListSource([]), [], [], max_in_flight=0)


# -- summary -------------------------------------------------------------------------------


async def test_the_summary_counts_and_measures_the_run() -> None:
    values = [payload(i, x=0.1) for i in range(50)] + [b"{}", b"nope"]
    source = ListSource(values)
    pipeline = Pipeline(
        source, scoring_stages(), [ListSink()], dead_letters=ListSink(), read_size=8
    )
    observed: list[int] = []
    pipeline.observe(lambda batch: observed.append(len(batch.events) + len(batch.dead)))
    summary = await run_with_safety(pipeline)
    assert (summary.events_in, summary.events_out, summary.dead_letters) == (52, 50, 2)
    assert sum(observed) == 52
    doc = summary.as_dict()
    assert set(doc) == {
        "events_in",
        "events_out",
        "dead_letters",
        "skipped",
        "duration_s",
        "throughput_eps",
        "latency_ms",
        "batch_size_mean",
    }
    assert set(doc["latency_ms"]) == {"p50", "p99", "p999", "max"}
    latency = doc["latency_ms"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["p999"] <= latency["max"]
    assert summary.latency.count == 50
    assert doc["skipped"] == 0
    assert doc["batch_size_mean"] > 0
    assert doc["throughput_eps"] > 0
    assert doc["duration_s"] >= 0
    assert (
        pipeline.metrics.registry.get_sample_value(
            "rtinfer_events_out_total", {"pipeline": "pipeline"}
        )
        == 50
    )


async def test_a_pipeline_without_a_model_runs_python_stages_only() -> None:
    def label(batch: Batch) -> Batch:
        for event in batch.events:
            event.result = {"id": event.id, "n": len(event.value)}
        return batch

    sink = ListSink()
    source = ListSource([b'{"id": "a"}', b'{"id": "bb"}'])
    summary = await run_with_safety(Pipeline(source, [Decode(), label], [sink]))
    assert sink.results == [{"id": "a", "n": 11}, {"id": "bb", "n": 12}]
    assert summary.batch_size_mean == 0.0


async def test_outputs_stage_passes_every_model_output_through() -> None:
    batcher = MicroBatcher(python_model(), max_batch_size=4, max_delay=0)
    sink = ListSink()
    source = ListSource([payload(0, x=0.25)])
    stages: list[Stage] = [
        Decode(Reading),
        Vectorize(["x", "y"]),
        Predict(batcher),
        Outputs(model_version="v9"),
    ]
    await run_with_safety(Pipeline(source, stages, [sink]))
    assert sink.results == [{"id": "e0", "model_version": "v9", "probabilities": [0.75, 0.25]}]
