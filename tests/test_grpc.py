"""The gRPC front against a real ``grpc.aio`` server, called through real clients.

Each test starts the server on a free port in its own event loop and calls it
through the stubs generated from ``inference.proto`` (and, in a subprocess,
through ``tritonclient.grpc``, a third-party client of the protocol).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from conftest import SAFETY, linear, python_model, wait_until
from rtinfer.grpc import create_grpc_server, inference_pb2_grpc, serve_grpc
from rtinfer.grpc import inference_pb2 as pb
from rtinfer.models import OnnxModel, PythonModel, tensor
from rtinfer.resilience import Priority
from rtinfer.serving import Inference, ModelServer
from rtinfer.types import Arrays

Stub = inference_pb2_grpc.GRPCInferenceServiceStub


def free_port() -> int:
    """A port free now (serve_grpc takes a port number; the other tests bind port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Running:
    """A started ModelServer behind a started gRPC server, and a client stub on it."""

    def __init__(self, models: ModelServer, port: int, stub: Stub) -> None:
        self.models = models
        self.port = port
        self.stub = stub


@contextlib.asynccontextmanager
async def running(
    *models: Any, batching: dict[str, Any] | None = None, api_key: str | None = None
) -> AsyncIterator[Running]:
    server = ModelServer(batching=batching or {"max_batch_size": 8})
    for model in models:
        server.add(model)
    await server.start()
    grpc_server = create_grpc_server(server, api_key)
    port = grpc_server.add_insecure_port("127.0.0.1:0")  # the system picks a free port
    await grpc_server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Running(server, port, Stub(channel))
    finally:
        await grpc_server.stop(None)
        await server.aclose()


def features_request(
    rows: Sequence[Sequence[float]],
    *,
    model: str = "linear",
    raw: bool = False,
    datatype: str = "FP32",
    outputs: Sequence[str] = (),
    request_id: str = "",
) -> pb.ModelInferRequest:
    array = np.asarray(rows, np.float32)
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    tensor_ = request.inputs.add(name="features", datatype=datatype, shape=array.shape)
    if raw:
        request.raw_input_contents.append(array.astype("<f4").tobytes())
    else:
        tensor_.contents.fp32_contents.extend(array.ravel().tolist())
    for name in outputs:
        request.outputs.add(name=name)
    return request


def output_array(response: pb.ModelInferResponse, index: int = 0) -> np.ndarray[Any, Any]:
    out = response.outputs[index]
    dtype = {"FP32": "<f4", "INT64": "<i8"}[out.datatype]
    if response.raw_output_contents:
        flat = np.frombuffer(response.raw_output_contents[index], dtype)
    else:
        field = {"FP32": "fp32_contents", "INT64": "int64_contents"}[out.datatype]
        flat = np.asarray(getattr(out.contents, field), dtype)
    return flat.reshape(tuple(out.shape))


async def status_of(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def gated_model(gate: threading.Event, entered: threading.Event) -> PythonModel:
    """The linear model; each real call (not warm-up) signals ``entered`` and waits for ``gate``."""

    def predict(inputs: Arrays) -> Arrays:
        if inputs["features"].any():
            entered.set()
            gate.wait(SAFETY)
        return linear(inputs)

    return PythonModel(
        predict,
        inputs=[tensor("features", "float32", [None, 2])],
        outputs=[tensor("probabilities", "float32", [None, 2])],
        name="linear",
    )


async def test_health_and_metadata(model_file: Path) -> None:
    async with running(OnnxModel(model_file, name="linear")) as r:
        assert (await r.stub.ServerLive(pb.ServerLiveRequest())).live
        assert (await r.stub.ServerReady(pb.ServerReadyRequest())).ready
        meta = await r.stub.ServerMetadata(pb.ServerMetadataRequest())
        assert meta.name == "rtinfer"
        assert meta.version
        model = await r.stub.ModelMetadata(pb.ModelMetadataRequest(name="linear"))
        version = r.models.get("linear").version
        assert list(model.versions) == [version]
        assert model.platform == "onnxruntime_onnx"
        assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
            ("features", "FP32", [-1, 2])
        ]
        assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [
            ("probabilities", "FP32", [-1, 2])
        ]
        ready = await r.stub.ModelReady(pb.ModelReadyRequest(name="linear", version=version))
        assert ready.ready


async def test_infer_with_typed_contents(model_file: Path) -> None:
    async with running(OnnxModel(model_file, name="linear")) as r:
        request = features_request([[0.25, 0.5], [0.75, 0.0]], request_id="req-1")
        response = await r.stub.ModelInfer(request)
        assert response.model_name == "linear"
        assert response.model_version == r.models.get("linear").version
        assert response.id == "req-1"
        assert not response.raw_output_contents  # answered in the form it was asked
        assert response.outputs[0].name == "probabilities"
        assert response.outputs[0].datatype == "FP32"
        np.testing.assert_allclose(output_array(response), [[0.75, 0.25], [0.25, 0.75]])


async def test_infer_with_raw_contents(model_file: Path) -> None:
    async with running(OnnxModel(model_file, name="linear")) as r:
        response = await r.stub.ModelInfer(features_request([[0.125, 9.0]] * 3, raw=True))
        assert len(response.raw_output_contents) == 1
        assert list(response.outputs[0].shape) == [3, 2]
        np.testing.assert_allclose(output_array(response), [[0.875, 0.125]] * 3)


async def test_requested_outputs_in_the_order_asked() -> None:
    def two_outputs(inputs: Arrays) -> Arrays:
        out = linear(inputs)
        out["label"] = (inputs["features"][:, 0] > 0.5).astype(np.int64).reshape(-1, 1)
        return out

    model = PythonModel(
        two_outputs,
        inputs=[tensor("features", "float32", [None, 2])],
        outputs=[
            tensor("probabilities", "float32", [None, 2]),
            tensor("label", "int64", [None, 1]),
        ],
        name="linear",
    )
    async with running(model) as r:
        for raw in (False, True):
            only = await r.stub.ModelInfer(
                features_request([[0.75, 0.0]], raw=raw, outputs=["label"])
            )
            assert [o.name for o in only.outputs] == ["label"]
            assert output_array(only).tolist() == [[1]]
        both = await r.stub.ModelInfer(
            features_request([[0.25, 0.0]], outputs=["label", "probabilities"])
        )
        assert [o.name for o in both.outputs] == ["label", "probabilities"]
        assert output_array(both, 0).tolist() == [[0]]
        np.testing.assert_allclose(output_array(both, 1), [[0.75, 0.25]])
        error = await status_of(
            r.stub.ModelInfer(features_request([[0.25, 0.0]], outputs=["nope"]))
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "has no output 'nope'" in (error.details() or "")


async def test_concurrent_requests_share_a_batch() -> None:
    # A batch starts when 16 rows wait (max_delay is only a safety net), so 16
    # concurrent single-row requests make exactly one model call.
    batching = {"max_batch_size": 16, "max_delay": SAFETY}
    async with running(python_model(), batching=batching) as r:
        xs = [i / 16 for i in range(16)]
        responses = await asyncio.gather(
            *(
                r.stub.ModelInfer(features_request([[x, 0.0]], raw=i % 2 == 0))
                for i, x in enumerate(xs)
            )
        )
        for x, response in zip(xs, responses, strict=True):
            np.testing.assert_allclose(output_array(response), [[1 - x, x]])
        batcher = r.models.get("linear").batcher
        assert (batcher.batches, batcher.rows) == (1, 16)


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (
            features_request([[0.25, 0.5, 1.0]]),
            "INVALID_ARGUMENT",
            "expects shape [-1, 2], got [1, 3]",
        ),
        (
            features_request([[0.25, 0.5]], datatype="FP64"),
            "INVALID_ARGUMENT",
            "expects datatype FP32, got 'FP64'",
        ),
        (features_request([[0.25, 0.5]], model="nope"), "NOT_FOUND", "unknown model 'nope'"),
    ],
    ids=["shape", "datatype", "unknown-model"],
)
async def test_bad_requests_fail_alone(
    model_file: Path, request_: pb.ModelInferRequest, code: str, message: str
) -> None:
    async with running(OnnxModel(model_file, name="linear")) as r:
        error = await status_of(r.stub.ModelInfer(request_))
        assert error.code() == getattr(grpc.StatusCode, code)
        assert message in (error.details() or "")
        good = await r.stub.ModelInfer(features_request([[0.5, 0.5]]))  # still serving
        np.testing.assert_allclose(output_array(good), [[0.5, 0.5]])


