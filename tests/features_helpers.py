"""Shared by the feature tests: a stream of card payments with disorder, and its definition."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import msgspec

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
