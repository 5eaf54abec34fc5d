"""Pipelines built from YAML files with the broker connectors, run against the real brokers.

Also the contract every delivery-counting source relies on: an event carrying the header
``rtinfer-dead-reason`` is dead-lettered with that reason and acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

import kafka_broker
from conftest import payload
from rtinfer.broker import Broker
from rtinfer.build import build_pipeline, load_pipeline
from rtinfer.config import parse_config
from rtinfer.pipeline import Pipeline
from rtinfer.types import DEAD_REASON_HEADER

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

#: The session's Kafka-compatible broker (tansu), started by kafka_broker.
kafka = kafka_broker.kafka
NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")


async def test_an_event_marked_undeliverable_is_dead_lettered_and_acknowledged(
    model_file: Path,
) -> None:
    broker = Broker()
    broker.publish("in", payload(0))
    broker.publish("in", payload(1), headers={DEAD_REASON_HEADER: b"delivered 6 times"})
    broker.publish("in", payload(2))
    broker.end_topic("in")
    config = parse_config(
        f"""
        source: {{type: memory, topic: in}}
        decode: {{fields: {{id: str, x: float, y: float}}}}
        stages: [{{type: vectorize, fields: [x, y]}}]
        model: {{path: "{model_file}"}}
        sinks: [{{type: memory, topic: out}}]
        dead_letters: {{type: memory, topic: dead}}
        """
    )
    summary = await build_pipeline(config, broker=broker).run()
    assert (summary.events_out, summary.dead_letters) == (2, 1)
    dead = [json.loads(r.value) for r in broker.consumer("dead", "check").fetch_nowait(10)]
    assert [(d["id"], d["stage"], d["reason"]) for d in dead] == [
        ("memory://in/0/1", "source", "delivered 6 times")  # not decoded: id by position
    ]
    assert broker.committed("rtinfer", "in") == [3]


def pipeline_yaml(tmp_path: Path, model_file: Path, source: str, sink: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        f"""
name: connectors
source: {source}
decode: {{fields: {{id: str, x: float, y: float}}}}
stages: [{{type: vectorize, fields: [x, y]}}]
model: {{path: "{model_file}"}}
decision: {{output: probabilities, thresholds: {{block: 0.5}}}}
sinks: [{sink}]
"""
    )
    return path


async def test_redis_stream_to_redis_stream_from_a_pipeline_file(
    tmp_path: Path, model_file: Path
) -> None:
    redis = pytest.importorskip("redis.asyncio")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except OSError as exc:
        from conftest import service_missing

        service_missing(f"no Redis at {REDIS_URL}: {exc}")
    name = uuid.uuid4().hex[:8]
    source, out = f"test-in-{name}", f"test-out-{name}"
    try:
        for i in range(50):
            await client.xadd(source, {"value": payload(i, x=(i % 4) / 4)})
        path = pipeline_yaml(
            tmp_path,
            model_file,
            f"{{type: redis, url: '{REDIS_URL}', stream: {source}, group: g, block_ms: 50}}",
            f"{{type: redis, url: '{REDIS_URL}', stream: {out}}}",
        )
        pipeline = load_pipeline(path)

        pipeline.observe(lambda b: pipeline.stop() if pipeline.events_out >= 50 else None)
        await pipeline.run()
        entries = await client.xrange(out)
        results = [msgspec.json.decode(fields[b"value"]) for _, fields in entries]
        assert sorted(r["id"] for r in results) == sorted(f"e{i}" for i in range(50))
        assert {r["decision"] for r in results} == {"approve", "block"}
        assert (await client.xpending(source, "g"))["pending"] == 0
    finally:
        await client.delete(source, out)
        await client.aclose()


async def test_nats_to_nats_from_a_pipeline_file(tmp_path: Path, model_file: Path) -> None:
    nats = pytest.importorskip("nats")
    try:
        nc = await nats.connect(NATS_URL, connect_timeout=2, max_reconnect_attempts=0)
    except Exception as exc:  # nats-py raises its own and OS errors
        from conftest import service_missing

        service_missing(f"no NATS server at {NATS_URL}: {exc!r}")
    js = nc.jetstream()
    name = uuid.uuid4().hex[:8]
    stream_in, stream_out = f"IN{name}", f"OUT{name}"
    try:
        await js.add_stream(name=stream_out, subjects=[f"out.{name}"])
        path = pipeline_yaml(
            tmp_path,
            model_file,
            f"{{type: nats, url: '{NATS_URL}', stream: {stream_in}, subject: 'in.{name}', "
            f"fetch_timeout_s: 0.2}}",
            f"{{type: nats, url: '{NATS_URL}', subject: 'out.{name}', stream: {stream_out}}}",
        )
        pipeline = load_pipeline(path)
        pipeline.observe(lambda b: pipeline.stop() if pipeline.events_out >= 30 else None)
        run = asyncio.create_task(pipeline.run())
        await asyncio.wait_for(pipeline.ready.wait(), 10)
        for i in range(30):
            await js.publish(f"in.{name}", payload(i))
        await asyncio.wait_for(run, 20)
        info = await js.stream_info(stream_out)
        assert info.state.messages == 30
        sub = await js.pull_subscribe(f"out.{name}", durable="check")
        msgs = await sub.fetch(30, timeout=5)
        assert sorted(json.loads(m.data)["id"] for m in msgs) == sorted(f"e{i}" for i in range(30))
    finally:
        for stream in (stream_in, stream_out):
            with contextlib.suppress(Exception):  # best-effort clean-up of a test stream
                await js.delete_stream(stream)
        await nc.close()


async def test_the_consumer_lag_is_exported_while_running(model_file: Path) -> None:
    broker = Broker(default_partitions=2)
    for i in range(300):
        broker.publish("lagging", payload(i), key=str(i % 7).encode())
    config = parse_config(
        f"""
        source: {{type: memory, topic: lagging}}
        decode: {{fields: {{id: str, x: float, y: float}}}}
        stages: [{{type: vectorize, fields: [x, y]}}]
        model: {{path: "{model_file}"}}
        sinks: [{{type: memory, topic: out}}]
        runtime: {{read_size: 10, max_in_flight: 1}}
        """
    )
    pipeline = build_pipeline(config, broker=broker)
    pipeline.lag_interval = 0.001
    seen: list[float] = []

    def sample(_batch: object) -> None:
        value = pipeline.metrics.registry.get_sample_value(
            "rtinfer_consumer_lag", {"pipeline": "pipeline", "source": "memory://lagging"}
        )
        if value is not None:
            seen.append(value)
        if pipeline.events_out >= 300:
            pipeline.stop()

    pipeline.observe(sample)
    await pipeline.run()
    assert seen, "the lag was never exported"
    assert max(seen) > 0  # events were waiting while it ran
    assert all(0 <= v <= 300 for v in seen)
    assert broker.lag("rtinfer", "lagging") == 0


async def test_redis_source_lag_counts_undelivered_and_pending() -> None:
    redis = pytest.importorskip("redis.asyncio")
    from rtinfer.sources.redis import RedisStreamSource

    client = redis.Redis.from_url(REDIS_URL)
    stream = f"test-lag-{uuid.uuid4().hex[:8]}"
    try:
        for i in range(5):
            await client.xadd(stream, {"value": payload(i)})
        source = RedisStreamSource(REDIS_URL, stream, group="g", block_ms=50)
        await source.start()
        events = await source.read(3)
        assert await source.lag() == 5  # 3 pending + 2 never delivered
        await source.ack([e.position for e in events if e.position is not None])
        assert await source.lag() == 2
        await source.aclose()
    finally:
        await client.delete(stream)
        await client.aclose()


async def test_nats_source_lag_counts_undelivered_and_unacknowledged() -> None:
    nats = pytest.importorskip("nats")
    from rtinfer.sources.nats import NatsSource

    name = uuid.uuid4().hex[:8]
    source = NatsSource(NATS_URL, f"LAG{name}", f"lag.{name}", fetch_timeout_s=0.2)
    await source.start()
    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    try:
        for i in range(5):
            await js.publish(f"lag.{name}", payload(i))
        events = await source.read(3)  # a pull may bring fewer
        assert 1 <= len(events) <= 3
        assert await source.lag() == 5
        await source.ack([e.position for e in events if e.position is not None])
        assert await source.lag() == 5 - len(events)
    finally:
        await source.aclose()
        await js.delete_stream(f"LAG{name}")
        await nc.close()


async def _run_until(pipeline: Pipeline, count: int, feed: Any) -> None:
    """Run ``pipeline`` until it wrote ``count`` results; ``feed()`` publishes once it is ready."""
    pipeline.observe(lambda _b: pipeline.stop() if pipeline.events_out >= count else None)
    run = asyncio.create_task(pipeline.run())
    await asyncio.wait_for(pipeline.ready.wait(), 20)
    await feed()
    await asyncio.wait_for(run, 60)


async def test_kafka_to_kafka_from_a_pipeline_file(
    tmp_path: Path, model_file: Path, kafka: str
) -> None:
    from confluent_kafka import Consumer, Producer

    from kafka_broker import FAST_CONSUMER, create_topics, delete_topics

    name = uuid.uuid4().hex[:8]
    topic_in, topic_out = f"in-{name}", f"out-{name}"
    create_topics(kafka, [topic_in, topic_out], 2)
    settings = json.dumps(FAST_CONSUMER)
    path = pipeline_yaml(
        tmp_path,
        model_file,
        f"{{type: kafka, bootstrap_servers: '{kafka}', topics: {topic_in}, group: g-{name}, "
        f"config: {settings}}}",
        f"{{type: kafka, bootstrap_servers: '{kafka}', topic: {topic_out}}}",
    )
    pipeline = load_pipeline(path)

    async def feed() -> None:
        producer = Producer({"bootstrap.servers": kafka})
        for i in range(50):
            producer.produce(topic_in, payload(i), key=str(i % 5).encode())
        await asyncio.to_thread(producer.flush, 10)

    try:
        await _run_until(pipeline, 50, feed)
        reader = Consumer(
            {
                "bootstrap.servers": kafka,
                "group.id": f"check-{name}",
                **FAST_CONSUMER,
                "auto.offset.reset": "earliest",
            }
        )
        reader.subscribe([topic_out])
        got: list[str] = []
        for _ in range(200):
            messages = await asyncio.to_thread(reader.consume, 50, 0.2)
            got += [json.loads(m.value())["id"] for m in messages if m.error() is None]
            if len(got) >= 50:
                break
        reader.close()
        assert sorted(got) == sorted(f"e{i}" for i in range(50))
    finally:
        delete_topics(kafka, [topic_in, topic_out])


async def test_mqtt_to_mqtt_from_a_pipeline_file(tmp_path: Path, model_file: Path) -> None:
    pytest.importorskip("aiomqtt")
    import aiomqtt

    url = os.environ.get("MQTT_URL", "mqtt://127.0.0.1:1883")
    host, _, port = url.removeprefix("mqtt://").partition(":")
    name = uuid.uuid4().hex[:8]
    path = pipeline_yaml(
        tmp_path,
        model_file,
        f"{{type: mqtt, url: '{url}', topic: 'in/{name}', client_id: 'w-{name}'}}",
        f"{{type: mqtt, url: '{url}', topic: 'out/{name}'}}",
    )
    pipeline = load_pipeline(path)
    got: list[str] = []
    try:
        async with aiomqtt.Client(host, int(port or 1883)) as reader:
            await reader.subscribe(f"out/{name}", qos=1)

            async def feed() -> None:
                async with aiomqtt.Client(host, int(port or 1883)) as writer:
                    for i in range(40):
                        await writer.publish(f"in/{name}", payload(i), qos=1)

            await _run_until(pipeline, 40, feed)
            async with asyncio.timeout(10):
                async for message in reader.messages:
                    got.append(json.loads(message.payload)["id"])  # type: ignore[arg-type]
                    if len(got) == 40:
                        break
    except aiomqtt.MqttError as exc:
        from conftest import service_missing

        service_missing(f"no MQTT broker at {url}: {exc}")
    assert sorted(got) == sorted(f"e{i}" for i in range(40))
