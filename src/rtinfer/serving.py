"""The models a server answers for, behind their micro-batchers: what HTTP and gRPC share.

A :class:`ModelServer` holds named, versioned models, each behind its own
:class:`~rtinfer.batching.MicroBatcher`, so concurrent requests (and stream
pipelines sharing the batcher) are batched together. The protocol fronts
(REST, gRPC, WebSocket) only translate: they find the model, check and decode
the request, call :meth:`ModelServer.infer`, and encode the answer or the error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .batching import MicroBatcher
from .exceptions import ModelInputError, RtinferError
from .observability.metrics import Metrics
from .types import Arrays, Model, TensorSpec

if TYPE_CHECKING:
    from .scoring import PipelineScorer

__all__ = [
    "ModelNotFound",
    "ModelServer",
    "ServedModel",
    "deadline_from_timeout",
    "decode_bytes_tensor",
    "encode_bytes_tensor",
    "numpy_dtype",
    "oip_datatype",
]

#: Open Inference Protocol datatypes and their numpy dtypes.
_OIP_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
_NUMPY_TO_OIP = {v: k for k, v in _OIP_TO_NUMPY.items()}


def oip_datatype(dtype: np.dtype[Any]) -> str:
    """The Open Inference Protocol name of a numpy dtype (``FP32`` for float32)."""
    try:
        return _NUMPY_TO_OIP[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None


def decode_bytes_tensor(data: bytes, count: int, where: str) -> npt.NDArray[Any]:
    """``count`` BYTES elements of the protocol's binary form, as an object array of ``str``.

    Each element is its length as a 4-byte little-endian integer, then its UTF-8 bytes.
    """
    if 4 * count > len(data):  # before allocating: a huge shape must not cost memory
        raise ModelInputError(
            f"{where}: {count} BYTES elements need at least {4 * count} bytes, got {len(data)}"
        )
    out = np.empty(count, dtype=object)
    offset = 0
    view = memoryview(data)
    for i in range(count):
        if offset + 4 > len(data):
            raise ModelInputError(f"{where}: the BYTES data ends after {i} of {count} elements")
        size = int.from_bytes(view[offset : offset + 4], "little")
        offset += 4
        if offset + size > len(data):
            raise ModelInputError(
                f"{where}: BYTES element {i} claims {size} bytes; only "
                f"{len(data) - offset} are left",
            )  # fmt: skip
        try:
            out[i] = str(view[offset : offset + size], "utf-8")
        except UnicodeDecodeError:
            raise ModelInputError(f"{where}: BYTES element {i} is not UTF-8 text") from None
        offset += size
    if offset != len(data):
        raise ModelInputError(
            f"{where}: {len(data) - offset} bytes left over after {count} BYTES elements"
        )
    return out


def encode_bytes_tensor(array: npt.NDArray[Any]) -> bytes:
    """An object array of ``str`` (or ``bytes``) in the protocol's binary BYTES form."""
    parts: list[bytes] = []
    for value in array.ravel().tolist():
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
        parts.append(len(raw).to_bytes(4, "little"))
        parts.append(raw)
    return b"".join(parts)


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of an Open Inference Protocol datatype name."""
    try:
        return _OIP_TO_NUMPY[datatype]
    except KeyError:
        known = ", ".join(_OIP_TO_NUMPY)
        raise ValueError(f"unknown datatype {datatype!r}; use one of {known}") from None


class ModelNotFound(RtinferError, LookupError):
    """No model (or no such version of it) is served here."""


class ServedModel:
    """One version of a model, behind its micro-batcher."""

    __slots__ = ("batcher", "model", "name")

    def __init__(self, name: str, model: Model, batcher: MicroBatcher) -> None:
        self.name = name
        self.model = model
        self.batcher = batcher

    @property
    def version(self) -> str:
        """The model's version (known once it is loaded: a file's content hash by default)."""
        return self.model.version

    @property
    def ready(self) -> bool:
        return self.batcher.ready

    def metadata(self) -> dict[str, Any]:
        """The Open Inference Protocol's model metadata."""
        onnx = type(self.model).__name__ == "OnnxModel"
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "onnxruntime_onnx" if onnx else "python",
            "inputs": [_tensor_metadata(s) for s in self.model.inputs],
            "outputs": [_tensor_metadata(s) for s in self.model.outputs],
        }


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "datatype": oip_datatype(spec.dtype),
        "shape": [-1 if d is None else d for d in spec.shape],
    }


