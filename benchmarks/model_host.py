"""The model host (``rtinfer serve --model-process``): what the crossing costs, and merging.

    python benchmarks/model_host.py [--layers 120] [--callers 1,4] [--rows 4,16] [--seconds 3]

Several serving workers share one model process. Each worker batches its own requests,
so with N workers each batch holds about a N-th of the rows one worker's would: a model
whose cost per row falls with the batch loses throughput. The host merges the calls that
wait while the model runs into one call.

The model is the stand-in of ``overload.py`` (an ONNX MLP of ``--layers`` layers of 256
on the demo's 11 features), one intra-op thread. For each batch size ``--rows``:

- **alone**: the model called back to back in this process: rows/s. The baseline.
- **hosted**: the host in a process of its own; ``--callers`` threads here, each with its
  own connection (as each worker's model thread has), each sending batches of that size
  back to back: rows/s and the mean call's time, without merging and with it.

The ratio to ``alone`` at the same batch size is the crossing's cost (one caller) or what
merging wins back (several callers). Run it on an otherwise idle machine: the host takes
one core, the callers another. Medians over ``--repeats`` with the range.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import spread
from overload import heavy_model

from rtinfer.models import load_model
from rtinfer.models.host import HostedModel, ModelHost


def host_main(path: str, address: str, key: bytes, merge: bool, ready: Any) -> None:
    model = load_model(path)
    model.load()
    host = ModelHost(model, address, key, merge=merge)
    host.start()
    ready.send("ready")
    with contextlib.suppress(EOFError):
        ready.recv()  # until the benchmark hangs up
    host.close()


def alone(path: str, rows: int, seconds: float) -> float:
    model = load_model(path)
    model.load()
    inputs = {"features": np.random.default_rng(1).random((rows, 11), dtype=np.float32)}
    for _ in range(20):
        model.predict(inputs)
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        model.predict(inputs)
        done += rows
    return done / elapsed


def hosted(path: str, rows: int, callers: int, merge: bool, seconds: float) -> tuple[float, float]:
    """Rows/s and the mean call's ms, ``callers`` threads calling a host."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="rtinfer-bench-host-") as folder:
        address = str(Path(folder, "model.sock"))
        ours, theirs = context.Pipe()
        key = os.urandom(32)
        process = context.Process(target=host_main, args=(path, address, key, merge, theirs))
        process.start()
        try:
            assert ours.recv() == "ready"
            counts, elapsed = run_callers(address, key, rows, callers, seconds)
        finally:
            ours.close()  # the host exits
            process.join(10)
    calls = sum(counts)
    return calls * rows / elapsed, 1e3 * elapsed * callers / max(calls, 1)


def run_callers(
    address: str, key: bytes, rows: int, callers: int, seconds: float
) -> tuple[list[int], float]:
    """Calls answered per caller thread, and the seconds they were counted."""
    model = HostedModel(address, key)
    model.load()
    inputs = {"features": np.random.default_rng(1).random((rows, 11), dtype=np.float32)}
    counts = [0] * callers
    stop = threading.Event()
    start_line = threading.Barrier(callers + 1)

    def call(i: int) -> None:
        for _ in range(20):
            model.predict(inputs)
        start_line.wait()
        while not stop.is_set():
            model.predict(inputs)
            counts[i] += 1

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(callers)]
    for t in threads:
        t.start()
    start_line.wait()
    begin = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return counts, time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=120)
    parser.add_argument("--rows", default="4,16", help="rows per call (default 4,16)")
    parser.add_argument("--callers", default="1,4", help="calling threads (default 1,4)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rtinfer-bench-host-model-") as folder:
        path = str(Path(folder, "heavy.onnx"))
        heavy_model(Path(path), 1.0, args.layers)
        print(f"model: {args.layers} layers of 256, one intra-op thread; {args.seconds:g} s a run")
        heads = ("rows", 4), ("callers", 7), ("case", 14), ("rows/s", 26), ("vs alone", 18)
        print(" ".join(f"{name:>{width}}" for name, width in heads), f"{'call ms':>16}")
        for rows in (int(r) for r in args.rows.split(",")):
            base = [alone(path, rows, args.seconds) for _ in range(args.repeats)]
            print(f"{rows:>4} {'':>7} {'alone':>14} {spread(base, '{:,.0f}'):>26}")
            for callers in (int(c) for c in args.callers.split(",")):
                for merge in (False, True) if callers > 1 else (False,):
                    got = [
                        hosted(path, rows, callers, merge, args.seconds)
                        for _ in range(args.repeats)
                    ]
                    rate = [g[0] for g in got]
                    ratio = [r / b for r, b in zip(rate, base, strict=True)]
                    case = "merged" if merge else "one by one"
                    print(
                        f"{rows:>4} {callers:>7} {case:>14} {spread(rate, '{:,.0f}'):>26} "
                        f"{spread(ratio, '{:.2f}'):>18} {spread([g[1] for g in got], '{:.2f}'):>16}"
                    )


if __name__ == "__main__":
    main()
