"""Resilience of stream pipelines (issue 5): deadlines and the expired policy, the fallback
chain in the model stage, the model's circuit breaker, failing sinks (retries within a
budget, a breaker that pauses intake), and their configuration.

Faults are real: Python models that fail or are switched off, sinks that raise the errors
a broker client raises and lose their buffer as a file sink does. Breakers and budgets
run on a hand-driven clock; waits are hang guards, never timing assertions.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from conftest import (
    SAFETY,
    Ledger,
    Reading,
    RecordingSink,
    committed_positions,
    linear,
    payload,
    python_model,
    wait_until,
)
from rtinfer.batching import MicroBatcher
from rtinfer.broker import Broker
from rtinfer.build import build_pipeline
from rtinfer.config import parse_config
from rtinfer.exceptions import CircuitOpen, ConfigError, ModelLoadError
from rtinfer.models import PythonModel, tensor
from rtinfer.observability.metrics import Metrics
from rtinfer.pipeline import Pipeline, SinkResilience
from rtinfer.resilience import BreakerState, CircuitBreaker, Step
from rtinfer.sources import BrokerSource
from rtinfer.stages import Decide, Decode, Predict, Vectorize
from rtinfer.stages.predict import model_failure
from rtinfer.testing import ListSource
from rtinfer.types import Arrays, Batch, Event, Position

THRESHOLDS = {"review": 0.5, "block": 0.9}


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Switch:
    """A model that can be switched off (it then raises), counting the rows it was given."""

    def __init__(self) -> None:
        self.down = False
        self.calls = 0
        self.rows: list[float] = []

    def model(self, name: str = "switch") -> PythonModel:
        def predict(inputs: Arrays) -> Arrays:
            features = inputs["features"]
            if features.any():  # not the warm-up (zeros)
                self.calls += 1
                if self.down:
                    raise ValueError("the model is down")
                self.rows.extend(features[:, 0].tolist())
            return linear(inputs)

        return PythonModel(
            predict,
            inputs=[tensor("features", "float32", [None, 2])],
            outputs=[tensor("probabilities", "float32", [None, 2])],
            name=name,
        )


def amount_rules(inputs: Arrays) -> Arrays:
    """Rules: a score of 0.75 for every row (float64, as rules often are)."""
    n = len(inputs["features"])
    return {"probabilities": np.tile([0.25, 0.75], (n, 1))}


def bad_rules(inputs: Arrays) -> Arrays:
    return {"scores": np.zeros(len(inputs["features"]))}  # not the model's output


DEFAULT = Step.default("default", {"probabilities": [1.0, 0.0]})


def scored(xs: Sequence[float], deadlines: Sequence[float | None] | None = None) -> Batch:
    """A batch of decoded events whose model input is ``[x, 0]``."""
    deadlines = deadlines or [None] * len(xs)
    events = [
        Event(b"-", ingest_time=time.time(), deadline=d, position=Position("src", 0, i), id=f"e{i}")
        for i, d in enumerate(deadlines)
    ]
    for event, x in zip(events, xs, strict=True):
        event.data = {"x": x}
    batch = Batch(events)
    batch.inputs = {"features": np.array([[x, 0.0] for x in xs], dtype=np.float32)}
    return batch


def decide() -> Decide:
    return Decide(output="probabilities", thresholds=THRESHOLDS, include=["x"])


async def run_stage(stage: Predict, batch: Batch) -> Batch:
    await stage.start()
    try:
        return decide()(await stage(batch))
    finally:
        await stage.aclose()


def results(batch: Batch) -> dict[str, dict[str, Any]]:
    return {e.id: e.result for e in batch.events if e.id is not None}


# -- (1) deadlines: the SLO and the expired policy ----------------------------------------


def mixed_deadlines() -> list[float | None]:
    """e0 and e1 expired a second ago, e2 has none, e3 has a minute left."""
    now = time.time()
    return [now - 1, now - 1, None, now + 60]


async def test_expired_dead_letter_drops_only_the_expired_events_and_never_batches_them() -> None:
    switch = Switch()
    stage = Predict(MicroBatcher(switch.model(), max_delay=0))
    batch = await run_stage(stage, scored([0.1, 0.2, 0.3, 0.4], mixed_deadlines()))
    assert sorted(results(batch)) == ["e2", "e3"]
    assert {d.event.id for d in batch.dead} == {"e0", "e1"}
    assert all("deadline passed" in d.reason for d in batch.dead)
    assert sorted(switch.rows) == pytest.approx([0.3, 0.4])  # expired rows never reached it
    assert all("late" not in r and "step" not in r for r in results(batch).values())


async def test_expired_late_gets_the_models_answer_marked_late() -> None:
    switch = Switch()
    stage = Predict(MicroBatcher(switch.model(), max_delay=0), expired="late")
    batch = await run_stage(stage, scored([0.1, 0.2, 0.3, 0.95], mixed_deadlines()))
    got = results(batch)
    assert batch.dead == []
    assert [got[f"e{i}"]["score"] for i in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.95])
    assert [got[f"e{i}"].get("late", False) for i in range(4)] == [True, True, False, False]
    assert got["e3"]["decision"] == "block"


async def test_expired_fallback_gets_the_chains_answer_and_model_steps_refuse_it() -> None:
    switch, light = Switch(), Switch()
    stage = Predict(
        MicroBatcher(switch.model(), max_delay=0),
        fallback=[
            MicroBatcher(light.model("light"), max_delay=0),
            Step.rules("rules", amount_rules),
        ],
        expired="fallback",
    )
    batch = await run_stage(stage, scored([0.1, 0.2, 0.3, 0.4], mixed_deadlines()))
    got = results(batch)
    assert batch.dead == []
    assert {k: (r["step"], r.get("late", False)) for k, r in got.items()} == {
        "e0": ("rules", True),
        "e1": ("rules", True),
        "e2": ("primary", False),
        "e3": ("primary", False),
    }
    assert got["e0"]["score"] == pytest.approx(0.75)
    assert got["e0"]["decision"] == "review"
    assert light.calls == 0  # the lighter model refused the passed deadline at once
    assert sorted(switch.rows) == pytest.approx([0.3, 0.4])


async def test_expired_fallback_needs_a_fallback_chain() -> None:
    with pytest.raises(ConfigError, match="fallback"):
        Predict(MicroBatcher(python_model()), expired="fallback")


async def test_slo_sets_deadlines_from_ingestion_and_keeps_the_sources_own() -> None:
    seen: list[tuple[float, float | None]] = []
    source = ListSource([payload(i) for i in range(5)], deadline_after=30.0)
    pipeline = Pipeline(
        source,
        [Decode(Reading), Vectorize(["x", "y"]), Predict(MicroBatcher(python_model()))],
        [RecordingSink()],
        slo=0.25,
    )
    pipeline.observe(lambda b: seen.extend((e.ingest_time, e.deadline) for e in b.events))
    await asyncio.wait_for(pipeline.run(), SAFETY)
    assert len(seen) == 5
    assert all(d == pytest.approx(t + 30.0) for t, d in seen)  # the source's own, kept

    seen.clear()
    pipeline = Pipeline(
        ListSource([payload(i) for i in range(5)]),
        [Decode(Reading), Vectorize(["x", "y"]), Predict(MicroBatcher(python_model()))],
        [RecordingSink()],
        slo=0.25,
    )
    pipeline.observe(lambda b: seen.extend((e.ingest_time, e.deadline) for e in b.events))
    await asyncio.wait_for(pipeline.run(), SAFETY)
    assert len(seen) == 5
    assert all(d == t + 0.25 for t, d in seen)


class StaleSource(ListSource):
    """A ListSource whose events at the ``stale`` indices arrive already past a deadline."""

    def __init__(self, values: list[bytes], stale: set[int]) -> None:
        super().__init__(values)
        self.stale = stale
        self.index = 0

    async def read(self, max_events: int) -> list[Event]:
        events = await super().read(max_events)
        for event in events:
            if self.index in self.stale:
                event.deadline = time.time() - 1.0
            self.index += 1
        return events


@pytest.mark.parametrize("shed", [True, False])
async def test_shed_sets_events_late_at_intake_aside_undecoded(shed: bool) -> None:
    switch = Switch()
    n = 24
    stale = {0, 1, 2, 3, 6, 9, 13, 17}  # the whole first batch of 4, then here and there
    values = [payload(i, x=(i + 1) / 100) for i in range(n)]
    values[6] = b"{not even json"  # shed before decoding, it is no decode failure
    source = StaleSource(values, stale)
    ledger = Ledger(lambda: set(source.acked))
    sink = RecordingSink(ledger=ledger)
    dead = RecordingSink("dead", ledger=ledger, dead=True)
    pipeline = Pipeline(
        source,
        [
            Decode(Reading),
            Vectorize(["x", "y"]),
            Predict(MicroBatcher(switch.model(), max_batch_size=8, max_delay=0)),
            decide(),
        ],
        [sink],
        dead_letters=dead,
        read_size=4,
        slo=60.0,
        shed_expired=shed,
    )
    await asyncio.wait_for(pipeline.run(), SAFETY)
    assert len(source.acked) == n  # nothing lost either way
    fresh = [i for i in range(n) if i not in stale]
    assert sorted(r["id"] for r in sink.flushed_results) == sorted(f"e{i}" for i in fresh)
    if shed:
        assert sorted(r["offset"] for r in dead.flushed_results) == sorted(stale)
        assert {r["stage"] for r in dead.flushed_results} == {"intake"}
        assert all("deadline had passed" in r["reason"] for r in dead.flushed_results)
        assert sorted(switch.rows) == pytest.approx([(i + 1) / 100 for i in fresh])
    else:  # decoded first: the bad one fails there, the others expire at the model
        stages = sorted(r["stage"] for r in dead.flushed_results)
        assert stages == ["decode"] + ["model"] * (len(stale) - 1)


def test_shedding_keeps_twice_the_transit_of_the_batches_that_ran() -> None:
    pipeline = Pipeline(ListSource([]), [], [], slo=1.0, shed_expired=True)
    ran = Batch([Event(b"-", ingest_time=0.0, position=Position("src", 0, 0))], 1)
    for _ in range(60):
        pipeline.record_transit(0.1, ran)
    now = time.time()
    cutoff = pipeline.shed_cutoff(now)
    assert cutoff == pytest.approx(now + 2 * 0.1, abs=1e-4)
    # Batches set aside whole take no time: they must not shrink the margin, or under a
    # heavy overload (most batches set aside) every event admitted would be late.
    for _ in range(60):
        pipeline.record_transit(0.0, Batch([], 2))
    assert pipeline.shed_cutoff(now) == cutoff
    # A margin as long as the deadline would set aside fresh events too, and then no batch
    # would run to shrink it: it is at most 90% of the deadline.
    for _ in range(60):
        pipeline.record_transit(0.8, ran)
    now = time.time()
    assert pipeline.shed_cutoff(now) == pytest.approx(now + 0.9)
    # Nothing admitted for a whole deadline: the next read is admitted unless expired, so a
    # batch runs and measures again how long one takes.
    assert pipeline.shed_cutoff(now + 1.5) == now + 1.5


class SlowSink(RecordingSink):
    """A sink that takes ``delay`` seconds to write each batch."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def write(self, events: Sequence[Event]) -> None:
        await asyncio.sleep(self.delay)
        await super().write(events)


