"""The protections of ``rtinfer serve`` through real servers and clients, with faults injected.

rtinfer's own HTTP server (the ``serving`` helper of test_http) with httpx, a real
``grpc.aio`` server with the generated stubs, real Python models that fail, or hold at a
gate until the test opens it, and the real Redis at ``REDIS_URL`` (keys under a unique
prefix) for the shared cache, or a port where nothing listens for "Redis gone".
Limiters, breakers and quotas run on a fake clock: no test depends on how fast this
machine is.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from conftest import SAFETY, factory_pipeline, linear, wait_until
from faults_helpers import REDIS_URL, free_port, redis_or_skip
from rtinfer.exceptions import Closed, ConfigError, Overloaded, QuotaExceeded
from rtinfer.grpc import create_grpc_server, inference_pb2_grpc
from rtinfer.grpc import inference_pb2 as pb
from rtinfer.http import InferenceApp
from rtinfer.models import PythonModel, tensor
from rtinfer.observability.metrics import Metrics
from rtinfer.resilience import (
    ClientQuota,
    MemoryStore,
    PredictionCache,
    Priority,
    RedisStore,
)
from rtinfer.serve import add_serve_arguments, app_from_env, build_server
from rtinfer.serving import ModelPolicy, ModelServer
from rtinfer.types import Arrays
from test_http import infer_body, serving
from test_resilience_breaker import FakeClock


class Faulty:
    """The linear model, with faults the test switches on: ``broken`` (raise), ``gate``
    (each real call waits until it is set). Records the ``x`` of every row it ran."""

    def __init__(self, name: str = "linear") -> None:
        self.broken = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.rows: list[float] = []
        self.model = PythonModel(
            self,
            inputs=[tensor("features", "float32", [None, 2])],
            outputs=[tensor("probabilities", "float32", [None, 2])],
            name=name,
        )

    def __call__(self, inputs: Arrays) -> Arrays:
        features = inputs["features"]
        if features.any():  # not a warm-up call
            self.entered.set()
            self.gate.wait(SAFETY)
            self.rows.extend(features[:, 0].tolist())
            if self.broken.is_set():
                raise RuntimeError("injected model failure")
        return linear(inputs)


def rules(inputs: Arrays) -> Arrays:
    """The fallback rules: everything is 'half fraud'."""
    return {"probabilities": np.full((len(inputs["features"]), 2), 0.5, np.float32)}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {line_start!r} in /metrics")


# -- admission control: the limiter, priorities, quotas -------------------------------


async def test_best_effort_is_shed_first_then_critical_gets_503_with_retry_after() -> None:
    faulty = Faulty()
    faulty.gate.clear()
    server = ModelServer(batching={"max_batch_size": 1}, max_concurrency=5)
    server.add(faulty.model)
    with serving(InferenceApp(server)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=SAFETY) as c:
            body = infer_body([[0.5, 1]])
            held = [
                asyncio.ensure_future(c.post("/v2/models/linear/infer", json=body))
                for _ in range(4)
            ]
            limiter = server.get("linear").limiter
            assert limiter is not None
            assert limiter.limit == 5
            await wait_until(lambda: limiter.in_flight == 4, "four requests in flight")
            # 4 in flight: over best-effort's share (80% of 5), under the limit.
            shed = await c.post(
                "/v2/models/linear/infer", json=body, headers={"X-Priority": "best_effort"}
            )
            assert shed.status_code == 503
            assert int(shed.headers["retry-after"]) >= 1
            assert "best_effort call shed" in shed.json()["error"]
            critical = asyncio.ensure_future(
                c.post("/v2/models/linear/infer", json=body, headers={"X-Priority": "critical"})
            )
            await wait_until(lambda: limiter.in_flight == 5, "the critical request admitted")
            full = await c.post("/models/linear/score", json=[0.5, 1])
            assert full.status_code == 503, full.text  # critical too, at the limit now
            # Refused before the body is read: even a malformed one is a 503, not a 400.
            junk = await c.post("/v2/models/linear/infer", content=b"{not json")
            assert junk.status_code == 503, junk.text
            bad = await c.post("/v2/models/linear/infer", json=body, headers={"X-Priority": "vip"})
            assert bad.status_code == 400
            assert "X-Priority" in bad.json()["error"]
            faulty.gate.set()
            for answer in await asyncio.gather(*held, critical):
                assert answer.status_code == 200
            # An admitted request with a bad body lets go of its place: the limiter is empty.
            bad_body = await c.post("/v2/models/linear/infer", content=b"{not json")
            assert bad_body.status_code == 400
            assert limiter.in_flight == 0
            text = (await c.get("/metrics")).text
    shed_metric = 'rtinfer_limiter_rejected_total{limiter="linear",priority="best_effort"'
    assert metric(text, shed_metric) == 1
    assert faulty.rows == [0.5] * 5  # the shed requests never reached the model


async def test_a_models_configured_priority_is_its_default(clock: FakeClock) -> None:
    faulty = Faulty()
    faulty.gate.clear()
    server = ModelServer(batching={"max_batch_size": 1}, max_concurrency=5, clock=clock)
    served = server.add(faulty.model, policy=ModelPolicy(priority=Priority.BEST_EFFORT))
    await server.start()
    try:
        rows = {"features": np.array([[0.5, 1]], np.float32)}
        held = [asyncio.ensure_future(server.infer("linear", rows)) for _ in range(4)]
        await wait_until(lambda: served.limiter is not None and served.limiter.in_flight == 4)
        with pytest.raises(Overloaded, match="best_effort call shed"):
            await server.infer("linear", rows)
        critical = asyncio.ensure_future(server.infer("linear", rows, priority=Priority.CRITICAL))
        await asyncio.sleep(0)
        faulty.gate.set()
        await asyncio.gather(*held, critical)
    finally:
        await server.aclose()


async def test_a_client_over_its_quota_gets_429_over_http_and_resource_exhausted_over_grpc(
    clock: FakeClock,
) -> None:
    server = ModelServer(quota=ClientQuota(1, burst=2, clock=clock))
    server.add(Faulty().model)
    with serving(InferenceApp(server)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=SAFETY) as c:
            body = infer_body([[0.5, 1]])
            for _ in range(2):
                assert (await c.post("/v2/models/linear/infer", json=body)).status_code == 200
            over = await c.post("/v2/models/linear/infer", json=body)
            assert over.status_code == 429
            assert int(over.headers["retry-after"]) >= 1
            assert "over its quota" in over.json()["error"]
            clock.advance(1.0)  # one token back
            assert (await c.post("/models/linear/score", json=[0.5, 1])).status_code == 200
            assert (await c.post("/models/linear/score", json=[0.5, 1])).status_code == 429
    # gRPC: the same quota, counted per peer address.
    server = ModelServer(quota=ClientQuota(1, burst=1, clock=clock))
    server.add(Faulty().model)
    await server.start()
    grpc_server = create_grpc_server(server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            await stub.ModelInfer(features_request(), timeout=SAFETY)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(features_request(), timeout=SAFETY)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "over its quota" in (info.value.details() or "")
            assert ("retry-after", "1") in list(info.value.trailing_metadata() or ())
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.ModelInfer(
                    features_request(), metadata=[("x-priority", "urgent")], timeout=SAFETY
                )
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await grpc_server.stop(None)
        await server.aclose()


def features_request(x: float = 0.5) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="linear")
    features = request.inputs.add(name="features", datatype="FP32", shape=[1, 2])
    features.contents.fp32_contents.extend([x, 1.0])
    return request


async def test_quota_exceeded_is_not_a_plain_overload() -> None:
    quota = ClientQuota(1, burst=1, clock=FakeClock())
    quota.check("a")
    with pytest.raises(QuotaExceeded):
        quota.check("a")
    quota.check("b")  # another client has its own bucket


# -- circuit breaker and fallback chain -------------------------------------------------


async def test_breaker_opens_falls_back_to_rules_and_recovers(clock: FakeClock) -> None:
    faulty = Faulty()
    server = ModelServer(clock=clock)
    policy = ModelPolicy(breaker_failures=2, breaker_open_s=5.0, rules=rules)
    server.add(faulty.model, policy=policy)
    with serving(InferenceApp(server)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=SAFETY) as c:

            async def ask(x: float) -> dict[str, Any]:
                r = await c.post("/v2/models/linear/infer", json=infer_body([[x, 1]]))
                assert r.status_code == 200, r.text
                return dict(r.json())

            healthy = await ask(0.25)
            assert healthy["parameters"] == {"rtinfer_step": "primary"}
            assert healthy["outputs"][0]["data"] == [0.75, 0.25]
            faulty.broken.set()
            for _ in range(2):  # two failures in a row open the breaker
                answer = await ask(0.25)
                assert answer["parameters"] == {"rtinfer_step": "rules"}
                assert answer["outputs"][0]["data"] == [0.5, 0.5]
            calls = len(faulty.rows)
            opened = await ask(0.25)
            assert opened["parameters"] == {"rtinfer_step": "rules"}
            assert len(faulty.rows) == calls  # open: the model was not called at all
            text = (await c.get("/metrics")).text
            assert metric(text, 'rtinfer_breaker_state{breaker="model:linear"}') == 2
            faulty.broken.clear()
            clock.advance(5.0)  # half-open: the next call is a probe, and it succeeds
            recovered = await c.post("/models/linear/score", json=[0.25, 1])
            assert recovered.json()["rtinfer_step"] == "primary"
            assert recovered.json()["predictions"] == [[0.75, 0.25]]
            text = (await c.get("/metrics")).text
            assert metric(text, 'rtinfer_breaker_state{breaker="model:linear"}') == 0
            rows_by_step = 'rtinfer_fallback_outputs_total{chain="linear",step="rules"}'
            assert metric(text, rows_by_step) == 3


async def test_without_a_fallback_an_open_breaker_is_503_and_bad_input_never_opens_it(
    clock: FakeClock,
) -> None:
    faulty = Faulty()
    server = ModelServer(clock=clock)
    server.add(faulty.model, policy=ModelPolicy(breaker_failures=2, breaker_open_s=5.0))
    with serving(InferenceApp(server)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=SAFETY) as c:
            for _ in range(3):  # bad inputs are the caller's fault, not the model's
                bad = infer_body([[0.5, 1]])
                bad["inputs"][0]["shape"] = [1, 3]  # type: ignore[index]
                assert (await c.post("/v2/models/linear/infer", json=bad)).status_code == 400
            ok = await c.post("/v2/models/linear/infer", json=infer_body([[0.5, 1]]))
            assert "parameters" not in ok.json()  # no chain: answers are unchanged
            faulty.broken.set()
            for _ in range(2):
                failed = await c.post("/v2/models/linear/infer", json=infer_body([[0.5, 1]]))
                assert failed.status_code == 500
            refused = await c.post("/v2/models/linear/infer", json=infer_body([[0.5, 1]]))
            assert refused.status_code == 503
            assert int(refused.headers["retry-after"]) == 5
            assert "circuit breaker 'model:linear' is open" in refused.json()["error"]


async def test_fallback_chain_lighter_model_then_default_over_grpc(clock: FakeClock) -> None:
    primary, light = Faulty(), Faulty("light")
    server = ModelServer(clock=clock)
    server.add(light.model)
    policy = ModelPolicy(fallback_model="light", default={"probabilities": [1.0, 0.0]})
    server.add(primary.model, policy=policy)
    await server.start()
    grpc_server = create_grpc_server(server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)

            async def step(x: float) -> tuple[str, list[float]]:
                reply = await stub.ModelInfer(features_request(x), timeout=SAFETY)
                data = list(reply.outputs[0].contents.fp32_contents)
                return reply.parameters["rtinfer_step"].string_param, data

            assert await step(0.25) == ("primary", [0.75, 0.25])
            primary.broken.set()
            assert await step(0.25) == ("model:light", [0.75, 0.25])
            light.broken.set()
            assert await step(0.25) == ("default", [1.0, 0.0])
    finally:
        await grpc_server.stop(None)
        await server.aclose()


# -- deadlines ----------------------------------------------------------------------------


async def test_a_slow_model_expired_requests_are_never_batched() -> None:
    faulty = Faulty()
    faulty.gate.clear()
    server = ModelServer(batching={"max_batch_size": 4})
    server.add(faulty.model, policy=ModelPolicy(rules=rules))
    with serving(InferenceApp(server, default_timeout_s=SAFETY)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=SAFETY) as c:
            first = asyncio.ensure_future(
                c.post("/v2/models/linear/infer", json=infer_body([[0.5, 1]]))
            )
            await wait_until(faulty.entered.is_set, "the first request to reach the model")
            late = await c.post(
                "/v2/models/linear/infer",
                json=infer_body([[0.75, 1]]),
                headers={"X-Request-Timeout-Ms": "30"},
            )
            # Failed by the batcher at its deadline, so the chain's next step answers in time.
            assert late.status_code == 200, late.text
            assert late.json()["parameters"] == {"rtinfer_step": "rules"}
            faulty.gate.set()
            assert (await first).status_code == 200
            again = await c.post("/v2/models/linear/infer", json=infer_body([[0.25, 1]]))
            assert again.json()["parameters"] == {"rtinfer_step": "primary"}
    assert faulty.rows == [0.5, 0.25]  # the expired request never ran


def serve_environment(monkeypatch: pytest.MonkeyPatch, **settings: str) -> None:
    """The environment ``rtinfer serve`` gives its workers' app (``app_from_env``): only
    ``settings``, none left over from another test's ``run_server``."""
    for key in [k for k in os.environ if k.startswith("RTINFER_SERVE_")]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("RTINFER_API_KEY", raising=False)
    for key, value in settings.items():
        monkeypatch.setenv(f"RTINFER_SERVE_{key}", value)


