"""Models: a narrow interface (load, warm up, predict on a batch) and the ways to build one.

:func:`load_model` picks the kind from the file: ``.onnx`` runs as is;
LightGBM text models (``.txt``) and scikit-learn/LightGBM pickles
(``.pkl``, ``.pickle``, ``.joblib``, only with ``allow_pickle=True``) are
converted to ONNX in memory, so serving always runs ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ..exceptions import MissingDependency, ModelLoadError
from .base import call_deadline, check_inputs, example_inputs, rows_of
from .convert import load_pickle, n_features_of, to_onnx
from .onnx import OnnxModel
from .python import PythonModel, tensor

__all__ = [
    "OnnxModel",
    "PythonModel",
    "call_deadline",
    "check_inputs",
    "example_inputs",
    "load_model",
    "rows_of",
    "tensor",
]

_PICKLES = {".pkl", ".pickle", ".joblib"}


def load_model(
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    version: str | None = None,
    allow_pickle: bool = False,
    **onnx_options: Any,
) -> OnnxModel:
    """Build an ONNX Runtime model from a model file of any supported kind (not loaded yet)."""
    p = Path(path)
    suffix = p.suffix.lower()
    name = name or p.stem
    if suffix == ".onnx":
        return OnnxModel(p, name=name, version=version, **onnx_options)
    if suffix in _PICKLES:
        model = load_pickle(p, allow_pickle=allow_pickle)
        data = to_onnx(model, n_features_of(model))
        return OnnxModel(data, name=name, version=version or _digest(p), **onnx_options)
    if suffix == ".txt":
        if not p.is_file():
            raise ModelLoadError(f"model file {str(p)!r} does not exist")
        try:
            import lightgbm
        except ImportError as exc:
            raise MissingDependency("loading LightGBM models", "lightgbm") from exc
        try:
            booster = lightgbm.Booster(model_file=str(p))
        except lightgbm.basic.LightGBMError as exc:
            raise ModelLoadError(
                f"{str(p)!r} is not a LightGBM text model ({exc}); a .txt model file is what "
                f"booster.save_model() writes"
            ) from exc
        data = to_onnx(booster, int(booster.num_feature()))
        return OnnxModel(data, name=name, version=version or _digest(p), **onnx_options)
    raise ModelLoadError(
        f"cannot tell what kind of model {str(p)!r} is from its suffix {suffix!r}; "
        f"use .onnx, a LightGBM .txt model, or a .pkl/.joblib pickle with allow_pickle"
    )


def _digest(path: Path) -> str:
    """The default version of a converted model: a prefix of its source file's SHA-256.

    Like an ``.onnx`` file's version, it changes when the file does.
    """
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
