"""Enrichment look-ups against real Redis and PostgreSQL; the backfill command; YAML stages."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from conftest import service_missing
from features_helpers import DEFINITION, payments, write_jsonl
from rtinfer.exceptions import ConfigError
from rtinfer.features import Enrich
from rtinfer.features.backfill import read_events
from rtinfer.observability.metrics import Metrics
from rtinfer.resilience import BreakerState, CircuitBreaker
from rtinfer.types import Batch, Event

REDIS = "redis://127.0.0.1:6379/0"
POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def batch(cards: list[str]) -> Batch:
    b = Batch([Event(b"", ingest_time=0.0, data={"card": c}) for c in cards])
    b.inputs = {"features": np.ones((len(cards), 1), np.float32)}
    return b


@pytest.fixture
def redis_cards() -> Any:
    try:
        import redis
    except ImportError:
        service_missing("the redis extra is not installed")
    client = redis.Redis.from_url(REDIS, socket_connect_timeout=1)
    try:
        client.ping()
    except Exception as exc:
        service_missing(f"no Redis at {REDIS}: {exc}")
    prefix = f"rtinfer-test-enrich-{os.getpid()}:"
    client.hset(prefix + "a", mapping={"risk": "0.5", "limit": "1000"})
    client.hset(prefix + "b", mapping={"risk": "0.75"})
    yield prefix, client
    client.delete(prefix + "a", prefix + "b")
    client.close()


async def test_redis_lookup_once_per_batch_with_cache(redis_cards: Any) -> None:
    prefix, client = redis_cards
    stage = Enrich(REDIS, key="card", fields=["risk", "limit"], defaults={"limit": -1.0},
                   prefix=prefix, ttl=60, timeout=2.0)  # fmt: skip
    try:
        b = await stage(batch(["a", "b", "a", "zz"]))
        assert b.inputs is not None
        got = b.inputs["features"].tolist()
        assert got[:3] == [[1.0, 0.5, 1000.0], [1.0, 0.75, -1.0], [1.0, 0.5, 1000.0]]
        assert got[3][0] == 1.0
        assert np.isnan(got[3][1])
        assert got[3][2] == -1.0
        assert (stage.calls, stage.fetched) == (1, 3)  # one call for the batch's 3 keys
        client.hset(prefix + "a", mapping={"risk": "0.1"})
        b = await stage(batch(["a", "b"]))  # cached: the change is not seen, no call made
        assert b.inputs is not None
        assert b.inputs["features"][0, 1] == np.float32(0.5)
        assert stage.calls == 1
        stage.ttl = 0.0
        stage._cache.clear()
        b = await stage(batch(["a"]))
        assert b.inputs is not None
        assert b.inputs["features"][0, 1] == np.float32(0.1)
    finally:
        await stage.aclose()


async def test_failed_lookup_falls_back_to_defaults_and_opens_the_breaker() -> None:
    port = free_port()  # nothing listens there
    stage = Enrich(f"redis://127.0.0.1:{port}/0", key="card", fields=["risk"],
                   defaults={"risk": 0.25}, timeout=2.0)  # fmt: skip
    try:
        b = await stage(batch(["a", "b"]))
        assert b.inputs is not None
        assert b.inputs["features"][:, 1].tolist() == [0.25, 0.25]
        assert stage.failures == 1
        assert not stage._cache
        assert breaker_state(stage) == BreakerState.OPEN.value  # opened by the first failure
        b = await stage(batch(["a", "c"]))
        assert b.inputs is not None
        assert b.inputs["features"][:, 1].tolist() == [0.25, 0.25]
        assert (stage.calls, stage.failures, stage.short_circuited) == (1, 1, 1)
        assert fallback_rows(stage, "defaults") == 4
    finally:
        await stage.aclose()


async def test_postgres_lookup_once_per_batch() -> None:
    try:
        import asyncpg
    except ImportError:
        service_missing("the postgres extra is not installed")
    try:
        conn = await asyncpg.connect(POSTGRES, timeout=2)
    except Exception as exc:
        service_missing(f"no PostgreSQL at {POSTGRES}: {exc}")
    table = f"cards_{os.getpid()}"
    await conn.execute(f"CREATE TABLE {table} (card text PRIMARY KEY, risk float8, lim int)")
    await conn.execute(f"INSERT INTO {table} VALUES ('a', 0.5, 10), ('b', 0.75, 20)")  # noqa: S608
    stage = Enrich(POSTGRES, key="card", fields=["risk", "lim"], timeout=5.0,
                   query=f"SELECT card, risk, lim FROM {table} WHERE card = ANY($1)")  # noqa: S608  # fmt: skip
    try:
        b = await stage(batch(["b", "a", "c", "b"]))
        assert b.inputs is not None
        got = b.inputs["features"][:, 1:].tolist()
        assert got[0] == [0.75, 20.0]
        assert got[1] == [0.5, 10.0]
        assert got[3] == [0.75, 20.0]
        assert all(np.isnan(got[2]))
        assert (stage.calls, stage.fetched) == (1, 3)
    finally:
        await stage.aclose()
        await conn.execute(f"DROP TABLE {table}")
        await conn.close()


def test_backfill_command(tmp_path: Path) -> None:
    definition = tmp_path / "features.yaml"
    definition.write_text(yaml.safe_dump(DEFINITION))
    events = write_jsonl(tmp_path / "events.jsonl", payments(500))
    out = tmp_path / "train.parquet"
    run = subprocess.run(
        [sys.executable, "-m", "rtinfer", "features", "backfill", str(definition),
         "--input", str(events), "--output", str(out)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert '"rows"' in run.stdout
    rows = list(read_events(out))
    assert 450 < len(rows) < 500
    assert list(rows[0])[:3] == ["id", "card", "ts"]
    bad = subprocess.run(
        [sys.executable, "-m", "rtinfer", "features", "backfill", str(definition),
         "--input", str(events), "--output", str(tmp_path / "x.xlsx")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert ".parquet, .csv or .jsonl" in bad.stderr


def test_stage_from_a_pipeline_file(tmp_path: Path, model_file: Path) -> None:
    from rtinfer.build import load_pipeline

    definition = tmp_path / "features.yaml"
    definition.write_text(yaml.safe_dump({
        "name": "two", "key": "card", "time": "ts",
        "features": [{"name": "n", "agg": "count", "window": {"sliding": "1m"}},
                     {"name": "s", "agg": "sum", "field": "amount", "window": {"sliding": "1m"}}],
    }))  # fmt: skip
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({
        "source": {"type": "file", "path": str(tmp_path / "in.jsonl")},
        "stages": [{"type": "python", "use": "rtinfer.features:FeatureStage",
                    "args": {"definition": str(definition), "store": str(tmp_path / "state")}}],
        "model": {"path": str(model_file)},
        "sinks": [{"type": "file", "path": str(tmp_path / "out.jsonl")}],
    }))  # fmt: skip
    built = load_pipeline(pipeline)
    assert type(built.stages[1]).__name__ == "FeatureStage"


# -- the circuit breaker around look-ups ----------------------------------------------------


class Clock:
    """Monotonic seconds moved by hand, for the breaker (no waiting in tests)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A ``redis-server`` of our own on a free port, to stop and start again."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None
        self.binary = shutil.which("redis-server") or "redis-server"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Any:
        import redis

        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.tmp)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        for _ in range(200):  # up to ~10 s for the server to listen
            try:
                client.ping()
                return client
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    raise RuntimeError("redis-server exited at start-up") from None
                time.sleep(0.05)
        raise RuntimeError("redis-server did not answer")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Any:
    if shutil.which("redis-server") is None:
        service_missing("no redis-server on PATH to start a private Redis")
    server = PrivateRedis(tmp_path)
    yield server
    server.stop()


