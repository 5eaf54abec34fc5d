"""The demo end to end: the pipeline file it ships, its run, its summary and its commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rtinfer.cli import main
from rtinfer.config import parse_config
from rtinfer.demo.run import demo_config_text, prepare_stream, roc_auc, run_demo


def test_the_shipped_pipeline_file_parses() -> None:
    config = parse_config(demo_config_text(), file="pipeline.yaml")
    assert config.source.topic == "payments"  # type: ignore[union-attr]
    assert config.decision is not None
    assert set(config.decision.thresholds) == {"review", "block"}


def test_roc_auc_matches_scikit_learn_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    labels = rng.random(4000) < 0.05
    scores = np.round(rng.random(4000) + labels * 0.4, 2)  # rounded: many ties
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert np.isnan(roc_auc(np.zeros(5, bool), np.arange(5.0)))


async def test_a_small_demo_run_scores_every_event_and_reports_quality() -> None:
    stream = prepare_stream(3000, seed=11)
    stream[0][17] = b'{"id": "broken"'  # one bad payment: dead-lettered alone
    summary = await run_demo(events=3000, live=False, signals=False, stream=stream)
    assert summary["events_in"] == 3000
    assert (summary["events_out"], summary["dead_letters"]) == (2999, 1)
    assert sum(summary["decisions"].values()) == 2999
    assert set(summary["latency_ms"]) == {"p50", "p99", "p999", "max"}
    quality = summary["quality"]
    assert 0.5 < quality["roc_auc"] <= 1.0  # the model ranks fraud above normal payments
    assert 0.0 <= quality["precision"] <= 1.0
    assert 0.0 <= quality["recall"] <= 1.0


async def test_an_open_loop_demo_run_finishes() -> None:
    summary = await run_demo(
        events=400, rate=4000, live=False, signals=False, stream=prepare_stream(400)
    )
    assert summary["events_out"] == 400


def test_demo_generate_writes_the_events(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    assert main(["demo", "generate", "--events", "250", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 250
    assert {"id", "ts", "card", "amount", "is_fraud"} <= set(json.loads(lines[0]))


def test_demo_command_writes_its_summary(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    code = main(["demo", "--events", "1500", "--no-live", "--summary-json", str(path)])
    assert code == 0
    summary = json.loads(path.read_text())
    assert summary["events_out"] + summary["dead_letters"] == 1500
    assert "quality" in summary
