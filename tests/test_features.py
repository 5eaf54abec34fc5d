"""Online features: definitions, exactness online against offline, and an independent reference.

The reference is DuckDB (sliding, tumbling and hopping windows, as SQL over a self-join)
and plain Python (sessions), given which events were accepted by the watermark rule
computed in pandas; none of it shares code with rtinfer.features.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import msgspec
import pytest

from features_helpers import BASE, DEFINITION, H5M, S5M, ReferenceEngine, payments, write_jsonl
from rtinfer.exceptions import ConfigError
from rtinfer.features import (
    Engine,
    Feature,
    FeatureSet,
    FeatureStage,
    Partition,
    Window,
    backfill,
    load_definition,
)
from rtinfer.features.backfill import backfill_rows, read_events
from rtinfer.features.rows import RowReader
from rtinfer.pipeline import Pipeline
from rtinfer.sinks.memory import ListSink
from rtinfer.stages import Decode
from rtinfer.testing import ListSource
from rtinfer.types import Batch, Event, Position

NAMES = [f["name"] for f in DEFINITION["features"]]


# -- definitions ---------------------------------------------------------------------------


def test_yaml_definition_loads(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "f.yaml"
    path.write_text(yaml.safe_dump(DEFINITION))
    fs = load_definition(path)
    assert fs.names == NAMES
    assert fs.out_of_orderness == 10.0
    assert fs.features[10].window == Window("hopping", 300.0, 60.0)


def test_python_and_yaml_definitions_are_equal() -> None:
    python = FeatureSet(
        name="x",
        key="card",
        time="ts",
        features=[Feature("n", "count", window=Window.sliding("10m"))],
    )
    assert python == load_definition(
        {"name": "x", "key": "card", "time": "ts", "features": [
            {"name": "n", "agg": "count", "window": {"sliding": 600}}]}
    )  # fmt: skip


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ({"late": "drop"}, "late", "dead_letter"),
        ({"time_unit": "us"}, "time_unit", "'ms' or 's'"),
        ({"out_of_orderness": "ten"}, "out_of_orderness", "10m"),
        ({"colour": 1}, "colour", "unknown keys"),
        ({"features": [{"name": "a", "agg": "median", "field": "x", "window": {"sliding": 1}}]},
         "features.0.agg", "median"),
        ({"features": [{"name": "a", "agg": "sum", "window": {"sliding": 1}}]},
         "features.0.field", "needs a field"),
        ({"features": [{"name": "a", "agg": "count", "window": {"sliding": 1, "session": 2}}]},
         "features.0.window", "exactly one"),
        ({"features": [{"name": "a", "agg": "count", "window": {"hopping": 60, "hop": 120}}]},
         "features.0.window", "hop <= size"),
        ({"features": [{"name": "a", "agg": "count", "window": {"sliding": 1}},
                       {"name": "a", "agg": "count", "window": {"sliding": 2}}]},
         "features.1.name", "twice"),
    ],
)  # fmt: skip
def test_definition_errors_name_the_key(change: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_definition({**DEFINITION, **change})
    assert info.value.key == key
    assert words in str(info.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nfeatures: []\n")
    with pytest.raises(ConfigError) as info:
        load_definition(path)
    assert str(path) in str(info.value)
    assert info.value.key == "features"


# -- online == offline ----------------------------------------------------------------------


async def run_online(
    records: list[dict[str, Any]], definition: Any, *, read_size: int, **stage: Any
) -> tuple[list[dict[str, Any]], list[Any]]:
    sink, dead = ListSink(), ListSink()
    source = ListSource([msgspec.json.encode(r) for r in records])
    pipeline = Pipeline(
        source,
        [Decode(None), FeatureStage(definition, emit="result", **stage)],
        [sink],
        dead_letters=dead,
        read_size=read_size,
    )
    await pipeline.run()
    return sink.results, dead.results


@pytest.mark.parametrize("read_size", [1, 7, 256])
async def test_online_matches_offline_exactly(tmp_path: Path, read_size: int) -> None:
    records = payments(3000)
    online, dead = await run_online(records, DEFINITION, read_size=read_size)
    events = write_jsonl(tmp_path / "events.jsonl", records)
    report = backfill(DEFINITION, events, tmp_path / "features.jsonl")
    offline = list(read_events(tmp_path / "features.jsonl"))
    assert report.late == len(dead) > 0  # late events are there, and left out on both paths
    assert {d["reason"].split(":")[0] for d in dead} == {"late"}
    assert len(online) == len(offline) == report.rows
    for a, b in zip(online, offline, strict=True):
        assert a["id"] == b["id"]
        for name in NAMES:  # bit for bit: the same float, not merely close
            assert a[name] == b[name], (a["id"], name, a[name], b[name])


async def test_update_policy_matches_offline_exactly(tmp_path: Path) -> None:
    definition = {**DEFINITION, "late": "update"}
    records = payments(1500, seed=3)
    online, dead = await run_online(records, definition, read_size=13)
    assert not dead
    events = write_jsonl(tmp_path / "events.jsonl", records)
    report = backfill(definition, events, tmp_path / "f.csv")
    assert report.late > 0
    assert report.rows == len(records)
    offline = list(read_events(tmp_path / "f.csv"))
    assert [[r[n] for n in NAMES] for r in online] == [[r[n] for n in NAMES] for r in offline]


async def test_backfill_formats_agree(tmp_path: Path) -> None:
    records = payments(800, seed=5)
    events = write_jsonl(tmp_path / "events.jsonl", records)
    outputs = {}
    for suffix in (".jsonl", ".csv", ".parquet"):
        backfill(DEFINITION, events, tmp_path / f"out{suffix}")
        outputs[suffix] = [
            [r[n] for n in ["id", *NAMES]] for r in read_events(tmp_path / f"out{suffix}")
        ]
    import pandas as pd

    pd.DataFrame(records).to_parquet(tmp_path / "events.parquet")
    pd.DataFrame(records).to_csv(tmp_path / "events.csv", index=False)
    for name in ("events.parquet", "events.csv"):
        backfill(DEFINITION, tmp_path / name, tmp_path / "again.jsonl")
        outputs[name] = [
            [r[n] for n in ["id", *NAMES]] for r in read_events(tmp_path / "again.jsonl")
        ]
    first = outputs[".jsonl"]
    assert len(first) > 700
    for rows in outputs.values():
        assert rows == first


# -- the generated loop against the plain one ---------------------------------------------

EVERY_KIND = [
    *DEFINITION["features"],
    {"name": "ewm_5m", "agg": "ewm", "field": "amount", "alpha": 0.3, "current": False,
     "window": {"sliding": "5m"}},
    {"name": "ewm_1d", "agg": "ewm", "field": "amount", "alpha": 0.2, "window": {"sliding": "1d"}},
    {"name": "ewm_s90", "agg": "ewm", "field": "amount", "alpha": 0.7,
     "window": {"session": "90s"}},
    {"name": "approx_5m", "agg": "approx_distinct", "field": "merchant", "window": S5M},
    {"name": "mean_t2m", "agg": "mean", "field": "amount", "current": False, "default": -1,
     "window": {"tumbling": "2m"}},
    {"name": "std_s90", "agg": "std", "field": "amount", "current": False,
     "window": {"session": "90s"}},
    {"name": "n_h5m_before", "agg": "count", "current": False, "window": H5M},
    {"name": "last_1h", "agg": "last", "field": "ts", "current": False,
     "window": {"sliding": "1h"}},
]  # fmt: skip


def same_floats(a: list[float], b: list[float]) -> bool:
    return all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("late", ["dead_letter", "update"])
@pytest.mark.parametrize("size", [1, 7, 256])
def test_the_generated_loop_equals_the_plain_one(late: str, size: int) -> None:
    definition = load_definition({**DEFINITION, "late": late, "features": EVERY_KIND})
    engine, reference = Engine(definition), ReferenceEngine(definition)
    reader = RowReader(engine)
    rows = [reader.row(r) for r in payments(2000, keys=25, seed=7)]
    ours, theirs = Partition(), Partition()
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        out, late_rows = engine.apply(ours, chunk)
        expected, expected_late = reference.apply(theirs, chunk)
        assert late_rows == expected_late
        for got, want in zip(out, expected, strict=True):
            assert (got is None) == (want is None)
            assert got is None or same_floats(got, want), (got, want)
        assert ours.touched == theirs.touched
        assert list(ours.keys.items()) == list(theirs.keys.items())  # state and its order
        assert ours.max_time == theirs.max_time
        engine.evict(ours)
        engine.evict(theirs)
        ours.touched.clear()
        theirs.touched.clear()
    assert "def apply(" in engine.source()


def test_columns_read_like_rows() -> None:
    definition = load_definition({**DEFINITION, "features": EVERY_KIND})
    reader = RowReader(Engine(definition))
    records = payments(300, seed=4)
    keys, times, columns, bad = reader.columns(records)
    assert not bad
    assert list(zip(keys, times, *columns, strict=True)) == [reader.row(r) for r in records]
    records[5] = {**records[5], "amount": "lots"}  # a bad event: read again row by row
    keys, times, columns, bad = reader.columns(records)
    assert list(bad) == [5]
    assert "'amount' must be a number" in bad[5]
    assert keys[5] is None
    assert keys[6] == records[6]["card"]


# -- against an independent reference -----------------------------------------------------


def reference(records: list[dict[str, Any]], delay_ms: int) -> dict[str, dict[str, float]]:
    """Every accepted event's features, by DuckDB SQL and plain Python, keyed by id."""
    import duckdb
    import pandas as pd

    df = pd.DataFrame(records)
    df["seq"] = range(len(df))
    df["accepted"] = df["ts"] >= df["ts"].cummax() - delay_ms  # the watermark rule
    df["rel"] = df["ts"] - BASE
    con = duckdb.connect()
    con.register("ev", df)
    windows = {
        "s5": "b.ts > a.ts - 300000 AND b.ts <= a.ts",
        "s1": "b.ts > a.ts - 60000 AND b.ts <= a.ts",
        # Tumbling and hopping windows are aligned to the epoch.
        "t2": "b.ts >= floor(a.ts / 120000) * 120000 "
        "AND b.ts < floor(a.ts / 120000) * 120000 + 120000",
        "h5": "b.ts >= floor(a.ts / 60000) * 60000 AND b.ts < floor(a.ts / 60000) * 60000 + 300000",
    }
    aggregates = {
        "n_5m": ("s5", "count(*)"),
        "sum_5m": ("s5", "sum(b.amount)"),
        "mean_1m": ("s1", "avg(b.amount)"),
        "min_5m": ("s5", "min(b.amount)"),
        "max_5m": ("s5", "max(b.amount)"),
        "std_5m": ("s5", "stddev_pop(b.amount)"),
        "last_5m": ("s5", "arg_max(b.amount, b.rel * 100000 + b.seq)"),
        "merchants_5m": ("s5", "count(DISTINCT b.merchant)"),
        "n_t2m": ("t2", "count(*)"),
        "sum_t2m": ("t2", "sum(b.amount)"),
        "max_h5m": ("h5", "max(b.amount)"),
        "n_h5m": ("h5", "count(*)"),
    }
    out: dict[str, dict[str, float]] = {r["id"]: {} for r in records}
    for name, (window, aggregate) in aggregates.items():
        rows = con.execute(
            f"""SELECT a.id, {aggregate} FROM ev a JOIN ev b
                ON a.card = b.card AND b.seq <= a.seq AND b.accepted AND {windows[window]}
                WHERE a.accepted GROUP BY a.id"""  # noqa: S608 (the test's own constants)
        ).fetchall()
        for event_id, value in rows:
            out[event_id][name] = float(value)
    # Sessions: the run of visible events, in (time, arrival) order, each < 90 s after the last.
    accepted = df[df["accepted"]].to_dict("records")
    for a in accepted:
        seen = sorted(
            ((b["ts"], b["seq"], b["amount"]) for b in accepted
             if b["card"] == a["card"] and b["seq"] <= a["seq"]),
        )  # fmt: skip
        at = next(i for i, b in enumerate(seen) if b[1] == a["seq"])
        lo = at
        while lo > 0 and seen[lo][0] - seen[lo - 1][0] < 90_000:
            lo -= 1
        hi = at + 1
        while hi < len(seen) and seen[hi][0] - seen[hi - 1][0] < 90_000:
            hi += 1
        out[a["id"]]["n_s90"] = float(hi - lo)
        out[a["id"]]["sum_s90"] = math.fsum(b[2] for b in seen[lo:hi])
    return {k: v for k, v in out.items() if v}


