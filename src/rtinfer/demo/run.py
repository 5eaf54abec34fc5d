"""``rtinfer demo``: live fraud scoring of a synthetic card-payment stream on the in-process broker.

The run: make sure the model is trained (first run only), generate the
stream, build the pipeline from the demo's pipeline file, publish the events
to the ``payments`` topic (open loop at ``rate`` events/s, or as fast as the
pipeline takes them), and score them live until all are done or Ctrl-C.
The summary adds the decisions' quality against the generator's labels:
an event counts as flagged when its decision is not ``approve``.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import sys
import time
from collections import Counter
from typing import Any

import numpy as np

from ..broker import Broker
from ..build import build_pipeline
from ..config import parse_config
from ..observability.live import LiveView
from ..observability.metrics import Metrics
from ..pipeline import Pipeline
from ..signals import handle_signals
from ..types import Batch
from .generator import encode_events, generate
from .training import ensure_model

__all__ = [
    "DemoStats",
    "demo_config_text",
    "prepare_stream",
    "publish",
    "roc_auc",
    "run_demo",
]

TOPIC = "payments"
DEFAULT_EVENTS = 200_000
DEMO_SEED = 7


def demo_config_text() -> str:
    """The demo's pipeline file, shipped inside the package."""
    return (importlib.resources.files("rtinfer.demo") / "pipeline.yaml").read_text("utf-8")


class DemoStats:
    """Counts decisions and scores them against the ground-truth labels, a batch at a time."""

    def __init__(self) -> None:
        self.decisions: dict[str, int] = {}
        self.fraud = 0
        self.caught = 0
        self.flagged = 0
        self._scores: list[np.ndarray[Any, Any]] = []
        self._labels: list[np.ndarray[Any, Any]] = []

    def on_batch(self, batch: Batch) -> None:
        events = batch.events
        if not events or batch.outputs is None:
            return
        n = len(events)
        labels = np.fromiter((e.data.is_fraud for e in events), np.bool_, n)
        scores = np.asarray(batch.outputs["probabilities"][:, 1], dtype=np.float64)
        decisions = Counter([e.result["decision"] for e in events])
        flagged = n - decisions.get("approve", 0)
        caught = int(labels.sum()) - sum(
            1
            for e, fraud in zip(events, labels.tolist(), strict=True)
            if fraud and e.result["decision"] == "approve"
        )
        for decision, count in decisions.items():
            self.decisions[decision] = self.decisions.get(decision, 0) + count
        self.fraud += int(labels.sum())
        self.flagged += flagged
        self.caught += caught
        self._labels.append(labels)
        self._scores.append(scores)

    def rows(self) -> dict[str, str]:
        d = self.decisions
        recall = self.caught / self.fraud if self.fraud else 0.0
        return {
            "approve / review / block": (
                f"{d.get('approve', 0):,} / {d.get('review', 0):,} / {d.get('block', 0):,}"
            ),
            "fraud caught": f"{self.caught:,} of {self.fraud:,} ({recall:.0%})",
        }

    def quality(self) -> dict[str, float]:
        precision = self.caught / self.flagged if self.flagged else 0.0
        recall = self.caught / self.fraud if self.fraud else 0.0
        auc = float("nan")
        if self._labels:
            auc = roc_auc(np.concatenate(self._labels), np.concatenate(self._scores))
        return {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "roc_auc": round(auc, 4),
        }


def roc_auc(labels: np.ndarray[Any, Any], scores: np.ndarray[Any, Any]) -> float:
    """Area under the ROC curve: the chance a fraud scores above a normal payment.

    The Mann-Whitney rank statistic, ties averaged, in numpy (importing scikit-learn
    for one number would take seconds).
    """
    n = labels.size
    positives = int(labels.sum())
    if positives in (0, n):
        return float("nan")
    order = np.argsort(scores, kind="stable")
    _, inverse, counts = np.unique(scores[order], return_inverse=True, return_counts=True)
    rank_sums = np.bincount(inverse, weights=np.arange(1, n + 1, dtype=np.float64))
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = (rank_sums / counts)[inverse]
    negatives = n - positives
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


