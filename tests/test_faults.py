"""Fault injection: real ``rtinfer run`` workers on a real Redis, killed, stopped, cut off from
Redis, fed poison and slowed down, and what came out counted.

Every test runs the same pipeline (a Redis stream → decode → vectorize → the ONNX
``model_file`` → a Redis stream, dead letters to a third stream), publishes events with
ids ``e0..eN`` and reports two figures from the output stream:

- **lost**: input ids with no output record;
- **duplicated**: output records minus unique ids (at-least-once allows some after a crash).

Waits are hang guards only (``faults_helpers.SAFETY``); no test asserts a duration. A run
is over when the consumer group has read the whole stream and nothing is pending (Redis 7's
``XINFO GROUPS`` lag and pending both 0): every entry was then written and flushed before
it was acknowledged.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from conftest import payload, service_missing
from faults_helpers import (
    GROUP,
    POLL,
    REDIS_URL,
    RedisServer,
    Worker,
    create_group,
    group_done,
    lost_and_duplicated,
    output_ids,
    pending_of,
    publish,
    read_stream,
    redis_or_skip,
    stream_names,
    wait_for,
    wait_for_consumers,
    write_pipeline,
)
from rtinfer.batching import MicroBatcher
from rtinfer.models import load_model
from rtinfer.pipeline import Pipeline
from rtinfer.sinks.redis import RedisStreamSink
from rtinfer.sources.redis import RedisStreamSource
from rtinfer.stages import Decode, Outputs, Predict, Vectorize
from rtinfer.types import Event


def entries(n: int) -> list[dict[str, bytes]]:
    """``n`` keyed events ``e0..e{n-1}`` as stream entries (payload and key fields)."""
    made = []
    for i in range(n):
        key = f"k{i % 97}"
        made.append({"value": payload(i, key=key, x=(i % 4) / 4), "key": key.encode()})
    return made


def consumer(number: int) -> str:
    """The Redis consumer name of ``RTINFER_WORKER=number`` on this host."""
    return f"{socket.gethostname()}-{number}"


async def cleanup(client: Any, workers: Sequence[Worker], *streams: str) -> None:
    for worker in workers:
        await worker.cleanup()
    await client.delete(*streams)
    await client.aclose()


# -- 1. kill -9 ---------------------------------------------------------------------------

KILL_EVENTS = 100_000
KILL_AT = 30_000  # output records when worker 0 is killed


async def test_kill_9_one_of_two_workers_loses_nothing(tmp_path: Path, model_file: Path) -> None:
    """SIGKILL one of two workers of a group in the middle of 100,000 keyed events: the
    survivor claims the dead worker's pending entries (XAUTOCLAIM after claim_idle_ms) and
    finishes. Nothing is lost; duplicates (written, not yet acknowledged) are allowed."""
    client = await redis_or_skip()
    stream, out, dead = stream_names("kill")
    path = write_pipeline(tmp_path / "p.yaml", model_file, url=REDIS_URL, stream=stream,
                          out=out, dead=dead, claim_idle_ms=1000)  # fmt: skip
    workers = [Worker(path, i, tmp_path / f"worker-{i}.log") for i in range(2)]
    try:
        began = time.perf_counter()
        await create_group(client, stream)
        for worker in workers:
            await worker.start()
        await wait_for_consumers(client, stream, 2, workers)
        publisher = asyncio.create_task(publish(client, stream, entries(KILL_EVENTS)))

        async def midway() -> bool:
            return bool(await client.xlen(out) >= KILL_AT)

        await wait_for(midway, workers, f"{KILL_AT} output records")
        assert await workers[0].stop(signal.SIGKILL) == -signal.SIGKILL
        written_at_kill = await client.xlen(out)
        left = (await pending_of(client, stream)).get(consumer(0), 0)
        await publisher

        async def done() -> bool:
            return await group_done(client, stream, KILL_EVENTS)

        await wait_for(done, workers[1:], "the survivor to finish the stream")
        assert await workers[1].stop() == 0, workers[1].stderr()
        got = await output_ids(client, out)
        lost, duplicated = lost_and_duplicated((f"e{i}" for i in range(KILL_EVENTS)), got)
        print(f"\nkill -9: worker 0 killed at {written_at_kill} output records with {left} "
              f"entries pending; lost={len(lost)} duplicated={duplicated} "
              f"({time.perf_counter() - began:.1f} s)")  # fmt: skip
        assert not lost, f"lost {len(lost)}: {sorted(lost)[:10]}"
        assert await client.xlen(dead) == 0
        assert await pending_of(client, stream) == {}  # worker 0's entries were claimed
    finally:
        await cleanup(client, workers, stream, out, dead)


# -- 2. SIGTERM ---------------------------------------------------------------------------

TERM_EVENTS = 20_000


async def test_sigterm_drains_and_a_restart_finishes_without_loss_or_duplicates(
    tmp_path: Path, model_file: Path
) -> None:
    """SIGTERM mid-stream: the worker finishes what it read, flushes, acknowledges and exits
    0; started again under the same RTINFER_WORKER it re-reads its own pending entries (a
    read cut short by the signal) and finishes the rest. Nothing lost, nothing repeated."""
    client = await redis_or_skip()
    stream, out, dead = stream_names("term")
    path = write_pipeline(tmp_path / "p.yaml", model_file, url=REDIS_URL, stream=stream,
                          out=out, dead=dead, claim_idle_ms=30_000)  # fmt: skip
    worker = Worker(path, 0, tmp_path / "worker.log")
    try:
        began = time.perf_counter()
        await create_group(client, stream)
        await publish(client, stream, entries(TERM_EVENTS))
        await worker.start()

        async def midway() -> bool:
            return bool(await client.xlen(out) >= TERM_EVENTS // 4)

        await wait_for(midway, [worker], "a quarter of the output")
        assert await worker.stop(signal.SIGTERM) == 0, worker.stderr()
        written_at_stop = await client.xlen(out)
        pending_at_stop = (await pending_of(client, stream)).get(consumer(0), 0)
        await worker.start()

        async def done() -> bool:
            return await group_done(client, stream, TERM_EVENTS)

        await wait_for(done, [worker], "the restarted worker to finish the stream")
        assert await worker.stop(signal.SIGTERM) == 0, worker.stderr()
        got = await output_ids(client, out)
        lost, duplicated = lost_and_duplicated((f"e{i}" for i in range(TERM_EVENTS)), got)
        print(f"\nSIGTERM: stopped at {written_at_stop} output records with {pending_at_stop} "
              f"entries pending; lost={len(lost)} duplicated={duplicated} "
              f"({time.perf_counter() - began:.1f} s)")  # fmt: skip
        assert 0 < written_at_stop < TERM_EVENTS  # it really stopped mid-stream
        assert not lost, f"lost {len(lost)}: {sorted(lost)[:10]}"
        assert duplicated == 0
    finally:
        await cleanup(client, [worker], stream, out, dead)


# -- 3. Redis restarted -------------------------------------------------------------------

OUTAGE_EVENTS = 20_000


def last_error(worker: Worker) -> str:
    """The last exception line of the worker's stderr (what killed it)."""
    lines = [line for line in worker.stderr().splitlines() if "Error" in line.split(":")[0]]
    return lines[-1] if lines else "no exception in its stderr"


