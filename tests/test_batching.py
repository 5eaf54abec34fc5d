"""The micro-batcher: batches form, never exceed their size, and every caller gets its own answer.

Most tests use :class:`IdModel`, a numpy "model" that returns each row's id, records
every call it gets (the rows of each batch, the thread it ran on, a context variable)
and can be held at a gate, so a test decides when a batch may finish without ever
depending on how fast anything runs.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from rtinfer.batching import MicroBatcher, warmup_sizes
from rtinfer.exceptions import (
    Closed,
    DeadlineExceeded,
    ModelError,
    ModelInputError,
    Overloaded,
)
from rtinfer.models import OnnxModel, PythonModel, tensor
from rtinfer.observability.metrics import Metrics
from rtinfer.types import Arrays, Model

SAFETY = 10.0  # seconds: a safety net against a hang, never a timing assertion

#: Set by callers; the model records what it sees.
caller: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="nobody")


class Poisoned(Exception):
    """What :class:`IdModel` raises on a batch holding a negative id."""


class IdModel:
    """Returns each row's id (``ids``) and twice it (``double``); records every call.

    A batch holding a negative id raises :class:`Poisoned`. While ``gate`` is
    clear, calls wait at it (after being recorded). ``drop_rows`` makes the
    output that many rows short, like a broken model.
    """

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.threads: list[threading.Thread] = []
        self.callers: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.hold: set[int] = set()  # a call made of exactly these ids waits for `release`
        self.release = threading.Event()
        self.drop_rows = 0
        self._lock = threading.Lock()

    def __call__(self, inputs: Arrays) -> Arrays:
        ids = inputs["ids"][:, 0]
        with self._lock:
            self.calls.append(ids.tolist())
            self.threads.append(threading.current_thread())
            self.callers.append(caller.get())
        if not self.gate.wait(SAFETY):
            raise TimeoutError("the test never opened the gate")
        if self.hold and set(ids.tolist()) == self.hold and not self.release.wait(SAFETY):
            raise TimeoutError("the test never released the held call")
        if (ids < 0).any():
            raise Poisoned(f"poisonous rows {ids[ids < 0].tolist()}")
        keep = len(ids) - self.drop_rows
        return {"ids": ids[:keep].copy(), "double": 2 * inputs["ids"][:keep]}

    def model(self, name: str = "ids") -> PythonModel:
        return PythonModel(self, inputs={"ids": ("int64", [None, 1])}, name=name)

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.calls]

    @property
    def seen(self) -> set[int]:
        return {i for call in self.calls for i in call}


def rows(ids: Sequence[int]) -> Arrays:
    return {"ids": np.asarray(ids, dtype=np.int64).reshape(-1, 1)}


def assert_own(out: Arrays, ids: Sequence[int]) -> None:
    """``out`` is the model's answer for exactly ``ids``, in order: no row lost, added, swapped."""
    assert set(out) == {"ids", "double"}
    assert out["ids"].tolist() == list(ids)
    assert out["double"].tolist() == [[2 * i] for i in ids]


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    async def poll() -> None:
        # Polls: the state is set by the model's threads, which hold no asyncio.Event.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.001)

    try:
        await asyncio.wait_for(poll(), SAFETY)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def until_past(instant: float) -> None:
    """Wait until ``time.time()`` (the deadlines' clock, not the loop's) is past ``instant``."""
    await wait_until(lambda: time.time() > instant, "the deadline to pass")


async def settle() -> None:
    """Let every task that is ready run until it blocks (a few loop turns, no real time)."""
    for _ in range(10):
        await asyncio.sleep(0)


@asynccontextmanager
async def running(model: Any, **options: Any) -> AsyncIterator[MicroBatcher]:
    batcher = MicroBatcher(model, **options)
    await asyncio.wait_for(batcher.start(), SAFETY)
    try:
        yield batcher
    finally:
        await asyncio.wait_for(batcher.aclose(), SAFETY)


async def started(recorder: IdModel, **options: Any) -> MicroBatcher:
    batcher = MicroBatcher(recorder.model(), **options)
    await asyncio.wait_for(batcher.start(), SAFETY)
    recorder.calls.clear()  # forget the probe and warm-up calls
    recorder.threads.clear()
    recorder.callers.clear()
    return batcher


