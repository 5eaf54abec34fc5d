"""Fallback chains: when the model cannot answer, a lighter one, rules, or a default does.

A :class:`FallbackChain` tries its steps in order — for example the primary model, a
lighter model, hand-written rules, a default decision — and returns the first answer,
tagged with the step that produced it, so every output says where it came from::

    chain = FallbackChain("fraud", [
        Step.model(primary, breaker=CircuitBreaker("model:fraud")),
        Step.model(light),
        Step.rules("rules", lambda x: {"probabilities": amount_rule(x["features"])}),
        Step.default("default", {"probabilities": [1.0, 0.0]}),
    ])
    answer = await chain.predict(inputs, deadline=deadline)
    answer.outputs, answer.step        # e.g. ({...}, "rules")

A step fails when it raises (a model error, an open breaker, a full queue, a passed
deadline) or returns outputs without one row per input row; the chain then moves on.
Only a caller's own mistake (:class:`~rtinfer.exceptions.ModelInputError`) is raised at
once, since every step would refuse the same input. A model step given the call's
deadline refuses once it has passed, so an expired event still gets the rules' or the
default's decision: the "fallback decision" for late events. When every step failed,
:class:`~rtinfer.exceptions.FallbackExhausted` carries each step's error.

Answers are counted per step in ``rtinfer_fallback_outputs_total{chain,step}`` (rows)
and failures in ``rtinfer_fallback_failures_total{chain,step}``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import numpy.typing as npt

from ..exceptions import FallbackExhausted, ModelError, ModelInputError
from ..models.base import rows_of
from ..observability.metrics import Metrics
from ..types import Arrays
from .breaker import CircuitBreaker

if TYPE_CHECKING:
    from ..batching import MicroBatcher

__all__ = ["Answer", "FallbackChain", "Step", "StepFn"]

#: What a step runs: ``(inputs, deadline) -> outputs``; ``deadline`` is a ``time.time()``
#: instant or ``None``.
StepFn = Callable[[Arrays, "float | None"], Awaitable[Arrays]]


class Answer(NamedTuple):
    """A chain's answer: the ``outputs``, the ``step`` that produced them, and the
    ``errors`` (step name, exception) of the steps that failed before it."""

    outputs: Arrays
    step: str
    errors: tuple[tuple[str, BaseException], ...]


def raises_at_once(exc: BaseException) -> bool:
    """The default ``stop_on``: bad inputs, which every step would refuse alike."""
    return isinstance(exc, ModelInputError)


class Step:
    """One step of a chain: a ``name`` (what outputs are tagged with) and what it runs.

    ``breaker``, if given, guards the step: while it is open the step is skipped at
    once. Build steps with :meth:`model`, :meth:`rules` and :meth:`default`, or give
    any async ``run(inputs, deadline)``.
    """

    __slots__ = ("breaker", "name", "run")

    def __init__(self, name: str, run: StepFn, *, breaker: CircuitBreaker | None = None) -> None:
        self.name = name
        self.run = run
        self.breaker = breaker

    @classmethod
    def model(
        cls,
        batcher: MicroBatcher,
        *,
        name: str | None = None,
        wait: bool = False,
        breaker: CircuitBreaker | None = None,
    ) -> Step:
        """A model, through its micro-batcher (named ``model:<name>`` unless ``name``).

        ``wait=False`` (requests) fails at once when its queue is full, so the chain
        moves on instead of queueing behind an overloaded model.
        """

        async def run(inputs: Arrays, deadline: float | None) -> Arrays:
            return await batcher.submit(inputs, deadline=deadline, wait=wait)

        return cls(name or f"model:{batcher.model.name}", run, breaker=breaker)

    @classmethod
    def rules(cls, name: str, fn: Callable[[Arrays], Arrays]) -> Step:
        """Vectorised Python rules, ``fn(inputs) -> outputs``, run on the event loop.

        Keep them cheap (numpy over the batch); anything slow belongs in a model.
        """

        async def run(inputs: Arrays, deadline: float | None) -> Arrays:
            return fn(inputs)

        return cls(name, run)

    @classmethod
    def default(cls, name: str, outputs: Mapping[str, npt.ArrayLike]) -> Step:
        """The same decision for every row: ``{"probabilities": [1.0, 0.0]}`` is one row.

        It never fails, so it belongs last.
        """
        rows = {key: np.asarray(value) for key, value in outputs.items()}
        if not rows:
            raise ValueError(f"default step {name!r} needs at least one output")

        async def run(inputs: Arrays, deadline: float | None) -> Arrays:
            n = rows_of(inputs)
            return {k: np.repeat(v[np.newaxis], n, axis=0) for k, v in rows.items()}

        return cls(name, run)

    def __repr__(self) -> str:
        return f"<Step {self.name!r}>"


class FallbackChain:
    """Tries ``steps`` in order and returns the first answer (see the module's docstring).

    ``stop_on`` says which errors are raised at once instead of falling back (default:
    bad inputs).
    """

    def __init__(
        self,
        name: str,
        steps: Sequence[Step],
        *,
        stop_on: Callable[[BaseException], bool] = raises_at_once,
        metrics: Metrics | None = None,
    ) -> None:
        if not steps:
            raise ValueError(f"fallback chain {name!r} needs at least one step")
        names = [s.name for s in steps]
        if len(set(names)) != len(names):
            raise ValueError(
                f"fallback chain {name!r} has steps with the same name ({names}); every "
                "output is tagged with its step's name, so give each step its own"
            )
        self.name = name
        self.steps = list(steps)
        self.stop_on = stop_on
        self.metrics = metrics or Metrics()
        self._m_outputs = {
            s.name: self.metrics.fallback_outputs.labels(name, s.name) for s in steps
        }
        self._m_failures = {
            s.name: self.metrics.fallback_failures.labels(name, s.name) for s in steps
        }

    async def predict(self, inputs: Arrays, *, deadline: float | None = None) -> Answer:
        """The first step's answer that succeeds, tagged with that step's name."""
        rows = rows_of(inputs)
        errors: list[tuple[str, BaseException]] = []
        for step in self.steps:
            try:
                if step.breaker is not None:
                    with step.breaker.guard():
                        outputs = _checked(step, await step.run(inputs, deadline), rows)
                else:
                    outputs = _checked(step, await step.run(inputs, deadline), rows)
            except Exception as exc:
                if self.stop_on(exc):
                    raise
                errors.append((step.name, exc))
                self._m_failures[step.name].inc()
                continue
            self._m_outputs[step.name].inc(rows)
            return Answer(outputs, step.name, tuple(errors))
        summary = "; ".join(f"{n}: {type(e).__name__}: {e}" for n, e in errors)
        raise FallbackExhausted(
            f"every step of fallback chain {self.name!r} failed ({summary}); add a default "
            "step (Step.default) to always answer",
            errors=errors,
        )

    def __repr__(self) -> str:
        return f"<FallbackChain {self.name!r} steps={[s.name for s in self.steps]}>"


def _checked(step: Step, outputs: Any, rows: int) -> Arrays:
    if not isinstance(outputs, dict) or not outputs:
        raise ModelError(
            f"fallback step {step.name!r} returned {type(outputs).__name__}; return a dict "
            "of numpy arrays, one row per input row"
        )
    for key, array in outputs.items():
        if not isinstance(array, np.ndarray) or array.shape[:1] != (rows,):
            got = getattr(array, "shape", type(array).__name__)
            raise ModelError(
                f"fallback step {step.name!r} output {key!r} has shape {got} for {rows} "
                "rows; every output needs one row per input row"
            )
    return outputs
