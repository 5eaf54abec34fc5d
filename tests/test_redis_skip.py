"""Shedding by range on Redis Streams: the source moves its group past a late backlog
unread (``RedisStreamSource.skip``), and a pipeline with ``slo.shed_by: range`` records one
dead letter per range, losing nothing. Against a real Redis (``REDIS_URL``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from conftest import REDIS_URL, SAFETY, payload, shedding_pipeline
from rtinfer.sinks.redis import RedisStreamSink
from rtinfer.sources.redis import RedisStreamSource
from rtinfer.types import Skipped
from test_redis import GROUP, read, source

if TYPE_CHECKING:
    from redis.asyncio import Redis


async def add_at(redis: Redis, stream: str, ms: int, n: int, first: int = 0) -> list[str]:
    """Append ``n`` entries with ids ``<ms>-<i>`` (appended at ``ms``, as Redis sees it)."""
    ids = []
    for i in range(n):
        value = payload(first + i, key=f"k{i % 3}")
        ids.append((await redis.xadd(stream, {"value": value}, id=f"{ms}-{i}")).decode())
    return ids


async def group_info(redis: Redis, stream: str) -> dict[str, Any]:
    (info,) = [g for g in await redis.xinfo_groups(stream) if g["name"] == GROUP.encode()]
    return dict(info)


class Recorder:
    """A ``record`` callback that keeps what it was given and the group's position then."""

    def __init__(self, redis: Redis, stream: str) -> None:
        self.redis = redis
        self.stream = stream
        self.ranges: list[Skipped] = []
        self.position_then: bytes | None = None

    async def __call__(self, ranges: list[Skipped]) -> None:
        self.ranges.extend(ranges)
        self.position_then = (await group_info(self.redis, self.stream))["last-delivered-id"]


async def test_skip_moves_the_group_past_what_it_had_not_delivered_after_recording_it(
    redis: Redis, name: Callable[[str], str]
) -> None:
    stream = name("in")
    old = await add_at(redis, stream, 1_000, 6)
    src = source(stream)
    await src.start()
    try:
        held = await read(src, 2)  # read, not acknowledged: the skip leaves them alone
        assert [str(e.position.offset) for e in held if e.position] == old[:2]
        recorder = Recorder(redis, stream)

        assert await src.skip(recorder) == 4

        assert recorder.ranges == [Skipped(src.name, 0, old[2], old[5], 4)]
        # Recorded before the group moved: a crash then leaves them unread, not lost.
        assert recorder.position_then == old[1].encode()
        info = await group_info(redis, stream)
        assert info["last-delivered-id"] == old[5].encode()
        assert info["pending"] == 2
        assert info["lag"] == 0  # the read counter was kept, so the lag is still known
        fresh = await add_at(redis, stream, 9_000, 3)
        assert info["entries-read"] == 6
        rest = await read(src)
        assert [str(e.position.offset) for e in rest if e.position] == fresh
        again = Recorder(redis, stream)
        assert await src.skip(again) == 0  # nothing undelivered: no record
        assert again.ranges == []
        assert len(await redis.xrange(stream)) == 9  # the entries stay for a replay
    finally:
        await src.aclose()


async def test_skip_keeps_the_newest_entries_it_is_asked_to(
    redis: Redis, name: Callable[[str], str]
) -> None:
    stream = name("in")
    ids = await add_at(redis, stream, 1_000, 10)
    src = source(stream)
    await src.start()
    try:
        recorder = Recorder(redis, stream)
        assert await src.skip(recorder, keep=3) == 7
        assert recorder.ranges == [Skipped(src.name, 0, ids[0], ids[6], 7)]
        assert await src.skip(recorder, keep=3) == 0  # no more than 3 left
        assert [str(e.position.offset) for e in await read(src) if e.position] == ids[7:]
    finally:
        await src.aclose()


async def test_skip_counts_the_entries_where_redis_cannot_tell_the_lag(
    redis: Redis, name: Callable[[str], str]
) -> None:
    stream = name("in")
    ids = await add_at(redis, stream, 1_000, 6)
    src = source(stream)
    await src.start()
    try:
        await read(src, 1)
        await redis.xdel(stream, ids[3])  # a deleted entry: the group's lag is unknown
        assert (await group_info(redis, stream))["lag"] is None
        recorder = Recorder(redis, stream)
        assert await src.skip(recorder) == 4
        assert recorder.ranges == [Skipped(src.name, 0, ids[1], ids[5], 4)]
    finally:
        await src.aclose()


async def test_skip_never_moves_the_group_back_past_what_another_consumer_read(
    redis: Redis, name: Callable[[str], str]
) -> None:
    stream = name("in")
    old = await add_at(redis, stream, 1_000, 5)
    src, other = source(stream), source(stream, consumer="worker-2")
    await src.start()
    await other.start()
    try:
        meanwhile: list[str] = []

        async def record(ranges: list[Skipped]) -> None:
            # Meanwhile more arrives, and another consumer reads past the range into it.
            fresh.extend(await add_at(redis, stream, 9_000, 2))
            meanwhile.extend(str(e.position.offset) for e in await read(other, 6) if e.position)

        fresh: list[str] = []
        assert await src.skip(record) == 5
        # Those it read are both recorded and delivered (twice, at least once), and the
        # group is not moved back to the range's end, which would deliver fresh[0] again.
        assert meanwhile == [*old, fresh[0]]
        info = await group_info(redis, stream)
        assert info["last-delivered-id"] == fresh[0].encode()
        last = await read(src)
        assert [str(e.position.offset) for e in last if e.position] == fresh[1:]
    finally:
        await src.aclose()
        await other.aclose()


