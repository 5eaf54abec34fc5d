"""Open Inference Protocol (KServe V2) REST bodies: decode requests, encode responses.

Supports JSON tensors (``data`` flat in row-major order, or nested) and the
binary tensor data extension: the body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw tensors, each
input naming its size in ``parameters.binary_data_size``; outputs are sent the
same way when a request asks with ``parameters.binary_data`` on an output or
``parameters.binary_data_output`` on the request.

Every value is checked before it reaches a batch: the datatype must be the
model's, the data must hold exactly ``prod(shape)`` numbers that fit the
datatype (``true``/``false`` are not numbers), and floating-point data must be
finite. ``BYTES`` tensors (ONNX string tensors) are JSON strings, or in binary
each element's length as a 4-byte little-endian integer followed by its UTF-8
bytes; they reach the model as numpy object arrays of ``str``. Requested
outputs are checked against the model's outputs before it runs. Nothing here
ever unpickles: bytes in, numpy arrays out.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec
import numpy as np
import numpy.typing as npt

from ..serving import (
    ServedModel,
    decode_bytes_tensor,
    encode_bytes_tensor,
    numpy_dtype,
    oip_datatype,
)
from ..types import Arrays, TensorSpec
from .errors import HttpError

__all__ = ["OFFLOAD_BYTES", "InferRequest", "decode_infer", "encode_infer", "to_array"]

HEADER_LENGTH = "inference-header-content-length"

#: Bodies larger than this are decoded on a worker thread, not the event loop (decoding
#: 256 KiB of JSON numbers takes about a millisecond: every other request would wait);
#: outputs of more than an eighth of it (each number ~8 times larger as JSON) are
#: encoded there too.
OFFLOAD_BYTES = 256 * 1024


class RequestInput(msgspec.Struct, forbid_unknown_fields=False):
    """One input tensor of an inference request."""

    name: str
    shape: list[int]
    datatype: str
    data: msgspec.Raw = msgspec.Raw(b"")  # decoded once its datatype is known (tensor_data)
    parameters: dict[str, Any] | None = None


class RequestOutput(msgspec.Struct):
    """An output a request asks for by name."""

    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(msgspec.Struct):
    """An Open Inference Protocol inference request."""

    inputs: list[RequestInput]
    id: str | None = None
    outputs: list[RequestOutput] | None = None
    parameters: dict[str, Any] | None = None


_decoder = msgspec.json.Decoder(InferRequest)
_encoder = msgspec.json.Encoder()


def _param(parameters: dict[str, Any] | None, key: str) -> Any:
    return None if parameters is None else parameters.get(key)


def decode_infer(
    body: bytes, header_length: str | None, served: ServedModel
) -> tuple[InferRequest, Arrays]:
    """Parse and check an inference request; return it with its inputs as numpy arrays."""
    binary = b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 <= length <= len(body):
            raise HttpError(
                400,
                f"Inference-Header-Content-Length {header_length!r} must be a whole number of "
                f"bytes between 0 and the body's length ({len(body)})",
            )
        body, binary = body[:length], body[length:]
    try:
        request = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise HttpError(400, f"invalid inference request: {exc}") from None
    except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise HttpError(400, f"the body is not valid JSON: {exc}") from None
    specs = {s.name: s for s in served.model.inputs}
    inputs: Arrays = {}
    offset = 0
    for item in request.inputs:
        spec = specs.get(item.name)
        if spec is None:
            raise HttpError(
                400, f"model {served.name!r} has no input {item.name!r}; its inputs are "
                f"{sorted(specs)}",
            )  # fmt: skip
        if item.name in inputs:
            raise HttpError(400, f"input {item.name!r} is given twice")
        _check_datatype(served.name, spec, item.datatype)
        where = f"input {item.name!r}"
        size = _param(item.parameters, "binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise HttpError(
                    400,
                    f"{where}: binary_data_size {size!r} must be a whole number of bytes within "
                    f"the {len(binary)} binary bytes after the JSON header",
                )
            inputs[item.name] = _from_bytes(
                binary[offset : offset + size], spec.dtype, item.shape, where
            )
            offset += size
        else:
            if not item.data or bytes(item.data) == b"null":
                raise HttpError(400, f"{where} has no data and no parameters.binary_data_size")
            inputs[item.name] = tensor_data(item.data, spec.dtype, item.shape, where)
    if offset != len(binary):
        raise HttpError(
            400, f"{len(binary) - offset} binary bytes after the JSON header belong to no input"
        )
    if request.outputs:
        known = [s.name for s in served.model.outputs]
        for out in request.outputs:
            if known and out.name not in known:
                raise HttpError(
                    400, f"model {served.name!r} has no output {out.name!r}; its outputs are "
                    f"{sorted(known)}",
                )  # fmt: skip
    return request, inputs


def _check_datatype(model: str, spec: TensorSpec, datatype: str) -> None:
    want = oip_datatype(spec.dtype)
    if datatype != want:
        try:
            numpy_dtype(datatype)
        except ValueError as exc:
            raise HttpError(400, f"input {spec.name!r}: {exc}") from None
        raise HttpError(
            400, f"model {model!r} input {spec.name!r} expects datatype {want}, got {datatype}"
        )


#: The largest dimension accepted: beyond it numpy cannot even describe the array.
MAX_DIM = 2**31


def _check_shape(shape: Sequence[int], where: str) -> int:
    if not shape:
        raise HttpError(400, f"{where}: shape {list(shape)} must be non-negative whole numbers")
    for d in shape:
        if type(d) is not int or d < 0:
            raise HttpError(400, f"{where}: shape {list(shape)} must be non-negative whole numbers")
        if d > MAX_DIM:
            raise HttpError(400, f"{where}: shape {list(shape)} has a dimension above {MAX_DIM}")
    return math.prod(shape)


def _from_bytes(
    data: bytes, dtype: np.dtype[Any], shape: Sequence[int], where: str
) -> npt.NDArray[Any]:
    count = _check_shape(shape, where)
    if dtype.kind == "O":
        return decode_bytes_tensor(data, count, where).reshape(shape)
    if len(data) != count * dtype.itemsize:
        raise HttpError(
            400,
            f"{where}: shape {list(shape)} of {dtype} needs {count * dtype.itemsize} bytes, "
            f"binary_data_size gives {len(data)}",
        )
    array = np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
    _check_finite(array, where)
    return array.reshape(shape)


def _strings_to_json(array: npt.NDArray[Any]) -> list[str]:
    return [
        v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
        for v in array.ravel().tolist()
    ]


def _bounded(dtype: np.dtype[Any]) -> Any:
    """The Python type of one JSON number that fits ``dtype``, bounds checked by msgspec."""
    if dtype.kind == "f":
        limit = float(np.finfo(dtype).max)
        return Annotated[float, msgspec.Meta(ge=-limit, le=limit)]
    info = np.iinfo(dtype)
    return Annotated[int, msgspec.Meta(ge=int(info.min), le=int(info.max))]


@functools.cache
def _fast_decoders(dtype: np.dtype[Any]) -> tuple[Any, Any] | None:
    """Decoders of numbers that fit ``dtype``, flat and in rows (``None``: no fast path).

    msgspec checks every value in C: its type (``true`` is not a number, ``1.5`` not an
    integer) and its range (no float32 overflows to infinity, no int8 wraps; JSON has no
    NaN or infinity), so what they return converts to ``dtype`` exactly as it is.
    """
    if dtype.kind not in "fiu" or dtype.byteorder not in "=|":
        return None
    number = _bounded(dtype)
    flat = msgspec.json.Decoder(list[number]).decode  # type: ignore[valid-type]
    rows = msgspec.json.Decoder(list[list[number]]).decode  # type: ignore[valid-type]
    return flat, rows


_ANY = msgspec.json.Decoder().decode


def _range(dtype: np.dtype[Any]) -> str:
    if dtype.kind == "f":
        return f"magnitude up to {np.finfo(dtype).max:g}"
    info = np.iinfo(dtype)
    return f"{info.min} to {info.max}"


def tensor_data(
    raw: msgspec.Raw, dtype: np.dtype[Any], shape: Sequence[int], where: str
) -> npt.NDArray[Any]:
    """A request input's ``data`` (raw JSON) as an array of ``dtype`` and ``shape``, checked.

    Numbers flat or in rows (the common case) are decoded straight into a list of
    numbers that fit ``dtype`` (:func:`_fast_decoders`), leaving one conversion.
    Anything else, bad data included, goes through :func:`to_array`'s general checks,
    which say what is wrong.
    """
    fast = _fast_decoders(dtype)
    if fast is not None:
        count = _check_shape(shape, where)
        flat, rows = fast
        # Try the layout the shape suggests first: a failed decode costs an exception.
        for decode in (rows, flat) if len(shape) > 1 else (flat, rows):
            try:
                values = decode(raw)
            except msgspec.ValidationError as exc:
                if "` <= " in str(exc) or "` >= " in str(exc):  # a number out of range
                    raise HttpError(
                        400, f"{where}: values must fit {oip_datatype(dtype)} ({_range(dtype)})"
                    ) from None
                continue
            except msgspec.DecodeError:
                continue
            try:
                array = np.array(values, dtype=dtype)
            except ValueError:  # rows of unequal length: the general path says so
                break
            if array.size != count:
                raise HttpError(
                    400, f"{where}: shape {list(shape)} holds {count} values, data has {array.size}"
                )
            return array.reshape(shape)
    try:
        data = _ANY(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise HttpError(400, f"{where}: data is not valid JSON: {exc}") from None
    if dtype.kind != "b" and _holds_bool(data):
        raise HttpError(
            400, f"{where}: data must be numbers for {oip_datatype(dtype)}; got true/false"
        )
    return to_array(data, dtype, shape, where)


def _holds_bool(data: Any) -> bool:
    """Whether nested lists hold a ``true`` or ``false`` anywhere (the general path only)."""
    if isinstance(data, bool):
        return True
    if isinstance(data, list):
        return any(_holds_bool(item) for item in data)
    return False


def to_array(
    data: Any, dtype: np.dtype[Any], shape: Sequence[int] | None, where: str
) -> npt.NDArray[Any]:
    """JSON numbers (flat or nested) as an array of ``dtype``, checked to fit and be finite.

    ``shape`` (when given) must hold exactly as many values as ``data``; the
    result has that shape. Without it the nesting of ``data`` is the shape.
    """
    count = None if shape is None else _check_shape(shape, where)
    try:
        raw = np.asarray(data)
    except ValueError:
        message = f"{where}: nested data must be rectangular (rows of equal length)"
        raise HttpError(400, message) from None
    kind = raw.dtype.kind
    if dtype.kind == "O":
        if raw.size and kind != "U":
            raise HttpError(400, f"{where}: BYTES data must be strings (flat or nested lists)")
        if count is not None and raw.size != count:
            raise HttpError(
                400, f"{where}: shape {list(shape or [])} holds {count} values, data has {raw.size}"
            )
        strings = raw.astype(object)
        return strings if shape is None else strings.reshape(shape)
    if kind == "b" and dtype.kind != "b" and raw.size:
        raise HttpError(
            400, f"{where}: data must be numbers for {oip_datatype(dtype)}; got true/false"
        )
    if raw.size and kind not in "biuf":
        raise HttpError(
            400, f"{where}: data must be numbers that fit {oip_datatype(dtype)} "
            f"(found a value that is not a number, or a whole number too large)",
        )  # fmt: skip
    if count is not None and raw.size != count:
        raise HttpError(
            400, f"{where}: shape {list(shape or [])} holds {count} values, data has {raw.size}"
        )
    target = dtype.kind
    if target == "b" and raw.size and kind != "b":
        raise HttpError(400, f"{where}: BOOL data must be true or false")
    if target in "iu":
        if raw.size and kind == "f" and not np.all(np.equal(np.mod(raw, 1), 0)):
            raise HttpError(400, f"{where}: {oip_datatype(dtype)} data must be whole numbers")
        if raw.size:
            info = np.iinfo(dtype)
            low, high = raw.min(), raw.max()
            # Floats compare inexactly near 2**63: float(2**63 - 1) == 2**63, which would
            # wrap; the top bound is exclusive for floats (the next representable limit).
            too_high = (
                high >= 2.0 ** (info.bits - (1 if dtype.kind == "i" else 0))
                if kind == "f"
                else high > info.max
            )
            if low < info.min or too_high:
                raise HttpError(
                    400, f"{where}: values must fit {oip_datatype(dtype)} "
                    f"({info.min} to {info.max}); got one of {low if low < info.min else high}",
                )  # fmt: skip
    if target == "f" and raw.size:
        limit = np.finfo(dtype).max
        if np.abs(raw.astype(np.float64)).max() > limit:
            raise HttpError(
                400, f"{where}: values must fit {oip_datatype(dtype)} (magnitude up to {limit:g})"
            )
    array = raw.astype(dtype)
    return array if shape is None else array.reshape(shape)


def _check_finite(array: npt.NDArray[Any], where: str) -> None:
    if array.dtype.kind == "f" and array.size and not np.isfinite(array).all():
        raise HttpError(400, f"{where}: NaN and infinity are not allowed")


def encode_infer(
    request: InferRequest, served: ServedModel, outputs: Arrays, step: str | None = None
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it.

    ``step``: the fallback step that produced the outputs, answered as the response's
    ``parameters.rtinfer_step`` (only for a model with a fallback chain).
    """
    binary_all = bool(_param(request.parameters, "binary_data_output"))
    if request.outputs:
        wanted = []
        for out in request.outputs:
            if out.name not in outputs:
                raise HttpError(
                    400, f"model {served.name!r} has no output {out.name!r}; its outputs are "
                    f"{sorted(outputs)}",
                )  # fmt: skip
            flag = _param(out.parameters, "binary_data")
            wanted.append((out.name, binary_all if flag is None else bool(flag)))
    else:
        wanted = [(name, binary_all) for name in outputs]
    items: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, as_binary in wanted:
        array = outputs[name]
        item: dict[str, Any] = {
            "name": name,
            "datatype": oip_datatype(array.dtype),
            "shape": list(array.shape),
        }
        strings = array.dtype.kind == "O"
        if as_binary:
            if strings:
                raw = encode_bytes_tensor(array)
            else:
                raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            item["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            item["data"] = _strings_to_json(array) if strings else array.ravel().tolist()
        items.append(item)
    response: dict[str, Any] = {
        "model_name": served.name,
        "model_version": served.version,
        "outputs": items,
    }
    if request.id is not None:
        response["id"] = request.id
    if step is not None:
        response["parameters"] = {"rtinfer_step": step}
    header = _encoder.encode(response)
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def encode(value: Any) -> bytes:
    """Any JSON value as bytes (msgspec)."""
    return _encoder.encode(value)