async def test_malformed_tensors_are_invalid_arguments() -> None:
    async with running(python_model()) as r:
        short = features_request([[0.25, 0.5]])
        del short.inputs[0].contents.fp32_contents[-1]
        truncated = features_request([[0.25, 0.5]], raw=True)
        truncated.raw_input_contents[0] = truncated.raw_input_contents[0][:-1]
        unknown = features_request([[0.25, 0.5]])
        unknown.inputs[0].name = "extra"
        missing = pb.ModelInferRequest(model_name="linear")
        extra_raw = features_request([[0.25, 0.5]], raw=True)
        extra_raw.raw_input_contents.append(b"")
        cases = {
            "contents.fp32_contents has 1": short,
            "needs 8 bytes, raw_input_contents has 7": truncated,
            "has no input 'extra'": unknown,
            "input 'features' is missing": missing,
            "1 inputs but 2 raw_input_contents": extra_raw,
        }
        for message, request in cases.items():
            error = await status_of(r.stub.ModelInfer(request))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, message
            assert message in (error.details() or ""), error.details()
        wrong_version = await status_of(
            r.stub.ModelMetadata(pb.ModelMetadataRequest(name="linear", version="9"))
        )
        assert wrong_version.code() == grpc.StatusCode.NOT_FOUND
        assert "no version '9'" in (wrong_version.details() or "")
        not_served = await status_of(r.stub.ModelReady(pb.ModelReadyRequest(name="nope")))
        assert not_served.code() == grpc.StatusCode.NOT_FOUND
        assert (await r.stub.ModelInfer(features_request([[0.5, 0.5]]))).outputs
        assert r.models.get("linear").batcher.rows == 1  # no bad request reached the model


