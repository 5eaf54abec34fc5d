"""The Kafka source's delivery count (``max_deliveries``), against a real broker (tansu).

Kafka counts no deliveries; the source counts the starts of a partition at one committed
offset that ended without it being acknowledged. A worker "crashes" here by closing its
source with events handed out and not acknowledged: what a kill leaves behind in the
group (nothing committed past them, the start never recorded as clean). The last test
kills real worker processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

import kafka_broker
from conftest import SAFETY
from rtinfer.types import DEAD_REASON_HEADER, Event
from test_kafka import (
    committed,
    consume_all,
    positions,
    produce,
    source,
    topic,
    wait_committed,
)

kafka = kafka_broker.kafka
__all__ = ["topic"]  # the fixture, used by name


def unique(label: str) -> str:
    return f"rtinfer-test-{label}-{uuid.uuid4().hex[:10]}"


def offsets(events: list[Event]) -> list[int]:
    out = []
    for event in events:
        assert event.position is not None
        assert isinstance(event.position.offset, int)
        out.append(event.position.offset)
    return out


async def run_until_crash(src: Any, poison: int, end: int) -> tuple[list[list[int]], Event | None]:
    """Play a worker: read, acknowledge every batch without ``poison``, and "crash" (close
    without acknowledging) on the batch that holds it, unless it comes marked dead, which
    the worker acknowledges as the pipeline does after dead-lettering it. Returns the
    batches read (offsets) and the dead event; stops after offset ``end - 1``."""
    await src.start()
    batches: list[list[int]] = []
    dead = None
    try:
        while True:
            events = await asyncio.wait_for(src.read(100), SAFETY)
            batches.append(offsets(events))
            for event in events:
                if event.headers and DEAD_REASON_HEADER in event.headers:
                    dead = event
            if poison in batches[-1] and dead is None:
                return batches, None  # the crash: nothing of this batch acknowledged
            await src.ack(positions(events))
            if batches[-1][-1] >= end - 1:
                return batches, dead
    finally:
        await src.aclose()


async def test_a_poison_event_is_dead_lettered_after_max_deliveries_alone(
    kafka: str, topic: Any
) -> None:
    name, group, counts = topic("in"), unique("group"), unique("deliveries")
    produce(kafka, name, [{"value": b"v%d" % i} for i in range(12)])

    def worker() -> Any:
        return source(kafka, name, group, max_deliveries=2, deliveries_topic=counts,
                      careful_events=5)  # fmt: skip

    # 1st start: as usual, one batch; it holds the poison (offset 3): crash.
    batches, dead = await run_until_crash(worker(), poison=3, end=12)
    flat = [o for b in batches for o in b]
    assert flat == list(range(len(flat)))
    assert 3 in batches[-1]
    # 2nd start at the same offset: careful, one event at a time; 0-2 pass, 3 crashes.
    batches, dead = await run_until_crash(worker(), poison=3, end=12)
    assert batches == [[0], [1], [2], [3]]
    assert dead is None
    assert committed(kafka, group, name, 1) == {0: 3}  # each careful event was committed
    # 3rd: starts at 3, the poison alone again: crash (alone once so far, max is 2).
    batches, dead = await run_until_crash(worker(), poison=3, end=12)
    assert batches == [[3]]
    # 4th: it was alone in two unclean starts: it comes out dead, the rest goes on,
    # one at a time up to the careful window's end (3 + 5), then as usual.
    batches, dead = await run_until_crash(worker(), poison=3, end=12)
    assert dead is not None
    assert offsets([dead]) == [3]
    assert dead.headers is not None
    reason = dead.headers[DEAD_REASON_HEADER].decode()
    assert "max_deliveries is 2" in reason
    assert "alone in 2 starts" in reason
    assert batches[:5] == [[3], [4], [5], [6], [7]]
    assert [o for b in batches[5:] for o in b] == [8, 9, 10, 11]
    await wait_committed(kafka, group, name, {0: 12})

    records = consume_all(kafka, counts, 1, 1)  # the counts topic holds the records
    assert json.loads(records[0].key() or b"") == [group, name, 0]


async def test_clean_exits_and_progress_keep_the_next_start_as_usual(
    kafka: str, topic: Any
) -> None:
    name, group, counts = topic("in"), unique("group"), unique("deliveries")

    def worker() -> Any:
        return source(kafka, name, group, max_deliveries=1, deliveries_topic=counts)

    # A reads and acknowledges everything, and closes: a clean exit, recorded as such.
    produce(kafka, name, [{"value": b"a%d" % i} for i in range(10)])
    a = worker()
    batches, _ = await run_until_crash(a, poison=-1, end=10)
    assert [o for b in batches for o in b] == list(range(10))
    records = consume_all(kafka, counts, 1, 2)
    assert [json.loads(r.value() or b"") for r in records] == [
        {"offset": 0, "starts": 1, "careful": False, "alone": 0},  # A's start
        {"offset": 10, "starts": 0, "careful": False, "alone": 0},  # A's clean exit
    ]
    # B starts at 10, acknowledges 10-14 and crashes with 15-19 in flight: progress was
    # made since its start, so the next start is not careful.
    produce(kafka, name, [{"value": b"b%d" % i} for i in range(10)])
    b = worker()
    await b.start()
    try:
        events = []
        while len(events) < 10:
            events += await asyncio.wait_for(b.read(100), SAFETY)
        assert offsets(events) == list(range(10, 20))
        await b.ack(positions(events[:5]))
        await wait_committed(kafka, group, name, {0: 15})
    finally:
        await b.aclose()  # 15-19 handed out, not acknowledged: an unclean exit
    c = worker()
    batches, dead = await run_until_crash(c, poison=-1, end=20)
    assert dead is None
    assert [o for b in batches for o in b] == list(range(15, 20))
    assert max(len(b) for b in batches) > 1  # as usual: not one at a time


POISON_STAGE = '''
import os
import signal


class KillOnPoison:
    """Kills its own process (SIGKILL, as a crash in native code would) on id "poison"."""

    name = "kill_on_poison"

    def __call__(self, batch):
        for event in batch.events:
            if event.data.id == "poison":
                os.kill(os.getpid(), signal.SIGKILL)
        return batch
'''


async def test_an_event_that_kills_the_worker_ends_in_the_dead_letters(
    kafka: str, topic: Any, tmp_path: Path, model_file: Path
) -> None:
    """Real processes, killed by the event: the group's next worker (here: the same
    command, started again) dead-letters it after max_deliveries, and loses nothing."""
    source_topic, out, dead = topic("in"), topic("out"), topic("dead")
    group = unique("group")
    (tmp_path / "poison_stage.py").write_text(POISON_STAGE)
    pipeline = tmp_path / "pipeline.yaml"
    consumer = json.dumps(kafka_broker.FAST_CONSUMER)
    pipeline.write_text(
        f"""
