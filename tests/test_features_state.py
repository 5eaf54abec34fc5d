"""Feature state that survives restarts: stores, kill -9 mid-stream, bounded memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import SAFETY, service_missing
from features_helpers import DEFINITION, payments, write_jsonl
from rtinfer.features import FeatureStage, FileStore, RedisStore, backfill
from rtinfer.features.backfill import read_events
from rtinfer.features.state import Frame, encode_frame
from rtinfer.types import Batch, Event, Position

NAMES = [f["name"] for f in DEFINITION["features"]]

SCRIPT = """
import asyncio, json, sys, time
from rtinfer.features import FeatureStage
from rtinfer.pipeline import Pipeline
from rtinfer.sinks.file import JsonLinesSink
from rtinfer.sources.file import JsonLinesSource
from rtinfer.stages import Decode

events, out, checkpoint, store, definition = sys.argv[1:]

def slow(batch):  # so that the parent can kill the run mid-stream
    time.sleep(0.004)
    return batch

async def main():
    pipeline = Pipeline(
        JsonLinesSource(events, checkpoint=checkpoint),
        [Decode(None), FeatureStage(json.loads(definition), emit="result", store=store), slow],
        [JsonLinesSink(out)],
        read_size=20,
        flush_interval=0.005,
    )
    await pipeline.run()

