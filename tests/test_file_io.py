"""JSON Lines in and out: checkpointed restarts, following a growing file, flushed writes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from rtinfer.sinks import JsonLinesSink, StdoutSink
from rtinfer.sources import JsonLinesSource
from rtinfer.types import Event, Position, Sink, Source

SAFETY = 5.0  # seconds: a safety net against a hang, never a timing assertion


def result_event(result: object) -> Event:
    event = Event(b"", ingest_time=0.0)
    event.result = result
    return event


def write_lines(path: Path, n: int, start: int = 0) -> None:
    with path.open("ab") as f:
        f.writelines(b'{"n": %d}\n' % i for i in range(start, start + n))


async def read_all(source: JsonLinesSource, size: int = 4) -> list[Event]:
    events: list[Event] = []
    while batch := await asyncio.wait_for(source.read(size), SAFETY):
        events.extend(batch)
    return events


def test_they_implement_the_protocols(tmp_path: Path) -> None:
    assert isinstance(JsonLinesSource(tmp_path / "in.jsonl"), Source)
    assert isinstance(JsonLinesSink(tmp_path / "out.jsonl"), Sink)
    assert isinstance(StdoutSink(), Sink)


async def test_one_event_per_non_empty_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n\n   \n{"a": 2}\r\n{"a": 3}')  # no newline at the end
    source = JsonLinesSource(path)
    await source.start()
    events = await read_all(source, size=2)
    assert [e.value for e in events] == [b'{"a": 1}', b'{"a": 2}', b'{"a": 3}']
    assert [e.position for e in events] == [
        Position(f"file://{path}", 0, 0),
        Position(f"file://{path}", 0, 3),
        Position(f"file://{path}", 0, 4),
    ]
    assert all(e.ingest_time > 1e9 for e in events)
    assert await source.read(10) == []
    await source.aclose()


async def test_checkpoint_restart_neither_loses_nor_repeats(tmp_path: Path) -> None:
    path, checkpoint = tmp_path / "in.jsonl", tmp_path / "state" / "in.checkpoint"
    write_lines(path, 10)
    first = JsonLinesSource(path, checkpoint=checkpoint)
    await first.start()
    done = await first.read(3)
    done += await first.read(3)
    await first.ack([e.position for e in done if e.position is not None])
    unacked = await first.read(2)  # read but never acknowledged: the "crash"
    assert len(unacked) == 2
    await first.aclose()
    assert checkpoint.read_text().strip() == "6"
    assert not checkpoint.with_name(checkpoint.name + ".tmp").exists()

    second = JsonLinesSource(path, checkpoint=checkpoint)
    await second.start()
    rest = await read_all(second)
    assert [msgspec.json.decode(e.value)["n"] for e in rest] == [6, 7, 8, 9]
    await second.ack([e.position for e in rest if e.position is not None])
    await second.aclose()
    assert [msgspec.json.decode(e.value)["n"] for e in done + rest] == list(range(10))

    third = JsonLinesSource(path, checkpoint=checkpoint)
    await third.start()
    assert await third.read(10) == []
    await third.aclose()


async def test_a_corrupt_checkpoint_says_how_to_recover(tmp_path: Path) -> None:
    path, checkpoint = tmp_path / "in.jsonl", tmp_path / "cp"
    write_lines(path, 1)
    checkpoint.write_text("garbage")
    with pytest.raises(ValueError, match="not a line number; delete it"):
        await JsonLinesSource(path, checkpoint=checkpoint).start()


async def test_a_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=r"input file '.*nope\.jsonl' does not exist"):
        await JsonLinesSource(missing).start()


async def test_follow_waits_for_new_lines_and_whole_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    write_lines(path, 2)
    source = JsonLinesSource(path, follow=True, poll_interval=0.01)
    await source.start()
    assert len(await asyncio.wait_for(source.read(10), SAFETY)) == 2
    reading = asyncio.ensure_future(source.read(10))
    await asyncio.sleep(0)
    assert not reading.done()
    with path.open("ab") as f:
        f.write(b'{"n": ')  # half a line: not an event yet
        f.flush()
        await asyncio.sleep(0.05)
        assert not reading.done()
        f.write(b"2}\n")
    [event] = await asyncio.wait_for(reading, SAFETY)
    assert event.value == b'{"n": 2}'
    assert event.position is not None
    assert event.position.offset == 2
    waiting = asyncio.ensure_future(source.read(10))
    await asyncio.sleep(0)
    await source.aclose()
    assert await asyncio.wait_for(waiting, SAFETY) == []


async def test_jsonlines_sink_writes_on_flush(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "out.jsonl"
    sink = JsonLinesSink(path, fsync=True)
    assert sink.name == f"file://{path}"
    await sink.start()
    await sink.write([result_event({"score": 0.25}), result_event(b'{"raw": true}')])
    assert path.read_bytes() == b""  # buffered until flushed
    await sink.flush()
    assert path.read_bytes() == b'{"score":0.25}\n{"raw": true}\n'
    await sink.flush()  # nothing new: nothing written
    await sink.write([result_event([1, 2])])
    await sink.aclose()  # flushes what is left
    lines = path.read_bytes().splitlines()
    assert [msgspec.json.decode(line) for line in lines] == [{"score": 0.25}, {"raw": True}, [1, 2]]


async def test_jsonlines_sink_appends_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    for value in (1, 2):
        sink = JsonLinesSink(path)
        await sink.start()
        await sink.write([result_event(value)])
        await sink.aclose()
    assert path.read_bytes() == b"1\n2\n"


async def test_stdout_sink_prints_on_flush(capsys: pytest.CaptureFixture[str]) -> None:
    sink = StdoutSink()
    await sink.start()
    await sink.write([result_event({"a": 1}), result_event(b"raw")])
    assert capsys.readouterr().out == ""
    await sink.flush()
    assert capsys.readouterr().out == '{"a":1}\nraw\n'
    await sink.aclose()


async def test_a_cancelled_read_loses_no_lines(tmp_path: Path) -> None:
    """The pipeline cancels a pending read on stop: the lines that read took are not lost."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(b'{"n": %d}\n' % i for i in range(50)))
    source = JsonLinesSource(path)
    await source.start()
    pending = asyncio.create_task(source.read(10))
    await asyncio.sleep(0)  # the read is now waiting for its worker thread
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    offsets = []
    while events := await source.read(10):
        offsets.extend(e.position.offset for e in events if e.position is not None)
    assert offsets == list(range(50))
    await source.aclose()
