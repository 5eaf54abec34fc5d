"""ModelServer: named, versioned models behind their batchers, as the protocol fronts use them."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from conftest import python_model
from rtinfer.exceptions import Overloaded
from rtinfer.serving import ModelNotFound, ModelServer, numpy_dtype, oip_datatype


async def test_versions_metadata_and_inference() -> None:
    server = ModelServer(batching={"max_batch_size": 8})
    old, new = python_model(), python_model()
    old.version, new.version = "1", "2"
    server.add(old, name="linear")
    server.add(new, name="linear")
    assert not server.ready
    await server.start()
    try:
        assert server.ready
        assert server.get("linear").version == "2"  # the latest answers by default
        assert server.get("linear", "1").model is old
        with pytest.raises(ModelNotFound, match="no version '9'; it has 1, 2"):
            server.get("linear", "9")
        with pytest.raises(ModelNotFound, match="unknown model 'nope'; served here: linear"):
            server.get("nope")
        served, outputs, step = await server.infer(
            "linear", {"features": np.array([[0.25, 0.0]], np.float32)}, version="1"
        )
        assert step is None  # no fallback chain: the model answered
        assert served.version == "1"
        np.testing.assert_allclose(outputs["probabilities"], [[0.75, 0.25]])
        meta = served.metadata()
        assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 2]}]
        assert meta["versions"] == ["1"]
    finally:
        await server.aclose()
    assert not server.ready


async def test_a_full_queue_is_overloaded_at_once() -> None:
    server = ModelServer(batching={"max_batch_size": 1, "max_queue_rows": 1})
    server.add(python_model(delay=0.05))
    await server.start()
    try:
        rows = {"features": np.array([[0.5, 0.5]], np.float32)}
        running = asyncio.ensure_future(server.infer("linear", rows))
        await asyncio.sleep(0.01)  # the first runs, a second queues, a third finds no room
        queued = asyncio.ensure_future(server.infer("linear", rows))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await server.infer("linear", rows)
        await asyncio.gather(running, queued)
    finally:
        await server.aclose()


def test_datatypes_round_trip() -> None:
    for name in ("BOOL", "INT8", "INT32", "INT64", "FP16", "FP32", "FP64", "UINT8"):
        assert oip_datatype(numpy_dtype(name)) == name
    with pytest.raises(ValueError, match="unknown datatype 'FP8'"):
        numpy_dtype("FP8")


async def test_the_limiter_samples_the_time_in_front_of_and_in_the_model() -> None:
    # A clock that moves a whole second between admission and release, as a loop busy
    # for seconds would: the limiter samples the batcher's time instead (queue and call).
    now = [0.0]

    def clock() -> float:
        now[0] += 0.5
        return now[0]

    server = ModelServer(clock=clock)
    server.add(python_model(delay=0.005), name="linear")
    await server.start()
    try:
        for _ in range(3):
            await server.infer("linear", {"features": np.array([[0.5, 0.0]], np.float32)})
        limiter = server.get("linear").limiter
        assert limiter is not None
        assert 0.005 <= limiter.long_rtt < 0.5
    finally:
        await server.aclose()
