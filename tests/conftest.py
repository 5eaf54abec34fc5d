"""Shared fixtures for the pipeline, stage, config and CLI tests.

- ``model_file``: a tiny ONNX model (made with ``onnx.helper``) whose
  ``probabilities`` output is ``[1 - x, x]`` for input ``features = [x, y]``, so
  a test knows every score exactly;
- :class:`Reading`: the msgspec schema of the test events;
- :func:`python_model`: the same arithmetic as a :class:`PythonModel`, optionally
  failing on one value or sleeping per call;
- :class:`RecordingSink` and :class:`Ledger`: sinks that record what was written
  and flushed, and check on every call that nothing was acknowledged before
  every sink had flushed what came from it;
- ``redis`` and ``name``: a client of the test Redis (``REDIS_URL``; skips without one)
  and unique stream names, deleted after the test;
- ``helpers_dir``: an importable module (``rtinfer_testhelpers``) for the import
  paths that pipeline files name, in this process and in subprocesses.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
import pytest

from rtinfer.broker import Broker
from rtinfer.models import PythonModel, tensor
from rtinfer.pipeline import Pipeline
from rtinfer.types import Arrays, Event, Position, Sink, Skipped, Source

if TYPE_CHECKING:
    from redis.asyncio import Redis

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

SAFETY = 10.0  # seconds: a safety net against a hang, never a timing assertion


def service_missing(message: str) -> None:
    """No broker to test against: skip on a developer's machine, fail loudly in CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI must provide every service the tests use)")
    pytest.skip(message)


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    """A client of the test Redis; skips the test when there is none."""
    pytest.importorskip("redis")
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    client = Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except (OSError, RedisError) as exc:
        await client.aclose()
        service_missing(f"no Redis at {REDIS_URL}: {exc}")
    yield client
    await client.aclose()


@pytest.fixture
async def name(redis: Redis) -> AsyncIterator[Callable[[str], str]]:
    """Unique stream names for this test (``name("in")``), deleted with their groups after it."""
    prefix = f"rtinfer-test-{uuid.uuid4().hex[:12]}"
    made: list[str] = []

    def make(label: str) -> str:
        made.append(f"{prefix}-{label}")
        return made[-1]

    yield make
    if made:
        await redis.delete(*made)


class Reading(msgspec.Struct):
    """The test events: ``x`` becomes the score, ``key`` the broker key, ``seq`` the order."""

    id: str
    key: str
    x: float
    y: float
    seq: int = 0


def payload(i: int, *, key: str = "k", x: float = 0.25, y: float = 0.5, seq: int = 0) -> bytes:
    return msgspec.json.encode(Reading(id=f"e{i}", key=key, x=x, y=y, seq=seq))


def linear(inputs: Arrays) -> Arrays:
    """``probabilities = [1 - x, x]`` for ``features = [x, y]``: what the ONNX fixture computes."""
    x = inputs["features"][:, :1]
    return {"probabilities": np.concatenate([1 - x, x], axis=1).astype(np.float32)}


def python_model(
    *, fail_on: float | None = None, delay: float = 0.0, name: str = "linear"
) -> PythonModel:
    """The linear model in Python; it raises on any batch holding ``x == fail_on``.

    ``delay`` seconds of sleep per call (on the batcher's worker thread) make it
    slow; warm-up calls (all zeros) do not sleep.
    """

    def predict(inputs: Arrays) -> Arrays:
        features = inputs["features"]
        if fail_on is not None and bool((features[:, 0] == fail_on).any()):
            raise ValueError(f"the model cannot score x={fail_on}")
        if delay and features.any():
            time.sleep(delay)
        return linear(inputs)

    return PythonModel(
        predict,
        inputs=[tensor("features", "float32", [None, 2])],
        outputs=[tensor("probabilities", "float32", [None, 2])],
        name=name,
    )


class RangeRecorder:
    """A source ``skip``'s ``record``: keeps the ranges of each call, sorted, in ``seen``."""

    def __init__(self) -> None:
        self.seen: list[list[Skipped]] = []

    async def __call__(self, ranges: list[Skipped]) -> None:
        self.seen.append(sorted(ranges))


