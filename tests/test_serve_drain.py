"""Graceful drain of a real ``rtinfer serve`` process on SIGTERM.

The served model (a pipeline file's, made by a factory in a module written here) holds
every real call until the test creates a gate file, so requests are in flight for as
long as the test needs, without any timing: SIGTERM arrives while they are held, the
test checks that readiness (HTTP and gRPC) is false and new requests get 503 with
``Retry-After`` during the drain, then opens the gate; every request in flight must
succeed and the process must exit 0 with its summary written.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import grpc
import httpx
import pytest

from conftest import SAFETY
from faults_helpers import free_port
from rtinfer.grpc import inference_pb2 as pb
from rtinfer.grpc import inference_pb2_grpc

GATED = '''
"""A model that holds each real call until the file RTINFER_TEST_GATE exists."""
import os
import time

import numpy as np

from rtinfer.models import PythonModel, tensor


def _predict(inputs):
    features = inputs["features"]
    if features.any():  # not a warm-up call
        while not os.path.exists(os.environ["RTINFER_TEST_GATE"]):
            time.sleep(0.005)
    x = features[:, :1]
    return {"probabilities": np.concatenate([1 - x, x], axis=1).astype(np.float32)}


def gated_model():
    return PythonModel(
        _predict,
        inputs=[tensor("features", "float32", [None, 2])],
        outputs=[tensor("probabilities", "float32", [None, 2])],
        name="gated",
        version="1",
    )
'''


def write_pipeline(tmp_path: Path) -> Path:
    (tmp_path / "drain_helpers.py").write_text(GATED)
    (tmp_path / "in.jsonl").write_text("")
    path = tmp_path / "gated.yaml"
    path.write_text(
        f"""\
name: gated
source: {{type: file, path: {tmp_path / "in.jsonl"}}}
decode:
  fields: {{id: str, x: float, y: float}}
stages:
  - type: vectorize
    fields: [x, y]
model: {{factory: "drain_helpers:gated_model"}}
sinks:
  - type: file
    path: {tmp_path / "out.jsonl"}
"""
    )
    return path


def body(x: float) -> dict[str, object]:
    return {
        "id": f"r{x}",
        "inputs": [{"name": "features", "shape": [1, 2], "datatype": "FP32", "data": [x, 1.0]}],
    }


def in_flight(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith('rtinfer_limiter_in_flight{limiter="gated"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.timeout(120)
async def test_sigterm_drains_in_flight_requests_while_readiness_is_false(tmp_path: Path) -> None:
    pipeline = write_pipeline(tmp_path)
    gate = tmp_path / "gate"
    summary = tmp_path / "summary.json"
    port, grpc_port = free_port(), free_port()
    env = {
        **os.environ,
        "RTINFER_API_KEY": "",
        "RTINFER_TEST_GATE": str(gate),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable, "-m", "rtinfer", "serve", str(pipeline), "--port", str(port),
        "--grpc-port", str(grpc_port), "--drain-s", "60", "--summary-json", str(summary),
    ]  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *command, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=SAFETY) as c:
            for _ in range(int(SAFETY * 6 / 0.05)):
                try:
                    if (await c.get("/v2/health/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.returncode is None, log.read_text()
                await asyncio.sleep(0.05)
            else:
                pytest.fail(f"the server never became ready: {log.read_text()}")
            held = [
                asyncio.ensure_future(c.post("/v2/models/gated/infer", json=body(0.25)))
                for _ in range(4)
            ]
            for _ in range(int(SAFETY / 0.02)):
                if in_flight((await c.get("/metrics")).text) == 4:
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail("the requests never got in flight")

            process.send_signal(signal.SIGTERM)
            for _ in range(int(SAFETY / 0.02)):
                ready = await c.get("/v2/health/ready")
                if ready.status_code == 503:
                    break
                await asyncio.sleep(0.02)
            assert ready.json() == {"ready": False}
            refused = await c.post("/v2/models/gated/infer", json=body(0.5))
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert "draining" in refused.json()["error"]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
                reply = await stub.ServerReady(pb.ServerReadyRequest(), timeout=SAFETY)
                assert reply.ready is False
            assert process.returncode is None  # still draining: the held requests wait

            gate.touch()
            answers = await asyncio.gather(*held)
            assert [a.status_code for a in answers] == [200] * 4  # zero failed in flight
            assert all(a.json()["outputs"][0]["data"] == [0.75, 0.25] for a in answers)
        assert await asyncio.wait_for(process.wait(), SAFETY * 3) == 0, log.read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    result = json.loads(summary.read_text())
    assert result["errors_by_status"].get("500") is None
    assert result["errors_by_status"]["503"] >= 2  # the readiness answer and the refusal
