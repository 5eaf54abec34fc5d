"""Model updates under load: a version loaded, warmed up and promoted while requests flow.

    python benchmarks/update.py [--repeats 3] [--swaps 3] [--every 4] [--level 0.5]
    python benchmarks/update.py --smoke              # under a minute: checks the script works
    python benchmarks/update.py --model-file fraud.onnx   # another ONNX file, the demo's inputs

Issue 5 asks for a swap with "zero failed or slowed requests". This script measures both
against the same schedule without a swap, in the same run.

``rtinfer serve REPO --management-key K --slo-ms S`` serves a model repository of one
model, ``fraud`` (the stand-in of ``overload.py``: an ONNX MLP of ``--model-layers`` hidden
layers on the demo's 11 features; 120 is about 0.3 ms a row here), pinned to
``--server-cpus``; the load generator is ``overload.py``'s (raw keep-alive sockets on
uvloop, its own process, pinned to ``--client-cpus``), one row a request.

1. **capacity**: the best closed loop over 16 and 64 connections (``--capacity`` fixes it);
2. **two runs**, in an order that alternates by repeat: open loop at ``--level`` times
   capacity (one-row batches cost more than a closed loop's: at 0.5 the 120-layer model
   kept one core about 93% busy here) for ``--lead`` s, ``--swaps`` periods of
   ``--every`` s, and ``--tail`` s. In the **update** run, each period starts with a new
   version folder (written under a hidden name, then renamed, as docs/repository.md
   says), then
   ``POST /v2/repository/models/fraud/load`` (read, load, warm every batch size) and
   ``.../promote``; the old version is retired after its grace (2 s) and closed. The
   **control** run sends the same schedule to a server left alone;
3. **figures**, for the requests due inside the periods (the update's whole course and
   the retirement after it) and, in the update run, for those due while a load was
   running: count, failed (any status but 200), p50, p99, p99.9 and max from the due time
   (a request's wait in the client counts), and answers within ``--slo-ms``; the ratio of
   the update run's p99 to the control's; how long a load and a promote took.

Medians over ``--repeats`` with the range; ``--json PATH`` writes every figure. Run it on an
otherwise idle machine (see ``MEASURING.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from common import spread
from overload import OK, heavy_model, pct, raise_fd_limit, run_generator
from serve import Server

KEY = "update-benchmark"
MODEL = "fraud"


def manage(server: Server, action: str, version: str) -> float:
    """``POST /v2/repository/models/fraud/{action}`` for ``version``; the seconds it took."""
    request = urllib.request.Request(  # noqa: S310
        server.url(f"/v2/repository/models/{MODEL}/{action}"),
        data=json.dumps({"version": version}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    began = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as answer:  # noqa: S310
        answer.read()
    return time.perf_counter() - began


def add_version(repo: Path, version: str, model: Path) -> None:
    """A new version folder, written under a hidden name and renamed (atomic)."""
    hidden = repo / MODEL / f".tmp-{version}"
    hidden.mkdir()
    shutil.copyfile(model, hidden / "model.onnx")
    hidden.rename(repo / MODEL / version)


def updates(
    server: Server, repo: Path, model: Path, args: argparse.Namespace, start: float
) -> list[dict[str, float]]:
    """At the start of each period: a new version, loaded then promoted (times from ``start``)."""
    done = []
    for k in range(args.swaps):
        at = start + args.lead + k * args.every
        time.sleep(max(0.0, at - time.perf_counter()))
        version = str(k + 2)
        began = time.perf_counter() - start
        add_version(repo, version, model)
        load_s = manage(server, "load", version)
        promote_s = manage(server, "promote", version)
        done.append({"began": began, "load_s": load_s, "promote_s": promote_s})
    return done


def figures(data: dict[str, Any], mine: np.ndarray[Any, Any], slo_ms: float) -> dict[str, Any]:
    """The requests selected by ``mine``: failures and latency from their due time."""
    latency = data["done"] - data["due"]
    ok = mine & (data["status"] == OK)
    failed = mine & (data["status"] != OK)
    statuses, counts = np.unique(data["status"][failed], return_counts=True)
    return {
        "count": int(mine.sum()),
        "failed": int(failed.sum()),
        "failed_by_status": {str(s): int(n) for s, n in zip(statuses, counts, strict=True)},
        "p50_ms": pct(latency[ok], 50),
        "p99_ms": pct(latency[ok], 99),
        "p999_ms": pct(latency[ok], 99.9),
        "max_ms": pct(latency[ok], 100),
        "late": int((ok & (latency > slo_ms / 1e3)).sum()),
    }


def capacity(args: argparse.Namespace, server: Server, tmp: Path) -> float:
    """Answers a second of the best closed loop (16 or 64 keep-alive connections)."""
    best = 0.0
    for connections in (16, 64):
        closed = {"mode": "closed", "port": server.port, "connections": connections}
        run_generator(args, closed | {"seconds": 1.0, "max_requests": 1_000_000}, tmp)
        got = run_generator(
            args, closed | {"seconds": args.capacity_seconds, "max_requests": 2_000_000}, tmp
        )
        best = max(best, int((got["status"] == OK).sum()) / args.capacity_seconds)
    return best


def one_run(
    args: argparse.Namespace, model: Path, tmp: Path, update: bool
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """A fresh server on version 1 and the open loop beside it, with (``update``) or
    without the updates: every request's times, and each update's."""
    repo = tmp / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    (repo / MODEL).mkdir(parents=True)
    add_version(repo, "1", model)
    extra = ["--slo-ms", str(args.slo_ms), "--management-key", KEY]
    if args.model_process:
        extra += ["--model-process"]
    server = Server("rtinfer", model, tmp, args.server_cpus, args.serve_workers, extra)
    try:
        server.wait_ready()
        if args.capacity is None:  # measured once, on the first server: every run offers the same
            args.capacity = capacity(args, server, tmp)
            print(f"  capacity {args.capacity:,.0f} requests/s", file=sys.stderr, flush=True)
        seconds = args.lead + args.swaps * args.every + args.tail
        start = time.perf_counter() + 1.5  # the generator's pool is open by then
        spec = {
            "mode": "open",
            "port": server.port,
            "max_connections": 1000,
            "pool": 64,
            "give_up_ms": 1000.0,
            "segments": [(args.level * args.capacity, seconds)],
            "grace": 10.0,
            "start": start,
        }
        swaps: list[dict[str, float]] = []
        failure: list[BaseException] = []

        def swap() -> None:
            try:
                swaps.extend(updates(server, repo, model, args, start))
            except BaseException as exc:  # reported after the load ends
                failure.append(exc)

        worker = threading.Thread(target=swap, daemon=True)
        if update:
            worker.start()
        data = run_generator(args, spec, tmp)
        if update:
            worker.join(timeout=120)
        if failure:
            raise RuntimeError(f"an update failed: {failure[0]!r}") from failure[0]
    finally:
        server.stop()
    return data, swaps


def compare(
    args: argparse.Namespace, update: dict[str, Any], control: dict[str, Any], swaps: list[Any]
) -> dict[str, Any]:
    """Both runs' figures over the same spans of due times: the periods, the loads
    (the update run's own, laid on the control too) and the rest."""

    def spans(data: dict[str, Any], bounds: list[tuple[float, float]]) -> np.ndarray[Any, Any]:
        due, mine = data["due"], np.zeros(len(data["due"]), bool)
        for begin, end in bounds:
            mine |= (due >= begin) & (due < end)
        return mine

    periods = [
        (args.lead + k * args.every, args.lead + (k + 1) * args.every) for k in range(args.swaps)
    ]
    loads = [(s["began"], s["began"] + s["load_s"]) for s in swaps]
    got: dict[str, Any] = {"rate": args.level * args.capacity, "swaps": swaps}
    for kind, data in (("update", update), ("control", control)):
        inside = spans(data, periods)
        got[kind] = {
            "periods": figures(data, inside, args.slo_ms),
            "loading": figures(data, spans(data, loads), args.slo_ms),
            "outside": figures(data, ~inside & (data["due"] >= 1.0), args.slo_ms),
        }
    return got


def environment(args: argparse.Namespace) -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for package in ("rtinfer", "onnxruntime", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "packages": versions,
        "args": {k: str(v) for k, v in vars(args).items()},
    }


def report(args: argparse.Namespace, runs: list[dict[str, Any]]) -> None:
    def column(kind: str, part: str, key: str) -> list[float]:
        return [r[kind][part][key] for r in runs if part in r[kind]]

    print(
        f"\n## Model updates under load: {args.swaps} load + promote, every {args.every:g} s, "
        f"at {args.level:g}x capacity, SLO {args.slo_ms:g} ms (medians of {len(runs)}, range)\n"
    )
    print(f"offered: {spread([r['rate'] for r in runs])} requests/s\n")
    print("| requests due | count | failed | p50 ms | p99 ms | p99.9 ms | max ms | late |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [
        ("control: in the periods", "control", "periods"),
        ("update: in the periods", "update", "periods"),
        ("control: the same spans", "control", "loading"),
        ("update: while loading", "update", "loading"),
        ("control: outside", "control", "outside"),
        ("update: outside", "update", "outside"),
    ]
    for label, kind, part in rows:
        cells = [spread(column(kind, part, "count")), spread(column(kind, part, "failed"))]
        cells += [spread(column(kind, part, k), "{:.1f}") for k in ("p50_ms", "p99_ms")]
        cells += [spread(column(kind, part, k), "{:.1f}") for k in ("p999_ms", "max_ms")]
        cells.append(spread(column(kind, part, "late")))
        print(f"| {label} | " + " | ".join(cells) + " |")

    def ratio(part: str) -> str:
        values = [r["update"][part]["p99_ms"] / r["control"][part]["p99_ms"] for r in runs]
        return spread(values, "{:.2f}")

    loads = [s["load_s"] * 1e3 for r in runs for s in r["swaps"]]
    promotes = [s["promote_s"] * 1e3 for r in runs for s in r["swaps"]]
    print(
        f"\np99, update / control: in the periods {ratio('periods')}, while loading "
        f"{ratio('loading')}"
    )
    print(f"a load took {spread(loads, '{:.0f}')} ms; a promote {spread(promotes, '{:.1f}')} ms")
    for kind in ("update", "control"):
        failed: dict[str, int] = {}
        for r in runs:
            for part in ("periods", "outside"):
                for status, n in r[kind][part]["failed_by_status"].items():
                    failed[status] = failed.get(status, 0) + n
        if failed:
            codes = "0 unanswered, -1 broken, -2 gave up"
            print(f"{kind}: failed by status over all repeats {failed} ({codes})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--every", type=float, default=4.0, help="seconds between two updates")
    parser.add_argument("--lead", type=float, default=3.0, help="seconds before the first")
    parser.add_argument("--tail", type=float, default=2.0, help="seconds after the last period")
    parser.add_argument("--level", type=float, default=0.5, help="open loop, times capacity")
    parser.add_argument("--capacity", type=float, help="requests/s: skip measuring it")
    parser.add_argument("--capacity-seconds", type=float, default=2.0)
    parser.add_argument("--slo-ms", type=float, default=50.0)
    parser.add_argument("--model-layers", type=int, default=120)
    parser.add_argument("--model-file", type=Path, help="an ONNX file with the demo's inputs")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--client-cpus", default="1")
    parser.add_argument("--serve-workers", type=int, default=1)
    parser.add_argument("--model-process", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="short: checks the script works")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    # what overload.run_generator reads
    args.client_processes, args.client_start_s = 1, 0.0
    if args.smoke:
        args.repeats, args.swaps, args.every, args.lead, args.tail = 1, 1, 3.0, 2.0, 1.0
        args.capacity_seconds = 1.0
    raise_fd_limit()
    runs = []
    with tempfile.TemporaryDirectory(prefix="rtinfer-update-") as name:
        tmp = Path(name)
        model = args.model_file or tmp / "model.onnx"
        if args.model_file is None:
            heavy_model(model, 0.0, args.model_layers)
        for i in range(args.repeats):
            got = {}
            for update in (True, False) if i % 2 == 0 else (False, True):
                got[update] = one_run(args, model, tmp, update)
            run = compare(args, got[True][0], got[False][0], got[True][1])
            for kind in ("update", "control"):
                print(
                    f"  repeat {i + 1} {kind}: p99 in the periods "
                    f"{run[kind]['periods']['p99_ms']:.1f} ms, while loading "
                    f"{run[kind]['loading']['p99_ms']:.1f} ms, failed "
                    f"{run[kind]['periods']['failed_by_status'] or 0}",
                    file=sys.stderr,
                    flush=True,
                )
            runs.append(run)
    report(args, runs)
    if args.json:
        args.json.write_text(json.dumps({"environment": environment(args), "runs": runs}))


if __name__ == "__main__":
    main()
