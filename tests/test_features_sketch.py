"""Approximate distinct counts (HyperLogLog), ewm and windows of earlier events: each
against an exact count or a plain reference, and the same online as offline."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from rtinfer.exceptions import ConfigError
from rtinfer.features import FeatureStage, load_definition
from rtinfer.features.backfill import backfill_rows
from rtinfer.features.sketch import HyperLogLog, code_of, estimate_codes, relative_error
from rtinfer.types import Batch, Event, Position

BASE = 1_700_000_000_000
SIGMA = relative_error(12)  # 1.04 / 64


@pytest.mark.parametrize("n", [1, 10, 300, 3_000, 30_000, 300_000])
def test_sketch_estimates_within_the_documented_error(n: int) -> None:
    sketch = HyperLogLog(12)
    sketch.update(f"device-{i}" for i in range(n))
    assert abs(sketch.estimate() - n) <= 3 * SIGMA * n + 0.5
    # The same estimate from the codes, in any order (what the engine computes).
    codes = [code_of(f"device-{i}", 12) for i in range(n)]
    random.Random(n).shuffle(codes)
    assert estimate_codes(codes, 12) == sketch.estimate()


def test_sketches_merge_into_the_sketch_of_the_union() -> None:
    a, b, union = HyperLogLog(10), HyperLogLog(10), HyperLogLog(10)
    a.update(range(0, 6_000))
    b.update(range(4_000, 10_000))
    union.update(range(10_000))
    assert a.merge(b).registers == union.registers
    assert abs(a.estimate() - 10_000) <= 3 * relative_error(10) * 10_000
    with pytest.raises(ValueError, match="precision"):
        a.merge(HyperLogLog(11))
    assert HyperLogLog().estimate() == 0.0
    # Equal numbers are one value, as for the exact distinct; the hash is stable.
    assert code_of(5, 12) == code_of(5.0, 12) != code_of("5", 12)


def stream(n: int, seed: int = 3) -> list[dict[str, Any]]:
    """Logins at a few sites: devices drawn from a long tail (a few busy, most seen once),
    about 20 per second, a third of them up to 5 s out of order."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ts = BASE + i * 50 - (rng.randint(0, 5_000) if rng.random() < 0.3 else 0)
        device = int(rng.paretovariate(0.7)) if rng.random() < 0.5 else rng.randrange(10**9)
        amount = round(rng.uniform(1, 300), 2)
        out.append({"id": f"e{i}", "site": f"s{rng.randrange(3)}", "ts": ts,
                    "device": f"dev-{device}", "amount": amount})  # fmt: skip
    return out


SITES = {
    "name": "sites",
    "key": "site",
    "time": "ts",
    "out_of_orderness": "10s",
    "features": [
        {"name": "devices", "agg": "distinct", "field": "device", "window": {"sliding": "5m"}},
        {"name": "devices_hll", "agg": "approx_distinct", "field": "device",
         "window": {"sliding": "5m"}},
        {"name": "devices_hll8", "agg": "approx_distinct", "field": "device", "precision": 8,
         "window": {"tumbling": "1m"}},
        {"name": "usual", "agg": "ewm", "field": "amount", "alpha": 0.1, "current": False,
         "window": {"sliding": "1m"}},
        {"name": "previous", "agg": "last", "field": "ts", "current": False, "default": -1,
         "window": {"sliding": "1m"}},
        {"name": "earlier", "agg": "count", "current": False, "window": {"sliding": "1m"}},
    ],
}  # fmt: skip


def test_approx_distinct_is_within_its_bound_of_the_exact_count() -> None:
    records = stream(20_000)
    rows = [values for _, _, values in backfill_rows(SITES, records)]
    assert len(rows) == len(records)  # nothing late: 5 s out of order, 10 s allowed
    errors = [(hll - exact) / exact for exact, hll, *_ in rows if exact >= 100]
    assert max(exact for exact, *_ in rows) > 1_000  # a high-cardinality window
    assert len(errors) > 15_000
    rms = math.sqrt(sum(e * e for e in errors) / len(errors))
    assert rms <= 1.5 * SIGMA, rms
    beyond = sum(1 for e in errors if abs(e) > 3 * SIGMA)
    assert beyond <= 0.01 * len(errors), beyond
    small = [(exact, hll) for exact, hll, *_ in rows if exact < 20]
    assert small
    assert all(abs(hll - exact) < 0.5 for exact, hll in small)  # nearly exact when small


def test_earlier_events_ewm_and_last_match_a_plain_reference() -> None:
    records = stream(3_000, seed=5)
    got = {r["id"]: v for _, r, v in backfill_rows(SITES, records)}
    for record in records:
        earlier = sorted(
            (r for r in records[: records.index(record)]
             if r["site"] == record["site"] and record["ts"] - 60_000 < r["ts"] <= record["ts"]),
            key=lambda r: r["ts"],
        )  # fmt: skip
        values = got[record["id"]]
        assert values[5] == len(earlier)
        if not earlier:
            assert math.isnan(values[3])
            assert values[4] == -1
            continue
        usual = float(earlier[0]["amount"])
        for r in earlier[1:]:
            usual += 0.1 * (r["amount"] - usual)
        assert values[3] == usual
        assert values[4] == earlier[-1]["ts"]


@pytest.mark.parametrize("size", [1, 7, 256])
def test_online_equals_offline(size: int) -> None:
    records = stream(3_000, seed=9)
    offline = [v for _, _, v in backfill_rows(SITES, records)]
    stage = FeatureStage(SITES, emit="result")
    online = []
    for start in range(0, len(records), size):
        events = [Event(b"", ingest_time=0.0, data=r, position=Position("t", 0, start + i))
                  for i, r in enumerate(records[start : start + size])]  # fmt: skip
        batch = stage(Batch(events))
        online += [[e.result[n] for n in load_definition(SITES).names] for e in batch.events]
    assert len(online) == len(offline)
    for a, b in zip(online, offline, strict=True):  # bit for bit, NaN included
        assert [x if x == x else "nan" for x in a] == [x if x == x else "nan" for x in b]


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ({"agg": "ewm"}, "alpha", "alpha"),
        ({"agg": "ewm", "alpha": 1.5}, "alpha", "(0, 1]"),
        ({"agg": "sum", "alpha": 0.5}, "alpha", "only ewm"),
        ({"agg": "approx_distinct", "precision": 30}, "precision", "4 to 18"),
        ({"agg": "distinct", "precision": 12}, "precision", "only approx_distinct"),
        ({"agg": "last", "default": 0}, "default", "current: false"),
        ({"agg": "last", "current": "no"}, "current", "true or false"),
    ],
)  # fmt: skip
def test_option_errors_name_the_key(change: dict[str, Any], key: str, words: str) -> None:
    feature = {"name": "f", "field": "amount", "window": {"sliding": "1m"}, **change}
    with pytest.raises(ConfigError) as info:
        load_definition({"name": "x", "key": "k", "time": "ts", "features": [feature]})
    assert info.value.key == f"features.0.{key}"
    assert words in str(info.value)
