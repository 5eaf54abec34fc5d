"""The micro-batcher beside a busy event loop: how much of the model's time it keeps in use.

    python benchmarks/busy_loop.py [--model-ms 2] [--turns-ms 0,2,5,10,20] [--seconds 3]

Under overload a server's event loop is never idle: each turn reads and answers every
socket that became ready meanwhile, and lasts as long as that takes (measured with
``overload.py``: 10 to 40 ms a turn while refusing 30,000 to 50,000 requests a second).
The model runs on a thread of its own (on a core of its own, where the machine has one
to spare), but the loop hands it each batch and takes each answer back, so the turns the
loop spends between one batch and the next leave the model idle, however fast its core.

This script measures exactly that. The loop is kept busy by a callback that spins for
``--turns-ms`` in each turn (holding the GIL, as request handling does). The model is a
stand-in that sleeps ``--model-ms`` per batch: it releases the GIL, as ONNX Runtime does
while it computes, and needs no core, so the figures mean the same on a 2-core machine as
on a larger one. Requests (one row each) are submitted at the start of every turn, more
than the model can take (``--rows-per-turn``, default: enough for four full batches), so
the batcher's queue never runs dry; past ``max_queue_rows`` they are refused, as a server's
are.

Per turn length: batches/s and rows/s run, mean rows per batch, the model's use (its
calls' time over the wall time), and the turns between two batches. The baseline is the
model called back to back on one thread with no loop: its use is 100%, its batches/s
``1000 / --model-ms``. Medians over ``--repeats`` with the range.

``--server``: the requests go through ``ModelServer.infer`` as a server's do, behind the
model's adaptive limiter (its latency target a third of ``--slo-ms``) with a deadline of
``--slo-ms``; also reported: answers within the SLO a second, refusals a second, and the
limiter's limit (median of a sample every 0.1 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from typing import Any

import numpy as np
from common import spread

from rtinfer.batching import MicroBatcher
from rtinfer.exceptions import DeadlineExceeded, Overloaded
from rtinfer.models.python import PythonModel
from rtinfer.serving import ModelServer


class Sleeper:
    """A model that takes ``seconds`` per call, on no core (time.sleep releases the GIL)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.busy = 0.0  # seconds spent in calls, summed on the model's thread
        self.lock = threading.Lock()

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        started = time.perf_counter()
        time.sleep(self.seconds)
        with self.lock:
            self.busy += time.perf_counter() - started
        return inputs["x"] * 2.0


