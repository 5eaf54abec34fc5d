"""The fraud demo's data side: the generator, the event schema, the features, the model.

The features are checked three ways: hand-computed values on a tiny crafted
stream (window edges, ratio, gap, late events, the ring's cap), equality with a
plain reference implementation on a generated stream, and equality of the
online stage (batches cut anywhere) with the offline transform.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import msgspec
import numpy as np
import onnxruntime
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtinfer.demo import (
    FEATURE_NAMES,
    GENERATOR_VERSION,
    MODEL_VERSION,
    PATTERNS,
    CardFeatures,
    HandCardFeatures,
    Transaction,
    encode_events,
    ensure_model,
    fit_model,
    generate,
    offline_features,
    train,
    write_jsonl,
)
from rtinfer.demo import features as features_module
from rtinfer.demo import training as training_module
from rtinfer.demo.features import RING
from rtinfer.demo.generator import DEFAULT_START_MS
from rtinfer.demo.training import onnx_scores
from rtinfer.models.convert import sklearn_to_onnx
from rtinfer.types import Batch, Event

COLUMN = {name: i for i, name in enumerate(FEATURE_NAMES)}


# --- the generator and the event --------------------------------------------------------


def test_same_seed_same_bytes_and_other_seed_other_bytes() -> None:
    first = encode_events(generate(3_000, seed=1))
    assert first == encode_events(generate(3_000, seed=1))
    assert first != encode_events(generate(3_000, seed=2))


@pytest.mark.parametrize("n", [0, 1, 7, 5_000])
def test_events_come_in_event_time_order_with_unique_ids(n: int) -> None:
    events = generate(n, seed=3)
    assert len(events) == n
    ts = [e.ts for e in events]
    assert ts == sorted(ts)
    assert [e.id for e in events] == [f"tx-{i:09d}" for i in range(n)]


def test_event_time_starts_where_asked_and_advances_about_50_per_second() -> None:
    start = DEFAULT_START_MS + 123_456
    events = generate(20_000, seed=4, start_ms=start)
    assert start <= events[0].ts < start + 1_000
    seconds = (events[-1].ts - events[0].ts) / 1000
    assert 20_000 / 50 * 0.7 < seconds < 20_000 / 50 * 1.3
    assert generate(10, seed=4)[0].ts >= DEFAULT_START_MS


@pytest.mark.parametrize("fraud_rate", [0.015, 0.05])
def test_fraud_rate_is_kept_and_every_pattern_is_present(fraud_rate: float) -> None:
    events = generate(40_000, seed=5, fraud_rate=fraud_rate)
    fraud = [e for e in events if e.is_fraud]
    assert abs(len(fraud) / len(events) - fraud_rate) < 0.001
    assert all((e.pattern is not None) == e.is_fraud for e in events)
    by_pattern: dict[str | None, list[Transaction]] = defaultdict(list)
    for e in events:
        by_pattern[e.pattern].append(e)
    assert set(by_pattern) == {None, *PATTERNS}
    assert all(e.amount <= 4.0 for e in by_pattern["card_testing"])
    assert all(e.country != e.card_country for e in by_pattern["foreign_high_value"])
    assert all(e.channel == "pos" for e in by_pattern["merchant_spree"])


def test_no_fraud_when_the_rate_is_zero() -> None:
    assert not any(e.is_fraud for e in generate(5_000, seed=6, fraud_rate=0.0))


@pytest.mark.parametrize("kwargs", [{"n": -1}, {"n": 10, "fraud_rate": 0.9}])
def test_bad_arguments_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        generate(**kwargs)


def test_events_survive_a_json_round_trip() -> None:
    events = generate(2_000, seed=7, fraud_rate=0.05)
    decode = msgspec.json.Decoder(Transaction).decode
    assert [decode(raw) for raw in encode_events(events)] == events


def test_a_hand_written_event_decodes() -> None:
    line = (
        b'{"id":"tx-000000123","ts":1772438400123,"card":"card-000042","merchant":"m-00017",'
        b'"mcc":5411,"amount":42.5,"currency":"EUR","country":"DE","card_country":"DE",'
        b'"channel":"pos"}'
    )
    tx = msgspec.json.decode(line, type=Transaction)
    assert (tx.ts, tx.amount, tx.channel, tx.is_fraud, tx.pattern) == (
        1772438400123,
        42.5,
        "pos",
        False,
        None,
    )


@pytest.mark.parametrize(
    "change", [{"amount": -1.0}, {"channel": "atm"}, {"ts": "yesterday"}, {"mcc": 123456}]
)
def test_malformed_events_are_refused(change: dict[str, Any]) -> None:
    document = msgspec.to_builtins(generate(1, seed=8)[0]) | change
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(msgspec.json.encode(document), type=Transaction)


def test_write_jsonl_writes_the_generated_stream(tmp_path: Path) -> None:
    path = tmp_path / "payments.jsonl"
    fraud = write_jsonl(path, 500, seed=9)
    lines = path.read_bytes().splitlines()
    events = generate(500, seed=9)
    assert lines == encode_events(events)
    assert fraud == sum(e.is_fraud for e in events)


# --- the features ------------------------------------------------------------------------

T0 = DEFAULT_START_MS + 5 * 3_600_000  # 13:00 UTC


def tx(
    card: str,
    at: int,
    amount: float,
    merchant: str,
    country: str = "US",
    channel: Literal["pos", "online"] = "pos",
) -> Transaction:
    """A payment ``at`` milliseconds after 13:00 UTC, by a card from the US."""
    return Transaction(
        f"tx-{at}", T0 + at, card, merchant, 5411, amount, "USD", country, "US", channel
    )


def batch_of(transactions: list[Transaction]) -> Batch:
    events = []
    for t in transactions:
        event = Event(value=b"", ingest_time=0.0)
        event.data = t
        events.append(event)
    return Batch(events)


# _MIN_VECTOR: 1 sends the first payment of each card in a batch through numpy, a
# huge value sends every payment through the per-payment path.
BOTH_PATHS = pytest.mark.parametrize("min_vector", [1, 10**9], ids=["numpy", "python"])


@BOTH_PATHS
def test_hand_computed_features(min_vector: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features_module, "_MIN_VECTOR", min_vector)
    stream = [
        tx("A", 0, 10.0, "m1"),
        tx("B", 30_000, 100.0, "m1"),
        tx("A", 59_999, 20.0, "m2", country="FR", channel="online"),
        tx("A", 60_000, 11.0, "m1"),  # payment 1 is exactly 60 s old: out of the minute
        tx("A", 600_000, 5.5, "m3"),  # payment 1 is exactly 600 s old: out of the 10 minutes
        tx("A", 7_800_000, 20.9, "m1"),  # two hours later: 15:10
        tx("A", 1_000, 3.0, "m2", channel="online"),  # late: counted at 15:10
    ]
    usual = [10.0, 11.0, 11.0, 10.45, 11.495]  # card A's usual amount before each later payment
    # amount, log, foreign, online, tx_1m, tx_10m, amount_10m, merchants_10m, ratio, gap, hour
    expected = [
        [10.0, math.log1p(10.0), 0, 0, 1, 1, 10.0, 1, 1.0, 3600.0, 13],
        [100.0, math.log1p(100.0), 0, 0, 1, 1, 100.0, 1, 1.0, 3600.0, 13],
        [20.0, math.log1p(20.0), 1, 1, 2, 2, 30.0, 2, 20.0 / usual[0], 59.999, 13],
        [11.0, math.log1p(11.0), 0, 0, 2, 3, 41.0, 2, 11.0 / usual[1], 0.001, 13],
        [5.5, math.log1p(5.5), 0, 0, 1, 3, 36.5, 3, 5.5 / usual[2], 540.0, 13],
        [20.9, math.log1p(20.9), 0, 0, 1, 1, 20.9, 1, 20.9 / usual[3], 3600.0, 15],
        [3.0, math.log1p(3.0), 0, 1, 2, 2, 23.9, 2, 3.0 / usual[4], 0.0, 15],
    ]
    stage = HandCardFeatures()
    got = np.concatenate([stage.transform([t]) for t in stream])  # each payment alone
    assert got.dtype == np.float32
    assert got.shape == (len(stream), len(FEATURE_NAMES))
    np.testing.assert_allclose(got, np.array(expected, np.float32), rtol=1e-6)
    np.testing.assert_array_equal(HandCardFeatures().transform(stream), got)


@BOTH_PATHS
@pytest.mark.parametrize("same_merchant", [False, True])
def test_windows_see_at_most_the_ring(
    same_merchant: bool, min_vector: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(features_module, "_MIN_VECTOR", min_vector)
    payments = [
        tx("A", i * 100, 1.0 + i, "m" if same_merchant else f"m{i}") for i in range(RING + 8)
    ]
    stage = HandCardFeatures()
    got = np.concatenate([stage.transform([t]) for t in payments])
    counts = np.minimum(np.arange(1, len(payments) + 1), RING + 1)
    np.testing.assert_array_equal(got[:, COLUMN["tx_1m"]], counts)
    np.testing.assert_array_equal(got[:, COLUMN["tx_10m"]], counts)
    merchants = np.ones(len(payments)) if same_merchant else counts
    np.testing.assert_array_equal(got[:, COLUMN["merchants_10m"]], merchants)
    sums = [sum(1.0 + j for j in range(max(0, i - RING), i + 1)) for i in range(len(payments))]
    np.testing.assert_allclose(got[:, COLUMN["amount_10m"]], sums, rtol=1e-6)


def reference_features(stream: list[Transaction]) -> np.ndarray[Any, Any]:
    """The features by their definitions, plainly (all history kept, no ring)."""
    history: dict[str, list[tuple[int, float, str]]] = defaultdict(list)
    usual: dict[str, float] = {}
    rows = []
    for t in stream:
        past = history[t.card]
        ts = max(t.ts, past[-1][0]) if past else t.ts
        if past:
            ratio = t.amount / max(usual[t.card], 0.01)
            gap = min((ts - past[-1][0]) / 1000.0, 3600.0)
            usual[t.card] += 0.1 * (t.amount - usual[t.card])
        else:
            ratio, gap = 1.0, 3600.0
            usual[t.card] = t.amount
        past.append((ts, t.amount, t.merchant))
        minute = [p for p in past if p[0] > ts - 60_000]
        ten = [p for p in past if p[0] > ts - 600_000]
        cents = sum(round(a * 100.0) for _, a, _ in ten)
        rows.append(
            [
                t.amount,
                math.log1p(t.amount),
                t.country != t.card_country,
                t.channel == "online",
                len(minute),
                len(ten),
                cents / 100.0,
                len({m for _, _, m in ten}),
                ratio,
                gap,
                ts // 3_600_000 % 24,
            ]
        )
    return np.array(rows, np.float32)


def test_features_equal_their_definitions_on_a_generated_stream() -> None:
    stream = generate(20_000, seed=10, fraud_rate=0.05)
    np.testing.assert_array_equal(HandCardFeatures().transform(stream), reference_features(stream))


@functools.cache
def streams() -> dict[str, tuple[list[Transaction], np.ndarray[Any, Any]]]:
    """Two streams of 3,000 payments, each with its features computed offline in one call."""
    generated = generate(3_000, seed=11, fraud_rate=0.05)
    # Twenty cards only, every seventh payment five minutes late: many payments per card
    # per batch (many rounds), full rings and out-of-order events.
    crowded = [
        msgspec.structs.replace(t, card=f"card-{i % 20}", ts=t.ts - (300_000 if i % 7 == 0 else 0))
        for i, t in enumerate(generated)
    ]
    return {
        name: (stream, HandCardFeatures().transform(stream))
        for name, stream in (("generated", generated), ("crowded", crowded))
    }


@settings(max_examples=40, deadline=None)
@given(
    which=st.sampled_from(["generated", "crowded"]),
    cuts=st.lists(st.integers(min_value=0, max_value=3_000), max_size=40),
    min_vector=st.sampled_from([1, 16, 10**9]),
)
def test_online_batches_equal_the_offline_transform(
    which: str, cuts: list[int], min_vector: int
) -> None:
    stream, offline = streams()[which]  # computed with the default paths, in one call
    stage = HandCardFeatures()
    bounds = [0, *sorted(set(cuts)), len(stream)]
    rows = []
    with mock.patch.object(features_module, "_MIN_VECTOR", min_vector):
        for start, end in itertools.pairwise(bounds):
            batch = batch_of(stream[start:end])
            assert stage(batch) is batch
            assert batch.inputs is not None
            rows.append(batch.inputs["features"])
    online = np.concatenate(rows)
    assert online.dtype == np.float32
    np.testing.assert_array_equal(online, offline)


def test_an_empty_batch_gets_an_empty_feature_array() -> None:
    batch = HandCardFeatures()(batch_of([]))
    assert batch.inputs is not None
    assert batch.inputs["features"].shape == (0, len(FEATURE_NAMES))


def test_state_is_kept_per_card() -> None:
    stage = HandCardFeatures()
    stage.transform(generate(1_000, seed=12))
    assert len(stage) == len({t.card for t in generate(1_000, seed=12)})


# --- the model ------------------------------------------------------------------------------


def test_the_onnx_export_scores_like_scikit_learn() -> None:
    events = generate(8_000, seed=13, fraud_rate=0.05)
    features = HandCardFeatures().transform(events)
    labels = np.array([e.is_fraud for e in events])
    model = fit_model(features, labels)
    onnx = onnx_scores(sklearn_to_onnx(model, len(FEATURE_NAMES)), features)
    assert np.max(np.abs(onnx - model.predict_proba(features)[:, 1])) < 1e-5


def test_training_writes_a_model_that_separates_fraud(tmp_path: Path) -> None:
    path = tmp_path / "models" / "fraud.onnx"
    report = train(path, n=20_000, seed=14)
    assert report.path == path
    assert [p.name for p in path.parent.iterdir()] == ["fraud.onnx"]  # no temporary left
    assert report.train_rows + report.test_rows == 20_000
    assert report.roc_auc > 0.8
    assert 0.0 < report.precision <= 1.0
    assert 0.0 < report.recall <= 1.0
    assert report.onnx_max_abs_diff < 1e-4
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    assert (model_input.name, model_input.type) == ("features", "tensor(float)")
    assert model_input.shape[1] == len(FEATURE_NAMES)
    assert [o.name for o in session.get_outputs()] == ["label", "probabilities"]


def test_ensure_model_trains_only_when_the_cache_lacks_the_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    trained: list[Path] = []

    def fake_train(path: Path) -> None:
        trained.append(path)
        path.write_bytes(b"model")

    monkeypatch.setattr(training_module, "train", fake_train)
    path = ensure_model(tmp_path)
    assert path == tmp_path / f"{MODEL_VERSION}.onnx"
    assert trained == [path]
    assert "training the fraud model (first run only" in capsys.readouterr().err
    assert ensure_model(tmp_path) == path
    assert trained == [path]
    assert capsys.readouterr().err == ""


def test_the_model_version_follows_the_generator() -> None:
    assert f"g{GENERATOR_VERSION}-" in MODEL_VERSION


# -- the declared features: the offline path and the engine stage ----------------------------


def test_the_served_features_equal_the_offline_path_on_the_demo_stream() -> None:
    from rtinfer.demo.run import DEMO_SEED

    stream = generate(40_000, seed=DEMO_SEED)  # the stream `rtinfer demo` scores
    np.testing.assert_array_equal(HandCardFeatures().transform(stream), offline_features(stream))


@pytest.mark.parametrize("size", [1, 9, 256])
def test_the_engine_stage_equals_the_offline_path_in_any_batches(size: int) -> None:
    from rtinfer.types import Position

    stream = generate(2_000, seed=13, fraud_rate=0.05)
    stage = CardFeatures()
    rows = []
    for start in range(0, len(stream), size):
        events = [
            Event(b"", ingest_time=0.0, data=t, position=Position("p", 0, start + i))
            for i, t in enumerate(stream[start : start + size])
        ]
        batch = stage(Batch(events))
        assert batch.inputs is not None
        assert not batch.dead
        rows.append(batch.inputs["features"])
    np.testing.assert_array_equal(np.concatenate(rows), offline_features(stream))
    np.testing.assert_array_equal(np.concatenate(rows), HandCardFeatures().transform(stream))