def pipeline_serving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: PythonModel) -> Path:
    """A pipeline file whose model (a factory in a module written here) is ``model``."""
    module = f"serve_slo_{uuid.uuid4().hex[:6]}"
    (tmp_path / f"{module}.py").write_text("MODEL = None\n\n\ndef model():\n    return MODEL\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    helpers: Any = importlib.import_module(module)
    helpers.MODEL = model
    return factory_pipeline(tmp_path, "slo", f"{module}:model")


async def test_serves_slo_is_the_deadline_of_a_request_that_sends_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rtinfer serve --slo-ms 50``: the app its workers build from the environment gives
    a request without ``X-Request-Timeout-Ms`` 50 ms, so a model held past that answers
    504; a request sending a generous deadline waits for the same model and gets 200."""
    faulty = Faulty()
    faulty.gate.clear()
    pipeline = pipeline_serving(tmp_path, monkeypatch, faulty.model)
    serve_environment(monkeypatch, TARGET=str(pipeline), TIMEOUT_S="0.05")  # --slo-ms 50
    app = app_from_env()
    with serving(app) as base:
        async with httpx.AsyncClient(base_url=base, timeout=SAFETY) as c:
            late = await c.post("/v2/models/linear/infer", json=infer_body([[0.5, 1]]))
            assert late.status_code == 504, late.text
            assert "deadline" in late.json()["error"]
            assert faulty.entered.is_set()  # it ran, and was failed while the model held it
            patient = asyncio.ensure_future(
                c.post(
                    "/v2/models/linear/infer",
                    json=infer_body([[0.25, 1]]),
                    headers={"X-Request-Timeout-Ms": str(SAFETY * 1000)},
                )
            )
            await wait_until(lambda: app.server.in_flight == 1, "the patient request admitted")
            faulty.gate.set()
            answer = await patient
            assert answer.status_code == 200, answer.text
            assert answer.json()["outputs"][0]["data"] == [0.75, 0.25]
    assert sorted(faulty.rows) == [0.25, 0.5]


# -- prediction cache -----------------------------------------------------------------------


async def test_memory_cache_answers_repeated_rows_and_skips_non_deterministic_models() -> None:
    cached, varying = Faulty(), Faulty("varying")
    metrics = Metrics()
    store = MemoryStore(max_entries=100, ttl_seconds=60)
    server = ModelServer(metrics=metrics, cache=PredictionCache(store, metrics=metrics))
    server.add(cached.model)
    server.add(varying.model, policy=ModelPolicy(deterministic=False))
    with serving(InferenceApp(server)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=SAFETY) as c:
            for model in ("linear", "varying"):
                for _ in range(2):
                    r = await c.post(f"/models/{model}/score", json={"instances": [[0.25, 1]]})
                    assert r.json()["predictions"] == [[0.75, 0.25]]
                assert server.cache is not None
                await server.cache.flush()
            mixed = await c.post("/models/linear/score", json={"instances": [[0.25, 1], [0.5, 1]]})
            assert mixed.json()["predictions"] == [[0.75, 0.25], [0.5, 0.5]]
            text = (await c.get("/metrics")).text
    assert cached.rows == [0.25, 0.5]  # the repeated row never reached the model again
    assert varying.rows == [0.25, 0.25]  # not deterministic: never cached
    assert metric(text, 'rtinfer_cache_hits_total{cache="memory",model="linear"}') == 2
    assert metric(text, 'rtinfer_cache_misses_total{cache="memory",model="linear"}') == 2


async def _flush_cache(server: ModelServer) -> None:
    """Wait, on the server's event loop, for the cache's background writes so far."""
    assert server.cache is not None
    loop = server.all()[0].batcher._loop
    assert loop is not None
    await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(server.cache.flush(), loop))


@pytest.mark.parametrize("fallback", [False, True], ids=["no fallback", "rules fallback"])
async def test_a_cached_row_is_answered_while_the_models_breaker_is_open(
    clock: FakeClock, fallback: bool
) -> None:
    """docs/resilience.md: the cache sits over the breaker, so a row the model answered
    before is answered from the cache while the breaker is open (by the ``model`` step,
    not the fallback); a row not cached meets the open breaker (503, or the rules)."""
    faulty = Faulty()
    metrics = Metrics()
    cache = PredictionCache(MemoryStore(max_entries=100, ttl_seconds=60), metrics=metrics)
    server = ModelServer(metrics=metrics, cache=cache, clock=clock)
    policy = ModelPolicy(breaker_failures=2, breaker_open_s=5.0, rules=rules if fallback else None)
    server.add(faulty.model, policy=policy)
    with serving(InferenceApp(server)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=SAFETY) as c:

            async def ask(x: float) -> httpx.Response:
                return await c.post("/v2/models/linear/infer", json=infer_body([[x, 1]]))

            first = await ask(0.25)
            assert first.json()["outputs"][0]["data"] == [0.75, 0.25]
            await _flush_cache(server)
            faulty.broken.set()
            for _ in range(2):  # two failures in a row open the breaker
                failed = await ask(0.5)
                assert failed.status_code == (200 if fallback else 500), failed.text
            assert metric((await c.get("/metrics")).text, BREAKER_STATE) == 2  # open
            calls = len(faulty.rows)
            refused = await ask(0.75)
            if fallback:
                assert refused.json()["parameters"] == {"rtinfer_step": "rules"}
            else:
                assert refused.status_code == 503
                assert "circuit breaker 'model:linear' is open" in refused.json()["error"]
            hit = await ask(0.25)
            assert hit.status_code == 200, hit.text
            assert hit.json()["outputs"][0]["data"] == [0.75, 0.25]
            if fallback:
                assert hit.json()["parameters"] == {"rtinfer_step": "primary"}
            text = (await c.get("/metrics")).text
    assert len(faulty.rows) == calls  # open: neither call reached the model
    assert metric(text, BREAKER_STATE) == 2  # still open: the hit was no probe
    assert metric(text, 'rtinfer_cache_hits_total{cache="memory",model="linear"}') == 1


BREAKER_STATE = 'rtinfer_breaker_state{breaker="model:linear"}'


async def test_a_model_whose_deterministic_attribute_is_false_is_never_cached() -> None:
    varying, plain = Faulty("varying"), Faulty()
    varying.model.deterministic = False  # type: ignore[attr-defined]  # the model says so
    metrics = Metrics()
    cache = PredictionCache(MemoryStore(max_entries=100, ttl_seconds=60), metrics=metrics)
    server = ModelServer(metrics=metrics, cache=cache)
    served = server.add(varying.model)  # no policy: the model's attribute decides
    server.add(plain.model)
    with serving(InferenceApp(server)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=SAFETY) as c:
            for model in ("varying", "linear"):
                for _ in range(2):
                    r = await c.post(f"/models/{model}/score", json=[0.25, 1])
                    assert r.json()["predictions"] == [[0.75, 0.25]]
                    await _flush_cache(server)
    assert served.cache is None
    assert varying.rows == [0.25, 0.25]  # both reached the model
    assert plain.rows == [0.25]  # the same server caches a model that says nothing
    assert cache_count(metrics, "hits", "varying") == cache_count(metrics, "misses", "varying") == 0
    assert cache_count(metrics, "hits", "linear") == 1


def cache_count(metrics: Metrics, kind: str, model: str) -> float:
    """``rtinfer_cache_{kind}_total`` of the memory cache for ``model`` (0: never counted)."""
    labels = {"cache": "memory", "model": model}
    value = metrics.registry.get_sample_value(f"rtinfer_cache_{kind}_total", labels)
    return value or 0.0


async def test_redis_cache_is_shared_between_servers_and_redis_gone_is_only_a_miss() -> None:
    client = await redis_or_skip()
    prefix = f"test-serve-cache-{uuid.uuid4().hex[:8]}:"
    try:
        models = []
        for _ in range(2):  # two workers (or replicas) sharing one Redis
            faulty = Faulty()
            server = ModelServer(
                cache=PredictionCache(RedisStore(REDIS_URL, prefix=prefix, timeout=1.0))
            )
            server.add(faulty.model)
            await server.start()
            models.append((server, faulty))
        rows = {"features": np.array([[0.25, 1.0]], np.float32)}
        try:
            (first, first_model), (second, second_model) = models
            answer = await first.infer("linear", rows)
            assert first.cache is not None
            await first.cache.flush()
            shared = await second.infer("linear", rows)
            np.testing.assert_allclose(
                shared.outputs["probabilities"], answer.outputs["probabilities"]
            )
            assert first_model.rows == [0.25]
            assert second_model.rows == []  # answered from Redis, written by the first
        finally:
            for server, _ in models:
                await server.aclose()
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    # Redis gone: a port where nothing listens. Every request is still answered.
    faulty = Faulty()
    gone = f"redis://127.0.0.1:{free_port()}/0"
    metrics = Metrics()
    cache = PredictionCache(RedisStore(gone, timeout=0.2), metrics=metrics)
    server = ModelServer(metrics=metrics, cache=cache)
    server.add(faulty.model)
    with serving(InferenceApp(server)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=SAFETY) as c:
            for _ in range(5):
                r = await c.post("/models/linear/score", json=[0.25, 1])
                assert r.status_code == 200
                assert r.json()["predictions"] == [[0.75, 0.25]]
            text = (await c.get("/metrics")).text
    assert faulty.rows == [0.25] * 5
    assert metric(text, 'rtinfer_cache_errors_total{cache="redis",operation="get"}') >= 1


# -- drain (in process; the signal path is tests/test_serve_drain.py) -----------------------


async def test_drain_turns_readiness_false_refuses_new_requests_and_finishes_in_flight() -> None:
    faulty = Faulty()
    faulty.gate.clear()
    server = ModelServer()
    server.add(faulty.model)
    with serving(InferenceApp(server)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=SAFETY) as c:
            held = [
                asyncio.ensure_future(
                    c.post("/v2/models/linear/infer", json=infer_body([[0.5, 1]]))
                )
                for _ in range(3)
            ]
            await wait_until(lambda: server.in_flight == 3, "three requests in flight")
            drained = asyncio.ensure_future(_drain_in(server))
            await wait_until(lambda: server.draining, "the drain to start")
            ready = await c.get("/v2/health/ready")
            assert (ready.status_code, ready.json()) == (503, {"ready": False})
            assert (await c.get("/v2/models/linear/ready")).status_code == 503
            refused = await c.post("/v2/models/linear/infer", json=infer_body([[0.5, 1]]))
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert "draining" in refused.json()["error"]
            assert not drained.done()
            faulty.gate.set()
            assert [r.status_code for r in await asyncio.gather(*held)] == [200] * 3
            assert await drained is True
    with pytest.raises(Closed):
        await server.infer("linear", {"features": np.array([[0.5, 1]], np.float32)})


async def _drain_in(server: ModelServer) -> bool:
    """Drain ``server`` on its own event loop (the uvicorn thread's), as a SIGTERM would."""
    loop = _server_loop(server)
    future = asyncio.run_coroutine_threadsafe(server.drain(SAFETY), loop)
    return await asyncio.wrap_future(future)


def _server_loop(server: ModelServer) -> asyncio.AbstractEventLoop:
    batcher = server.get("linear").batcher
    loop = batcher._loop
    assert loop is not None
    return loop


# -- configuration ------------------------------------------------------------------------


def write_repo(tmp_path: Path, model_file: Path, config: str) -> Path:
    repo = tmp_path / "repo"
    for name in ("fraud", "light"):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.onnx").write_bytes(model_file.read_bytes())
    (repo / "fraud" / "config.yaml").write_text(config)
    return repo


@pytest.fixture
def rules_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    folder = tmp_path / "rules_pkg"
    folder.mkdir()
    name = f"serve_rules_{uuid.uuid4().hex[:6]}"
    (folder / f"{name}.py").write_text(
        "import numpy as np\n\n"
        "def half(inputs):\n"
        "    n = len(inputs['features'])\n"
        "    return {'probabilities': np.full((n, 2), 0.5, np.float32)}\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    return f"{name}:half"


async def test_repository_config_sets_each_models_protections(
    tmp_path: Path, model_file: Path, rules_module: str
) -> None:
    repo = write_repo(
        tmp_path,
        model_file,
        "max_batch_size: 8\n"
        "priority: best_effort\n"
        "max_concurrency: 7\n"
        "cache: false\n"
        "breaker: {consecutive_failures: 3, open_s: 2}\n"
        "fallback:\n"
        "  model: light\n"
        f"  rules: {rules_module}\n"
        "  default: {probabilities: [1.0, 0.0]}\n",
    )
    server = build_server(repo, cache_size=100, max_concurrency=50)
    await server.start()
    try:
        fraud, light = server.get("fraud"), server.get("light")
        assert fraud.priority is Priority.BEST_EFFORT
        assert light.priority is Priority.CRITICAL
        assert fraud.limiter is not None
        assert fraud.limiter.max_limit == 7
        assert light.limiter is not None
        assert light.limiter.max_limit == 50
        assert fraud.cache is None
        assert light.cache is server.cache
        assert fraud.breaker is not None
        assert fraud.breaker.consecutive_failures == 3
        assert fraud.breaker.open_seconds == 2
        assert fraud.chain is not None
        assert [s.name for s in fraud.chain.steps] == ["primary", "model:light", "rules", "default"]
        answer = await server.infer("fraud", {"features": np.array([[0.25, 0]], np.float32)})
        assert answer.step == "primary"
        default = fraud.chain.steps[-1]
        out = await default.run({"features": np.zeros((2, 2), np.float32)}, None)
        assert out["probabilities"].dtype == np.float32  # the model's own output dtype
    finally:
        await server.aclose()


async def test_deterministic_false_in_a_repository_config_turns_the_cache_off_for_that_model(
    tmp_path: Path, model_file: Path
) -> None:
    repo = write_repo(tmp_path, model_file, "deterministic: false\n")
    server = build_server(repo, cache_size=100)
    fraud, light = server.get("fraud"), server.get("light")
    with serving(InferenceApp(server)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=SAFETY) as c:
            calls = {}
            for served in (fraud, light):
                before = served.batcher.batches
                for _ in range(2):
                    r = await c.post(f"/models/{served.name}/score", json=[0.25, 1])
                    assert r.json()["predictions"] == [[0.75, 0.25]]
                    await _flush_cache(server)
                calls[served.name] = served.batcher.batches - before
    assert fraud.cache is None
    assert light.cache is server.cache
    assert calls == {"fraud": 2, "light": 1}  # the model ran twice; its sibling's cache answered
    assert cache_count(server.metrics, "hits", "fraud") == 0
    assert cache_count(server.metrics, "misses", "fraud") == 0
    assert cache_count(server.metrics, "hits", "light") == 1


@pytest.mark.parametrize(
    ("config", "key", "message"),
    [
        ("retries: 3\n", "retries", "unknown setting"),
        ("priority: urgent\n", "priority", "unknown priority 'urgent'"),
        ("cache: maybe\n", "cache", "true or false"),
        ("max_concurrency: -1\n", "max_concurrency", "whole number"),
        ("breaker: {open_seconds: 0}\n", "breaker.open_seconds", "above 0"),
        ("breaker: {tries: 2}\n", "breaker.tries", "unknown setting"),
        ("breaker: {open_s: 2, open_seconds: 2}\n", "breaker", "not both"),
        ("fallback: {model: nope}\n", "fallback.model", "no model 'nope' is served beside it"),
        ("fallback: {model: fraud}\n", "fallback.model", "no model 'fraud'"),
        ("fallback: {rules: os.path}\n", "fallback.rules", "package.module:name"),
        ("fallback: {rules: 'os:sep'}\n", "fallback.rules", "not callable"),
        ("fallback: {default: {p: abc}}\n", "fallback.default", "number"),
        ("fallback: {light: 1}\n", "fallback.light", "unknown setting"),
    ],
)
def test_bad_repository_config_names_the_file_and_key(
    tmp_path: Path, model_file: Path, config: str, key: str, message: str
) -> None:
    repo = write_repo(tmp_path, model_file, config)
    with pytest.raises(ConfigError, match=message) as info:
        build_server(repo)
    assert info.value.key == key
    assert info.value.file is not None
    assert info.value.file.endswith("config.yaml")


def test_serve_options() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["m.onnx"])
    assert (args.slo_ms, args.max_concurrency, args.default_priority) == (30_000, 1000, "critical")
    assert (args.quota, args.cache_size, args.cache_redis, args.drain_s) == (None, 0, None, 10)
    args = parser.parse_args(
        ["m.onnx", "--slo-ms", "50", "--quota", "100/200", "--cache-size", "1000",
         "--default-priority", "best_effort", "--max-concurrency", "0", "--drain-s", "3"]
    )  # fmt: skip
    assert (args.slo_ms, args.quota, args.cache_size) == (50, "100/200", 1000)
    assert (args.default_priority, args.max_concurrency, args.drain_s) == ("best_effort", 0, 3)
    assert parser.parse_args(["m.onnx", "--timeout-ms", "20"]).slo_ms == 20  # the old name
    for bad in (["--quota", "0"], ["--quota", "5/0.5"], ["--quota", "x"], ["--cache-size", "-1"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["m.onnx", *bad])


async def test_without_protections_a_request_goes_straight_to_the_batcher() -> None:
    server = ModelServer(max_concurrency=0)
    served = server.add(Faulty().model, policy=ModelPolicy(breaker=False))
    await server.start()
    try:
        assert served.limiter is None
        assert served.breaker is None
        assert served.chain is None
        assert served.call == served._submit  # nothing wrapped: the fast path
        answer = await server.infer("linear", {"features": np.array([[0.25, 0]], np.float32)})
        assert answer.step is None
    finally:
        await server.aclose()
