"""The micro-batcher orders queued work by deadline and never runs an expired request.

Earliest deadline first; requests without a deadline after every request with one, in
arrival order; arrival order among equal deadlines. A model held at a gate (the
:class:`IdModel` of ``test_batching``) lets the queue fill, so the order of the model's
calls shows the order the batcher chose. Deadlines here are either far away (an hour) or
already past, or pass while the model is held: nothing depends on how fast anything runs.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtinfer.batching import CallCost, MicroBatcher
from rtinfer.exceptions import DeadlineExceeded
from rtinfer.models import PythonModel, call_deadline
from rtinfer.types import Arrays
from test_batching import (
    SAFETY,
    IdModel,
    assert_own,
    rows,
    sample,
    settle,
    started,
    until_past,
    wait_until,
)

HOUR = 3600.0
BLOCKER = 10**6  # the id of the request that holds the model while the queue fills
#: A deadline that passes while its request waits behind the held model (long enough for
#: the test to queue it first on a loaded machine; nothing measures it).
SHORT = 0.25


async def hold(recorder: IdModel, batcher: MicroBatcher) -> asyncio.Task[Arrays]:
    """Occupy the batcher's only slot with a call held at the gate."""
    recorder.gate.clear()
    blocker = asyncio.create_task(batcher.submit(rows([BLOCKER])))
    await wait_until(lambda: recorder.calls == [[BLOCKER]], "the blocking call")
    return blocker


def submit(batcher: MicroBatcher, ids: list[int], deadline: float | None) -> asyncio.Task[Arrays]:
    return asyncio.create_task(batcher.submit(rows(ids), deadline=deadline, wait=True))


async def test_earliest_deadline_runs_first_and_no_deadline_last() -> None:
    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=1, max_delay=0.0)
    try:
        blocker = await hold(recorder, batcher)
        now = time.time()
        # (id, deadline): submitted in this order, while the model is held.
        plan = [(1, None), (2, now + 3 * HOUR), (3, now + HOUR), (4, None), (5, now + 2 * HOUR)]
        tasks = {i: submit(batcher, [i], d) for i, d in plan}
        await settle()
        recorder.gate.set()
        for i, task in tasks.items():
            assert_own(await asyncio.wait_for(task, SAFETY), [i])
        assert_own(await blocker, [BLOCKER])
    finally:
        recorder.gate.set()
        await asyncio.wait_for(batcher.aclose(), SAFETY)
    assert recorder.calls[1:] == [[3], [5], [2], [1], [4]]


async def test_equal_deadlines_keep_arrival_order_and_batches_fill_by_deadline() -> None:
    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=4, max_delay=0.0)
    try:
        blocker = await hold(recorder, batcher)
        soon, later = time.time() + HOUR, time.time() + 2 * HOUR
        tasks = [
            submit(batcher, [10], None),
            submit(batcher, [20, 21], later),
            submit(batcher, [30], soon),
            submit(batcher, [40], later),
            submit(batcher, [50], soon),
            submit(batcher, [60, 61], soon),
        ]
        await settle()
        recorder.gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), SAFETY)
        assert_own(await blocker, [BLOCKER])
    finally:
        recorder.gate.set()
        await asyncio.wait_for(batcher.aclose(), SAFETY)
    # The "soon" requests (4 rows, in arrival order) fill the first batch; the "later"
    # ones, in arrival order, and then the one without a deadline, the second.
    assert recorder.calls[1:] == [[30, 50, 60, 61], [20, 21, 40, 10]]


async def test_a_request_split_in_parts_keeps_its_order() -> None:
    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=2, max_delay=0.0)
    try:
        blocker = await hold(recorder, batcher)
        deadline = time.time() + HOUR
        big = submit(batcher, list(range(100, 107)), deadline)
        small = submit(batcher, [7], deadline - 1)
        await settle()
        recorder.gate.set()
        assert_own(await asyncio.wait_for(big, SAFETY), list(range(100, 107)))
        assert_own(await asyncio.wait_for(small, SAFETY), [7])
        assert_own(await blocker, [BLOCKER])
    finally:
        recorder.gate.set()
        await asyncio.wait_for(batcher.aclose(), SAFETY)
    # [7] is due first; the parts of the big request follow in order (a part never
    # overtakes the one before it, so [7] runs alone rather than with a part of two rows).
    assert recorder.calls[1:] == [[7], [100, 101], [102, 103], [104, 105], [106]]


