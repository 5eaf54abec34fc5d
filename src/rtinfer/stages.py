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
  NaN or infinity are dead-lettered unless allowed;
- :class:`Decide`: a score to a decision by thresholds, as the result record;
- :class:`Outputs`: the model's outputs as the result record, when there is no decision.
"""

from __future__ import annotations

import asyncio
import inspect
import keyword
import math
import operator
import time
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import msgspec
import numpy as np

from .batching import MicroBatcher
from .exceptions import ConfigError, DeadlineExceeded, ModelInputError
from .observability.metrics import Metrics
from .types import DEAD_REASON_HEADER, Batch, Handler

__all__ = [
    "Decide",
    "Decode",
    "Outputs",
    "Predict",
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


class Undeliverable:
    """Dead-letter the events their source marked undeliverable (delivered too many times).

    A broker source that counts deliveries (Redis Streams, NATS JetStream) hands such an
    event over once more, with the header ``rtinfer-dead-reason``; the pipeline puts
    this stage first, so the event is dead-lettered, and then acknowledged, instead of
    failing again.
    """

    __slots__ = ("name",)

    def __init__(self) -> None:
        self.name = "source"

    def __call__(self, batch: Batch) -> Batch:
        rows: list[int] = []
        reasons: list[str] = []
        for i, event in enumerate(batch.events):
            headers = event.headers
            if headers and DEAD_REASON_HEADER in headers:
                rows.append(i)
                reasons.append(headers[DEAD_REASON_HEADER].decode("utf-8", "replace"))
        batch.drop(rows, self.name, reasons)
        return batch


class Decode:
    """Decode each event's bytes (JSON or MessagePack) and validate them against a schema.

    ``schema`` is a ``msgspec.Struct`` type (``None``: any JSON value, as dicts and
    lists). An event that does not decode or validate is dead-lettered with
    msgspec's message, which names the field. ``id_field`` gives the event its
    id (else its position does); ``event_time_field`` its event time, in
    ``event_time_unit`` (``s`` or ``ms``) since the epoch.
    """

    __slots__ = ("_decode", "_fast", "_get_id", "_get_time", "_scale", "name", "schema")

    def __init__(
        self,
        schema: type[Any] | None = None,
        *,
        codec: str = "json",
        id_field: str | None = "id",
        event_time_field: str | None = None,
        event_time_unit: str = "ms",
    ) -> None:
        self.name = "decode"
        self.schema = schema
        target: Any = schema if schema is not None else Any
        self._decode: Callable[[bytes], Any]
        if codec == "json":
            self._decode = msgspec.json.Decoder(target).decode
        elif codec in ("msgpack", "messagepack"):
            self._decode = msgspec.msgpack.Decoder(target).decode
        else:
            raise ConfigError(f"unknown codec {codec!r}; use json or msgpack", key="decode.codec")
        if event_time_unit not in ("s", "ms"):
            raise ConfigError(
                f"event_time_unit must be 's' or 'ms', got {event_time_unit!r}",
                key="decode.event_time_unit",
            )
        self._scale = 1e-3 if event_time_unit == "ms" else 1.0
        dict_like = schema is None or (isinstance(schema, type) and issubclass(schema, dict))
        self._get_id = _getter(id_field, dict_like)
        self._get_time = _getter(event_time_field, dict_like)
        # The common case, decided once: a Struct whose id is a required str and whose event
        # time (if any) a required number. Then every decoded event has both, of those types,
        # and the per-event loop needs no checks.
        self._fast: tuple[Callable[[Any], str], Callable[[Any], float] | None] | None = None
        if (
            id_field is not None
            and _required_field(schema, id_field) in (str,)
            and (
                event_time_field is None
                or _required_field(schema, event_time_field) in (int, float)
            )
        ):
            self._fast = (
                operator.attrgetter(id_field),
                operator.attrgetter(event_time_field) if event_time_field else None,
            )

    def __call__(self, batch: Batch) -> Batch:
        if self._fast is not None:
            return self._decode_structs(batch, *self._fast)
        decode, get_id, get_time, scale = self._decode, self._get_id, self._get_time, self._scale
        bad: list[int] = []
        reasons: list[str] = []
        for i, event in enumerate(batch.events):
            try:
                data = event.data = decode(event.value)
            except msgspec.DecodeError as exc:  # includes ValidationError
                bad.append(i)
                reasons.append(f"undecodable or invalid: {exc}")
                continue
            if get_id is not None:
                event.id = _as_id(get_id(data))
            if event.id is None and event.position is not None:
                p = event.position
                event.id = f"{p.source}/{p.partition}/{p.offset}"
            if get_time is not None:
                t = get_time(data)
                if isinstance(t, int | float):
                    event.event_time = t * scale
        batch.drop(bad, self.name, reasons)
        return batch

    def _decode_structs(
        self,
        batch: Batch,
        get_id: Callable[[Any], str],
        get_time: Callable[[Any], float] | None,
    ) -> Batch:
        decode, scale = self._decode, self._scale
        bad: list[int] = []
        reasons: list[str] = []
        for i, event in enumerate(batch.events):
            try:
                data = decode(event.value)
            except msgspec.DecodeError as exc:  # includes ValidationError
                bad.append(i)
                reasons.append(f"undecodable or invalid: {exc}")
                continue
            event.data = data
            event.id = get_id(data)
            if get_time is not None:
                event.event_time = get_time(data) * scale
        batch.drop(bad, self.name, reasons)
        return batch


def _required_field(schema: Any, name: str) -> Any:
    """The type of a Struct's required field ``name``, or ``None``."""
    if not (isinstance(schema, type) and issubclass(schema, msgspec.Struct)):
        return None
    for field in msgspec.structs.fields(schema):
        if field.name == name and field.required:
            kind = field.type
            if typing.get_origin(kind) is typing.Annotated:  # constrained: Annotated[int, Meta]
                kind = typing.get_args(kind)[0]
            return kind
    return None