class ModelServer:
    """Named models behind micro-batchers; start them all, infer on one, close them all.

    ``batching`` holds the :class:`MicroBatcher` keyword arguments used for every
    model added without a batcher of its own. Several versions of one name may be
    served; the last one added answers requests that name no version.
    """

    def __init__(
        self,
        *,
        metrics: Metrics | None = None,
        batching: Mapping[str, Any] | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.batching = dict(batching or {})
        self._models: dict[str, list[ServedModel]] = {}
        self.pipelines: dict[str, PipelineScorer] = {}
        self.started = False

    def add(
        self, model: Model, *, name: str | None = None, batcher: MicroBatcher | None = None
    ) -> ServedModel:
        """Serve ``model`` under ``name`` (default: its own name)."""
        served = ServedModel(
            name or model.name,
            model,
            batcher or MicroBatcher(model, metrics=self.metrics, **self.batching),
        )
        self._models.setdefault(served.name, []).append(served)
        return served

    def add_pipeline(self, scorer: PipelineScorer) -> None:
        """Serve a pipeline's stages for requests; its model is served too, sharing its batcher."""
        if scorer.name in self.pipelines:
            raise ValueError(f"a pipeline named {scorer.name!r} is already served")
        self.pipelines[scorer.name] = scorer
        self.add(scorer.batcher.model, batcher=scorer.batcher)

    def pipeline(self, name: str) -> PipelineScorer:
        """The served pipeline ``name``, or ModelNotFound."""
        try:
            return self.pipelines[name]
        except KeyError:
            known = ", ".join(sorted(self.pipelines)) or "none"
            raise ModelNotFound(f"unknown pipeline {name!r}; served here: {known}") from None

    def all(self) -> list[ServedModel]:
        return [served for versions in self._models.values() for served in versions]

    async def start(self) -> None:
        """Load and warm up every model (concurrently, each on its own thread)."""
        await asyncio.gather(*(s.batcher.start() for s in self.all()))
        for scorer in self.pipelines.values():
            await scorer.start()
        self.started = True

    async def aclose(self) -> None:
        """Finish the queued requests, then stop every model's threads."""
        self.started = False
        for scorer in self.pipelines.values():
            await scorer.aclose()
        await asyncio.gather(*(s.batcher.aclose() for s in self.all()))

    @property
    def ready(self) -> bool:
        """Every model is loaded, warmed up and taking requests."""
        return (
            self.started
            and all(s.ready for s in self.all())
            and all(p.ready for p in self.pipelines.values())
        )

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The served model ``name`` (its latest version unless ``version``), or ModelNotFound."""
        versions = self._models.get(name)
        if not versions:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"unknown model {name!r}; served here: {known}")
        if not version:
            return versions[-1]
        for served in versions:
            if served.version == version:
                return served
        have = ", ".join(s.version for s in versions)
        raise ModelNotFound(f"model {name!r} has no version {version!r}; it has {have}")

    async def infer(
        self,
        name: str,
        inputs: Arrays,
        *,
        version: str | None = None,
        deadline: float | None = None,
    ) -> tuple[ServedModel, Arrays]:
        """Run ``inputs`` through the model's batcher; fails fast with Overloaded when full."""
        served = self.get(name, version)
        rows = next((len(a) for a in inputs.values()), 0)
        if rows > served.batcher.max_queue_rows:  # could never fit: not a matter of retrying
            raise ModelInputError(
                f"the request has {rows} rows; model {served.name!r} takes at most "
                f"{served.batcher.max_queue_rows} per request (its max_queue_rows); split it"
            )
        outputs = await served.batcher.submit(inputs, deadline=deadline, wait=False)
        return served, outputs


def deadline_from_timeout(timeout_s: float | None) -> float | None:
    """A ``time.time()`` deadline ``timeout_s`` from now (``None``: no deadline)."""
    return None if timeout_s is None else time.time() + timeout_s