async def test_matches_independent_reference(tmp_path: Path) -> None:
    records = payments(2500, keys=25, seed=11)
    expected = reference(records, delay_ms=30_000)
    online, dead = await run_online(records, DEFINITION, read_size=64)
    assert len(online) == len(expected)
    assert len(dead) == len(records) - len(expected)
    assert len(dead) > 10
    mismatches = [
        (row["id"], name, row[name], expected[row["id"]][name])
        for row in online
        for name in NAMES
        if not math.isclose(row[name], expected[row["id"]][name], rel_tol=1e-9, abs_tol=1e-9)
    ]
    assert not mismatches, mismatches[:10]
    # The stream really exercised the windows: multi-event windows and merged sessions.
    assert max(r["n_5m"] for r in online) > 5
    assert max(r["merchants_5m"] for r in online) > 3
    assert max(r["n_s90"] for r in online) > 5
    out_of_order = sum(1 for a, b in itertools.pairwise(records) if b["ts"] < a["ts"])
    assert out_of_order > 300


# -- the stage on its own ------------------------------------------------------------------


def batch_of(records: list[dict[str, Any]], start: int = 0, partition: int = 0) -> Batch:
    return Batch(
        [
            Event(b"{}", ingest_time=0.0, data=r, id=r.get("id"),
                  position=Position("t", partition, start + i))
            for i, r in enumerate(records)
        ]
    )  # fmt: skip


