"""The demo's model factory: the trained fraud model, as an ONNX Runtime model.

``model: {factory: rtinfer.demo.model:fraud_model}`` in a pipeline file uses
it. The first call trains the model (a minute at most) and caches it; later
calls load the cached file.
"""

from __future__ import annotations

from ..models import OnnxModel
from .training import MODEL_VERSION, ensure_model

__all__ = ["fraud_model"]


def fraud_model() -> OnnxModel:
    """The demo's gradient-boosted fraud model, trained on first use and cached."""
    return OnnxModel(ensure_model(), name="fraud", version=MODEL_VERSION)