def sample(batcher: MicroBatcher, name: str, **labels: str) -> float:
    value = batcher.metrics.registry.get_sample_value(name, {"model": batcher.model.name, **labels})
    return 0.0 if value is None else value


# -- the invariants, property-tested ---------------------------------------------------

SHORT = 0.02  # seconds: a deadline that passes while its request waits behind a held model


@dataclasses.dataclass(frozen=True)
class Req:
    rows: int
    kind: str  # "none", "far", "past", or (while every slot is held) "short"
    wait: bool
    poison: bool
    pause: int  # before submitting: 0 nothing, 1 one loop turn, 2 a millisecond


@dataclasses.dataclass(frozen=True)
class Scenario:
    max_batch_size: int
    max_delay: float
    max_in_flight: int
    max_queue_rows: int | None
    held: list[Req]  # submitted while every slot is held at the gate
    free: list[Req]  # submitted after the gate opens, interleaved with the batches


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    size = draw(st.integers(1, 8))

    def reqs(kinds: list[str], most: int) -> st.SearchStrategy[list[Req]]:
        req = st.builds(
            Req,
            rows=st.integers(1, 2 * size + 3),
            kind=st.sampled_from(kinds),
            wait=st.booleans(),
            poison=st.integers(0, 7).map(lambda n: n == 0),
            pause=st.integers(0, 2),
        )
        return st.lists(req, max_size=most)

    return Scenario(
        max_batch_size=size,
        max_delay=draw(st.sampled_from([0.0, 0.0005, 0.003])),
        max_in_flight=draw(st.integers(1, 3)),
        max_queue_rows=draw(st.none() | st.integers(size, 3 * size)),
        held=draw(reqs(["none", "far", "past", "short"], 8)),
        free=draw(reqs(["none", "far", "past"], 12)),
    )


def ids_of(index: int, req: Req) -> list[int]:
    if req.poison:
        return [-(1000 * index + j + 1) for j in range(req.rows)]
    return [1000 * index + j for j in range(req.rows)]


async def play(s: Scenario) -> tuple[IdModel, list[Req], list[list[int]], list[Any], float]:
    """Run a scenario; return the model's record and each request's ids and outcome."""
    recorder = IdModel()
    batcher = await started(
        recorder,
        max_batch_size=s.max_batch_size,
        max_delay=s.max_delay,
        max_in_flight=s.max_in_flight,
        max_queue_rows=s.max_queue_rows,
    )
    recorder.gate.clear()
    now = time.time()
    deadlines = {"none": None, "far": now + 3600, "short": now + SHORT}
    reqs = [*s.held, *s.free]
    ids = [ids_of(i, r) for i, r in enumerate(reqs)]
    tasks: list[asyncio.Task[Arrays]] = []

    def submit(i: int) -> None:
        r = reqs[i]
        deadline = time.time() - 1 if r.kind == "past" else deadlines[r.kind]
        tasks.append(
            asyncio.create_task(batcher.submit(rows(ids[i]), deadline=deadline, wait=r.wait))
        )

    try:
        # Full batches start at once: one per slot, held at the gate.
        blockers = [
            asyncio.create_task(
                batcher.submit(rows([10**7 + 1000 * b + j for j in range(s.max_batch_size)]))
            )
            for b in range(s.max_in_flight)
        ]
        await wait_until(lambda: len(recorder.calls) == s.max_in_flight, "the blockers")
        for i in range(len(s.held)):
            submit(i)
        await settle()
        await until_past(now + SHORT)  # the short deadlines pass while queued
        recorder.gate.set()
        for i in range(len(s.held), len(reqs)):
            if reqs[i].pause == 1:
                await asyncio.sleep(0)
            elif reqs[i].pause == 2:
                await asyncio.sleep(0.001)
            submit(i)
        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), SAFETY)
        for b, blocker in enumerate(blockers):
            assert_own(await blocker, [10**7 + 1000 * b + j for j in range(s.max_batch_size)])
    finally:
        recorder.gate.set()
        await asyncio.wait_for(batcher.aclose(), SAFETY)
    return recorder, reqs, ids, list(done), sample(batcher, "rtinfer_batcher_queued_rows")


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_batcher_invariants(s: Scenario) -> None:
    recorder, reqs, ids, outcomes, queued = asyncio.run(play(s))

    # No model call ever gets more than max_batch_size rows.
    assert max(recorder.sizes) <= s.max_batch_size
    # Only rows that callers submitted reach the model.
    submitted = {i for block in ids for i in block}
    assert recorder.seen - submitted <= {10**7 + 1000 * b + j for b in range(3) for j in range(8)}
    assert queued == 0
    for n, (r, own, outcome) in enumerate(zip(reqs, ids, outcomes, strict=True)):
        expired = r.kind == "past" or (r.kind == "short" and n < len(s.held))
        if isinstance(outcome, Overloaded):
            # Only a caller that would not wait is turned away; a past deadline wins.
            assert not r.wait, (r, outcome)
            assert r.kind != "past"
            assert outcome.retry_after > 0
        elif expired:
            assert isinstance(outcome, DeadlineExceeded), (r, outcome)
        elif r.poison:
            assert isinstance(outcome, Poisoned), (r, outcome)
        else:
            assert isinstance(outcome, dict), (r, outcome)
            assert_own(outcome, own)
        if expired:
            # An expired request is never put in a batch.
            assert not recorder.seen & set(own), (r, outcome)


