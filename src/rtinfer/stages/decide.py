"""Model outputs to result records: a decision by thresholds, or the raw outputs."""

from __future__ import annotations

import keyword
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..exceptions import ConfigError
from ..types import Batch

__all__ = ["Decide", "Outputs"]


class Decide:
    """Turn a model score into a decision by thresholds, and build the result record.

    ``thresholds`` maps a decision to the lowest score that earns it, e.g.
    ``{"review": 0.5, "block": 0.9}``; below every threshold the decision is
    ``default``. The score is column ``column`` of output ``output`` (a 1-D
    output is used as is). Each result is
    ``{"id", "score", "decision", "model_version"}``, ``"step"`` (which step of the
    model's fallback chain answered) when the model has a chain, plus the ``include``d
    fields of the event's data (attributes of a Struct, or keys of a dict,
    ``None`` where a dict lacks one). ``model_version`` is the version of the model
    that scored the batch (set by the model stage) unless given here. An event answered
    after its deadline passed (``batch.late``) gets ``"late": true``.
    """

    def __init__(
        self,
        *,
        output: str,
        thresholds: Mapping[str, float],
        default: str = "approve",
        column: int | None = 1,
        model_version: str | None = None,
        include: Sequence[str] = (),
    ) -> None:
        self.name = "decide"
        self.output = output
        self.column = column
        ordered = sorted(thresholds.items(), key=operator.itemgetter(1))
        for decision, bound in ordered:
            if not (isinstance(bound, int | float) and math.isfinite(bound)):
                raise ConfigError(
                    f"threshold of {decision!r} must be a finite number, got {bound!r}",
                    key="decision.thresholds",
                )
        self._bounds = np.array([b for _, b in ordered], dtype=np.float64)
        self._labels = [default] + [d for d, _ in ordered]
        self.model_version = model_version
        self.include = list(include)
        for field in self.include:
            if not field.isidentifier() or keyword.iskeyword(field):
                raise ConfigError(
                    f"include names fields of the event, got {field!r}, which is not a name",
                    key="decision.include",
                )
        self._builders = {
            (dicts, steps): _result_builder(self.include, dicts=dicts, steps=steps)
            for dicts in (False, True)
            for steps in (False, True)
        }

    def __call__(self, batch: Batch) -> Batch:
        if not batch.events:
            return batch
        assert batch.outputs is not None
        raw = np.asarray(batch.outputs[self.output])
        if raw.ndim == 2 and self.column is not None:
            raw = raw[:, self.column]
        raw = raw.reshape(len(batch))
        # Compare at the model's precision: a float32 score of 0.9 earns a threshold of 0.9
        # (in float64, float32(0.9) is 0.8999999761..., below it).
        bounds = self._bounds.astype(raw.dtype) if raw.dtype.kind == "f" else self._bounds
        index = np.searchsorted(bounds, raw, side="right").tolist()
        scores = raw.astype(np.float64)
        labels = self._labels
        decisions = [labels[i] for i in index]
        events = batch.events
        steps = batch.steps
        build = self._builders[isinstance(events[0].data, dict), steps is not None]
        version = self.model_version or batch.model_version
        if steps is None:
            build(events, scores.tolist(), decisions, version)
        else:
            build(events, scores.tolist(), decisions, version, _per_row(steps, len(events)))
        if batch.late is not None:
            mark_late(batch)
        return batch


def _per_row(steps: str | list[str], n: int) -> Sequence[str]:
    return [steps] * n if isinstance(steps, str) else steps


def mark_late(batch: Batch) -> None:
    """Add ``"late": true`` to the results of the rows ``batch.late`` flags."""
    assert batch.late is not None
    events = batch.events
    for i in np.flatnonzero(batch.late).tolist():
        events[i].result["late"] = True


def _result_builder(fields: Sequence[str], *, dicts: bool, steps: bool) -> Callable[..., None]:
    """A function writing each event's result record, with the included fields spelt out.

    Generated once (as dataclasses and msgspec do): a dict display with literal keys
    costs half as much per event as building the record in a loop over the fields.
    ``fields`` are checked names; on dicts (decoded without a schema) a missing key
    is ``None``. With ``steps`` it takes one more argument, the fallback step of each
    row, written as ``"step"``.
    """
    extra = "".join(
        f", {field!r}: data.get({field!r})" if dicts else f", {field!r}: data.{field}"
        for field in fields
    )
    if steps:
        head = (
            "def build(events, scores, decisions, version, steps):\n"
            "    for event, score, decision, step in zip(events, scores, decisions, steps,"
            " strict=True):\n"
        )
        extra = ", 'step': step" + extra
    else:
        head = (
            "def build(events, scores, decisions, version):\n"
            "    for event, score, decision in zip(events, scores, decisions, strict=True):\n"
        )
    source = (
        head + "        data = event.data\n"
        "        event.result = {'id': event.id, 'score': score, 'decision': decision,"
        f" 'model_version': version{extra}}}\n"
    )
    namespace: dict[str, Any] = {}
    exec(source, namespace)  # noqa: S102 - the source is built from checked identifiers only
    return namespace["build"]  # type: ignore[no-any-return]


class Outputs:
    """Make each event's result its rows of the model's outputs: ``{"id", OUTPUT: value, ...}``.

    Like :class:`Decide`, it adds ``"step"`` with a fallback chain and ``"late": true``.
    """

    def __init__(self, *, model_version: str | None = None) -> None:
        self.name = "outputs"
        self.model_version = model_version

    def __call__(self, batch: Batch) -> Batch:
        if not batch.events:
            return batch
        assert batch.outputs is not None
        columns = {k: v.tolist() for k, v in batch.outputs.items()}
        version = self.model_version or batch.model_version
        steps = None if batch.steps is None else _per_row(batch.steps, len(batch))
        for i, event in enumerate(batch.events):
            result: dict[str, Any] = {"id": event.id, "model_version": version}
            if steps is not None:
                result["step"] = steps[i]
            for name, values in columns.items():
                result[name] = values[i]
            event.result = result
        if batch.late is not None:
            mark_late(batch)
        return batch
