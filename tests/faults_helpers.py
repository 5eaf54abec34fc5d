"""Helpers of the fault-injection tests (``tests/test_faults.py``).

Real ``rtinfer run`` worker processes against a real Redis: the pipeline file, starting,
signalling and killing workers, publishing in chunks, waiting until a consumer group has
acknowledged a whole stream, and counting what was lost and duplicated in the output.

Every wait here is a hang guard (``SAFETY`` seconds), never a timing assertion.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from conftest import service_missing

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
GROUP = "g"
SAFETY = 120.0  # seconds: a safety net against a hang, never a timing assertion
POLL = 0.02  # seconds between two looks at Redis


def stream_names(test: str) -> tuple[str, str, str]:
    """Unique input, output and dead-letter stream names for one test."""
    name = uuid.uuid4().hex[:8]
    return (f"test-faults-{test}-in-{name}", f"test-faults-{test}-out-{name}",
            f"test-faults-{test}-dead-{name}")  # fmt: skip


async def redis_or_skip(url: str = REDIS_URL) -> Any:
    """A redis-py asyncio client for ``url``; skip (fail in CI) without redis-py or a server."""
    try:
        import redis.asyncio as redis
    except ImportError:
        service_missing("redis-py is not installed (pip install 'rtinfer[redis]')")
    client = redis.Redis.from_url(url)
    try:
        await client.ping()
    except (OSError, redis.ConnectionError) as exc:
        await client.aclose()
        service_missing(f"no Redis at {url}: {exc}")
    return client


def write_pipeline(
    path: Path,
    model_file: Path,
    *,
    url: str,
    stream: str,
    out: str,
    dead: str,
    claim_idle_ms: int = 1000,
    read_size: int = 256,
) -> Path:
    """The pipeline of every test: Redis stream → decode → vectorize → ONNX → Redis stream."""
    path.write_text(
        f"""
name: faults
source:
  type: redis
  url: "{url}"
  stream: {stream}
  group: {GROUP}
  block_ms: 50
  claim_idle_ms: {claim_idle_ms}
decode: {{fields: {{id: str, x: float, y: float}}}}
stages: [{{type: vectorize, fields: [x, y]}}]
model: {{path: "{model_file}"}}
sinks: [{{type: redis, url: "{url}", stream: {out}}}]
dead_letters: {{type: redis, url: "{url}", stream: {dead}}}
runtime: {{read_size: {read_size}}}
"""
    )
    return path


class Worker:
    """One ``rtinfer run PIPELINE --no-live`` process with ``RTINFER_WORKER=<number>``.

    Its stderr goes to a file (shown when it fails); every start appends to it.
    """

    def __init__(self, pipeline: Path, number: int, log: Path, *, url: str = REDIS_URL) -> None:
        self.pipeline = pipeline
        self.number = number
        self.log = log
        self.url = url
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.exit_codes: list[int] = []

    async def start(self) -> None:
        command = [sys.executable, "-m", "rtinfer", "run", str(self.pipeline), "--no-live"]
        env = {**os.environ, "RTINFER_WORKER": str(self.number), "REDIS_URL": self.url}
        with self.log.open("ab") as stderr:
            self.process = await asyncio.create_subprocess_exec(
                *command, env=env, stdout=subprocess.DEVNULL, stderr=stderr
            )
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def reap(self) -> int | None:
        """The exit status if the process has ended (recorded once), else ``None``."""
        if self.process is None or self.process.returncode is None:
            return None
        code = await self.process.wait()
        if len(self.exit_codes) < self.starts:
            self.exit_codes.append(code)
        return code

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` and wait for the process to end; its exit status."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(sig)
        try:
            await asyncio.wait_for(self.process.wait(), SAFETY)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            raise AssertionError(f"worker {self.number} did not exit:\n{self.stderr()}") from None
        code = await self.reap()
        assert code is not None
        return code

    async def cleanup(self) -> None:
        """Kill the process if it still runs (a failed test)."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


async def create_group(client: Any, stream: str) -> None:
    """Create the input stream and its consumer group (the workers find it there)."""
    await client.xgroup_create(stream, GROUP, id="0", mkstream=True)


async def wait_for_consumers(
    client: Any, stream: str, count: int, workers: Sequence[Worker]
) -> None:
    """Wait until ``count`` consumers have joined the group (their first XREADGROUP)."""

    async def joined() -> bool:
        return len(await client.xinfo_consumers(stream, GROUP)) >= count

    await wait_for(joined, workers, f"{count} consumers in the group of {stream}")