# -- batches form ------------------------------------------------------------------


async def test_concurrent_single_rows_are_batched_by_the_timer() -> None:
    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=64, max_delay=0.05)
    try:
        outs = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit(rows([i])) for i in range(40))), SAFETY
        )
    finally:
        await batcher.aclose()
    for i, out in enumerate(outs):
        assert_own(out, [i])
    # Submitted in one loop turn, they all wait for the same timer: one call.
    assert recorder.sizes == [40]
    assert batcher.batches == 1
    assert batcher.rows == 40


async def test_batches_fill_while_the_model_is_busy_without_delay() -> None:
    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=8, max_delay=0.0)
    try:
        recorder.gate.clear()
        first = asyncio.create_task(batcher.submit(rows([100])))
        await wait_until(lambda: recorder.calls == [[100]], "the first call")
        rest = [asyncio.create_task(batcher.submit(rows([i]))) for i in range(20)]
        await settle()
        recorder.gate.set()
        assert_own(await asyncio.wait_for(first, SAFETY), [100])
        for i, task in enumerate(rest):
            assert_own(await asyncio.wait_for(task, SAFETY), [i])
    finally:
        recorder.gate.set()
        await batcher.aclose()
    # While the first call ran, the others queued and went in full batches, in order.
    assert recorder.calls[1:] == [list(range(0, 8)), list(range(8, 16)), list(range(16, 20))]


@pytest.mark.parametrize("max_delay", [0.0, 0.001, 0.02])
async def test_a_lone_request_completes(max_delay: float) -> None:
    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=32, max_delay=max_delay)
    try:
        out = await asyncio.wait_for(batcher.submit(rows([7, 8])), SAFETY)
        assert_own(out, [7, 8])
        out = await asyncio.wait_for(batcher.submit(rows([9])), SAFETY)  # the timer re-arms
        assert_own(out, [9])
    finally:
        await batcher.aclose()
    assert recorder.calls == [[7, 8], [9]]


async def test_a_large_request_is_split_and_reassembled() -> None:
    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=4, max_delay=0.0)
    try:
        out = await asyncio.wait_for(batcher.submit(rows(range(10))), SAFETY)
    finally:
        await batcher.aclose()
    assert_own(out, range(10))
    assert max(recorder.sizes) <= 4
    assert sorted(recorder.seen) == list(range(10))


async def test_a_split_request_failing_in_one_part_withdraws_the_others() -> None:
    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=2, max_delay=0.0, max_queue_rows=2)
    try:
        recorder.gate.clear()
        first = asyncio.create_task(batcher.submit(rows([100, 101])))
        await wait_until(lambda: len(recorder.calls) == 1, "the first call")
        # Its first part fits in the queue, the next ones do not.
        with pytest.raises(Overloaded):
            await batcher.submit(rows(range(6)))
        recorder.gate.set()
        assert_own(await asyncio.wait_for(first, SAFETY), [100, 101])
        assert_own(await asyncio.wait_for(batcher.submit(rows([7])), SAFETY), [7])
    finally:
        recorder.gate.set()
        await batcher.aclose()
    # The caller was told no: none of its rows took the model's time.
    assert recorder.calls == [[100, 101], [7]]


