"""Partitioned NATS subjects: the sink spreads keys over ``<subject>.<p>``, sources split them.

Against a real nats-server with JetStream (``NATS_URL``); every test makes its own stream
and deletes it afterwards.
"""

from __future__ import annotations

import asyncio
import os
import uuid
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from conftest import SAFETY, service_missing

pytest.importorskip("nats")

import contextlib

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from rtinfer.connectors.nats import subject_covers
from rtinfer.exceptions import ConfigError
from rtinfer.sinks.nats import NatsSink
from rtinfer.sources.nats import NatsSource
from rtinfer.types import Event


async def settles_to_zero(read: Any, what: str) -> None:
    """JetStream applies acks asynchronously: wait (within SAFETY) until ``read()`` is 0."""
    seen = None

    async def poll() -> None:
        nonlocal seen
        while True:
            seen = await read()
            if seen == 0:
                return
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), SAFETY)
    except TimeoutError:
        raise AssertionError(f"{what} stayed {seen}, expected 0") from None


NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
P = 4


@pytest.fixture
async def js() -> AsyncIterator[tuple[JetStreamContext, list[str]]]:
    """A JetStream context and a list of streams to delete after the test."""
    nc = Client()
    try:
        await nc.connect(NATS_URL, connect_timeout=2, max_reconnect_attempts=0)
    except Exception as exc:  # any failure to connect: no server to test against
        service_missing(f"no NATS server at {NATS_URL}: {exc!r}")
    context = nc.jetstream()
    made: list[str] = []
    yield context, made
    for stream in made:
        with contextlib.suppress(NotFoundError):
            await context.delete_stream(stream)
    await nc.close()


def names(made: list[str]) -> tuple[str, str]:
    tag = uuid.uuid4().hex[:12]
    made.append(f"rtinfer_ptest_{tag}")
    return made[-1], f"rtinfer.ptest.{tag}"


def keyed_events(n: int, keys: int = 20, ids: str = "e") -> list[Event]:
    """Keyed results; ``ids`` prefixes the event ids (the sink de-duplicates on them)."""
    events = []
    for i in range(n):
        event = Event(b"v%d" % i, key=b"card-%d" % (i % keys), ingest_time=0.0)
        event.id = f"{ids}{i}"
        event.result = event.value
        events.append(event)
    return events


async def publish(subject: str, events: list[Event], stream: str | None = None) -> None:
    sink = NatsSink(NATS_URL, subject, stream=stream, partitions=P)
    await sink.start()
    try:
        await sink.write(events)
        await sink.flush()
    finally:
        await sink.aclose()


def source(stream: str, subject: str, **options: Any) -> NatsSource:
    return NatsSource(
        NATS_URL, stream, subject, durable="scoring", partitions=P, fetch_timeout_s=0.2, **options
    )


async def drain(src: NatsSource, expected: int, size: int = 7) -> list[Event]:
    got: list[Event] = []
    while len(got) < expected:
        batch = await asyncio.wait_for(src.read(size), SAFETY)
        assert 0 < len(batch) <= size
        got += batch
    return got


def test_subject_covers() -> None:
    assert subject_covers("a.*", "a.3")
    assert subject_covers("a.>", "a.3")
    assert subject_covers("a.>", "a.*.3")
    assert subject_covers("a.*.*", "a.*.3")
    assert not subject_covers("a.*", "a.*.3")
    assert not subject_covers("a.b", "a.3")
    assert not subject_covers("a.3", "a.*")
    assert not subject_covers("a.*", "a.>")
    assert not subject_covers("a.>", "a")


async def test_the_sink_puts_each_key_on_its_crc32_subject(
    js: tuple[JetStreamContext, list[str]],
) -> None:
    context, made = js
    stream, subject = names(made)
    await context.add_stream(name=stream, subjects=[f"{subject}.*"])
    await publish(subject, keyed_events(200), stream=stream)
    seen: dict[bytes, int] = {}
    total = 0
    for p in range(P):
        sub = await context.pull_subscribe(f"{subject}.{p}", stream=stream)
        count = (await context.stream_info(stream, subjects_filter=f"{subject}.{p}")).state
        messages: list[Any] = []
        want = int((count.subjects or {}).get(f"{subject}.{p}", 0))
        assert want, f"partition {p} got nothing"
        while len(messages) < want:
            try:
                messages += await sub.fetch(want - len(messages), timeout=1.0)
            except TimeoutError:
                continue
        await sub.unsubscribe()
        values = []
        for msg in messages:
            key = msg.headers["rtinfer-key"].encode()
            assert zlib.crc32(key) % P == p
            assert seen.setdefault(key, p) == p
            values.append(int(msg.data[1:]))
        assert values == sorted(values)
        total += len(messages)
    assert total == 200


async def test_the_sink_refuses_a_stream_that_does_not_store_the_partitions(
    js: tuple[JetStreamContext, list[str]],
) -> None:
    context, made = js
    stream, subject = names(made)
    await context.add_stream(name=stream, subjects=[subject])  # not subject.*
    sink = NatsSink(NATS_URL, subject, stream=stream, partitions=P)
    with pytest.raises(ConfigError, match=rf"must store '{subject}\.\*'"):
        await sink.start()
    src = source(stream, subject)
    with pytest.raises(ConfigError, match=rf"must store '{subject}\.\*'"):
        await src.start()


