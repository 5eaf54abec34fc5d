"""The example pipeline files parse and build; replay.py round-trips through a real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import service_missing
from rtinfer.build import build_pipeline
from rtinfer.cli import main
from rtinfer.config import load_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "fraud"
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.mark.parametrize("name", ["pipeline", "kafka", "redis", "nats", "mqtt"])
def test_every_example_pipeline_file_builds(name: str) -> None:
    config = load_config(EXAMPLES / f"{name}.yaml")
    pipeline = build_pipeline(config, file=name)  # builds sources, sinks and the model
    assert pipeline.name.startswith("fraud")


async def test_replay_publishes_and_reads_the_decisions_back(tmp_path: Path) -> None:
    redis = pytest.importorskip("redis.asyncio")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except OSError as exc:
        service_missing(f"no Redis at {REDIS_URL}: {exc}")
    name = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        "REDIS_URL": REDIS_URL,
        "RTINFER_INPUT": f"replay-in-{name}",
        "RTINFER_OUTPUT": f"replay-out-{name}",
        "RTINFER_DEAD_LETTERS": f"replay-dead-{name}",
    }
    events = tmp_path / "payments.jsonl"
    assert main(["demo", "generate", "--events", "300", "--out", str(events)]) == 0
    replay = [sys.executable, str(EXAMPLES / "replay.py")]
    pipeline = EXAMPLES / "redis.yaml"
    try:
        await asyncio.to_thread(
            subprocess.run, [*replay, "publish", str(pipeline), str(events)], env=env, check=True
        )
        assert await client.xlen(env["RTINFER_INPUT"]) == 300
        run = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rtinfer", "run", str(pipeline), "--no-live",
            env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(600):
            if await client.xlen(env["RTINFER_OUTPUT"]) >= 300:
                break
            await asyncio.sleep(0.05)
        run.terminate()
        assert await asyncio.wait_for(run.wait(), 30) == 0
        reader = await asyncio.to_thread(
            subprocess.run,
            [*replay, "decisions", str(pipeline), "--count", "300"],
            env=env,
            check=True,
            capture_output=True,
        )
        out = reader.stdout.decode()
        decisions = [json.loads(line) for line in out.splitlines()]
        ids = {json.loads(line)["id"] for line in events.read_text().splitlines()}
        assert {d["id"] for d in decisions} == ids
        assert {d["decision"] for d in decisions} <= {"approve", "review", "block"}
    finally:
        await client.delete(
            env["RTINFER_INPUT"], env["RTINFER_OUTPUT"], env["RTINFER_DEAD_LETTERS"]
        )
        await client.aclose()