async def test_several_batches_run_at_once_up_to_max_in_flight() -> None:
    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=2, max_delay=0.0, max_in_flight=3)
    try:
        recorder.gate.clear()
        tasks = [asyncio.create_task(batcher.submit(rows([2 * i, 2 * i + 1]))) for i in range(5)]
        await wait_until(lambda: len(recorder.calls) == 3, "three calls at once")
        await settle()
        assert len(recorder.calls) == 3  # the fourth waits for a free slot
        assert len({t.ident for t in recorder.threads}) == 3
        recorder.gate.set()
        for i, task in enumerate(tasks):
            assert_own(await asyncio.wait_for(task, SAFETY), [2 * i, 2 * i + 1])
    finally:
        recorder.gate.set()
        await batcher.aclose()


# -- failures stay with their caller ---------------------------------------------------


async def test_a_poisonous_request_fails_alone() -> None:
    recorder = IdModel()
    # Three one-row requests fill a batch of three at once: no timer involved.
    batcher = await started(recorder, max_batch_size=3, max_delay=10.0)
    try:
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                batcher.submit(rows([1])),
                batcher.submit(rows([-1])),
                batcher.submit(rows([2])),
                return_exceptions=True,
            ),
            SAFETY,
        )
    finally:
        await batcher.aclose()
    good, bad, other = outcomes
    assert isinstance(good, dict)
    assert_own(good, [1])
    assert isinstance(bad, Poisoned)
    assert isinstance(other, dict)
    assert_own(other, [2])
    # The batch failed as a whole, then each request ran alone.
    assert recorder.calls == [[1, -1, 2], [1], [-1], [2]]


async def test_a_caller_leaving_during_the_retry_does_not_hurt_the_others() -> None:
    recorder = IdModel()
    recorder.hold = {2}  # request 2's call on its own waits for `release`
    batcher = await started(recorder, max_batch_size=3, max_delay=10.0)
    try:
        poison = asyncio.create_task(batcher.submit(rows([-1])))
        leaving = asyncio.create_task(batcher.submit(rows([2])))
        staying = asyncio.create_task(batcher.submit(rows([3])))
        await wait_until(lambda: recorder.calls[-1:] == [[2]], "request 2 to run alone")
        leaving.cancel()
        await settle()
        recorder.release.set()
        assert_own(await asyncio.wait_for(staying, SAFETY), [3])
        with pytest.raises(Poisoned):
            await poison
        assert leaving.cancelled()
        # The batcher still serves (a full batch: no waiting for the timer).
        assert_own(await asyncio.wait_for(batcher.submit(rows([4, 5, 6])), SAFETY), [4, 5, 6])
    finally:
        recorder.release.set()
        await batcher.aclose()


async def test_a_cancelled_caller_is_skipped_and_the_rest_served() -> None:
    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=4, max_delay=0.0)
    try:
        recorder.gate.clear()
        first = asyncio.create_task(batcher.submit(rows([0])))
        await wait_until(lambda: len(recorder.calls) == 1, "the first call")
        gone = asyncio.create_task(batcher.submit(rows([1])))
        kept = asyncio.create_task(batcher.submit(rows([2])))
        await settle()
        gone.cancel()
        await settle()
        recorder.gate.set()
        assert_own(await asyncio.wait_for(first, SAFETY), [0])
        assert_own(await asyncio.wait_for(kept, SAFETY), [2])
    finally:
        recorder.gate.set()
        await batcher.aclose()
    assert recorder.calls == [[0], [2]]


async def test_wrong_number_of_output_rows_is_a_model_error() -> None:
    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=4, max_delay=10.0)
    try:
        recorder.drop_rows = 1
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                *(batcher.submit(rows([i, 10 + i])) for i in range(2)), return_exceptions=True
            ),
            SAFETY,
        )
        for error in outcomes:
            assert isinstance(error, ModelError), error
            assert "for a batch of 2 rows" in str(error)
            assert "one row per input row" in str(error)
        recorder.drop_rows = 0  # the model mends; the batcher still serves
        assert_own(await asyncio.wait_for(batcher.submit(rows(range(4))), SAFETY), range(4))
    finally:
        await batcher.aclose()


class ScalarModel:
    """A model (not a PythonModel, which checks its own outputs) answering one number."""

    name = "odd"
    version = "1"

    def __init__(self) -> None:
        self.inputs = [tensor("x", "float32", [None])]
        self.outputs = [tensor("y", "float32", [])]

    def load(self) -> None:
        pass

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        pass

    def predict(self, inputs: Arrays) -> Arrays:
        return {"y": np.float32(1.0)}  # type: ignore[dict-item]  # the bug under test


