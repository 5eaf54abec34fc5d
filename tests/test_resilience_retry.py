"""Retries: jittered exponential backoff, a budget that caps them near 10%, deadlines kept.

Sleeping is recorded, not done, and the clocks are fake: nothing here depends on time.
"""

from __future__ import annotations

import random

import pytest

from rtinfer.exceptions import CircuitOpen, ModelInputError, Overloaded
from rtinfer.observability.metrics import Metrics
from rtinfer.resilience import Backoff, Retry, RetryBudget, is_transient
from test_resilience_breaker import FakeClock


class Sleeps:
    """Records each wait instead of waiting, and moves a fake wall clock by it."""

    def __init__(self, wall: FakeClock | None = None) -> None:
        self.waits: list[float] = []
        self.wall = wall

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        if self.wall is not None:
            self.wall.advance(seconds)


class Failing:
    """An async call that raises ``errors`` in turn, then answers ``"ok"``."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def retry(**options: object) -> tuple[Retry, Sleeps, Metrics]:
    sleeps = Sleeps()
    metrics = Metrics()
    settings: dict[str, object] = {
        "attempts": 3,
        "sleep": sleeps,
        "metrics": metrics,
        "backoff": Backoff(0.1, max_delay=10, rng=random.Random(7)),
    }
    settings.update(options)
    return Retry("sink:test", **settings), sleeps, metrics  # type: ignore[arg-type]


def count(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name, {"operation": "sink:test"})
    return 0.0 if value is None else value


async def test_a_transient_failure_is_retried_after_a_jittered_wait() -> None:
    r, sleeps, metrics = retry()
    call = Failing(ConnectionResetError("reset"), TimeoutError("slow"))
    assert await r.run(call) == "ok"
    assert call.calls == 3
    assert len(sleeps.waits) == 2
    assert 0 <= sleeps.waits[0] <= 0.1
    assert 0 <= sleeps.waits[1] <= 0.2
    assert count(metrics, "rtinfer_retries_total") == 2


async def test_attempts_are_bounded_and_the_last_error_is_raised() -> None:
    r, _, _ = retry()
    call = Failing(*(OSError(f"down {i}") for i in range(5)))
    with pytest.raises(OSError, match="down 2"):
        await r.run(call)
    assert call.calls == 3


@pytest.mark.parametrize(
    "error",
    [
        ModelInputError("bad input"),
        Overloaded("queue full"),
        CircuitOpen("open", breaker="b"),
        ValueError("a bug"),
    ],
)
async def test_errors_a_retry_cannot_fix_are_raised_at_once(error: Exception) -> None:
    r, sleeps, _ = retry()
    call = Failing(error)
    with pytest.raises(type(error)):
        await r.run(call)
    assert call.calls == 1
    assert sleeps.waits == []


def test_transient_errors_include_clients_own_connection_errors() -> None:
    class ConnectionError(Exception):  # the name redis-py gives its own
        pass

    assert is_transient(ConnectionError())
    assert is_transient(ConnectionRefusedError())
    assert not is_transient(KeyError("x"))


async def test_a_wait_that_would_pass_the_deadline_is_not_made() -> None:
    wall = FakeClock(5000.0)
    sleeps = Sleeps(wall)
    r, _, _ = retry(sleep=sleeps, wall=wall, backoff=Backoff(1.0, max_delay=1.0, rng=Fixed()))
    call = Failing(OSError("1"), OSError("2"))
    with pytest.raises(OSError, match="2"):
        await r.run(call, deadline=5001.5)
    assert call.calls == 2  # one wait of 1 s fitted; the second would have ended past it
    assert sleeps.waits == [1.0]


class Fixed(random.Random):
    """Jitter that always picks the cap."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_backoff_grows_exponentially_up_to_its_cap() -> None:
    backoff = Backoff(0.01, multiplier=2, max_delay=0.05, rng=Fixed())
    assert [backoff.delay(n) for n in range(5)] == pytest.approx([0.01, 0.02, 0.04, 0.05, 0.05])
    jittered = Backoff(0.01, max_delay=0.05, rng=random.Random(1))
    waits = {jittered.delay(3) for _ in range(50)}
    assert len(waits) > 40  # spread out, not synchronised
    assert all(0 <= w <= 0.05 for w in waits)


def test_the_budget_caps_retries_near_ten_percent() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.1, min_per_second=0.0, max_tokens=10, clock=clock)
    retries = 0
    for _ in range(10_000):
        budget.deposit()
        if budget.withdraw():  # every call fails and wants a retry
            retries += 1
    # 10% of the calls, plus the bucket's initial 10 tokens.
    assert retries == pytest.approx(1000 + 10, abs=2)


def test_the_budget_refills_slowly_with_time() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.0, min_per_second=2.0, max_tokens=3, clock=clock)
    assert [budget.withdraw() for _ in range(4)] == [True, True, True, False]
    clock.advance(0.5)
    assert budget.withdraw()
    assert not budget.withdraw()
    clock.advance(3600)
    assert budget.tokens == 3  # capped: a long quiet spell does not buy a retry storm


async def test_during_an_outage_the_budget_stops_retries_amplifying_the_load() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.1, min_per_second=0.0, max_tokens=5, clock=clock)
    r, _, metrics = retry(budget=budget, attempts=4)
    calls = 0

    async def down() -> str:
        nonlocal calls
        calls += 1
        raise ConnectionRefusedError("the dependency is down")

    for _ in range(1000):
        with pytest.raises(ConnectionRefusedError):
            await r.run(down)
    # Without a budget: 4000 calls. With it: 1000 + 10% + the initial 5 tokens.
    assert calls <= 1000 + 100 + 5
    assert count(metrics, "rtinfer_retries_total") == calls - 1000
    assert count(metrics, "rtinfer_retries_denied_total") >= 890


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: RetryBudget(1.5), "ratio must be between 0 and 1"),
        (lambda: RetryBudget(max_tokens=0.5), "max_tokens must be at least 1"),
        (lambda: Backoff(0.5, max_delay=0.1), "base=0.5, max_delay=0.1"),
        (lambda: Retry("x", attempts=0), "attempts must be at least 1"),
    ],
)
def test_bad_settings_are_refused_with_the_value(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


def test_lasting_os_errors_are_not_transient() -> None:
    from rtinfer.resilience.retry import is_transient

    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    for lasting in (FileNotFoundError(), PermissionError(), IsADirectoryError()):
        assert not is_transient(lasting), lasting
