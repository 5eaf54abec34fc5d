"""Partitioned Redis streams: the sink spreads keys over ``<stream>.<p>``, sources split them.

Against a real Redis (``REDIS_URL``); every test uses streams of its own, deleted after it.
"""

from __future__ import annotations

import asyncio
import uuid
import zlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest

from conftest import REDIS_URL, SAFETY
from rtinfer.exceptions import ConfigError
from rtinfer.types import Event, Position

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from rtinfer.sources.redis import RedisStreamSource

P = 4


@pytest.fixture
async def stream(redis: Redis) -> AsyncIterator[str]:
    """A unique stream name; it and its partition streams are deleted after the test."""
    name = f"rtinfer-test-part-{uuid.uuid4().hex[:12]}"
    yield name
    keys = [k async for k in redis.scan_iter(match=f"{name}*")]
    if keys:
        await redis.delete(*keys)


def keyed_events(n: int, keys: int = 20) -> list[Event]:
    events = []
    for i in range(n):
        event = Event(b"v%d" % i, key=b"card-%d" % (i % keys), ingest_time=0.0)
        event.id = f"e{i}"
        event.result = event.value
        events.append(event)
    return events


async def publish(stream: str, events: list[Event]) -> None:
    from rtinfer.sinks.redis import RedisStreamSink

    sink = RedisStreamSink(REDIS_URL, stream, partitions=P)
    await sink.start()
    try:
        await sink.write(events)
        await sink.flush()
    finally:
        await sink.aclose()


def source(stream: str, consumer: str, **options: object) -> RedisStreamSource:
    from rtinfer.sources.redis import RedisStreamSource

    return RedisStreamSource(
        REDIS_URL, stream, group="g", consumer=consumer, partitions=P, block_ms=20, **options
    )


async def drain(src: RedisStreamSource, expected: int, size: int = 7) -> list[Event]:
    """Read until ``expected`` events came (a hang fails after SAFETY seconds)."""
    got: list[Event] = []
    while len(got) < expected:
        batch = await asyncio.wait_for(src.read(size), SAFETY)
        assert 0 < len(batch) <= size
        got += batch
    return got


async def test_the_sink_puts_each_key_on_its_crc32_partition(redis: Redis, stream: str) -> None:
    events = keyed_events(200)
    await publish(stream, events)
    seen: dict[bytes, int] = {}
    total = 0
    for p in range(P):
        entries = await redis.xrange(f"{stream}.{p}")
        assert entries, f"partition {p} got nothing"
        total += len(entries)
        values = []
        for _, fields in entries:
            key = fields[b"key"]
            assert zlib.crc32(key) % P == p
            assert seen.setdefault(key, p) == p  # a key in one partition only
            values.append(int(fields[b"value"][1:]))
        assert values == sorted(values)  # write order kept within a partition
    assert total == 200
    assert not await redis.exists(stream)  # nothing in the unpartitioned stream


async def test_events_without_a_key_go_to_partition_zero(redis: Redis, stream: str) -> None:
    event = Event(b"x", ingest_time=0.0)
    event.result = b"no key"
    await publish(stream, [event])
    [(_, fields)] = await redis.xrange(f"{stream}.0")
    assert fields[b"value"] == b"no key"
    assert b"key" not in fields


async def test_two_workers_split_the_partitions_and_ack_each_on_its_stream(
    redis: Redis, stream: str
) -> None:
    await publish(stream, keyed_events(120))
    one = source(stream, "w0", owned_partitions=[0, 2])
    two = source(stream, "w1", owned_partitions=[1, 3])
    await one.start()
    await two.start()
    try:
        sizes = {p: await redis.xlen(f"{stream}.{p}") for p in range(P)}
        first = await drain(one, sizes[0] + sizes[2])
        second = await drain(two, sizes[1] + sizes[3])
        for events, owned in ((first, {0, 2}), (second, {1, 3})):
            for e in events:
                assert e.position is not None
                assert e.position.partition in owned
                assert e.key is not None
                assert zlib.crc32(e.key) % P == e.position.partition
                assert e.position.source == f"redis://{stream}"
        values = sorted(int(e.value[1:]) for e in first + second)
        assert values == list(range(120))  # nothing missed, nothing twice
        # Per key, in publish order.
        for events in (first, second):
            by_key: dict[bytes | None, list[int]] = {}
            for e in events:
                by_key.setdefault(e.key, []).append(int(e.value[1:]))
            assert all(v == sorted(v) for v in by_key.values())
        await one.ack([e.position for e in first if e.position is not None])
        await two.ack([e.position for e in second[:5] if e.position is not None])
        for p in (0, 2):
            assert (await redis.xpending(f"{stream}.{p}", "g"))["pending"] == 0
        pending = [(await redis.xpending(f"{stream}.{p}", "g"))["pending"] for p in (1, 3)]
        assert sum(pending) == len(second) - 5
        with pytest.raises(ValueError, match="does not read partition 1"):
            await one.ack([Position(f"redis://{stream}", 1, "1-0")])
    finally:
        await one.aclose()
        await two.aclose()

    # Restarted with the same names: the acknowledged come never again, the rest do.
    one = source(stream, "w0", owned_partitions=[0, 2])
    two = source(stream, "w1", owned_partitions=[1, 3])
    await one.start()
    await two.start()
    try:
        again = await drain(two, len(second) - 5)
        assert sorted(e.value for e in again) == sorted(e.value for e in second[5:])
        await two.ack([e.position for e in again if e.position is not None])
        for p in range(P):
            assert (await redis.xpending(f"{stream}.{p}", "g"))["pending"] == 0
        await publish(stream, keyed_events(1, keys=1))  # card-0: one new entry
        p0 = zlib.crc32(b"card-0") % P
        owner = one if p0 in (0, 2) else two
        [new] = await drain(owner, 1)
        assert new.value == b"v0"
        assert new.position is not None
        assert new.position.partition == p0
    finally:
        await one.aclose()
        await two.aclose()


