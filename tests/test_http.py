"""The HTTP front against a real server, with real clients (httpx, tritonclient).

Each server is rtinfer's own HTTP server (``rtinfer serve``'s default) on an event loop
in a background thread, on a free port; the ASGI lifespan starts and closes the models.
Under uvicorn (``--http-server uvicorn``) the app is run by ``test_serve_drain``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import msgspec
import numpy as np
import pytest

from conftest import SAFETY, python_model
from rtinfer.exceptions import ConfigError
from rtinfer.http import ROUTES, InferenceApp
from rtinfer.loop import schedule_loop
from rtinfer.models import PythonModel, load_model, tensor
from rtinfer.serve import app_from_env, build_server, run_server
from rtinfer.serving import ModelServer
from rtinfer.types import Arrays
from test_http_server import running

KEY = "s3cret-key"


def mixed(inputs: Arrays) -> Arrays:
    """Two inputs of two datatypes: ``total = sum(a) + b``."""
    total = inputs["a"].sum(axis=1, keepdims=True).astype(np.float64) + inputs["b"]
    return {"total": total, "count": np.full((len(total), 1), 3, np.int32)}


def mixed_model() -> PythonModel:
    return PythonModel(
        mixed,
        inputs=[tensor("a", "float32", [None, 2]), tensor("b", "int64", [None, 1])],
        name="mixed",
    )


@contextmanager
def serving(app: InferenceApp, server_limit: int | None = None) -> Iterator[str]:
    """Run ``app`` under rtinfer's own HTTP server (``rtinfer serve``'s default) on an
    event loop in a thread; yield its base URL; stop it (gracefully). The server's body
    and message limit is the app's (as ``rtinfer serve`` has it) unless ``server_limit``."""
    with running(app, max_body_bytes=server_limit or app.max_body_bytes) as run:
        yield f"http://127.0.0.1:{run.port}"


@pytest.fixture(scope="module")
def models(model_file: Path) -> ModelServer:
    server = ModelServer(batching={"max_batch_size": 64})
    server.add(load_model(model_file, name="linear"))
    server.add(mixed_model())
    return server


@pytest.fixture(scope="module")
def url(models: ModelServer) -> Iterator[str]:
    with serving(InferenceApp(models, max_body_bytes=64 * 1024)) as base:
        yield base


@pytest.fixture
async def client(url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=url, timeout=SAFETY) as c:
        yield c


def infer_body(rows: list[list[float]], **extra: object) -> dict[str, object]:
    return {
        "id": "r1",
        "inputs": [{"name": "features", "shape": [len(rows), 2], "datatype": "FP32", "data": rows}],
        **extra,
    }


async def assert_healthy(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v2/health/ready")).json() == {"ready": True}
    r = await client.post("/v2/models/linear/infer", json=infer_body([[0.5, 0.0]]))
    assert r.status_code == 200


# -- health and metadata -------------------------------------------------------------


async def test_health_and_server_metadata(client: httpx.AsyncClient) -> None:
    live = await client.get("/v2/health/live")
    assert (live.status_code, live.json()) == (200, {"live": True})
    ready = await client.get("/v2/health/ready")
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    meta = (await client.get("/v2")).json()
    assert meta["name"] == "rtinfer"
    assert "binary_tensor_data" in meta["extensions"]


async def test_model_metadata_with_and_without_version(client: httpx.AsyncClient) -> None:
    meta = (await client.get("/v2/models/linear")).json()
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 2]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}]
    assert meta["platform"] == "onnxruntime_onnx"
    (version,) = meta["versions"]
    again = await client.get(f"/v2/models/linear/versions/{version}")
    assert again.json() == meta
    ready = await client.get(f"/v2/models/linear/versions/{version}/ready")
    assert ready.json() == {"name": "linear", "version": version, "ready": True}
    assert (await client.get("/v2/models/linear/ready")).status_code == 200


# -- inference -----------------------------------------------------------------------