def test_stage_sets_inputs_and_appends_to_an_existing_input() -> None:
    stage = FeatureStage(
        {"name": "s", "key": "k", "time": "t", "time_unit": "s",
         "features": [{"name": "n", "agg": "count", "window": {"sliding": 10}},
                      {"name": "total", "agg": "sum", "field": "x", "window": {"sliding": 10}}]},
    )  # fmt: skip
    import numpy as np

    batch = batch_of([{"k": "a", "t": 1, "x": 2}, {"k": "a", "t": 5, "x": 3}, {"k": "b", "t": 6}])
    batch.inputs = {"features": np.array([[9.0], [8.0], [7.0]], np.float32)}
    stage(batch)
    assert len(batch.events) == 2
    assert len(batch.dead) == 1
    assert "no field" in batch.dead[0].reason
    assert "'x'" in batch.dead[0].reason
    assert batch.inputs["features"].tolist() == [[9.0, 1.0, 2.0], [8.0, 2.0, 5.0]]
    batch = batch_of([{"k": "a", "t": 16, "x": 1}], start=3)
    stage(batch)
    assert batch.inputs is not None
    assert batch.inputs["features"].tolist() == [[1.0, 1.0]]  # t=1 and t=5 left the window


def test_partitions_keep_their_own_state_and_watermark() -> None:
    stage = FeatureStage(
        {"name": "s", "key": "k", "time": "t", "time_unit": "s",
         "features": [{"name": "n", "agg": "count", "window": {"sliding": 100}}]},
    )  # fmt: skip
    stage(batch_of([{"k": "a", "t": 1000}], partition=0))
    batch = batch_of([{"k": "a", "t": 5}], partition=1)  # late for partition 0, not for 1
    stage(batch)
    assert not batch.dead
    assert batch.inputs is not None
    assert batch.inputs["features"].tolist() == [[1.0]]
    assert len(stage) == 2