def breaker_state(stage: Enrich) -> float | None:
    return stage.metrics.registry.get_sample_value(
        "rtinfer_breaker_state", {"breaker": stage.breaker.name}
    )


def fallback_rows(stage: Enrich, step: str) -> float | None:
    return stage.metrics.registry.get_sample_value(
        "rtinfer_fallback_outputs_total", {"chain": f"enrich:{stage.name}", "step": step}
    )


async def test_breaker_opens_when_redis_goes_away_and_closes_when_it_is_back(
    private_redis: PrivateRedis,
) -> None:
    client = private_redis.start()
    client.hset("card:a", mapping={"risk": "0.5"})
    client.hset("card:b", mapping={"risk": "0.75"})
    clock = Clock()
    breaker = CircuitBreaker("enrich:cards", consecutive_failures=1, open_seconds=5, clock=clock,
                             metrics=(metrics := Metrics()))  # fmt: skip
    stage = Enrich(private_redis.url, key="card", fields=["risk"], defaults={"risk": -1.0},
                   prefix="card:", timeout=5.0, name="cards", breaker=breaker,
                   metrics=metrics)  # fmt: skip
    try:
        b = await stage(batch(["a"]))
        assert b.inputs is not None
        assert b.inputs["features"][:, 1].tolist() == [0.5]
        assert breaker_state(stage) == BreakerState.CLOSED.value

        private_redis.stop()  # the outage
        b = await stage(batch(["b", "a"]))  # "b" is not cached: one failed call
        assert b.inputs is not None
        assert b.inputs["features"][:, 1].tolist() == [-1.0, 0.5]  # "a" still from the cache
        assert (stage.calls, stage.failures) == (2, 1)
        assert breaker_state(stage) == BreakerState.OPEN.value
        for _ in range(5):  # open: no more calls, the defaults at once
            b = await stage(batch(["b", "c", "b"]))
            assert b.inputs is not None
            assert b.inputs["features"][:, 1].tolist() == [-1.0, -1.0, -1.0]
        assert (stage.calls, stage.failures, stage.short_circuited) == (2, 1, 5)
        assert stage.defaulted == 1 + 5 * 3
        assert fallback_rows(stage, "defaults") == 16
        assert fallback_rows(stage, "lookup") == 1 + 1  # the first "a", then "a" cached
        assert metrics.registry.get_sample_value(
            "rtinfer_breaker_rejected_total", {"breaker": "enrich:cards"}) == 5  # fmt: skip

        client = private_redis.start()  # back, empty: write the records again
        client.hset("card:b", mapping={"risk": "0.75"})
        b = await stage(batch(["b"]))  # still open until open_seconds pass
        assert b.inputs is not None
        assert b.inputs["features"][:, 1].tolist() == [-1.0]
        assert stage.calls == 2

        clock.now += 5  # half-open: the next batch's look-up is the probe
        assert breaker_state(stage) == BreakerState.HALF_OPEN.value
        b = await stage(batch(["b", "c"]))
        assert b.inputs is not None
        assert b.inputs["features"][:, 1].tolist() == [0.75, -1.0]  # "c": no record
        assert stage.calls == 3
        assert breaker_state(stage) == BreakerState.CLOSED.value
        b = await stage(batch(["b"]))  # closed, and the answer cached again
        assert b.inputs is not None
        assert b.inputs["features"][:, 1].tolist() == [0.75]
        assert stage.calls == 3
    finally:
        await stage.aclose()
        private_redis.stop()


