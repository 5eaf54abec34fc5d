"""The built-in stages one at a time, on real batches, and how they are composed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import numpy as np
import pytest

from conftest import Reading, payload, python_model
from rtinfer.batching import MicroBatcher
from rtinfer.exceptions import ConfigError
from rtinfer.observability.metrics import Metrics
from rtinfer.stages import Decide, Decode, Outputs, Predict, Vectorize, compose, stage_name
from rtinfer.types import Batch, Event, Position


def batch_of(*values: bytes, deadline: float | None = None) -> Batch:
    events = [
        Event(v, ingest_time=time.time(), deadline=deadline, position=Position("src", 2, 10 + i))
        for i, v in enumerate(values)
    ]
    return Batch(events)


def decoded(*data: Any) -> Batch:
    batch = batch_of(*(b"-" for _ in data))
    for i, (event, d) in enumerate(zip(batch.events, data, strict=True)):
        event.data = d
        event.id = f"e{i}"
    return batch


def reasons(batch: Batch) -> dict[str | None, str]:
    return {d.event.id or str(d.event.position): d.reason for d in batch.dead}


# -- compose -------------------------------------------------------------------------------


async def test_compose_runs_sync_and_async_stages_in_order_and_times_each() -> None:
    trail: list[str] = []

    def plain(batch: Batch) -> Batch:
        trail.append("plain")
        return batch

    async def waits(batch: Batch) -> Batch:
        trail.append("waits")
        return batch

    class Callable:
        name = "custom"

        async def __call__(self, batch: Batch) -> Batch:
            trail.append("custom")
            return batch

    class SyncCallable:
        def __call__(self, batch: Batch) -> Batch:
            trail.append("sync-callable")
            return batch

    metrics = Metrics()
    handler = compose([plain, waits, Callable(), SyncCallable()], metrics=metrics, pipeline="p")
    batch = batch_of(b"1")
    assert await handler(batch) is batch
    assert trail == ["plain", "waits", "custom", "sync-callable"]
    for name in ("plain", "waits", "custom", "SyncCallable"):
        count = metrics.registry.get_sample_value(
            "rtinfer_stage_seconds_count", {"pipeline": "p", "stage": name}
        )
        assert count == 1, name
    assert stage_name(Decode()) == "decode"


# -- decode --------------------------------------------------------------------------------


def test_decode_validates_against_the_schema_and_dead_letters_alone() -> None:
    batch = batch_of(
        payload(1, x=0.5),
        b'{"id": "bad", "key": "k", "x": "0.5", "y": 1}',
        b"[1, 2",
        payload(2, x=0.7),
    )
    Decode(Reading)(batch)
    assert [e.id for e in batch.events] == ["e1", "e2"]
    assert isinstance(batch.events[0].data, Reading)
    assert batch.events[1].data.x == 0.7
    assert [d.stage for d in batch.dead] == ["decode", "decode"]
    assert [d.event.position for d in batch.dead] == [
        Position("src", 2, 11),
        Position("src", 2, 12),
    ]
    assert "Expected `float`, got `str` - at `$.x`" in batch.dead[0].reason
    assert batch.dead[1].reason.startswith("undecodable or invalid")
    assert batch.positions == [Position("src", 2, 10 + i) for i in range(4)]


def test_decode_ids_and_event_times() -> None:
    batch = batch_of(
        b'{"id": "a", "ts": 1700000000000}',
        b'{"id": 42, "ts": 1700000000500}',
        b'{"ts": "soon"}',
        b"[1, 2, 3]",
    )
    Decode(event_time_field="ts")(batch)
    a, number, anonymous, array = batch.events
    assert a.id == "a"
    assert a.event_time == pytest.approx(1_700_000_000.0)
    assert number.id == "42"  # an integer id is kept, as text
    assert number.event_time == pytest.approx(1_700_000_000.5)
    assert anonymous.id == "src/2/12"  # no id: the position names it
    assert anonymous.event_time is None  # not a number: no event time
    assert array.id == "src/2/13"
    assert array.data == [1, 2, 3]

    seconds = batch_of(b'{"id": "s", "ts": 12.5}')
    Decode(event_time_field="ts", event_time_unit="s")(seconds)
    assert seconds.events[0].event_time == 12.5

    no_ids = batch_of(b'{"id": "x"}')
    Decode(id_field=None)(no_ids)
    assert no_ids.events[0].id == "src/2/10"


def test_decode_msgpack() -> None:
    batch = batch_of(
        msgspec.msgpack.encode({"id": "m", "key": "k", "x": 1.0, "y": 2.0}),
        msgspec.json.encode({"id": "j", "key": "k", "x": 1.0, "y": 2.0}),
    )
    Decode(Reading, codec="msgpack")(batch)
    assert batch.events[0].data == Reading(id="m", key="k", x=1.0, y=2.0)
    assert len(batch.dead) == 1  # JSON is not MessagePack


def test_decode_refuses_unknown_settings() -> None:
    with pytest.raises(ConfigError, match="unknown codec 'xml'") as info:
        Decode(codec="xml")
    assert info.value.key == "decode.codec"
    with pytest.raises(ConfigError, match="event_time_unit"):
        Decode(event_time_unit="us")


# -- vectorize -----------------------------------------------------------------------------


def test_vectorize_structs_and_dicts_and_drops_bad_rows_alone() -> None:
    batch = decoded(
        Reading(id="a", key="k", x=1.5, y=2.0),
        {"x": True, "y": 3},
        {"x": 1.0},
        {"x": "1.0", "y": None},
        Reading(id="b", key="k", x=-1.0, y=0.25),
    )
    Vectorize(["x", "y"])(batch)
    assert [e.id for e in batch.events] == ["e0", "e1", "e4"]
    assert batch.inputs is not None
    features = batch.inputs["features"]
    assert features.dtype == np.float32
    np.testing.assert_array_equal(features, [[1.5, 2.0], [1.0, 3.0], [-1.0, 0.25]])
    why = reasons(batch)
    assert "missing field for model input 'features'" in why["e2"]
    assert "'y'" in why["e2"]
    assert why["e3"] == "model input 'features' needs numbers, got {'x': 'str', 'y': 'NoneType'}"


def test_vectorize_one_field_and_an_empty_batch() -> None:
    batch = decoded(Reading(id="a", key="k", x=3.0, y=0.0))
    Vectorize(["x"], input="only_x", dtype="float64")(batch)
    assert batch.inputs is not None
    assert batch.inputs["only_x"].tolist() == [[3.0]]
    assert batch.inputs["only_x"].dtype == np.float64

    empty = decoded({"nothing": 1})
    Vectorize(["x", "y"])(empty)
    assert empty.inputs is not None
    assert empty.inputs["features"].shape == (0, 2)
    with pytest.raises(ConfigError, match="at least one field"):
        Vectorize([])


def test_vectorize_drops_a_number_too_large_for_the_dtype_alone() -> None:
    batch = decoded(
        {"x": 1, "y": 2}, {"x": 10**400, "y": 2}, {"x": 1e300, "y": 2}, {"x": 3, "y": 4}
    )
    Vectorize(["x", "y"])(batch)  # warnings are errors here: an overflow must not warn
    assert [e.id for e in batch.events] == ["e0", "e2", "e3"]
    assert "cannot hold" in reasons(batch)["e1"]
    assert batch.inputs is not None
    features = batch.inputs["features"]
    assert features[1, 0] == np.inf  # too large for float32: left for the model stage
    assert features[[0, 2]].tolist() == [[1, 2], [3, 4]]

    ints = decoded({"x": 2**70, "y": 1}, {"x": 5, "y": 6})
    Vectorize(["x", "y"], dtype="int64")(ints)
    assert [e.id for e in ints.events] == ["e1"]
    assert ints.inputs is not None
    assert ints.inputs["features"].tolist() == [[5, 6]]


# -- predict -------------------------------------------------------------------------------


@pytest.fixture
async def predict() -> AsyncIterator[Predict]:
    stage = Predict(
        MicroBatcher(python_model(fail_on=13.0), max_batch_size=4, max_delay=0),
        column_names={"features": ["x", "y"]},
    )
    await stage.start()
    yield stage
    await stage.aclose()


def with_inputs(rows: list[list[float]], **kw: Any) -> Batch:
    batch = batch_of(*(b"-" for _ in rows), **kw)
    for i, event in enumerate(batch.events):
        event.id = f"e{i}"
    batch.inputs = {"features": np.array(rows, dtype=np.float32).reshape(len(rows), 2)}
    return batch


async def test_predict_runs_the_model_and_keeps_rows_aligned(predict: Predict) -> None:
    batch = with_inputs([[0.1 * i, 0] for i in range(10)])  # more rows than a model batch
    await predict(batch)
    assert batch.outputs is not None
    np.testing.assert_allclose(batch.outputs["probabilities"][:, 1], [0.1 * i for i in range(10)])


async def test_predict_dead_letters_nan_and_infinity_naming_the_column(predict: Predict) -> None:
    batch = with_inputs([[0.1, 0], [np.nan, 0], [0.3, np.inf], [0.4, 0]])
    await predict(batch)
    assert [e.id for e in batch.events] == ["e0", "e3"]
    assert batch.outputs is not None
    np.testing.assert_allclose(batch.outputs["probabilities"][:, 1], [0.1, 0.4])
    why = reasons(batch)
    assert why["e1"].startswith("model input 'features' 'x' is nan")
    assert why["e2"].startswith("model input 'features' 'y' is inf")
    assert "allow_nan" in why["e1"]


async def test_predict_with_allow_nan_passes_them_to_the_model() -> None:
    stage = Predict(MicroBatcher(python_model(), max_batch_size=4, max_delay=0), allow_nan=True)
    await stage.start()
    try:
        batch = with_inputs([[np.nan, 0], [0.5, 0]])
        await stage(batch)
    finally:
        await stage.aclose()
    assert len(batch.events) == 2
    assert batch.outputs is not None
    assert np.isnan(batch.outputs["probabilities"][0, 1])


async def test_a_model_failure_dead_letters_only_the_rows_it_fails_on(predict: Predict) -> None:
    batch = with_inputs([[0.1, 0], [13, 0], [0.3, 0], [13, 1], [0.5, 0]])
    await predict(batch)
    assert [e.id for e in batch.events] == ["e0", "e2", "e4"]
    assert batch.outputs is not None
    np.testing.assert_allclose(batch.outputs["probabilities"][:, 1], [0.1, 0.3, 0.5])
    why = reasons(batch)
    assert set(why) == {"e1", "e3"}
    assert all(
        "model failed on this event: the model cannot score x=13.0" in r for r in why.values()
    )

    alone = with_inputs([[13, 0]])
    await predict(alone)  # a batch of one fails alone, it does not raise
    assert alone.events == []
    assert [d.stage for d in alone.dead] == ["model"]


async def test_predict_dead_letters_expired_events_and_wrong_inputs(predict: Predict) -> None:
    expired = with_inputs([[0.1, 0], [0.2, 0]], deadline=time.time() - 1)
    await predict(expired)
    assert expired.events == []
    assert all("deadline passed" in d.reason for d in expired.dead)

    wrong = batch_of(b"-")
    wrong.inputs = {"features": np.zeros((1, 3), dtype=np.float32)}
    await predict(wrong)
    assert "expects shape [-1, 2], got [1, 3]" in wrong.dead[0].reason

    none = batch_of(b"-")
    with pytest.raises(ConfigError, match="add a vectorize stage"):
        await predict(none)

    empty = Batch([])
    assert await predict(empty) is empty


# -- decide and outputs --------------------------------------------------------------------


def scored(scores: list[float], data: list[Any] | None = None, *, two_d: bool = True) -> Batch:
    batch = decoded(*(data or [None] * len(scores)))
    s = np.array(scores, dtype=np.float32)
    batch.outputs = {"probabilities": np.stack([1 - s, s], axis=1) if two_d else s}
    return batch


def test_decide_by_thresholds_at_and_between_the_bounds() -> None:
    decide = Decide(
        output="probabilities",
        thresholds={"block": 0.9, "review": 0.5},
        model_version="v3",
    )
    batch = scored([0.0, 0.49, 0.5, 0.75, 0.9, 1.0])
    decide(batch)
    decisions = [e.result["decision"] for e in batch.events]
    assert decisions == ["approve", "approve", "review", "review", "block", "block"]
    first = batch.events[0].result
    assert first == {"id": "e0", "score": 0.0, "decision": "approve", "model_version": "v3"}

    one_d = scored([0.2, 0.95], two_d=False)
    Decide(output="probabilities", column=None, thresholds={"hold": 0.9}, default="pass")(one_d)
    assert [e.result["decision"] for e in one_d.events] == ["pass", "hold"]


def test_decide_includes_fields_of_structs_and_dicts() -> None:
    decide = Decide(output="probabilities", thresholds={"review": 0.5}, include=["key", "y"])
    structs = scored([0.7], [Reading(id="a", key="card-1", x=0.7, y=3.0)])
    decide(structs)
    assert structs.events[0].result["key"] == "card-1"
    assert structs.events[0].result["y"] == 3.0

    dicts = scored([0.2, 0.6], [{"key": "card-2", "y": 1}, {"y": 2}])
    decide(dicts)  # data decoded without a schema are dicts
    assert [(e.result["key"], e.result["y"]) for e in dicts.events] == [("card-2", 1), (None, 2)]

    single = Decide(output="probabilities", thresholds={}, include=["key"])
    one = scored([0.1], [{"key": "k"}])
    single(one)
    assert one.events[0].result["key"] == "k"


def test_decide_refuses_a_threshold_that_is_not_a_finite_number() -> None:
    with pytest.raises(ConfigError, match="threshold of 'block' must be a finite number") as info:
        Decide(output="probabilities", thresholds={"block": float("nan")})
    assert info.value.key == "decision.thresholds"


def test_outputs_makes_one_record_per_event() -> None:
    batch = scored([0.25, 0.5])
    Outputs(model_version="1")(batch)
    assert [e.result for e in batch.events] == [
        {"id": "e0", "model_version": "1", "probabilities": [0.75, 0.25]},
        {"id": "e1", "model_version": "1", "probabilities": [0.5, 0.5]},
    ]


def test_batch_drop_keeps_inputs_outputs_and_positions_aligned() -> None:
    batch = scored([0.1, 0.2, 0.3, 0.4])
    batch.inputs = {"features": np.arange(8, dtype=np.float32).reshape(4, 2)}
    batch.drop([1, 3], "test", ["one", "three"])
    assert [e.id for e in batch.events] == ["e0", "e2"]
    assert batch.inputs["features"].tolist() == [[0, 1], [4, 5]]
    assert batch.outputs is not None
    np.testing.assert_allclose(batch.outputs["probabilities"][:, 1], [0.1, 0.3])
    assert [(d.event.id, d.stage, d.reason) for d in batch.dead] == [
        ("e1", "test", "one"),
        ("e3", "test", "three"),
    ]
    assert len(batch.positions) == 4  # every position is still acknowledged


def test_decide_refuses_an_include_that_is_not_a_field_name() -> None:
    from rtinfer.exceptions import ConfigError
    from rtinfer.stages import Decide

    with pytest.raises(ConfigError, match="not a name"):
        Decide(output="p", thresholds={"block": 0.5}, include=["ok", "x); import os; ("])


async def test_results_name_the_version_of_the_model_that_scored_them() -> None:
    model = python_model()
    model.version = "2026-11-26"
    batcher = MicroBatcher(model)
    predict = Predict(batcher)
    await predict.start()
    try:
        batch = decoded(Reading(id="e1", key="k", x=0.7, y=0.1))
        Vectorize(["x", "y"])(batch)
        await predict(batch)
        assert batch.model_version == "2026-11-26"
        Decide(output="probabilities", thresholds={"block": 0.5})(batch)
        assert batch.events[0].result["model_version"] == "2026-11-26"
        Outputs()(batch)
        assert batch.events[0].result["model_version"] == "2026-11-26"
    finally:
        await predict.aclose()


def test_decode_raw_keeps_the_bytes_and_names_events_by_position() -> None:
    batch = batch_of(b"\x00\x01binary", b"text")
    Decode(codec="raw")(batch)
    assert [e.data for e in batch.events] == [b"\x00\x01binary", b"text"]
    assert [e.id for e in batch.events] == ["src/2/10", "src/2/11"]
    with pytest.raises(ConfigError, match="raw codec takes no schema"):
        Decode(Reading, codec="raw")
