"""``rtinfer run PIPELINE.yaml --workers N``: N processes, one consumer group.

Scale-out is the broker's: each worker is an ordinary ``rtinfer run`` process
reading the same source in the same consumer group, and the broker shares the
partitions (Kafka), entries (Redis Streams), messages (NATS, MQTT shared
subscriptions) among them. More hosts scale the same way: start workers there.
This module only starts the workers, hands each its number (``RTINFER_WORKER``,
from which the Redis consumer name is made), passes signals on, and merges their
summaries.

The workers run in sessions of their own, so a Ctrl-C at the terminal reaches the
supervisor alone, which passes exactly one SIGTERM to each worker: a graceful
drain. A second signal kills the workers at once (what they had not acknowledged
is delivered again to whoever reads next) and exits with 130.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from .config import FileSourceConfig, MemorySourceConfig, load_config
from .exceptions import ConfigError

__all__ = ["merge_summaries", "run_workers"]


def run_workers(
    path: Path,
    workers: int,
    *,
    metrics_port: int | None = None,
) -> tuple[int, dict[str, Any] | None]:
    """Run ``workers`` copies of the pipeline at ``path``; return the exit status and summary.

    Worker ``i`` serves its metrics on ``metrics_port + i``.
    """
    config = load_config(path)
    if isinstance(config.source, MemorySourceConfig | FileSourceConfig):
        kind = (
            "the in-process broker" if isinstance(config.source, MemorySourceConfig) else ("a file")
        )
        raise ConfigError(
            f"--workers needs a broker source (kafka, redis, nats, mqtt) whose consumer group "
            f"shares the work; the source is {kind}, which one process reads alone",
            file=str(path),
            key="source.type",
        )
    with tempfile.TemporaryDirectory(prefix="rtinfer-workers-") as tmp:
        summaries = [Path(tmp) / f"worker-{i}.json" for i in range(workers)]
        processes = []
        for i in range(workers):
            command = [sys.executable, "-m", "rtinfer", "run", str(path), "--no-live"]
            command += ["--summary-json", str(summaries[i])]
            if metrics_port is not None:
                command += ["--metrics-port", str(metrics_port + i)]
            env = {**os.environ, "RTINFER_WORKER": str(i), "RTINFER_WORKERS": str(workers)}
            # Our own interpreter and arguments, no shell: nothing untrusted is executed.
            worker = subprocess.Popen(  # noqa: S603
                command, env=env, start_new_session=True, stdout=subprocess.DEVNULL
            )
            processes.append(worker)
        received = 0

        def forward(signum: int, _frame: FrameType | None) -> None:
            nonlocal received
            received += 1
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM if received == 1 else signal.SIGKILL)
            if received == 1:
                print(
                    f"\n{signal.Signals(signum).name}: draining {workers} workers "
                    f"(send it again to stop them at once)",
                    file=sys.stderr,
                )

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            codes = [_wait(process) for process in processes]
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if received > 1:
            return 130, None
        done = [json.loads(p.read_text()) for p in summaries if p.exists()]
        failed = [code for code in codes if code != 0]
        return (failed[0] if failed else 0), merge_summaries(done) if done else None


def _wait(process: subprocess.Popen[bytes]) -> int:
    while True:
        try:
            return process.wait()
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            time.sleep(0.01)


def merge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary for all workers: counts added up, latency the worst worker's."""
    counts = ("events_in", "events_out", "dead_letters", "skipped")
    total = {k: sum(s.get(k, 0) for s in summaries) for k in counts}
    duration = max(s["duration_s"] for s in summaries)
    batches = [s["batch_size_mean"] for s in summaries if s["batch_size_mean"]]
    return {
        **total,
        "duration_s": duration,
        "throughput_eps": round(total["events_in"] / duration, 1) if duration else 0.0,
        # Percentiles do not add up across processes: this is the slowest worker's.
        "latency_ms": {
            q: max(s["latency_ms"][q] for s in summaries) for q in ("p50", "p99", "p999", "max")
        },
        "batch_size_mean": round(sum(batches) / len(batches), 2) if batches else 0.0,
        "workers": len(summaries),
        "per_worker": summaries,
    }