async def test_api_key() -> None:
    async with running(python_model(), api_key="s3cret") as r:
        # Health probes carry no credentials.
        assert (await r.stub.ServerLive(pb.ServerLiveRequest())).live
        assert (await r.stub.ServerReady(pb.ServerReadyRequest())).ready
        calls: list[tuple[str, Callable[..., Any], Any]] = [
            ("metadata", r.stub.ServerMetadata, pb.ServerMetadataRequest()),
            ("model", r.stub.ModelMetadata, pb.ModelMetadataRequest(name="linear")),
            ("infer", r.stub.ModelInfer, features_request([[0.5, 0.5]])),
        ]
        for what, call, request in calls:
            missing = await status_of(call(request))
            assert missing.code() == grpc.StatusCode.UNAUTHENTICATED, what
            assert "API key missing" in (missing.details() or "")
            wrong = await status_of(call(request, metadata=[("authorization", "Bearer nope")]))
            assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED, what
            assert "API key wrong" in (wrong.details() or "")
            assert await call(request, metadata=[("authorization", "Bearer s3cret")])


async def test_the_grpc_deadline_reaches_the_batcher() -> None:
    gate, entered = threading.Event(), threading.Event()
    async with running(gated_model(gate, entered), batching={"max_batch_size": 1}) as r:
        first = asyncio.ensure_future(r.stub.ModelInfer(features_request([[0.5, 0.5]])))
        await wait_until(entered.is_set, "the first request to run")
        # The model is busy until the gate opens: this request waits in the queue past its deadline.
        late = await status_of(r.stub.ModelInfer(features_request([[0.25, 0.5]]), timeout=0.05))
        assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.set()
        np.testing.assert_allclose(output_array(await first), [[0.5, 0.5]])
        again = await r.stub.ModelInfer(features_request([[0.25, 0.5]]), timeout=SAFETY)
        np.testing.assert_allclose(output_array(again), [[0.75, 0.25]])
        assert r.models.get("linear").batcher.rows == 2  # the late request never ran


