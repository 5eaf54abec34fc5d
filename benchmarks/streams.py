"""Redis Streams → model → Redis Streams: rtinfer beside a hand-written redis-py loop.

    python benchmarks/streams.py [--events 100000] [--repeats 3] [--rates 2000,10000]

Both sides do the same work on the demo's card payments: read from a consumer group,
decode and validate each payment, compute the per-card features, score the batch with
the same ONNX model, write each decision to an output stream, acknowledge. The
hand-written loop is what one writes without rtinfer: one asyncio task, XREADGROUP 256
at a time, everything inline, XADDs in a pipeline, then XACK. rtinfer runs the demo's
pipeline with a Redis source and sink, every guarantee on (ack after flush, dead
letters, bounded queues, metrics).

Measured, alternating the two (A B A B), medians over ``--repeats`` with the spread:

1. **drain**: the input stream is filled first, then each side drains it: events/s;
2. **open loop**: a separate process (on the other core) adds payments at a fixed rate;
   latency is from the entry's id (Redis' clock, when it was added) to the decision's
   write, so queueing is not hidden;
3. **workers**: ``rtinfer run --workers 2`` beside one worker, draining, with the CPU
   time the workers used per event (from ``/proc``, start-up excluded): on two cores
   shared with Redis the throughput ratio is bounded by the machine, while the CPU per
   event says what a second worker costs (equal CPU per event means two workers on cores
   of their own do twice the work).

Needs a Redis at ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``). Run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import redis.asyncio as aioredis
from common import FRAUD_SCORING, spread

from rtinfer.demo.events import Transaction
from rtinfer.demo.features import HandCardFeatures
from rtinfer.demo.run import prepare_stream
from rtinfer.demo.training import MODEL_VERSION, ensure_model
from rtinfer.models import OnnxModel

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
ROOT = Path(__file__).resolve().parent.parent

PIPELINE = (
    """
