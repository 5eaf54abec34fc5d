"""BYTES tensors (ONNX string tensors) over REST (JSON and binary), gRPC and tritonclient.

The model is a real ONNX graph with a string input: a LabelEncoder (``ai.onnx.ml``)
turns a merchant category into a code, and an Identity hands the strings back, so a
test sees BYTES both ways.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import SAFETY
from rtinfer.grpc import inference_pb2 as pb
from rtinfer.http import InferenceApp
from rtinfer.models import OnnxModel
from rtinfer.serving import ModelServer, decode_bytes_tensor, encode_bytes_tensor
from test_grpc import running
from test_http import serving

CATEGORIES = ["grocery", "travel", "électronique"]


@pytest.fixture(scope="module")
def text_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import onnx
    from onnx import TensorProto, helper

    text = helper.make_tensor_value_info("category", TensorProto.STRING, [None, 1])
    code = helper.make_tensor_value_info("code", TensorProto.INT64, [None, 1])
    echo = helper.make_tensor_value_info("echo", TensorProto.STRING, [None, 1])
    encoder = helper.make_node(
        "LabelEncoder", ["category"], ["code"], domain="ai.onnx.ml",
        keys_strings=CATEGORIES, values_int64s=[1, 2, 3], default_int64=-1,
    )  # fmt: skip
    graph = helper.make_graph(
        [encoder, helper.make_node("Identity", ["category"], ["echo"])],
        "categories",
        [text],
        [code, echo],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    )
    model.ir_version = 8
    path = tmp_path_factory.mktemp("bytes") / "categories.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def url(text_model_file: Path) -> Iterator[str]:
    server = ModelServer()
    server.add(OnnxModel(text_model_file, name="categories"))
    with serving(InferenceApp(server)) as base:
        yield base


@pytest.fixture
async def client(url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=url, timeout=SAFETY) as c:
        yield c


def test_the_binary_form_round_trips_and_refuses_what_does_not_fit() -> None:
    array = np.array(["a", "", "électronique"], dtype=object)
    raw = encode_bytes_tensor(array)
    assert raw[:5] == struct.pack("<I", 1) + b"a"
    assert decode_bytes_tensor(raw, 3, "x").tolist() == ["a", "", "électronique"]
    from rtinfer.exceptions import ModelInputError

    for data, count in ((raw, 4), (raw + b"!", 3), (raw[:-1], 3), (b"\1\0\0\0\xff", 1)):
        with pytest.raises(ModelInputError):
            decode_bytes_tensor(data, count, "x")
    with pytest.raises(ModelInputError, match="need at least"):
        decode_bytes_tensor(b"", 2**31, "x")  # refused before anything is allocated


async def test_bytes_in_json_and_binary(client: httpx.AsyncClient) -> None:
    meta = (await client.get("/v2/models/categories")).json()
    assert meta["inputs"][0]["datatype"] == "BYTES"
    body = {"inputs": [{"name": "category", "shape": [4, 1], "datatype": "BYTES",
                        "data": ["travel", "grocery", "électronique", "pets"]}]}  # fmt: skip
    r = await client.post("/v2/models/categories/infer", json=body)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["code"]["data"] == [2, 1, 3, -1]
    assert outputs["echo"] == {"name": "echo", "datatype": "BYTES", "shape": [4, 1],
                               "data": ["travel", "grocery", "électronique", "pets"]}  # fmt: skip
    # The binary tensor data extension, both ways.
    raw = encode_bytes_tensor(np.array(["grocery", "travel"], dtype=object))
    header = json.dumps({
        "inputs": [{"name": "category", "shape": [2, 1], "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "echo", "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip
    r = await client.post(
        "/v2/models/categories/infer",
        content=header + raw,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert r.status_code == 200, r.text
    length = int(r.headers["inference-header-content-length"])
    answer = json.loads(r.content[:length])
    assert answer["outputs"][0]["parameters"]["binary_data_size"] == len(raw)
    assert decode_bytes_tensor(r.content[length:], 2, "echo").tolist() == ["grocery", "travel"]


async def test_bad_bytes_get_400(client: httpx.AsyncClient) -> None:
    def infer(data: object, shape: list[int]) -> dict[str, object]:
        return {"inputs": [{"name": "category", "shape": shape, "datatype": "BYTES", "data": data}]}

    for body in (infer([1, 2], [2, 1]), infer(["a"], [2, 1]), infer([True], [1, 1])):
        r = await client.post("/v2/models/categories/infer", json=body)
        assert r.status_code == 400, body
    header = json.dumps({"inputs": [{"name": "category", "shape": [1, 1], "datatype": "BYTES",
                         "parameters": {"binary_data_size": 5}}]}).encode()  # fmt: skip
    r = await client.post(
        "/v2/models/categories/infer",
        content=header + b"\x09\0\0\0a",  # claims 9 bytes, has 1
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert r.status_code == 400
    assert "claims 9 bytes" in r.json()["error"]
    ok = await client.post("/v2/models/categories/infer", json=infer(["travel"], [1, 1]))
    assert ok.status_code == 200


async def test_tritonclient_sends_and_reads_bytes(url: str) -> None:
    import tritonclient.http as triton  # type: ignore[import-untyped]  # no type information

    client = triton.InferenceServerClient(url.removeprefix("http://"))
    try:
        for binary in (False, True):
            tensor = triton.InferInput("category", [2, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([["travel"], ["x"]], dtype=object), binary)
            wanted = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("code", "echo")]
            result = client.infer("categories", [tensor], outputs=wanted)
            assert result.as_numpy("code").tolist() == [[2], [-1]]
            assert result.as_numpy("echo").ravel().tolist() in (["travel", "x"], [b"travel", b"x"])
    finally:
        client.close()


async def test_grpc_bytes_typed_and_raw(text_model_file: Path) -> None:
    async with running(OnnxModel(text_model_file, name="categories")) as r:
        typed = pb.ModelInferRequest(model_name="categories")
        item = typed.inputs.add(name="category", datatype="BYTES", shape=[2, 1])
        item.contents.bytes_contents.extend(["électronique".encode(), b"grocery"])
        response = await r.stub.ModelInfer(typed)
        names = [o.name for o in response.outputs]
        echo = response.outputs[names.index("echo")]
        assert echo.datatype == "BYTES"
        if response.raw_output_contents:
            values = decode_bytes_tensor(response.raw_output_contents[names.index("echo")], 2, "")
            assert values.tolist() == ["électronique", "grocery"]
        else:
            assert list(echo.contents.bytes_contents) == ["électronique".encode(), b"grocery"]
        raw = pb.ModelInferRequest(model_name="categories")
        raw.inputs.add(name="category", datatype="BYTES", shape=[1, 1])
        raw.raw_input_contents.append(encode_bytes_tensor(np.array(["travel"], dtype=object)))
        response = await r.stub.ModelInfer(raw)
        code = response.outputs[[o.name for o in response.outputs].index("code")]
        assert code.datatype == "INT64"
        index = [o.name for o in response.outputs].index("code")
        assert np.frombuffer(response.raw_output_contents[index], "<i8").tolist() == [2]
