"""The Redis Streams source and sink, against a real Redis (``REDIS_URL``).

Every test uses streams and groups of its own, deleted afterwards. Without a
reachable Redis (or without redis-py) the tests that need one are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from conftest import REDIS_URL, SAFETY, Reading, payload, python_model, wait_until
from rtinfer.batching import MicroBatcher
from rtinfer.connectors.redis import connect
from rtinfer.exceptions import ConfigError, MissingDependency
from rtinfer.pipeline import Pipeline
from rtinfer.sinks.redis import RedisStreamSink
from rtinfer.sources.redis import DEAD_REASON_HEADER, RedisStreamSource
from rtinfer.stages import Decode, Outputs, Predict, Vectorize
from rtinfer.types import Event, Position, Sink, Source

if TYPE_CHECKING:
    from redis.asyncio import Redis

GROUP = "scoring"


def source(stream: str, **options: Any) -> RedisStreamSource:
    options.setdefault("group", GROUP)
    options.setdefault("consumer", "worker-1")
    return RedisStreamSource(REDIS_URL, stream, **options)


async def add(redis: Redis, stream: str, n: int, **fields: bytes) -> list[str]:
    """Append ``n`` entries whose value is ``b"v<i>"`` (plus ``fields``); their ids."""
    entries: list[dict[Any, Any]] = [{"value": b"v%d" % i, **fields} for i in range(n)]
    ids = [await redis.xadd(stream, entry) for entry in entries]
    return [i.decode() for i in ids]


async def read(src: RedisStreamSource, n: int = 100) -> list[Event]:
    return await asyncio.wait_for(src.read(n), SAFETY)


def offsets(events: list[Event]) -> list[str]:
    return [str(e.position.offset) for e in events if e.position is not None]


async def pending(redis: Redis, stream: str, group: str = GROUP) -> int:
    summary = await redis.xpending(stream, group)
    return int(summary["pending"])


# -- the source -------------------------------------------------------------------------


def test_they_implement_the_protocols() -> None:
    pytest.importorskip("redis")
    assert isinstance(RedisStreamSource(REDIS_URL, "s"), Source)
    assert isinstance(RedisStreamSink(REDIS_URL, "s"), Sink)


def test_the_default_consumer_name_is_stable(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("redis")
    monkeypatch.delenv("RTINFER_WORKER", raising=False)
    first = RedisStreamSource(REDIS_URL, "s").consumer
    assert first == RedisStreamSource(REDIS_URL, "s").consumer
    assert first.endswith("-0")
    monkeypatch.setenv("RTINFER_WORKER", "3")
    assert RedisStreamSource(REDIS_URL, "s").consumer == first[:-2] + "-3"


async def test_read_turns_entries_into_events(redis: Redis, name: Callable[[str], str]) -> None:
    stream = name("in")
    [entry_id] = await add(redis, stream, 1, key=b"card-1", trace=b"t-9")
    src = source(stream)
    assert src.name == f"redis://{stream}"
    await src.start()
    try:
        [event] = await read(src)
        assert event.value == b"v0"
        assert event.key == b"card-1"
        assert event.headers == {"trace": b"t-9"}
        assert event.ingest_time == int(entry_id.split("-")[0]) / 1000
        assert event.position == Position(f"redis://{stream}", 0, entry_id)
    finally:
        await src.aclose()


async def test_nothing_is_acknowledged_until_ack(redis: Redis, name: Callable[[str], str]) -> None:
    stream = name("in")
    ids = await add(redis, stream, 5)
    src = source(stream)
    await src.start()
    try:
        events = await read(src)
        assert offsets(events) == ids
        assert await pending(redis, stream) == 5
        await src.ack([e.position for e in events[:2] if e.position is not None])
        assert await pending(redis, stream) == 3
        left = await redis.xpending_range(stream, GROUP, "-", "+", 10)
        assert [p["message_id"].decode() for p in left] == ids[2:]
        await src.ack([e.position for e in events[2:] if e.position is not None])
        await src.ack([])
        assert await pending(redis, stream) == 0
    finally:
        await src.aclose()


async def test_start_id_dollar_skips_what_was_there(
    redis: Redis, name: Callable[[str], str]
) -> None:
    stream = name("in")
    await add(redis, stream, 3)
    src = source(stream, start_id="$")
    await src.start()
    try:
        [new] = await add(redis, stream, 1)
        assert offsets(await read(src)) == [new]
    finally:
        await src.aclose()


async def test_a_restart_rereads_its_own_pending_entries_first(
    redis: Redis, name: Callable[[str], str]
) -> None:
    stream = name("in")
    ids = await add(redis, stream, 5)
    first = source(stream)
    await first.start()
    assert offsets(await read(first, 3)) == ids[:3]
    await first.aclose()  # "dies" without acknowledging

    restarted = source(stream)  # the same consumer name
    await restarted.start()
    try:
        again = await read(restarted)
        assert offsets(again) == ids[:3]  # its own pending entries, before anything new
        assert all(e.headers is None for e in again)
        assert offsets(await read(restarted)) == ids[3:]
        await restarted.ack([e.position for e in again if e.position is not None])
        assert await pending(redis, stream) == 2
    finally:
        await restarted.aclose()


async def test_another_consumer_claims_the_entries_of_a_dead_one(
    redis: Redis, name: Callable[[str], str]
) -> None:
    stream = name("in")
    ids = await add(redis, stream, 3)
    dead = source(stream, consumer="dead", claim_idle_ms=100)
    await dead.start()
    assert offsets(await read(dead)) == ids
    await dead.aclose()

    alive = source(stream, consumer="alive", claim_idle_ms=100)
    await alive.start()
    try:
        claimed = await read(alive)  # once they have been idle for 100 ms
        assert offsets(claimed) == ids
        owners = await redis.xpending_range(stream, GROUP, "-", "+", 10)
        assert {p["consumer"] for p in owners} == {b"alive"}
        await alive.ack([e.position for e in claimed if e.position is not None])
        assert await pending(redis, stream) == 0
        # Claimed once: the next read has only what is new.
        [new] = await add(redis, stream, 1)
        assert offsets(await read(alive)) == [new]
    finally:
        await alive.aclose()


async def test_entries_in_flight_are_not_claimed_back_by_their_reader(
    redis: Redis, name: Callable[[str], str]
) -> None:
    stream = name("in")
    ids = await add(redis, stream, 2)
    src = source(stream, claim_idle_ms=100)
    await src.start()
    try:
        assert offsets(await read(src)) == ids  # in the pipeline, not acknowledged
        await asyncio.sleep(0.15)  # not a timing assertion: lets them idle past 100 ms
        # The claim pass before the next XREADGROUP finds them idle, but skips them.
        [new] = await add(redis, stream, 1)
        assert offsets(await read(src)) == [new]
        owners = await redis.xpending_range(stream, GROUP, "-", "+", 10)
        assert len(owners) == 3
    finally:
        await src.aclose()


async def test_an_entry_delivered_too_often_carries_the_dead_reason(
    redis: Redis, name: Callable[[str], str]
) -> None:
    stream = name("in")
    await add(redis, stream, 1)
    headers = []
    for _ in range(3):  # read, crash, restart: deliveries 1, 2 and 3
        src = source(stream, max_deliveries=2)
        await src.start()
        [event] = await read(src)
        headers.append(event.headers)
        await src.aclose()
    assert headers[:2] == [None, None]
    assert headers[2] == {DEAD_REASON_HEADER: b"delivered 3 times (max_deliveries is 2)"}


async def test_a_claimed_entry_delivered_too_often_carries_the_dead_reason(
    redis: Redis, name: Callable[[str], str]
) -> None:
    stream = name("in")
    await add(redis, stream, 1)
    dead = source(stream, consumer="dead", claim_idle_ms=100, max_deliveries=1)
    await dead.start()
    [first] = await read(dead)
    assert first.headers is None
    await dead.aclose()
    alive = source(stream, consumer="alive", claim_idle_ms=100, max_deliveries=1)
    await alive.start()
    try:
        [claimed] = await read(alive)
        assert claimed.value == b"v0"  # the payload, for the dead-letter record
        assert claimed.headers == {DEAD_REASON_HEADER: b"delivered 2 times (max_deliveries is 1)"}
    finally:
        await alive.aclose()


async def test_an_entry_without_the_value_field_carries_the_dead_reason(
    redis: Redis, name: Callable[[str], str]
) -> None:
    stream = name("in")
    await redis.xadd(stream, {"payload": b"x", DEAD_REASON_HEADER: b"forged"})
    src = source(stream)
    await src.start()
    try:
        [event] = await read(src)
        assert event.value == b""
        assert event.headers == {"payload": b"x", DEAD_REASON_HEADER: b"entry has no 'value' field"}
    finally:
        await src.aclose()


async def test_pending_entries_deleted_from_the_stream_are_acknowledged_and_logged(
    redis: Redis, name: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    stream = name("in")
    ids = await add(redis, stream, 3)
    first = source(stream)
    await first.start()
    assert offsets(await read(first)) == ids
    await first.aclose()
    await redis.xdel(stream, ids[1])  # trimmed away while pending: its payload is gone

    restarted = source(stream)
    await restarted.start()
    try:
        with caplog.at_level(logging.WARNING, logger="rtinfer.sources.redis"):
            again = await read(restarted)
        assert offsets(again) == [ids[0], ids[2]]
        assert ids[1] in caplog.text
        assert "deleted or trimmed" in caplog.text
        remaining = await redis.xpending_range(stream, GROUP, "-", "+", 10)
        assert [p["message_id"].decode() for p in remaining] == [ids[0], ids[2]]
    finally:
        await restarted.aclose()


async def test_claimed_entries_deleted_from_the_stream_are_dropped_and_logged(
    redis: Redis, name: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    stream = name("in")
    ids = await add(redis, stream, 1)
    dead = source(stream, consumer="dead", claim_idle_ms=100)
    await dead.start()
    assert offsets(await read(dead)) == ids
    await dead.aclose()
    await redis.xdel(stream, ids[0])

    alive = source(stream, consumer="alive", claim_idle_ms=100)
    await alive.start()
    with caplog.at_level(logging.WARNING, logger="rtinfer.sources.redis"):
        reading = asyncio.ensure_future(alive.read(100))  # nothing left to deliver: it waits
        try:
            await wait_until(lambda: ids[0] in caplog.text, "the deleted entry to be logged")
            assert await pending(redis, stream) == 0
            assert not reading.done()
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            await alive.aclose()


async def blocked_readers(redis: Redis) -> int:
    """How many connections wait in a blocking XREADGROUP now."""
    clients = await redis.client_list()
    return sum(1 for c in clients if c.get("cmd") == "xreadgroup" and "b" in c.get("flags", ""))


async def test_a_cancelled_read_leaves_the_source_usable(
    redis: Redis, name: Callable[[str], str]
) -> None:
    stream = name("in")
    [kept] = await add(redis, stream, 1)
    src = source(stream, block_ms=60_000)
    await src.start()
    try:
        assert offsets(await read(src)) == [kept]  # in flight, not acknowledged
        before = await blocked_readers(redis)
        reading = asyncio.ensure_future(src.read(100))
        for _ in range(int(SAFETY / 0.005)):
            if await blocked_readers(redis) > before:
                break
            await asyncio.sleep(0.005)
        else:
            raise AssertionError("the read never blocked in XREADGROUP")
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading

        # As if Redis had answered the cancelled XREADGROUP with an entry whose reply was
        # lost: it is pending for this consumer, and the next read must deliver it.
        [lost] = await add(redis, stream, 1)
        await redis.xreadgroup(GROUP, src.consumer, {stream: ">"}, count=1)
        assert offsets(await read(src)) == [lost]  # not `kept`: that one is in flight
        [new] = await add(redis, stream, 1)
        assert offsets(await read(src)) == [new]
    finally:
        await src.aclose()


async def test_read_after_close_returns_nothing(redis: Redis, name: Callable[[str], str]) -> None:
    src = source(name("in"))
    await src.start()
    await src.aclose()
    assert src.closed
    assert await src.read(10) == []


# -- the sink ---------------------------------------------------------------------------


def result_event(result: object, *, key: bytes | None = None, id: str | None = None) -> Event:
    event = Event(b"", key=key, ingest_time=0.0)
    event.result = result
    event.id = id
    return event


async def test_flush_writes_value_key_and_source_id(
    redis: Redis, name: Callable[[str], str]
) -> None:
    stream = name("out")
    sink = RedisStreamSink(REDIS_URL, stream)
    assert sink.name == f"redis://{stream}"
    await sink.start()
    try:
        await sink.write(
            [
                result_event({"id": "e1", "score": 0.5}, key=b"card-1", id="e1"),
                result_event(b"raw bytes", id="e2"),
            ]
        )
        await sink.write([result_event([1, 2])])
        undecoded = result_event({"reason": "shed"})  # no id of its own: its position
        undecoded.position = Position("redis://in", 0, "1-0")
        await sink.write([undecoded])
        assert await redis.xlen(stream) == 0  # buffered until flushed
        await sink.flush()
        entries = await redis.xrange(stream)
        assert [fields for _, fields in entries] == [
            {b"value": b'{"id":"e1","score":0.5}', b"key": b"card-1", b"source_id": b"e1"},
            {b"value": b"raw bytes", b"source_id": b"e2"},
            {b"value": b"[1,2]"},
            {b"value": b'{"reason":"shed"}', b"source_id": b"redis://in/0/1-0"},
        ]
        await sink.flush()  # nothing more buffered: nothing more written
        assert await redis.xlen(stream) == 4
    finally:
        await sink.aclose()


async def test_maxlen_trims_the_output_stream_approximately(
    redis: Redis, name: Callable[[str], str]
) -> None:
    stream = name("out")
    sink = RedisStreamSink(REDIS_URL, stream, maxlen=10)
    await sink.start()
    try:
        await sink.write([result_event(i) for i in range(1000)])
        await sink.flush()
        length = await redis.xlen(stream)
        assert 10 <= length < 1000
        [(_, last)] = await redis.xrevrange(stream, count=1)
        assert last[b"value"] == b"999"
    finally:
        await sink.aclose()


# -- configuration and the missing extra -----------------------------------------------


def test_connect_refuses_contradictory_options() -> None:
    pytest.importorskip("redis")
    with pytest.raises(ConfigError, match="rediss://"):
        connect("redis://localhost", ssl_ca_certs="/ca.pem")
    with pytest.raises(ConfigError, match="once"):
        connect("redis://:secret@localhost", password="other")  # noqa: S106 - made up
    with pytest.raises(ConfigError, match="scheme"):
        connect("http://localhost")
    with pytest.raises(ValueError, match="claim_idle_ms"):
        RedisStreamSource(REDIS_URL, "s", claim_idle_ms=0)


def test_without_redis_the_modules_import_and_building_says_what_to_install() -> None:
    code = """