async def test_the_shedding_margin_counts_the_time_until_results_are_flushed() -> None:
    # No stages: each batch is ready at once, and its results take 20 ms to be written,
    # then flushed. That is time an event at the edge of a backlog needs left.
    pipeline = Pipeline(
        ListSource([payload(i) for i in range(40)]),
        [],
        [SlowSink(0.02)],
        read_size=2,
        max_in_flight=1,
        slo=10.0,
        shed_expired=True,
    )
    summary = await asyncio.wait_for(pipeline.run(), SAFETY)
    assert summary.events_out == 40
    now = time.time()
    margin = pipeline.shed_cutoff(now) - now
    assert margin > 2 * 0.02 * 0.9  # twice the write's time, once the average settled


@pytest.mark.parametrize("policy", ["dead_letter", "fallback", "late"])
async def test_every_expired_event_ends_in_a_result_or_a_dead_letter_and_is_acknowledged(
    policy: str,
) -> None:
    """A source whose events arrive already expired: nothing is lost under any policy."""
    switch = Switch()
    n = 40
    source = ListSource([payload(i, x=0.4) for i in range(n)], deadline_after=-1.0)
    ledger = Ledger(lambda: set(source.acked))
    sink = RecordingSink(ledger=ledger)
    dead = RecordingSink("dead", ledger=ledger, dead=True)
    pipeline = Pipeline(
        source,
        [
            Decode(Reading),
            Vectorize(["x", "y"]),
            Predict(
                MicroBatcher(switch.model(), max_batch_size=8, max_delay=0),
                fallback=[DEFAULT] if policy == "fallback" else (),
                expired=policy,  # type: ignore[arg-type]
            ),
            decide(),
        ],
        [sink],
        dead_letters=dead,
        read_size=8,
    )
    await asyncio.wait_for(pipeline.run(), SAFETY)
    assert len(source.acked) == n
    assert ledger.checks > 0
    ids = {r["id"] for r in sink.flushed_results} | {r["id"] for r in dead.flushed_results}
    assert ids == {f"e{i}" for i in range(n)}
    if policy == "dead_letter":
        assert sink.flushed_results == []
        assert switch.rows == []
    elif policy == "fallback":
        assert {(r["step"], r["late"], r["decision"]) for r in sink.flushed_results} == {
            ("default", True, "approve")
        }
        assert switch.rows == []  # expired items are never batched
    else:
        assert {r["late"] for r in sink.flushed_results} == {True}
        assert [r["score"] for r in sink.flushed_results] == pytest.approx([0.4] * n)