async def wait_for(
    condition: Any, workers: Sequence[Worker], what: str, *, restart: bool = False
) -> None:
    """Poll ``await condition()`` until true. A worker that exits meanwhile fails the wait,
    or, with ``restart``, is started again (as a supervisor would)."""

    async def poll() -> None:
        while not await condition():
            for worker in workers:
                code = await worker.reap()
                if code is not None:
                    if not restart:
                        raise AssertionError(
                            f"worker {worker.number} exited with {code} while waiting for "
                            f"{what}:\n{worker.stderr()}"
                        )
                    await worker.start()
            await asyncio.sleep(POLL)

    try:
        await asyncio.wait_for(poll(), SAFETY)
    except TimeoutError:
        logs = "\n".join(f"worker {w.number}:\n{w.stderr()}" for w in workers)
        raise AssertionError(f"timed out waiting for {what}\n{logs}") from None


async def publish(client: Any, stream: str, entries: Sequence[dict[str, bytes]]) -> list[str]:
    """XADD every entry, in pipelined chunks; the entry ids, in order."""
    ids: list[str] = []
    chunk = 2_000
    for start in range(0, len(entries), chunk):
        async with client.pipeline(transaction=False) as pipe:
            for fields in entries[start : start + chunk]:
                pipe.xadd(stream, fields)
            ids += [i.decode() for i in await pipe.execute()]
    return ids


async def group_done(client: Any, stream: str, total: int) -> bool:
    """Whether the group has read all ``total`` entries and acknowledged every one
    (Redis 7's ``lag`` is 0 and nothing is pending)."""
    if await client.xlen(stream) < total:
        return False
    for info in await client.xinfo_groups(stream):
        if info["name"] in (GROUP, GROUP.encode()):
            if info["pending"] != 0:
                return False
            if info.get("lag") is not None:
                return bool(info["lag"] == 0)
            # Redis cannot tell the lag: has the group read up to the last entry?
            last = (await client.xinfo_stream(stream))["last-generated-id"]
            return bool(info["last-delivered-id"] == last)
    return False


async def pending_of(client: Any, stream: str) -> dict[str, int]:
    """Pending entries per consumer of the group."""
    summary = await client.xpending(stream, GROUP)
    return {
        (c["name"].decode() if isinstance(c["name"], bytes) else c["name"]): int(c["pending"])
        for c in summary["consumers"]
    }


async def read_stream(client: Any, stream: str) -> list[dict[bytes, bytes]]:
    """Every entry's fields, read in chunks."""
    fields: list[dict[bytes, bytes]] = []
    start = "-"
    while True:
        chunk = await client.xrange(stream, min=start, count=10_000)
        if not chunk:
            return fields
        fields += [f for _, f in chunk]
        start = "(" + chunk[-1][0].decode()


async def output_ids(client: Any, stream: str) -> list[str]:
    """The ``id`` of every output record (duplicates included)."""
    decode = msgspec.json.decode
    return [decode(f[b"value"])["id"] for f in await read_stream(client, stream)]


def lost_and_duplicated(expected: Iterable[str], got: Sequence[str]) -> tuple[set[str], int]:
    """The expected ids missing from ``got``, and how many records of ``got`` are repeats."""
    unique = set(got)
    return set(expected) - unique, len(got) - len(unique)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """A private ``redis-server`` on a free port, with the append-only file fsynced on every
    write, which can be shut down (``SHUTDOWN`` writes the AOF) and started again on the same
    port and folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: asyncio.subprocess.Process | None = None
        self.log = folder / "redis.log"

    async def start(self) -> None:
        import redis.asyncio as redis

        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                   "--dir", str(self.folder), "--appendonly", "yes", "--appendfsync", "always",
                   "--save", "", "--logfile", str(self.log)]  # fmt: skip
        self.process = await asyncio.create_subprocess_exec(
            *command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis.from_url(self.url)
        try:
            for _ in range(int(SAFETY / POLL)):
                if self.process.returncode is not None:
                    raise AssertionError(f"redis-server exited:\n{self.log.read_text()[-2000:]}")
                try:
                    if await client.ping():
                        return
                except (OSError, redis.ConnectionError, redis.ResponseError):
                    pass  # not listening yet, or still loading the AOF
                await asyncio.sleep(POLL)
            raise AssertionError("redis-server did not start")
        finally:
            await client.aclose()

    async def shutdown(self) -> None:
        """``SHUTDOWN`` (the AOF is written and fsynced), and wait for the process to end."""
        import redis.asyncio as redis

        client = redis.Redis.from_url(self.url)
        try:
            await client.shutdown()
        finally:
            await client.aclose()
        assert self.process is not None
        await asyncio.wait_for(self.process.wait(), SAFETY)

    async def cleanup(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()