def shedding_pipeline(
    source: Source, results: Sink, dead: Sink, read_size: int, slo: float = 1.0
) -> Pipeline:
    """The test scoring (decode, vectorize, the linear model, outputs) on ``source``, one
    read in flight, a deadline of ``slo`` seconds, late events shed by range
    (``slo.shed_by: range``)."""
    from rtinfer.batching import MicroBatcher
    from rtinfer.stages import Decode, Outputs, Predict, Vectorize

    return Pipeline(
        source,
        [
            Decode(Reading),
            Vectorize(["x", "y"]),
            Predict(MicroBatcher(python_model(), max_batch_size=16, max_delay=0)),
            Outputs(),
        ],
        [results],
        dead_letters=dead,
        read_size=read_size,
        max_in_flight=1,
        slo=slo,
        shed_expired=True,
        shed_ranges=True,
    )


def factory_pipeline(tmp_path: Path, name: str, factory: str) -> Path:
    """``tmp_path/NAME.yaml``: a pipeline whose model ``factory`` (``module:function``)
    builds, scoring ``x`` and ``y`` of events read from an empty file (requests give it
    its work), written to a file sink."""
    (tmp_path / "in.jsonl").write_text("")
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"""\
name: {name}
source: {{type: file, path: {tmp_path / "in.jsonl"}}}
decode:
  fields: {{id: str, x: float, y: float}}
stages:
  - type: vectorize
    fields: [x, y]
model: {{factory: "{factory}"}}
sinks:
  - type: file
    path: {tmp_path / "out.jsonl"}
"""
    )
    return path


async def wait_until(condition: Callable[[], bool], what: str = "condition") -> None:
    """Yield to the loop until ``condition()`` holds (a hang fails after ``SAFETY`` seconds)."""

    async def poll() -> None:
        # Polling on purpose: the conditions are arbitrary pipeline state, with no event to await.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.001)

    try:
        await asyncio.wait_for(poll(), SAFETY)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def committed_positions(broker: Broker, group: str, topic: str) -> set[Position]:
    """Every position below the group's committed offset of each partition."""
    source = f"memory://{topic}"
    return {
        Position(source, p, o)
        for p, end in enumerate(broker.committed(group, topic))
        for o in range(end)
    }


class Ledger:
    """What every sink has flushed, checked against what the source has acknowledged.

    ``acked`` returns the acknowledged positions (from ``broker.committed`` or
    a ``ListSource``). The invariant, checked at every sink call: each
    acknowledged position was flushed by every result sink, or (a dead letter)
    by the dead-letter sink.
    """

    def __init__(self, acked: Callable[[], set[Position]]) -> None:
        self.acked = acked
        self.results: list[RecordingSink] = []
        self.dead: RecordingSink | None = None
        self.checks = 0

    def check(self) -> None:
        self.checks += 1
        acked = self.acked()
        done = set.intersection(*(s.flushed for s in self.results)) if self.results else set()
        if self.dead is not None:
            done |= self.dead.flushed
        early = acked - done
        assert not early, f"acknowledged before flushed: {sorted(early)[:5]}"


