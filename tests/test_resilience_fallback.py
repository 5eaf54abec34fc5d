"""Fallback chains: primary model, lighter model, rules, default; each answer names its step.

The models are real Python models behind real micro-batchers, failing or held at a gate
on the test's command.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest

from rtinfer.batching import MicroBatcher
from rtinfer.exceptions import (
    CircuitOpen,
    DeadlineExceeded,
    FallbackExhausted,
    ModelError,
    ModelInputError,
)
from rtinfer.models import PythonModel
from rtinfer.observability.metrics import Metrics
from rtinfer.resilience import CircuitBreaker, FallbackChain, Step
from rtinfer.types import Arrays
from test_resilience_breaker import FakeClock

SAFETY = 10.0  # seconds: a safety net against a hang, never a timing assertion


class Boom(Exception):
    """The failure the tests inject."""


class Scorer:
    """``p = x * weight``; fails while ``broken``; waits at ``gate`` while it is clear."""

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.broken = False
        self.calls = 0
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, inputs: Arrays) -> Arrays:
        self.calls += 1
        if not self.gate.wait(SAFETY):
            raise TimeoutError("the test never opened the gate")
        if self.broken:
            raise Boom(f"model with weight {self.weight} is down")
        return {"p": inputs["x"] * self.weight}


@asynccontextmanager
async def serving(scorer: Scorer, name: str) -> AsyncIterator[MicroBatcher]:
    model = PythonModel(scorer, inputs={"x": ("float32", [None, 1])}, name=name)
    batcher = MicroBatcher(model, max_delay=0.0)
    await asyncio.wait_for(batcher.start(), SAFETY)
    scorer.calls = 0
    try:
        yield batcher
    finally:
        scorer.gate.set()
        await asyncio.wait_for(batcher.aclose(), SAFETY)


def rows(*xs: float) -> Arrays:
    return {"x": np.asarray([[x] for x in xs], dtype=np.float32)}


def rules(inputs: Arrays) -> Arrays:
    return {"p": np.where(inputs["x"] > 1, 1.0, 0.0).astype(np.float32)}


def count(metrics: Metrics, name: str, step: str) -> float:
    value = metrics.registry.get_sample_value(name, {"chain": "fraud", "step": step})
    return 0.0 if value is None else value


@asynccontextmanager
async def chain_of_four(
    **breakers: CircuitBreaker,
) -> AsyncIterator[tuple[FallbackChain, Scorer, Scorer]]:
    primary, light = Scorer(10.0), Scorer(2.0)
    async with serving(primary, "primary") as p, serving(light, "light") as lt:
        chain = FallbackChain(
            "fraud",
            [
                Step.model(p, breaker=breakers.get("primary")),
                Step.model(lt),
                Step.rules("rules", rules),
                Step.default("default", {"p": [0.5]}),
            ],
            metrics=Metrics(),
        )
        yield chain, primary, light


async def test_the_primary_answers_when_it_can() -> None:
    async with chain_of_four() as (chain, _, light):
        answer = await chain.predict(rows(1, 2))
    assert answer.step == "model:primary"
    assert answer.outputs["p"].tolist() == [[10.0], [20.0]]
    assert answer.errors == ()
    assert light.calls == 0
    assert count(chain.metrics, "rtinfer_fallback_outputs_total", "model:primary") == 2


async def test_each_failure_moves_to_the_next_step_and_the_answer_says_which() -> None:
    async with chain_of_four() as (chain, primary, light):
        primary.broken = True
        answer = await chain.predict(rows(1, 2))
        assert answer.step == "model:light"
        assert answer.outputs["p"].tolist() == [[2.0], [4.0]]
        assert [(name, type(e)) for name, e in answer.errors] == [("model:primary", Boom)]
        light.broken = True
        answer = await chain.predict(rows(1, 2))
        assert answer.step == "rules"
        assert answer.outputs["p"].tolist() == [[0.0], [1.0]]
    metrics = chain.metrics
    assert count(metrics, "rtinfer_fallback_failures_total", "model:primary") == 2
    assert count(metrics, "rtinfer_fallback_failures_total", "model:light") == 1
    assert count(metrics, "rtinfer_fallback_outputs_total", "rules") == 2


async def test_the_default_answers_every_row_when_all_else_fails() -> None:
    primary = Scorer(10.0)
    async with serving(primary, "primary") as p:
        primary.broken = True

        def broken_rules(inputs: Arrays) -> Arrays:
            raise KeyError("a rule's lookup table is missing")

        chain = FallbackChain(
            "fraud",
            [
                Step.model(p),
                Step.rules("rules", broken_rules),
                Step.default("default", {"p": [0.5]}),
            ],
            metrics=Metrics(),
        )
        answer = await chain.predict(rows(1, 2, 3))
    assert answer.step == "default"
    assert answer.outputs["p"].tolist() == [[0.5], [0.5], [0.5]]
    assert [name for name, _ in answer.errors] == ["model:primary", "rules"]


async def test_an_open_breaker_skips_its_model_without_calling_it() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(
        "model:primary", consecutive_failures=1, open_seconds=10, clock=clock, metrics=Metrics()
    )
    async with chain_of_four(primary=breaker) as (chain, primary, _):
        primary.broken = True
        assert (await chain.predict(rows(1))).step == "model:light"
        assert primary.calls == 1
        answer = await chain.predict(rows(1))
        assert answer.step == "model:light"
        assert isinstance(answer.errors[0][1], CircuitOpen)
        assert primary.calls == 1  # skipped at once
        primary.broken = False
        clock.advance(10)
        assert (await chain.predict(rows(1))).step == "model:primary"


async def test_an_expired_event_gets_the_fallback_decision() -> None:
    async with chain_of_four() as (chain, primary, light):
        answer = await chain.predict(rows(3), deadline=time.time() - 1)
        assert answer.step == "rules"
        assert {type(e) for _, e in answer.errors} == {DeadlineExceeded}
        assert primary.calls == light.calls == 0  # no model ran an expired request


async def test_a_slow_model_past_the_deadline_falls_back_to_rules() -> None:
    async with chain_of_four() as (chain, primary, light):
        primary.gate.clear()
        light.gate.clear()

        # Both models are busy with earlier work, held at their gates.
        async def occupy(step: Step) -> Arrays:
            return await step.run(rows(0), None)

        busy = [asyncio.create_task(occupy(step)) for step in chain.steps[:2]]
        while primary.calls == 0 or light.calls == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        answer = await asyncio.wait_for(chain.predict(rows(3), deadline=time.time() + 0.02), SAFETY)
        assert answer.step == "rules"
        assert answer.outputs["p"].tolist() == [[1.0]]
        primary.gate.set()
        light.gate.set()
        await asyncio.wait_for(asyncio.gather(*busy), SAFETY)
        assert primary.calls == light.calls == 1  # the late request never ran


async def test_bad_inputs_are_raised_at_once() -> None:
    async with chain_of_four() as (chain, _, light):
        with pytest.raises(ModelInputError):
            await chain.predict({"x": np.zeros((1, 3), dtype=np.float32)})
        assert light.calls == 0


async def test_a_step_answering_the_wrong_rows_counts_as_failed() -> None:
    def short(inputs: Arrays) -> Arrays:
        return {"p": inputs["x"][:1]}

    not_arrays: Any = lambda inputs: [1]  # noqa: E731  # a wrong answer, on purpose
    chain = FallbackChain(
        "fraud",
        [Step.rules("short", short), Step.rules("not arrays", not_arrays), Step.rules("ok", rules)],
        metrics=Metrics(),
    )
    answer = await chain.predict(rows(1, 2))
    assert answer.step == "ok"
    assert [type(e) for _, e in answer.errors] == [ModelError, ModelError]
    assert "one row per input row" in str(answer.errors[0][1])


async def test_when_every_step_fails_each_error_is_kept() -> None:
    def broken(inputs: Arrays) -> Arrays:
        raise Boom("rules down")

    chain = FallbackChain("fraud", [Step.rules("a", broken), Step.rules("b", broken)])
    with pytest.raises(FallbackExhausted, match=r"fraud.*a: Boom.*b: Boom.*Step.default") as info:
        await chain.predict(rows(1))
    assert [name for name, _ in info.value.errors] == ["a", "b"]


def test_a_chain_needs_steps_with_distinct_names() -> None:
    with pytest.raises(ValueError, match="needs at least one step"):
        FallbackChain("fraud", [])
    with pytest.raises(ValueError, match="same name"):
        FallbackChain("fraud", [Step.rules("a", rules), Step.rules("a", rules)])
    with pytest.raises(ValueError, match="needs at least one output"):
        Step.default("default", {})
