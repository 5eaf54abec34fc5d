"""The NATS JetStream source and sink, against a real server (``NATS_URL``).

Each test makes its own streams, subjects and durables (unique names) and
deletes its streams afterwards. The tests are skipped when nats-py is not
installed or no server answers at ``NATS_URL`` (default ``nats://127.0.0.1:4222``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest

from conftest import SAFETY, Reading, payload, python_model, service_missing

pytest.importorskip("nats")

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo, StorageType
from nats.js.errors import NotFoundError

from rtinfer.batching import MicroBatcher
from rtinfer.exceptions import ConfigError, RtinferError
from rtinfer.pipeline import Pipeline
from rtinfer.sinks.nats import NatsSink
from rtinfer.sources.nats import DEAD_REASON_HEADER, NatsSource
from rtinfer.stages import Decode, Outputs, Predict, Vectorize
from rtinfer.types import Event, Position

NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")


class Nats:
    """An admin connection for one test: makes unique names, publishes, inspects, cleans up."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.streams: list[str] = []

    def names(self) -> tuple[str, str]:
        """A fresh stream name and subject; the stream is deleted after the test."""
        tag = uuid.uuid4().hex[:12]
        stream = f"rtinfer_test_{tag}"
        self.streams.append(stream)
        return stream, f"rtinfer.test.{tag}"

    async def stream(self) -> tuple[str, str]:
        """A fresh stream, created, with its subject."""
        stream, subject = self.names()
        # In memory: the tests' streams need no disk, whose latency under a busy suite
        # only adds to every JetStream call.
        await self.js.add_stream(name=stream, subjects=[subject], storage=StorageType.MEMORY)
        return stream, subject

    async def publish(
        self, subject: str, values: list[bytes], keys: list[str] | None = None
    ) -> None:
        for i, value in enumerate(values):
            headers = {"rtinfer-key": keys[i]} if keys is not None else None
            await self.js.publish(subject, value, headers=headers)

    async def consumer(self, stream: str, durable: str) -> ConsumerInfo:
        info: ConsumerInfo = await self.js.consumer_info(stream, durable)
        return info

    async def messages(self, stream: str) -> int:
        return (await self.js.stream_info(stream)).state.messages

    async def read_all(self, stream: str, subject: str, n: int) -> list[Any]:
        """The first ``n`` messages of ``stream`` (an ephemeral consumer), as (data, headers)."""
        sub = await self.js.pull_subscribe(subject, stream=stream)
        got: list[Any] = []
        while len(got) < n:
            try:
                got.extend(await sub.fetch(n - len(got), timeout=1.0))
            except TimeoutError:
                continue
        await sub.unsubscribe()
        return [(m.data, m.headers) for m in got]


@pytest.fixture
async def nats_admin() -> AsyncIterator[Nats]:
    nc = Client()
    try:
        await asyncio.wait_for(
            nc.connect(NATS_URL, allow_reconnect=False, connect_timeout=1), timeout=3
        )
    except Exception as exc:
        service_missing(f"no NATS server at {NATS_URL} ({exc!r}); set NATS_URL")
    admin = Nats(nc)
    try:
        yield admin
    finally:
        for stream in admin.streams:
            with contextlib.suppress(NotFoundError):  # a name the test never created
                await admin.js.delete_stream(stream)
        await nc.close()


def source(stream: str, subject: str, durable: str = "workers", **options: Any) -> NatsSource:
    options.setdefault("fetch_timeout_s", 0.5)
    return NatsSource(NATS_URL, stream, subject, durable=durable, **options)


async def read_n(src: NatsSource, n: int) -> list[Event]:
    """Read until ``n`` events arrived (a hang fails after ``SAFETY`` seconds)."""
    events: list[Event] = []

    async def loop() -> None:
        while len(events) < n:
            events.extend(await src.read(n - len(events)))

    await asyncio.wait_for(loop(), SAFETY)
    return events


async def until(condition: Callable[[], Any], what: str) -> None:
    """Poll an async condition (server state is updated asynchronously) until it holds."""

    async def poll() -> None:
        while True:
            if await condition():
                return
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), SAFETY)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def offsets(events: list[Event]) -> list[int | str]:
    return [e.position.offset for e in events if e.position is not None]


# -- source ----------------------------------------------------------------------------------


