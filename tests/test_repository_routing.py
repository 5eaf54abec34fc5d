"""Canary routing (a sticky share by routing key) and shadow copies (compared, never returned),
against a real server and real clients."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import SAFETY, python_model, wait_until
from rtinfer.http import InferenceApp
from rtinfer.models import PythonModel, tensor
from rtinfer.repository import Canary, ModelManager, UpdateRefused, compare_outputs
from rtinfer.serve import build_server
from rtinfer.serving import ModelServer
from rtinfer.types import Arrays
from test_http import infer_body, serving
from test_repository import MANAGE, MKEY, expected, make_repo


def linear_model(version: str, predict: Callable[[Arrays], Arrays] | None = None) -> PythonModel:
    if predict is None:
        model = python_model()
        model.version = version
        return model
    return PythonModel(
        predict,
        inputs=[tensor("features", "float32", [None, 2])],
        outputs=[tensor("probabilities", "float32", [None, 2])],
        name="linear",
        version=version,
    )


# -- canary -----------------------------------------------------------------------------


async def test_canary_share_over_10000_keys_is_within_2_points_and_sticky(tmp_path: Path) -> None:
    server = build_server(make_repo(tmp_path / "repo", "1", "2"))
    await server.start()
    manager = ModelManager(server)
    try:
        server.promote("linear", "1")
        manager.canary("linear", "2", 10)
        keys = [f"card-{i}" for i in range(10_000)]
        first = [server.route("linear", key=key).version for key in keys]
        share = first.count("2") / len(keys)
        assert abs(share - 0.10) <= 0.02, share
        assert [server.route("linear", key=key).version for key in keys] == first  # sticky
        # A larger share keeps the keys already on the candidate there.
        manager.canary("linear", "2", 30)
        wider = [server.route("linear", key=key).version for key in keys]
        assert all(w == "2" for f, w in zip(first, wider, strict=True) if f == "2")
        assert abs(wider.count("2") / len(keys) - 0.30) <= 0.02
        # Requests naming a version are never rerouted; without a key, a counter: exactly.
        assert {server.route("linear", "1", key=k).version for k in keys[:500]} == {"1"}
        manager.canary("linear", "2", 10)
        assert [server.route("linear").version for _ in range(100)].count("2") == 10
        manager.canary("linear", None)
        assert {server.route("linear", key=k).version for k in keys[:500]} == {"1"}
        with pytest.raises(ValueError, match="above 0 and below 100"):
            manager.canary("linear", "2", 100)
        with pytest.raises(UpdateRefused, match="default already"):
            manager.canary("linear", "1", 10)
    finally:
        await manager.aclose()
        await server.aclose()


async def test_canary_over_http_by_header_and_body_key(tmp_path: Path) -> None:
    server = build_server(make_repo(tmp_path / "repo", "1", "2"))
    app = InferenceApp(server, management_key=MKEY)
    with serving(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=SAFETY) as c:
            r = await c.post(
                "/v2/repository/models/linear/promote",
                json={"version": "1", "keep_previous": True},
                headers=MANAGE,
            )
            assert r.status_code == 200, r.text
            r = await c.post(
                "/v2/repository/models/linear/canary",
                json={"version": "2", "percent": 10},
                headers=MANAGE,
            )
            assert r.status_code == 200, r.text
            entries = {e["version"]: e for e in r.json()["versions"]}
            assert entries["2"]["canary_percent"] == 10.0
            canary = server.canaries["linear"]
            seen: dict[str, str] = {}
            for i in range(300):
                key = f"k{i}"
                for _ in range(2):
                    r = await c.post(
                        "/v2/models/linear/infer",
                        json=infer_body([[0.25, 0]]),
                        headers={"X-Routing-Key": key},
                    )
                    version = r.json()["model_version"]
                    assert seen.setdefault(key, version) == version  # sticky
                    want = "2" if canary.bucket(key) < canary.threshold else "1"
                    assert version == want
                    np.testing.assert_allclose(r.json()["outputs"][0]["data"], expected(version))
            assert 0 < list(seen.values()).count("2") < 300
            # Plain JSON: the body's key field routes the same way as the header.
            for key in ("k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8"):
                r = await c.post(
                    "/models/linear/score", json={"key": key, "instances": [[0.25, 0]]}
                )
                assert r.json()["model_version"] == seen[key]
            # Naming a version is never rerouted.
            r = await c.post(
                "/v2/models/linear/versions/1/infer",
                json=infer_body([[0.25, 0]]),
                headers={"X-Routing-Key": next(k for k, v in seen.items() if v == "2")},
            )
            assert r.json()["model_version"] == "1"
            metrics = (await c.get("/metrics")).text
            assert 'rtinfer_canary_requests_total{model="linear",version="2"}' in metrics


async def test_a_canary_needs_the_same_inputs() -> None:
    server = ModelServer()
    other = PythonModel(
        lambda inputs: {"probabilities": inputs["features"][:, :2]},
        inputs=[tensor("features", "float32", [None, 3])],
        outputs=[tensor("probabilities", "float32", [None, 2])],
        name="linear",
        version="2",
    )
    server.add(other)
    server.add(linear_model("1"))
    await server.start()
    manager = ModelManager(server)
    try:
        with pytest.raises(UpdateRefused, match="takes inputs features float32 \\[None, 3\\]"):
            manager.canary("linear", "2", 10)
        with pytest.raises(UpdateRefused, match="takes inputs"):
            manager.shadow("linear", "2")
    finally:
        await server.aclose()


# -- shadow -------------------------------------------------------------------------------


def scaled(inputs: Arrays) -> Arrays:
    x = inputs["features"][:, :1] * 2
    return {"probabilities": np.concatenate([1 - x, x], axis=1).astype(np.float32)}


def failing(inputs: Arrays) -> Arrays:
    if inputs["features"].any():  # not during warm-up
        raise RuntimeError("the candidate is broken")
    return scaled(inputs)


XS = [0.0, 0.125, 0.25, 0.3, 0.5, 0.7, 1.0, 0.33]


async def answers(c: httpx.AsyncClient) -> list[bytes]:
    """The raw answers to a fixed set of requests (for a bit-for-bit comparison)."""
    out = []
    for i, x in enumerate(XS):
        r = await c.post("/v2/models/linear/infer", json=infer_body([[x, 0.5], [x / 2, i]]))
        assert r.status_code == 200, r.text
        out.append(r.content)
    return out


@pytest.mark.parametrize("kind", ["differs", "fails"])
async def test_shadow_never_changes_an_answer(kind: str) -> None:
    server = ModelServer(batching={"max_batch_size": 16})
    server.add(linear_model("2", scaled if kind == "differs" else failing))  # the candidate
    server.add(linear_model("1"))  # the default: the last added
    with serving(InferenceApp(server, management_key=MKEY)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=SAFETY) as c:
            before = await answers(c)
            r = await c.post(
                "/v2/repository/models/linear/shadow", json={"version": "2"}, headers=MANAGE
            )
            assert r.status_code == 200, r.text
            for _ in range(3):
                assert await answers(c) == before  # bit for bit, model_version "1" included
            assert all(b'"model_version":"1"' in a for a in before)
            shadow = server.shadows["linear"]
            await wait_until(lambda: shadow.in_flight == 0, "the shadow copies")
            index = (await c.post("/v2/repository/index", headers=MANAGE)).json()
            report = next(e for e in index if e["version"] == "2")["shadow"]
            metrics = (await c.get("/metrics")).text
            if kind == "differs":
                assert report["compared"] == 3 * len(XS)
                assert report["mismatches"] == 3 * len(XS) - 3  # x = 0 answers alike thrice
                sample = report["samples"][-1]
                assert sample["default_version"] == "1"
                assert sample["candidate_version"] == "2"
                assert sample["max_abs_difference"] > 0
                assert set(sample["default"]) == {"probabilities"}
                assert 'rtinfer_shadow_mismatch_total{candidate="2",model="linear"} 21.0' in metrics
                assert "rtinfer_shadow_max_abs_difference_bucket" in metrics
            else:
                assert report["compared"] == 0
                assert report["skipped"] == {"failed": 3 * len(XS)}
                assert 'reason="failed"' in metrics
            r = await c.post("/v2/repository/models/linear/shadow", json={}, headers=MANAGE)
            assert r.status_code == 200
            assert "linear" not in server.shadows
            assert await answers(c) == before


async def test_a_stuck_shadow_neither_slows_nor_fails_the_default() -> None:
    gate = threading.Event()

    def stuck(inputs: Arrays) -> Arrays:
        if inputs["features"].any():  # not during warm-up
            gate.wait(SAFETY)
        return scaled(inputs)

    server = ModelServer(batching={"max_batch_size": 4})
    server.add(linear_model("2", stuck))
    server.add(linear_model("1"))
    with serving(InferenceApp(server, management_key=MKEY)) as url:
        try:
            async with httpx.AsyncClient(base_url=url, timeout=SAFETY) as c:
                before = await answers(c)
                r = await c.post(
                    "/v2/repository/models/linear/shadow", json={"version": "2"}, headers=MANAGE
                )
                assert r.status_code == 200
                shadow = server.shadows["linear"]
                # The candidate answers nothing until the gate opens: every request is answered
                # meanwhile, and the copies in flight stay bounded.
                rounds = 6
                results = await asyncio.gather(*(answers(c) for _ in range(rounds)))
                assert all(result == before for result in results)
                assert not gate.is_set()
                assert shadow.in_flight <= shadow.max_in_flight
                assert shadow.skipped.get("busy", 0) == rounds * len(XS) - shadow.max_in_flight
                assert shadow.compared == 0
        finally:
            gate.set()
        await wait_until(lambda: shadow.in_flight == 0)


def test_compare_outputs() -> None:
    a = {"p": np.array([[0.5, 0.5], [1.0, 0.0]], np.float32)}
    assert compare_outputs(a, {"p": a["p"].copy()}) == (0.0, None, None)
    b = {"p": np.array([[0.5, 0.5], [0.75, 0.0]], np.float32)}
    assert compare_outputs(a, b) == (0.25, "p", 1)
    assert compare_outputs(a, {"q": a["p"]})[0] == np.inf
    assert compare_outputs(a, {"p": a["p"][:1]})[0] == np.inf
    nan = {"p": np.array([[np.nan, 1.0]])}
    assert compare_outputs(nan, {"p": np.array([[np.nan, 1.0]])})[0] == 0.0
    assert compare_outputs(nan, {"p": np.array([[0.0, 1.0]])})[0] == np.inf
    text = {"label": np.array(["a", "b"], dtype=object)}
    assert compare_outputs(text, {"label": np.array(["a", "c"], dtype=object)}) == (
        np.inf,
        "label",
        1,
    )


BUCKETS = """
from rtinfer.models import PythonModel, tensor
from rtinfer.observability.metrics import Metrics
from rtinfer.repository import Canary
from rtinfer.serving import ModelServer