async def test_output_that_is_not_rows_is_a_model_error() -> None:
    assert isinstance(ScalarModel(), Model)
    async with running(ScalarModel(), max_delay=0.0) as batcher:
        with pytest.raises(ModelError, match=r"output 'y' has shape \(\) for a batch of 2 rows"):
            await asyncio.wait_for(batcher.submit({"x": np.zeros(2, np.float32)}), SAFETY)


# -- input checks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"idz": np.zeros((1, 1), np.int64)}, r"has no input 'idz'; its inputs are \['ids'\]"),
        ({}, r"input 'ids' is missing; it expects int64 \[-1, 1\]"),
        ({"ids": np.zeros((1, 1), np.int32)}, r"input 'ids' expects dtype int64, got int32"),
        ({"ids": np.zeros((1, 2), np.int64)}, r"input 'ids' expects shape \[-1, 1\], got \[1, 2\]"),
        ({"ids": np.zeros(3, np.int64)}, r"input 'ids' expects shape \[-1, 1\], got \[3\]"),
    ],
    ids=["name", "missing", "dtype", "trailing-shape", "rank"],
)
async def test_bad_inputs_fail_only_their_caller(inputs: Arrays, message: str) -> None:
    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=4, max_delay=0.005)
    try:
        bad, good = await asyncio.wait_for(
            asyncio.gather(
                batcher.submit(inputs), batcher.submit(rows([1, 2])), return_exceptions=True
            ),
            SAFETY,
        )
    finally:
        await batcher.aclose()
    assert isinstance(bad, ModelInputError)
    assert re.search(message, str(bad)), str(bad)
    assert isinstance(good, dict)
    assert_own(good, [1, 2])
    assert recorder.calls == [[1, 2]]  # the bad one never reached the model


# -- backpressure and deadlines --------------------------------------------------------


async def test_a_full_queue_rejects_or_waits() -> None:
    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=2, max_delay=0.0, max_queue_rows=2)
    try:
        recorder.gate.clear()
        running_ = asyncio.create_task(batcher.submit(rows([0, 1])))
        await wait_until(lambda: len(recorder.calls) == 1, "the first call")
        queued = asyncio.create_task(batcher.submit(rows([2, 3])))  # fills the queue
        await settle()
        with pytest.raises(Overloaded, match=r"2 rows queued \(limit 2\)") as info:
            await batcher.submit(rows([4]))
        assert info.value.retry_after > 0
        waiting = asyncio.create_task(batcher.submit(rows([5]), wait=True))
        await settle()
        assert not waiting.done()  # it waits for room instead of failing
        assert sample(batcher, "rtinfer_batcher_queued_rows") == 2
        recorder.gate.set()
        assert_own(await asyncio.wait_for(running_, SAFETY), [0, 1])
        assert_own(await asyncio.wait_for(queued, SAFETY), [2, 3])
        assert_own(await asyncio.wait_for(waiting, SAFETY), [5])
    finally:
        recorder.gate.set()
        await batcher.aclose()
    assert 4 not in recorder.seen
    assert sample(batcher, "rtinfer_batcher_rejected_total", reason="overloaded") == 1


async def test_a_past_deadline_is_refused_before_queueing() -> None:
    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=4, max_delay=0.0)
    try:
        with pytest.raises(DeadlineExceeded, match="before the request reached model 'ids'"):
            await batcher.submit(rows([1]), deadline=time.time() - 0.5)
        with pytest.raises(DeadlineExceeded):  # a large request too, every part of it
            await batcher.submit(rows(range(10, 20)), deadline=time.time() - 0.5)
        assert_own(await batcher.submit(rows([2]), deadline=time.time() + 3600), [2])
    finally:
        await batcher.aclose()
    assert recorder.calls == [[2]]
    assert sample(batcher, "rtinfer_batcher_rejected_total", reason="deadline") >= 2