async def test_source_reads_values_keys_headers_and_positions(nats_admin: Nats) -> None:
    stream, subject = nats_admin.names()
    src = source(stream, subject)  # creates the stream
    await src.start()
    try:
        before = time.time()
        await nats_admin.publish(subject, [b"v0", b"v1", b"v2"], keys=["a", "b", "a"])
        after = time.time()
        events = await read_n(src, 3)
        assert [e.value for e in events] == [b"v0", b"v1", b"v2"]
        assert [e.key for e in events] == [b"a", b"b", b"a"]
        assert [e.position for e in events] == [
            Position(f"nats://{stream}", 0, seq) for seq in (1, 2, 3)
        ]
        assert events[0].headers == {"rtinfer-key": b"a"}
        # ingest_time is the time JetStream stored the message (same host: same clock).
        assert all(before - 1 <= e.ingest_time <= after + 1 for e in events)

        info = await nats_admin.consumer(stream, "workers")
        assert info.num_ack_pending == 3  # read, not acknowledged
        await src.ack([e.position for e in events if e.position is not None])

        async def all_acked() -> bool:
            info = await nats_admin.consumer(stream, "workers")
            return info.num_ack_pending == 0 and info.num_pending == 0

        await until(all_acked, "every ack")
        config = (await nats_admin.consumer(stream, "workers")).config
        assert config.ack_wait == 30.0
        assert config.max_deliver == 5
    finally:
        await src.aclose()


async def test_read_returns_at_most_max_events(nats_admin: Nats) -> None:
    stream, subject = await nats_admin.stream()
    await nats_admin.publish(subject, [b"%d" % i for i in range(5)])
    src = source(stream, subject, create_stream=False)
    await src.start()
    try:
        got: list[Event] = []
        while len(got) < 5:
            batch = await asyncio.wait_for(src.read(2), SAFETY)
            assert 1 <= len(batch) <= 2
            got.extend(batch)
        assert offsets(got) == [1, 2, 3, 4, 5]
    finally:
        await src.aclose()


async def test_nothing_is_acknowledged_until_ack(nats_admin: Nats) -> None:
    stream, subject = await nats_admin.stream()
    await nats_admin.publish(subject, [b"a", b"b", b"c"])
    first = source(stream, subject)
    await first.start()
    events = await read_n(first, 3)
    await first.ack([events[0].position])  # type: ignore[list-item]
    await first.aclose()  # closes with b and c unacknowledged

    second = source(stream, subject)
    await second.start()
    try:
        again = await read_n(second, 2)
        assert offsets(again) == [2, 3]
        assert [e.value for e in again] == [b"b", b"c"]
        await second.ack([e.position for e in again if e.position is not None])

        async def all_acked() -> bool:
            info = await nats_admin.consumer(stream, "workers")
            return info.num_ack_pending == 0 and info.num_pending == 0

        await until(all_acked, "every ack")
    finally:
        await second.aclose()


async def test_a_dead_worker_s_events_are_redelivered_after_ack_wait(nats_admin: Nats) -> None:
    stream, subject = await nats_admin.stream()
    await nats_admin.publish(subject, [b"a", b"b"])
    crashed = source(stream, subject, ack_wait_s=1.0)
    await crashed.start()
    survivor = source(stream, subject, ack_wait_s=1.0)
    await survivor.start()
    try:
        taken = await read_n(crashed, 2)
        assert offsets(taken) == [1, 2]
        # `crashed` never acks nor closes (as if killed): once ack_wait_s passed, the
        # stream delivers its events to the other worker of the durable.
        again = await read_n(survivor, 2)
        # Redeliveries after ack_wait come in the order their timers fire: either order.
        assert sorted(map(str, offsets(again))) == ["1", "2"]
        await survivor.ack([e.position for e in again if e.position is not None])
    finally:
        await crashed.aclose()
        await survivor.aclose()


async def test_last_delivery_carries_the_dead_reason_and_is_terminated(nats_admin: Nats) -> None:
    stream, subject = await nats_admin.stream()
    await nats_admin.publish(subject, [b"poison"])
    first = source(stream, subject, max_deliver=2)
    await first.start()
    (delivered,) = await read_n(first, 1)
    assert delivered.headers is None or DEAD_REASON_HEADER not in delivered.headers
    await first.aclose()  # a failed run: naks what it read, delivered again at once

    second = source(stream, subject, max_deliver=2)
    await second.start()
    try:
        (last,) = await read_n(second, 1)
        assert last.position == delivered.position
        assert last.headers is not None
        assert last.headers[DEAD_REASON_HEADER] == b"delivered 2 times"
        await second.ack([last.position])  # type: ignore[list-item]

        async def settled() -> bool:
            info = await nats_admin.consumer(stream, "workers")
            return info.num_ack_pending == 0 and info.num_pending == 0

        await until(settled, "the terminated message to leave the pending list")
    finally:
        await second.aclose()