spec = [tensor("features", "float32", [None, 2])]
model = PythonModel(lambda x: x, inputs=spec, outputs=spec, name="linear", version="2")
canary = Canary(ModelServer().add(model), 10, Metrics())
print([canary.bucket(f"card-{i}") for i in range(50)])
"""


@pytest.mark.parametrize("seed", ["1", "2"])
def test_canary_buckets_are_the_same_in_every_process(seed: str) -> None:
    # A stable hash (BLAKE2b of model, version and key), not Python's salted hash(): every
    # worker process, and the same process after a restart, sends a key the same way.
    import os
    import subprocess
    import sys

    from rtinfer.observability.metrics import Metrics

    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run(
        [sys.executable, "-c", BUCKETS], env=env, capture_output=True, text=True, check=True
    ).stdout
    canary = Canary(ModelServer().add(linear_model("2")), 10, Metrics())
    assert out.strip() == str([canary.bucket(f"card-{i}") for i in range(50)])
    assert canary.bucket("card-1") == canary.bucket(b"card-1")


async def test_canary_reaches_websocket_frames_and_grpc_calls(tmp_path: Path) -> None:
    import json

    import grpc
    from websockets.asyncio.client import connect

    from rtinfer.grpc import inference_pb2 as pb
    from rtinfer.grpc import inference_pb2_grpc
    from rtinfer.grpc.service import create_grpc_server

    server = build_server(make_repo(tmp_path / "repo", "1", "2"))
    app = InferenceApp(server, management_key=MKEY)
    with serving(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=SAFETY) as c:
            r = await c.post(
                "/v2/repository/models/linear/promote",
                json={"version": "1", "keep_previous": True},
                headers=MANAGE,
            )
            assert r.status_code == 200, r.text
            r = await c.post(
                "/v2/repository/models/linear/canary",
                json={"version": "2", "percent": 50},
                headers=MANAGE,
            )
            assert r.status_code == 200, r.text
        canary = server.canaries["linear"]
        keys = [f"w{i}" for i in range(40)]
        want = {k: "2" if canary.bucket(k) < canary.threshold else "1" for k in keys}
        assert set(want.values()) == {"1", "2"}
        ws_url = url.replace("http://", "ws://") + "/v2/models/linear/infer/stream"
        for key in keys[:12]:
            async with connect(ws_url, additional_headers={"X-Routing-Key": key}) as ws:
                body = {"id": "a", **infer_body([[0.25, 0]])}
                await ws.send(json.dumps(body))
                answer = json.loads(await asyncio.wait_for(ws.recv(), SAFETY))
                assert answer["model_version"] == want[key], (key, answer)
    # gRPC, on a server of this loop's own (the one above runs in the HTTP server's thread).
    local = build_server(make_repo(tmp_path / "repo2", "1", "2"))
    await local.start()
    manager = ModelManager(local)
    grpc_server = create_grpc_server(local)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        local.promote("linear", "1")
        manager.canary("linear", "2", 50)
        local_canary = local.canaries["linear"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            for key in keys[:12]:
                request = pb.ModelInferRequest(model_name="linear")
                item = request.inputs.add(name="features", datatype="FP32", shape=[1, 2])
                item.contents.fp32_contents.extend([0.25, 0.0])
                reply = await stub.ModelInfer(request, metadata=(("x-routing-key", key),))
                wanted = "2" if local_canary.bucket(key) < local_canary.threshold else "1"
                assert reply.model_version == wanted, key
    finally:
        await grpc_server.stop(None)
        await manager.aclose()
        await local.aclose()