async def test_breaker_on_a_postgres_lookup_that_cannot_connect() -> None:
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        service_missing("the postgres extra is not installed")
    port = free_port()  # nothing listens there
    stage = Enrich(f"postgresql://postgres@127.0.0.1:{port}/test", key="card", fields=["risk"],
                   query="SELECT card, risk FROM cards WHERE card = ANY($1)", timeout=5.0,
                   defaults={"risk": 0.5},
                   breaker={"consecutive_failures": 2, "open_seconds": 60})  # fmt: skip
    try:
        for cards in (["a"], ["b", "a"]):
            b = await stage(batch(cards))
            assert b.inputs is not None
            assert b.inputs["features"][:, 1].tolist() == [0.5] * len(cards)
        assert (stage.calls, stage.failures) == (2, 2)
        assert stage.breaker.state is BreakerState.OPEN
        b = await stage(batch(["c"]))
        assert (stage.calls, stage.short_circuited) == (2, 1)
    finally:
        await stage.aclose()


def test_bad_breaker_settings_name_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        Enrich("redis://127.0.0.1:1/0", key="card", fields=["risk"], breaker={"open_seconds": 0})
    assert info.value.key == "breaker"
    assert "open_seconds" in str(info.value)


def test_the_breaker_takes_open_s_as_a_pipeline_file_says_it() -> None:
    stage = Enrich("redis://127.0.0.1:1/0", key="card", fields=["risk"], breaker={"open_s": 7})
    assert stage.breaker.open_seconds == 7
