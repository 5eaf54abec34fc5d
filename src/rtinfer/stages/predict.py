"""The model stage: a batch's inputs through the model's shared micro-batcher.

What the stage does, in the order it can happen to a batch:

1. rows holding NaN or infinity are dead-lettered (unless ``allow_nan``);
2. the batch goes to the model (the *primary*), through the model's limiter (when the
   batcher is shared with a server: ``priority`` picks the traffic class) and circuit
   breaker (when given), with the earliest deadline of its events;
3. when that fails, each event gets the best answer still possible:

   - **deadline passed** (the micro-batcher never runs an expired request): the events
     whose deadline passed follow the ``expired`` policy: ``"dead_letter"`` (the
     default), ``"fallback"`` (the fallback chain answers: its model steps refuse a
     passed deadline, its rules or default answer) or ``"late"`` (the model answers
     anyway, without a deadline); the others are sent to the model again;
   - **breaker open**: the fallback chain answers; without one a stream waits for the
     breaker to let a probe through (backpressure: nothing is dropped), and a request
     (``wait=False``) gets :class:`~rtinfer.exceptions.CircuitOpen` (503);
   - **the model failed**: each event is sent alone, so only the events the model
     cannot handle fail; one that fails alone gets the fallback chain's answer, or is
     dead-lettered without a chain;
   - **bad inputs**: dead-lettered (every step would refuse them alike).

Events that passed their deadline and were answered anyway are flagged in
``batch.late``; with a fallback chain, ``batch.steps`` says which step answered each
event (``"primary"`` for the model). :class:`~rtinfer.stages.Decide` and
:class:`~rtinfer.stages.Outputs` put both in the result (``"step"``, ``"late": true``).
The fast path (the model answers the batch) costs what it did before any of this.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from ..batching import MicroBatcher
from ..exceptions import (
    CircuitOpen,
    Closed,
    ConfigError,
    DeadlineExceeded,
    FallbackExhausted,
    ModelError,
    ModelInputError,
    Overloaded,
)
from ..observability.metrics import Metrics
from ..resilience.breaker import CircuitBreaker
from ..resilience.fallback import FallbackChain, Step
from ..resilience.limiter import AdaptiveLimiter, Priority
from ..types import Arrays, Batch, Event

__all__ = ["PRIMARY", "Expired", "Predict", "model_failure"]

#: The step name of the pipeline's own model in results (``"step": "primary"``).
PRIMARY = "primary"

#: What happens to an event whose deadline passed before the model ran it.
Expired = Literal["dead_letter", "fallback", "late"]

#: Seconds between two looks at an open breaker while a stream waits for it (it lets a
#: probe through after ``open_seconds``; the breaker's clock, not ours, decides when).
OPEN_POLL = 0.05

_Call = Callable[[Arrays, "float | None"], Awaitable[Arrays]]


def model_failure(exc: BaseException) -> bool:
    """The ``is_failure`` of a model's breaker, on a stream as behind a server: the model
    itself failing. Not the caller's mistakes (bad inputs, spent quotas), not load (a
    full queue, an open breaker, a closing batcher) and not deadlines (a request refused
    for its deadline was never run, and one that arrives late says nothing of the model:
    latency is the limiter's business; a slow model is caught by ``slow_call_seconds``)."""
    return isinstance(exc, Exception) and not isinstance(
        exc, ModelInputError | Overloaded | DeadlineExceeded | TimeoutError | Closed
    )


class Predict:
    """Run the batch's inputs through a model's shared micro-batcher (see the module doc).

    - ``allow_nan``: pass NaN and infinity to the model instead of dead-lettering;
      ``column_names`` (per input) make that message name the column;
    - ``wait``: when the batcher is full, wait for room (streams: backpressure) or fail
      at once with :class:`~rtinfer.exceptions.Overloaded` (requests: 503). Overloaded
      and Closed are the caller's to handle; they never dead-letter an event;
    - ``fallback``: the steps tried, in order, when the model cannot answer: a
      :class:`~rtinfer.resilience.Step`, or a :class:`MicroBatcher` (a lighter model,
      started and closed with this stage; it never waits for room, so a full queue moves
      on to the next step). Every step must answer with the model's outputs named in
      ``required_outputs`` (default: all of them); they are cast to the model's dtypes;
    - ``breaker``: a circuit breaker around the model call (use ``is_failure=``
      :func:`model_failure` so a passed deadline is not held against the model);
    - ``expired``: ``"dead_letter"``, ``"fallback"`` (needs ``fallback``) or ``"late"``;
    - ``limiter`` and ``priority``: admission to a model shared with a server (critical
      traffic is admitted before best-effort traffic is).
    """

    def __init__(
        self,
        batcher: MicroBatcher,
        *,
        allow_nan: bool = False,
        column_names: Mapping[str, Sequence[str]] | None = None,
        wait: bool = True,
        fallback: Sequence[Step | MicroBatcher] = (),
        breaker: CircuitBreaker | None = None,
        expired: Expired = "dead_letter",
        required_outputs: Sequence[str] | None = None,
        limiter: AdaptiveLimiter | None = None,
        priority: Priority = Priority.CRITICAL,
        metrics: Metrics | None = None,
    ) -> None:
        if expired not in get_args(Expired):
            raise ValueError(
                f"expired must be one of {', '.join(get_args(Expired))}, got {expired!r}"
            )
        if expired == "fallback" and not fallback:
            raise ConfigError(
                "expired: fallback gives late events the fallback chain's answer, but the "
                "model has no fallback steps; add some (model.fallback) or choose "
                "dead_letter or late",
                key="slo.expired",
            )
        self.name = "model"
        self.batcher = batcher
        self.wait = wait
        self.allow_nan = allow_nan
        self.column_names = {k: list(v) for k, v in (column_names or {}).items()}
        self.breaker = breaker
        self.expired: Expired = expired
        self.required_outputs = list(required_outputs) if required_outputs is not None else None
        self.limiter = limiter
        self.priority = priority
        self.metrics = metrics or batcher.metrics
        self.fallback = list(fallback)
        self._fallback_batchers = [f for f in self.fallback if isinstance(f, MicroBatcher)]
        steps = [
            self._conforming(Step.model(f, wait=False) if isinstance(f, MicroBatcher) else f)
            for f in self.fallback
        ]
        if any(s.name == PRIMARY for s in steps):
            raise ValueError(f"a fallback step cannot be named {PRIMARY!r}: that is the model")
        self.chain = (
            FallbackChain(batcher.model.name, steps, metrics=self.metrics) if steps else None
        )
        self._m_primary = (
            self.metrics.fallback_outputs.labels(batcher.model.name, PRIMARY)
            if self.chain is not None
            else None
        )
        self._call = self._build_call()

    def _build_call(self) -> _Call:
        """The model call, wrapped once in what is configured (nothing costs when absent)."""
        submit = self.batcher.submit
        wait = self.wait

        async def call(inputs: Arrays, deadline: float | None) -> Arrays:
            return await submit(inputs, deadline=deadline, wait=wait)

        if self.breaker is not None:
            breaker, plain = self.breaker, call

            async def call(inputs: Arrays, deadline: float | None) -> Arrays:
                with breaker.guard():
                    return await plain(inputs, deadline)

        if self.limiter is not None:
            limiter, priority, guarded = self.limiter, self.priority, call

            async def call(inputs: Arrays, deadline: float | None) -> Arrays:
                async with limiter.admit(priority, wait=wait):
                    return await guarded(inputs, deadline)

        return call

    def admit_by(self, limiter: AdaptiveLimiter | None) -> None:
        """From now on, admit this stage's model calls through ``limiter`` with its
        :attr:`priority` (``None``: none), waiting for room when :attr:`wait`: a pipeline
        served beside requests shares their limiter (:class:`~rtinfer.scoring.PipelineScorer`)."""
        self.limiter = limiter
        self._call = self._build_call()

    def for_requests(self) -> Predict:
        """The same model, chain, breaker and limiter for requests: fails fast when full."""
        return Predict(
            self.batcher,
            allow_nan=self.allow_nan,
            column_names=self.column_names,
            wait=False,
            fallback=self.fallback,
            breaker=self.breaker,
            expired=self.expired,
            required_outputs=self.required_outputs,
            limiter=self.limiter,
            priority=self.priority,
            metrics=self.metrics,
        )

    async def start(self) -> None:
        await self.batcher.start()
        for batcher in self._fallback_batchers:
            await batcher.start()

    async def aclose(self) -> None:
        for batcher in reversed(self._fallback_batchers):
            await batcher.aclose()
        await self.batcher.aclose()

    async def __call__(self, batch: Batch) -> Batch:
        if not batch.events:
            return batch
        if batch.inputs is None:
            raise ConfigError(
                "no stage before the model built its inputs; add a vectorize stage or a "
                "stage that sets batch.inputs"
            )
        if not self.allow_nan:
            self._drop_non_finite(batch)
            if not batch.events:
                return batch
        try:
            outputs = await self._call(batch.inputs, batch.deadline())
        except Exception as exc:
            await _Recovery(self, batch).run(exc)
            return batch
        batch.outputs = outputs
        batch.model_version = self.batcher.model.version
        if self._m_primary is not None:
            batch.steps = PRIMARY
            self._m_primary.inc(len(batch))
        return batch

    # -- fallback steps ---------------------------------------------------------

    def _conforming(self, step: Step) -> Step:
        """``step``, its answers checked against and cast to the model's outputs, so that
        the stages after the model read every step's answer alike."""
        run, name = step.run, step.name

        async def conformed(inputs: Arrays, deadline: float | None) -> Arrays:
            return self._conform(name, await run(inputs, deadline))

        return Step(name, conformed, breaker=step.breaker)

    def _conform(self, step: str, outputs: Any) -> Arrays:
        if not isinstance(outputs, dict):
            raise ModelError(
                f"fallback step {step!r} returned {type(outputs).__name__}; return a dict of "
                "numpy arrays named like the model's outputs"
            )
        specs = {s.name: s for s in self.batcher.model.outputs}
        names = self.required_outputs if self.required_outputs is not None else list(specs)
        conformed: Arrays = {}
        for name in names:
            if name not in outputs:
                raise ModelError(
                    f"fallback step {step!r} gave outputs {sorted(outputs)}, without "
                    f"{name!r}; every step must answer with the model's output {name!r}"
                )
            array = np.asarray(outputs[name])
            spec = specs.get(name)
            if spec is not None:
                try:
                    array = array.astype(spec.dtype, copy=False)
                except (TypeError, ValueError) as exc:
                    raise ModelError(
                        f"fallback step {step!r} output {name!r} is not {spec.dtype}: {exc}"
                    ) from None
                want = spec.shape[1:]
                if len(array.shape) != len(spec.shape) or any(
                    w is not None and w != got for w, got in zip(want, array.shape[1:], strict=True)
                ):
                    raise ModelError(
                        f"fallback step {step!r} output {name!r} has shape {list(array.shape)}; "
                        f"the model's is {spec.describe_shape()}"
                    )
            conformed[name] = array
        return conformed

    # -- NaN and infinity -------------------------------------------------------

    def _drop_non_finite(self, batch: Batch) -> None:
        assert batch.inputs is not None
        bad_mask: np.ndarray[Any, Any] | None = None
        for array in batch.inputs.values():
            if array.dtype.kind != "f":
                continue
            flat = array.reshape(array.shape[0], -1)
            row_bad = np.asarray(~np.isfinite(flat).all(axis=1))
            bad_mask = row_bad if bad_mask is None else bad_mask | row_bad
        if bad_mask is None or not bad_mask.any():
            return
        rows = np.flatnonzero(bad_mask).tolist()
        batch.drop(rows, self.name, [self._nan_reason(batch, r) for r in rows])

    def _nan_reason(self, batch: Batch, row: int) -> str:
        assert batch.inputs is not None
        for name, array in batch.inputs.items():
            if array.dtype.kind != "f":
                continue
            values = array[row].reshape(-1)
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                col = int(bad[0])
                names = self.column_names.get(name)
                label = f"{names[col]!r}" if names and col < len(names) else f"column {col}"
                return (
                    f"model input {name!r} {label} is {values[col]}; NaN and infinity are not "
                    f"allowed (set allow_nan to pass them to the model)"
                )
        return "NaN or infinity in the model input"


class _Recovery:
    """The slow path of one batch whose model call failed: finds each event an answer
    (a part: rows, outputs, step) or a dead letter, then puts the batch back together."""

    __slots__ = ("batch", "dead", "events", "inputs", "late", "parts", "stage")

    def __init__(self, stage: Predict, batch: Batch) -> None:
        assert batch.inputs is not None
        self.stage = stage
        self.batch = batch
        self.events: list[Event] = batch.events
        self.inputs: Arrays = batch.inputs
        self.parts: list[tuple[list[int], Arrays, str]] = []
        self.dead: dict[int, str] = {}
        self.late: set[int] = set()

    async def run(self, exc: Exception) -> None:
        await self._handle(list(range(len(self.events))), exc)
        self._apply()

    def _rows(self, rows: list[int]) -> Arrays:
        if len(rows) == len(self.events):
            return self.inputs
        index = np.asarray(rows, dtype=np.intp)
        return {k: v[index] for k, v in self.inputs.items()}

    def _deadline(self, rows: list[int]) -> float | None:
        events = self.events
        deadlines = [d for i in rows if (d := events[i].deadline) is not None]
        return min(deadlines) if deadlines else None

    async def _attempt(self, rows: list[int], deadline: float | None) -> None:
        """The model on ``rows``; whatever goes wrong is handled row by row."""
        stage = self.stage
        while True:
            try:
                outputs = await stage._call(self._rows(rows), deadline)
            except CircuitOpen as exc:
                if stage.chain is not None or not stage.wait:
                    await self._handle(rows, exc)
                    return
                # No fallback: wait for the breaker to let a probe through. The batch
                # holds its slot meanwhile, so the pipeline stops reading: nothing dropped.
                await asyncio.sleep(min(exc.retry_after, OPEN_POLL))
                continue
            except Exception as exc:
                await self._handle(rows, exc)
                return
            self.parts.append((rows, outputs, PRIMARY))
            return

    async def _handle(self, rows: list[int], exc: Exception) -> None:
        stage = self.stage
        if isinstance(exc, CircuitOpen):
            if stage.chain is not None:
                await self._rescue(rows, self._deadline(rows))
            elif stage.wait:
                await self._attempt(rows, self._deadline(rows))
            else:
                raise exc
        elif isinstance(exc, Overloaded | Closed):
            raise exc
        elif isinstance(exc, ModelInputError):
            self._kill(rows, str(exc))
        elif isinstance(exc, DeadlineExceeded):
            await self._expired(rows, exc)
        elif len(rows) == 1:  # it ran alone: this event is what the model refuses
            if stage.chain is not None:
                await self._rescue(rows, self._deadline(rows))
            else:
                self._kill(rows, f"model failed on this event: {exc}")
        else:
            await asyncio.gather(*(self._attempt([i], self._deadline([i])) for i in rows))

    async def _expired(self, rows: list[int], exc: DeadlineExceeded) -> None:
        now = time.time()
        events = self.events
        expired = [i for i in rows if (d := events[i].deadline) is not None and d <= now]
        expired = expired or rows  # the batcher judged by the earliest deadline
        gone = set(expired)
        fresh = [i for i in rows if i not in gone]
        policy = self.stage.expired
        if policy == "dead_letter":
            for i in expired:
                deadline = events[i].deadline
                late_ms = 1e3 * (now - deadline) if deadline is not None else 0.0
                self.dead[i] = (
                    f"deadline passed {late_ms:.1f} ms before the model could run this "
                    f"event ({exc})"
                )
        else:
            self.late.update(expired)
        work = []
        if policy == "fallback":
            work.append(self._rescue(expired, self._deadline(expired)))
        elif policy == "late":  # the model answers anyway, behind every request with a deadline
            work.append(self._attempt(expired, None))
        if fresh:
            work.append(self._attempt(fresh, self._deadline(fresh)))
        await asyncio.gather(*work)

    async def _rescue(self, rows: list[int], deadline: float | None) -> None:
        chain = self.stage.chain
        assert chain is not None
        try:
            answer = await chain.predict(self._rows(rows), deadline=deadline)
        except (ModelInputError, FallbackExhausted) as exc:
            self._kill(rows, str(exc))
            return
        self.parts.append((rows, answer.outputs, answer.step))

    def _kill(self, rows: list[int], reason: str) -> None:
        for i in rows:
            self.dead[i] = reason

    def _apply(self) -> None:
        """Set the batch's outputs, steps and late rows, then drop the dead."""
        batch, stage = self.batch, self.stage
        n = len(self.events)
        parts = self.parts
        if parts:
            keys = set(parts[0][1])
            for _, outputs, _ in parts[1:]:
                keys &= set(outputs)
            first = parts[0][1]
            full: Arrays = {
                k: np.zeros((n, *first[k].shape[1:]), dtype=first[k].dtype)
                for k in first
                if k in keys
            }
            steps = [PRIMARY] * n
            for rows, outputs, step in parts:
                index = np.asarray(rows, dtype=np.intp)
                for k, array in full.items():
                    array[index] = outputs[k]
                if step != PRIMARY:
                    for i in rows:
                        steps[i] = step
                elif stage._m_primary is not None:
                    stage._m_primary.inc(len(rows))
            batch.outputs = full
            batch.model_version = stage.batcher.model.version
            if stage.chain is not None:
                batch.steps = steps
        if self.late:
            late: npt.NDArray[np.bool_] = np.zeros(n, dtype=bool)
            late[list(self.late)] = True
            batch.late = late
        if self.dead:
            rows = sorted(self.dead)
            batch.drop(rows, stage.name, [self.dead[i] for i in rows])
