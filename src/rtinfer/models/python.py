"""Plain Python callables as models, vectorised over a batch.

The callable takes the batch's named input arrays and returns named output
arrays (or one array, named ``output``). It runs on the micro-batcher's worker
thread like any model, so it may block; numpy releases the GIL in most of its
heavy work.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ..exceptions import ModelLoadError
from ..types import Arrays, TensorSpec
from .base import example_inputs

__all__ = ["PythonModel", "tensor"]

PredictFn = Callable[[Arrays], "Arrays | npt.NDArray[Any]"]


def tensor(name: str, dtype: Any, shape: Sequence[int | None]) -> TensorSpec:
    """Declare a tensor: ``tensor("features", "float32", [None, 10])``."""
    return TensorSpec(name, np.dtype(dtype), tuple(shape))


class PythonModel:
    """A vectorised Python function with declared inputs and outputs.

    ``inputs`` declares what the function expects (checked on every call, like
    an ONNX graph's inputs). ``outputs`` is learnt from the warm-up call when
    not given.
    """

    def __init__(
        self,
        fn: PredictFn,
        *,
        inputs: Sequence[TensorSpec] | Mapping[str, tuple[Any, Sequence[int | None]]],
        outputs: Sequence[TensorSpec] | None = None,
        name: str | None = None,
        version: str = "1",
    ) -> None:
        if not callable(fn):
            raise ModelLoadError(f"a Python model needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.name: str = name or str(getattr(fn, "__name__", "python-model"))
        self.version = version
        if isinstance(inputs, Mapping):
            self.inputs = [tensor(k, dt, shape) for k, (dt, shape) in inputs.items()]
        else:
            self.inputs = list(inputs)
        if not self.inputs:
            raise ModelLoadError(f"Python model {self.name!r} declares no inputs")
        self.outputs: list[TensorSpec] = list(outputs or [])

    def load(self) -> None:
        if not self.outputs:
            out = self.predict(example_inputs(self.inputs, 1))
            self.outputs = [TensorSpec(k, v.dtype, (None, *v.shape[1:])) for k, v in out.items()]

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        for rows in batch_sizes:
            self.predict(example_inputs(self.inputs, rows))

    def predict(self, inputs: Arrays) -> Arrays:
        out = self.fn(inputs)
        if isinstance(out, np.ndarray):
            return {"output": out}
        if not isinstance(out, dict):
            raise TypeError(
                f"Python model {self.name!r} returned {type(out).__name__}; "
                f"return a numpy array or a dict of numpy arrays, one row per input row"
            )
        for name, array in out.items():
            if not isinstance(array, np.ndarray):
                raise TypeError(
                    f"Python model {self.name!r} output {name!r} is a {type(array).__name__}; "
                    f"return numpy arrays (np.asarray(...)), one row per input row"
                )
        return out

    def __repr__(self) -> str:
        return f"<PythonModel {self.name!r} version={self.version!r}>"