import sys
sys.modules["redis"] = None  # as if the extra were not installed
from rtinfer.exceptions import MissingDependency
from rtinfer.sinks.redis import RedisStreamSink
from rtinfer.sources.redis import RedisStreamSource
for build in (RedisStreamSource, RedisStreamSink):
    try:
        build("redis://localhost", "s")
    except MissingDependency as exc:
        print(exc)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.splitlines() == [
        "the Redis Streams source needs an optional dependency: pip install 'rtinfer[redis]'",
        "the Redis Streams sink needs an optional dependency: pip install 'rtinfer[redis]'",
    ]


def test_missing_redis_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(MissingDependency, match=r"pip install 'rtinfer\[redis\]'"):
        RedisStreamSource(REDIS_URL, "s")


# -- end to end -------------------------------------------------------------------------


async def test_a_pipeline_from_a_redis_stream_to_a_redis_stream(
    redis: Redis, name: Callable[[str], str]
) -> None:
    inbox, outbox = name("in"), name("out")
    n = 300
    for start in range(0, n, 100):
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(start, start + 100):
                pipe.xadd(inbox, {"value": payload(i, key=f"k{i % 7}"), "key": f"k{i % 7}"})
            await pipe.execute()
    batcher = MicroBatcher(python_model(), max_batch_size=64, max_delay=0.0005)
    pipeline = Pipeline(
        RedisStreamSource(REDIS_URL, inbox, group=GROUP, consumer="e2e"),
        [Decode(Reading), Vectorize(["x", "y"]), Predict(batcher), Outputs()],
        [RedisStreamSink(REDIS_URL, outbox)],
        read_size=32,
        max_in_flight=3,
    )
    running = asyncio.create_task(pipeline.run())
    try:
        written = 0

        async def count() -> None:
            nonlocal written
            while written < n:
                written = await redis.xlen(outbox)
                await asyncio.sleep(0.005)

        await asyncio.wait_for(count(), SAFETY)
    finally:
        pipeline.stop()
        summary = await asyncio.wait_for(running, SAFETY)

    assert summary.events_in == summary.events_out == n
    entries = await redis.xrange(outbox)
    # Every input, once, in stream order (one consumer reads the whole stream).
    assert [f[b"source_id"].decode() for _, f in entries] == [f"e{i}" for i in range(n)]
    assert {f[b"key"] for _, f in entries} == {b"k%d" % k for k in range(7)}
    first = msgspec.json.decode(entries[0][1][b"value"])
    assert first["probabilities"] == [0.75, 0.25]
    assert await pending(redis, inbox) == 0