# -- (2) the fallback chain in the model stage ------------------------------------------


async def test_an_event_the_model_fails_on_gets_the_next_steps_answer() -> None:
    stage = Predict(
        MicroBatcher(python_model(fail_on=0.5), max_delay=0),
        fallback=[Step.rules("bad-rules", bad_rules), Step.rules("rules", amount_rules), DEFAULT],
    )
    batch = await run_stage(stage, scored([0.1, 0.5, 0.3]))
    got = results(batch)
    assert batch.dead == []
    assert [got[f"e{i}"]["step"] for i in range(3)] == ["primary", "rules", "primary"]
    assert [got[f"e{i}"]["score"] for i in range(3)] == pytest.approx([0.1, 0.75, 0.3])
    assert batch.outputs is not None
    assert batch.outputs["probabilities"].dtype == np.float32  # cast to the model's
    failures = stage.metrics.registry.get_sample_value(
        "rtinfer_fallback_failures_total", {"chain": "linear", "step": "bad-rules"}
    )
    assert failures == 1


async def test_steps_in_results_only_with_a_chain_and_every_row_says_primary() -> None:
    stage = Predict(MicroBatcher(python_model(), max_delay=0), fallback=[DEFAULT])
    batch = await run_stage(stage, scored([0.1, 0.2]))
    assert [r["step"] for r in results(batch).values()] == ["primary", "primary"]
    rows = stage.metrics.registry.get_sample_value(
        "rtinfer_fallback_outputs_total", {"chain": "linear", "step": "primary"}
    )
    assert rows == 2


