"""The demo pipeline's speed beside its model alone, measured in one run.

    python benchmarks/pipeline.py [--events 200000] [--seconds 8] [--repeats 3]
    python benchmarks/pipeline.py --stages hand,engine --rates ""   # the two feature stages

For each repeat, in turn (A B A B, so drift hits both alike):

1. **model alone**: ONNX Runtime on the demo's features, precomputed, in batches of
   the pipeline's mean batch size and of 256: the floor, in µs per row;
2. **pipeline, unbounded**: the whole demo pipeline (in-process broker → decode →
   per-card features → micro-batched model → decision → broker), fed as fast as it
   takes events with a bounded backlog: events/s and latency;
3. **pipeline, open loop** at each ``--rates`` value for ``--seconds``: latency
   measured from each event's due time (so queueing is not hidden).

It prints the medians over the repeats with their spread (min-max), and the ratio
of the pipeline's cost per event (1 / events/s) to the model's cost per row at the
pipeline's own mean batch size. Run it on an otherwise idle machine: nothing else
timed at the same time.

``--stages hand,engine`` runs the unbounded pipeline with each feature stage in
turn (A B A B): :class:`~rtinfer.demo.features.HandCardFeatures` (hand-vectorised)
and the demo's :class:`~rtinfer.demo.features.CardFeatures` (the same features
through the general feature engine), and prints each one's events/s and cost per event,
and the median of the per-repeat cost ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any

import msgspec
import numpy as np
import onnxruntime
from common import spread

import rtinfer
from rtinfer.demo.events import Transaction
from rtinfer.demo.features import HandCardFeatures
from rtinfer.demo.run import demo_config_text, prepare_stream, run_demo
from rtinfer.demo.training import ensure_model
from rtinfer.loop import run
from rtinfer.models import OnnxModel


def machine() -> str:
    try:
        lscpu = subprocess.run(
            ["lscpu"],  # noqa: S607 - only describes the machine
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        model = next(
            (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line),
            "?",
        )
    except OSError:
        model = "?"
    return (
        f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, "
        f"rtinfer {rtinfer.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"numpy {np.__version__}"
    )


def model_alone(model: OnnxModel, features: np.ndarray[Any, Any], batch: int) -> float:
    """µs per row of ONNX Runtime on ``features`` in batches of ``batch`` rows."""
    n = len(features) - len(features) % batch
    batches = [features[i : i + batch] for i in range(0, n, batch)]
    for b in batches[:20]:
        model.predict({"features": b})  # warm-up
    started = time.perf_counter()
    for b in batches:
        model.predict({"features": b})
    return (time.perf_counter() - started) / n * 1e6


STAGES = {"hand": "HandCardFeatures", "engine": "CardFeatures"}


def run_pipeline(
    stream: Any, rate: float | None, events: int, stage: str = "engine"
) -> dict[str, Any]:
    values, keys = stream
    text = demo_config_text().replace(
        "rtinfer.demo.features:CardFeatures", f"rtinfer.demo.features:{STAGES[stage]}"
    )
    return run(
        run_demo(
            events=events,
            rate=rate,
            live=False,
            signals=False,
            stream=(values[:events], keys[:events]),
            config_text=text,
        )
    )


def compare_stages(stream: Any, stages: list[str], events: int, repeats: int) -> None:
    """Unbounded runs of each feature stage in turn, A B A B; prints their figures."""
    eps: dict[str, list[float]] = {s: [] for s in stages}
    for repeat in range(repeats):
        print(f"repeat {repeat + 1}/{repeats}", file=sys.stderr)
        for stage in stages:
            eps[stage].append(run_pipeline(stream, None, events, stage)["throughput_eps"])
    print(f"{'':34} {'median (min-max) over ' + str(repeats) + ' runs':>40}")
    for stage in stages:
        cost = [1e6 / e for e in eps[stage]]
        print(f"{stage + ', events/s':34} {spread(eps[stage]):>40}")
        print(f"{stage + ', µs/event':34} {spread(cost, '{:.2f}'):>40}")
    base = stages[0]
    for stage in stages[1:]:
        ratios = [b / s for b, s in zip(eps[base], eps[stage], strict=True)]
        print(f"{stage + ' / ' + base + ' cost ratio':34} {spread(ratios, '{:.2f}'):>40}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rates", default="2000,20000")
    parser.add_argument("--stages", default="", help="e.g. hand,engine: compare feature stages")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r]

    print(machine())
    path = ensure_model()
    print(f"model: {path}", file=sys.stderr)
    needed = max([args.events] + [int(r * args.seconds) for r in rates])
    stream = prepare_stream(needed)
    if args.stages:
        compare_stages(stream, args.stages.split(","), args.events, args.repeats)
        return
    decoder = msgspec.json.Decoder(Transaction)
    features = HandCardFeatures().transform([decoder.decode(v) for v in stream[0][: args.events]])
    model = OnnxModel(path, intra_op_threads=1, inter_op_threads=1)
    model.load()

    floor_256: list[float] = []
    floor_mean: list[float] = []
    unbounded: list[dict[str, Any]] = []
    open_loop: dict[float, list[dict[str, Any]]] = {r: [] for r in rates}
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1}/{args.repeats}", file=sys.stderr)
        u = run_pipeline(stream, None, args.events)
        unbounded.append(u)
        mean_batch = max(1, round(u["batch_size_mean"]))
        floor_mean.append(model_alone(model, features, mean_batch))
        floor_256.append(model_alone(model, features, 256))
        for r in rates:
            open_loop[r].append(run_pipeline(stream, r, int(r * args.seconds)))

    eps = [u["throughput_eps"] for u in unbounded]
    cost = [1e6 / e for e in eps]
    ratios = [c / f for c, f in zip(cost, floor_mean, strict=True)]
    print()
    print(f"{'':34} {'median (min-max) over ' + str(args.repeats) + ' runs':>40}")
    print(f"{'model alone, µs/row @ 256':34} {spread(floor_256, '{:.2f}'):>40}")
    print(f"{'model alone, µs/row @ pipeline batch':34} {spread(floor_mean, '{:.2f}'):>40}")
    print(f"{'pipeline unbounded, events/s':34} {spread(eps):>40}")
    print(f"{'pipeline cost, µs/event':34} {spread(cost, '{:.2f}'):>40}")
    print(f"{'pipeline / model cost ratio':34} {spread(ratios, '{:.2f}'):>40}")
    mean_batches = [u["batch_size_mean"] for u in unbounded]
    print(f"{'pipeline mean batch size':34} {spread(mean_batches, '{:.1f}'):>40}")
    for name, runs in [("unbounded", unbounded)] + [
        (f"open loop {r:,.0f}/s", open_loop[r]) for r in rates
    ]:
        for q in ("p50", "p99", "p999"):
            values = [run["latency_ms"][q] for run in runs]
            print(f"{name + ', ' + q + ' ms':34} {spread(values, '{:.2f}'):>40}")
        if name != "unbounded":
            got = [run["throughput_eps"] for run in runs]
            print(f"{name + ', achieved events/s':34} {spread(got):>40}")
    quality = unbounded[-1]["quality"]
    print(f"{'quality (last unbounded run)':34} {quality!s:>40}")
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'peak RSS of this process, MB':34} {rss_mb:>40,.0f}")


if __name__ == "__main__":
    main()
