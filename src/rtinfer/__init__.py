"""rtinfer: put a model on a live stream of events and answer within milliseconds, nothing lost.

The public API is flat: everything a user builds a pipeline with is importable
from ``rtinfer``. Importing it defines names and does nothing else.
"""

from __future__ import annotations

from .batching import MicroBatcher
from .broker import Broker
from .build import build_pipeline, load_pipeline
from .config import PipelineConfig, load_config
from .exceptions import (
    Closed,
    ConfigError,
    DeadlineExceeded,
    MissingDependency,
    ModelError,
    ModelInputError,
    ModelLoadError,
    Overloaded,
    RtinferError,
)
from .models import OnnxModel, PythonModel, load_model, tensor
from .observability.metrics import Metrics
from .pipeline import Lifecycle, Pipeline, RunSummary
from .sinks import BrokerSink, JsonLinesSink, ListSink, StdoutSink
from .sources import BrokerSource, JsonLinesSource
from .stages import Decide, Decode, Outputs, Predict, Vectorize
from .types import Batch, DeadLetter, Event, Handler, Model, Position, Sink, Source, TensorSpec

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Broker",
    "BrokerSink",
    "BrokerSource",
    "Closed",
    "ConfigError",
    "DeadLetter",
    "DeadlineExceeded",
    "Decide",
    "Decode",
    "Event",
    "Handler",
    "JsonLinesSink",
    "JsonLinesSource",
    "Lifecycle",
    "ListSink",
    "Metrics",
    "MicroBatcher",
    "MissingDependency",
    "Model",
    "ModelError",
    "ModelInputError",
    "ModelLoadError",
    "OnnxModel",
    "Outputs",
    "Overloaded",
    "Pipeline",
    "PipelineConfig",
    "Position",
    "Predict",
    "PythonModel",
    "RtinferError",
    "RunSummary",
    "Sink",
    "Source",
    "StdoutSink",
    "TensorSpec",
    "Vectorize",
    "__version__",
    "build_pipeline",
    "load_config",
    "load_model",
    "load_pipeline",
    "tensor",
]
