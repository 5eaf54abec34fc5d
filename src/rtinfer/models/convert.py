"""Turn scikit-learn and LightGBM models into ONNX, so serving always runs ONNX Runtime.

Serving one runtime means one set of thread settings, one input check and one
speed to measure, whatever library trained the model. Conversion needs the
``sklearn`` or ``lightgbm`` extra.

Pickles run arbitrary code when loaded, so :func:`load_pickle` refuses them
unless the caller says, explicitly, that the file is trusted.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from ..exceptions import MissingDependency, ModelLoadError

__all__ = ["lightgbm_to_onnx", "load_pickle", "sklearn_to_onnx", "to_onnx"]

INPUT_NAME = "features"


def sklearn_to_onnx(estimator: Any, n_features: int, *, input_name: str = INPUT_NAME) -> bytes:
    """Convert a fitted scikit-learn estimator or pipeline; classifiers output plain tensors."""
    try:
        from skl2onnx import to_onnx as skl_to_onnx
        from skl2onnx.common.data_types import FloatTensorType
    except ImportError as exc:
        raise MissingDependency("converting scikit-learn models", "sklearn") from exc
    options = {id(estimator): {"zipmap": False}} if hasattr(estimator, "predict_proba") else None
    try:
        onx = skl_to_onnx(
            estimator,
            initial_types=[(input_name, FloatTensorType([None, n_features]))],
            options=options,
            target_opset={"": 17, "ai.onnx.ml": 3},
        )
    except Exception as exc:  # skl2onnx raises many unrelated types
        raise ModelLoadError(
            f"skl2onnx cannot convert {type(estimator).__name__}: {_brief(exc)}; export it to "
            f"ONNX with a converter that supports it and serve the .onnx file"
        ) from exc
    return bytes(onx.SerializeToString())


def lightgbm_to_onnx(model: Any, n_features: int, *, input_name: str = INPUT_NAME) -> bytes:
    """Convert a LightGBM ``Booster`` or scikit-learn style ``LGBMClassifier``/``LGBMRegressor``."""
    try:
        from onnxmltools import convert_lightgbm
        from onnxmltools.convert.common.data_types import FloatTensorType
    except ImportError as exc:
        raise MissingDependency("converting LightGBM models", "lightgbm") from exc
    try:
        onx = convert_lightgbm(
            model,
            initial_types=[(input_name, FloatTensorType([None, n_features]))],
            zipmap=False,
            # The highest opset the installed onnxmltools supports (15 for 1.16): asking
            # for more than that fails, and ONNX Runtime runs every opset it may pick.
            target_opset=None,
        )
    except Exception as exc:  # onnxmltools raises many unrelated types
        raise ModelLoadError(
            f"onnxmltools cannot convert {type(model).__name__}: {_brief(exc)}"
        ) from exc
    # onnxmltools declares the label output with a fixed batch of 1 ([1]): every
    # output has one row per input row, so make the first dimension free.
    for output in onx.graph.output:
        if output.type.HasField("tensor_type"):
            dims = output.type.tensor_type.shape.dim
            if len(dims) > 0:
                dims[0].dim_param = "N"
    return bytes(onx.SerializeToString())


def to_onnx(model: Any, n_features: int, *, input_name: str = INPUT_NAME) -> bytes:
    """Convert a LightGBM or scikit-learn model, whichever it is."""
    module = type(model).__module__
    if module.startswith("lightgbm"):
        return lightgbm_to_onnx(model, n_features, input_name=input_name)
    return sklearn_to_onnx(model, n_features, input_name=input_name)


def load_pickle(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> Any:
    """Load a pickled (or joblib) model, only when ``allow_pickle`` says the file is trusted."""
    path = Path(path)
    if not allow_pickle:
        raise ModelLoadError(
            f"refusing to load {str(path)!r}: a pickle runs arbitrary code when loaded. "
            f"Export the model to ONNX, or set allow_pickle: true only for a file you trust"
        )
    if not path.is_file():
        raise ModelLoadError(f"model file {str(path)!r} does not exist")
    if path.suffix.lower() == ".joblib":
        try:
            import joblib
        except ImportError as exc:
            raise MissingDependency("loading .joblib models", "sklearn") from exc
        return joblib.load(path)
    with path.open("rb") as f:
        return pickle.load(f)  # noqa: S301 - the caller vouched for the file (allow_pickle)


def _brief(exc: BaseException, limit: int = 300) -> str:
    """The first line of a converter's error, cut short: some dump whole tree ensembles."""
    text = str(exc).strip().split("\n", 1)[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def n_features_of(model: Any) -> int:
    """The number of input features a fitted model was trained on."""
    for attr in ("n_features_in_", "n_features_"):
        n = getattr(model, attr, None)
        if isinstance(n, int):
            return n
    num_feature = getattr(model, "num_feature", None)
    if callable(num_feature):
        return int(num_feature())
    raise ModelLoadError(
        f"cannot tell how many features {type(model).__name__} expects; give n_features"
    )