async def test_a_request_expiring_in_the_queue_fails_at_its_deadline_without_running() -> None:
    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=4, max_delay=0.0)
    try:
        blocker = await hold(recorder, batcher)
        short = time.time() + SHORT
        expiring = submit(batcher, [1, 2], short)
        live = submit(batcher, [3], time.time() + HOUR)
        await settle()
        assert sample(batcher, "rtinfer_batcher_queued_rows") == 3
        await until_past(short)
        # The model is still held, yet the caller already has its answer.
        with pytest.raises(DeadlineExceeded, match="model 'ids'"):
            await asyncio.wait_for(expiring, SAFETY)
        assert sample(batcher, "rtinfer_batcher_rejected_total", reason="deadline") == 1
        assert sample(batcher, "rtinfer_batcher_queued_rows") == 1
        recorder.gate.set()
        assert_own(await asyncio.wait_for(live, SAFETY), [3])
        assert_own(await blocker, [BLOCKER])
    finally:
        recorder.gate.set()
        await asyncio.wait_for(batcher.aclose(), SAFETY)
    assert recorder.calls[1:] == [[3]]


async def test_an_abandoned_request_fails_at_its_deadline_while_its_batch_runs() -> None:
    recorder = IdModel()
    recorder.hold = {1, 2, 3}  # the batch of the three waits for `release` in the model
    batcher = await started(recorder, max_batch_size=4, max_delay=0.0)
    try:
        blocker = await hold(recorder, batcher)
        short = time.time() + SHORT
        abandoned = asyncio.create_task(
            batcher.submit(rows([1]), deadline=short, wait=True, abandon=True)
        )
        kept = submit(batcher, [2], short)  # no abandon: a stream's batch keeps waiting
        patient = asyncio.create_task(
            batcher.submit(rows([3]), deadline=time.time() + HOUR, wait=True, abandon=True)
        )
        await settle()
        recorder.gate.set()
        assert_own(await asyncio.wait_for(blocker, SAFETY), [BLOCKER])
        await wait_until(lambda: recorder.calls[-1:] == [[1, 2, 3]], "the batch of three")
        await until_past(short)
        # The model still holds the batch, yet the caller that asked to be let go has its answer.
        with pytest.raises(DeadlineExceeded, match="while model 'ids' ran"):
            await asyncio.wait_for(abandoned, SAFETY)
        assert not kept.done()
        assert not patient.done()
        assert sample(batcher, "rtinfer_batcher_rejected_total", reason="overrun") == 1
        assert sample(batcher, "rtinfer_batcher_rejected_total", reason="deadline") == 0
        recorder.release.set()
        assert_own(await asyncio.wait_for(kept, SAFETY), [2])  # late, and still answered
        assert_own(await asyncio.wait_for(patient, SAFETY), [3])
    finally:
        recorder.gate.set()
        recorder.release.set()
        await asyncio.wait_for(batcher.aclose(), SAFETY)
    assert recorder.calls[1:] == [[1, 2, 3]]


def test_the_call_cost_fit_recovers_fixed_and_per_row_time() -> None:
    cost = CallCost()
    assert cost.rows_within(1.0) is None  # nothing seen yet
    for n in (1, 8, 64, 2, 32, 16):
        cost.add(n, 0.002 + 0.0005 * n)
    fit = cost.estimate()
    assert fit is not None
    assert fit[0] == pytest.approx(0.002)
    assert fit[1] == pytest.approx(0.0005)
    assert cost.rows_within(0.012) == 20
    assert cost.rows_within(0.001) == 0
    one_size = CallCost()
    for _ in range(5):
        one_size.add(10, 0.010)
    assert one_size.estimate() == pytest.approx((0.0, 0.001))  # all of it counted per row


class SlowModelCost(CallCost):
    """As if the model took 100 s a row (nothing here waits for it): the real calls'
    times are not learnt."""

    def add(self, rows: int, seconds: float) -> None:
        pass

    def estimate(self) -> tuple[float, float]:
        return 0.0, 100.0