name: crashes
source:
  type: kafka
  bootstrap_servers: "{kafka}"
  topics: {source_topic}
  group: {group}
  max_deliveries: 2
  careful_events: 64  # past the poison, whatever the first start had read
  deliveries_topic: rtinfer-test-deliveries-{group}
  config: {consumer}
decode: {{fields: {{id: str, x: float, y: float}}}}
stages:
  - {{type: python, use: "poison_stage:KillOnPoison"}}
  - {{type: vectorize, fields: [x, y]}}
model: {{path: "{model_file}"}}
sinks: [{{type: kafka, bootstrap_servers: "{kafka}", topic: {out}}}]
dead_letters: {{type: kafka, bootstrap_servers: "{kafka}", topic: {dead}}}
runtime: {{read_size: 8, max_in_flight: 2}}
"""
    )
    ids = [f"e{i}" for i in range(40)]
    ids[21] = "poison"
    payloads = [json.dumps({"id": i, "x": 0.5, "y": 1.0}).encode() for i in ids]
    produce(kafka, source_topic, [{"value": p} for p in payloads])
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "rtinfer", "run", str(pipeline), "--no-live"]
    log = tmp_path / "worker.log"
    codes = []
    for _ in range(8):  # a safety net: 4 or 5 starts are expected
        with log.open("ab") as stderr:
            worker = await asyncio.create_subprocess_exec(
                *command, env=env, stdout=subprocess.DEVNULL, stderr=stderr
            )
        try:
            dead_letters = await asyncio.to_thread(_wait_for_messages, kafka, dead, 1, worker)
            if dead_letters:  # then the rest comes out, before the worker is stopped
                expected = {i for i in ids if i != "poison"}
                outputs = await asyncio.to_thread(_ids_of_outputs, kafka, out, expected)
                break
            codes.append(await worker.wait())
        finally:
            if worker.returncode is None:
                worker.terminate()
                codes.append(await worker.wait())
    tail = log.read_text(errors="replace")[-3000:]
    # Killed by the poison: twice alone (max_deliveries), after one crash or more in a
    # batch (a run that acknowledged batches before it met the poison starts afresh,
    # closer to it: at most once per batch the pipeline holds in flight, here 2).
    kills = codes[:-1]
    assert set(kills) == {-9}, tail
    assert 3 <= len(kills) <= 2 + 1 + 2, tail
    assert codes[-1] == 0, tail  # then dead-lettered, and drained on SIGTERM
    (letter,) = dead_letters
    record = json.loads(letter.value() or b"")
    assert json.loads(record["value"])["id"] == "poison"
    assert record["offset"] == ids.index("poison")
    assert "max_deliveries is 2" in record["reason"]
    assert outputs == set(ids) - {"poison"}  # at least once: every other event came out


def _reader(kafka: str, name: str) -> Any:
    """A consumer of partition 0 of ``name`` from its start, in no group."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": kafka, "group.id": "checker",
                         "enable.auto.commit": False} | kafka_broker.FAST_CONSUMER)  # fmt: skip
    consumer.assign([TopicPartition(name, 0, OFFSET_BEGINNING)])
    return consumer


