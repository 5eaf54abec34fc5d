"""Enrichment look-ups against real Redis and PostgreSQL; the backfill command; YAML stages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from conftest import service_missing
from features_helpers import DEFINITION, payments, write_jsonl
from rtinfer.features import Enrich
from rtinfer.features.backfill import read_events
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


async def test_failed_lookup_falls_back_to_defaults() -> None:
    stage = Enrich("redis://127.0.0.1:1/0", key="card", fields=["risk"], defaults={"risk": 0.25},
                   timeout=2.0)  # fmt: skip
    try:
        b = await stage(batch(["a", "b"]))
        assert b.inputs is not None
        assert b.inputs["features"][:, 1].tolist() == [0.25, 0.25]
        assert stage.failures == 1
        assert not stage._cache
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