async def test_two_workers_split_the_partitions_and_ack_the_right_messages(
    js: tuple[JetStreamContext, list[str]],
) -> None:
    context, made = js
    stream, subject = names(made)
    one = source(stream, subject, owned_partitions=[0, 2])
    two = source(stream, subject, owned_partitions=[1, 3])
    await one.start()  # creates the stream, storing subject.*
    await two.start()
    assert (await context.stream_info(stream)).config.subjects == [f"{subject}.*"]
    assert one.durables == {0: "scoring-0", 2: "scoring-2"}
    try:
        events = keyed_events(120)
        await publish(subject, events, stream=stream)
        sizes = dict.fromkeys(range(P), 0)
        for e in events:
            assert e.key is not None
            sizes[zlib.crc32(e.key) % P] += 1
        first = await drain(one, sizes[0] + sizes[2])
        second = await drain(two, sizes[1] + sizes[3])
        for got, owned in ((first, {0, 2}), (second, {1, 3})):
            for e in got:
                assert e.position is not None
                assert e.position.partition in owned
                assert e.key is not None
                assert zlib.crc32(e.key) % P == e.position.partition
            by_key: dict[bytes | None, list[int]] = {}
            for e in got:
                by_key.setdefault(e.key, []).append(int(e.value[1:]))
            assert all(v == sorted(v) for v in by_key.values())
        assert sorted(int(e.value[1:]) for e in first + second) == list(range(120))
        await one.ack([e.position for e in first if e.position is not None])
        await two.ack([e.position for e in second if e.position is not None])
        for p in range(P):

            async def pending(p: int = p) -> int:
                info = await context.consumer_info(stream, f"scoring-{p}")
                return (info.num_ack_pending or 0) + (info.num_pending or 0)

            await settles_to_zero(pending, f"partition {p}'s pending count")
        await settles_to_zero(one.lag, "the lag")
    finally:
        await one.aclose()
        await two.aclose()
    # Restarted: nothing comes again; a new message goes to its owner only.
    one = source(stream, subject, owned_partitions=[0, 2])
    two = source(stream, subject, owned_partitions=[1, 3])
    await one.start()
    await two.start()
    try:
        await publish(subject, keyed_events(1, keys=1, ids="new"), stream=stream)  # card-0
        p0 = zlib.crc32(b"card-0") % P
        owner, other = (one, two) if p0 in (0, 2) else (two, one)
        [new] = await drain(owner, 1)
        assert new.value == b"v0"
        assert new.position is not None
        assert new.position.partition == p0
        await settles_to_zero(other.lag, "the other worker's lag")
    finally:
        await one.aclose()
        await two.aclose()


async def test_workers_take_their_partitions_from_the_environment(
    js: tuple[JetStreamContext, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    context, made = js
    stream, subject = names(made)
    await context.add_stream(name=stream, subjects=[f"{subject}.>"])
    await publish(subject, keyed_events(60), stream=stream)
    got: list[Event] = []
    for worker in range(2):
        monkeypatch.setenv("RTINFER_WORKER", str(worker))
        monkeypatch.setenv("RTINFER_WORKERS", "2")
        src = source(stream, subject)
        assert src.owned_partitions == ((0, 2) if worker == 0 else (1, 3))
        await src.start()
        try:
            lag = await src.lag()
            assert lag is not None
            assert lag > 0
            mine = await drain(src, lag)
            got += mine
            await src.ack([e.position for e in mine if e.position is not None])
            await settles_to_zero(src.lag, "the lag")
        finally:
            await src.aclose()
    assert sorted(int(e.value[1:]) for e in got) == list(range(60))
    monkeypatch.setenv("RTINFER_WORKER", "4")
    monkeypatch.setenv("RTINFER_WORKERS", "6")
    with pytest.raises(ConfigError, match="more workers than partitions"):
        source(stream, subject)


async def test_unacknowledged_messages_of_every_partition_come_back_after_close(
    js: tuple[JetStreamContext, list[str]],
) -> None:
    _context, made = js
    stream, subject = names(made)
    src = source(stream, subject)
    await src.start()
    await publish(subject, keyed_events(30), stream=stream)
    read = await drain(src, 30, size=30)
    await src.aclose()  # naks what was not acknowledged
    again = source(stream, subject)
    await again.start()
    try:
        back = await drain(again, 30)
        assert sorted(e.position for e in back if e.position) == sorted(
            e.position for e in read if e.position
        )
        await again.ack([e.position for e in back if e.position is not None])
        await settles_to_zero(again.lag, "the lag")
    finally:
        await again.aclose()


def test_partition_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="needs partitions"):
        NatsSource(NATS_URL, "S", "s", owned_partitions=[0])
    with pytest.raises(ConfigError, match="ends with '>'"):
        NatsSource(NATS_URL, "S", "s.>", partitions=2)
    with pytest.raises(ConfigError, match="at least 1"):
        NatsSink(NATS_URL, "s", partitions=0)