async def publish(
    broker: Broker,
    pipeline: Pipeline,
    values: list[bytes],
    keys: list[bytes | None],
    *,
    rate: float | None,
    stop: asyncio.Event,
) -> int:
    """Publish ``values`` to the demo topic; returns how many were published.

    With ``rate``, arrivals are open loop: each event is stamped with the time
    it was due, so a pipeline that falls behind is charged for the queue it
    causes. Without, the topic is kept topped up with a bounded backlog
    (twice ``read_size`` times ``max_in_flight`` events), so latency is measured at
    full throughput rather than as the time to drain a huge backlog.
    """
    n = len(values)
    sent = 0
    if rate is not None:
        began = time.time()
        while sent < n and not stop.is_set():
            due = min(n, int((time.time() - began) * rate) + 1)
            if due > sent:
                stamps = (began + np.arange(sent, due) / rate).tolist()
                broker.publish_many(TOPIC, values[sent:due], keys=keys[sent:due], timestamps=stamps)
                sent = due
            await asyncio.sleep(max(0.0, began + sent / rate - time.time()))
    else:
        backlog = pipeline.read_size * pipeline.max_in_flight * 2
        progress = asyncio.Event()
        pipeline.observe(lambda _batch: progress.set())
        while sent < n and not stop.is_set():
            done = pipeline.events_out + pipeline.dead_count
            room = backlog - (sent - done)
            if room > 0:
                upto = min(n, sent + room)
                broker.publish_many(TOPIC, values[sent:upto], keys=keys[sent:upto])
                sent = upto
            progress.clear()
            await progress.wait()
    broker.end_topic(TOPIC)
    return sent


def prepare_stream(events: int, seed: int = DEMO_SEED) -> tuple[list[bytes], list[bytes | None]]:
    """The demo's payments, encoded as JSON, and their keys (the card)."""
    txs = generate(events, seed=seed)
    return encode_events(txs), [t.card.encode() for t in txs]


async def run_demo(
    *,
    events: int = DEFAULT_EVENTS,
    rate: float | None = None,
    metrics_port: int | None = None,
    live: bool = True,
    seed: int = DEMO_SEED,
    signals: bool = True,
    stream: tuple[list[bytes], list[bytes | None]] | None = None,
    config_text: str | None = None,
) -> dict[str, Any]:
    """Run the demo and return its summary (the ``--summary-json`` document).

    ``stream`` replaces the generated payments (benchmarks prepare them once);
    ``config_text`` the pipeline file (benchmarks swap the feature stage).
    """
    if events < 1:
        raise ValueError(f"--events must be at least 1, got {events}")
    if rate is not None and rate <= 0:
        raise ValueError(f"--rate must be a positive number of events per second, got {rate}")
    await asyncio.to_thread(ensure_model)
    if stream is None:
        print(f"generating {events:,} card payments…", file=sys.stderr)
        stream = await asyncio.to_thread(prepare_stream, events, seed)
    values, keys = stream

    broker = Broker(default_partitions=4)
    metrics = Metrics()
    config = parse_config(config_text or demo_config_text(), file="rtinfer/demo/pipeline.yaml")
    pipeline = build_pipeline(config, broker=broker, metrics=metrics)
    stats = DemoStats()
    pipeline.observe(stats.on_batch)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr="127.0.0.1", registry=metrics.registry)
        print(f"metrics on http://127.0.0.1:{metrics_port}/metrics", file=sys.stderr)

    stop = asyncio.Event()

    def request_stop() -> None:
        stop.set()
        pipeline.stop()

    remove_signals = handle_signals(request_stop) if signals else None
    view_task: asyncio.Task[None] | None = None
    run_task = asyncio.create_task(pipeline.run())
    try:
        ready = asyncio.create_task(pipeline.ready.wait())
        await asyncio.wait({run_task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if run_task.done():
            ready.cancel()
            await run_task  # raises what failed the start-up
        mode = f"at {rate:,.0f} events/s" if rate else "as fast as the pipeline takes them"
        print(f"scoring {len(values):,} payments {mode} (Ctrl-C to stop)", file=sys.stderr)
        if live:
            view = LiveView(pipeline, title="rtinfer demo: fraud scoring", extra=stats.rows)
            view_task = asyncio.create_task(view.run())
        publisher = asyncio.create_task(
            publish(broker, pipeline, values, keys, rate=rate, stop=stop)
        )
        try:
            summary = await run_task
        finally:
            publisher.cancel()  # stopped or failed early: nothing more to publish
            await asyncio.gather(publisher, return_exceptions=True)
    finally:
        if view_task is not None:
            view_task.cancel()
            await asyncio.gather(view_task, return_exceptions=True)
        if remove_signals is not None:
            remove_signals()
    result = summary.as_dict()
    result["decisions"] = dict(sorted(stats.decisions.items()))
    result["quality"] = stats.quality()
    return result
