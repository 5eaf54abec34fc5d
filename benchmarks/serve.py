"""HTTP serving: ``rtinfer serve`` beside a plain FastAPI + uvicorn app on the same model.

    python benchmarks/serve.py [--repeats 3] [--seconds 2.5] [--rate 1000] [--open-seconds 10]

Both servers answer the Open Inference Protocol's ``POST /v2/models/fraud/infer`` with
one row of the demo's 11 fraud features (FP32) and give the same JSON answer (checked at
the start of every server). The baseline is what one writes by hand without rtinfer: a
FastAPI app (pydantic models for the body, an ``async def`` route calling ONNX Runtime
inline, one request per ``session.run``, no batching; ``async`` because a thread hop per
request would only slow it down), same uvicorn (uvloop and httptools where installed),
same ONNX Runtime threads (intra-op 1, inter-op 1). rtinfer is ``rtinfer serve
MODEL.onnx``: its micro-batcher batches concurrent requests (``--max-delay-ms`` serves it
from a model repository whose ``config.yaml`` sets the batcher's wait instead).

The servers run on CPU 0, the load generator on CPU 1 (``taskset -c``; ``--server-cpus``
and ``--client-cpus`` to change). The load generator is this script in its own process:
asyncio over raw keep-alive HTTP/1.1 sockets, one connection per worker, because an
``httpx.AsyncClient`` on one core saturates before the servers do (its requests/s is
the ceiling, not the server's; try ``--client httpx`` to see it). Measured, alternating
the servers in each repeat (A B A B), medians over ``--repeats`` with the spread:

1. **closed loop** at 1, 8 and 64 connections: requests/s, p50 and p99
   (``--seconds`` each after ``--warmup`` seconds of the same load, discarded);
2. **open loop** at ``--rate`` requests/s for ``--open-seconds`` after
   ``--open-warmup`` seconds, wrk2's way: requests are due on a fixed schedule
   (spread over a pool of connections) and each one's latency runs from when it was
   due, so a stalled server is charged for the queue it caused; p50, p99, p99.9, max,
   the count, and the client's own lag in sending (its error bar);
3. **overhead**: p50 at one connection minus the model's own time on one row
   (ONNX Runtime alone, in a process on the servers' CPU, in the same run); both
   figures include the same client and loopback costs;
4. **workers**: ``rtinfer serve --workers 2`` beside one worker, 64 connections.
   Both are pinned to the servers' CPUs: on the 2-core machine that is one core, so this
   shows what a second process costs there, not scaling (``--server-cpus 0,1
   --client-cpus 2`` on a larger machine);
5. **the HTTP floor**: a bare uvicorn ASGI app giving a constant answer (no model, no
   parsing) at 1 and 64 connections: what HTTP alone costs on this machine, and proof
   that the load generator can drive more than the servers take (its CPU use is shown).

``--http-server`` picks what serves rtinfer's HTTP: ``rtinfer`` (the default, as
``rtinfer serve`` has it: the lean server of ``rtinfer.http.server``), ``uvicorn``
(``rtinfer serve --http-server uvicorn``), or ``both``: then rtinfer runs under each
(sides "rtinfer", under uvicorn, and "rtinfer-own", alternated with the others) and the
HTTP floor is measured under each server too ("bare" and "bare-own").

The targets: rtinfer / FastAPI requests/s at 64 connections at least 3; rtinfer's p99
at 1,000 requests/s at most 5 ms. Peak RSS of each server (its process tree) is
reported too. Needs ``fastapi`` (the dev extra). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any

from common import spread

ROOT = Path(__file__).resolve().parent.parent
CONNECTIONS = (1, 8, 64)

FASTAPI_APP = '''
"""The baseline: a plain FastAPI app calling ONNX Runtime per request (written by serve.py)."""

import hashlib
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

NAME = "fraud"
with open(os.environ["BENCH_MODEL"], "rb") as f:
    DATA = f.read()
VERSION = hashlib.sha256(DATA).hexdigest()[:12]
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
session = ort.InferenceSession(DATA, options, providers=["CPUExecutionProvider"])
session.run(None, {"features": np.zeros((1, 11), np.float32)})  # warm-up


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[Tensor]


app = FastAPI()


@app.get("/v2/health/ready")
async def ready() -> dict:
    return {}


@app.post("/v2/models/fraud/infer")
async def infer(request: InferRequest) -> dict:
    if len(request.inputs) != 1:
        raise HTTPException(400, "expected one input")
    tensor = request.inputs[0]
    if tensor.name != "features" or tensor.datatype != "FP32":
        raise HTTPException(400, "expected the FP32 input features")
    try:
        x = np.asarray(tensor.data, dtype=np.float32).reshape(tensor.shape)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    if x.ndim != 2 or x.shape[1] != 11:
        raise HTTPException(400, f"expected shape [-1, 11], got {list(x.shape)}")
    label, probabilities = session.run(["label", "probabilities"], {"features": x})
    answer = {
        "model_name": NAME,
        "model_version": VERSION,
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": list(label.shape),
             "data": label.ravel().tolist()},
            {"name": "probabilities", "datatype": "FP32", "shape": list(probabilities.shape),
             "data": probabilities.ravel().tolist()},
        ],
    }
    if request.id is not None:
        answer["id"] = request.id
    return answer
'''


BARE_APP = '''
"""The HTTP floor: a bare ASGI app giving a constant answer, no model (written by serve.py)."""

BODY = (
    b'{"model_name":"fraud","model_version":"0","outputs":[{"name":"label","datatype":"INT64",'
    b'"shape":[1],"data":[0]},{"name":"probabilities","datatype":"FP32","shape":[1,2],'
    b'"data":[0.93,0.07]}]}'
)
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
'''


BARE_OWN = '''
"""The HTTP floor under rtinfer's own server: the same bare app (written by serve.py)."""