@pytest.mark.parametrize("abandon", [True, False])
async def test_a_batch_abandoned_at_its_deadline_takes_only_rows_that_can_meet_it(
    abandon: bool,
) -> None:
    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=64, max_delay=0.0)
    batcher.cost = SlowModelCost()
    try:
        blocker = await hold(recorder, batcher)
        deadline = time.time() + 550.0  # room for five rows
        waiting = [
            asyncio.create_task(
                batcher.submit(rows([i]), deadline=deadline, wait=True, abandon=abandon)
            )
            for i in range(1, 11)
        ]
        await settle()
        recorder.gate.set()
        assert_own(await asyncio.wait_for(blocker, SAFETY), [BLOCKER])
        for i, task in enumerate(waiting, 1):
            assert_own(await asyncio.wait_for(task, SAFETY), [i])
    finally:
        recorder.gate.set()
        await asyncio.wait_for(batcher.aclose(), SAFETY)
    # Abandoned at the deadline: batches it can meet. Otherwise (a stream's): one batch.
    assert recorder.sizes[1:] == ([5, 5] if abandon else [10])


async def test_an_expired_request_frees_its_room_in_the_queue() -> None:
    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=2, max_delay=0.0, max_queue_rows=2)
    try:
        blocker = await hold(recorder, batcher)
        short = time.time() + SHORT
        expiring = submit(batcher, [1, 2], short)
        waiting = submit(batcher, [3, 4], None)  # the queue is full: this one waits for room
        await settle()
        assert not waiting.done()
        await until_past(short)
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(expiring, SAFETY)
        await wait_until(
            lambda: sample(batcher, "rtinfer_batcher_queued_rows") == 2, "the waiter to queue"
        )
        recorder.gate.set()
        assert_own(await asyncio.wait_for(waiting, SAFETY), [3, 4])
        assert_own(await blocker, [BLOCKER])
    finally:
        recorder.gate.set()
        await asyncio.wait_for(batcher.aclose(), SAFETY)
    assert 1 not in recorder.seen


async def test_a_request_never_waits_for_more_rows_past_its_deadline() -> None:
    recorder = IdModel()
    # A delay far longer than any test: only the deadline rule can start these batches.
    batcher = await started(recorder, max_batch_size=8, max_delay=HOUR)
    patient = submit(batcher, [1], time.time() + 3 * HOUR)
    try:
        await settle()
        assert recorder.calls == []  # a deadline beyond max_delay: it waits for more rows
        urgent = submit(batcher, [2], time.time() + HOUR / 2)
        assert_own(await asyncio.wait_for(urgent, SAFETY), [2])
        assert_own(await asyncio.wait_for(patient, SAFETY), [1])
    finally:
        patient.cancel()
        await asyncio.wait_for(batcher.aclose(), SAFETY)
    assert recorder.calls == [[2, 1]]


async def test_a_cancelled_caller_with_a_deadline_is_withdrawn() -> None:
    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=4, max_delay=0.0)
    try:
        blocker = await hold(recorder, batcher)
        gone = submit(batcher, [1], time.time() + HOUR)
        kept = submit(batcher, [2], time.time() + 2 * HOUR)
        await settle()
        gone.cancel()
        await settle()
        recorder.gate.set()
        assert_own(await asyncio.wait_for(kept, SAFETY), [2])
        assert_own(await blocker, [BLOCKER])
    finally:
        recorder.gate.set()
        await asyncio.wait_for(batcher.aclose(), SAFETY)
    assert recorder.calls[1:] == [[2]]


