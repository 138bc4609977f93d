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
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"

# FP32 is the served dtype; FP16 and FP64 are converted to it (FP64 values beyond FP32's range become inf and
# are then rejected like any non-finite input). Integer and BYTES inputs are rejected with 400.
ACCEPTED_INPUT_DTYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "FP64": np.dtype("<f8")}
OUTPUT_NAMES = ("logits", "probabilities", "labels")
# The keys the protocol defines for a request, its input tensor and each requested output; `parameters` (the
# parameters extension) is the place for anything else.
REQUEST_KEYS = ("id", "parameters", "inputs", "outputs")
INPUT_KEYS = ("name", "shape", "datatype", "parameters", "data")
OUTPUT_KEYS = ("name", "parameters")
# How a message names the JSON type json.loads gave a value.
_JSON_TYPES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    bool: "true or false",
    int: "an integer",
    float: "a number",
    type(None): "null",
}


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


def given_more_than_once(what: str, count: int) -> str:
    """The one wording for anything a request may give once only (a header, a query parameter): which copy counts
    would be a guess."""
    return f"{what} is given {count} times; give it once"


def coding_not_supported(header: str, value: str, supported: str) -> str:
    """The one wording for a body coding this server does not implement (a Transfer-Encoding, a Content-Encoding):
    the request is well-formed HTTP, the server only lacks that coding, so the client is told what it does read."""
    return f"{header} {value.strip()[:40]!r} is not supported; {supported}"