async def test_a_cancelled_read_leaves_the_source_usable(nats_admin: Nats) -> None:
    stream, subject = await nats_admin.stream()
    src = source(stream, subject)
    await src.start()
    try:
        blocked = asyncio.create_task(src.read(10))
        await asyncio.sleep(0.1)  # let it wait on an empty stream
        assert not blocked.done()
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked

        await nats_admin.publish(subject, [b"after"])
        # The pull of the cancelled read went on and brought it: delivered once, not lost.
        (event,) = await read_n(src, 1)
        assert event.value == b"after"
        assert (await nats_admin.consumer(stream, "workers")).num_redelivered == 0
        await src.ack([event.position])  # type: ignore[list-item]
    finally:
        await src.aclose()


async def test_aclose_hands_back_what_a_cancelled_read_pulled(nats_admin: Nats) -> None:
    stream, subject = await nats_admin.stream()
    first = source(stream, subject)  # ack_wait_s of 30 s: longer than any wait below
    await first.start()
    blocked = asyncio.create_task(first.read(10))
    await asyncio.sleep(0.1)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    await nats_admin.publish(subject, [b"pulled"])

    async def delivered() -> bool:
        return (await nats_admin.consumer(stream, "workers")).num_ack_pending == 1

    await until(delivered, "the pull to bring the message")
    await first.aclose()  # naks it: the next worker gets it now, not after ack_wait_s

    second = source(stream, subject)
    await second.start()
    try:
        (event,) = await read_n(second, 1)
        assert event.value == b"pulled"
    finally:
        await second.aclose()


async def test_aclose_ends_a_blocked_read_with_no_events(nats_admin: Nats) -> None:
    stream, subject = await nats_admin.stream()
    src = source(stream, subject)
    await src.start()
    blocked = asyncio.create_task(src.read(10))
    await asyncio.sleep(0.1)
    await src.aclose()
    assert await asyncio.wait_for(blocked, SAFETY) == []
    assert await src.read(10) == []


async def test_start_without_the_stream_names_it(nats_admin: Nats) -> None:
    stream, subject = nats_admin.names()
    src = source(stream, subject, create_stream=False)
    with pytest.raises(ConfigError, match=f"NATS stream '{stream}' does not exist"):
        await src.start()


async def test_no_server_fails_start_with_the_url() -> None:
    src = NatsSource("nats://127.0.0.1:1", "s", "x", connect_timeout_s=0.3)
    with pytest.raises(
        RtinferError, match=re.escape("cannot connect to NATS at nats://127.0.0.1:1")
    ):
        await src.start()
    await src.aclose()  # nothing to close: fine


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="ack_wait_s must be above 0"):
        NatsSource(NATS_URL, "s", "x", ack_wait_s=0)
    with pytest.raises(ValueError, match="max_deliver must be at least 1"):
        NatsSource(NATS_URL, "s", "x", max_deliver=0)
    with pytest.raises(ValueError, match=re.escape("stream name 'a.b' is invalid")):
        NatsSource(NATS_URL, "a.b", "x")
    with pytest.raises(ValueError, match="without spaces or wildcards"):
        NatsSink(NATS_URL, "out.*")


# -- sink ------------------------------------------------------------------------------------


def result_event(ident: str | None, result: Any, *, key: bytes | None = None) -> Event:
    event = Event(b"", key=key, ingest_time=time.time(), position=Position("test://in", 0, 7))
    event.id = ident
    event.result = result
    return event


async def test_sink_publishes_on_flush_and_round_trips_keys(nats_admin: Nats) -> None:
    stream, subject = await nats_admin.stream()
    sink = NatsSink(NATS_URL, subject, stream=stream)
    await sink.start()
    try:
        assert sink.duplicate_window_s == 120.0  # the server's default window
        await sink.write(
            [
                result_event("a", {"score": 0.5}, key=b"k1"),
                result_event("b", b"raw bytes", key=b"\xff\x00 not text"),
                result_event(None, [1, 2]),  # no id: the position stands for it
            ]
        )
        assert await nats_admin.messages(stream) == 0  # write only buffers
        await sink.flush()
        assert await nats_admin.messages(stream) == 3
    finally:
        await sink.aclose()

    data = await nats_admin.read_all(stream, subject, 3)
    assert msgspec.json.decode(data[0][0]) == {"score": 0.5}
    assert data[1][0] == b"raw bytes"
    assert data[0][1]["Nats-Msg-Id"] == f"{subject}:a"
    assert data[2][1]["Nats-Msg-Id"] == f"{subject}:test://in/0/7"

    # The source reads the keys back, text or not.
    src = source(stream, subject)
    await src.start()
    try:
        events = await read_n(src, 3)
        assert [e.key for e in events] == [b"k1", b"\xff\x00 not text", None]
    finally:
        await src.aclose()


