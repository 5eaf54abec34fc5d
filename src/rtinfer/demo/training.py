"""Train the demo's fraud model on generated payments, and cache it as ONNX.

:func:`ensure_model` is what the demo calls: it returns the cached model file,
training it first if it is missing (once per machine, some seconds). The file
is named after :data:`MODEL_VERSION`, which changes whenever the generator,
the features or the training change, so a stale model is never served: the new
version is simply trained next to it.

Training (:func:`train`) generates a stream with its own seed (not the demo's),
computes the features through the offline path
(:func:`~.features.offline_features`: :func:`rtinfer.features.backfill_rows`
over the declared ``features.yaml``), fits a scikit-learn
``GradientBoostingClassifier`` on the first 80 % of the stream in event time and
evaluates it on the last 20 %: a split by time, as in production, where a model
trained on the past scores the future. The
exported ONNX model is checked against scikit-learn on that hold-out before it
is written (atomically). Needs the ``demo`` extra (scikit-learn, skl2onnx).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import platformdirs

from ..exceptions import MissingDependency
from ..models.convert import sklearn_to_onnx
from .features import FEATURE_NAMES, FEATURES_VERSION, offline_features
from .generator import GENERATOR_VERSION, generate

__all__ = [
    "MODEL_VERSION",
    "TRAINING_VERSION",
    "TrainReport",
    "ensure_model",
    "fit_model",
    "onnx_scores",
    "train",
]

#: Bump whenever the training (data size, hyperparameters, split, features' path) changes.
TRAINING_VERSION = 2

#: The demo model's version, also its cache file name: generator, features, training.
MODEL_VERSION = (
    f"fraud-gb-g{GENERATOR_VERSION}-f{FEATURES_VERSION}x{len(FEATURE_NAMES)}-t{TRAINING_VERSION}"
)

_TYPICAL_SECONDS = 20  # for the progress message; measured on a shared 2-core machine
_THRESHOLD = 0.5  # the score at or above which precision and recall count a payment as flagged
_ONNX_TOLERANCE = 1e-4  # largest accepted difference between ONNX and scikit-learn


@dataclass(frozen=True, slots=True)
class TrainReport:
    """What :func:`train` did and how good the model is on the held-out last 20 % of the stream.

    ``precision`` and ``recall`` count a payment as flagged when its fraud
    probability is at least ``threshold``; ``roc_auc`` and ``average_precision``
    use the probabilities themselves. Scores are ONNX Runtime's (what the demo
    serves); ``onnx_max_abs_diff`` is their largest difference from scikit-learn's.
    """

    path: Path
    model_version: str
    events: int
    train_rows: int
    test_rows: int
    test_fraud: int
    threshold: float
    precision: float
    recall: float
    roc_auc: float
    average_precision: float
    onnx_max_abs_diff: float
    seconds: float


def fit_model(features: npt.NDArray[np.float32], labels: npt.NDArray[np.bool_]) -> Any:
    """A fitted ``GradientBoostingClassifier`` (100 trees of depth 3): the demo's model."""
    try:
        from sklearn.ensemble import GradientBoostingClassifier
    except ImportError as exc:
        raise MissingDependency("training the demo's fraud model", "demo") from exc
    model = GradientBoostingClassifier(
        n_estimators=100, max_depth=3, learning_rate=0.1, random_state=0
    )
    return model.fit(features, labels)


def train(path: Path, *, n: int = 60_000, seed: int = 12345) -> TrainReport:
    """Train on ``n`` generated payments, evaluate, and write the ONNX model to ``path``.

    Raises ``RuntimeError`` if the exported model disagrees with scikit-learn by
    more than 1e-4 on any held-out row (the file is then not written).
    """
    began = time.perf_counter()
    events = generate(n, seed=seed)
    features = offline_features(events)
    labels = np.array([e.is_fraud for e in events], np.bool_)
    cut = int(len(events) * 0.8)  # events are in event-time order: a split by time
    if not (labels[:cut].any() and labels[cut:].any()):
        raise ValueError(f"n={n} is too small: both parts of the stream need fraud in them")
    model = fit_model(features[:cut], labels[:cut])
    onnx_bytes = sklearn_to_onnx(model, len(FEATURE_NAMES))

    from sklearn import metrics

    test, truth = features[cut:], labels[cut:]
    scores = onnx_scores(onnx_bytes, test)
    diff = float(np.max(np.abs(scores - model.predict_proba(test)[:, 1])))
    if diff > _ONNX_TOLERANCE:
        raise RuntimeError(
            f"the ONNX export of the fraud model differs from scikit-learn by {diff:.3g} "
            f"(more than {_ONNX_TOLERANCE}); check the skl2onnx and onnxruntime versions"
        )
    _write_atomically(path, onnx_bytes)
    flagged = scores >= _THRESHOLD
    return TrainReport(
        path=path,
        model_version=MODEL_VERSION,
        events=len(events),
        train_rows=cut,
        test_rows=len(truth),
        test_fraud=int(truth.sum()),
        threshold=_THRESHOLD,
        precision=float(metrics.precision_score(truth, flagged, zero_division=0.0)),
        recall=float(metrics.recall_score(truth, flagged, zero_division=0.0)),
        roc_auc=float(metrics.roc_auc_score(truth, scores)),
        average_precision=float(metrics.average_precision_score(truth, scores)),
        onnx_max_abs_diff=diff,
        seconds=time.perf_counter() - began,
    )


def ensure_model(cache_dir: Path | None = None) -> Path:
    """The demo model's file, training it first (with a note on stderr) if it is not cached.

    The cache is ``platformdirs.user_cache_dir("rtinfer")`` unless ``cache_dir``
    is given; the file is ``{MODEL_VERSION}.onnx`` in it.
    """
    directory = Path(platformdirs.user_cache_dir("rtinfer")) if cache_dir is None else cache_dir
    path = directory / f"{MODEL_VERSION}.onnx"
    if not path.is_file():
        print(
            f"training the fraud model (first run only, ~{_TYPICAL_SECONDS} s)…",
            file=sys.stderr,
            flush=True,
        )
        directory.mkdir(parents=True, exist_ok=True)
        train(path)
    return path


def onnx_scores(onnx_bytes: bytes, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """The fraud probability that ONNX Runtime gives each row (on one thread: a check)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    probabilities = session.run(["probabilities"], {"features": features})[0]
    return np.asarray(probabilities[:, 1], np.float64)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