def _as_id(value: Any) -> str | None:
    """An event id from its id field: a string as is, an integer as its digits."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _getter(field: str | None, dict_like: bool) -> Callable[[Any], Any] | None:
    if field is None:
        return None
    if dict_like:

        def get(data: Any) -> Any:
            return data.get(field) if isinstance(data, dict) else None

        return get
    attr = operator.attrgetter(field)

    def get_attr(data: Any) -> Any:
        try:
            return attr(data)
        except AttributeError:
            return None

    return get_attr


class Vectorize:
    """Build a model input from named fields of each decoded event.

    ``fields`` are read from each event's data (attributes of a Struct, or keys
    of a dict); booleans become 0/1. An event whose fields are missing, not
    numbers, or integers too large for ``dtype`` is dead-lettered alone.
    """

    __slots__ = ("_dtype", "_get", "fields", "input", "name")

    def __init__(self, fields: Sequence[str], *, input: str = "features", dtype: Any = "float32"):
        if not fields:
            raise ConfigError("vectorize needs at least one field", key="stages.vectorize.fields")
        self.name = "vectorize"
        self.fields = list(fields)
        self.input = input
        self._dtype = np.dtype(dtype)
        self._get = operator.attrgetter(*self.fields) if len(fields) > 1 else None

    def _row(self, data: Any) -> tuple[Any, ...]:
        if isinstance(data, dict):
            return tuple(data[f] for f in self.fields)
        if self._get is None:
            return (getattr(data, self.fields[0]),)
        return tuple(self._get(data))

    def _array(self, rows: list[tuple[Any, ...]]) -> np.ndarray[Any, Any]:
        # A float too large for the dtype becomes infinity (the model stage dead-letters
        # it, naming the column), without a warning per batch.
        with np.errstate(over="ignore", invalid="ignore"):
            return np.array(rows, dtype=self._dtype).reshape(len(rows), len(self.fields))

    def __call__(self, batch: Batch) -> Batch:
        rows: list[tuple[Any, ...]] = []
        at: list[int] = []
        bad: dict[int, str] = {}
        for i, event in enumerate(batch.events):
            try:
                row = self._row(event.data)
            except (AttributeError, KeyError, TypeError) as exc:
                bad[i] = f"missing field for model input {self.input!r}: {exc}"
                continue
            if not all(isinstance(v, int | float) for v in row):  # bool is an int
                kinds = {f: type(v).__name__ for f, v in zip(self.fields, row, strict=True)}
                bad[i] = f"model input {self.input!r} needs numbers, got {kinds}"
                continue
            rows.append(row)
            at.append(i)
        try:
            array = self._array(rows)
        except (OverflowError, ValueError):
            # An integer too large for the dtype: find the events holding one, drop them alone.
            kept: list[tuple[Any, ...]] = []
            for i, row in zip(at, rows, strict=True):
                try:
                    self._array([row])
                except (OverflowError, ValueError) as exc:
                    bad[i] = f"model input {self.input!r} cannot hold {row} as {self._dtype}: {exc}"
                else:
                    kept.append(row)
            array = self._array(kept)
        order = sorted(bad)
        batch.drop(order, self.name, [bad[i] for i in order])
        batch.inputs = {self.input: array}
        return batch


class Predict:
    """Run the batch's inputs through a model's shared micro-batcher.

    Rows holding NaN or infinity are dead-lettered first unless ``allow_nan``.
    When the model fails on the batch, each event is retried alone, so only
    the events the model cannot handle are dead-lettered. Events whose deadline
    passes before the model runs them are dead-lettered as expired.
    ``column_names`` (per input) make the NaN message name the column.
    """

    def __init__(
        self,
        batcher: MicroBatcher,
        *,
        allow_nan: bool = False,
        column_names: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.name = "model"
        self.batcher = batcher
        self.allow_nan = allow_nan
        self.column_names = {k: list(v) for k, v in (column_names or {}).items()}

    async def start(self) -> None:
        await self.batcher.start()

    async def aclose(self) -> None:
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
        inputs = batch.inputs
        try:
            batch.outputs = await self.batcher.submit(inputs, deadline=batch.deadline(), wait=True)
        except (DeadlineExceeded, ModelInputError) as exc:
            batch.drop_all(self.name, str(exc))
        except Exception as exc:
            if len(batch) == 1:  # it already ran alone: this event is what the model refuses
                batch.drop_all(self.name, f"model failed on this event: {exc}")
            else:
                await self._one_by_one(batch)
        return batch

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

    async def _one_by_one(self, batch: Batch) -> None:
        assert batch.inputs is not None
        inputs = batch.inputs
        deadline = batch.deadline()
        results = await asyncio.gather(
            *(
                self.batcher.submit(
                    {k: v[i : i + 1] for k, v in inputs.items()}, deadline=deadline, wait=True
                )
                for i in range(len(batch))
            ),
            return_exceptions=True,
        )
        bad = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
        good = [r for r in results if not isinstance(r, BaseException)]
        batch.drop(bad, self.name, [f"model failed on this event: {results[i]}" for i in bad])
        if good:
            batch.outputs = {k: np.concatenate([g[k] for g in good]) for k in good[0]}


class Decide:
    """Turn a model score into a decision by thresholds, and build the result record.

    ``thresholds`` maps a decision to the lowest score that earns it, e.g.
    ``{"review": 0.5, "block": 0.9}``; below every threshold the decision is
    ``default``. The score is column ``column`` of output ``output`` (a 1-D
    output is used as is). Each result is
    ``{"id", "score", "decision", "model_version"}`` plus the ``include``d
    fields of the event's data (attributes of a Struct, or keys of a dict,
    ``None`` where a dict lacks one).
    """

    def __init__(
        self,
        *,
        output: str,
        thresholds: Mapping[str, float],
        default: str = "approve",
        column: int | None = 1,
        model_version: str | Callable[[], str] = "",
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
        self._version = model_version if callable(model_version) else (lambda: model_version)
        self.include = list(include)
        for field in self.include:
            if not field.isidentifier() or keyword.iskeyword(field):
                raise ConfigError(
                    f"include names fields of the event, got {field!r}, which is not a name",
                    key="decision.include",
                )
        self._build_from_attrs = _result_builder(self.include, dicts=False)
        self._build_from_dicts = _result_builder(self.include, dicts=True)

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
        build = (
            self._build_from_dicts if isinstance(events[0].data, dict) else self._build_from_attrs
        )
        build(events, scores.tolist(), decisions, self._version())
        return batch


def _result_builder(fields: Sequence[str], *, dicts: bool) -> Callable[..., None]:
    """A function writing each event's result record, with the included fields spelt out.

    Generated once (as dataclasses and msgspec do): a dict display with literal keys
    costs half as much per event as building the record in a loop over the fields.
    ``fields`` are checked names; on dicts (decoded without a schema) a missing key
    is ``None``.
    """
    extra = "".join(
        f", {field!r}: data.get({field!r})" if dicts else f", {field!r}: data.{field}"
        for field in fields
    )
    source = (
        "def build(events, scores, decisions, version):\n"
        "    for event, score, decision in zip(events, scores, decisions, strict=True):\n"
        "        data = event.data\n"
        "        event.result = {'id': event.id, 'score': score, 'decision': decision,"
        f" 'model_version': version{extra}}}\n"
    )
    namespace: dict[str, Any] = {}
    exec(source, namespace)  # noqa: S102 - the source is built from checked identifiers only
    return namespace["build"]  # type: ignore[no-any-return]


class Outputs:
    """Make each event's result its rows of the model's outputs: ``{"id", OUTPUT: value, ...}``."""

    def __init__(self, *, model_version: str | Callable[[], str] = "") -> None:
        self.name = "outputs"
        self._version = model_version if callable(model_version) else (lambda: model_version)

    def __call__(self, batch: Batch) -> Batch:
        if not batch.events:
            return batch
        assert batch.outputs is not None
        columns = {k: v.tolist() for k, v in batch.outputs.items()}
        version = self._version()
        for i, event in enumerate(batch.events):
            result: dict[str, Any] = {"id": event.id, "model_version": version}
            for name, values in columns.items():
                result[name] = values[i]
            event.result = result
        return batch
