"""``rtinfer serve PIPELINE.yaml``: a pipeline's stages answering requests over HTTP.

Real uvicorn servers (the ``serving`` helper of test_http) and httpx; the pipeline
reads the test events' schema and scores them with the ONNX fixture, whose score is
the event's ``x``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import numpy as np
import pytest

from conftest import SAFETY, payload, wait_until
from rtinfer.broker import Broker
from rtinfer.build import build_pipeline
from rtinfer.config import PipelineConfig, parse_config
from rtinfer.exceptions import CircuitOpen, DeadlineExceeded, Overloaded
from rtinfer.http import InferenceApp
from rtinfer.resilience import BreakerState, Priority
from rtinfer.scoring import PipelineScorer
from rtinfer.serve import add_serve_arguments, build_server
from rtinfer.serving import ModelServer
from test_http import serving


def write_pipeline(tmp_path: Path, model_file: Path, n: int = 0) -> Path:
    events = tmp_path / "in.jsonl"
    events.write_text(
        "".join(json.dumps({"id": f"s{i}", "x": 0.95, "y": 1.0}) + "\n" for i in range(n))
    )
    path = tmp_path / "scoring.yaml"
    path.write_text(
        f"""\
name: scoring
source:
  type: file
  path: {events}
decode:
  fields: {{id: str, x: float, y: float}}
stages:
  - type: vectorize
    fields: [x, y]
model:
  path: {model_file}
  name: linear
  version: "1"
decision:
  thresholds: {{review: 0.5, block: 0.9}}
  include: [x]
sinks:
  - type: file
    path: {tmp_path / "out.jsonl"}
"""
    )
    return path


@pytest.fixture
def url(tmp_path: Path, model_file: Path) -> Iterator[str]:
    server = build_server(write_pipeline(tmp_path, model_file))
    with serving(InferenceApp(server)) as base:
        yield base


async def test_one_event_and_instances_get_the_pipelines_results(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=SAFETY) as client:
        one = await client.post("/pipelines/scoring/score", json={"id": "a", "x": 0.95, "y": 0})
        assert one.status_code == 200, one.text
        assert one.json() == {
            "pipeline": "scoring",
            "results": [
                {"id": "a", "score": pytest.approx(0.95), "decision": "block",
                 "model_version": "1", "x": 0.95}
            ],
        }  # fmt: skip
        many = await client.post(
            "/pipelines/scoring/score",
            json={"instances": [{"id": f"r{i}", "x": i / 10, "y": 1.0} for i in range(10)]},
        )
        assert many.status_code == 200, many.text
        results = many.json()["results"]
        assert [r["id"] for r in results] == [f"r{i}" for i in range(10)]
        assert [r["decision"] for r in results] == ["approve"] * 5 + ["review"] * 4 + ["block"]
        # The pipeline's model is served on the Open Inference Protocol as well.
        infer = await client.post(
            "/v2/models/linear/infer",
            json={"inputs": [{"name": "features", "shape": [1, 2], "datatype": "FP32",
                              "data": [0.25, 0]}]},
        )  # fmt: skip
        assert infer.status_code == 200
        assert infer.json()["outputs"][0]["data"] == [0.75, 0.25]


async def test_bad_events_get_400_naming_the_instance_and_nothing_else_breaks(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=SAFETY) as client:
        score = "/pipelines/scoring/score"
        bad = await client.post(
            score, json={"instances": [{"id": "ok", "x": 0.1, "y": 0}, {"id": "b", "x": "high"}]}
        )
        assert bad.status_code == 400
        error = bad.json()["error"]
        assert "instance 1" in error
        assert "decode" in error
        assert "`$.x`" in error
        for body in (b"{not json", b"[1, 2]", b'{"instances": []}', b'{"id": 5, "x": 1, "y": 1}'):
            response = await client.post(score, content=body)
            assert response.status_code == 400, (body, response.text)
        nan = await client.post(score, content=b'{"id": "n", "x": NaN, "y": 0}')
        assert nan.status_code == 400
        assert (await client.post("/pipelines/nope/score", json={})).status_code == 404
        late = await client.post(
            score, json={"id": "late", "x": 0.1, "y": 0}, headers={"X-Request-Timeout-Ms": "0"}
        )
        assert late.status_code == 504
        assert (await client.post(score, json={"id": "a", "x": 0.1, "y": 0})).status_code == 200


async def test_openapi_describes_the_pipeline_route_with_its_schema(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=SAFETY) as client:
        spec = (await client.get("/openapi.json")).json()
    op = spec["paths"]["/pipelines/scoring/score"]["post"]
    body = op["requestBody"]["content"]["application/json"]["schema"]
    event = body["oneOf"][0]
    name = event["$ref"].rsplit("/", 1)[1]
    assert set(spec["components"]["schemas"][name]["required"]) == {"id", "x", "y"}


async def test_stream_runs_beside_the_requests(tmp_path: Path, model_file: Path) -> None:
    n = 500
    server = build_server(write_pipeline(tmp_path, model_file, n=n), stream=True)
    out = tmp_path / "out.jsonl"
    with serving(InferenceApp(server)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=SAFETY) as client:
            r = await client.post("/pipelines/scoring/score", json={"id": "h", "x": 0.2, "y": 0})
            assert r.json()["results"][0]["decision"] == "approve"
        deadline = time.monotonic() + SAFETY
        while len(out.read_text().splitlines() if out.exists() else []) < n:
            assert time.monotonic() < deadline, "the stream did not finish"
            await asyncio.sleep(0.05)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in written) == sorted(f"s{i}" for i in range(n))
    assert {r["decision"] for r in written} == {"block"}


def memory_pipeline(model_file: Path, *, model_extra: str = "", extra: str = "") -> PipelineConfig:
    """A pipeline on the in-process broker (``readings`` in, ``out`` out) whose model,
    ``linear``, is the ONNX fixture; ``model_extra`` goes in its model's mapping."""
    return parse_config(
        f"""
name: shared
source: {{type: memory, topic: readings, group: g}}
decode: {{fields: {{id: str, key: str, x: float, y: float}}}}
stages: [{{type: vectorize, fields: [x, y]}}]
model: {{path: "{model_file}", name: linear{model_extra}}}
decision: {{thresholds: {{review: 0.5, block: 0.9}}}}
sinks: [{{type: memory, topic: out}}]
{extra}
"""
    )


