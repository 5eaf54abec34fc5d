"""``rtinfer run --workers N``: N processes in one consumer group, against a real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import msgspec
import pytest

from conftest import payload, service_missing
from rtinfer.cli import main
from rtinfer.workers import merge_summaries

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def test_workers_need_a_broker_source(
    tmp_path: Path, model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        f"""
source: {{type: file, path: in.jsonl}}
decode: {{fields: {{id: str, x: float, y: float}}}}
stages: [{{type: vectorize, fields: [x, y]}}]
model: {{path: "{model_file}"}}
sinks: [{{type: stdout}}]
"""
    )
    assert main(["run", str(path), "--workers", "2"]) == 2
    assert "--workers needs a broker source" in capsys.readouterr().err


def test_merged_summaries_add_counts_and_keep_the_worst_latency() -> None:
    one = {"events_in": 10, "events_out": 9, "dead_letters": 1, "duration_s": 2.0,
           "throughput_eps": 5.0, "latency_ms": {"p50": 1, "p99": 5, "p999": 6, "max": 7},
           "batch_size_mean": 4.0}  # fmt: skip
    two = {**one, "events_in": 30, "events_out": 30, "dead_letters": 0, "duration_s": 3.0,
           "latency_ms": {"p50": 2, "p99": 4, "p999": 9, "max": 9}}  # fmt: skip
    merged = merge_summaries([one, two])
    assert (merged["events_in"], merged["events_out"], merged["dead_letters"]) == (40, 39, 1)
    assert merged["duration_s"] == 3.0
    assert merged["throughput_eps"] == pytest.approx(40 / 3, abs=0.1)
    assert merged["latency_ms"] == {"p50": 2, "p99": 5, "p999": 9, "max": 9}
    assert merged["workers"] == 2


async def test_two_workers_share_a_redis_stream_and_drain_on_sigterm(
    tmp_path: Path, model_file: Path
) -> None:
    redis = pytest.importorskip("redis.asyncio")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except OSError as exc:
        service_missing(f"no Redis at {REDIS_URL}: {exc}")
    name = uuid.uuid4().hex[:8]
    source, out = f"test-w-in-{name}", f"test-w-out-{name}"
    path = tmp_path / "p.yaml"
    path.write_text(
        f"""
name: workers
source: {{type: redis, url: "{REDIS_URL}", stream: {source}, group: g, block_ms: 50}}
decode: {{fields: {{id: str, x: float, y: float}}}}
stages: [{{type: vectorize, fields: [x, y]}}]
model: {{path: "{model_file}"}}
sinks: [{{type: redis, url: "{REDIS_URL}", stream: {out}}}]
runtime: {{read_size: 16}}
"""
    )
    summary_path = tmp_path / "summary.json"
    log = tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "rtinfer", "run", str(path), "--workers", "2"]
    command += ["--summary-json", str(summary_path)]
    with log.open("wb") as stderr:
        parent = await asyncio.create_subprocess_exec(
            *command, stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:
        # Wait for both workers to join the group, then feed it.
        for _ in range(600):
            groups = await client.xinfo_groups(source) if await client.exists(source) else []
            consumers = await client.xinfo_consumers(source, "g") if groups else []
            if len(consumers) == 2:
                break
            if not await client.exists(source):
                await client.xadd(source, {"value": payload(-1)})
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the two workers never joined the consumer group")
        for i in range(400):
            await client.xadd(source, {"value": payload(i)})
        for _ in range(600):
            if await client.xlen(out) >= 401:
                break
            await asyncio.sleep(0.05)
        parent.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(parent.wait(), 30) == 0, log.read_text()
        ids = {msgspec.json.decode(f[b"value"])["id"] for _, f in await client.xrange(out)}
        assert ids >= {f"e{i}" for i in range(400)}  # nothing lost
        summary = json.loads(summary_path.read_text())
        assert summary["workers"] == 2
        assert summary["events_out"] >= 401
        assert (await client.xpending(source, "g"))["pending"] == 0  # all acknowledged
        names = {c["name"] for c in await client.xinfo_consumers(source, "g")}
        assert len(names) == 2  # one stable consumer name per worker
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        await client.delete(source, out)
        await client.aclose()


async def test_two_workers_on_partitioned_redis_streams_keep_each_key_on_one_worker(
    tmp_path: Path, model_file: Path
) -> None:
    """``--workers 2`` with ``partitions: 4``: worker i reads partitions p % 2 == i, so every
    key's results come from one worker, in input order, and nothing is lost."""
    import zlib

    redis = pytest.importorskip("redis.asyncio")
    from rtinfer.sinks.redis import RedisStreamSink
    from rtinfer.types import Event

    client = redis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except OSError as exc:
        service_missing(f"no Redis at {REDIS_URL}: {exc}")
    name = uuid.uuid4().hex[:8]
    source, out = f"test-wp-in-{name}", f"test-wp-out-{name}"
    # Written before the workers start: their groups are created from the start ("0").
    producer = RedisStreamSink(REDIS_URL, source, partitions=4)
    await producer.start()
    events = []
    for i in range(400):
        event = Event(payload(i), key=b"k%d" % (i % 13), ingest_time=0.0)
        event.result = event.value
        events.append(event)
    await producer.write(events)
    await producer.flush()
    await producer.aclose()
    path = tmp_path / "p.yaml"
    path.write_text(
        f"""
name: partitioned
source: {{type: redis, url: "{REDIS_URL}", stream: {source}, group: g, block_ms: 50,
          partitions: 4}}
decode: {{fields: {{id: str, x: float, y: float}}}}
stages: [{{type: vectorize, fields: [x, y]}}]
model: {{path: "{model_file}"}}
sinks: [{{type: redis, url: "{REDIS_URL}", stream: "{out}-${{RTINFER_WORKER:-none}}"}}]
runtime: {{read_size: 16}}
"""
    )
    log = tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "rtinfer", "run", str(path), "--workers", "2"]
    with log.open("wb") as stderr:
        parent = await asyncio.create_subprocess_exec(
            *command, stdout=subprocess.DEVNULL, stderr=stderr
        )
    outs = [f"{out}-0", f"{out}-1"]
    try:
        for _ in range(600):
            if sum([await client.xlen(o) for o in outs]) >= 400:
                break
            await asyncio.sleep(0.05)
        parent.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(parent.wait(), 30) == 0, log.read_text()
        owner: dict[bytes, int] = {}
        seen: list[str] = []
        for worker, stream in enumerate(outs):
            entries = await client.xrange(stream)
            assert entries, f"worker {worker} wrote nothing"
            order: dict[bytes, list[int]] = {}
            for _, fields in entries:
                key = fields[b"key"]
                assert zlib.crc32(key) % 4 % 2 == worker  # its partitions only
                assert owner.setdefault(key, worker) == worker  # a key on one worker
                ident = msgspec.json.decode(fields[b"value"])["id"]
                seen.append(ident)
                order.setdefault(key, []).append(int(ident[1:]))
            assert all(v == sorted(v) for v in order.values())  # per-key input order
        assert sorted(seen) == sorted(f"e{i}" for i in range(400))  # nothing lost, no repeat
        for p in range(4):
            assert (await client.xpending(f"{source}.{p}", "g"))["pending"] == 0
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        await client.delete(*outs, *(f"{source}.{p}" for p in range(4)))
        await client.aclose()