class RecordingSink:
    """A sink that records results and positions written and flushed.

    ``gate`` (when set) must be open for ``flush`` to return; ``fail_on_write``
    makes the n-th write (from 1) raise. Every call checks the ``ledger``.
    """

    def __init__(
        self,
        name: str = "recording",
        *,
        ledger: Ledger | None = None,
        dead: bool = False,
        gate: asyncio.Event | None = None,
        fail_on_write: int | None = None,
    ) -> None:
        self.name = name
        self.ledger = ledger
        if ledger is not None:
            if dead:
                ledger.dead = self
            else:
                ledger.results.append(self)
        self.gate = gate
        self.fail_on_write = fail_on_write
        self.results: list[Any] = []
        self.written: list[Position] = []
        self.flushed: set[Position] = set()
        self.flushed_results: list[Any] = []
        self.writes = 0
        self.flushes = 0
        self.flushing = False
        self.closed = False
        self._pending: list[tuple[Position | None, Any]] = []
        self.on_write: Callable[[Sequence[Event]], None] | None = None

    def _check(self) -> None:
        if self.ledger is not None:
            self.ledger.check()

    async def start(self) -> None:
        pass

    async def write(self, events: Sequence[Event]) -> None:
        self._check()
        self.writes += 1
        if self.fail_on_write is not None and self.writes >= self.fail_on_write:
            raise RuntimeError(f"sink {self.name} failed on write {self.writes}")
        if self.on_write is not None:
            self.on_write(events)
        for event in events:
            self.results.append(event.result)
            if event.position is not None:
                self.written.append(event.position)
            self._pending.append((event.position, event.result))

    async def flush(self) -> None:
        self._check()
        pending, self._pending = self._pending, []
        self.flushing = True
        try:
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.flushing = False
        self.flushes += 1
        for position, result in pending:
            if position is not None:
                self.flushed.add(position)
                last = result.get("last_offset") if isinstance(result, dict) else None
                if isinstance(last, int) and isinstance(position.offset, int):
                    # a dead letter naming a range (slo.shed_by: range) stands for each
                    self.flushed.update(
                        Position(position.source, position.partition, o)
                        for o in range(position.offset, last + 1)
                    )
            self.flushed_results.append(result)

    async def aclose(self) -> None:
        self.closed = True


HELPERS = '''
"""Objects that the test pipeline files name by import path."""
import os
import time

import msgspec
import numpy as np

from rtinfer.models import PythonModel, tensor


class Reading(msgspec.Struct):
    id: str
    key: str
    x: float
    y: float


def _linear(inputs):
    features = inputs["features"]
    if features.any():
        time.sleep(float(os.environ.get("RTINFER_TEST_DELAY", "0")))
    x = features[:, :1]
    return {"probabilities": np.concatenate([1 - x, x], axis=1).astype(np.float32)}


def slow_model():
    """The linear model, sleeping RTINFER_TEST_DELAY seconds per call (not in warm-up)."""
    return PythonModel(
        _linear,
        inputs=[tensor("features", "float32", [None, 2])],
        outputs=[tensor("probabilities", "float32", [None, 2])],
        name="slow",
        version="7",
    )


def not_a_model():
    return 42


class Double:
    """A python stage: multiplies model input column 0 (x, the score) by ``factor``."""

    def __init__(self, factor=2.0):
        self.factor = factor
        self.name = "double"

    def __call__(self, batch):
        if batch.inputs is not None:
            batch.inputs["features"][:, 0] *= self.factor
        return batch
'''


@pytest.fixture(autouse=True)
def _unfreeze_the_heap() -> Iterator[None]:
    """``rtinfer run`` and ``rtinfer serve`` freeze their start-up heap (``gc.freeze``);
    a test that runs one in this process gives the collector the heap back after it."""
    yield
    if gc.get_freeze_count():
        gc.unfreeze()


@pytest.fixture(scope="session")
def helpers_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder holding ``rtinfer_testhelpers.py``, on ``sys.path`` for the session."""
    folder = tmp_path_factory.mktemp("helpers")
    (folder / "rtinfer_testhelpers.py").write_text(HELPERS)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("rtinfer_testhelpers", None)


@pytest.fixture(scope="session")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX model: ``probabilities = features @ [[-1, 1], [0, 0]] + [1, 0]`` = ``[1-x, x]``."""
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.array([[-1, 1], [0, 0]], np.float32), "W")
    bias = numpy_helper.from_array(np.array([1, 0], np.float32), "B")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "W"], ["XW"]),
            helper.make_node("Add", ["XW", "B"], ["probabilities"]),
        ],
        "linear",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
        initializer=[weights, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("models") / "linear.onnx"
    path.write_bytes(model.SerializeToString())
    return path