async def test_a_deadline_passing_in_the_queue_is_never_batched() -> None:
    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=4, max_delay=0.0)
    try:
        recorder.gate.clear()
        first = asyncio.create_task(batcher.submit(rows([0])))
        await wait_until(lambda: len(recorder.calls) == 1, "the first call")
        deadline = time.time() + SHORT
        late = asyncio.create_task(batcher.submit(rows([1, 2]), deadline=deadline))
        fine = asyncio.create_task(batcher.submit(rows([3]), deadline=deadline + 3600))
        await settle()
        await until_past(deadline)
        recorder.gate.set()
        with pytest.raises(
            DeadlineExceeded, match="in the queue of model 'ids'; the request was not run"
        ):
            await asyncio.wait_for(late, SAFETY)
        assert_own(await asyncio.wait_for(fine, SAFETY), [3])
        assert_own(await asyncio.wait_for(first, SAFETY), [0])
    finally:
        recorder.gate.set()
        await batcher.aclose()
    assert recorder.calls == [[0], [3]]
    assert sample(batcher, "rtinfer_batcher_rejected_total", reason="deadline") == 1


# -- threads and context ---------------------------------------------------------------


async def test_predict_runs_off_the_loop_with_the_callers_context() -> None:
    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=4, max_delay=0.0, max_in_flight=1)

    async def call(name: str, ids: list[int]) -> Arrays:
        caller.set(name)
        return await batcher.submit(rows(ids))

    try:
        recorder.gate.clear()
        first = asyncio.create_task(call("alice", [1]))
        await wait_until(lambda: len(recorder.calls) == 1, "alice's call")
        # Bob's request queues behind Alice's; its batch starts when hers ends.
        second = asyncio.create_task(call("bob", [2]))
        await settle()
        recorder.gate.set()
        assert_own(await asyncio.wait_for(first, SAFETY), [1])
        assert_own(await asyncio.wait_for(second, SAFETY), [2])
    finally:
        recorder.gate.set()
        await batcher.aclose()
    assert recorder.callers == ["alice", "bob"]
    assert caller.get() == "nobody"  # nothing leaked into the test's own context
    loop_thread = threading.current_thread()
    for thread in recorder.threads:
        assert thread is not loop_thread
        assert thread.name.startswith("rtinfer-model-ids")


async def test_each_retried_request_runs_in_its_own_context() -> None:
    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=2, max_delay=10.0)

    async def call(name: str, ids: list[int]) -> Arrays:
        caller.set(name)
        return await batcher.submit(rows(ids))

    try:
        outcomes = await asyncio.wait_for(
            asyncio.gather(call("carol", [-1]), call("dave", [4]), return_exceptions=True), SAFETY
        )
    finally:
        await batcher.aclose()
    poisoned, served = outcomes
    assert isinstance(poisoned, Poisoned)
    assert isinstance(served, dict)
    assert_own(served, [4])
    assert recorder.calls == [[-1, 4], [-1], [4]]
    # The batch runs with its oldest request's context; each retry with its own.
    assert recorder.callers == ["carol", "carol", "dave"]


# -- lifecycle -----------------------------------------------------------------------


def test_warmup_sizes() -> None:
    assert warmup_sizes(1) == [1]
    assert warmup_sizes(2) == [1, 2]
    assert warmup_sizes(8) == [1, 2, 4, 8]
    assert warmup_sizes(10) == [1, 2, 4, 8, 10]


async def test_start_loads_and_warms_every_batch_size_off_the_loop() -> None:
    recorder = IdModel()
    batcher = MicroBatcher(recorder.model(), max_batch_size=10)
    was_ready = batcher.ready
    await asyncio.wait_for(batcher.start(), SAFETY)
    assert not was_ready
    try:
        assert batcher.ready
        # The probe that learns the outputs (1 row), then each warm-up size.
        assert recorder.sizes == [1, 1, 2, 4, 8, 10]
        assert all(t is not threading.current_thread() for t in recorder.threads)
        assert batcher.model.outputs[0].name == "ids"
        await batcher.start()  # a second start does nothing
        assert len(recorder.calls) == 6
        assert batcher.batches == 0  # warm-up calls are not counted as batches
    finally:
        await batcher.aclose()
    assert not batcher.ready


async def test_submit_before_start_or_after_close_is_closed() -> None:
    recorder = IdModel()
    batcher = MicroBatcher(recorder.model(), max_delay=0.0)
    with pytest.raises(Closed, match="not started; call start"):
        await batcher.submit(rows([1]))
    await batcher.start()
    assert_own(await batcher.submit(rows([1])), [1])
    await batcher.aclose()
    with pytest.raises(Closed, match="is closed"):
        await batcher.submit(rows([2]))
    await batcher.aclose()  # closing twice is fine
    assert 2 not in recorder.seen