asyncio.run(main())
"""


def redis_url() -> str:
    try:
        import redis
    except ImportError:
        service_missing("the redis extra is not installed")
    url = "redis://127.0.0.1:6379/0"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except Exception as exc:
        service_missing(f"no Redis at {url}: {exc}")
    return url


def start(
    tmp_path: Path, events: Path, store: str, definition: dict[str, Any]
) -> subprocess.Popen[bytes]:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    args = [str(events), str(tmp_path / "out.jsonl"), str(tmp_path / "checkpoint"), store]
    return subprocess.Popen([sys.executable, str(script), *args, json.dumps(definition)])


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_kill_9_mid_stream_then_restart_gives_the_uninterrupted_windows(
    tmp_path: Path, kind: str
) -> None:
    definition = {**DEFINITION, "name": f"kill{os.getpid()}"}
    if kind == "redis":
        store = redis_url()
        RedisStore(store).clear(f"{definition['name']}.file://{tmp_path / 'events.jsonl'}.0")
    else:
        store = str(tmp_path / "state")
    records = payments(6000, seed=21)
    events = write_jsonl(tmp_path / "events.jsonl", records)
    out = tmp_path / "out.jsonl"
    run = start(tmp_path, events, store, definition)
    deadline = time.monotonic() + 6 * SAFETY
    while lines(out) < 1500 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    assert run.wait(SAFETY) == -signal.SIGKILL  # killed, not finished
    written = lines(out)
    assert 1500 <= written < 5000  # mid-stream
    run = start(tmp_path, events, store, definition)
    assert run.wait(6 * SAFETY) == 0

    # The uninterrupted values: the offline path, which the other tests prove equal to an
    # uninterrupted online run.
    backfill(definition, events, tmp_path / "expected.jsonl")
    expected = {r["id"]: [r[n] for n in NAMES] for r in read_events(tmp_path / "expected.jsonl")}
    got: dict[str, list[list[float]]] = {}
    for row in read_events(out):
        got.setdefault(row["id"], []).append([row[n] for n in NAMES])
    assert set(got) == set(expected)  # nothing lost, no late event let in
    for event_id, rows in got.items():
        for row in rows:  # a result written twice (at least once) has the same values
            assert row == expected[event_id], event_id


def batch(records: list[dict[str, Any]], start: int) -> Batch:
    return Batch(
        [
            Event(b"{}", ingest_time=0.0, data=r, id=r["id"], position=Position("s", 0, start + i))
            for i, r in enumerate(records)
        ]
    )


def values(b: Batch) -> list[list[float]]:
    assert b.inputs is not None
    return b.inputs["features"].tolist()  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", ["file", "redis"])
async def test_only_acknowledged_state_is_restored_and_replays_are_skipped(
    tmp_path: Path, kind: str
) -> None:
    definition = {**DEFINITION, "name": f"ack{os.getpid()}"}
    store: Any = str(tmp_path / "state") if kind == "file" else redis_url()
    if kind == "redis":
        RedisStore(store).clear(f"{definition['name']}.s.0")
    records = payments(300, seed=4)
    chunks = [records[i : i + 50] for i in range(0, 300, 50)]
    reference = FeatureStage(definition, dtype="float64")
    expected = [values(reference(batch(c, 50 * i))) for i, c in enumerate(chunks)]

    first = FeatureStage(definition, dtype="float64", store=store)
    for i in range(4):
        assert values(first(batch(chunks[i], 50 * i))) == expected[i]
    await first.checkpoint([Position("s", 0, o) for o in range(100)])  # batches 0, 1 acked
    await first.aclose()

    second = FeatureStage(definition, dtype="float64", store=store)  # a restart
    # The source redelivers from 100: batches 2 and 3 were not acknowledged, so their
    # events are applied again, once; the values are those of the uninterrupted run.
    for i in range(2, 6):
        assert values(second(batch(chunks[i], 50 * i))) == expected[i]
    await second.checkpoint([Position("s", 0, o) for o in range(300)])
    await second.aclose()

    third = FeatureStage(definition, dtype="float64", store=store)
    replay = batch(chunks[5], 250)  # delivered again after a crash before the ack
    third(replay)
    assert not replay.events
    assert not replay.dead
    assert third.skipped == 50
    more = payments(350, seed=4)[300:]
    again = FeatureStage(definition, dtype="float64")
    for i, c in enumerate(chunks):
        again(batch(c, 50 * i))
    assert values(third(batch(more, 300))) == values(again(batch(more, 300)))
    await third.aclose()


def test_file_store_ignores_a_torn_tail_and_compacts(tmp_path: Path) -> None:
    store = FileStore(tmp_path, compact_min_bytes=200)
    frames = [Frame(float(i), i, [(f"k{i % 3}", [[i], [float(i)]])], []) for i in range(40)]
    store.commit("ns", [encode_frame(f) for f in frames[:30]])
    store.commit("ns", [encode_frame(Frame(30.0, 30, [], ["k0"]))])
    size = store.path("ns").stat().st_size
    assert size < 40 * 20  # compacted along the way
    with store.path("ns").open("ab") as file:
        file.write(b"\x50\x00\x00\x00\x01\x02")  # a frame torn by a crash
    loaded = FileStore(tmp_path).load("ns")
    assert loaded is not None
    assert loaded.applied == 30
    assert loaded.max_time == 30.0
    assert dict(loaded.set) == {"k1": [[28], [28.0]], "k2": [[29], [29.0]]}
    assert loaded.deleted == ["k0"]
    assert store.path("ns").stat().st_size == size  # the torn tail was cut off


def test_a_million_keys_stay_bounded_by_eviction() -> None:
    definition = {
        "name": "many",
        "key": "k",
        "time": "t",
        "time_unit": "ms",
        "out_of_orderness": "1s",
        "features": [
            {"name": "n", "agg": "count", "window": {"sliding": "5s"}},
            {"name": "s", "agg": "sum", "field": "x", "window": {"sliding": "5s"}},
            {"name": "hi", "agg": "max", "field": "x", "window": {"tumbling": "2s"}},
        ],
    }
    stage = FeatureStage(definition)
    largest = 0
    size = 4096
    for start in range(0, 1_000_000, size):
        # Every event a new key, one per millisecond: a key is idle after its first event.
        events = [
            Event(b"", ingest_time=0.0, data={"k": i, "t": i, "x": 1.0},
                  position=Position("s", 0, i))
            for i in range(start, min(start + size, 1_000_000))
        ]  # fmt: skip
        b = stage(Batch(events))
        assert b.inputs is not None
        assert b.inputs["features"][:, 0].max() == 1.0
        largest = max(largest, len(stage))
    assert stage.evicted > 990_000
    # At most the keys of the last 5 s + 1 s of event time, plus one batch: never 1,000,000.
    assert largest <= 6_000 + size