async def test_a_best_effort_stream_waits_for_the_requests_limiter_and_loses_nothing(
    model_file: Path,
) -> None:
    """``runtime.priority`` takes effect under ``rtinfer serve --stream``: the stream's
    model calls pass the limiter the requests pass, waiting (never shed) where its class
    has no room, while a critical request is still admitted."""
    n = 40
    broker = Broker()
    config = memory_pipeline(model_file, extra="runtime: {priority: best_effort}")
    server = ModelServer(max_concurrency=10)
    server.add_pipeline(PipelineScorer(build_pipeline(config, broker=broker), stream=True))
    await server.start()
    try:
        limiter = server.get("linear").limiter
        assert limiter is not None
        # Critical calls hold the best-effort share of the limit (80%), not all of it.
        held = [limiter.try_acquire(Priority.CRITICAL) for _ in range(8)]
        for i in range(n):
            broker.publish("readings", payload(i, x=0.95))
        await wait_until(lambda: limiter.waiting == 1)
        out = broker.consumer(["out"], "check")
        assert out.fetch_nowait(n) == []  # the stream's batch waits for room
        answer = await server.infer("linear", {"features": np.array([[0.2, 0.0]], np.float32)})
        assert answer.outputs["probabilities"][0].tolist() == pytest.approx([0.8, 0.2])
        assert limiter.waiting == 1  # the critical request went past it
        for permit in held:
            permit.release()
        broker.end_topic("readings")
        results: list[dict[str, object]] = []
        deadline = time.monotonic() + SAFETY
        while len(results) < n:
            assert time.monotonic() < deadline, f"{len(results)} of {n} results"
            results += [msgspec.json.decode(r.value) for r in out.fetch_nowait(n)]
            await asyncio.sleep(0.01)
        assert sorted(r["id"] for r in results) == sorted(f"e{i}" for i in range(n))
        assert {r["decision"] for r in results} == {"block"}
        assert limiter.in_flight == 0
    finally:
        await server.aclose()


async def test_the_pipelines_breaker_is_its_models_breaker_behind_the_server(
    model_file: Path,
) -> None:
    """One model, one breaker: what opens it on the stream or the pipeline's route opens
    it for the model's own route, and one state is exported under its name."""
    config = memory_pipeline(
        model_file, model_extra=", breaker: {consecutive_failures: 2, open_s: 60}"
    )
    server = ModelServer()
    scorer = PipelineScorer(build_pipeline(config, broker=Broker(), metrics=server.metrics))
    server.add_pipeline(scorer)
    await server.start()
    try:
        breaker = server.get("linear").breaker
        assert breaker is not None
        assert breaker is scorer.breaker
        assert breaker.consecutive_failures == 2
        # Load and lateness say nothing of the model's health; its own errors do.
        for exc in (Overloaded("queue full"), DeadlineExceeded("late"), RuntimeError("bad")):
            with contextlib.suppress(type(exc)), breaker.guard():
                raise exc
        assert breaker.state is BreakerState.CLOSED
        with contextlib.suppress(RuntimeError), breaker.guard():
            raise RuntimeError("bad again")
        assert breaker.state is BreakerState.OPEN
        with pytest.raises(CircuitOpen):
            await server.infer("linear", {"features": np.array([[0.2, 0.0]], np.float32)})
        exported = server.metrics.registry.get_sample_value(
            "rtinfer_breaker_state", {"breaker": "model:linear"}
        )
        assert exported == BreakerState.OPEN.value
    finally:
        await server.aclose()


@pytest.mark.timeout(120)
async def test_schemathesis_finds_no_server_error_on_the_pipeline_route(
    url: str, tmp_path: Path
) -> None:
    st = Path(sys.executable).with_name("st")
    async with httpx.AsyncClient(base_url=url, timeout=SAFETY) as client:
        spec = (await client.get("/openapi.json")).json()
        route = spec["paths"]["/pipelines/scoring/score"]
        route["post"]["parameters"] = []  # a 1 ms deadline is a 504, rightly: not fuzzed
        spec["paths"] = {"/pipelines/scoring/score": route}
        path = tmp_path / "openapi.json"
        path.write_text(json.dumps(spec))
        process = await asyncio.create_subprocess_exec(
            str(st), "run", str(path), "--url", url, "--checks", "not_a_server_error",
            "--max-examples", "50", "--seed", "1", "--no-color",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
        )  # fmt: skip
        output, _ = await process.communicate()
        assert process.returncode == 0, output.decode()[-4000:]
        ok = await client.post("/pipelines/scoring/score", json={"id": "a", "x": 0.1, "y": 0})
        assert ok.status_code == 200


def test_serve_takes_a_pipeline_file_and_stream() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["fraud.yaml", "--stream"])
    assert (args.target, args.stream) == (Path("fraud.yaml"), True)
    assert parser.parse_args(["fraud.yaml"]).stream is False