async def test_workers_take_their_partitions_from_the_environment(
    redis: Redis, stream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await publish(stream, keyed_events(60))
    got: list[list[Event]] = []
    for worker in range(2):
        monkeypatch.setenv("RTINFER_WORKER", str(worker))
        monkeypatch.setenv("RTINFER_WORKERS", "2")
        src = source(stream, f"env-{worker}")
        assert src.owned_partitions == ((0, 2) if worker == 0 else (1, 3))
        assert src.streams == tuple(f"{stream}.{p}" for p in src.owned_partitions)
        await src.start()
        try:
            expected = sum([await redis.xlen(s) for s in src.streams])
            got.append(await drain(src, expected))
            await src.ack([e.position for e in got[-1] if e.position is not None])
        finally:
            await src.aclose()
    assert sorted(int(e.value[1:]) for e in got[0] + got[1]) == list(range(60))
    monkeypatch.setenv("RTINFER_WORKER", "4")
    monkeypatch.setenv("RTINFER_WORKERS", "5")
    with pytest.raises(ConfigError, match="more workers than partitions"):
        source(stream, "too-many")


async def test_a_restart_rereads_its_pending_entries_of_every_partition(
    redis: Redis, stream: str
) -> None:
    await publish(stream, keyed_events(40))
    first = source(stream, "w")
    await first.start()
    read = await drain(first, 40, size=40)
    await first.aclose()  # dies without acknowledging
    await publish(stream, keyed_events(4))  # new entries after the pending ones

    again = source(stream, "w")
    await again.start()
    try:
        backlog = await drain(again, 40, size=9)
        assert sorted(e.position for e in backlog if e.position) == sorted(
            e.position for e in read if e.position
        )  # its own pending entries first, from every partition
        new = await drain(again, 4)
        assert {e.value for e in new} == {b"v0", b"v1", b"v2", b"v3"}
    finally:
        await again.aclose()


async def test_a_dead_workers_entries_are_claimed_from_every_partition(
    redis: Redis, stream: str
) -> None:
    await publish(stream, keyed_events(30))
    dead = source(stream, "dead", claim_idle_ms=1)
    await dead.start()
    read = await drain(dead, 30, size=30)
    await dead.aclose()

    # Another consumer owning the same partitions (a replacement) claims them all.
    alive = source(stream, "alive", claim_idle_ms=1)
    await alive.start()
    try:
        claimed = await drain(alive, 30)
        assert sorted(e.position for e in claimed if e.position) == sorted(
            e.position for e in read if e.position
        )
        await alive.ack([e.position for e in claimed if e.position is not None])
        for p in range(P):
            assert (await redis.xpending(f"{stream}.{p}", "g"))["pending"] == 0
    finally:
        await alive.aclose()


async def test_lag_adds_up_the_owned_partitions(redis: Redis, stream: str) -> None:
    await publish(stream, keyed_events(50))
    src = source(stream, "w", owned_partitions=[1, 2])
    await src.start()
    try:
        expected = await redis.xlen(f"{stream}.1") + await redis.xlen(f"{stream}.2")
        assert await src.lag() == expected
    finally:
        await src.aclose()


def test_owned_partitions_need_partitions() -> None:
    pytest.importorskip("redis")
    from rtinfer.sources.redis import RedisStreamSource

    with pytest.raises(ConfigError, match="needs partitions"):
        RedisStreamSource(REDIS_URL, "s", owned_partitions=[0])