async def test_close_drains_queued_work_first() -> None:
    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=2, max_delay=0.0)
    recorder.gate.clear()
    tasks = [asyncio.create_task(batcher.submit(rows([i]))) for i in range(5)]
    await wait_until(lambda: len(recorder.calls) == 1, "the first call")
    closing = asyncio.create_task(batcher.aclose())
    await settle()
    assert not closing.done()  # queued work is still there
    recorder.gate.set()
    await asyncio.wait_for(closing, SAFETY)
    for i, task in enumerate(tasks):
        assert task.done()
        assert_own(task.result(), [i])
    assert sorted(recorder.seen) == list(range(5))


def test_settings_are_checked() -> None:
    model = IdModel().model()
    with pytest.raises(ValueError, match="max_batch_size must be at least 1, got 0"):
        MicroBatcher(model, max_batch_size=0)
    with pytest.raises(ValueError, match="max_in_flight must be at least 1, got 0"):
        MicroBatcher(model, max_in_flight=0)
    with pytest.raises(ValueError, match="max_delay must be 0 or more seconds"):
        MicroBatcher(model, max_delay=-0.001)
    with pytest.raises(ValueError, match=r"max_queue_rows \(4\) must hold at least one full batch"):
        MicroBatcher(model, max_batch_size=8, max_queue_rows=4)
    assert MicroBatcher(model, max_batch_size=8).max_queue_rows == 4096
    assert "max_batch_size=8" in repr(MicroBatcher(model, max_batch_size=8))


# -- metrics -------------------------------------------------------------------------


async def test_metrics_follow_the_batches() -> None:
    recorder = IdModel()
    metrics = Metrics()
    batcher = await started(recorder, max_batch_size=4, max_delay=10.0, metrics=metrics)
    assert batcher.metrics is metrics
    try:
        # Eight one-row requests: two full batches of four.
        await asyncio.wait_for(
            asyncio.gather(*(batcher.submit(rows([i])) for i in range(8))), SAFETY
        )
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(rows([99]), deadline=time.time() - 1)
    finally:
        await batcher.aclose()
    assert recorder.sizes == [4, 4]
    assert sample(batcher, "rtinfer_batch_size_count") == 2
    assert sample(batcher, "rtinfer_batch_size_sum") == 8
    assert sample(batcher, "rtinfer_batch_size_bucket", le="4.0") == 2
    assert sample(batcher, "rtinfer_model_seconds_count") == 2
    assert sample(batcher, "rtinfer_model_seconds_sum") > 0
    assert sample(batcher, "rtinfer_batcher_queue_wait_seconds_count") == 8
    assert sample(batcher, "rtinfer_batcher_rejected_total", reason="deadline") == 1
    assert sample(batcher, "rtinfer_batcher_rejected_total", reason="overloaded") == 0
    assert sample(batcher, "rtinfer_batcher_queued_rows") == 0
    assert b"rtinfer_batch_size_bucket" in metrics.exposition()


# -- with a real ONNX model -----------------------------------------------------------