async def test_sink_results_published_twice_are_stored_once(nats_admin: Nats) -> None:
    stream, subject = await nats_admin.stream()
    sink = NatsSink(NATS_URL, subject, stream=stream)
    await sink.start()
    try:
        await sink.write([result_event("e1", {"n": 1})])
        await sink.flush()
        # The same event again (a redelivered input), in a later flush and twice in one.
        await sink.write([result_event("e1", {"n": 1})])
        await sink.flush()
        await sink.write([result_event("e1", {"n": 1}), result_event("e1", {"n": 1})])
        await sink.write([result_event("e2", {"n": 2})])
        await sink.flush()
        assert await nats_admin.messages(stream) == 2
    finally:
        await sink.aclose()


async def test_results_of_mqtt_events_without_ids_are_never_taken_for_duplicates(
    nats_admin: Nats,
) -> None:
    # MQTT reuses packet ids: two different events may share a position, so that
    # position must not become their Nats-Msg-Id (JetStream would drop the second).
    stream, subject = await nats_admin.stream()
    sink = NatsSink(NATS_URL, subject, stream=stream)
    await sink.start()
    try:
        first, second = result_event(None, {"n": 1}), result_event(None, {"n": 2})
        for event in (first, second):
            event.position = Position("mqtt://sensors/+", 0, 1)
        await sink.write([first, second])
        await sink.flush()
        assert await nats_admin.messages(stream) == 2
    finally:
        await sink.aclose()
    data = await nats_admin.read_all(stream, subject, 2)
    assert all("Nats-Msg-Id" not in (headers or {}) for _, headers in data)


async def test_a_malformed_key_header_loses_the_key_not_the_event(nats_admin: Nats) -> None:
    stream, subject = nats_admin.names()
    src = source(stream, subject)
    await src.start()
    try:
        await nats_admin.js.publish(subject, b"v", headers={"rtinfer-key-b64": "not base64!"})
        (event,) = await read_n(src, 1)
        assert (event.value, event.key) == (b"v", None)
    finally:
        await src.aclose()


async def test_sink_refuses_a_missing_stream(nats_admin: Nats) -> None:
    stream, subject = nats_admin.names()
    sink = NatsSink(NATS_URL, subject, stream=stream)
    with pytest.raises(ConfigError, match=f"NATS stream '{stream}' does not exist"):
        await sink.start()


# -- without nats-py -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "what"),
    [("rtinfer.sources.nats", "source"), ("rtinfer.sinks.nats", "sink")],
)
def test_missing_nats_names_the_extra(module: str, what: str) -> None:
    code = (
        "import sys\n"
        "sys.modules['nats'] = None\n"
        "from rtinfer.exceptions import MissingDependency\n"
        "try:\n"
        f"    import {module}\n"
        "except MissingDependency as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    print('imported')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert out == (
        f"the NATS JetStream {what} needs an optional dependency: pip install 'rtinfer[nats]'"
    )


# -- end to end ------------------------------------------------------------------------------


async def test_pipeline_from_a_stream_to_another(nats_admin: Nats) -> None:
    in_stream, in_subject = await nats_admin.stream()
    out_stream, out_subject = await nats_admin.stream()
    n = 60
    ids = [f"e{i}" for i in range(n)]
    await nats_admin.publish(
        in_subject,
        [payload(i, key=f"k{i % 4}", x=i / n) for i in range(n)],
        keys=[f"k{i % 4}" for i in range(n)],
    )
    src = source(in_stream, in_subject, durable="scoring", create_stream=False)
    sink = NatsSink(NATS_URL, out_subject, stream=out_stream)
    pipeline = Pipeline(
        src,
        [
            Decode(Reading),
            Vectorize(["x", "y"]),
            Predict(MicroBatcher(python_model(), max_batch_size=16, max_delay=0.0005)),
            Outputs(),
        ],
        [sink],
        read_size=8,
        max_in_flight=3,
    )
    seen = 0

    def count(batch: Any) -> None:
        nonlocal seen
        seen += len(batch.events) + len(batch.dead)
        if seen >= n:
            pipeline.stop()

    pipeline.observe(count)
    summary = await asyncio.wait_for(pipeline.run(), SAFETY)
    assert summary.events_out == n
    assert summary.dead_letters == 0

    results = [
        msgspec.json.decode(data)
        for data, _ in await nats_admin.read_all(out_stream, out_subject, n)
    ]
    assert sorted(r["id"] for r in results) == sorted(ids)
    assert all(len(r["probabilities"]) == 2 for r in results)

    async def all_acked() -> bool:
        info = await nats_admin.consumer(in_stream, "scoring")
        return info.num_ack_pending == 0 and info.num_pending == 0

    await until(all_acked, "every input to be acknowledged")