async def test_the_servers_default_deadline_is_the_batchers_own() -> None:
    """A call that sets no deadline gets the server's default, and it is the batcher
    that fails it at that deadline in its queue (no timer of the front's cancels it)."""
    gate, entered = threading.Event(), threading.Event()
    server = ModelServer(batching={"max_batch_size": 1})
    server.add(gated_model(gate, entered))
    await server.start()
    grpc_server = create_grpc_server(server, default_timeout_s=0.05)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = Stub(channel)
            first = asyncio.ensure_future(stub.ModelInfer(features_request([[0.5, 0.5]])))
            await wait_until(entered.is_set, "the first request to run")
            late = await status_of(stub.ModelInfer(features_request([[0.25, 0.5]])))
            assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "in the queue of model 'linear'; the request was not run" in (
                late.details() or ""
            )
            gate.set()
            with contextlib.suppress(grpc.aio.AioRpcError):
                await first  # held past the default deadline: failed at it, or answered
    finally:
        gate.set()
        await grpc_server.stop(None)
        await server.aclose()
    batcher = server.get("linear").batcher
    assert batcher.rows == 1  # the late request never ran
    expired = server.metrics.registry.get_sample_value(
        "rtinfer_batcher_rejected_total", {"model": "linear", "reason": "deadline"}
    )
    assert expired == 1


class RecordingServer(ModelServer):
    """A real ModelServer that also records the deadline each inference was given."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.deadlines: list[float | None] = []

    async def infer(
        self,
        name: str,
        inputs: Arrays,
        *,
        version: str | None = None,
        deadline: float | None = None,
        **kwargs: Any,
    ) -> Inference:
        self.deadlines.append(deadline)
        return await super().infer(name, inputs, version=version, deadline=deadline, **kwargs)


async def test_the_client_deadline_becomes_the_inference_deadline() -> None:
    server = RecordingServer()
    server.add(python_model())
    await server.start()
    port = free_port()
    grpc_server = await serve_grpc(server, "127.0.0.1", port)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = Stub(channel)
            before = time.time()
            await stub.ModelInfer(features_request([[0.5, 0.5]]), timeout=SAFETY)
            await stub.ModelInfer(features_request([[0.5, 0.5]]))
    finally:
        await grpc_server.stop(None)
        await server.aclose()
    with_timeout, without = server.deadlines
    assert without is None
    # The deadline is the client's, about SAFETY seconds after the call (gRPC carries it
    # as a coarse timeout, so only a loose bound: a wrong deadline is off by SAFETY).
    assert with_timeout is not None
    assert before < with_timeout < before + 2 * SAFETY


async def test_a_call_without_deadline_gets_the_servers_default() -> None:
    server = RecordingServer()
    server.add(python_model())
    await server.start()
    port = free_port()
    grpc_server = await serve_grpc(server, "127.0.0.1", port, default_timeout_s=1000.0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            before = time.time()
            await Stub(channel).ModelInfer(features_request([[0.5, 0.5]]))
            await Stub(channel).ModelInfer(features_request([[0.5, 0.5]]), timeout=SAFETY)
    finally:
        await grpc_server.stop(None)
        await server.aclose()
    default, own = server.deadlines
    assert default is not None
    assert before + 999 < default < before + 1001
    assert own is not None
    assert own < before + 2 * SAFETY  # the client's own deadline wins over the default


async def test_a_full_limiter_is_unavailable_and_sheds_best_effort_first() -> None:
    """HTTP's 503 is gRPC's UNAVAILABLE (what retry policies retry), with retry-after;
    ``x-priority: best_effort`` is shed where a critical call still gets in."""
    async with running(python_model(name="linear")) as r:
        limiter = r.models.get("linear").limiter
        assert limiter is not None
        share = int(limiter.limit * limiter.best_effort_share)
        held = [limiter.try_acquire(Priority.CRITICAL) for _ in range(share)]
        best_effort = (("x-priority", "best_effort"),)
        call = r.stub.ModelInfer(features_request([[0.5, 0.5]]), metadata=best_effort)
        error = await status_of(call)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "best_effort call shed" in (error.details() or "")
        assert ("retry-after", "1") in list(error.trailing_metadata() or ())
        critical = (("x-priority", "critical"),)
        done = await r.stub.ModelInfer(features_request([[0.5, 0.5]]), metadata=critical)
        np.testing.assert_allclose(output_array(done), [[0.5, 0.5]])
        held += [limiter.try_acquire(Priority.CRITICAL) for _ in range(limiter.limit - share)]
        error = await status_of(r.stub.ModelInfer(features_request([[0.5, 0.5]])))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "critical call shed" in (error.details() or "")
        for permit in held:
            permit.release()
        done = await r.stub.ModelInfer(features_request([[0.25, 0.5]]), metadata=best_effort)
        np.testing.assert_allclose(output_array(done), [[0.75, 0.25]])


async def test_a_full_queue_is_unavailable() -> None:
    gate, entered = threading.Event(), threading.Event()
    batching = {"max_batch_size": 1, "max_queue_rows": 1}
    async with running(gated_model(gate, entered), batching=batching) as r:
        batcher = r.models.get("linear").batcher
        running_ = asyncio.ensure_future(r.stub.ModelInfer(features_request([[0.5, 0.5]])))
        await wait_until(entered.is_set, "the first request to run")
        queued = asyncio.ensure_future(r.stub.ModelInfer(features_request([[0.5, 0.5]])))
        await wait_until(lambda: batcher._queued_rows == 1, "the second request to queue")
        call = r.stub.ModelInfer(features_request([[0.5, 0.5]]))
        error = await status_of(call)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "rows queued" in (error.details() or "")
        assert ("retry-after", "1") in list(error.trailing_metadata() or ())
        gate.set()
        for done in await asyncio.gather(running_, queued):
            np.testing.assert_allclose(output_array(done), [[0.5, 0.5]])


TRITON_CLIENT = """
import json, sys
import grpc
import numpy as np
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2