def _wait_for_messages(kafka: str, name: str, n: int, worker: Any) -> list[Any]:
    """The first ``n`` messages of ``name`` once they are there, or ``[]`` when ``worker``
    exits first (blocking: run in a thread)."""
    consumer = _reader(kafka, name)
    got: list[Any] = []
    try:
        for _ in range(int(SAFETY * 20)):  # a safety net counted in polls
            got += [m for m in consumer.consume(n - len(got), 0.05) if m.error() is None]
            if len(got) >= n:
                return got
            if worker.returncode is not None:
                return []
    finally:
        consumer.close()
    raise AssertionError(f"neither a message on {name} nor the worker's exit")


def _ids_of_outputs(kafka: str, name: str, expected: set[str]) -> set[str]:
    """The ids of the results on ``name`` once they include ``expected`` (blocking)."""
    consumer = _reader(kafka, name)
    got: set[str] = set()
    try:
        for _ in range(int(SAFETY * 20)):  # a safety net counted in polls
            for message in consumer.consume(100, 0.05):
                if message.error() is None:
                    got.add(json.loads(message.value() or b"")["id"])
            if got >= expected:
                return got
    finally:
        consumer.close()
    raise AssertionError(f"missing results: {sorted(expected - got)}")


def test_max_deliveries_is_refused_with_exactly_once() -> None:
    pytest.importorskip("confluent_kafka")
    from rtinfer.exceptions import ConfigError
    from rtinfer.sinks.kafka import KafkaSink
    from rtinfer.sources.kafka import KafkaSource

    src = KafkaSource("k:9092", "t", max_deliveries=3)
    with pytest.raises(ConfigError, match="exactly-once"):
        src.commit_with(KafkaSink("k:9092", "out", transactional_id="tx"))
