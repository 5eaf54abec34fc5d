"""Streaming inference over WebSocket, against rtinfer's own server and the ``websockets`` client.

Each server runs in a background thread on a free port (as in test_http.py);
the ASGI lifespan starts and closes the models.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from conftest import SAFETY, linear, python_model, wait_until
from rtinfer.http import InferenceApp
from rtinfer.http.websocket import serve_websocket
from rtinfer.models import PythonModel, load_model, tensor
from rtinfer.serving import ModelServer
from rtinfer.types import Arrays
from test_http import KEY, serving

N = 50


@pytest.fixture(scope="module")
def models(model_file: Path) -> ModelServer:
    server = ModelServer(batching={"max_batch_size": 64})
    server.add(load_model(model_file, name="linear"))
    # Slow enough that requests queue behind a running batch: they must batch.
    server.add(python_model(delay=0.02, name="slow"))
    return server


@pytest.fixture(scope="module")
def ws_url(models: ModelServer) -> Iterator[str]:
    with serving(InferenceApp(models)) as base:
        yield base.replace("http://", "ws://")


@pytest.fixture(scope="module")
def ws_url_with_key(model_file: Path) -> Iterator[str]:
    server = ModelServer()
    server.add(load_model(model_file, name="linear"))
    with serving(InferenceApp(server, api_key=KEY)) as base:
        yield base.replace("http://", "ws://")


def request(request_id: str, x: float) -> str:
    return json.dumps(
        {
            "id": request_id,
            "inputs": [{"name": "features", "shape": [1, 2], "datatype": "FP32", "data": [x, 0]}],
        }
    )


async def receive(ws: ClientConnection) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), SAFETY)
    assert isinstance(raw, str), "answers are text frames"
    answer: dict[str, Any] = json.loads(raw)
    return answer


async def receive_all(ws: ClientConnection, count: int) -> dict[str, dict[str, Any]]:
    answers = [await receive(ws) for _ in range(count)]
    by_id = {a["id"]: a for a in answers}
    assert len(by_id) == count, "each request is answered once"
    return by_id


def probabilities(answer: dict[str, Any]) -> list[float]:
    assert "error" not in answer, answer
    (output,) = answer["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == (
        "probabilities",
        "FP32",
        [1, 2],
    )
    data: list[float] = output["data"]
    return data


async def test_many_requests_on_one_connection_are_answered_by_id_and_batched(
    ws_url: str, models: ModelServer
) -> None:
    slow = models.get("slow")
    batches_before = slow.batcher.batches
    async with connect(f"{ws_url}/v2/models/slow/infer/stream") as ws:
        for i in range(N):
            await ws.send(request(f"r{i}", i / 100))
        answers = await receive_all(ws, N)
    assert set(answers) == {f"r{i}" for i in range(N)}
    for i in range(N):
        answer = answers[f"r{i}"]
        assert answer["model_name"] == "slow"
        assert probabilities(answer) == pytest.approx([1 - i / 100, i / 100])
    assert slow.batcher.batches - batches_before < N, "requests on one connection batch together"


async def test_versioned_route(ws_url: str, models: ModelServer) -> None:
    version = models.get("linear").version
    async with connect(f"{ws_url}/v2/models/linear/versions/{version}/infer/stream") as ws:
        await ws.send(request("v", 0.25))
        answer = await receive(ws)
    assert (answer["id"], answer["model_version"]) == ("v", version)
    assert probabilities(answer) == pytest.approx([0.75, 0.25])


async def test_bad_request_gets_its_own_error_and_the_connection_stays_open(ws_url: str) -> None:
    bad = json.dumps(
        {
            "id": "bad",
            "inputs": [{"name": "nope", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}],
        }
    )
    async with connect(f"{ws_url}/v2/models/linear/infer/stream") as ws:
        await ws.send(request("a", 0.5))
        await ws.send(bad)
        await ws.send(request("b", 1.0))
        answers = await receive_all(ws, 3)
        assert set(answers["bad"]) == {"id", "error"}
        assert "no input 'nope'" in answers["bad"]["error"]
        assert probabilities(answers["a"]) == pytest.approx([0.5, 0.5])
        assert probabilities(answers["b"]) == pytest.approx([0.0, 1.0])
        # Still open: another request is answered.
        await ws.send(request("c", 0.0))
        assert probabilities(await receive(ws)) == pytest.approx([1.0, 0.0])


async def test_malformed_json_binary_frames_and_missing_ids_get_errors(ws_url: str) -> None:
    async with connect(f"{ws_url}/v2/models/linear/infer/stream") as ws:
        await ws.send("{not json")
        answer = await receive(ws)
        assert answer["id"] is None
        assert "not valid JSON" in answer["error"]

        await ws.send(b"\x00\x01")
        answer = await receive(ws)
        assert answer["id"] is None
        assert "text frame" in answer["error"]

        await ws.send("[1, 2]")
        assert "JSON object" in (await receive(ws))["error"]

        await ws.send(json.dumps({"inputs": []}))
        assert '"id" string' in (await receive(ws))["error"]

        await ws.send(request("ok", 0.25))
        answer = await receive(ws)
        assert answer["id"] == "ok"
        assert probabilities(answer) == pytest.approx([0.75, 0.25])


async def test_unknown_model_gets_an_error_then_a_close(ws_url: str) -> None:
    async with connect(f"{ws_url}/v2/models/nope/infer/stream") as ws:
        answer = await receive(ws)
        assert answer["id"] is None
        assert "unknown model 'nope'" in answer["error"]
        with pytest.raises(ConnectionClosedError) as closed:
            await asyncio.wait_for(ws.recv(), SAFETY)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4404


async def test_unknown_path_is_refused_at_the_handshake(ws_url: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{ws_url}/v2/models/linear/infer"):
            pass
    assert refused.value.response.status_code == 403


async def test_missing_or_wrong_key_closes_with_1008(ws_url_with_key: str) -> None:
    stream = f"{ws_url_with_key}/v2/models/linear/infer/stream"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        async with connect(stream, additional_headers=headers) as ws:
            with pytest.raises(ConnectionClosedError) as closed:
                await asyncio.wait_for(ws.recv(), SAFETY)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008
        assert "API key" in closed.value.rcvd.reason
    async with connect(stream, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        await ws.send(request("k", 0.5))
        assert probabilities(await receive(ws)) == pytest.approx([0.5, 0.5])


async def test_requests_in_flight_are_bounded_and_the_socket_is_not_read_past_it() -> None:
    """Backpressure, on the ASGI interface itself: past the bound, no frame is received."""
    gate = threading.Event()

    def gated(inputs: Arrays) -> Arrays:
        if inputs["features"].any():  # warm-up batches are all zeros
            gate.wait(SAFETY)
        return linear(inputs)

    server = ModelServer(batching={"max_batch_size": 1})
    server.add(
        PythonModel(
            gated,
            inputs=[tensor("features", "float32", [None, 2])],
            outputs=[tensor("probabilities", "float32", [None, 2])],
            name="gated",
        )
    )
    await server.start()
    app = InferenceApp(server)
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await inbox.put({"type": "websocket.connect"})
    for i in range(5):
        await inbox.put({"type": "websocket.receive", "text": request(f"g{i}", 1.0)})
    scope = {"type": "websocket", "path": "/v2/models/gated/infer/stream", "headers": []}
    try:
        task = asyncio.create_task(serve_websocket(app, scope, inbox.get, send, max_in_flight=2))
        await wait_until(lambda: inbox.qsize() == 3, "two requests read")
        for _ in range(20):
            await asyncio.sleep(0)
        assert inbox.qsize() == 3, "no frame is read while two requests are in flight"
        gate.set()
        await wait_until(
            lambda: len([m for m in sent if m["type"] == "websocket.send"]) == 5, "five answers"
        )
        answers = [json.loads(m["text"]) for m in sent if m["type"] == "websocket.send"]
        assert {a["id"] for a in answers} == {f"g{i}" for i in range(5)}
        await inbox.put({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(task, SAFETY)
    finally:
        gate.set()
        await server.aclose()


async def test_a_passed_deadline_is_answered_per_request(ws_url: str) -> None:
    stream = f"{ws_url}/v2/models/slow/infer/stream"
    async with connect(stream, additional_headers={"X-Request-Timeout-Ms": "0"}) as ws:
        await ws.send(request("late", 0.5))
        answer = await receive(ws)
        assert answer["id"] == "late"
        assert "deadline" in answer["error"]
        await ws.send(request("late-too", 0.5))
        assert (await receive(ws))["id"] == "late-too"


async def test_stream_answers_are_counted_in_the_http_metrics(
    ws_url: str, models: ModelServer
) -> None:
    async with connect(f"{ws_url}/v2/models/linear/infer/stream") as ws:
        await ws.send("{")
        await receive(ws)
    route = "/v2/models/{name}[/versions/{version}]/infer/stream"
    value = models.metrics.registry.get_sample_value(
        "rtinfer_http_requests_total", {"route": route, "status": "400"}
    )
    assert value is not None
    assert value >= 1


async def test_frames_over_the_body_limit_are_refused_and_the_connection_goes_on(
    model_file: Path,
) -> None:
    server = ModelServer()
    server.add(load_model(model_file, name="linear"))
    # A server allowing larger messages than the app (rtinfer serve gives both the same
    # limit, and the server closes with 1009: test_http_server) leaves it to the app.
    with serving(InferenceApp(server, max_body_bytes=4096), server_limit=1 << 20) as base:
        url = base.replace("http://", "ws://") + "/v2/models/linear/infer/stream"
        async with connect(url) as ws:
            big = json.dumps({"id": "big", "inputs": [{"name": "features", "shape": [500, 2],
                              "datatype": "FP32", "data": [0.5] * 1000}]})  # fmt: skip
            assert len(big) > 4096
            await ws.send(big)
            refused = await receive(ws)
            assert refused["id"] is None
            assert "the limit is 4096" in refused["error"]
            await ws.send(request("small", 0.25))
            assert probabilities(await receive(ws)) == [0.75, 0.25]


async def test_x_priority_on_the_upgrade_is_each_requests_traffic_class() -> None:
    """``X-Priority`` on the upgrade request: with four of the limiter's five places taken
    (past best-effort's share), a best-effort connection's request is shed, answered with
    its own error on a connection that stays open, where a critical one is admitted; a
    malformed ``X-Priority`` gets one error message and a close with 1008."""
    gate = threading.Event()

    def gated(inputs: Arrays) -> Arrays:
        if inputs["features"].any():  # warm-up batches are all zeros
            gate.wait(SAFETY)
        return linear(inputs)

    server = ModelServer(batching={"max_batch_size": 1}, max_concurrency=5)
    served = server.add(
        PythonModel(
            gated,
            inputs=[tensor("features", "float32", [None, 2])],
            outputs=[tensor("probabilities", "float32", [None, 2])],
            name="gated",
        )
    )
    try:
        with serving(InferenceApp(server)) as base:
            stream = base.replace("http://", "ws://") + "/v2/models/gated/infer/stream"
            async with connect(stream, additional_headers={"X-Priority": "urgent"}) as ws:
                refused = await receive(ws)
                assert refused["id"] is None
                assert "X-Priority" in refused["error"]
                assert "urgent" in refused["error"]
                with pytest.raises(ConnectionClosedError) as closed:
                    await asyncio.wait_for(ws.recv(), SAFETY)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1008

            limiter = served.limiter
            assert limiter is not None
            assert limiter.limit == 5
            critical_headers = {"X-Priority": "critical"}
            best_effort_headers = {"X-Priority": "best_effort"}
            async with (
                connect(stream, additional_headers=critical_headers) as critical,
                connect(stream, additional_headers=best_effort_headers) as best_effort,
            ):
                for i in range(4):
                    await critical.send(request(f"held{i}", 0.5))
                await wait_until(lambda: limiter.in_flight == 4, "four requests in flight")
                await best_effort.send(request("shed", 0.5))
                shed = await receive(best_effort)
                assert shed["id"] == "shed"
                assert "best_effort call shed" in shed["error"]
                await critical.send(request("fifth", 0.5))
                await wait_until(lambda: limiter.in_flight == 5, "the critical request admitted")
                gate.set()
                answers = await receive_all(critical, 5)
                assert set(answers) == {"held0", "held1", "held2", "held3", "fifth"}
                for answer in answers.values():
                    assert probabilities(answer) == pytest.approx([0.5, 0.5])
                await best_effort.send(request("later", 0.25))  # room again: admitted
                assert probabilities(await receive(best_effort)) == pytest.approx([0.75, 0.25])
    finally:
        gate.set()
    shed_metric = {"limiter": "gated", "priority": "best_effort", "reason": "limit"}
    value = server.metrics.registry.get_sample_value("rtinfer_limiter_rejected_total", shed_metric)
    assert value == 1
