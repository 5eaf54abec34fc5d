"""Replay a JSON Lines file of payments into a broker, and read the decisions back.

    rtinfer demo generate --events 10000 --out payments.jsonl
    python examples/fraud/replay.py publish examples/fraud/redis.yaml payments.jsonl
    rtinfer run examples/fraud/redis.yaml            # Ctrl-C once the decisions are out
    python examples/fraud/replay.py decisions examples/fraud/redis.yaml --count 10000

It reads the same pipeline file (and so the same environment variables) as the pipeline:
``publish`` writes each line to where the pipeline's source reads (keyed by card), with
rtinfer's own sink for that broker; ``decisions`` reads what the pipeline's first sink
wrote, with rtinfer's own source, and prints one JSON line per decision.

Partitioned streams, subjects and topics (Redis, NATS, MQTT: ``partitions: P`` in the
pipeline file, docs/scaling.md): ``publish`` writes each card to its partition
(``crc32(card) % P``), taking ``P`` from the source's ``partitions`` (``--partitions P``
overrides it); ``decisions`` reads every partition of a partitioned sink.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from rtinfer.config import (
    KafkaSinkConfig,
    KafkaSourceConfig,
    MqttSinkConfig,
    MqttSourceConfig,
    NatsSinkConfig,
    NatsSourceConfig,
    RedisSinkConfig,
    RedisSourceConfig,
    load_config,
)
from rtinfer.types import Event, Sink, Source


def sink_to_the_source(config: Any, partitions: int | None = None) -> Sink:
    """A sink writing where the pipeline's source reads (its partitions, when it has some)."""
    if isinstance(config, KafkaSourceConfig):
        from rtinfer.sinks.kafka import KafkaSink

        if partitions is not None:
            raise SystemExit("--partitions is for Redis, NATS and MQTT: Kafka partitions by key")
        topic = config.topics if isinstance(config.topics, str) else config.topics[0]
        return KafkaSink(config.bootstrap_servers, topic)
    if partitions is None:
        partitions = getattr(config, "partitions", None)
    if isinstance(config, RedisSourceConfig):
        from rtinfer.sinks.redis import RedisStreamSink

        return RedisStreamSink(config.url, config.stream, partitions=partitions)
    if isinstance(config, NatsSourceConfig):
        from rtinfer.sinks.nats import NatsSink

        return NatsSink(config.url, config.subject, partitions=partitions)
    if isinstance(config, MqttSourceConfig):
        from rtinfer.sinks.mqtt import MqttSink

        return MqttSink(config.url, config.topic, partitions=partitions)
    raise SystemExit(f"the pipeline's source is {type(config).__name__}: nothing to replay into")


def nats_stream(subject: str) -> str:
    """The stream name replay.py uses for a subject it needs kept: DECISIONS for decisions."""
    return subject.upper().replace(".", "_").replace("-", "_")


async def ensure_nats_streams(config: Any, partitions: int | None = None) -> None:
    """JetStream keeps only what a stream captures: make sure every subject has one."""
    from rtinfer.sources.nats import NatsSource

    places = [(config.source.stream, config.source.subject, partitions)]
    places += [
        (s.stream or nats_stream(s.subject), s.subject, s.partitions)
        for s in [*config.sinks, config.dead_letters]
        if isinstance(s, NatsSinkConfig)
    ]
    for stream, subject, parts in places:
        # Partitioned: the stream stores <subject>.* (one probe consumer per partition).
        owned = list(range(parts)) if parts is not None else None
        probe = NatsSource(
            config.source.url, stream, subject, durable="replay-probe", partitions=parts,
            owned_partitions=owned,
        )  # fmt: skip
        await probe.start()  # creates the stream when it is missing
        await probe.aclose()


def every(config: Any) -> dict[str, Any]:
    """Source options reading every partition of a partitioned sink (none when it is not)."""
    if config.partitions is None:
        return {}
    return {"partitions": config.partitions, "owned_partitions": list(range(config.partitions))}


def source_of_the_sink(config: Any) -> Source:
    """A source reading what the pipeline's sink wrote (its own consumer group)."""
    if isinstance(config, KafkaSinkConfig):
        from rtinfer.sources.kafka import KafkaSource

        return KafkaSource(config.bootstrap_servers, config.topic, group="replay-reader")
    if isinstance(config, RedisSinkConfig):
        from rtinfer.sources.redis import RedisStreamSource

        return RedisStreamSource(
            config.url, config.stream, group="replay-reader", block_ms=200, **every(config)
        )
    if isinstance(config, NatsSinkConfig):
        from rtinfer.sources.nats import NatsSource

        stream = config.stream or nats_stream(config.subject)
        return NatsSource(
            config.url, stream, config.subject, durable="replay-reader", **every(config)
        )
    if isinstance(config, MqttSinkConfig):
        from rtinfer.sources.mqtt import MqttSource

        return MqttSource(config.url, config.topic, client_id="replay-reader", **every(config))
    raise SystemExit(f"the pipeline's sink is {type(config).__name__}: read it directly")


async def publish(pipeline: Path, events: Path, partitions: int | None = None) -> None:
    config = load_config(pipeline)
    if partitions is None:
        partitions = getattr(config.source, "partitions", None)
    if isinstance(config.source, NatsSourceConfig):
        await ensure_nats_streams(config, partitions)
    sink = sink_to_the_source(config.source, partitions)
    await sink.start()
    decoder = msgspec.json.Decoder()
    sent = 0
    with events.open("rb") as lines:
        batch: list[Event] = []
        for line in lines:
            value = line.rstrip(b"\r\n")
            if not value:
                continue
            card = decoder.decode(value).get("card")
            event = Event(value, key=card.encode() if card else None, ingest_time=time.time())
            event.result = value
            batch.append(event)
            if len(batch) == 1000:
                await sink.write(batch)
                await sink.flush()
                sent += len(batch)
                batch = []
        await sink.write(batch)
        await sink.flush()
        sent += len(batch)
    await sink.aclose()
    print(f"published {sent:,} payments to {sink.name}", file=sys.stderr)


async def decisions(pipeline: Path, count: int | None) -> None:
    config = load_config(pipeline)
    source = source_of_the_sink(config.sinks[0])
    await source.start()
    seen = 0
    try:
        while count is None or seen < count:
            events = await source.read(1000)
            if not events:
                break
            for event in events:
                sys.stdout.buffer.write(event.value + b"\n")
            await source.ack([e.position for e in events if e.position is not None])
            seen += len(events)
    finally:
        await source.aclose()
    print(f"read {seen:,} decisions", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("publish", help="write a JSON Lines file where the source reads")
    p.add_argument("pipeline", type=Path)
    p.add_argument("events", type=Path)
    p.add_argument(
        "--partitions",
        type=int,
        help="Redis, NATS, MQTT: write card c to partition crc32(c) %% P (default: the "
        "source's partitions, else none)",
    )
    d = commands.add_parser("decisions", help="print what the pipeline's first sink wrote")
    d.add_argument("pipeline", type=Path)
    d.add_argument("--count", type=int, help="stop after this many (default: never)")
    args = parser.parse_args()
    if args.command == "publish":
        asyncio.run(publish(args.pipeline, args.events, args.partitions))
    else:
        asyncio.run(decisions(args.pipeline, args.count))


if __name__ == "__main__":
    main()