async def test_infer_json_flat_and_nested(client: httpx.AsyncClient) -> None:
    nested = await client.post("/v2/models/linear/infer", json=infer_body([[0.25, 0], [1, 0]]))
    assert nested.status_code == 200, nested.text
    body = nested.json()
    assert body["model_name"] == "linear"
    assert body["id"] == "r1"
    assert body["model_version"]
    (out,) = body["outputs"]
    assert out == {
        "name": "probabilities",
        "datatype": "FP32",
        "shape": [2, 2],
        "data": [0.75, 0.25, 0.0, 1.0],
    }
    flat = infer_body([])
    flat["inputs"] = [
        {"name": "features", "shape": [2, 2], "datatype": "FP32", "data": [0.25, 0, 1, 0]}
    ]
    again = await client.post("/v2/models/linear/infer", json=flat)
    assert again.json()["outputs"][0]["data"] == out["data"]


async def test_infer_two_inputs_and_requested_outputs(client: httpx.AsyncClient) -> None:
    request = {
        "inputs": [
            {"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {"name": "b", "shape": [2, 1], "datatype": "INT64", "data": [10, 20]},
        ],
        "outputs": [{"name": "total"}],
    }
    r = await client.post("/v2/models/mixed/infer", json=request)
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert out == {"name": "total", "datatype": "FP64", "shape": [2, 1], "data": [13.0, 27.0]}
    assert "id" not in r.json()
    request["outputs"] = [{"name": "nope"}]
    bad = await client.post("/v2/models/mixed/infer", json=request)
    assert bad.status_code == 400
    assert "no output 'nope'" in bad.json()["error"]


async def test_infer_binary_request_and_response(client: httpx.AsyncClient) -> None:
    features = np.array([[0.25, 0.0], [0.5, 1.0], [1.0, 0.0]], np.float32)
    header = msgspec.json.encode(
        {
            "inputs": [
                {
                    "name": "features",
                    "shape": [3, 2],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": features.nbytes},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    )
    r = await client.post(
        "/v2/models/linear/infer",
        content=header + features.tobytes(),
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert r.status_code == 200, r.text
    length = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:length])
    (out,) = meta["outputs"]
    assert out["parameters"] == {"binary_data_size": 3 * 2 * 4}
    assert "data" not in out
    result = np.frombuffer(r.content[length:], np.float32).reshape(out["shape"])
    np.testing.assert_allclose(result, [[0.75, 0.25], [0.5, 0.5], [0.0, 1.0]])
    # binary_data_output on the request makes every output binary; here the input is JSON.
    r = await client.post(
        "/v2/models/linear/infer",
        json=infer_body([[0.25, 0.0]], parameters={"binary_data_output": True}),
    )
    length = int(r.headers["inference-header-content-length"])
    assert np.frombuffer(r.content[length:], np.float32).tolist() == [0.75, 0.25]


async def test_score_plain_json(client: httpx.AsyncClient) -> None:
    r = await client.post("/models/linear/score", json={"instances": [[0.25, 0], [1, 0]]})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == [[0.75, 0.25], [0.0, 1.0]]
    one = await client.post("/models/linear/score", json=[0.5, 0.5])
    assert one.json()["predictions"] == [[0.5, 0.5]]
    named = await client.post("/models/mixed/score", json={"instances": [{"a": [1, 2], "b": [3]}]})
    assert named.json()["predictions"] == [{"total": [6.0], "count": [3]}]
    unnamed = await client.post("/models/mixed/score", json={"instances": [[1, 2]]})
    assert unnamed.status_code == 400
    assert "send each instance as an object" in unnamed.json()["error"]


async def test_concurrent_requests_are_batched_together(model_file: Path) -> None:
    server = ModelServer(batching={"max_batch_size": 64})
    slow = python_model(delay=0.2)
    served = server.add(slow)
    with serving(InferenceApp(server)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=SAFETY) as c:
            rows = [[0.5, float(i)] for i in range(16)]
            answers = await asyncio.gather(
                *(c.post("/v2/models/linear/infer", json=infer_body([row])) for row in rows)
            )
            assert all(a.status_code == 200 for a in answers)
            for answer in answers:
                assert answer.json()["outputs"][0]["data"] == [0.5, 0.5]
            metrics = (await c.get("/metrics")).text
    assert served.batcher.rows == 16
    # The first request runs alone while the others queue; they then share batches.
    assert served.batcher.batches < 16
    assert 'rtinfer_batch_size_count{model="linear"}' in metrics
    assert 'rtinfer_http_requests_total{route="/v2/models/{name}/infer",status="200"}' in metrics


# -- bad input: 4xx, and the server stays healthy -------------------------------------

BAD_INFER = [
    pytest.param(b"{not json", "not valid JSON", id="malformed-json"),
    pytest.param(b'{"inputs": 3}', "invalid inference request", id="wrong-schema"),
    pytest.param(
        infer_body([[1, 2, 3]]), "holds 2 values, data has 3", id="shape-does-not-match-data"
    ),
    pytest.param(
        {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
        "expects shape [-1, 2], got [1, 3]",
        id="wrong-shape",
    ),
    pytest.param(
        {"inputs": [{"name": "features", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]}]},
        "expects datatype FP32, got INT64",
        id="wrong-datatype",
    ),
    pytest.param(
        {"inputs": [{"name": "features", "shape": [1, 2], "datatype": "FP99", "data": [1, 2]}]},
        "unknown datatype 'FP99'",
        id="unknown-datatype",
    ),
    pytest.param(
        {"inputs": [{"name": "features", "shape": [1, 2], "datatype": "FP32", "data": ["a", 2]}]},
        "must be numbers",
        id="not-numbers",
    ),
    pytest.param(
        b'{"inputs": [{"name": "features", "shape": [1, 2], "datatype": "FP32", '
        b'"data": [NaN, 1]}]}',
        "not valid JSON",
        id="nan-literal",
    ),
    pytest.param(infer_body([[1e39, 0]]), "must fit FP32", id="too-large-for-fp32"),
    pytest.param(
        b'{"inputs": [{"name": "features", "shape": [1, 2], "datatype": "FP32", '
        b'"data": [1e999, 1]}]}',
        "Number out of range",
        id="overflowing-number",
    ),
    pytest.param(
        {"inputs": [{"name": "nope", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]},
        "has no input 'nope'",
        id="unknown-input",
    ),
    pytest.param({"inputs": []}, "input 'features' is missing", id="missing-input"),
    pytest.param(
        {"inputs": [{"name": "features", "shape": [-1, 2], "datatype": "FP32", "data": [1, 2]}]},
        "must be non-negative",
        id="negative-shape",
    ),
    pytest.param(
        {
            "inputs": [
                {"name": "features", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3]]}
            ]
        },
        "rectangular",
        id="ragged",
    ),
]


@pytest.mark.parametrize(("body", "message"), BAD_INFER)
async def test_bad_infer_requests_get_400(
    client: httpx.AsyncClient, body: bytes | dict[str, object], message: str
) -> None:
    if isinstance(body, bytes):
        r = await client.post("/v2/models/linear/infer", content=body)
    else:
        r = await client.post("/v2/models/linear/infer", json=body)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    assert message in r.json()["error"]
    assert "Traceback" not in r.text
    await assert_healthy(client)


@pytest.mark.parametrize(
    ("b", "message"),
    [
        pytest.param([2**63], "must fit INT64", id="int64-overflow"),
        pytest.param([2**70], "must fit INT64", id="huge-integer"),
        pytest.param([True], "true/false", id="boolean"),
        pytest.param([1.5], "must be whole numbers", id="fraction"),
    ],
)
async def test_integers_that_do_not_fit_get_400(
    client: httpx.AsyncClient, b: list[int], message: str
) -> None:
    request = {
        "inputs": [
            {"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]},
            {"name": "b", "shape": [1, 1], "datatype": "INT64", "data": b},
        ]
    }
    r = await client.post("/v2/models/mixed/infer", json=request)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


async def test_nan_in_binary_data_gets_400(client: httpx.AsyncClient) -> None:
    features = np.array([[np.nan, 0.0]], np.float32)
    header = msgspec.json.encode(
        {
            "inputs": [
                {
                    "name": "features",
                    "shape": [1, 2],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    )
    headers = {"Inference-Header-Content-Length": str(len(header))}
    r = await client.post(
        "/v2/models/linear/infer", content=header + features.tobytes(), headers=headers
    )
    assert r.status_code == 400
    assert "NaN" in r.json()["error"]
    short = await client.post(
        "/v2/models/linear/infer", content=header + b"\0" * 4, headers=headers
    )
    assert short.status_code == 400
    assert "binary_data_size" in short.json()["error"]
    await assert_healthy(client)


async def test_oversize_body_gets_413(client: httpx.AsyncClient) -> None:
    big = infer_body([[0.5, 0.5]] * 10_000)  # well over the fixture's 64 KiB
    r = await client.post("/v2/models/linear/infer", json=big)
    assert r.status_code == 413
    assert "limit is 65536" in r.json()["error"]

    async def chunks() -> object:  # no Content-Length: the limit holds while reading
        for _ in range(100):
            yield b" " * 1024

    streamed = await client.post("/v2/models/linear/infer", content=chunks())  # type: ignore[arg-type]
    assert streamed.status_code == 413
    await assert_healthy(client)


async def test_unknown_model_version_and_route_get_404(client: httpx.AsyncClient) -> None:
    for path in ("/v2/models/nope", "/v2/models/linear/versions/999", "/v2/models/nope/ready"):
        r = await client.get(path)
        assert r.status_code == 404, path
        assert "error" in r.json()
    r = await client.post("/v2/models/nope/infer", json=infer_body([[1, 2]]))
    assert r.status_code == 404
    assert "unknown model 'nope'" in r.json()["error"]
    assert (await client.get("/nowhere")).status_code == 404
    wrong = await client.get("/v2/models/linear/infer")
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "POST"


async def test_bad_timeout_header_gets_400(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v2/models/linear/infer",
        json=infer_body([[1, 2]]),
        headers={"X-Request-Timeout-Ms": "soon"},
    )
    assert r.status_code == 400
    assert "X-Request-Timeout-Ms" in r.json()["error"]


# -- auth ------------------------------------------------------------------------------


async def test_api_key_guards_everything_but_health(model_file: Path) -> None:
    server = ModelServer()
    server.add(load_model(model_file, name="linear"))
    with serving(InferenceApp(server, api_key=KEY)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=SAFETY) as c:
            assert (await c.get("/v2/health/live")).status_code == 200
            assert (await c.get("/v2/health/ready")).status_code == 200
            assert (await c.get("/openapi.json")).status_code == 200
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                for method, path in (
                    ("GET", "/v2"),
                    ("GET", "/v2/models/linear"),
                    ("GET", "/metrics"),
                    ("POST", "/v2/models/linear/infer"),
                ):
                    r = await c.request(method, path, headers=headers, json=infer_body([[1, 0]]))
                    assert r.status_code == 401, (method, path, headers)
                    assert r.headers["www-authenticate"] == "Bearer"
                    assert KEY not in r.text
            good = {"Authorization": f"Bearer {KEY}"}
            r = await c.post("/v2/models/linear/infer", json=infer_body([[1, 0]]), headers=good)
            assert r.status_code == 200
            assert (await c.get("/v2/models/linear", headers=good)).status_code == 200


# -- overload and deadlines -----------------------------------------------------------


async def test_overload_gets_503_with_retry_after() -> None:
    server = ModelServer(batching={"max_batch_size": 1, "max_queue_rows": 1})
    slow = server.add(python_model(delay=0.3))
    with serving(InferenceApp(server)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=SAFETY) as c:
            answers = await asyncio.gather(
                *(c.post("/v2/models/linear/infer", json=infer_body([[0.5, 1]])) for _ in range(6))
            )
            codes = sorted(a.status_code for a in answers)
            assert 200 in codes
            assert 503 in codes
            for answer in answers:
                if answer.status_code == 503:
                    assert int(answer.headers["retry-after"]) >= 1
                    assert "retry" in answer.json()["error"]
            assert (await c.get("/v2/health/ready")).status_code == 200
            metrics = (await c.get("/metrics")).text
    assert 'rtinfer_batcher_rejected_total{model="linear",reason="overloaded"}' in metrics
    assert slow.batcher.rows >= 1


async def test_expired_deadline_gets_504() -> None:
    server = ModelServer()
    server.add(python_model(delay=0.5))
    with serving(InferenceApp(server)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=SAFETY) as c:
            # A caller's time already spent: refused before its body is even read (this
            # one is not JSON), nothing run.
            for route in ("/v2/models/linear/infer", "/models/linear/score"):
                expired = await c.post(
                    route, content=b"{not json", headers={"X-Request-Timeout-Ms": "0"}
                )
                assert expired.status_code == 504, expired.text
                assert "deadline had passed when it arrived" in expired.json()["error"]
            assert server.get("linear").batcher.rows == 0
            late = await c.post(
                "/v2/models/linear/infer",
                json=infer_body([[0.5, 1]]),
                headers={"X-Request-Timeout-Ms": "20"},
            )
            assert late.status_code == 504
            assert (await c.get("/v2/health/ready")).status_code == 200


async def test_a_failing_model_gets_500_without_details() -> None:
    server = ModelServer()
    server.add(python_model(fail_on=0.125))
    with serving(InferenceApp(server)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=SAFETY) as c:
            r = await c.post("/v2/models/linear/infer", json=infer_body([[0.125, 0]]))
            assert r.status_code == 500
            assert r.json() == {
                "error": "model 'linear' failed on this request; the server log has the details"
            }
            ok = await c.post("/v2/models/linear/infer", json=infer_body([[0.25, 0]]))
            assert ok.status_code == 200


# -- OpenAPI ----------------------------------------------------------------------------


async def test_openapi_lists_every_route(client: httpx.AsyncClient) -> None:
    r = await client.get("/openapi.json")
    spec = json.loads(r.content)
    assert spec["openapi"].startswith("3.")
    documented = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    # A pipeline's route is documented per pipeline served (none here; test_serve_pipeline).
    routes = {(method, path) for method, path, _ in ROUTES if not path.startswith("/pipelines/")}
    assert documented == routes
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]
    assert set(infer["responses"]) == {"200", "400", "401", "404", "413", "429", "503", "504"}
    docs = await client.get("/docs")
    assert docs.headers["content-type"].startswith("text/html")
    assert b'url: "openapi.json"' in docs.content


# -- tritonclient: a real third-party Open Inference Protocol client -------------------


async def test_tritonclient_http(url: str) -> None:
    from tritonclient.http.aio import (  # type: ignore[import-untyped]  # no type information
        InferenceServerClient,
        InferInput,
        InferRequestedOutput,
    )

    client = InferenceServerClient(url=url.removeprefix("http://"))
    try:
        assert await client.is_server_live()
        assert await client.is_server_ready()
        assert await client.is_model_ready("linear")
        meta = await client.get_model_metadata("linear")
        assert meta["inputs"][0]["name"] == "features"
        features = np.array([[0.25, 0.0], [1.0, 0.0]], np.float32)
        for binary in (True, False):
            item = InferInput("features", list(features.shape), "FP32")
            item.set_data_from_numpy(features, binary_data=binary)
            result = await client.infer(
                "linear",
                [item],
                outputs=[InferRequestedOutput("probabilities", binary_data=binary)],
                request_id="t1",
            )
            expected = np.array([[0.75, 0.25], [0.0, 1.0]], np.float32)
            np.testing.assert_allclose(result.as_numpy("probabilities"), expected)
    finally:
        await client.close()


# -- building and running a server ----------------------------------------------------


def make_repository(root: Path, model_file: Path) -> Path:
    for version in ("1", "2", "10"):
        folder = root / "linear" / version
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(model_file.read_bytes())
    (root / "linear" / "config.yaml").write_text("max_batch_size: 8\nmax_delay_ms: 0.5\n")
    return root


def test_build_server_from_a_repository(tmp_path: Path, model_file: Path) -> None:
    server = build_server(make_repository(tmp_path / "repo", model_file))
    assert [s.version for s in server.all()] == ["1", "2", "10"]
    assert server.get("linear").version == "10"
    assert server.get("linear").batcher.max_batch_size == 8
    (tmp_path / "repo" / "linear" / "config.yaml").write_text("max_batch: 8\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        build_server(tmp_path / "repo")
    with pytest.raises(ConfigError, match="neither a model file nor"):
        build_server(tmp_path / "missing.onnx")
    assert [s.name for s in build_server(model_file).all()] == ["linear"]


async def test_the_limiter_never_sheds_calls_under_the_latency_target(model_file: Path) -> None:
    server = build_server(model_file, latency_target_s=0.005)
    await server.start()
    try:
        limiter = server.get("linear").limiter
        assert limiter is not None
        assert limiter.latency_target == 0.005
    finally:
        await server.aclose()


def test_binding_beyond_loopback_needs_a_key(
    model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RTINFER_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="set an API key"):
        run_server(model_file, host="0.0.0.0")  # noqa: S104  # the address being refused


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.timeout(60)
async def test_run_server_with_workers_and_summary(tmp_path: Path, model_file: Path) -> None:
    repo = make_repository(tmp_path / "repo", model_file)
    summary = tmp_path / "summary.json"
    port = free_port()
    grpc_port = free_port()
    code = (
        "from rtinfer.serve import run_server; "
        f"run_server({str(repo)!r}, port={port}, workers=2, summary_json={str(summary)!r}, "
        f"log_level='warning', grpc_port={grpc_port})"
    )
    env = {**os.environ, "RTINFER_API_KEY": ""}
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", code, env=env)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=SAFETY) as c:
            for _ in range(int(SAFETY * 4 / 0.05)):
                try:
                    if (await c.get("/v2/health/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the server never became ready")
            ok = await c.post("/v2/models/linear/versions/2/infer", json=infer_body([[1, 0]]))
            assert ok.json()["model_version"] == "2"
            assert (await c.get("/v2/models/linear/versions/3")).status_code == 404
        # The gRPC front on the same models, in both workers (they share the port).
        import grpc

        from rtinfer.grpc import inference_pb2 as pb
        from rtinfer.grpc import inference_pb2_grpc

        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert (await stub.ServerReady(pb.ServerReadyRequest(), timeout=SAFETY)).ready
            request = pb.ModelInferRequest(model_name="linear", model_version="2")
            features = request.inputs.add(name="features", datatype="FP32", shape=[1, 2])
            features.contents.fp32_contents.extend([1.0, 0.0])
            reply = await stub.ModelInfer(request, timeout=SAFETY)
            assert reply.model_version == "2"
            assert list(reply.outputs[0].contents.fp32_contents) == [0.0, 1.0]
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), SAFETY * 3) == 0
    result = json.loads(summary.read_text())
    assert result["workers"] == 2
    assert result["requests"] >= 3
    assert result["errors_by_status"] == {"404": 1}
    assert result["latency_p50_ms"] is not None


# -- schemathesis: fuzz every documented route, expect no 5xx ---------------------------


@pytest.mark.timeout(120)
async def test_schemathesis_finds_no_server_error(
    client: httpx.AsyncClient, url: str, tmp_path: Path
) -> None:
    st = Path(sys.executable).with_name("st")
    if not st.exists():
        pytest.skip("schemathesis is not installed")
    spec = (await client.get("/openapi.json")).json()
    # Pin the path parameters to what is served, so most cases reach the decoders, not a 404.
    for ops in spec["paths"].values():
        for op in ops.values():
            for param in op.get("parameters", []):
                if param["name"] == "name":
                    param["schema"] = {"type": "string", "enum": ["linear", "mixed"]}
                elif param["name"] == "version":
                    param["schema"] = {"type": "string", "enum": ["1"]}
                elif param["name"] == "X-Request-Timeout-Ms":
                    # 0 is a spent deadline: a 504 by design (test_expired_deadline_gets_504).
                    param["schema"] = {"type": "number", "minimum": 1000}
    path = tmp_path / "openapi.json"
    path.write_text(json.dumps(spec))
    process = await asyncio.create_subprocess_exec(
        str(st), "run", str(path), "--url", url, "--checks", "not_a_server_error",
        "--max-examples", "30", "--seed", "1", "--no-color",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
    )  # fmt: skip
    output, _ = await process.communicate()
    assert process.returncode == 0, output.decode()[-4000:]
    await assert_healthy(client)


def test_serve_arguments() -> None:
    import argparse

    from rtinfer.serve import add_serve_arguments

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["model.onnx", "--max-body-bytes", "1MiB", "--workers", "2"])
    assert args.max_body_bytes == 1024 * 1024
    assert (args.host, args.port, args.workers, args.insecure) == ("127.0.0.1", 8000, 2, False)
    assert parser.parse_args(["m.onnx", "--max-body-bytes", "4096"]).max_body_bytes == 4096


# -- found in review: inputs that used to reach numpy or the model ------------------------


async def test_review_findings_are_400s_and_the_server_stays_healthy(
    client: httpx.AsyncClient,
) -> None:
    huge_zero = {"inputs": [{"name": "features", "shape": [0, 2**62], "datatype": "FP32",
                             "data": []}]}  # fmt: skip
    response = await client.post("/v2/models/linear/infer", json=huge_zero)
    assert response.status_code == 400
    assert "dimension above" in response.json()["error"]
    # float(2**63 - 1) rounds to 2**63, one past INT64's top: it must not wrap around.
    wraps = {"inputs": [
        {"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]},
        {"name": "b", "shape": [1, 1], "datatype": "INT64", "data": [9223372036854775807.0]},
    ]}  # fmt: skip
    response = await client.post("/v2/models/mixed/infer", json=wraps)
    assert response.status_code == 400
    assert "must fit INT64" in response.json()["error"]
    nested = (
        b'{"inputs": [{"name": "features", "shape": [1, 2], "datatype": "FP32", "data": '
        + (b"[" * 5000)
        + b"]" * 5000
        + b"}]}"
    )
    response = await client.post(
        "/v2/models/linear/infer", content=nested, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    await assert_healthy(client)


async def test_booleans_are_not_numbers_and_unknown_outputs_are_refused_before_the_model(
    client: httpx.AsyncClient, models: ModelServer
) -> None:
    for rows in ([[True, False]], [[0.5, True]], [[0.5, 0.1], [True, 0.2]]):
        response = await client.post("/v2/models/linear/infer", json=infer_body(rows))
        assert response.status_code == 400, rows
        assert "true/false" in response.json()["error"]
    served = models.get("linear")
    before = served.batcher.rows
    asked = infer_body([[0.5, 0.0]], outputs=[{"name": "nope"}])
    response = await client.post("/v2/models/linear/infer", json=asked)
    assert response.status_code == 400
    assert "no output 'nope'" in response.json()["error"]
    assert served.batcher.rows == before  # refused before the model ran
    await assert_healthy(client)


async def test_bodies_above_the_offload_size_are_answered_the_same(model_file: Path) -> None:
    from rtinfer.http.oip import OFFLOAD_BYTES

    server = ModelServer(batching={"max_batch_size": 1024, "max_queue_rows": 40_000})
    server.add(load_model(model_file, name="linear"))
    rows = [[(i % 100) / 100, 0.0] for i in range(30_000)]  # ~ 400 KiB of JSON
    body = json.dumps(infer_body(rows)).encode()
    assert len(body) > OFFLOAD_BYTES
    with serving(InferenceApp(server)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=SAFETY) as c:
            r = await c.post("/v2/models/linear/infer", content=body)
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert out["shape"] == [30_000, 2]
    assert out["data"][2 * 37 + 1] == pytest.approx(0.37)


async def test_a_request_larger_than_the_queue_is_400_not_retry(model_file: Path) -> None:
    server = ModelServer(batching={"max_batch_size": 10, "max_queue_rows": 100})
    server.add(load_model(model_file, name="linear"))
    with serving(InferenceApp(server)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=SAFETY) as c:
            r = await c.post("/v2/models/linear/infer", json=infer_body([[0.5, 0.0]] * 101))
            assert r.status_code == 400
            assert "at most 100 per request" in r.json()["error"]
            fits = await c.post("/v2/models/linear/infer", json=infer_body([[0.5, 0.0]] * 100))
            assert fits.status_code == 200


def test_http_metrics_count_time_and_merge_across_workers() -> None:
    from prometheus_client import generate_latest

    from rtinfer.http.stats import HttpMetrics, summarize
    from rtinfer.observability.metrics import Metrics

    metrics = Metrics()
    stats = HttpMetrics(metrics)
    route = "/v2/models/{name}/infer"
    for seconds in (0.0004, 0.0005, 0.003, 20.0):  # on a bound counts in it (le)
        stats.observe(route, 200, seconds)
    stats.observe(route, 503, 0.0001)
    stats.observe("/v2/health/ready", 200, 0.00005)
    text = generate_latest(metrics.registry).decode()
    infer = 'route="/v2/models/{name}/infer"'
    assert f'rtinfer_http_requests_total{{{infer},status="200"}} 4.0' in text
    assert f'rtinfer_http_requests_total{{{infer},status="503"}} 1.0' in text
    assert f'rtinfer_http_request_seconds_bucket{{le="0.0001",{infer}}} 1.0' in text
    assert f'rtinfer_http_request_seconds_bucket{{le="0.0005",{infer}}} 3.0' in text
    assert f'rtinfer_http_request_seconds_bucket{{le="0.005",{infer}}} 4.0' in text
    assert f'rtinfer_http_request_seconds_bucket{{le="10.0",{infer}}} 4.0' in text
    assert f'rtinfer_http_request_seconds_bucket{{le="+Inf",{infer}}} 5.0' in text
    assert f"rtinfer_http_request_seconds_count{{{infer}}} 5.0" in text
    snapshot = stats.snapshot()
    assert snapshot["by_status"] == {"200": 5, "503": 1}
    assert snapshot["cumulative_buckets"][-1] == 6
    merged = summarize([snapshot, snapshot])  # two workers' snapshots add up
    assert (merged["requests"], merged["errors"]) == (12, 2)
    assert merged["errors_by_status"] == {"503": 2}
    assert 0.1 <= merged["latency_p50_ms"] <= 0.5


def test_the_serve_app_freezes_its_start_up_heap(
    model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rtinfer serve``'s app puts what start-up made out of the collector's walks once
    its models are loaded (its full collections pause the event loop for less)."""
    monkeypatch.setenv("RTINFER_SERVE_TARGET", str(model_file))
    assert gc.get_freeze_count() == 0
    with serving(app_from_env()) as base:
        assert gc.get_freeze_count() > 0
        assert httpx.get(f"{base}/v2/health/ready", timeout=SAFETY).json() == {"ready": True}


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
@pytest.mark.parametrize(("how", "policy"), [("batch", "SCHED_BATCH"), ("normal", "SCHED_OTHER")])
def test_the_serve_app_schedules_its_event_loop(
    model_file: Path, monkeypatch: pytest.MonkeyPatch, how: str, policy: str
) -> None:
    """Once its models are loaded, ``rtinfer serve``'s event loop runs as ``--loop-sched``
    says; the model's own threads, started before, keep the normal policy."""
    monkeypatch.setenv("RTINFER_SERVE_TARGET", str(model_file))
    monkeypatch.setenv("RTINFER_SERVE_LOOP_SCHED", how)
    app = app_from_env()
    with running(app, max_body_bytes=app.max_body_bytes) as run:

        async def loop_policy() -> int:
            return os.sched_getscheduler(0)

        assert run.call(loop_policy()) == getattr(os, policy)
        model_threads = [t for t in threading.enumerate() if t.name.startswith("rtinfer-model-")]
        assert model_threads
        for thread in model_threads:
            assert os.sched_getscheduler(thread.native_id) == os.SCHED_OTHER


def test_the_loop_schedules_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown loop schedule 'fast'; use one of batch"):
        schedule_loop("fast")
    with pytest.raises(ConfigError, match="--loop-sched must be one of batch, normal"):
        run_server(Path("model.onnx"), loop_sched="fast")
