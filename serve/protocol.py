"""Open Inference Protocol v2 (KServe / Triton REST): request parsing and response encoding.

JSON tensors carry `data` (flat or nested, row-major). The binary tensor data extension puts the JSON
header first (its length in the `Inference-Header-Content-Length` HTTP header) and then each binary input's
raw little-endian bytes in input order, sized by `parameters.binary_data_size`. Outputs come back binary when
the requested output has `parameters.binary_data: true`, or when the request has
`parameters.binary_data_output: true` (what tritonclient sends when no outputs are named). BYTES elements are
a 4-byte little-endian length followed by the bytes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"

# FP32 is the served dtype; FP16 and FP64 are converted to it (FP64 values beyond FP32's range become inf and
# are then rejected like any non-finite input). Integer and BYTES inputs are rejected with 400.
ACCEPTED_INPUT_DTYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "FP64": np.dtype("<f8")}
OUTPUT_NAMES = ("logits", "probabilities", "labels")


class ClientError(Exception):
    """A request the client must fix: becomes an HTTP 4xx with a JSON body {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class ModelSpec:
    """What a request is validated against: the model's input name, per-image shape and batch limit."""

    input_name: str
    image_shape: tuple[int, int, int]
    max_batch: int
    num_classes: int


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    """A validated inference request: one finite float32 batch plus what to send back."""

    images: np.ndarray
    outputs: list[RequestedOutput]
    top_k: int
    request_id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def plain_int(text: str | None, max_digits: int = 18) -> int | None:
    """`text` as a non-negative integer if it is 1 to `max_digits` ASCII digits, else None. Python's int() also
    takes '²'-style Unicode digits, signs, underscores and spaces, none of which a client should rely on."""
    if text is None or not (0 < len(text) <= max_digits and text.isascii() and text.isdigit()):
        return None
    return int(text)


def parse_infer_request(body: bytes, header_length: str | None, spec: ModelSpec) -> InferRequest:
    """Split the body (JSON or JSON + binary), then validate the one input tensor against the model."""
    header_bytes, binary = _split_body(body, header_length)
    header = _parse_json_object(header_bytes)
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or len(raw_inputs) != 1 or not isinstance(raw_inputs[0], dict):
        raise ClientError(400, f"'inputs' must be a list with exactly one tensor named '{spec.input_name}'")
    images = _decode_input(raw_inputs[0], binary, spec)
    parameters = _object_field(header, "parameters", "request")
    return InferRequest(
        images=images,
        outputs=_requested_outputs(header, parameters),
        top_k=_top_k(parameters.get("top_k", 1), spec.num_classes),
        request_id=_request_id(header),
        parameters=parameters,
    )


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    length = plain_int(header_length)
    if length is None:
        raise ClientError(400, f"{HEADER_LENGTH} must be an integer, got {header_length[:40]!r}")
    if not 0 < length <= len(body):
        raise ClientError(400, f"{HEADER_LENGTH} {length} is outside the body's {len(body)} bytes")
    return body[:length], body[length:]


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (json.loads would keep the last one silently)."""
    value: dict[str, Any] = {}
    for key, item in pairs:
        if key in value:
            raise ClientError(400, f"request JSON gives the key {key[:40]!r} more than once")
        value[key] = item
    return value


def _parse_json_object(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ClientError(400, f"request body is not valid JSON: {error}") from None
    except RecursionError:
        raise ClientError(400, "request JSON is nested too deeply") from None
    if not isinstance(value, dict):
        raise ClientError(400, "request body must be a JSON object")
    return value


def _object_field(container: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = container.get(key) or {}
    if not isinstance(value, dict):
        raise ClientError(400, f"{where} '{key}' must be a JSON object")
    return value


def _decode_input(tensor: dict[str, Any], binary: bytes, spec: ModelSpec) -> np.ndarray:
    if tensor.get("name") != spec.input_name:
        raise ClientError(400, f"unknown input {tensor.get('name')!r}; this model's input is '{spec.input_name}'")
    shape = _checked_shape(tensor.get("shape"), spec)
    dtype = _checked_datatype(tensor.get("datatype"))
    binary_size = _object_field(tensor, "parameters", "input").get("binary_data_size")
    if binary_size is not None:
        flat = _binary_values(binary, binary_size, dtype, math.prod(shape))
    else:
        if binary:
            raise ClientError(400, "binary data follows the JSON header but no input declares binary_data_size")
        flat = _json_values(tensor.get("data"), shape)
    with np.errstate(over="ignore"):  # values beyond the datatype's or FP32's range become inf, rejected below
        images = flat.astype(dtype, copy=False).astype(np.float32, copy=False).reshape(shape)
    if not np.isfinite(images).all():
        raise ClientError(400, "input contains NaN or infinite values (after conversion to FP32)")
    return images


def _checked_shape(shape: Any, spec: ModelSpec) -> tuple[int, ...]:
    expected = f"[B, {', '.join(map(str, spec.image_shape))}] with 1 <= B <= {spec.max_batch}"
    if not (isinstance(shape, list) and all(isinstance(dim, int) and not isinstance(dim, bool) for dim in shape)):
        raise ClientError(400, f"input shape must be a list of integers {expected}")
    if len(shape) != 4 or tuple(shape[1:]) != spec.image_shape or shape[0] < 1:
        raise ClientError(400, f"input shape {shape} does not match {expected}")
    if shape[0] > spec.max_batch:
        raise ClientError(400, f"batch of {shape[0]} images is larger than the allowed {spec.max_batch}")
    return tuple(shape)


def _checked_datatype(datatype: Any) -> np.dtype:
    if datatype not in ACCEPTED_INPUT_DTYPES:
        raise ClientError(400, f"datatype {datatype!r} is not accepted; send FP32 (FP16 and FP64 are converted)")
    return ACCEPTED_INPUT_DTYPES[datatype]


def _binary_values(binary: bytes, size: Any, dtype: np.dtype, count: int) -> np.ndarray:
    expected = count * dtype.itemsize
    if not isinstance(size, int) or isinstance(size, bool) or size != expected:
        raise ClientError(400, f"binary_data_size {size!r} does not match shape x datatype ({expected} bytes)")
    if len(binary) != size:
        raise ClientError(400, f"body carries {len(binary)} bytes of binary tensor data, expected {size}")
    return np.frombuffer(binary, dtype=dtype)


def _json_values(data: Any, shape: tuple[int, ...]) -> np.ndarray:
    """`data` flat (row-major) or nested exactly as `shape`; JSON numbers only (numpy would take "1.5" or true)."""
    if not isinstance(data, list):
        raise ClientError(400, "input needs 'data' (a flat or nested list) or parameters.binary_data_size")
    try:
        values = np.asarray(data)
    except (ValueError, TypeError):
        values = None
    if values is None or values.dtype.kind not in "iuf" or _holds_bool(values, data):
        raise ClientError(400, "input 'data' must be a (nested) list of numbers with a regular shape")
    if values.ndim > 1 and values.shape != shape:
        raise ClientError(
            400,
            f"input 'data' is nested as {list(values.shape)} but the shape is {list(shape)}; send it flat or "
            "nested exactly as the shape",
        )
    if values.size != math.prod(shape):
        raise ClientError(400, f"input 'data' has {values.size} values, the shape needs {math.prod(shape)}")
    return values.reshape(-1)


def _holds_bool(values: np.ndarray, data: list) -> bool:
    """True when `data` mixes JSON true/false among numbers (numpy reads them as 1 and 0)."""
    if values.ndim > 1:
        return any(type(item) is bool for item in np.asarray(data, dtype=object).reshape(-1))
    return any(type(item) is bool for item in data)


def _requested_outputs(header: dict[str, Any], parameters: dict[str, Any]) -> list[RequestedOutput]:
    """Named outputs, or all outputs when none are named (as Triton does)."""
    binary_default = parameters.get("binary_data_output") is True
    raw = header.get("outputs")
    if raw is None:
        return [RequestedOutput(name, binary_default) for name in OUTPUT_NAMES]
    if not isinstance(raw, list) or not raw or not all(isinstance(item, dict) for item in raw):
        raise ClientError(400, "'outputs' must be a non-empty list of objects")
    requested = []
    for item in raw:
        if item.get("name") not in OUTPUT_NAMES:
            raise ClientError(400, f"unknown output {item.get('name')!r}; outputs are {', '.join(OUTPUT_NAMES)}")
        binary = _object_field(item, "parameters", "output").get("binary_data", binary_default)
        requested.append(RequestedOutput(item["name"], binary is True))
    return requested


def _top_k(value: Any, num_classes: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= num_classes:
        raise ClientError(400, f"top_k must be an integer between 1 and {num_classes}, got {value!r}")
    return value


def _request_id(header: dict[str, Any]) -> str | None:
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ClientError(400, "'id' must be a string")
    return request_id


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    array: np.ndarray
    binary: bool


def encode_infer_response(header: dict[str, Any], outputs: list[OutputTensor]) -> tuple[bytes, dict[str, str]]:
    """JSON body, or JSON header + binary outputs in order with `Inference-Header-Content-Length` set."""
    chunks: list[bytes] = []
    header["outputs"] = [_output_json(tensor, chunks) for tensor in outputs]
    json_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()  # never a bare NaN
    if not chunks:
        return json_bytes, {"content-type": "application/json"}
    headers = {"content-type": "application/octet-stream", HEADER_LENGTH.lower(): str(len(json_bytes))}
    return b"".join([json_bytes, *chunks]), headers


def _output_json(tensor: OutputTensor, chunks: list[bytes]) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.array.shape)}
    if not tensor.binary:
        entry["data"] = tensor.array.reshape(-1).tolist()
        return entry
    raw = serialize_bytes(tensor.array) if tensor.datatype == "BYTES" else tensor.array.astype("<f4").tobytes()
    entry["parameters"] = {"binary_data_size": len(raw)}
    chunks.append(raw)
    return entry


def serialize_bytes(array: np.ndarray) -> bytes:
    """BYTES tensor -> binary: each element as a 4-byte little-endian length, then its UTF-8 bytes."""
    parts = []
    for element in array.reshape(-1):
        encoded = element.encode() if isinstance(element, str) else bytes(element)
        parts.append(struct.pack("<I", len(encoded)) + encoded)
    return b"".join(parts)
