"""Circuit breakers: trip on failures, refuse while open, probe when half-open, recover.

Time is a :class:`FakeClock` the test moves by hand: nothing here depends on how fast
anything runs. The end-to-end test puts a breaker around a real micro-batcher whose
Python model fails until it is told to recover.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from rtinfer.batching import MicroBatcher
from rtinfer.exceptions import CircuitOpen, ModelInputError, Overloaded
from rtinfer.models import PythonModel
from rtinfer.observability.metrics import Metrics
from rtinfer.resilience import BreakerState, CircuitBreaker
from rtinfer.types import Arrays

SAFETY = 10.0  # seconds: a safety net against a hang, never a timing assertion


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Boom(Exception):
    """The failure the tests inject."""


def breaker(clock: FakeClock, **options: object) -> CircuitBreaker:
    settings: dict[str, object] = {"consecutive_failures": 3, "open_seconds": 10.0}
    settings.update(options)
    return CircuitBreaker("dep", clock=clock, metrics=Metrics(), **settings)  # type: ignore[arg-type]


def fail(b: CircuitBreaker, exc: BaseException | None = None) -> None:
    with pytest.raises(type(exc) if exc else Boom), b.guard():
        raise exc or Boom("injected")


def succeed(b: CircuitBreaker) -> None:
    with b.guard():
        pass


def gauge(b: CircuitBreaker) -> float | None:
    return b.metrics.registry.get_sample_value("rtinfer_breaker_state", {"breaker": b.name})


def test_consecutive_failures_open_it_and_calls_are_refused_at_once() -> None:
    clock = FakeClock()
    b = breaker(clock)
    fail(b)
    fail(b)
    assert b.state is BreakerState.CLOSED
    assert gauge(b) == 0
    fail(b)
    assert b.state is BreakerState.OPEN
    assert gauge(b) == 2
    clock.advance(4)
    ran = []
    with pytest.raises(CircuitOpen, match=r"'dep' is open.*in 6.0 s") as info, b.guard():
        ran.append(1)
    assert ran == []
    assert isinstance(info.value, Overloaded)  # fronts answer 503 with Retry-After
    assert info.value.retry_after == pytest.approx(6.0)
    assert info.value.breaker == "dep"
    rejected = b.metrics.registry.get_sample_value(
        "rtinfer_breaker_rejected_total", {"breaker": "dep"}
    )
    assert rejected == 1


def test_a_success_resets_the_run_of_failures() -> None:
    b = breaker(FakeClock())
    for _ in range(5):
        fail(b)
        fail(b)
        succeed(b)
    assert b.state is BreakerState.CLOSED


def test_after_open_seconds_one_probe_closes_it() -> None:
    clock = FakeClock()
    b = breaker(clock)
    for _ in range(3):
        fail(b)
    clock.advance(9.9)
    assert b.state is BreakerState.OPEN
    clock.advance(0.1)
    assert b.state is BreakerState.HALF_OPEN
    assert gauge(b) == 1
    succeed(b)
    assert b.state is BreakerState.CLOSED
    assert gauge(b) == 0
    transitions = {
        state: b.metrics.registry.get_sample_value(
            "rtinfer_breaker_transitions_total", {"breaker": "dep", "state": state}
        )
        for state in ("open", "half_open", "closed")
    }
    assert transitions == {"open": 1, "half_open": 1, "closed": 1}
    # Closed again from scratch: it takes a full run of failures to open it.
    fail(b)
    fail(b)
    assert b.state is BreakerState.CLOSED


def test_a_failed_probe_opens_it_again_for_the_full_time() -> None:
    clock = FakeClock()
    b = breaker(clock)
    for _ in range(3):
        fail(b)
    clock.advance(10)
    fail(b)
    assert b.state is BreakerState.OPEN
    assert b.retry_after() == pytest.approx(10.0)


def test_half_open_lets_only_its_probes_through() -> None:
    clock = FakeClock()
    b = breaker(clock, probes=2)
    for _ in range(3):
        fail(b)
    clock.advance(10)
    first, second = b.acquire(), b.acquire()
    assert first
    assert second
    with pytest.raises(CircuitOpen, match="probe"):
        b.acquire()
    b.release(first, None, 0.0)
    assert b.state is BreakerState.HALF_OPEN  # one success of the two needed
    b.release(second, None, 0.0)
    assert b.state is BreakerState.CLOSED


def test_a_cancelled_probe_frees_its_place_and_counts_as_nothing() -> None:
    clock = FakeClock()
    b = breaker(clock)
    for _ in range(3):
        fail(b)
    clock.advance(10)
    fail(b, asyncio.CancelledError())
    assert b.state is BreakerState.HALF_OPEN
    succeed(b)
    assert b.state is BreakerState.CLOSED


def test_a_failure_rate_opens_it_without_a_run_of_failures() -> None:
    b = breaker(FakeClock(), consecutive_failures=100, failure_rate=0.5, window=10, min_calls=10)
    for _ in range(4):
        fail(b)
        succeed(b)
    fail(b)
    assert b.state is BreakerState.CLOSED  # 9 calls: fewer than min_calls
    succeed(b)
    assert b.state is BreakerState.OPEN  # 5 failures in the last 10


def test_the_failure_rate_only_counts_the_window() -> None:
    b = breaker(FakeClock(), consecutive_failures=100, failure_rate=0.5, window=10, min_calls=10)
    for _ in range(4):
        fail(b)
    for _ in range(30):
        succeed(b)
    for _ in range(4):
        fail(b)
        succeed(b)
    assert b.state is BreakerState.CLOSED  # 4 of the last 10 failed


def test_slow_calls_count_as_failures() -> None:
    clock = FakeClock()
    b = breaker(clock, slow_call_seconds=1.0)
    for _ in range(3):
        with b.guard():
            clock.advance(0.5)
    assert b.state is BreakerState.CLOSED
    for _ in range(3):
        with b.guard():
            clock.advance(1.5)
    assert b.state is BreakerState.OPEN


def test_the_callers_mistakes_do_not_count() -> None:
    b = breaker(FakeClock())
    for _ in range(10):
        fail(b, ModelInputError("bad input"))
    assert b.state is BreakerState.CLOSED


def test_it_can_be_shared_by_threads() -> None:
    b = breaker(FakeClock(), consecutive_failures=10**6)

    def work() -> None:
        for _ in range(2000):
            succeed(b)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SAFETY)
    assert b.state is BreakerState.CLOSED


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"consecutive_failures": 0}, "consecutive_failures must be at least 1, got 0"),
        ({"failure_rate": 1.5}, r"failure_rate must be in \(0, 1\], got 1.5"),
        ({"window": 5, "min_calls": 10}, "min_calls=10, window=5"),
        ({"open_seconds": 0}, "open_seconds must be more than 0, got 0"),
        ({"probes": 0}, "probes must be at least 1, got 0"),
    ],
)
def test_bad_settings_are_refused_with_the_value(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CircuitBreaker("dep", **options)  # type: ignore[arg-type]


# -- around a real model -----------------------------------------------------------


class Flaky:
    """A model that fails while ``broken`` is set, and counts the calls it gets."""

    def __init__(self) -> None:
        self.broken = False
        self.calls = 0

    def __call__(self, inputs: Arrays) -> Arrays:
        self.calls += 1
        if self.broken:
            raise Boom("the model is down")
        return {"y": inputs["x"] * 2}


async def test_a_failing_model_opens_its_breaker_and_recovers() -> None:
    flaky = Flaky()
    model = PythonModel(flaky, inputs={"x": ("float32", [None, 1])}, name="flaky")
    metrics = Metrics()
    batcher = MicroBatcher(model, max_delay=0.0, metrics=metrics)
    await asyncio.wait_for(batcher.start(), SAFETY)
    clock = FakeClock()
    b = CircuitBreaker(
        "model:flaky", consecutive_failures=2, open_seconds=5, clock=clock, metrics=metrics
    )
    x = {"x": np.ones((1, 1), dtype=np.float32)}
    try:
        flaky.broken = True
        for _ in range(2):
            with pytest.raises(Boom):
                await b.call(batcher.submit, x)
        calls = flaky.calls
        with pytest.raises(CircuitOpen):
            await b.call(batcher.submit, x)
        assert flaky.calls == calls  # refused without reaching the model
        assert b'rtinfer_breaker_state{breaker="model:flaky"} 2.0' in metrics.exposition()
        flaky.broken = False
        clock.advance(5)
        out = await b.call(batcher.submit, x)
        assert out["y"].tolist() == [[2.0]]
        assert b.state is BreakerState.CLOSED
        assert b'rtinfer_breaker_state{breaker="model:flaky"} 0.0' in metrics.exposition()
    finally:
        await asyncio.wait_for(batcher.aclose(), SAFETY)