# -- property: the order is earliest deadline first, whatever the mix -------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(1, 5),
    kinds=st.lists(st.sampled_from(["none", "a", "b", "c", "past"]), min_size=1, max_size=16),
    seed=st.integers(0, 2**16),
)
def test_calls_follow_deadline_order(size: int, kinds: list[str], seed: int) -> None:
    async def play() -> tuple[list[list[int]], list[object]]:
        recorder = IdModel()
        batcher = await started(recorder, max_batch_size=size, max_delay=0.0)
        now = time.time()
        deadlines = {"none": None, "a": now + HOUR, "b": now + 2 * HOUR, "c": now + 3 * HOUR}
        rng = random.Random(seed)
        try:
            blocker = await hold(recorder, batcher)
            tasks = []
            for i, kind in enumerate(kinds):
                deadline = now - 1 if kind == "past" else deadlines[kind]
                n = rng.randint(1, size)
                tasks.append(submit(batcher, [100 * i + j for j in range(n)], deadline))
            await settle()
            recorder.gate.set()
            outcomes = await asyncio.wait_for(
                asyncio.gather(*tasks, return_exceptions=True), SAFETY
            )
            assert_own(await blocker, [BLOCKER])
        finally:
            recorder.gate.set()
            await asyncio.wait_for(batcher.aclose(), SAFETY)
        return recorder.calls[1:], list(outcomes)

    calls, outcomes = asyncio.run(play())
    rank = {"a": 0, "b": 1, "c": 2, "none": 3}
    expected = [i for _, i in sorted((rank[k], i) for i, k in enumerate(kinds) if k != "past")]
    # Every call is a run of whole requests, in (deadline, arrival) order, none skipped.
    ran = [row // 100 for call in calls for row in call]
    assert [i for n, i in enumerate(ran) if n == 0 or ran[n - 1] != i] == expected
    assert all(len(call) <= size for call in calls)
    for i, (kind, outcome) in enumerate(zip(kinds, outcomes, strict=True)):
        if kind == "past":
            assert isinstance(outcome, DeadlineExceeded)
            assert i not in ran
        else:
            assert isinstance(outcome, dict)


async def test_answered_requests_with_deadlines_are_not_kept() -> None:
    # Every served request has a deadline; without max_delay nothing may hold on to them
    # once answered (they carry their inputs and outputs: a leak grows without bound).
    import gc

    from rtinfer.batching import _Request

    recorder = IdModel()
    batcher = await started(recorder, max_batch_size=4, max_delay=0.0)
    try:
        deadline = time.time() + HOUR
        await asyncio.gather(*(batcher.submit(rows([i]), deadline=deadline) for i in range(200)))
        gc.collect()
        alive = [o for o in gc.get_objects() if isinstance(o, _Request)]
        assert alive == [], f"{len(alive)} answered requests are still referenced"
    finally:
        await batcher.aclose()


class DeadlineRecorder(IdModel):
    """An :class:`IdModel` that also records, by each call's first id, the deadline the
    call's own code reads (:func:`rtinfer.models.call_deadline`) on the model's thread."""

    def __init__(self) -> None:
        super().__init__()
        self.deadlines: dict[int, float | None] = {}

    def __call__(self, inputs: Arrays) -> Arrays:
        self.deadlines[int(inputs["ids"][0, 0])] = call_deadline()
        return super().__call__(inputs)


async def test_a_models_code_reads_the_latest_deadline_of_the_batch_it_runs() -> None:
    recorder = DeadlineRecorder()
    batcher = await started(recorder, max_batch_size=4, max_delay=0.0)
    try:
        soon, later = time.time() + HOUR, time.time() + 2 * HOUR
        for first, second in ((soon, later), (soon, None)):
            recorder.calls.clear()
            blocker = await hold(recorder, batcher)
            queued = [submit(batcher, [1], first), submit(batcher, [2], second)]
            await settle()
            recorder.gate.set()
            for task in queued:
                await asyncio.wait_for(task, SAFETY)
            await blocker
            assert recorder.calls[-1] == [1, 2]  # one batch of both
            assert recorder.deadlines[1] == second  # the latest; None when one has none
        await batcher.submit(rows([3]), deadline=soon)
        assert recorder.deadlines[3] == soon
        assert recorder.deadlines[BLOCKER] is None
        assert call_deadline() is None  # set for the model's call only, on its thread
    finally:
        recorder.gate.set()
        await asyncio.wait_for(batcher.aclose(), SAFETY)


async def test_a_batch_the_model_refuses_for_its_deadline_is_not_retried_request_by_request() -> (
    None
):
    """A model that says the batch is late (a model process's queue held it past its
    latest deadline) fails every request of it at once: none is late-run alone."""
    calls: list[list[int]] = []

    def late(inputs: Arrays) -> Arrays:
        ids = inputs["ids"][:, 0].tolist()
        if any(ids):  # not the warm-up (zeros)
            calls.append(ids)
            raise DeadlineExceeded("waited in the model host past its deadline")
        return {"ids": inputs["ids"], "double": 2 * inputs["ids"]}

    model = PythonModel(late, inputs={"ids": ("int64", [None, 1])}, name="late")
    batcher = MicroBatcher(model, max_batch_size=4, max_delay=0.05)
    await asyncio.wait_for(batcher.start(), SAFETY)
    try:
        soon = time.time() + HOUR
        tasks = [submit(batcher, [i], soon) for i in (1, 2)]
        for task in tasks:
            with pytest.raises(DeadlineExceeded):
                await asyncio.wait_for(task, SAFETY)
    finally:
        await asyncio.wait_for(batcher.aclose(), SAFETY)
    assert calls == [[1, 2]]