name: bench
source: {{type: redis, url: "{url}", stream: {source}, group: bench, block_ms: 20}}
sinks: [{{type: redis, url: "{url}", stream: {out}}}]
dead_letters: {{type: redis, url: "{url}", stream: {out}-dead}}
"""
    + FRAUD_SCORING
)


async def fill(client: Any, stream: str, values: list[bytes], keys: list[bytes | None]) -> None:
    for start in range(0, len(values), 5000):
        pipe = client.pipeline(transaction=False)
        for value, key in zip(
            values[start : start + 5000], keys[start : start + 5000], strict=True
        ):
            pipe.xadd(stream, {"value": value, "key": key or b""})
        await pipe.execute()


async def hand_written(
    stream: str, out: str, model_path: Path, total: int
) -> tuple[float, list[float]]:
    """The loop one writes by hand: returns (seconds to drain ``total``, latencies in s)."""
    client = aioredis.Redis.from_url(REDIS_URL)
    await client.xgroup_create(stream, "hand", id="0", mkstream=True)
    decoder = msgspec.json.Decoder(Transaction)
    encoder = msgspec.json.Encoder()
    features = HandCardFeatures(capacity=32768)
    model = OnnxModel(model_path, version=MODEL_VERSION)
    model.load()
    done = 0
    latencies: list[float] = []
    started = time.perf_counter()
    while done < total:
        reply = await client.xreadgroup("hand", "worker", {stream: ">"}, count=256, block=20)
        if not reply:
            continue
        entries = reply[0][1]
        ids = [entry_id for entry_id, _ in entries]
        txs = [decoder.decode(fields[b"value"]) for _, fields in entries]
        x = features.transform(txs)
        scores = model.predict({"features": x})["probabilities"][:, 1].tolist()
        pipe = client.pipeline(transaction=False)
        for tx, score in zip(txs, scores, strict=True):
            decision = "block" if score >= 0.8 else "review" if score >= 0.3 else "approve"
            record = {
                "id": tx.id,
                "score": score,
                "decision": decision,
                "model_version": MODEL_VERSION,
                "card": tx.card,
                "amount": tx.amount,
            }
            pipe.xadd(out, {"value": encoder.encode(record), "source_id": tx.id})
        await pipe.execute()
        now = time.time()
        latencies.extend(now - int(i.split(b"-")[0]) / 1000 for i in ids)
        await client.xack(stream, "hand", *ids)
        done += len(ids)
    elapsed = time.perf_counter() - started
    await client.aclose()
    return elapsed, latencies


async def produce(stream: str, events: int, rate: float) -> None:
    """Add ``events`` payments at ``rate`` per second (open loop), in small pipelines."""
    values, keys = prepare_stream(events)
    client = aioredis.Redis.from_url(REDIS_URL)
    sent = 0
    began = time.perf_counter()
    while sent < events:
        due = min(events, int((time.perf_counter() - began) * rate) + 1)
        if due > sent:
            pipe = client.pipeline(transaction=False)
            for value, key in zip(values[sent:due], keys[sent:due], strict=True):
                pipe.xadd(stream, {"value": value, "key": key or b""})
            await pipe.execute()
            sent = due
        await asyncio.sleep(0.0005)
    await client.aclose()


def start_producer(stream: str, events: int, rate: float) -> subprocess.Popen[bytes]:
    """The open-loop producer, in its own process on the other core where possible."""
    command = [sys.executable, __file__, "--produce", stream, "--rate", str(rate)]
    command += ["--events", str(events)]
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) > 1:
        command = ["taskset", "-c", "1", *command]
    return subprocess.Popen(command, cwd=ROOT)  # noqa: S603


def run_rtinfer(
    source: str, out: str, model_path: Path, workers: int, tmp: Path
) -> subprocess.Popen[bytes]:
    path = tmp / f"{source}.yaml"
    path.write_text(
        PIPELINE.format(
            url=REDIS_URL, source=source, out=out, model=model_path, version=MODEL_VERSION
        )
    )
    command = [sys.executable, "-m", "rtinfer", "run", str(path), "--no-live"]
    command += ["--summary-json", str(tmp / f"{source}.json"), "--workers", str(workers)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, cwd=ROOT)  # noqa: S603


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and every process below it."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return total


async def drain_rtinfer(
    client: Any, source: str, out: str, model_path: Path, total: int, workers: int, tmp: Path
) -> tuple[float, float]:
    """Seconds for rtinfer to write ``total`` decisions (from its first to its last), and
    the CPU seconds its processes used meanwhile (start-up excluded)."""
    process = run_rtinfer(source, out, model_path, workers, tmp)
    first = None
    cpu_first = 0.0
    while True:
        n = await client.xlen(out)
        if n and first is None:
            first = time.perf_counter()
            cpu_first = tree_cpu_seconds(process.pid)
        if n >= total:
            break
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - (first or time.perf_counter())
    cpu = tree_cpu_seconds(process.pid) - cpu_first
    process.terminate()
    process.wait(timeout=30)
    return elapsed, cpu


async def open_loop(
    side: str, rate: float, events: int, model_path: Path, tmp: Path
) -> tuple[float, float]:
    """p50 and p99 latency (ms) of one side at ``rate`` events/s for ``events`` events."""
    client = aioredis.Redis.from_url(REDIS_URL)
    name = uuid.uuid4().hex[:8]
    source, out = f"bench-in-{name}", f"bench-out-{name}"
    await client.xgroup_create(source, "bench", id="0", mkstream=True)
    try:
        if side == "hand":
            producer = start_producer(source, events, rate)
            _, latencies = await hand_written(source, out, model_path, events)
            producer.wait(timeout=60)
            return float(np.percentile(latencies, 50)) * 1e3, float(
                np.percentile(latencies, 99)
            ) * 1e3
        process = run_rtinfer(source, out, model_path, 1, tmp)
        await asyncio.sleep(2.0)  # model loaded and warmed before the clock starts
        producer = start_producer(source, events, rate)
        while await client.xlen(out) < events:  # noqa: ASYNC110 - polling Redis, not a flag
            await asyncio.sleep(0.01)
        producer.wait(timeout=60)
        process.terminate()
        process.wait(timeout=30)
        summary = json.loads((tmp / f"{source}.json").read_text())
        return summary["latency_ms"]["p50"], summary["latency_ms"]["p99"]
    finally:
        await client.delete(source, out, f"{out}-dead")
        await client.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rates", default="2000,10000")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--produce", help=argparse.SUPPRESS)  # the open-loop producer's mode
    parser.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.produce:
        await produce(args.produce, args.events, args.rate)
        return
    rates = [float(r) for r in args.rates.split(",") if r]
    latency: dict[tuple[str, float], list[tuple[float, float]]] = {}
    model_path = ensure_model()
    values, keys = prepare_stream(args.events)
    client = aioredis.Redis.from_url(REDIS_URL)
    hand_eps: list[float] = []
    ours_eps: list[float] = []
    two_eps: list[float] = []
    cpu_per_event: dict[str, list[float]] = {"ours": [], "two": []}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for repeat in range(args.repeats):
            print(f"repeat {repeat + 1}/{args.repeats}", file=sys.stderr)
            for side in ("hand", "ours", "two"):
                name = uuid.uuid4().hex[:8]
                source, out = f"bench-in-{name}", f"bench-out-{name}"
                await fill(client, source, values, keys)
                try:
                    if side == "hand":
                        elapsed, _ = await hand_written(source, out, model_path, args.events)
                        hand_eps.append(args.events / elapsed)
                    else:
                        workers = 1 if side == "ours" else 2
                        elapsed, cpu = await drain_rtinfer(
                            client, source, out, model_path, args.events, workers, tmp
                        )
                        (ours_eps if side == "ours" else two_eps).append(args.events / elapsed)
                        cpu_per_event[side].append(1e6 * cpu / args.events)
                finally:
                    await client.delete(source, out, f"{out}-dead")
            for rate in rates:
                for side in ("hand", "ours"):
                    got = await open_loop(side, rate, int(rate * args.seconds), model_path, tmp)
                    latency.setdefault((side, rate), []).append(got)
    await client.aclose()
    ratio = [o / h for o, h in zip(ours_eps, hand_eps, strict=True)]
    scale = [t / o for t, o in zip(two_eps, ours_eps, strict=True)]
    print(json.dumps({"events": args.events, "repeats": args.repeats}))
    print(f"{'hand-written redis-py loop, events/s':40} {spread(hand_eps):>30}")
    print(f"{'rtinfer, 1 worker, events/s':40} {spread(ours_eps):>30}")
    print(f"{'rtinfer / hand-written':40} {spread(ratio, '{:.2f}'):>30}")
    print(f"{'rtinfer, 2 workers, events/s':40} {spread(two_eps):>30}")
    print(f"{'2 workers / 1 worker':40} {spread(scale, '{:.2f}'):>30}")
    # What a second worker costs per event: with a core of its own (and Redis on another),
    # 2 workers / 1 worker approaches 2 x (1 worker's CPU per event / 2 workers').
    efficiency = [o / t for o, t in zip(cpu_per_event["ours"], cpu_per_event["two"], strict=True)]
    print(f"{'rtinfer CPU µs/event, 1 worker':40} {spread(cpu_per_event['ours'], '{:.1f}'):>30}")
    print(f"{'rtinfer CPU µs/event, 2 workers':40} {spread(cpu_per_event['two'], '{:.1f}'):>30}")
    print(f"{'CPU per event, 1 worker / 2 workers':40} {spread(efficiency, '{:.2f}'):>30}")
    for (side, rate), runs in sorted(latency.items()):
        who = "hand-written" if side == "hand" else "rtinfer"
        for i, q in enumerate(("p50", "p99")):
            label = f"{who} at {rate:,.0f}/s, {q} ms"
            print(f"{label:40} {spread([r[i] for r in runs], '{:.2f}'):>30}")


if __name__ == "__main__":
    asyncio.run(main())