async def test_side_output_takes_late_events(tmp_path: Path) -> None:
    definition = {**DEFINITION, "late": "side_output"}
    side = tmp_path / "late.jsonl"
    records = payments(600, seed=2)
    online, dead = await run_online(records, definition, read_size=32, side_output=str(side))
    late = list(read_events(side))
    assert not dead
    assert late
    assert len(online) + len(late) == len(records)
    assert all(r["reason"].startswith("late") for r in late)
    assert {r["id"] for r in late}.isdisjoint(r["id"] for r in online)


def test_rows_are_checked_with_reasons() -> None:
    stage = FeatureStage(
        {"name": "s", "key": "k", "time": "t",
         "features": [{"name": "m", "agg": "mean", "field": "x", "window": {"sliding": 10}}]},
    )  # fmt: skip
    batch = batch_of(
        [{"k": ["list"], "t": 1, "x": 1}, {"k": "a", "t": "soon", "x": 1},
         {"k": "a", "t": 1, "x": "many"}, {"k": "a", "t": 1, "x": float("nan")}]
    )  # fmt: skip
    stage(batch)
    reasons = [d.reason for d in batch.dead]
    assert len(reasons) == 4
    assert not batch.events
    assert "key" in reasons[0]
    assert "event time" in reasons[1]
    assert "'x' must be a number" in reasons[2]
    assert "finite" in reasons[3]


def test_backfill_rows_needs_fields_for_key_and_time() -> None:
    with pytest.raises(ConfigError, match="key and time"):
        list(backfill_rows({**DEFINITION, "time": None}, []))