import sys

from bare_app import app
from rtinfer.http.server import run

run(lambda: app, port=int(sys.argv[1]))
'''


# --------------------------------------------------------------------------- requests


def request_bodies(n: int = 64) -> list[bytes]:
    """``n`` one-row OIP bodies with varied but plausible feature values."""
    import random

    rng = random.Random(7)
    bodies = []
    for _ in range(n):
        row = [round(rng.uniform(0.0, 500.0), 2), float(rng.randint(0, 30))]
        row += [round(rng.random(), 4) for _ in range(9)]
        tensor = {"name": "features", "shape": [1, 11], "datatype": "FP32", "data": [row]}
        bodies.append(json.dumps({"inputs": [tensor]}, separators=(",", ":")).encode())
    return bodies


# --------------------------------------------------------------------------- load generator


class RawConnection:
    """One keep-alive HTTP/1.1 connection speaking just enough HTTP for this benchmark."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.head = (
            f"POST /v2/models/fraud/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/json\r\n"
        ).encode()

    async def post(self, body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(self.head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        at = lower.find(b"content-length:")
        if at < 0:
            raise RuntimeError(f"answer without Content-Length: {head[:200]!r}")
        length = int(lower[at + 15 : lower.index(b"\r\n", at)])
        await self.reader.readexactly(length)
        if b"connection: close" in lower:
            await self.close()
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
            self.writer = self.reader = None


class HttpxConnection:
    """The same through one shared ``httpx.AsyncClient`` (``--client httpx``)."""

    client: Any = None

    def __init__(self, port: int, connections: int) -> None:
        import httpx

        if HttpxConnection.client is None:
            limits = httpx.Limits(
                max_connections=connections, max_keepalive_connections=connections
            )
            HttpxConnection.client = httpx.AsyncClient(limits=limits, timeout=60.0)
        self.url = f"http://127.0.0.1:{port}/v2/models/fraud/infer"

    async def post(self, body: bytes) -> int:
        headers = {"Content-Type": "application/json"}
        answer = await HttpxConnection.client.post(self.url, content=body, headers=headers)
        return int(answer.status_code)

    async def close(self) -> None:
        pass


def percentiles(latencies: list[float]) -> dict[str, float]:
    """p50, p99, p99.9 and max in ms (exact, from every sample)."""
    import numpy as np

    if not latencies:
        return {"p50": float("nan"), "p99": float("nan"), "p999": float("nan"), "max": float("nan")}
    values = np.asarray(latencies) * 1e3
    p50, p99, p999 = np.percentile(values, [50, 99, 99.9])
    return {"p50": float(p50), "p99": float(p99), "p999": float(p999), "max": float(values.max())}


async def closed_loop(
    connect: Any, bodies: list[bytes], connections: int, warmup: float, seconds: float
) -> dict[str, Any]:
    """``connections`` workers, each sending its next request when the last is answered."""
    began = time.perf_counter()
    measure_from, end = began + warmup, began + warmup + seconds
    latencies: list[float] = []
    errors = 0

    async def worker(i: int) -> None:
        nonlocal errors
        conn = connect()
        k = i
        try:
            while True:
                start = time.perf_counter()
                if start >= end:
                    return
                try:
                    status = await conn.post(bodies[k % len(bodies)])
                except (OSError, asyncio.IncompleteReadError, RuntimeError):
                    status = 0
                    await conn.close()
                k += connections
                done = time.perf_counter()
                if start >= measure_from:
                    if status == 200:
                        latencies.append(done - start)
                    else:
                        errors += 1
        finally:
            await conn.close()

    await asyncio.gather(*(worker(i) for i in range(connections)))
    return {
        "connections": connections,
        "count": len(latencies),
        "errors": errors,
        "rps": len(latencies) / seconds,
        **percentiles(latencies),
    }


async def open_loop(
    connect: Any, bodies: list[bytes], rate: float, connections: int, warmup: float, seconds: float
) -> dict[str, Any]:
    """Requests due every 1/``rate`` s; latency from when each was due (wrk2's method)."""
    queue: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[float] = []
    lags: list[float] = []
    errors = 0
    began = time.perf_counter() + 0.05
    measure_from = began + warmup
    total = int(rate * (warmup + seconds))

    async def worker() -> None:
        nonlocal errors
        conn = connect()
        k = 0
        try:
            while (due := await queue.get()) is not None:
                sent = time.perf_counter()
                try:
                    status = await conn.post(bodies[k % len(bodies)])
                except (OSError, asyncio.IncompleteReadError, RuntimeError):
                    status = 0
                    await conn.close()
                k += 1
                done = time.perf_counter()
                if due >= measure_from:
                    if status == 200:
                        latencies.append(done - due)
                        lags.append(sent - due)
                    else:
                        errors += 1
        finally:
            await conn.close()

    workers = [asyncio.ensure_future(worker()) for _ in range(connections)]
    # The dispatcher spins (the client has its own core): asyncio's timers wake up to a
    # millisecond late, which would be counted as the server's latency.
    n = 0
    while n < total:
        now = time.perf_counter()
        while n < total and began + n / rate <= now:
            queue.put_nowait(began + n / rate)
            n += 1
        gap = began + n / rate - time.perf_counter()
        await asyncio.sleep(gap - 0.002 if gap > 0.003 else 0)
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    return {
        "rate": rate,
        "count": len(latencies),
        "errors": errors,
        "lag_p99": percentiles(lags)["p99"],
        **percentiles(latencies),
    }


async def load(args: argparse.Namespace) -> None:
    """The load generator's mode: run the phases in ``--load`` (JSON), print results (JSON)."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    phases = json.loads(args.load)
    bodies = request_bodies()

    def connect(connections: int) -> Any:
        if args.client == "httpx":
            return lambda: HttpxConnection(args.port, connections)
        return lambda: RawConnection(args.port)

    results = []
    for phase in phases:
        cpu, wall = time.process_time(), time.perf_counter()
        if phase["kind"] == "closed":
            c = phase["connections"]
            got = await closed_loop(connect(c), bodies, c, phase["warmup"], phase["seconds"])
        else:
            c = phase["connections"]
            got = await open_loop(
                connect(c), bodies, phase["rate"], c, phase["warmup"], phase["seconds"]
            )
        if HttpxConnection.client is not None:
            await HttpxConnection.client.aclose()
            HttpxConnection.client = None
        # near 1.0: the client, not the server, is the limit
        got["client_cpu"] = (time.process_time() - cpu) / (time.perf_counter() - wall)
        results.append({**phase, **got})
    print(json.dumps(results))


def run_load(args: argparse.Namespace, port: int, phases: list[dict[str, Any]]) -> list[Any]:
    command = [sys.executable, __file__, "--load", json.dumps(phases), "--port", str(port)]
    command += ["--client", args.client]
    answer = subprocess.run(  # noqa: S603
        pin(args.client_cpus, command), cwd=ROOT, capture_output=True, text=True, check=False
    )
    if answer.returncode != 0:
        raise RuntimeError(f"the load generator failed:\n{answer.stderr[-3000:]}")
    results: list[Any] = json.loads(answer.stdout.strip().splitlines()[-1])
    return results


# --------------------------------------------------------------------------- model alone


def model_alone(model: str) -> None:
    """The model's own time on one row (µs), ONNX Runtime on one thread: prints JSON."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    row = np.asarray(json.loads(request_bodies(1)[0])["inputs"][0]["data"], np.float32)
    outputs = ["label", "probabilities"]
    for _ in range(2000):
        session.run(outputs, {"features": row})
    times = []
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(2000):
            session.run(outputs, {"features": row})
        times.append((time.perf_counter() - started) / 2000 * 1e6)
    print(json.dumps({"us": statistics.median(times)}))


# --------------------------------------------------------------------------- servers


def pin(cpus: str, command: list[str]) -> list[str]:
    if cpus and shutil.which("taskset") and hasattr(os, "sched_getaffinity"):
        wanted = {int(c) for c in cpus.split(",")}
        if wanted <= os.sched_getaffinity(0):
            return ["taskset", "-c", cpus, *command]
    return command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_peak_rss_mib(pid: int) -> float:
    """Sum of VmHWM (peak RSS) over ``pid`` and its descendants, in MiB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return total / 1024


class Server:
    """A server process, started pinned, ready once ``/v2/health/ready`` answers 200."""

    def __init__(
        self,
        kind: str,
        model: Path,
        tmp: Path,
        cpus: str,
        workers: int = 1,
        extra: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.kind, self.port = kind, free_port()
        self.log = tmp / f"{kind}-{workers}-{self.port}.log"
        env = dict(os.environ)
        if kind == "bare-own":
            command = [sys.executable, str(tmp / "bare_own.py"), str(self.port)]
            env["PYTHONPATH"] = os.pathsep.join([str(tmp), env.get("PYTHONPATH", "")])
        elif kind in ("fastapi", "bare", "fastapi_def"):
            env["BENCH_MODEL"] = str(model)
            command = [sys.executable, "-m", "uvicorn", f"{kind}_app:app", "--app-dir", str(tmp)]
            command += ["--port", str(self.port), "--no-access-log", "--log-level", "warning"]
        else:
            # a model repository when --max-delay-ms is given (its config.yaml), else the file
            target = tmp / "repo" if (tmp / "repo").is_dir() else model
            command = [sys.executable, "-m", "rtinfer", "serve", str(target)]
            command += ["--port", str(self.port), "--workers", str(workers), *extra]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(  # noqa: S603
                pin(cpus, command),
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.url("/v2/health/ready"), timeout=2) as answer:  # noqa: S310
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.kind} never became ready:\n{self.log.read_text()[-3000:]}")

    def answer(self, body: bytes) -> dict[str, Any]:
        request = urllib.request.Request(  # noqa: S310
            self.url("/v2/models/fraud/infer"),
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            got: dict[str, Any] = json.loads(answer.read())
            return got

    def stop(self) -> None:
        """SIGTERM (uvicorn finishes what is in flight); SIGKILL the group if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        # workers of --workers N are in the same session: none may outlive the run
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


def same_answer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same JSON, floats to 1e-6 (the version differs when rtinfer serves a repository)."""
    if a.keys() != b.keys():
        return False
    for x, y in zip(a["outputs"], b["outputs"], strict=True):
        if {k: v for k, v in x.items() if k != "data"} != {
            k: v for k, v in y.items() if k != "data"
        }:
            return False
        if any(abs(p - q) > 1e-6 for p, q in zip(x["data"], y["data"], strict=True)):
            return False
    return True


def session(
    args: argparse.Namespace,
    kind: str,
    workers: int,
    model: Path,
    tmp: Path,
    phases: list[dict[str, Any]],
    answers: dict[str, Any],
) -> tuple[list[Any], float]:
    """Start one server, check its answer, run ``phases`` against it, stop it."""
    own = kind == "rtinfer-own" or (kind == "rtinfer" and args.http_server == "rtinfer")
    extra = ["--http-server", "rtinfer" if own else "uvicorn"]
    server = Server(
        "rtinfer" if kind == "rtinfer-own" else kind, model, tmp, args.server_cpus, workers, extra
    )
    try:
        server.wait_ready()
        answers[kind] = server.answer(request_bodies(1)[0])
        results = run_load(args, server.port, phases)
        rss = tree_peak_rss_mib(server.process.pid)
    finally:
        server.stop()
    return results, rss


# --------------------------------------------------------------------------- report


def environment(args: argparse.Namespace) -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in ("rtinfer", "fastapi", "uvicorn", "onnxruntime", "uvloop", "httptools"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "server_cpus": args.server_cpus,
        "client_cpus": args.client_cpus,
        "client": args.client,
        **versions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.5, help="closed loop, each")
    parser.add_argument("--warmup", type=float, default=0.5, help="closed loop, each")
    parser.add_argument("--rate", type=float, default=1000.0, help="open loop, requests/s")
    parser.add_argument("--open-seconds", type=float, default=10.0)
    parser.add_argument("--open-warmup", type=float, default=1.5)
    parser.add_argument("--open-connections", type=int, default=64)
    parser.add_argument("--connections", default=",".join(map(str, CONNECTIONS)))
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--client-cpus", default="1")
    parser.add_argument(
        "--max-delay-ms",
        type=float,
        help="serve rtinfer from a model repository with this batcher max_delay_ms "
        "(default: rtinfer's own default, serving the .onnx file)",
    )
    parser.add_argument(
        "--http-server",
        choices=("rtinfer", "uvicorn", "both"),
        default="rtinfer",
        help="what serves rtinfer's HTTP (rtinfer serve --http-server); both: each, alternated",
    )
    parser.add_argument(
        "--fastapi-def",
        action="store_true",
        help="also measure FastAPI with a plain `def` route (its thread pool), at the top "
        "connection count",
    )
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    parser.add_argument("--load", help=argparse.SUPPRESS)  # the load generator's mode
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model-alone", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        asyncio.run(load(args))
        return
    if args.model_alone:
        model_alone(args.model_alone)
        return

    from rtinfer.demo.training import ensure_model

    # SIGTERM unwinds like Ctrl-C, so that every server and load generator is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    connections = [int(c) for c in args.connections.split(",") if c]
    closed = [
        {"kind": "closed", "connections": c, "warmup": args.warmup, "seconds": args.seconds}
        for c in connections
    ]
    opened = {
        "kind": "open",
        "rate": args.rate,
        "connections": args.open_connections,
        "warmup": args.open_warmup,
        "seconds": args.open_seconds,
    }
    top, low = max(connections), min(connections)
    runs: list[dict[str, Any]] = []
    model_us: list[float] = []
    answers: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rtinfer-bench-serve-") as tmpdir:
        tmp = Path(tmpdir)
        model = tmp / "fraud.onnx"  # served under its file name: fraud
        shutil.copyfile(ensure_model(), model)
        if args.max_delay_ms is not None:
            (tmp / "repo" / "fraud" / "1").mkdir(parents=True)
            shutil.copyfile(model, tmp / "repo" / "fraud" / "1" / "model.onnx")
            config = f"max_delay_ms: {args.max_delay_ms}\n"
            (tmp / "repo" / "fraud" / "config.yaml").write_text(config)
        (tmp / "fastapi_app.py").write_text(FASTAPI_APP)
        # FastAPI's documented way for a blocking call: a plain `def` route, which FastAPI
        # runs in its thread pool (the `async def` baseline calls the model on the loop).
        sync_app = FASTAPI_APP.replace("async def infer(", "def infer(")
        assert sync_app != FASTAPI_APP
        (tmp / "fastapi_def_app.py").write_text(sync_app)
        (tmp / "bare_app.py").write_text(BARE_APP)
        (tmp / "bare_own.py").write_text(BARE_OWN)
        for repeat in range(args.repeats):
            print(f"repeat {repeat + 1}/{args.repeats}", file=sys.stderr, flush=True)
            alone = subprocess.run(  # noqa: S603
                pin(args.server_cpus, [sys.executable, __file__, "--model-alone", str(model)]),
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            model_us.append(json.loads(alone.stdout)["us"])
            order = [("fastapi", 1), ("rtinfer", 1), ("rtinfer", 2), ("bare", 1)]
            if args.fastapi_def:
                order.insert(1, ("fastapi_def", 1))
            if args.http_server == "both":
                order[2:2] = [("rtinfer-own", 1)]
                order.append(("bare-own", 1))
            if repeat % 2:
                order.reverse()
            for kind, workers in order:
                if kind.startswith("bare"):  # the floor: HTTP alone, what the client can drive
                    phases = [c for c in closed if c["connections"] in (low, top)]
                elif kind == "fastapi_def":
                    phases = [c for c in closed if c["connections"] == top]
                elif workers == 1:
                    phases = [*closed, opened]
                else:
                    phases = [closed[-1] | {"connections": top}]
                results, rss = session(args, kind, workers, model, tmp, phases, answers)
                side = kind if workers == 1 else f"{kind}-{workers}"
                runs.append({"side": side, "repeat": repeat, "rss_mib": rss, "phases": results})
                print(f"  {side}: done", file=sys.stderr, flush=True)

    def pick(side: str, kind: str, key: str, connections: int | None = None) -> list[float]:
        return [
            phase[key]
            for run in runs
            if run["side"] == side
            for phase in run["phases"]
            if phase["kind"] == kind and connections in (None, phase["connections"])
        ]

    names = {
        "fastapi": "FastAPI",
        "fastapi_def": "FastAPI, def route (thread pool)",
        "rtinfer": "rtinfer",
        "rtinfer-2": "rtinfer, 2 workers",
        "bare": "bare ASGI",
        "rtinfer-own": "rtinfer, own HTTP server",
        "bare-own": "bare ASGI, rtinfer server",
    }
    if args.http_server == "rtinfer":
        names["rtinfer"] = "rtinfer (own HTTP server)"
        names["rtinfer-2"] = "rtinfer (own HTTP server), 2 workers"
    else:
        names["rtinfer"] = "rtinfer under uvicorn"
        names["rtinfer-2"] = "rtinfer under uvicorn, 2 workers"
    both = args.http_server == "both"
    sides = ("fastapi", "rtinfer", "rtinfer-own") if both else ("fastapi", "rtinfer")
    env = environment(args)
    print(json.dumps(env))
    if "fastapi" in answers and "rtinfer" in answers:
        print(
            f"same answer from both servers: {same_answer(answers['fastapi'], answers['rtinfer'])}"
        )
    width = 46
    print(f"{'model alone (ONNX Runtime, 1 row), µs':{width}} {spread(model_us, '{:.1f}'):>28}")
    print("HTTP floor: a bare ASGI app, constant answer, no model (uvicorn; rtinfer's server)")
    for floor in ("bare", "bare-own") if both else ("bare",):
        for c in (low, top):
            for key, fmt, unit in (("rps", "{:,.0f}", "requests/s"), ("p50", "{:.2f}", "p50 ms")):
                got = spread(pick(floor, "closed", key, c), fmt)
                print(f"{f'  {names[floor]}, {c} conn, {unit}':{width}} {got:>28}")
        busy = spread(pick(floor, "closed", "client_cpu", top), "{:.2f}")
        print(f"{f'  client CPU busy vs {names[floor]}, {top} conn':{width}} {busy:>28}")
    print("closed loop")
    for c in connections:
        for side in sides:
            label = f"  {names[side]}, {c} conn"
            print(f"{label + ', requests/s':{width}} {spread(pick(side, 'closed', 'rps', c)):>28}")
            for q in ("p50", "p99"):
                got = spread(pick(side, "closed", q, c), "{:.2f}")
                print(f"{label + f', {q} ms':{width}} {got:>28}")
    ours = pick("rtinfer", "closed", "rps", top)
    theirs = pick("fastapi", "closed", "rps", top)
    ratio = [o / t for o, t in zip(ours, theirs, strict=True)]
    for side in sides:
        busy = spread(pick(side, "closed", "client_cpu", top), "{:.2f}")
        print(f"{f'  client CPU busy vs {names[side]}, {top} conn':{width}} {busy:>28}")
    label = f"rtinfer / FastAPI requests/s, {top} conn"
    print(f"{label:{width}} {spread(ratio, '{:.2f}'):>28}   target >= 3")
    if args.fastapi_def:
        threaded = pick("fastapi_def", "closed", "rps", top)
        label = f"  {names['fastapi_def']}, {top} conn, requests/s"
        print(f"{label:{width}} {spread(threaded):>28}")
        label = f"rtinfer / FastAPI def route, {top} conn"
        got = spread([o / t for o, t in zip(ours, threaded, strict=True)], "{:.2f}")
        print(f"{label:{width}} {got:>28}")
    if both:
        own = pick("rtinfer-own", "closed", "rps", top)
        label = f"rtinfer, own server / FastAPI, {top} conn"
        got = spread([o / t for o, t in zip(own, theirs, strict=True)], "{:.2f}")
        print(f"{label:{width}} {got:>28}   target >= 3")
        label = f"own server / uvicorn, rtinfer, {top} conn"
        got = spread([o / u for o, u in zip(own, ours, strict=True)], "{:.2f}")
        print(f"{label:{width}} {got:>28}")
    print(
        f"open loop at {args.rate:,.0f} requests/s, "
        f"{args.open_seconds:g} s after {args.open_warmup:g} s"
    )
    for side in sides:
        for q, name in (("p50", "p50"), ("p99", "p99"), ("p999", "p99.9"), ("max", "max")):
            got = spread(pick(side, "open", q), "{:.2f}")
            target = "   target <= 5" if side.startswith("rtinfer") and q == "p99" else ""
            print(f"{f'  {names[side]}, {name} ms':{width}} {got:>28}{target}")
        print(
            f"{f'  {names[side]}, requests (errors)':{width}} "
            f"{spread(pick(side, 'open', 'count')):>28} ({sum(pick(side, 'open', 'errors')):.0f})"
        )
        print(
            f"{f'  {names[side]}, client send lag p99 ms':{width}} "
            f"{spread(pick(side, 'open', 'lag_p99'), '{:.2f}'):>28}"
        )
    print(f"overhead: p50 at {low} conn minus the model alone")
    for side in sides:
        over = [
            p * 1e3 - m for p, m in zip(pick(side, "closed", "p50", low), model_us, strict=True)
        ]
        print(f"{f'  {names[side]}, µs':{width}} {spread(over):>28}")
    two = pick("rtinfer-2", "closed", "rps", top)
    print(f"{f'rtinfer, 2 workers, {top} conn, requests/s':{width}} {spread(two):>28}")
    print(
        f"{'2 workers / 1 worker':{width}} "
        f"{spread([t / o for t, o in zip(two, ours, strict=True)], '{:.2f}'):>28}"
    )
    for side in (*sides, "rtinfer-2"):
        peaks = [r["rss_mib"] for r in runs if r["side"] == side]
        print(f"{f'peak RSS, {names[side]}, MiB':{width}} {spread(peaks):>28}")
    errors = sum(p["errors"] for r in runs for p in r["phases"])
    if errors:
        print(f"WARNING: {errors} requests failed (not 200); see --json", file=sys.stderr)
    if args.json:
        args.json.write_text(
            json.dumps({"environment": env, "model_us": model_us, "runs": runs}, indent=2)
        )


if __name__ == "__main__":
    main()
