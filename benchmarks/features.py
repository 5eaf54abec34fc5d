"""A feature stage with three aggregates over 100,000 keys, beside a plain dict implementation.

    python benchmarks/features.py [--events 1000000] [--keys 100000] [--repeats 3] [--smoke]

The three aggregates (count, sum and max of ``amount`` over a sliding 5-minute
window, per card, in event time) computed three ways on the same events, in the
same run, alternating (A B C A B C):

1. **dict**: what one writes by hand: a dict from card to a deque of (time,
   amount), expired entries popped from the left, count/sum/max of what remains;
   in-order events only, no watermark, no state store, no batches;
2. **engine**: rtinfer's :class:`~rtinfer.features.engine.Engine` on ready rows
   (the shared online/offline code path: watermark, out-of-order insertion,
   pruning, eviction);
3. **stage**: :class:`~rtinfer.features.FeatureStage` on batches of 256 decoded
   events (reads the fields, checks them, builds the model input array).

Reported: events/s and feature updates/s (events x 3 aggregates) per core (one
process, one thread), and the cost per event relative to the dict. The target
(issue 6) is at least 200,000 feature updates/s per core. Run on an idle machine,
pinned: ``taskset -c 0 python benchmarks/features.py``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from common import spread

from rtinfer.features import FeatureStage
from rtinfer.features.engine import Engine, Partition
from rtinfer.features.rows import RowReader
from rtinfer.types import Batch, Event, Position

WINDOW_MS = 300_000
DEFINITION = {
    "name": "bench",
    "key": "card",
    "time": "ts",
    "time_unit": "ms",
    "out_of_orderness": "5s",
    "features": [
        {"name": "n_5m", "agg": "count", "window": {"sliding": "5m"}},
        {"name": "sum_5m", "agg": "sum", "field": "amount", "window": {"sliding": "5m"}},
        {"name": "max_5m", "agg": "max", "field": "amount", "window": {"sliding": "5m"}},
    ],
}


def make_events(n: int, keys: int, seed: int = 1) -> list[dict[str, Any]]:
    """In-order payments, ``n / 1000`` per second of event time, over ``keys`` cards."""
    rng = random.Random(seed)
    return [
        {
            "card": f"c{rng.randrange(keys)}",
            "ts": 1_700_000_000_000 + i,
            "amount": rng.uniform(1, 500),
        }
        for i in range(n)
    ]


def run_dict(events: list[dict[str, Any]]) -> float:
    began = time.perf_counter()
    state: dict[str, deque[tuple[int, float]]] = {}
    sink = 0.0
    for e in events:
        card, ts, amount = e["card"], e["ts"], e["amount"]
        q = state.get(card)
        if q is None:
            q = state[card] = deque()
        cut = ts - WINDOW_MS
        while q and q[0][0] <= cut:
            q.popleft()
        q.append((ts, amount))
        count = len(q)
        total = sum(a for _, a in q)
        high = max(a for _, a in q)
        sink += count + total + high
    return time.perf_counter() - began


def run_engine(events: list[dict[str, Any]]) -> float:
    engine = Engine(FeatureStage(DEFINITION).definition)
    reader = RowReader(engine)
    rows = [reader.row(e) for e in events]  # not timed: the stage run times the reading
    part = Partition()
    began = time.perf_counter()
    for start in range(0, len(rows), 256):
        engine.apply(part, rows[start : start + 256])
        engine.evict(part)
        part.touched.clear()
    return time.perf_counter() - began


def run_stage(events: list[dict[str, Any]]) -> float:
    stage = FeatureStage(DEFINITION)
    batches = [
        [
            Event(b"", ingest_time=0.0, data=e, position=Position("bench", 0, start + i))
            for i, e in enumerate(events[start : start + 256])
        ]
        for start in range(0, len(events), 256)
    ]
    began = time.perf_counter()
    for events_of_batch in batches:
        stage(Batch(events_of_batch))
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny run: checks it works")
    args = parser.parse_args()
    if args.smoke:
        args.events, args.keys, args.repeats = 20_000, 2_000, 1
    events = make_events(args.events, args.keys)
    runs: dict[str, Callable[[list[dict[str, Any]]], float]] = {
        "dict": run_dict,
        "engine": run_engine,
        "stage": run_stage,
    }
    rates: dict[str, list[float]] = {name: [] for name in runs}
    run_engine(events[:20_000])  # warm-up
    for _ in range(args.repeats):
        for name, run in runs.items():
            rates[name].append(args.events / run(events))
    base = sorted(rates["dict"])[len(rates["dict"]) // 2]
    print(f"{args.events:,} events over {args.keys:,} keys, 3 aggregates (count, sum, max, 5 min "
          f"sliding), median (range) of {args.repeats}:")  # fmt: skip
    print(f"{'':8} {'events/s':>28} {'updates/s':>12} {'cost vs dict':>13}")
    for name, values in rates.items():
        median = sorted(values)[len(values) // 2]
        print(f"{name:8} {spread(values):>28} {3 * median:>12,.0f} {base / median:>12.2f}x")
    if args.smoke:
        print("(smoke run: figures from a tiny run on a busy machine mean nothing)")


if __name__ == "__main__":
    main()
