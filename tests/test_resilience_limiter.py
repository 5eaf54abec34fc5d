"""Admission control: the adaptive limit follows latency; best-effort traffic is shed first.

Latencies come from a :class:`FakeClock` the test moves between admitting and releasing
calls; the end-to-end test holds a real Python model at a gate, so "slow" never means
waiting for real time.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from rtinfer.batching import MicroBatcher
from rtinfer.exceptions import DeadlineExceeded, Overloaded, QuotaExceeded
from rtinfer.models import PythonModel
from rtinfer.observability.metrics import Metrics
from rtinfer.resilience import AdaptiveLimiter, ClientQuota, Permit, Priority, parse_priority
from rtinfer.types import Arrays
from test_resilience_breaker import FakeClock

SAFETY = 10.0  # seconds: a safety net against a hang, never a timing assertion
CRITICAL, BEST_EFFORT = Priority.CRITICAL, Priority.BEST_EFFORT


def limiter(clock: FakeClock | None = None, **options: object) -> AdaptiveLimiter:
    return AdaptiveLimiter(
        "scorer",
        clock=clock or FakeClock(),
        metrics=Metrics(),
        **options,  # type: ignore[arg-type]
    )


def rejected(lim: AdaptiveLimiter, priority: str, reason: str = "limit") -> float:
    value = lim.metrics.registry.get_sample_value(
        "rtinfer_limiter_rejected_total",
        {"limiter": lim.name, "priority": priority, "reason": reason},
    )
    return 0.0 if value is None else value


def test_best_effort_is_shed_before_critical() -> None:
    lim = limiter(initial_limit=10, best_effort_share=0.8)
    permits = [lim.try_acquire(BEST_EFFORT) for _ in range(8)]
    with pytest.raises(Overloaded, match=r"limit 10, 8 for best-effort.*best_effort call shed"):
        lim.try_acquire(BEST_EFFORT)
    permits += [lim.try_acquire(CRITICAL) for _ in range(2)]
    with pytest.raises(Overloaded, match="critical call shed") as info:
        lim.try_acquire(CRITICAL)
    assert info.value.retry_after == 1.0
    assert lim.in_flight == 10
    assert rejected(lim, "best_effort") == 1
    assert rejected(lim, "critical") == 1
    for permit in permits:
        permit.release(ok=False)
    assert lim.in_flight == 0
    lim.try_acquire(BEST_EFFORT).release()


def test_refuses_says_what_try_acquire_would_do_and_counts_the_refusal() -> None:
    lim = limiter(initial_limit=5, best_effort_share=0.8)
    permits = [lim.try_acquire(CRITICAL) for _ in range(4)]
    assert lim.refuses(BEST_EFFORT)  # 4 of 5: the best-effort share is full
    assert not lim.refuses(CRITICAL)
    assert lim.in_flight == 4  # asking admits nothing
    permits.append(lim.try_acquire(CRITICAL))
    assert lim.refuses(CRITICAL)
    assert (rejected(lim, "critical"), rejected(lim, "best_effort")) == (1, 1)
    permits.pop().release()
    assert not lim.refuses(CRITICAL)


async def test_heads_let_through_hold_their_place_until_the_next_turn() -> None:
    lim = limiter(initial_limit=5, best_effort_share=0.8)
    permits = [lim.try_acquire(CRITICAL) for _ in range(2)]
    # One turn of the loop reads ten heads: three places are free, so three get through.
    assert [lim.refuses_head(CRITICAL) for _ in range(10)] == [False] * 3 + [True] * 7
    assert rejected(lim, "critical") == 7
    assert lim.in_flight == 2  # holding a place admits nothing
    # The requests behind those heads are admitted in the next turn, the places given
    # back first; one more head read in that turn finds the rest taken.
    await asyncio.sleep(0)
    permits += [lim.try_acquire(CRITICAL) for _ in range(3)]
    assert lim.refuses_head(CRITICAL)
    # A head let through whose request never comes holds nothing past its turn.
    for permit in permits:
        permit.release(ok=False)
    assert not lim.refuses_head(BEST_EFFORT)
    await asyncio.sleep(0)
    assert [lim.refuses_head(BEST_EFFORT) for _ in range(5)] == [False] * 4 + [True]
    assert rejected(lim, "best_effort") == 1


def rounds(lim: AdaptiveLimiter, clock: FakeClock, latency: float, n: int) -> None:
    """``n`` rounds of filling the limit with calls that each take ``latency``."""
    for _ in range(n):
        permits = [lim.try_acquire() for _ in range(lim.limit)]
        clock.advance(latency)
        for permit in permits:
            permit.release()


def test_the_limit_grows_while_latency_holds_and_shrinks_when_it_rises() -> None:
    clock = FakeClock()
    lim = limiter(clock, initial_limit=10, max_limit=200)
    rounds(lim, clock, 0.010, 20)
    grown = lim.limit
    assert grown > 20
    assert lim.long_rtt == pytest.approx(0.010)
    rounds(lim, clock, 0.050, 5)  # the model slows down five-fold: queueing
    shrunk = lim.limit
    assert shrunk < grown / 2
    rounds(lim, clock, 0.010, 30)  # and recovers
    assert lim.limit > shrunk
    assert lim.metrics.registry.get_sample_value(
        "rtinfer_limiter_limit", {"limiter": "scorer"}
    ) == pytest.approx(lim._limit)


def test_latency_under_the_target_never_shrinks_the_limit() -> None:
    clock = FakeClock()
    lim = limiter(clock, initial_limit=10, max_limit=200, latency_target=0.060)
    rounds(lim, clock, 0.010, 20)
    grown = lim.limit
    rounds(lim, clock, 0.050, 5)  # five times slower, yet under the target: no shedding
    assert lim.limit >= grown
    rounds(lim, clock, 0.300, 5)  # past the target: the limit shrinks as without one
    assert lim.limit < grown / 2
    with pytest.raises(ValueError, match="latency_target"):
        limiter(latency_target=0)


def test_a_calls_service_time_is_the_sample_when_its_caller_knows_it() -> None:
    # Each call takes 300 ms from admission to release (a busy loop's turns), of which
    # 10 ms in front of and in the model: with the service time, no reason to shed.
    clock = FakeClock()
    lim = limiter(clock, initial_limit=10, max_limit=200, latency_target=0.060)
    for _ in range(20):
        permits = [lim.try_acquire() for _ in range(lim.limit)]
        clock.advance(0.300)
        for permit in permits:
            permit.service = 0.010
            permit.release()
    assert lim.long_rtt == pytest.approx(0.010)
    assert lim.limit > 10
    rounds(lim, clock, 0.300, 5)  # the same calls without it: the limit shrinks
    assert lim.limit < 10


def test_latency_past_the_target_keeps_the_limit_down_however_long_it_lasts() -> None:
    clock = FakeClock()
    lim = limiter(clock, initial_limit=50, min_limit=2, max_limit=200, latency_target=0.060)
    rounds(lim, clock, 0.300, 400)  # long enough for the long-term average to be 300 ms
    assert lim.long_rtt == pytest.approx(0.300)
    assert lim.limit <= 4  # held down; without the target 300 ms would become normal
    unanchored = limiter(clock, initial_limit=50, min_limit=2, max_limit=200)
    rounds(unanchored, clock, 0.300, 400)
    assert unanchored.limit > 50


def test_the_limit_stays_within_its_bounds() -> None:
    clock = FakeClock()
    lim = limiter(clock, initial_limit=4, min_limit=2, max_limit=8)
    rounds(lim, clock, 0.01, 50)
    assert lim.limit == 8
    for _ in range(50):
        permit = lim.try_acquire()
        clock.advance(0.01)  # one call time apart: each drop cuts
        permit.release(ok=False, dropped=True)
    assert lim.limit == 2


def test_an_unused_limit_does_not_grow() -> None:
    clock = FakeClock()
    lim = limiter(clock, initial_limit=20)
    for _ in range(100):
        permit = lim.try_acquire()
        clock.advance(0.01)
        permit.release()
    assert lim.limit == 20


def test_a_dropped_call_cuts_the_limit_and_a_failed_one_teaches_nothing() -> None:
    lim = limiter(initial_limit=20)
    lim.try_acquire().release(ok=False)
    assert lim.limit == 20
    lim.try_acquire().release(ok=False, dropped=True)
    assert lim.limit == 18


def test_calls_dropped_together_cut_the_limit_once() -> None:
    clock = FakeClock()
    lim = limiter(clock, initial_limit=100, max_limit=100)
    rounds(lim, clock, 0.010, 3)  # a call takes 10 ms
    batch = [lim.try_acquire() for _ in range(60)]
    clock.advance(0.020)
    for permit in batch:  # one late batch: sixty deadlines missed at once
        permit.release(ok=False, dropped=True)
    assert lim.limit == 90
    clock.advance(0.010)
    lim.try_acquire().release(ok=False, dropped=True)  # a call time later: cuts again
    assert lim.limit == 81


async def test_admit_releases_however_the_call_ends() -> None:
    lim = limiter(initial_limit=20)
    async with lim.admit() as permit:
        assert isinstance(permit, Permit)
        assert lim.in_flight == 1
    with pytest.raises(DeadlineExceeded):
        async with lim.admit(BEST_EFFORT):
            raise DeadlineExceeded("late")
    assert lim.in_flight == 0
    assert lim.limit == 18  # the deadline miss counted as a drop


async def test_a_stream_waits_for_room_instead_of_being_shed() -> None:
    lim = limiter(initial_limit=2)
    held = [lim.try_acquire(), lim.try_acquire()]
    best = asyncio.create_task(lim.acquire(BEST_EFFORT))
    critical = asyncio.create_task(lim.acquire(CRITICAL))
    await asyncio.sleep(0)
    assert not best.done()
    assert not critical.done()
    with pytest.raises(Overloaded):
        lim.try_acquire(CRITICAL)  # no barging past the callers already waiting
    held[0].release()
    permit = await asyncio.wait_for(critical, SAFETY)  # critical first, though it came later
    assert not best.done()
    held[1].release()
    permit.release()
    (await asyncio.wait_for(best, SAFETY)).release()
    assert lim.in_flight == 0


async def test_a_caller_that_leaves_while_waiting_takes_no_room() -> None:
    lim = limiter(initial_limit=1)
    held = lim.try_acquire()
    gone = asyncio.create_task(lim.acquire())
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    held.release()
    assert lim.in_flight == 0
    lim.try_acquire().release()


async def test_a_slow_model_behind_a_limiter_sheds_at_once() -> None:
    gate = threading.Event()

    def slow(inputs: Arrays) -> Arrays:
        if not gate.wait(SAFETY):
            raise TimeoutError("the test never opened the gate")
        return {"y": inputs["x"] + 1}

    model = PythonModel(slow, inputs={"x": ("int64", [None, 1])}, name="slow")
    gate.set()
    batcher = MicroBatcher(model, max_delay=0.0)
    await asyncio.wait_for(batcher.start(), SAFETY)
    gate.clear()
    lim = limiter(initial_limit=3, best_effort_share=0.5)

    async def call(i: int, priority: Priority) -> Arrays:
        async with lim.admit(priority):
            return await batcher.submit({"x": np.asarray([[i]], dtype=np.int64)})

    try:
        running = [asyncio.create_task(call(i, CRITICAL)) for i in range(3)]
        await asyncio.sleep(0)
        assert lim.in_flight == 3
        with pytest.raises(Overloaded):
            await call(99, BEST_EFFORT)
        with pytest.raises(Overloaded):
            await call(99, CRITICAL)
        gate.set()
        answers = await asyncio.wait_for(asyncio.gather(*running), SAFETY)
        assert [a["y"].tolist() for a in answers] == [[[1]], [[2]], [[3]]]
        assert lim.in_flight == 0
    finally:
        gate.set()
        await asyncio.wait_for(batcher.aclose(), SAFETY)


def test_a_client_over_its_quota_gets_a_429_with_retry_after() -> None:
    clock = FakeClock()
    metrics = Metrics()
    quota = ClientQuota(2.0, burst=2, clock=clock, metrics=metrics)
    quota.check("alice")
    quota.check("alice")
    with pytest.raises(QuotaExceeded, match="'alice' is over its quota") as info:
        quota.check("alice")
    assert isinstance(info.value, Overloaded)
    assert info.value.client == "alice"
    assert info.value.retry_after == pytest.approx(0.5)
    quota.check("bob")  # another client's quota is its own
    clock.advance(0.5)
    quota.check("alice")
    value = metrics.registry.get_sample_value(
        "rtinfer_limiter_rejected_total", {"limiter": "quota", "priority": "any", "reason": "quota"}
    )
    assert value == 1


def test_the_quota_forgets_the_least_recent_clients_first() -> None:
    quota = ClientQuota(1.0, burst=1, max_clients=2, clock=FakeClock())
    quota.check("a")
    quota.check("b")
    quota.check("c")  # "a" is forgotten, and starts afresh
    quota.check("a")
    with pytest.raises(QuotaExceeded):
        quota.check("c")


@pytest.mark.parametrize(
    ("value", "want"),
    [
        (None, CRITICAL),
        ("", CRITICAL),
        ("critical", CRITICAL),
        ("best_effort", BEST_EFFORT),
        (b"Best-Effort", BEST_EFFORT),
    ],
)
def test_priorities_are_read_from_headers(value: str | bytes | None, want: Priority) -> None:
    assert parse_priority(value) is want


def test_an_unknown_priority_names_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match="unknown priority 'urgent'; use 'critical' or"):
        parse_priority("urgent")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"initial_limit": 0}, "min_limit=1, initial_limit=0"),
        ({"best_effort_share": 0}, "best_effort_share must be in"),
        ({"tolerance": 0.5}, "tolerance must be at least 1"),
    ],
)
def test_bad_settings_are_refused_with_the_value(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaptiveLimiter("x", **options)  # type: ignore[arg-type]


def busy(lim: AdaptiveLimiter, clock: FakeClock, seconds: float, answers_per_s: float) -> None:
    """Calls admitted up to the limit, answered at ``answers_per_s`` (1 ms in the model
    each: no reason to shed by their samples), for ``seconds`` of the fake clock."""
    held: list[Permit] = []
    for _ in range(round(seconds * answers_per_s)):
        while True:
            try:
                held.append(lim.try_acquire())
            except Overloaded:
                break
        clock.advance(1 / answers_per_s)
        permit = held.pop(0)
        permit.service = 0.001
        permit.release()
    for permit in held:
        permit.release(ok=False)


def test_calls_in_flight_stay_within_what_the_answers_allow() -> None:
    # 5,000 answers a second and a 10 ms target: Little's law allows 2 x 0.010 x 5,000
    # = 100 in flight within twice the target; the samples alone would let it grow.
    clock = FakeClock()
    lim = limiter(clock, initial_limit=200, max_limit=1000, latency_target=0.010)
    busy(lim, clock, 1.0, 5000)
    assert 90 <= lim.limit <= 100
    unbounded = limiter(clock, initial_limit=200, max_limit=1000)  # no target, no ceiling
    busy(unbounded, clock, 1.0, 5000)
    assert unbounded.limit > 200


def quiet(lim: AdaptiveLimiter, clock: FakeClock, seconds: float) -> None:
    """One call at a time, 10 ms apart, 1 ms in the model: the callers' pace, no refusal."""
    for _ in range(round(seconds / 0.010)):
        permit = lim.try_acquire()
        clock.advance(0.010)
        permit.service = 0.001
        permit.release()


def test_a_quiet_spell_forgets_what_an_overload_taught() -> None:
    clock = FakeClock()
    loop_keeps_time = False
    lim = limiter(
        clock,
        initial_limit=200,
        max_limit=1000,
        latency_target=0.010,
        calm=lambda: loop_keeps_time,
    )
    busy(lim, clock, 1.0, 5000)
    settled = lim.limit
    assert settled <= 100
    quiet(lim, clock, 2.0)  # the calls' pace, but their loop is late: it may be the limit
    assert lim.limit == settled
    loop_keeps_time = True
    quiet(lim, clock, 2.0)  # the model idles, nobody is refused: a burst may follow
    assert lim.limit >= 190  # back towards its start, the room of a quiet server
    burst = [lim.try_acquire() for _ in range(150)]  # a pause upstream, then its backlog
    for permit in burst:
        permit.release(ok=False)
    busy(lim, clock, 1.0, 5000)  # overloaded again: the ceiling is learnt again
    assert lim.limit <= 100
    busy(lim, clock, 1.0, 20_000)  # busier: the ceiling rises with the answers
    assert lim.limit > settled
