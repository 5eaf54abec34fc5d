"""Graceful drain of a real ``rtinfer serve`` process on SIGTERM.

The served model (a pipeline file's, made by a factory in a module written here) holds
every real call until the test creates a gate file, so requests are in flight for as
long as the test needs, without any timing: SIGTERM arrives while they are held, the
test checks that readiness (HTTP and gRPC) is false and new requests get 503 with
``Retry-After`` (gRPC ``UNAVAILABLE``) during the drain, then opens the gate; every
request in flight must succeed and the process must exit 0 with its summary written.
With a short ``--drain-s`` the gate stays shut past the drain: the held request must be
given up and the process must stop once the model's thread lets it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from conftest import SAFETY, factory_pipeline
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
    return factory_pipeline(tmp_path, "gated", "drain_helpers:gated_model")


def body(x: float) -> dict[str, object]:
    return {
        "id": f"r{x}",
        "inputs": [{"name": "features", "shape": [1, 2], "datatype": "FP32", "data": [x, 1.0]}],
    }


def grpc_request(x: float) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="gated")
    features = request.inputs.add(name="features", datatype="FP32", shape=[1, 2])
    features.contents.fp32_contents.extend([x, 1.0])
    return request


async def until_in_flight(client: httpx.AsyncClient, n: int) -> None:
    """Poll ``/metrics`` until the gated model's limiter holds ``n`` requests."""
    for _ in range(int(SAFETY / 0.02)):
        if in_flight((await client.get("/metrics")).text) == n:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"{n} request(s) never got in flight")


async def until_not_ready(client: httpx.AsyncClient) -> None:
    """Poll readiness until it answers 503 ``{"ready": false}`` (the drain began)."""
    for _ in range(int(SAFETY / 0.02)):
        ready = await client.get("/v2/health/ready")
        if ready.status_code == 503:
            assert ready.json() == {"ready": False}
            return
        await asyncio.sleep(0.02)
    pytest.fail("readiness never turned false")


def in_flight(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith('rtinfer_limiter_in_flight{limiter="gated"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free now (held open together while chosen)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


async def start_serve(
    tmp_path: Path, *extra: str, http_server: str = "uvicorn", port: int | None = None
) -> tuple[asyncio.subprocess.Process, int, Path]:
    """``rtinfer serve`` on the gated pipeline in a subprocess: the process, its port, log."""
    pipeline = write_pipeline(tmp_path)
    port = port or free_port()
    env = {
        **os.environ,
        "RTINFER_API_KEY": "",
        "RTINFER_TEST_GATE": str(tmp_path / "gate"),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable, "-m", "rtinfer", "serve", str(pipeline), "--port", str(port),
        "--http-server", http_server, "--drain-s", "60",
        "--summary-json", str(tmp_path / "summary.json"), *extra,
    ]  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *command, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
    return process, port, log


async def wait_ready(client: httpx.AsyncClient, process: Any, log: Path) -> None:
    for _ in range(int(SAFETY * 6 / 0.05)):
        try:
            if (await client.get("/v2/health/ready")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.returncode is None, read(log)
        await asyncio.sleep(0.05)
    pytest.fail(f"the server never became ready: {read(log)}")


def read(log: Path) -> str:
    return log.read_text()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("http_server", ["uvicorn", "rtinfer"])
async def test_sigterm_drains_in_flight_requests_while_readiness_is_false(
    tmp_path: Path, http_server: str
) -> None:
    port, grpc_port = free_ports(2)
    process, port, log = await start_serve(
        tmp_path, "--grpc-port", str(grpc_port), http_server=http_server, port=port
    )
    gate = tmp_path / "gate"
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=SAFETY) as c:
            await wait_ready(c, process, log)
            held = [
                asyncio.ensure_future(c.post("/v2/models/gated/infer", json=body(0.25)))
                for _ in range(4)
            ]
            await until_in_flight(c, 4)
            process.send_signal(signal.SIGTERM)
            await until_not_ready(c)
            refused = await c.post("/v2/models/gated/infer", json=body(0.5))
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert "draining" in refused.json()["error"]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
                reply = await stub.ServerReady(pb.ServerReadyRequest(), timeout=SAFETY)
                assert reply.ready is False
                with pytest.raises(grpc.aio.AioRpcError) as refused_rpc:
                    await stub.ModelInfer(grpc_request(0.5), timeout=SAFETY)
                assert refused_rpc.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "draining" in (refused_rpc.value.details() or "")
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
    result = json.loads((tmp_path / "summary.json").read_text())
    assert result["errors_by_status"].get("500") is None
    assert result["errors_by_status"]["503"] >= 2  # the readiness answer and the refusal


@pytest.mark.timeout(120)
@pytest.mark.parametrize("http_server", ["uvicorn", "rtinfer"])
async def test_a_request_held_past_the_drain_limit_is_given_up_and_the_server_stops(
    tmp_path: Path, http_server: str
) -> None:
    """``--drain-s 2`` and a model call that does not return: readiness turns false and new
    requests are refused at once; when the drain's time is up the server stops anyway,
    gives the held request ``--drain-s`` more, then gives it up: rtinfer's server answers
    it 503 and closes its connection, uvicorn answers its own 500. A model call that
    never returns still holds the exit (its thread cannot be stopped: docs/serving.md),
    so the gate opens only once the request has been given up; the process then exits 0
    with its summary written."""
    process, port, log = await start_serve(tmp_path, "--drain-s", "2", http_server=http_server)
    gate = tmp_path / "gate"
    try:
        # The client waits longer than the drain and its grace together: a drain that
        # ignored its limit would leave the held request waiting for the gate, and time out.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=SAFETY * 3) as c:
            await wait_ready(c, process, log)
            held = asyncio.ensure_future(c.post("/v2/models/gated/infer", json=body(0.25)))
            await until_in_flight(c, 1)
            process.send_signal(signal.SIGTERM)
            await until_not_ready(c)
            assert not held.done()  # readiness turned false first
            refused = await c.post("/v2/models/gated/infer", json=body(0.5))
            assert refused.status_code == 503
            assert "draining" in refused.json()["error"]

            (outcome,) = await asyncio.gather(held, return_exceptions=True)
        assert not gate.exists()  # given up while the model still held it
        assert isinstance(outcome, httpx.Response), outcome
        if http_server == "rtinfer":
            assert outcome.status_code == 503, outcome.text
            assert "stopped before answering" in outcome.json()["error"]
        else:
            assert outcome.status_code == 500, outcome.text  # uvicorn's own answer
        assert "still in flight after the 2.0 s drain; stopping anyway" in read(log)
        gate.touch()  # the model's thread returns: nothing holds the exit any more
        assert await asyncio.wait_for(process.wait(), SAFETY * 3) == 0, read(log)
    finally:
        if process.returncode is None:
            gate.touch()
            process.kill()
            await process.wait()
    result = json.loads((tmp_path / "summary.json").read_text())
    assert result["errors_by_status"]["503"] >= 2  # the readiness answer and the refusal
