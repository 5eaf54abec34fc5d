"""The built-in pipeline stages, and how stages are composed into one handler.

A stage is a callable taking a :class:`~rtinfer.types.Batch` and returning it,
plain or ``async``; :func:`compose` decides which once, at start-up, and folds
every stage into one :data:`~rtinfer.types.Handler`. A stage may have
``start()`` and ``aclose()`` coroutines, which the pipeline calls around the
run, and a ``name`` used in metrics and dead letters.

Stages run in source order up to the first one that waits (the model): put
stages that keep state (per-key features) before it.

The built-ins, in pipeline order:

- :class:`Decode`: bytes to a validated ``msgspec.Struct`` (or a dict), per event,
  so one bad payload is dead-lettered alone;
- :class:`Vectorize`: named fields of the decoded events to a model input array;
- :class:`Predict`: the model, through its shared micro-batcher; rows with
  NaN or infinity are dead-lettered unless allowed; a fallback chain, a circuit
  breaker and a policy for expired events say what answers when the model cannot;
- :class:`Decide`: a score to a decision by thresholds, as the result record;
- :class:`Outputs`: the model's outputs as the result record, when there is no decision.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Sequence

from ..observability.metrics import Metrics
from ..types import Batch, Handler
from .decide import Decide, Outputs
from .decode import Decode, Undeliverable
from .predict import Predict
from .vectorize import Vectorize

__all__ = [
    "Decide",
    "Decode",
    "Outputs",
    "Predict",
    "Stage",
    "Undeliverable",
    "Vectorize",
    "compose",
    "stage_name",
]

Stage = Callable[[Batch], "Batch | Awaitable[Batch]"]


def stage_name(stage: object) -> str:
    """The name a stage goes by in metrics and dead letters."""
    name = getattr(stage, "name", None)
    if isinstance(name, str):
        return name
    return getattr(stage, "__name__", type(stage).__name__)


def _as_handler(stage: Stage) -> Handler:
    call = stage if inspect.isfunction(stage) or inspect.ismethod(stage) else stage.__call__  # type: ignore[operator]
    if inspect.iscoroutinefunction(call):
        return stage  # type: ignore[return-value]

    async def handler(batch: Batch) -> Batch:
        return stage(batch)  # type: ignore[return-value]

    return handler


def compose(stages: Sequence[Stage], *, metrics: Metrics, pipeline: str) -> Handler:
    """Fold the stages into one handler, timing each per batch."""
    steps = [
        (_as_handler(s), metrics.stage_seconds.labels(pipeline, stage_name(s))) for s in stages
    ]

    async def handler(batch: Batch) -> Batch:
        for step, timer in steps:
            started = time.perf_counter()
            batch = await step(batch)
            timer.observe(time.perf_counter() - started)
        return batch

    return handler