async def test_skip_covers_every_partition_stream_the_source_reads(
    redis: Redis, name: Callable[[str], str]
) -> None:
    stream = name("in")
    for p in range(2):
        await add_at(redis, f"{stream}.{p}", 1_000 + p, 3 + p)
    src = source(stream, partitions=2, owned_partitions=[0, 1])
    await src.start()
    try:
        recorder = Recorder(redis, f"{stream}.0")
        assert await src.skip(recorder) == 7
        assert sorted((r.partition, r.entries) for r in recorder.ranges) == [(0, 3), (1, 4)]
        for p in range(2):
            await add_at(redis, f"{stream}.{p}", 9_000, 1)
        assert len(await read(src)) == 2  # what came after, from each partition
    finally:
        await src.aclose()
        await redis.delete(f"{stream}.0", f"{stream}.1")


async def test_a_failed_record_leaves_the_group_where_it_was(
    redis: Redis, name: Callable[[str], str]
) -> None:
    stream = name("in")
    old = await add_at(redis, stream, 1_000, 3)
    src = source(stream)
    await src.start()
    try:

        async def record(ranges: list[Skipped]) -> None:
            raise ConnectionError("the dead-letter sink is gone")

        with pytest.raises(ConnectionError):
            await src.skip(record)
        assert (await group_info(redis, stream))["last-delivered-id"] == b"0-0"
        assert [str(e.position.offset) for e in await read(src) if e.position] == old
    finally:
        await src.aclose()


async def test_a_pipeline_sheds_a_late_backlog_by_range_and_loses_nothing(
    redis: Redis, name: Callable[[str], str]
) -> None:
    inbox, outbox, dead = name("in"), name("out"), name("dead")
    n_old, n_fresh = 200, 40
    old_ms = int((time.time() - 60) * 1000)  # a minute behind: far past a 1 s deadline
    await add_at(redis, inbox, old_ms, n_old)
    read_size = 8
    pipeline = shedding_pipeline(
        RedisStreamSource(REDIS_URL, inbox, group=GROUP, consumer="shed"),
        RedisStreamSink(REDIS_URL, outbox),
        RedisStreamSink(REDIS_URL, dead),
        read_size,
    )
    running = asyncio.create_task(pipeline.run())
    try:

        async def count(stream: str, n: int) -> None:
            written = 0
            while written < n:
                written = await redis.xlen(stream)
                await asyncio.sleep(0.005)

        # The first read is late: before the next one, the backlog is skipped but for one
        # read's worth (read, late too); what arrives after that is answered.
        await asyncio.wait_for(count(dead, 2 * read_size + 1), SAFETY)
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(n_old, n_old + n_fresh):
                pipe.xadd(inbox, {"value": payload(i, key=f"k{i % 3}")})
            await pipe.execute()
        await asyncio.wait_for(count(outbox, n_fresh), SAFETY)
    finally:
        pipeline.stop()
        summary = await asyncio.wait_for(running, SAFETY)

    answered = {f[b"source_id"].decode() for _, f in await redis.xrange(outbox)}
    assert answered == {f"e{i}" for i in range(n_old, n_old + n_fresh)}
    letters = [msgspec.json.decode(f[b"value"]) for _, f in await redis.xrange(dead)]
    one_by_one = [d for d in letters if d["value"] is not None]
    ranges = [d for d in letters if d["value"] is None]
    # The first and the last read of the backlog were set aside event by event, the rest
    # at once.
    assert len(one_by_one) == 2 * read_size
    assert len(ranges) == 1
    (skipped,) = ranges
    end = n_old - read_size - 1
    assert skipped["count"] == n_old - 2 * read_size
    assert skipped["stage"] == "intake"
    assert skipped["offset"] == f"{old_ms}-{read_size}"
    assert skipped["last_offset"] == f"{old_ms}-{end}"
    assert skipped["id"] == f"redis://{inbox}/0/{old_ms}-{read_size}..{old_ms}-{end}"
    # Each old entry is named once: by its own dead letter (with its payload) or by the
    # range, whose entries are still in the stream.
    in_range = await redis.xrange(inbox, skipped["offset"], skipped["last_offset"])
    named = [msgspec.json.decode(d["value"])["id"] for d in one_by_one]
    named += [msgspec.json.decode(f[b"value"])["id"] for _, f in in_range]
    assert sorted(named) == sorted(f"e{i}" for i in range(n_old))
    assert summary.skipped == n_old - 2 * read_size
    assert summary.dead_letters == n_old
    assert summary.events_in == 2 * read_size + n_fresh
    assert (await group_info(redis, inbox))["pending"] == 0


def test_shed_by_range_is_configured_on_a_redis_source(model_file: Path) -> None:
    from rtinfer.build import build_pipeline
    from rtinfer.config import parse_config

    text = f"""
source: {{type: redis, url: "{REDIS_URL}", stream: readings, group: g}}
decode: {{fields: {{id: str, key: str, x: float, y: float}}}}
stages: [{{type: vectorize, fields: [x, y]}}]
model: {{path: "{model_file}"}}
sinks: [{{type: memory, topic: out}}]
slo: {{deadline_ms: 200, shed: true, shed_by: range}}
"""
    pytest.importorskip("redis")
    pipeline = build_pipeline(parse_config(text))
    assert pipeline.shed_expired
    assert pipeline.shed_ranges
    assert isinstance(pipeline.source, RedisStreamSource)
