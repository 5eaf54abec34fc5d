"""What every model shares: checking inputs against the model's tensor specs, and the
deadline of the call it is running.

A model's ``inputs`` are known once it is loaded. :func:`check_inputs` compares
a batch of named arrays with them, so a wrong name, shape or dtype fails with
a message that says what was expected and what was found, before the model
ever sees the data. :func:`call_deadline` tells a model's code, on the thread the
micro-batcher calls it on, until when its answer is wanted.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..exceptions import ModelInputError
from ..types import Arrays, TensorSpec

__all__ = ["CALL_DEADLINE", "call_deadline", "check_inputs", "example_inputs", "rows_of"]

#: The deadline of the model call running in this thread (:func:`call_deadline`); the
#: micro-batcher sets it for each call.
CALL_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "rtinfer_call_deadline", default=None
)


def call_deadline() -> float | None:
    """For a model's own code, on its thread: the ``time.time()`` instant after which
    nobody waits for the call it is running, the latest deadline of the batch's requests
    (``None``: one of them has none, or no micro-batcher made the call). A model that
    calls out (a feature store, a remote model) can bound its waits by it; the batcher
    has refused every request whose deadline passed before the call."""
    return CALL_DEADLINE.get()


def _shape_str(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("-1" if d is None else str(d) for d in shape) + "]"


def check_inputs(model_name: str, specs: Sequence[TensorSpec], inputs: Arrays) -> int:
    """Check ``inputs`` against ``specs`` and return the number of rows.

    Raises :class:`ModelInputError` naming the input, the expected and the found
    shape or dtype. Arrays of another numeric dtype are not converted silently:
    the caller converts once, where the data is built.
    """
    if len(inputs) != len(specs) or any(s.name not in inputs for s in specs):
        names = {s.name for s in specs}
        unknown = sorted(set(inputs) - names)
        if unknown:
            raise ModelInputError(
                f"model {model_name!r} has no input {unknown[0]!r}; its inputs are {sorted(names)}"
            )
    rows = -1
    for spec in specs:
        array = inputs.get(spec.name)
        if array is None:
            raise ModelInputError(
                f"model {model_name!r} input {spec.name!r} is missing; "
                f"it expects {spec.dtype} {spec.describe_shape()}"
            )
        if not isinstance(array, np.ndarray):
            raise ModelInputError(
                f"model {model_name!r} input {spec.name!r} expects a numpy array of "
                f"{spec.dtype} {spec.describe_shape()}, got {type(array).__name__}; "
                f"build it with np.asarray(value, dtype={str(spec.dtype)!r})"
            )
        if array.dtype != spec.dtype:
            # The dtype's name as a string is valid for every dtype (np.object is not).
            raise ModelInputError(
                f"model {model_name!r} input {spec.name!r} expects dtype {spec.dtype}, "
                f"got {array.dtype}; convert with .astype({str(spec.dtype)!r})"
            )
        if (
            array.ndim != len(spec.shape)
            or (
                array.shape[1:] != spec.shape[1:]  # equal: the common case, no loop
                and any(
                    want is not None and want != got
                    for want, got in zip(spec.shape[1:], array.shape[1:], strict=True)
                )
            )
        ):
            raise ModelInputError(
                f"model {model_name!r} input {spec.name!r} expects shape "
                f"{spec.describe_shape()}, got {_shape_str(array.shape)}"
            )
        if rows == -1:
            rows = array.shape[0]
        elif array.shape[0] != rows:
            raise ModelInputError(
                f"model {model_name!r} inputs disagree on the number of rows: "
                f"{spec.name!r} has {array.shape[0]}, another has {rows}"
            )
    return max(rows, 0)


def example_inputs(specs: Sequence[TensorSpec], rows: int) -> Arrays:
    """Zero-filled inputs of ``rows`` rows matching ``specs``, for warming a model up."""
    out: dict[str, np.ndarray[Any, Any]] = {}
    for spec in specs:
        dims = [rows] + [1 if d is None else d for d in spec.shape[1:]]
        if spec.dtype.kind == "O":  # string tensors: empty strings, not integer zeros
            out[spec.name] = np.full(dims, "", dtype=object)
        else:
            out[spec.name] = np.zeros(dims, dtype=spec.dtype)
    return out


def rows_of(arrays: Arrays) -> int:
    """The number of rows of a set of named arrays (0 if there are none)."""
    for array in arrays.values():
        return int(array.shape[0])
    return 0
