"""Python stages that take ``metrics`` get the pipeline's, so their metrics are scraped."""

from __future__ import annotations

from pathlib import Path

from rtinfer.build import load_pipeline
from rtinfer.observability.metrics import Metrics
from rtinfer.types import Batch


class WithMetrics:
    def __init__(self, *, factor: float = 1.0, metrics: Metrics | None = None) -> None:
        self.factor = factor
        self.metrics = metrics

    def __call__(self, batch: Batch) -> Batch:
        return batch


class WithoutMetrics:
    def __init__(self, *, factor: float = 1.0) -> None:
        self.factor = factor

    def __call__(self, batch: Batch) -> Batch:
        return batch


def test_a_stage_taking_metrics_gets_the_pipelines(tmp_path: Path, model_file: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        f"""\
source: {{type: file, path: {tmp_path / "in.jsonl"}}}
decode: {{fields: {{id: str, x: float, y: float}}}}
stages:
  - {{type: python, use: "test_build_stage_metrics:WithMetrics", args: {{factor: 2.0}}}}
  - {{type: python, use: "test_build_stage_metrics:WithoutMetrics", args: {{factor: 3.0}}}}
  - {{type: vectorize, fields: [x, y]}}
model: {{path: {model_file}}}
sinks: [{{type: stdout}}]
"""
    )
    metrics = Metrics()
    pipeline = load_pipeline(path, metrics=metrics)
    with_metrics, without = pipeline.stages[1], pipeline.stages[2]
    assert isinstance(with_metrics, WithMetrics)
    assert with_metrics.metrics is metrics
    assert with_metrics.factor == 2.0
    assert isinstance(without, WithoutMetrics)
    assert without.factor == 3.0
