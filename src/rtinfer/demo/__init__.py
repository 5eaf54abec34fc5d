"""The fraud-detection demo's data and model: card payments, their features, the model.

- :mod:`~rtinfer.demo.events`: :class:`Transaction`, the JSON event;
- :mod:`~rtinfer.demo.generator`: a deterministic synthetic stream with labelled fraud;
- :mod:`~rtinfer.demo.features`: the per-card features, declared in ``features.yaml``
  (training data through the offline path, :func:`offline_features`), served through
  the feature engine by :class:`CardFeatures` (:class:`HandCardFeatures`: the same,
  hand-vectorised, the yardstick of the engine's cost);
- :mod:`~rtinfer.demo.training`: trains the gradient-boosted model and caches it as ONNX.

``rtinfer demo`` runs them live; see ``examples/fraud/README.md``.
"""

from __future__ import annotations

from .events import PATTERNS, Transaction
from .features import (
    FEATURE_NAMES,
    FEATURES_VERSION,
    CardFeatures,
    HandCardFeatures,
    offline_features,
)
from .generator import GENERATOR_VERSION, encode_events, generate, write_jsonl
from .training import MODEL_VERSION, TrainReport, ensure_model, fit_model, train

__all__ = [
    "FEATURES_VERSION",
    "FEATURE_NAMES",
    "GENERATOR_VERSION",
    "MODEL_VERSION",
    "PATTERNS",
    "CardFeatures",
    "HandCardFeatures",
    "TrainReport",
    "Transaction",
    "encode_events",
    "ensure_model",
    "fit_model",
    "generate",
    "offline_features",
    "train",
    "write_jsonl",
]