WEIGHTS = np.array([[0.5], [-1.0], [2.0]], dtype=np.float32)


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    """score = sigmoid(x @ WEIGHTS) as a real ONNX graph, x of shape [N, 3]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], ["score"]),
        ],
        "scorer",
        [x],
        [score],
        [numpy_helper.from_array(WEIGHTS, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    path = tmp_path / "scorer.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def sigmoid_score(x: npt.NDArray[np.float32]) -> Any:
    return 1.0 / (1.0 + np.exp(-(x.astype(np.float64) @ WEIGHTS.astype(np.float64))))


async def test_onnx_model_behind_the_batcher(onnx_file: Path) -> None:
    model = OnnxModel(onnx_file)
    rng = np.random.default_rng(3)
    requests = [rng.normal(size=(int(n), 3)).astype(np.float32) for n in rng.integers(1, 12, 30)]
    async with running(model, max_batch_size=16, max_delay=0.002, max_in_flight=2) as batcher:
        assert model.inputs[0].name == "x"  # loaded by start()
        outs = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit({"x": x}) for x in requests)), SAFETY
        )
        with pytest.raises(ModelInputError, match=r"expects shape \[-1, 3\], got \[2, 4\]"):
            await batcher.submit({"x": np.zeros((2, 4), np.float32)})
    for x, out in zip(requests, outs, strict=True):
        assert list(out) == ["score"]
        np.testing.assert_allclose(out["score"], sigmoid_score(x), atol=1e-6)
    assert batcher.rows == sum(len(x) for x in requests)
    assert batcher.batches < len(requests)  # some requests shared a call
    assert sample(batcher, "rtinfer_batch_size_count") == batcher.batches


async def test_start_lowers_the_gil_switch_interval_unless_told_not_to() -> None:
    """The model thread must get the GIL back quickly from a busy loop (see SWITCH_INTERVAL)."""
    import sys

    from rtinfer.batching import SWITCH_INTERVAL

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        untouched = MicroBatcher(
            PythonModel(lambda x: x["x"], inputs={"x": ("float32", [None, 1])}),
            switch_interval=None,
        )
        await untouched.start()
        assert sys.getswitchinterval() == pytest.approx(0.005)
        await untouched.aclose()
        lowered = MicroBatcher(PythonModel(lambda x: x["x"], inputs={"x": ("float32", [None, 1])}))
        await lowered.start()
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL)
        await lowered.aclose()
    finally:
        sys.setswitchinterval(before)


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
async def test_a_model_thread_started_from_a_batch_loop_keeps_the_normal_policy() -> None:
    """rtinfer serve's loop is a batch thread once its first models are loaded; a
    version loaded later starts its model thread from there, and must not inherit it."""
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    try:
        batcher = MicroBatcher(
            PythonModel(
                lambda x: {"policy": np.full(len(x["x"]), os.sched_getscheduler(0))},
                inputs={"x": ("float32", [None, 1])},
            )
        )
        await batcher.start()
        got = await batcher.submit({"x": np.zeros((1, 1), np.float32)})
        await batcher.aclose()
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    assert got["policy"].tolist() == [os.SCHED_OTHER]


async def test_a_busy_loop_costs_one_turn_between_batches() -> None:
    """Under overload the loop is never idle and its turns are long. A finished batch is
    answered, and the next handed to the model's thread, in the loop's next turn (an
    awaited future took three: its callback, the batch task's step, the next task's)."""
    loop = asyncio.get_running_loop()
    turns = 0
    stop = False

    def busy() -> None:  # one turn's other work: a millisecond of sockets, say
        nonlocal turns
        if stop:
            return
        turns += 1
        end = time.perf_counter() + 0.001
        while time.perf_counter() < end:
            pass
        loop.call_soon(busy)

    calls: list[tuple[int, int]] = []  # the turn each call started and ended in

    def model(inputs: Arrays) -> npt.NDArray[np.float32]:
        began = turns
        time.sleep(0.0005)  # off the GIL, as a runtime computes
        calls.append((began, turns))
        return inputs["x"]

    batcher = MicroBatcher(
        PythonModel(model, inputs={"x": ("float32", [None, 1])}), max_batch_size=1, max_delay=0
    )
    await batcher.start()
    calls.clear()
    try:
        loop.call_soon(busy)
        one = {"x": np.ones((1, 1), np.float32)}
        await asyncio.wait_for(asyncio.gather(*(batcher.submit(one) for _ in range(40))), SAFETY)
    finally:
        stop = True
        await batcher.aclose()
    gaps = sorted(calls[i + 1][0] - calls[i][1] for i in range(len(calls) - 1))
    # The turn the answer is taken in, and at most one more while the thread wakes.
    assert gaps[len(gaps) // 2] <= 2, gaps


async def test_a_caller_can_learn_its_time_in_front_of_and_in_the_model() -> None:
    from rtinfer.batching import SERVICE_TIME, ServiceTime

    def slow(inputs: Arrays) -> npt.NDArray[np.float32]:
        time.sleep(0.005)
        return inputs["x"]

    batcher = MicroBatcher(PythonModel(slow, inputs={"x": ("float32", [None, 1])}), max_delay=0)
    await batcher.start()
    try:
        one = {"x": np.ones((1, 1), np.float32)}
        service = ServiceTime()
        token = SERVICE_TIME.set(service)
        try:
            await asyncio.wait_for(batcher.submit(one), SAFETY)
        finally:
            SERVICE_TIME.reset(token)
        assert service.seconds is not None
        assert service.seconds >= 0.005  # the call itself, at least
        await asyncio.wait_for(batcher.submit(one), SAFETY)  # none set: nothing written
    finally:
        await batcher.aclose()
