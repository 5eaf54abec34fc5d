"""ONNX Runtime models: the one runtime rtinfer serves with.

Input and output names, shapes and dtypes are read from the graph when the
model loads. Thread settings are explicit: ONNX Runtime's defaults use every
core for one call, which on a small machine fights the event loop and the
other batches in flight (a p99 cliff), so rtinfer defaults to one intra-op
thread per batch in flight and lets you raise it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..exceptions import ModelLoadError
from ..types import Arrays, TensorSpec
from .base import example_inputs

__all__ = ["OnnxModel", "choose_providers"]

_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(string)": np.dtype(np.object_),
}


def choose_providers(available: Sequence[str]) -> list[str]:
    """CUDA when ONNX Runtime has it, then the CPU, which is always there."""
    chosen = [p for p in ("CUDAExecutionProvider",) if p in available]
    return [*chosen, "CPUExecutionProvider"]


def _spec(node: Any) -> TensorSpec | None:
    dtype = _DTYPES.get(node.type)
    if dtype is None:
        return None
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in node.shape)
    return TensorSpec(node.name, dtype, shape)


class OnnxModel:
    """A model in an ``.onnx`` file, run by ONNX Runtime.

    ``intra_op_threads`` and ``inter_op_threads`` go straight to the session
    options; ``providers`` defaults to CUDA where present, else the CPU.
    ``version`` defaults to the first 12 hex digits of the file's SHA-256, so a
    changed file is a new version.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | bytes,
        *,
        name: str | None = None,
        version: str | None = None,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        providers: Sequence[str] | None = None,
    ) -> None:
        # A model converted in memory (from scikit-learn, LightGBM) arrives as bytes.
        self._data = path if isinstance(path, bytes) else None
        self.path = Path("<memory>") if isinstance(path, bytes) else Path(path)
        self.name = name or self.path.stem
        self._given_version = version
        self._version = version
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self._providers = list(providers) if providers is not None else None
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self.providers: list[str] = []
        self._session: Any = None
        self._output_names: list[str] = []

    @property
    def version(self) -> str:
        return self._version or "unloaded"

    def load(self) -> None:
        import onnxruntime as ort

        data = self._data
        if data is None:
            if not self.path.is_file():
                raise ModelLoadError(
                    f"model file {str(self.path)!r} does not exist; check the path "
                    f"(relative paths start from the current directory)"
                )
            data = self.path.read_bytes()
        # Hashed on every load: reloading a changed file must not keep the old version.
        version = self._given_version or hashlib.sha256(data).hexdigest()[:12]
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = self._providers or choose_providers(ort.get_available_providers())
        try:
            self._session = ort.InferenceSession(data, options, providers=providers)
        except Exception as exc:  # ONNX Runtime raises its own untyped errors
            raise ModelLoadError(f"ONNX Runtime could not load {str(self.path)!r}: {exc}") from exc
        self._version = version
        self.providers = list(self._session.get_providers())
        inputs = [_spec(node) for node in self._session.get_inputs()]
        if any(s is None for s in inputs):
            kinds = [node.type for node in self._session.get_inputs()]
            raise ModelLoadError(
                f"model {self.name!r} has a non-tensor input ({kinds}); only tensor inputs "
                f"are supported"
            )
        self.inputs = [s for s in inputs if s is not None]
        # Non-tensor outputs (a ZipMap's list of dicts) are slow and cannot be sliced
        # per caller: they are left out. Convert with zipmap disabled to keep them.
        self.outputs = [s for s in map(_spec, self._session.get_outputs()) if s is not None]
        if not self.outputs:
            raise ModelLoadError(
                f"model {self.name!r} has no tensor output; if it was converted from "
                f"scikit-learn, convert with options={{'zipmap': False}}"
            )
        self._output_names = [s.name for s in self.outputs]

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        """Run a zero-filled batch of each size; on the CPU alone, of the smallest only.

        The CPU provider's first call at a new batch size costs what its next does
        (measured at 1 to 256 rows, an MLP and a tree ensemble: within 0.25 ms, 10%), so
        warming each size would only take CPU from the versions serving beside a new
        one (``benchmarks/update.py``); the first call of all, which sets the session up,
        is the one worth running. Other providers (CUDA, TensorRT) choose kernels and
        allocate per shape on a first call: every size is run.
        """
        if self.providers == ["CPUExecutionProvider"]:
            batch_sizes = sorted(batch_sizes)[:1]
        for rows in batch_sizes:
            self.predict(example_inputs(self.inputs, rows))

    def predict(self, inputs: Arrays) -> Arrays:
        results = self._session.run(self._output_names, inputs)
        return dict(zip(self._output_names, results, strict=True))

    def __repr__(self) -> str:
        return f"<OnnxModel {self.name!r} version={self.version!r} path={str(self.path)!r}>"