def fields(descriptor):
    out = {}
    for message in descriptor.message_types_by_name.values():
        stack = [message]
        while stack:
            m = stack.pop()
            stack.extend(m.nested_types)
            out[m.full_name] = sorted((f.name, f.number, f.type, f.is_repeated) for f in m.fields)
    return out

client = triton.InferenceServerClient(sys.argv[1])
assert client.is_server_live() and client.is_server_ready()
assert client.is_model_ready("linear")
meta = client.get_model_metadata("linear", as_json=True)
features = triton.InferInput("features", [2, 2], "FP32")
features.set_data_from_numpy(np.array([[0.25, 0.5], [0.75, 0.0]], np.float32))
result = client.infer("linear", [features], outputs=[triton.InferRequestedOutput("probabilities")])
try:
    client.infer("nope", [features])
    not_found = None
except triton.InferenceServerException as exc:
    not_found = exc.status()
print(json.dumps({
    "metadata": meta,
    "probabilities": result.as_numpy("probabilities").tolist(),
    "not_found": not_found,
    "fields": fields(service_pb2.DESCRIPTOR),
}))
"""


def our_fields() -> dict[str, list[tuple[str, int, int, bool]]]:
    out: dict[str, list[tuple[str, int, int, bool]]] = {}
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        stack = [message]
        while stack:
            m = stack.pop()
            stack.extend(m.nested_types)
            out[m.full_name] = sorted((f.name, f.number, f.type, f.is_repeated) for f in m.fields)
    return out


async def test_tritonclient_speaks_to_the_server(model_file: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("no tritonclient here: pip install 'tritonclient[grpc]'")
    # tritonclient registers the same `inference.*` protobuf messages as rtinfer.grpc, and one
    # process cannot hold both, so the client runs in its own process.
    script = tmp_path / "client.py"
    script.write_text(TRITON_CLIENT)
    async with running(OnnxModel(model_file, name="linear")) as r:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            f"127.0.0.1:{r.port}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 6 * SAFETY)
    assert process.returncode == 0, stderr.decode()
    answer = json.loads(stdout)
    assert answer["metadata"]["inputs"] == [
        {"name": "features", "datatype": "FP32", "shape": ["-1", "2"]}
    ]
    np.testing.assert_allclose(answer["probabilities"], [[0.75, 0.25], [0.25, 0.75]])
    assert answer["not_found"] == "StatusCode.NOT_FOUND"
    # Wire compatibility: every message here has Triton's field names, numbers and types.
    theirs = {k: [tuple(f) for f in v] for k, v in answer["fields"].items()}
    for name, fields in our_fields().items():
        assert set(fields) <= set(theirs[name]), name


def test_without_grpcio_the_error_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['grpc'] = None\n"
        "from rtinfer.exceptions import MissingDependency\n"
        "try:\n"
        "    import rtinfer.grpc\n"
        "except MissingDependency as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=SAFETY
    )
    assert "pip install 'rtinfer[grpc]'" in out.stdout


async def test_other_datatypes() -> None:
    def echo(inputs: Arrays) -> Arrays:
        return {"half": inputs["half"] * 2, "count": inputs["count"] + 1, "flag": ~inputs["flag"]}

    model = PythonModel(
        echo,
        inputs=[
            tensor("half", "float16", [None, 2]),
            tensor("count", "int8", [None]),
            tensor("flag", "bool", [None]),
        ],
        outputs=[
            tensor("half", "float16", [None, 2]),
            tensor("count", "int8", [None]),
            tensor("flag", "bool", [None]),
        ],
        name="echo",
    )
    half = np.array([[0.5, 1.5]], np.float16)
    async with running(model) as r:
        raw = pb.ModelInferRequest(model_name="echo")
        raw.inputs.add(name="half", datatype="FP16", shape=[1, 2])
        raw.inputs.add(name="count", datatype="INT8", shape=[1])
        raw.inputs.add(name="flag", datatype="BOOL", shape=[1])
        raw.raw_input_contents.extend(
            [half.astype("<f2").tobytes(), np.int8(-3).tobytes(), np.bool_(True).tobytes()]
        )
        response = await r.stub.ModelInfer(raw)
        got = {
            o.name: np.frombuffer(data, {"FP16": "<f2", "INT8": "i1", "BOOL": "?"}[o.datatype])
            for o, data in zip(response.outputs, response.raw_output_contents, strict=True)
        }
        assert got["half"].tolist() == [1.0, 3.0]
        assert got["count"].tolist() == [-2]
        assert got["flag"].tolist() == [False]

        typed = pb.ModelInferRequest(model_name="echo")
        typed.inputs.add(name="half", datatype="FP16", shape=[1, 2])
        error = await status_of(r.stub.ModelInfer(typed))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "FP16 has no typed contents field; send it in raw_input_contents" in (
            error.details() or ""
        )

        overflow = pb.ModelInferRequest(model_name="echo")
        count = overflow.inputs.add(name="count", datatype="INT8", shape=[1])
        count.contents.int_contents.append(300)
        error = await status_of(r.stub.ModelInfer(overflow))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "a value does not fit INT8" in (error.details() or "")


async def test_before_the_models_are_loaded(model_file: Path) -> None:
    server = ModelServer()
    server.add(OnnxModel(model_file, name="linear"))  # never started
    grpc_server = create_grpc_server(server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = Stub(channel)
            assert (await stub.ServerLive(pb.ServerLiveRequest())).live
            assert not (await stub.ServerReady(pb.ServerReadyRequest())).ready
            assert not (await stub.ModelReady(pb.ModelReadyRequest(name="linear"))).ready
            for call in (
                stub.ModelMetadata(pb.ModelMetadataRequest(name="linear")),
                stub.ModelInfer(features_request([[0.5, 0.5]])),
            ):
                error = await status_of(call)
                assert error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await grpc_server.stop(None)


async def test_review_findings_nan_huge_dims_and_no_leaked_model_errors() -> None:
    def leaky(inputs: Any) -> Any:
        if inputs["features"].any():  # warm-up sends zeros: only real requests fail
            raise RuntimeError("db password=hunter2 at /srv/secret")
        return {"probabilities": inputs["features"]}

    secretive = PythonModel(
        leaky, inputs=[tensor("features", "float32", [None, 2])],
        outputs=[tensor("probabilities", "float32", [None, 2])], name="leaky",
    )  # fmt: skip
    async with running(python_model(), secretive) as r:
        for raw in (False, True):
            request = features_request([[float("nan"), 1.0]], raw=raw)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await r.stub.ModelInfer(request, timeout=SAFETY)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "NaN or infinity" in (info.value.details() or "")
        huge = pb.ModelInferRequest(model_name="linear")
        huge.inputs.add(name="features", datatype="FP32", shape=[0, 2**62])
        huge.raw_input_contents.append(b"")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await r.stub.ModelInfer(huge, timeout=SAFETY)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await r.stub.ModelInfer(features_request([[0.5, 0.5]], model="leaky"), timeout=SAFETY)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "hunter2" not in (info.value.details() or "")
        ok = await r.stub.ModelInfer(features_request([[0.5, 0.5]]), timeout=SAFETY)
        assert ok.model_name == "linear"