def parse_infer_request(body: bytes, header_length: str | None, spec: ModelSpec) -> InferRequest:
    """Split the body (JSON or JSON + binary), then validate every field the protocol defines: the one input
    tensor against the model, the requested outputs and the parameters this server reads. A field of the wrong
    JSON type, or a key the protocol does not define, is a 400 naming it, so a typo is never silently ignored."""
    header_bytes, binary = _split_body(body, header_length)
    header = _parse_json_object(header_bytes)
    _known_keys(header, REQUEST_KEYS, "the request")
    images = _decode_input(_single_input(header, spec), binary, spec)
    parameters = _parameters(header, "parameters", REQUEST_PARAMETERS)
    top_k = _field(parameters, "top_k", int, "parameters.top_k")
    return InferRequest(
        images=images,
        outputs=_requested_outputs(header, parameters),
        top_k=1 if top_k is None else _top_k(top_k, spec.num_classes),
        request_id=_field(header, "id", str, "id"),
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


# Once the body is decoded as strict UTF-8 (which refuses encoded surrogates, ED A0 80 and the like), only a
# \uD800-\uDFFF escape in the text can make a surrogate: the check for one runs only then.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (json.loads would keep the last one silently)."""
    value: dict[str, Any] = {}
    for key, item in pairs:
        if key in value:
            raise ClientError(400, f"request JSON gives the key {key[:40]!r} more than once")
        value[key] = item
    return value


def _utf8_text(data: bytes) -> str:
    """`data` decoded as strict UTF-8. json.loads(bytes) would guess UTF-16 or UTF-32 and decode with
    'surrogatepass', letting encoded surrogates (ED A0 80) through as lone surrogates that no response can carry."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ClientError(
            400,
            f"request body is not valid UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start}: "
            f"{error.reason}); send JSON encoded as UTF-8",
        ) from None


def _parse_json_object(data: bytes) -> dict[str, Any]:
    text = _utf8_text(data)
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        raise ClientError(400, f"request body is not valid JSON: {error}") from None
    except ValueError:  # int() refuses a literal longer than sys.get_int_max_str_digits() (4300 digits)
        raise ClientError(400, "request JSON holds an integer with too many digits") from None
    except RecursionError:
        raise ClientError(400, "request JSON is nested too deeply") from None
    if not isinstance(value, dict):
        raise ClientError(400, "request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(text) and not _valid_unicode(value):
        raise ClientError(400, "request JSON holds a lone surrogate escape (\\ud800-\\udfff); send valid Unicode")
    return value


def _valid_unicode(value: Any) -> bool:
    """No lone surrogate in any key or string: json.loads lets a `\\ud800` escape through, and a name or an id
    holding one would be echoed back into a response that strict JSON parsers refuse."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _field(container: dict[str, Any], key: str, kind: type, path: str) -> Any:
    """`container[key]` if it has the JSON type `kind`, None when it is absent or null (clients serialising an
    unset optional field send null); any other type is a 400 naming the field by its path in the request."""
    value = container.get(key)
    if value is None or type(value) is kind:  # `type(...) is`, as JSON true/false would pass isinstance(_, int)
        return value
    raise ClientError(400, f"'{path}' must be {_JSON_TYPES[kind]}, got {_JSON_TYPES[type(value)]}")


def _required(container: dict[str, Any], key: str, kind: type, path: str) -> Any:
    value = _field(container, key, kind, path)
    if value is None:
        raise ClientError(400, f"'{path}' is required ({_JSON_TYPES[kind]})")
    return value


def _known_keys(container: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    """Refuse a key the protocol does not define: a misspelt 'paramters' must not be dropped silently."""
    unknown = [key for key in container if key not in known]
    if unknown:
        raise ClientError(400, f"{where} has the unknown key {unknown[0][:40]!r}; the keys are {', '.join(known)}")


def _single_input(header: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or len(raw_inputs) != 1 or not isinstance(raw_inputs[0], dict):
        raise ClientError(400, f"'inputs' must be a list with exactly one tensor named '{spec.input_name}'")
    return raw_inputs[0]


def _decode_input(tensor: dict[str, Any], binary: bytes, spec: ModelSpec) -> np.ndarray:
    _known_keys(tensor, INPUT_KEYS, "inputs[0]")
    name = _required(tensor, "name", str, "inputs[0].name")
    if name != spec.input_name:
        raise ClientError(400, f"unknown input {name[:40]!r}; this model's input is '{spec.input_name}'")
    shape = _checked_shape(tensor.get("shape"), spec)
    dtype = _checked_datatype(_required(tensor, "datatype", str, "inputs[0].datatype"))
    parameters = _parameters(tensor, "inputs[0].parameters", INPUT_PARAMETERS)
    binary_size = _field(parameters, "binary_data_size", int, "inputs[0].parameters.binary_data_size")
    data = _field(tensor, "data", list, "inputs[0].data")
    if binary_size is not None:
        if data is not None:
            raise ClientError(400, "inputs[0] has both 'data' and parameters.binary_data_size; send one of them")
        flat = _binary_values(binary, binary_size, dtype, math.prod(shape))
    else:
        if binary:
            raise ClientError(400, "binary data follows the JSON header but no input declares binary_data_size")
        flat = _json_values(data, shape)
    with np.errstate(over="ignore"):  # values beyond the datatype's or FP32's range become inf, rejected below
        images = flat.astype(dtype, copy=False).astype(np.float32, copy=False).reshape(shape)
    if not np.isfinite(images).all():
        raise ClientError(400, "input contains NaN or infinite values (after conversion to FP32)")
    return images


def _checked_shape(shape: Any, spec: ModelSpec) -> tuple[int, ...]:
    expected = f"[B, {', '.join(map(str, spec.image_shape))}] with 1 <= B <= {spec.max_batch}"
    if not (type(shape) is list and all(type(dim) is int for dim in shape)):
        raise ClientError(400, f"'inputs[0].shape' must be a list of integers {expected}")
    if len(shape) != 4 or tuple(shape[1:]) != spec.image_shape or shape[0] < 1:
        raise ClientError(400, f"input shape {shape} does not match {expected}")
    if shape[0] > spec.max_batch:
        raise ClientError(400, f"batch of {shape[0]} images is larger than the allowed {spec.max_batch}")
    return tuple(shape)


def _checked_datatype(datatype: str) -> np.dtype:
    if datatype not in ACCEPTED_INPUT_DTYPES:
        raise ClientError(400, f"datatype {datatype[:40]!r} is not accepted; send FP32 (FP16 and FP64 are converted)")
    return ACCEPTED_INPUT_DTYPES[datatype]


def _binary_values(binary: bytes, size: int, dtype: np.dtype, count: int) -> np.ndarray:
    expected = count * dtype.itemsize
    if size != expected:
        raise ClientError(400, f"binary_data_size {size!r} does not match shape x datatype ({expected} bytes)")
    if len(binary) != size:
        raise ClientError(400, f"body carries {len(binary)} bytes of binary tensor data, expected {size}")
    return np.frombuffer(binary, dtype=dtype)


def _json_values(data: list | None, shape: tuple[int, ...]) -> np.ndarray:
    """`data` flat (row-major) or nested exactly as `shape`; JSON numbers only (numpy would take "1.5" or true)."""
    if data is None:
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
    """Named outputs, each once, or all outputs when none are named (as Triton does)."""
    binary_default = _field(parameters, "binary_data_output", bool, "parameters.binary_data_output") or False
    raw = _field(header, "outputs", list, "outputs")
    if raw is None:
        return [RequestedOutput(name, binary_default) for name in OUTPUT_NAMES]
    if not raw:
        raise ClientError(400, "'outputs' must be a non-empty list of objects (or left out for all outputs)")
    requested: list[RequestedOutput] = []
    for index, item in enumerate(raw):
        output = _requested_output(item, f"outputs[{index}]", binary_default)
        if output.name in (earlier.name for earlier in requested):
            raise ClientError(400, f"output '{output.name}' is requested more than once; name each output once")
        requested.append(output)
    return requested


def _requested_output(item: Any, path: str, binary_default: bool) -> RequestedOutput:
    if type(item) is not dict:
        raise ClientError(400, f"'{path}' must be an object, got {_JSON_TYPES[type(item)]}")
    _known_keys(item, OUTPUT_KEYS, path)
    name = _required(item, "name", str, f"{path}.name")
    if name not in OUTPUT_NAMES:
        raise ClientError(400, f"unknown output {name[:40]!r}; outputs are {', '.join(OUTPUT_NAMES)}")
    parameters = _parameters(item, f"{path}.parameters", OUTPUT_PARAMETERS)
    binary = _field(parameters, "binary_data", bool, f"{path}.parameters.binary_data")
    return RequestedOutput(name, binary_default if binary is None else binary)


# The parameters this server reads, in each place a `parameters` object may appear. Any other key is refused: a
# misspelt or misplaced one (`topk`, `outputs[0].parameters.top_k`) must not leave the answer silently unchanged.
REQUEST_PARAMETERS = ("top_k", "binary_data_output")
INPUT_PARAMETERS = ("binary_data_size",)
OUTPUT_PARAMETERS = ("binary_data",)
# Where each parameter this server reads goes, for a client that put it somewhere else.
PARAMETER_PLACES = {
    "top_k": "parameters.top_k (the request's parameters)",
    "binary_data_output": "parameters.binary_data_output (the request's parameters)",
    "binary_data_size": "inputs[0].parameters.binary_data_size",
    "binary_data": "outputs[i].parameters.binary_data (an input sends binary_data_size)",
}
UNSERVED_PARAMETERS = {  # Triton extensions that change what the answer means: refused, never silently ignored
    "classification": "request the 'labels' output (with parameters.top_k)",
    "shared_memory_region": "send the tensor in the request body (JSON data or binary)",
}


def _parameters(container: dict[str, Any], path: str, read: tuple[str, ...]) -> dict[str, Any]:
    """`container["parameters"]` (an object, {} when absent), holding only keys in `read`. A client asking for
    classification would get plain logits, one naming a shared-memory region an answer about other input, and one
    sending top_k with an output the default top 1: each is a 400 saying what to send instead."""
    parameters = _field(container, "parameters", dict, path) or {}
    for key in parameters:
        if key in read:
            continue
        if key in UNSERVED_PARAMETERS:
            raise ClientError(400, f"'{path}.{key}' is not supported; {UNSERVED_PARAMETERS[key]}")
        if key in PARAMETER_PLACES:
            raise ClientError(400, f"'{path}.{key}' is not read there; it goes in {PARAMETER_PLACES[key]}")
        raise ClientError(400, f"'{path}' has the unknown key {key[:40]!r}; the keys read there are {', '.join(read)}")
    return parameters


def _top_k(value: int, num_classes: int) -> int:
    if not 1 <= value <= num_classes:
        raise ClientError(400, f"top_k must be an integer between 1 and {num_classes}, got {value!r}")
    return value


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
