"""Bursts at low load: a pause upstream, then its backlog at once, against ``rtinfer serve``.

    python benchmarks/bursts.py [--repeats 3] [--rate 1000] [--pause-s 0.15] [--bursts 10]
    python benchmarks/bursts.py --smoke              # under a minute: checks the script works

A producer that stalls, a proxy that reconnects or a client's garbage collection holds
requests back, then sends them together: a server far from its capacity should answer
such a backlog, not refuse it. ``rtinfer serve --slo-ms S`` serves the stand-in of
``overload.py`` (an ONNX MLP of ``--model-layers`` hidden layers, 120 by default, about
0.3 ms a row) pinned to ``--server-cpus``; the load generator is ``overload.py``'s, pinned
to ``--client-cpus``, one row a request.

Each run is an open loop at ``--rate`` for ``--bursts`` periods of ``--every`` s, each
period ending with a pause of ``--pause-s`` s and then the requests the pause held back,
all due within 2 ms, then ``--every`` s more. The **smooth** run sends the same number of
requests with no pause (the baseline, in the same run). Per run: requests, refused (503),
other failures, answers later than the SLO from their due time, p50/p99 of the answers;
per burst (the requests due from its start for 0.5 s): refused and late; the limiter's
limit at the end (``rtinfer_limiter_limit``). The first burst meets a server that has
learnt nothing yet; the later ones, what the first taught it.

Medians over ``--repeats`` with the range; ``--json PATH`` writes every figure. Run it on
an otherwise idle machine (see ``MEASURING.md``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from common import spread
from overload import OK, heavy_model, pct, raise_fd_limit, run_generator
from serve import Server


def schedule(args: argparse.Namespace, pauses: bool) -> list[tuple[float, float]]:
    """(rate, seconds) segments: with ``pauses``, each period ends with a pause and then
    its backlog within 2 ms; without, the same requests evenly."""
    segments: list[tuple[float, float]] = []
    for _ in range(args.bursts):
        if pauses:
            segments += [(args.rate, args.every), (0.0, args.pause_s)]
            segments.append((args.rate * args.pause_s / 0.002, 0.002))
        else:
            segments.append((args.rate, args.every + args.pause_s + 0.002))
    segments.append((args.rate, args.every))
    return segments


def limit_now(server: Server) -> float:
    with urllib.request.urlopen(server.url("/metrics"), timeout=10) as answer:  # noqa: S310
        for line in answer.read().decode().splitlines():
            if line.startswith("rtinfer_limiter_limit{"):
                return float(line.rsplit(" ", 1)[1])
    return float("nan")


def one_run(args: argparse.Namespace, model: Path, tmp: Path, pauses: bool) -> dict[str, Any]:
    server = Server("rtinfer", model, tmp, args.server_cpus, 1, ["--slo-ms", str(args.slo_ms)])
    try:
        server.wait_ready()
        spec = {
            "mode": "open",
            "port": server.port,
            "max_connections": 1000,
            "pool": args.connections,
            "give_up_ms": 1000.0,
            "segments": schedule(args, pauses),
            "grace": 10.0,
        }
        data = run_generator(args, spec, tmp)
        limit = limit_now(server)
    finally:
        server.stop()
    due, status = data["due"], data["status"]
    latency = data["done"] - due
    ok = status == OK
    late = ok & (latency > args.slo_ms / 1e3)
    got: dict[str, Any] = {
        "requests": len(due),
        "refused": int((status == 503).sum()),
        "failed_other": int((~ok & (status != 503)).sum()),
        "late": int(late.sum()),
        "in_time": int((ok & ~late).sum()),
        "p50_ms": pct(latency[ok], 50),
        "p99_ms": pct(latency[ok], 99),
        "limit_at_end": limit,
    }
    period = args.every + args.pause_s + 0.002
    # the run starts about 50 ms before the first request is due (overload.open_loop)
    starts = [k * period + args.every for k in range(args.bursts)]
    got["per_burst"] = [
        {
            "refused": int(((due >= s) & (due < s + 0.5) & (status == 503)).sum()),
            "late": int(((due >= s) & (due < s + 0.5) & late).sum()),
        }
        for s in starts
    ]
    return got


def report(args: argparse.Namespace, runs: list[dict[str, Any]]) -> None:
    backlog = round(args.rate * args.pause_s)
    print(
        f"\n## Bursts: {args.bursts} pauses of {args.pause_s * 1e3:g} ms, each followed by "
        f"its backlog ({backlog} requests) at once, open loop at {args.rate:,.0f}/s, "
        f"SLO {args.slo_ms:g} ms (medians of {len(runs)}, range)\n"
    )
    print(
        "| run | requests | in time | refused | other failures | late | p50 ms | p99 ms "
        "| limit at the end |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in ("smooth", "bursts"):

        def col(key: str, fmt: str = "{:,.0f}", kind: str = kind) -> str:
            return spread([r[kind][key] for r in runs], fmt)

        cells = [col(k) for k in ("requests", "in_time", "refused", "failed_other", "late")]
        cells += [col("p50_ms", "{:.1f}"), col("p99_ms", "{:.1f}"), col("limit_at_end")]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    first = [r["bursts"]["per_burst"][0]["refused"] for r in runs]
    later = [
        float(np.mean([b["refused"] for b in r["bursts"]["per_burst"][1:]]))
        for r in runs
        if len(r["bursts"]["per_burst"]) > 1
    ]
    print(
        f"\nrefused of each backlog of {backlog}: the first {spread(first)}, "
        f"the later ones on average {spread(later, '{:.1f}')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rate", type=float, default=1000.0, help="requests/s, open loop")
    parser.add_argument("--pause-s", type=float, default=0.15)
    parser.add_argument("--bursts", type=int, default=10)
    parser.add_argument("--every", type=float, default=2.0, help="seconds between pauses")
    parser.add_argument("--slo-ms", type=float, default=50.0)
    parser.add_argument("--model-layers", type=int, default=120)
    parser.add_argument("--model-file", type=Path, help="an ONNX file with the demo's inputs")
    parser.add_argument("--connections", type=int, default=256, help="opened before the run")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--client-cpus", default="1")
    parser.add_argument("--smoke", action="store_true", help="short: checks the script works")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    args.client_processes, args.client_start_s = 1, 0.0  # what run_generator reads
    if args.smoke:
        args.repeats, args.bursts, args.every = 1, 2, 1.0
    raise_fd_limit()
    runs = []
    with tempfile.TemporaryDirectory(prefix="rtinfer-bursts-") as name:
        tmp = Path(name)
        model = tmp / "fraud.onnx"  # served as /v2/models/fraud, where the load goes
        if args.model_file is None:
            heavy_model(model, 0.0, args.model_layers)
        else:
            shutil.copyfile(args.model_file, model)
        for i in range(args.repeats):
            run = {}
            for kind in ("bursts", "smooth") if i % 2 == 0 else ("smooth", "bursts"):
                run[kind] = one_run(args, model, tmp, kind == "bursts")
                print(
                    f"  repeat {i + 1} {kind}: refused {run[kind]['refused']}, "
                    f"late {run[kind]['late']}, limit at the end {run[kind]['limit_at_end']:.0f}",
                    file=sys.stderr,
                    flush=True,
                )
            runs.append(run)
            time.sleep(0.5)
    report(args, runs)
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": None}, "runs": runs}, default=str)
        )


if __name__ == "__main__":
    main()
