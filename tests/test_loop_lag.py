"""The event loop's lag: a timer due every interval records how late it ran."""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import SAFETY, python_model
from rtinfer.observability import LoopLag, Metrics
from rtinfer.pipeline import Pipeline
from rtinfer.serving import ModelServer
from rtinfer.sinks import ListSink
from rtinfer.stages import Decode
from rtinfer.testing import ListSource
from rtinfer.types import Batch

COUNT = "rtinfer_event_loop_lag_seconds_count"
SUM = "rtinfer_event_loop_lag_seconds_sum"


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_held_loop_shows_as_lag_and_stop_ends_the_samples() -> None:
    metrics = Metrics()
    lag = LoopLag(metrics.loop_lag, interval=0.01)
    lag.start()
    lag.start()  # again: still one timer
    await asyncio.sleep(0.05)
    quiet = sample(metrics, COUNT)
    assert quiet >= 1
    hold = asyncio.get_running_loop().call_soon  # a callback holding the loop's turn:
    hold(time.sleep, 0.2)  # the timer due meanwhile runs late
    await asyncio.sleep(0.03)
    # The held turn is one sample of at least 150 ms (the timer was due at most 10 ms
    # into it), in the buckets above 0.1 s.
    assert sample(metrics, SUM) >= 0.15
    assert (
        sample(metrics, COUNT) - sample(metrics, "rtinfer_event_loop_lag_seconds_bucket", le="0.1")
        >= 1
    )
    lag.stop()
    stopped = sample(metrics, COUNT)
    await asyncio.sleep(0.05)
    assert sample(metrics, COUNT) == stopped


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval must be more than 0 seconds"):
        LoopLag(Metrics().loop_lag, interval=0)


async def test_a_model_server_samples_its_loop_while_started() -> None:
    server = ModelServer()
    server.add(python_model(), name="linear")
    await server.start()
    try:
        await asyncio.sleep(0.25)  # two samples at 0.1 s
        assert sample(server.metrics, COUNT) >= 1
    finally:
        await server.aclose()
    after = sample(server.metrics, COUNT)
    await asyncio.sleep(0.15)
    assert sample(server.metrics, COUNT) == after


async def test_a_pipeline_samples_its_loop_while_it_runs() -> None:
    async def slow(batch: Batch) -> Batch:
        await asyncio.sleep(0.25)  # two samples at 0.1 s
        for event in batch.events:
            event.result = {"id": event.id}
        return batch

    sink = ListSink()
    pipeline = Pipeline(ListSource([b'{"id": "a"}']), [Decode(), slow], [sink])
    await asyncio.wait_for(pipeline.run(), SAFETY)
    assert len(sink.results) == 1
    count = sample(pipeline.metrics, COUNT)
    assert count >= 1
    await asyncio.sleep(0.15)  # stopped with the run
    assert sample(pipeline.metrics, COUNT) == count
