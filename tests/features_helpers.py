"""Shared by the feature tests: a stream of card payments with disorder, and its definition."""

from __future__ import annotations

import random
from bisect import bisect_right
from pathlib import Path
from typing import Any

import msgspec

from rtinfer.features import FeatureSet, Partition, Window
from rtinfer.features.aggregates import aggregate_of, column_kind, empty_value
from rtinfer.features.windows import cut_of, range_of, scaled

BASE = 1_700_000_000_000  # ms

S5M, H5M = {"sliding": "5m"}, {"hopping": "5m", "hop": "1m"}
DEFINITION: dict[str, Any] = {
    "name": "cards",
    "key": "card",
    "time": "ts",
    "time_unit": "ms",
    "out_of_orderness": "10s",
    "allowed_lateness": "20s",
    "late": "dead_letter",
    "features": [
        {"name": "n_5m", "agg": "count", "window": {"sliding": "5m"}},
        {"name": "sum_5m", "agg": "sum", "field": "amount", "window": {"sliding": "5m"}},
        {"name": "mean_1m", "agg": "mean", "field": "amount", "window": {"sliding": "1m"}},
        {"name": "min_5m", "agg": "min", "field": "amount", "window": {"sliding": "5m"}},
        {"name": "max_5m", "agg": "max", "field": "amount", "window": {"sliding": "5m"}},
        {"name": "std_5m", "agg": "std", "field": "amount", "window": {"sliding": "5m"}},
        {"name": "last_5m", "agg": "last", "field": "amount", "window": {"sliding": "5m"}},
        {"name": "merchants_5m", "agg": "distinct", "field": "merchant", "window": S5M},
        {"name": "n_t2m", "agg": "count", "window": {"tumbling": "2m"}},
        {"name": "sum_t2m", "agg": "sum", "field": "amount", "window": {"tumbling": "2m"}},
        {"name": "max_h5m", "agg": "max", "field": "amount", "window": H5M},
        {"name": "n_h5m", "agg": "count", "window": {"hopping": "5m", "hop": "1m"}},
        {"name": "n_s90", "agg": "count", "window": {"session": "90s"}},
        {"name": "sum_s90", "agg": "sum", "field": "amount", "window": {"session": "90s"}},
    ],
}  # fmt: skip

SLIDING = {"n_5m", "sum_5m", "min_5m", "max_5m", "std_5m", "last_5m", "merchants_5m"}


def payments(
    n: int, *, keys: int = 40, seed: int = 1, late_every: int = 50
) -> list[dict[str, Any]]:
    """``n`` payments in arrival order: times drift forward, most a little out of order
    (up to 25 s back), every ``late_every``-th far behind (up to 3 minutes: too late)."""
    rng = random.Random(seed)
    clock = BASE
    out = []
    for i in range(n):
        clock += rng.randint(0, 2_000)
        ts = clock - rng.randint(0, 25_000) if rng.random() < 0.3 else clock
        if late_every and i % late_every == late_every - 1:
            ts = clock - rng.randint(30_000, 180_000)
        out.append(
            {
                "id": f"p{i}",
                "card": f"c{rng.randrange(keys)}",
                "ts": ts,
                "amount": round(rng.uniform(1, 500), 2),
                "merchant": f"m{rng.randrange(12)}",
            }
        )
    return out


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in records))
    return path


class ReferenceEngine:
    """The engine's per-event loop written plainly (as it was before it was generated per
    definition): one call per window and per aggregate, a slice per aggregate. The
    generated loop must give exactly these values, state and late rows."""

    def __init__(self, definition: FeatureSet) -> None:
        in_ms = definition.time not in (None, "processing") and definition.time_unit == "ms"
        self.scale = 1000 if in_ms else 1
        self.delay = scaled(definition.out_of_orderness + definition.allowed_lateness, self.scale)
        self.update = definition.late == "update"
        self.width = len(definition.features)
        columns: list[tuple[str, str]] = []
        groups: dict[Window, tuple[list[Any], list[Any]]] = {}
        for j, feature in enumerate(definition.features):
            column = 0
            if feature.field is not None:
                spec = (feature.field, column_kind(feature))
                if spec not in columns:
                    columns.append(spec)
                column = 1 + columns.index(spec)
            current, before = groups.setdefault(feature.window, ([], []))
            if feature.current:
                current.append((aggregate_of(feature), column, j))
            else:
                before.append((aggregate_of(feature), column, j, empty_value(feature)))
        self.ncols = len(columns)
        self.groups = [(range_of(w, self.scale), c, b) for w, (c, b) in groups.items()]
        self.cut = cut_of(list(groups), self.scale)

    def apply(self, part: Partition, rows: list[tuple[Any, ...]]) -> tuple[list[Any], list[int]]:
        out: list[Any] = []
        late: list[int] = []
        for i, row in enumerate(rows):
            key, t = row[0], row[1]
            part.max_time = max(part.max_time, t)
            edge = part.max_time - self.delay
            if t < edge:
                late.append(i)
                if not self.update:
                    out.append(None)
                    continue
            state = part.keys.pop(key, None)
            if state is None:
                state = [[] for _ in range(self.ncols + 1)]
            part.keys[key] = state
            part.touched.add(key)
            times = state[0]
            forget = self.cut(times, edge) if times else 0
            for column in state:
                del column[:forget]
            pos = bisect_right(times, t)
            times.insert(pos, t)
            for c in range(1, self.ncols + 1):
                state[c].insert(pos, row[c + 1])
            values = [0.0] * self.width
            for window, aggregates, earlier in self.groups:
                lo, hi = window(times, t, pos)
                for aggregate, c, j in aggregates:
                    values[j] = aggregate(state[c], lo, hi)
                for aggregate, c, j, empty in earlier:
                    values[j] = aggregate(state[c], lo, pos) if lo < pos else empty
            out.append(values)
        return out, late