async def one_run(args: argparse.Namespace, turn_ms: float) -> dict[str, float]:
    sleeper = Sleeper(args.model_ms / 1e3)
    model = PythonModel(sleeper, inputs={"x": ("float32", [None, 1])}, name="sleeper")
    batching = {"max_batch_size": args.batch, "max_delay": 0.0, "max_queue_rows": 8 * args.batch}
    slo = args.slo_ms / 1e3
    server = None
    if args.server:
        server = ModelServer(batching=batching, latency_target=slo / 3)
        server.add(model)
        await server.start()
        batcher = server.get("sleeper").batcher
        limiter = server.get("sleeper").limiter
        assert limiter is not None
    else:
        batcher = MicroBatcher(model, **batching)
        await batcher.start()
    loop = asyncio.get_running_loop()
    answered = refused = 0  # --server: answers within the SLO, refusals
    limits: list[int] = []
    inputs = {"x": np.ones((1, 1), np.float32)}
    per_turn = args.rows_per_turn or 4 * args.batch
    pending: set[asyncio.Task[Any]] = set()
    turns = 0
    stop = False

    waiting = 0  # submitted, not yet answered

    async def ask() -> None:
        nonlocal waiting
        waiting += 1
        try:
            await batcher.submit(inputs)
        except Overloaded:
            pass
        finally:
            waiting -= 1

    async def serve() -> None:
        nonlocal answered, refused
        assert server is not None
        due = time.perf_counter()
        try:
            await server.infer("sleeper", inputs, deadline=time.time() + slo)
        except Overloaded:
            refused += 1
            return
        except DeadlineExceeded:
            return
        answered += time.perf_counter() - due <= slo

    def sample() -> None:
        if not stop:
            limits.append(limiter.limit)
            loop.call_later(0.1, sample)

    def turn() -> None:
        nonlocal turns
        if stop:
            return
        turns += 1
        for _ in range(per_turn):
            if server is None and waiting >= batcher.max_queue_rows:  # a front refuses
                break
            task = loop.create_task(serve() if server is not None else ask())
            pending.add(task)
            task.add_done_callback(pending.discard)
        end = time.perf_counter() + turn_ms / 1e3
        while time.perf_counter() < end:  # the rest of the turn: other sockets
            pass
        loop.call_soon(turn)

    loop.call_soon(turn)
    await asyncio.sleep(0.3)  # settle
    batches, rows, busy, turns0 = batcher.batches, batcher.rows, sleeper.busy, turns
    answered = refused = 0
    if server is not None:
        loop.call_soon(sample)
    began = time.perf_counter()
    await asyncio.sleep(args.seconds)
    wall = time.perf_counter() - began
    batches, rows = batcher.batches - batches, batcher.rows - rows
    busy, turns = sleeper.busy - busy, turns - turns0
    in_time, shed = answered, refused
    stop = True
    await asyncio.gather(*pending, return_exceptions=True)
    await (server.aclose() if server is not None else batcher.aclose())
    return {
        "batches_s": batches / wall,
        "rows_s": rows / wall,
        "rows_per_batch": rows / max(batches, 1),
        "model_use": busy / wall,
        "turns_per_batch": turns / max(batches, 1),
        "in_time_s": in_time / wall,
        "refused_s": shed / wall,
        "limit": float(np.median(limits)) if limits else float("nan"),
    }


def baseline(args: argparse.Namespace) -> float:
    """Batches a second of the model called back to back on one thread, no loop."""
    sleeper = Sleeper(args.model_ms / 1e3)
    x = {"x": np.ones((args.batch, 1), np.float32)}
    began = time.perf_counter()
    calls = 0
    while time.perf_counter() - began < args.seconds:
        sleeper(x)
        calls += 1
    return calls / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-ms", type=float, default=2.0, help="per batch")
    parser.add_argument("--turns-ms", default="0,2,5,10,20", help="the loop's busy time a turn")
    parser.add_argument("--batch", type=int, default=32, help="max_batch_size")
    parser.add_argument("--rows-per-turn", type=int, help="default: 4 full batches")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--server", action="store_true", help="through ModelServer.infer")
    parser.add_argument("--slo-ms", type=float, default=50.0, help="--server: the deadline")
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    base = [baseline(args) for _ in range(args.repeats)]
    print(
        f"model: {args.model_ms:g} ms a batch of up to {args.batch} rows (a sleep); "
        f"{args.seconds:g} s a run; median (min-max) over {args.repeats}"
    )
    print(f"  {'alone, back to back: batches/s':44} {spread(base):>24}   use 100%")
    header = ("batches/s", "rows/s", "rows/batch", "model use %", "turns/batch")
    if args.server:
        header += ("in SLO/s", "refused/s", "limit")
    print(f"  {'loop busy a turn':18}" + "".join(f"{h:>24}" for h in header))
    for turn_ms in (float(t) for t in args.turns_ms.split(",")):
        runs = [asyncio.run(one_run(args, turn_ms)) for _ in range(args.repeats)]
        cells = [
            spread([r["batches_s"] for r in runs]),
            spread([r["rows_s"] for r in runs]),
            spread([r["rows_per_batch"] for r in runs], "{:.1f}"),
            spread([100 * r["model_use"] for r in runs]),
            spread([r["turns_per_batch"] for r in runs], "{:.2f}"),
        ]
        if args.server:
            cells += [
                spread([r["in_time_s"] for r in runs]),
                spread([r["refused_s"] for r in runs]),
                spread([r["limit"] for r in runs]),
            ]
        print(f"  {f'{turn_ms:g} ms':18}" + "".join(f"{c:>24}" for c in cells))


if __name__ == "__main__":
    main()