async def test_a_redis_restart_mid_stream_loses_nothing(tmp_path: Path, model_file: Path) -> None:
    """A private Redis (AOF, fsync always) is shut down mid-stream and started again on the
    same port and folder. The worker rides out the outage (the connector retries for
    ``reconnect_timeout_s``) and nothing is lost."""
    client = await redis_or_skip()  # skips without redis-py or a Redis (CI has both)
    await client.aclose()
    import redis.asyncio as redis

    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder)
    try:
        await server.start()
    except FileNotFoundError:
        service_missing("no redis-server binary to run a private Redis with")
    client = redis.Redis.from_url(server.url)
    stream, out, dead = stream_names("outage")
    path = write_pipeline(tmp_path / "p.yaml", model_file, url=server.url, stream=stream,
                          out=out, dead=dead, claim_idle_ms=30_000)  # fmt: skip
    worker = Worker(path, 0, tmp_path / "worker.log", url=server.url)
    try:
        began = time.perf_counter()
        await create_group(client, stream)
        await publish(client, stream, entries(OUTAGE_EVENTS))
        await worker.start()

        async def midway() -> bool:
            return bool(await client.xlen(out) >= OUTAGE_EVENTS // 4)

        await wait_for(midway, [worker], "a quarter of the output")
        written_at_outage = await client.xlen(out)
        await server.shutdown()
        await asyncio.sleep(0.3)
        await server.start()

        async def done() -> bool:
            try:
                return await group_done(client, stream, OUTAGE_EVENTS)
            except redis.ConnectionError:  # this test's own client, cut off by the restart
                return False

        await wait_for(done, [worker], "the worker to finish the stream")
        if worker.running:
            assert await worker.stop(signal.SIGTERM) == 0, worker.stderr()
        got = await output_ids(client, out)
        lost, duplicated = lost_and_duplicated((f"e{i}" for i in range(OUTAGE_EVENTS)), got)
        outcome = (
            "the worker survived the outage"
            if worker.starts == 1
            else f"the worker died (exit {worker.exit_codes[:-1]}: {last_error(worker)}) and "
            f"was restarted {worker.starts - 1} time(s)"
        )
        print(f"\nRedis restart at {written_at_outage} output records: {outcome}; "
              f"lost={len(lost)} duplicated={duplicated} "
              f"({time.perf_counter() - began:.1f} s)")  # fmt: skip
        assert written_at_outage < OUTAGE_EVENTS  # Redis went away mid-stream
        assert worker.starts == 1, f"the worker died in the outage:\n{worker.stderr()}"
        assert not lost, f"lost {len(lost)}: {sorted(lost)[:10]}\n{worker.stderr()}"
    finally:
        await worker.cleanup()
        await client.aclose()
        await server.cleanup()


# -- 4. poison ----------------------------------------------------------------------------

POISON_EVENTS = 20_000
POISON_EVERY = 1_000  # 20 poison events, 0.1%: one in each thousand, at varying places


def poison(i: int, kind: int) -> bytes:
    """Five kinds of poison, each dead-lettered by a different stage or for another reason."""
    return [
        b"\xff\xfe{ not json",  # undecodable (and not UTF-8: the record holds base64)
        b'{"id": "e%d", "x": "high", "y": 0.5}' % i,  # a string where x must be a number
        b'{"id": "e%d", "x": 1e999, "y": 0.5}' % i,  # out of float64's range
        b'{"id": "e%d", "x": 0.5}' % i,  # missing field y
        b'{"id": "e%d", "x": 1e300, "y": 0.5}' % i,  # a float64, infinity as float32
    ][kind]


async def test_poison_events_are_dead_lettered_and_no_good_event_is_lost(
    tmp_path: Path, model_file: Path
) -> None:
    """0.1% poison spread over 20,000 events: each is in the dead-letter stream, named by
    its id (or, when it never decoded, by its position ``redis://<stream>/0/<entry id>``)
    with a reason; every good event is in the output, once."""
    client = await redis_or_skip()
    stream, out, dead = stream_names("poison")
    path = write_pipeline(tmp_path / "p.yaml", model_file, url=REDIS_URL, stream=stream,
                          out=out, dead=dead, claim_idle_ms=30_000)  # fmt: skip
    worker = Worker(path, 0, tmp_path / "worker.log")
    made = entries(POISON_EVENTS)
    bad = {k * POISON_EVERY + (k * 379) % POISON_EVERY: k % 5 for k in range(20)}
    for i, kind in bad.items():
        made[i] = {"value": poison(i, kind), "key": made[i]["key"]}
    try:
        began = time.perf_counter()
        await create_group(client, stream)
        entry_ids = await publish(client, stream, made)
        await worker.start()

        async def done() -> bool:
            return await group_done(client, stream, POISON_EVENTS)

        await wait_for(done, [worker], "the worker to finish the stream")
        assert await worker.stop(signal.SIGTERM) == 0, worker.stderr()
        good = [f"e{i}" for i in range(POISON_EVENTS) if i not in bad]
        got = await output_ids(client, out)
        lost, duplicated = lost_and_duplicated(good, got)
        letters = [msgspec.json.decode(f[b"value"]) for f in await read_stream(client, dead)]
        by_id = {letter["id"]: letter for letter in letters}
        expected = {
            (f"e{i}" if kind == 4 else f"redis://{stream}/0/{entry_ids[i]}"): kind
            for i, kind in bad.items()
        }
        missing = set(expected) - set(by_id)
        print(f"\npoison: {len(bad)} poison, {len(letters)} dead letters, "
              f"missing dead letters={len(missing)}; good lost={len(lost)} "
              f"duplicated={duplicated} ({time.perf_counter() - began:.1f} s)")  # fmt: skip
        for letter in sorted(letters, key=lambda d: str(d["offset"])):
            print(f"  {letter['id']} [{letter['stage']}] {letter['reason']}")
        assert not lost, f"good events lost: {sorted(lost)[:10]}"
        assert duplicated == 0
        assert not missing, f"poison not dead-lettered: {sorted(missing)}"
        assert len(letters) == len(bad)  # each once, and no good event among them
        assert not {f"e{i}" for i in bad} & set(got)  # no poison in the output
        stages = {0: "decode", 1: "decode", 2: "decode", 3: "decode", 4: "model"}
        for event_id, kind in expected.items():
            letter = by_id[event_id]
            assert letter["reason"], letter
            assert letter["stage"] == stages[kind], letter
            assert letter["source"] == f"redis://{stream}"
        undecodable = by_id[f"redis://{stream}/0/{entry_ids[min(bad)]}"]
        assert undecodable["value_encoding"] == "base64"
    finally:
        await cleanup(client, [worker], stream, out, dead)


# -- 5. slow sink -------------------------------------------------------------------------

SLOW_EVENTS = 20_000
RSS_BOUND = 200 * 2**20  # bytes of growth allowed: generous, a leak of the stream would show


class SlowSink:
    """A Redis stream sink whose every flush first sleeps ``delay`` seconds."""

    def __init__(self, inner: RedisStreamSink, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.name = "slow"
        self.flushes = 0

    async def start(self) -> None:
        await self.inner.start()

    async def write(self, events: Sequence[Event]) -> None:
        await self.inner.write(events)

    async def flush(self) -> None:
        await asyncio.sleep(self.delay)
        await self.inner.flush()
        self.flushes += 1

    async def aclose(self) -> None:
        await self.inner.aclose()


def rss() -> int:
    """This process's resident set size, in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_a_slow_sink_keeps_memory_bounded_and_loses_nothing(model_file: Path) -> None:
    """A sink that sleeps 20 ms per flush, 20,000 events already waiting: the pipeline never
    holds more than read_size * max_in_flight events between source and sinks, the
    process does not grow, and every event comes out."""
    client = await redis_or_skip()
    stream, out, dead = stream_names("slow")
    read_size, max_in_flight = 256, 4
    batcher = MicroBatcher(
        load_model(model_file), max_batch_size=256, max_delay=0.001, switch_interval=None
    )
    schema = msgspec.defstruct("Reading", [("id", str), ("x", float), ("y", float)])
    sink = SlowSink(RedisStreamSink(REDIS_URL, out), 0.02)
    pipeline = Pipeline(
        RedisStreamSource(REDIS_URL, stream, group=GROUP, consumer="slow-sink", block_ms=50),
        [Decode(schema), Vectorize(["x", "y"]), Predict(batcher), Outputs()],
        [sink],
        dead_letters=RedisStreamSink(REDIS_URL, dead),
        name="slow",
        read_size=read_size,
        max_in_flight=max_in_flight,
    )
    in_flight: list[int] = []
    sizes: list[int] = []
    try:
        began = time.perf_counter()
        await create_group(client, stream)
        await publish(client, stream, entries(SLOW_EVENTS))
        pipeline.observe(
            lambda _: (
                pipeline.stop()
                if pipeline.events_out + pipeline.dead_count >= SLOW_EVENTS
                else None
            )
        )
        before = rss()

        async def sample() -> None:
            while True:
                in_flight.append(pipeline.events_in - pipeline.events_out - pipeline.dead_count)
                sizes.append(rss())
                await asyncio.sleep(POLL / 4)

        sampler = asyncio.create_task(sample())
        try:
            summary = await asyncio.wait_for(pipeline.run(), 120)
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        got = await output_ids(client, out)
        lost, duplicated = lost_and_duplicated((f"e{i}" for i in range(SLOW_EVENTS)), got)
        growth = max(sizes) - before
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"\nslow sink: {sink.flushes} flushes, at most {max(in_flight)} events in flight "
              f"(bound {read_size * max_in_flight}), RSS {before / 2**20:.0f} MiB before, "
              f"{max(sizes) / 2**20:.0f} MiB at most (+{growth / 2**20:.1f} MiB; process peak "
              f"{peak / 2**20:.0f} MiB), {len(sizes)} samples; lost={len(lost)} "
              f"duplicated={duplicated} ({time.perf_counter() - began:.1f} s)")  # fmt: skip
        assert summary.events_out == SLOW_EVENTS
        assert max(in_flight) <= read_size * max_in_flight
        assert growth < RSS_BOUND
        assert not lost, f"lost {len(lost)}: {sorted(lost)[:10]}"
        assert duplicated == 0
        assert (await client.xpending(stream, GROUP))["pending"] == 0
    finally:
        await cleanup(client, [], stream, out, dead)
