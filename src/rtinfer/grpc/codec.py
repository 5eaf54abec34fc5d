"""Tensors in and out of Open Inference Protocol gRPC messages, checked against the model.

A request carries each input either in the typed ``contents`` fields (chosen by
datatype, flattened row-major) or, for every input at once, in
``raw_input_contents`` (little-endian, row-major bytes). :func:`decode_inputs`
checks names, datatypes, shapes and sizes before anything reaches the batcher,
so one bad request fails alone with a message that names the input, the rule
and the fix; :func:`encode_outputs` answers in the form the request used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..exceptions import ModelInputError
from ..serving import (
    ServedModel,
    decode_bytes_tensor,
    encode_bytes_tensor,
    numpy_dtype,
    oip_datatype,
)
from ..types import Arrays
from . import inference_pb2 as pb

__all__ = ["decode_inputs", "encode_outputs"]

#: The ``InferTensorContents`` field that carries each datatype (FP16 has none).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def decode_inputs(served: ServedModel, request: pb.ModelInferRequest) -> Arrays:
    """The request's input tensors as numpy arrays; ModelInputError names what is wrong."""
    model = served.name
    specs = {spec.name: spec for spec in served.model.inputs}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ModelInputError(
            f"model {model!r}: the request has {len(request.inputs)} inputs but "
            f"{len(raw)} raw_input_contents; send one raw entry per input, in order"
        )
    arrays: Arrays = {}
    for index, tensor in enumerate(request.inputs):
        spec = specs.get(tensor.name)
        if spec is None:
            raise ModelInputError(
                f"model {model!r} has no input {tensor.name!r}; its inputs are {sorted(specs)}"
            )
        if tensor.name in arrays:
            raise ModelInputError(f"model {model!r}: input {tensor.name!r} is sent twice")
        want = oip_datatype(spec.dtype)
        if tensor.datatype != want:
            raise ModelInputError(
                f"model {model!r} input {tensor.name!r} expects datatype {want}, "
                f"got {tensor.datatype or 'none'!r}; send it as {want}"
            )
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            raise ModelInputError(
                f"model {model!r} input {tensor.name!r}: shape {list(shape)} has a negative "
                "dimension; a request states the exact shape of what it sends"
            )
        dtype = numpy_dtype(want)
        if raw:
            if tensor.HasField("contents"):
                raise ModelInputError(
                    f"model {model!r} input {tensor.name!r} has contents although the request "
                    "uses raw_input_contents; send every input one way"
                )
            array = _from_raw(model, tensor.name, raw[index], dtype, shape)
        else:
            array = _from_contents(model, tensor, want, dtype, shape)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ModelInputError(
                f"model {model!r} input {tensor.name!r} holds NaN or infinity; send finite numbers"
            )
        arrays[tensor.name] = array
    return arrays


#: The largest dimension accepted: beyond it numpy cannot even describe the array.
MAX_DIM = 2**31


def _check_dims(model: str, name: str, shape: tuple[int, ...]) -> None:
    if any(d > MAX_DIM for d in shape):
        raise ModelInputError(
            f"model {model!r} input {name!r}: shape {list(shape)} has a dimension above {MAX_DIM}"
        )


def _from_raw(
    model: str, name: str, data: bytes, dtype: np.dtype[Any], shape: tuple[int, ...]
) -> np.ndarray[Any, Any]:
    _check_dims(model, name, shape)
    count = math.prod(shape)
    if dtype.kind == "O":
        return decode_bytes_tensor(data, count, f"model {model!r} input {name!r}").reshape(shape)
    if len(data) != count * dtype.itemsize:
        raise ModelInputError(
            f"model {model!r} input {name!r}: shape {list(shape)} of {dtype} needs "
            f"{count * dtype.itemsize} bytes, raw_input_contents has {len(data)}"
        )
    # astype copies (the model gets a writable array it owns) into native byte order.
    little: np.dtype[Any] = dtype.newbyteorder("<")
    return np.frombuffer(data, dtype=little).reshape(shape).astype(dtype)


def _from_contents(
    model: str,
    tensor: pb.ModelInferRequest.InferInputTensor,
    datatype: str,
    dtype: np.dtype[Any],
    shape: tuple[int, ...],
) -> np.ndarray[Any, Any]:
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise ModelInputError(
            f"model {model!r} input {tensor.name!r}: datatype {datatype} has no typed contents "
            "field; send it in raw_input_contents"
        )
    values: Sequence[Any] = getattr(tensor.contents, field)
    _check_dims(model, tensor.name, shape)
    count = math.prod(shape)
    if len(values) != count:
        raise ModelInputError(
            f"model {model!r} input {tensor.name!r}: shape {list(shape)} holds {count} values, "
            f"contents.{field} has {len(values)}"
        )
    if dtype.kind == "O":
        strings = np.empty(count, dtype=object)
        try:
            strings[:] = [bytes(v).decode("utf-8") for v in values]
        except UnicodeDecodeError:
            raise ModelInputError(
                f"model {model!r} input {tensor.name!r}: a BYTES element is not UTF-8 text"
            ) from None
        return strings.reshape(shape)
    try:
        return np.array(values, dtype=dtype).reshape(shape)
    except OverflowError as exc:
        raise ModelInputError(
            f"model {model!r} input {tensor.name!r}: a value does not fit {datatype} ({exc})"
        ) from None


def encode_outputs(
    outputs: Arrays, requested: Sequence[str], *, raw: bool, response: pb.ModelInferResponse
) -> None:
    """Add ``outputs`` (only the ``requested`` names, in order; all when empty) to ``response``.

    ``raw``: in ``raw_output_contents`` (also used whenever an output has no typed field).
    """
    names = list(requested) or list(outputs)
    arrays = [outputs[name] for name in names]
    datatypes = [oip_datatype(array.dtype) for array in arrays]
    raw = raw or any(datatype not in _CONTENTS_FIELD for datatype in datatypes)
    for name, array, datatype in zip(names, arrays, datatypes, strict=True):
        tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if datatype == "BYTES":
            if raw:
                response.raw_output_contents.append(encode_bytes_tensor(array))
            else:
                tensor.contents.bytes_contents.extend(
                    v if isinstance(v, bytes) else str(v).encode() for v in array.ravel().tolist()
                )
        elif raw:
            little = array.astype(array.dtype.newbyteorder("<"), copy=False)
            response.raw_output_contents.append(little.tobytes())
        else:
            getattr(tensor.contents, _CONTENTS_FIELD[datatype]).extend(array.ravel().tolist())