async def test_without_a_default_an_exhausted_chain_dead_letters_with_every_steps_error() -> None:
    stage = Predict(
        MicroBatcher(python_model(fail_on=0.5), max_delay=0),
        fallback=[Step.rules("bad-rules", bad_rules)],
    )
    batch = await run_stage(stage, scored([0.5, 0.2]))
    assert [d.event.id for d in batch.dead] == ["e0"]
    assert "bad-rules" in batch.dead[0].reason
    assert list(results(batch)) == ["e1"]


async def test_for_requests_shares_the_chain_and_fails_fast() -> None:
    stage = Predict(MicroBatcher(python_model(fail_on=0.5), max_delay=0), fallback=[DEFAULT])
    requests = stage.for_requests()
    assert requests.wait is False
    assert requests.batcher is stage.batcher
    await stage.start()
    try:
        batch = decide()(await requests(scored([0.5])))
    finally:
        await stage.aclose()
    assert results(batch)["e0"]["step"] == "default"


# -- (3) the model's circuit breaker ------------------------------------------------------


def breaker_state(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value("rtinfer_breaker_state", {"breaker": name})


async def test_breaker_opens_on_a_failing_model_falls_back_and_recovers() -> None:
    clock, switch, metrics = FakeClock(), Switch(), Metrics()
    breaker = CircuitBreaker(
        "model:switch", consecutive_failures=2, open_seconds=10, clock=clock, metrics=metrics,
        is_failure=model_failure,
    )  # fmt: skip
    stage = Predict(
        MicroBatcher(switch.model(), max_delay=0, metrics=metrics),
        fallback=[DEFAULT],
        breaker=breaker,
    )
    await stage.start()
    try:
        switch.down = True
        batch = decide()(await stage(scored([0.1, 0.2, 0.3])))
        assert {r["step"] for r in results(batch).values()} == {"default"}
        assert batch.dead == []
        assert breaker.state is BreakerState.OPEN
        assert breaker_state(metrics, "model:switch") == 2

        calls = switch.calls
        batch = decide()(await stage(scored([0.4, 0.5])))
        assert {r["step"] for r in results(batch).values()} == {"default"}
        assert switch.calls == calls  # open: the model is not called at all

        switch.down = False
        clock.advance(10)
        assert breaker_state(metrics, "model:switch") == 1  # half-open
        batch = decide()(await stage(scored([0.6, 0.7])))
        assert {r["step"] for r in results(batch).values()} == {"primary"}
        assert breaker.state is BreakerState.CLOSED
        assert breaker_state(metrics, "model:switch") == 0
    finally:
        await stage.aclose()


async def test_expired_requests_are_not_held_against_the_model() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(
        "model:linear", consecutive_failures=1, clock=clock, is_failure=model_failure
    )
    stage = Predict(MicroBatcher(python_model(), max_delay=0), breaker=breaker)
    batch = await run_stage(stage, scored([0.1], [time.time() - 1]))
    assert len(batch.dead) == 1
    assert breaker.state is BreakerState.CLOSED


async def test_open_breaker_without_fallback_makes_a_stream_wait_not_drop() -> None:
    clock, switch = FakeClock(), Switch()
    breaker = CircuitBreaker(
        "model:switch", consecutive_failures=1, open_seconds=10, clock=clock,
        is_failure=model_failure,
    )  # fmt: skip
    stage = Predict(MicroBatcher(switch.model(), max_delay=0), breaker=breaker)
    await stage.start()
    try:
        switch.down = True
        task = asyncio.create_task(stage(scored([0.1, 0.2, 0.3])))
        await wait_until(lambda: breaker.state is BreakerState.OPEN, "the breaker to open")
        await asyncio.sleep(0.05)  # it keeps waiting (a hang guard would catch the opposite)
        assert not task.done()
        switch.down = False
        clock.advance(10)
        batch = decide()(await asyncio.wait_for(task, SAFETY))
    finally:
        await stage.aclose()
    assert batch.dead == []
    assert [r["score"] for r in results(batch).values()] == pytest.approx([0.1, 0.2, 0.3])
    assert breaker.state is BreakerState.CLOSED

    # A request (wait=False) is told at once instead: 503 with Retry-After.
    breaker = CircuitBreaker("model:x", consecutive_failures=1, clock=clock)
    requests = Predict(MicroBatcher(switch.model(), max_delay=0), breaker=breaker, wait=False)
    await requests.start()
    try:
        switch.down = True
        with pytest.raises(CircuitOpen):
            await requests(scored([0.1, 0.2]))
    finally:
        await requests.aclose()


# -- (4) failing sinks: retries within a budget, a breaker that pauses intake ------------


class FlakySink(RecordingSink):
    """A sink that raises ``ConnectionError`` while ``down`` (and for the first
    ``fail_writes``/``fail_flushes`` calls); a failed flush loses its buffer, as a file
    sink's does."""

    def __init__(self, *args: Any, fail_writes: int = 0, fail_flushes: int = 0, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.down = False
        self.fail_writes = fail_writes
        self.fail_flushes = fail_flushes
        self.calls = 0

    async def write(self, events: Sequence[Event]) -> None:
        self.calls += 1
        if self.down or self.fail_writes > 0:
            self.fail_writes -= 1
            raise ConnectionError(f"{self.name}: connection reset")
        await super().write(events)

    async def flush(self) -> None:
        self.calls += 1
        if self.down or self.fail_flushes > 0:
            self.fail_flushes -= 1
            self._pending = []  # what was buffered is gone
            raise ConnectionError(f"{self.name}: connection reset")
        await super().flush()


def broker_pipeline(
    broker: Broker, sink: RecordingSink, dead: RecordingSink, policy: SinkResilience, **kw: Any
) -> Pipeline:
    return Pipeline(
        BrokerSource(broker, "readings", group="g"),
        [
            Decode(Reading),
            Vectorize(["x", "y"]),
            Predict(MicroBatcher(python_model(), max_delay=0)),
            decide(),
        ],
        [sink],
        dead_letters=dead,
        sink_resilience=policy,
        **kw,
    )


def publish(broker: Broker, n: int, start: int = 0) -> None:
    broker.create_topic("readings", partitions=2)
    for i in range(start, start + n):
        broker.publish("readings", payload(i, key=f"k{i % 3}"), key=f"k{i % 3}".encode())


async def test_transient_sink_failures_are_retried_and_a_lost_buffer_written_again() -> None:
    broker = Broker()
    publish(broker, 60)
    ledger = Ledger(lambda: committed_positions(broker, "g", "readings"))
    sink = FlakySink(ledger=ledger, fail_writes=2, fail_flushes=2)
    dead = RecordingSink("dead", ledger=ledger, dead=True)
    policy = SinkResilience(backoff=0.001, max_backoff=0.002)
    pipeline = broker_pipeline(broker, sink, dead, policy, read_size=8)
    task = asyncio.create_task(pipeline.run())
    await wait_until(lambda: len(committed_positions(broker, "g", "readings")) == 60, "all acked")
    pipeline.stop()
    await asyncio.wait_for(task, SAFETY)
    assert {r["id"] for r in sink.flushed_results} == {f"e{i}" for i in range(60)}
    retries = pipeline.metrics.registry.get_sample_value(
        "rtinfer_retries_total", {"operation": "sink:recording"}
    )
    assert retries is not None
    assert retries >= 4
    assert pipeline.breakers["sink:recording"].state is BreakerState.CLOSED


async def test_a_sink_that_keeps_failing_pauses_intake_until_a_probe_succeeds() -> None:
    clock = FakeClock()
    broker = Broker()
    publish(broker, 40)
    ledger = Ledger(lambda: committed_positions(broker, "g", "readings"))
    sink = FlakySink(ledger=ledger)
    dead = RecordingSink("dead", ledger=ledger, dead=True)
    policy = SinkResilience(
        attempts=2, backoff=0.001, max_backoff=0.002, consecutive_failures=2, open_seconds=10,
        poll=0.005, clock=clock,
    )  # fmt: skip
    pipeline = broker_pipeline(broker, sink, dead, policy, read_size=4, max_in_flight=8)
    task = asyncio.create_task(pipeline.run())
    await wait_until(lambda: len(committed_positions(broker, "g", "readings")) == 40, "acked")
    sink.down = True
    publish(broker, 10, start=40)  # their results meet the outage
    breaker = pipeline.breakers["sink:recording"]
    await wait_until(lambda: breaker.state is BreakerState.OPEN, "the sink's breaker to open")
    await wait_until(lambda: pipeline.paused, "intake to pause")
    assert breaker_state(pipeline.metrics, "sink:recording") == 2
    read_when_open = pipeline.events_in
    acked_when_open = len(committed_positions(broker, "g", "readings"))
    publish(broker, 10, start=50)  # arrives during the outage: waits in the broker
    await asyncio.sleep(0.05)  # open: nothing more is read (slots are free) or acknowledged
    # At most the one read that was already waiting when the breaker opened returns.
    assert pipeline.events_in - read_when_open <= 4
    assert len(committed_positions(broker, "g", "readings")) == acked_when_open < 50

    sink.down = False
    clock.advance(10)  # half-open: the next try is the probe
    await wait_until(lambda: len(committed_positions(broker, "g", "readings")) == 60, "all acked")
    assert not pipeline.paused
    assert breaker.state is BreakerState.CLOSED
    pipeline.stop()
    await asyncio.wait_for(task, SAFETY)
    assert {r["id"] for r in sink.flushed_results} == {f"e{i}" for i in range(60)}
    assert ledger.checks > 0


async def test_retries_stay_within_the_budget_during_an_outage() -> None:
    clock = FakeClock()  # no time passes for the budget: only the 10% and its savings
    source = ListSource([payload(i) for i in range(8)])
    sink = FlakySink(fail_writes=60)
    policy = SinkResilience(
        attempts=3, backoff=0.0001, max_backoff=0.0002, consecutive_failures=1000, clock=clock
    )
    pipeline = Pipeline(
        source,
        [Decode(Reading), Vectorize(["x", "y"]), Predict(MicroBatcher(python_model())), decide()],
        [sink],
        read_size=8,
        sink_resilience=policy,
    )
    await asyncio.wait_for(pipeline.run(), SAFETY)
    retries = pipeline.metrics.registry.get_sample_value(
        "rtinfer_retries_total", {"operation": "sink:recording"}
    )
    assert retries is not None
    first_attempts = sink.calls - retries
    # Without a budget, 3 attempts a call would make 2 retries per first attempt.
    assert retries <= 10 + 0.1 * first_attempts + 1
    assert len(source.acked) == 8


async def test_a_sink_error_that_is_not_transient_still_fails_the_run_unacknowledged() -> None:
    source = ListSource([payload(i) for i in range(8)])
    pipeline = Pipeline(
        source,
        [Decode(Reading), Vectorize(["x", "y"]), Predict(MicroBatcher(python_model())), decide()],
        [RecordingSink(fail_on_write=1)],
        read_size=4,
    )
    with pytest.raises(RuntimeError, match="failed on write"):
        await asyncio.wait_for(pipeline.run(), SAFETY)
    assert source.acked == []


# -- the pipeline file ----------------------------------------------------------------------

RULES = """
import numpy as np

def high(inputs):
    n = len(inputs["features"])
    return {"probabilities": np.tile([0.05, 0.95], (n, 1))}
"""


@pytest.fixture
def rules_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    (tmp_path / "rtinfer_test_rules.py").write_text(RULES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "rtinfer_test_rules:high"
    sys.modules.pop("rtinfer_test_rules", None)


def pipeline_yaml(model_file: Path, extra: str, model_extra: str = "") -> str:
    return f"""
name: resilient
source: {{type: memory, topic: readings, group: g}}
decode: {{fields: {{id: str, key: str, x: float, y: float}}}}
stages: [{{type: vectorize, fields: [x, y]}}]
model:
  path: "{model_file}"
{model_extra}
decision: {{thresholds: {{review: 0.5, block: 0.9}}}}
sinks: [{{type: memory, topic: out}}]
{extra}
"""


async def test_a_pipeline_file_with_an_slo_and_a_fallback_chain(
    model_file: Path, rules_module: str
) -> None:
    text = pipeline_yaml(
        model_file,
        "slo: {deadline_ms: 0.001, expired: fallback}\n"
        "runtime: {priority: best_effort, sink_retry: {attempts: 2, open_s: 1}}",
        f"""  breaker: {{consecutive_failures: 3, open_s: 2}}
  fallback:
    - {{rules: "{rules_module}", name: rules}}
    - {{default: {{probabilities: [1.0, 0.0]}}}}""",
    )
    broker = Broker()
    publish(broker, 20)
    broker.end_topic("readings")
    pipeline = build_pipeline(parse_config(text), broker=broker)
    predict = next(s for s in pipeline.stages if isinstance(s, Predict))
    assert predict.expired == "fallback"
    assert predict.priority.value == "best_effort"
    assert predict.breaker is not None
    assert predict.breaker.open_seconds == 2
    assert pipeline.slo == pytest.approx(1e-6)
    assert pipeline.sink_resilience.attempts == 2
    await asyncio.wait_for(pipeline.run(), SAFETY)
    assert len(committed_positions(broker, "g", "readings")) == 20
    out = [
        msgspec.json.decode(r.value) for r in broker.consumer(["out"], "check").fetch_nowait(100)
    ]
    # Every event expired before the model ran it (a 1 µs SLO): the rules answered, late.
    assert sorted(r["id"] for r in out) == sorted(f"e{i}" for i in range(20))
    assert {(r["step"], r["late"], r["decision"]) for r in out} == {("rules", True, "block")}


def test_the_resilience_keys_are_checked(model_file: Path) -> None:
    def error(extra: str, model_extra: str = "") -> str:
        with pytest.raises(ConfigError) as info:
            build_pipeline(parse_config(pipeline_yaml(model_file, extra, model_extra)))
        return str(info.value)

    assert "slo.expired" in error("slo: {expired: fallback}")
    assert "use one of dead_letter, fallback, late" in error("slo: {expired: later}")
    assert "'slo': deadline_ms must be more than 0" in error("slo: {deadline_ms: 0}")
    assert "shed needs deadline_ms" in error("slo: {shed: true}")
    shedding = build_pipeline(
        parse_config(pipeline_yaml(model_file, "slo: {deadline_ms: 50, shed: true}"))
    )
    assert shedding.shed_expired
    assert not shedding.shed_ranges
    assert "shed_by: range needs shed: true" in error("slo: {deadline_ms: 50, shed_by: range}")
    assert "use one of event, range" in error("slo: {deadline_ms: 50, shed_by: key}")
    ranges = "slo: {deadline_ms: 50, shed: true, shed_by: range}"
    assert build_pipeline(parse_config(pipeline_yaml(model_file, ranges))).shed_ranges
    on_a_file = pipeline_yaml(model_file, ranges).replace(
        "{type: memory, topic: readings, group: g}", "{type: file, path: readings.jsonl}"
    )
    with pytest.raises(ConfigError, match=r"file://readings\.jsonl cannot: use shed_by: event"):
        build_pipeline(parse_config(on_a_file))
    pytest.importorskip("confluent_kafka")
    counting = pipeline_yaml(model_file, ranges).replace(
        "{type: memory, topic: readings, group: g}",
        "{type: kafka, bootstrap_servers: 127.0.0.1:9, topics: readings, max_deliveries: 3}",
    )
    with pytest.raises(ConfigError, match="cannot go with the Kafka source's max_deliveries"):
        build_pipeline(parse_config(counting))
    assert "runtime.priority" in error("runtime: {priority: urgent}")
    assert "'runtime.sink_retry': budget must" in error("runtime: {sink_retry: {budget: 2}}")
    assert "'model.breaker': open_s must" in error("", "  breaker: {open_s: 0}")
    message = error("", "  fallback: [{rules: 'a:b', default: {probabilities: [1, 0]}}]")
    assert "model.fallback.0" in message
    assert "exactly one of" in message
    message = error("", "  fallback: [{default: {score: [1]}}]")
    assert "model.fallback.0.default" in message
    assert "probabilities" in message
    with pytest.raises(ModelLoadError, match=r"check model\.fallback\.0\.path"):
        build_pipeline(parse_config(pipeline_yaml(model_file, "", "  fallback: [{path: x.onnx}]")))
    message = error(
        "",
        "  fallback: [{default: {probabilities: [1, 0]}},"
        " {rules: 'rtinfer.config:interpolate', name: default}]",
    )
    assert "model.fallback" in message
    assert "same name" in message
