"""In-process units: v2 parsing/encoding, image preprocessing, multipart, metrics text, the micro-batcher."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import operator
import struct
import threading
import time
import zlib

import h11
import numpy as np
import pytest
from PIL import Image

from okdpipe.contracts.card import Preprocess
from okdpipe.serve.batching import MicroBatcher, QueueFull
from okdpipe.serve.connections import HEAD_TOO_LONG, LINE_TOO_LONG, MAX_HEAD_BYTES, BoundedHeadConnection
from okdpipe.serve.metrics import Histogram, ServerMetrics
from okdpipe.serve.outputs import classify_response, softmax
from okdpipe.serve.preprocess import image_to_tensor, multipart_file
from okdpipe.serve.protocol import (
    ClientError,
    ModelSpec,
    OutputTensor,
    encode_infer_response,
    parse_infer_request,
    serialize_bytes,
)

SPEC = ModelSpec("input", (1, 2, 2), max_batch=4, num_classes=3)


def _json_request(data, shape=(1, 1, 2, 2), datatype="FP32", **extra) -> bytes:
    tensor = {"name": "input", "shape": list(shape), "datatype": datatype, "data": data}
    return json.dumps({"inputs": [tensor], **extra}).encode()


_TENSOR = {"name": "input", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}


def _binary_request(array: np.ndarray, datatype: str, declared: int | None = None) -> tuple[bytes, str]:
    size = array.nbytes if declared is None else declared
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(array.shape),
                    "datatype": datatype,
                    "parameters": {"binary_data_size": size},
                }
            ]
        }
    ).encode()
    return header + array.tobytes(), str(len(header))


def test_json_data_flat_and_nested_give_the_same_tensor():
    flat = parse_infer_request(_json_request([1, 2, 3, 4.5]), None, SPEC)
    nested = parse_infer_request(_json_request([[[[1, 2], [3, 4.5]]]]), None, SPEC)
    np.testing.assert_array_equal(flat.images, nested.images)
    assert flat.images.dtype == np.float32 and flat.images.shape == (1, 1, 2, 2)
    assert [output.name for output in flat.outputs] == ["logits", "probabilities", "labels"]
    assert flat.top_k == 1 and not any(output.binary for output in flat.outputs)


@pytest.mark.parametrize(
    "escaped", [b'"id": "\\ud800"', b'"id": "x\\uDFFFy"', b'"\\udbff": 1', b'"id": "\\ude00\\ud83d"']
)
def test_a_lone_surrogate_escape_is_400_never_echoed(escaped):
    """json.loads lets `\\ud800` through; the id (or a name) was echoed into a response strict parsers refuse."""
    body = _json_request([1, 2, 3, 4.5])[:-1] + b", " + escaped + b"}"
    with pytest.raises(ClientError) as raised:
        parse_infer_request(body, None, SPEC)
    assert raised.value.status == 400 and "lone surrogate escape" in raised.value.message
    paired = _json_request([1, 2, 3, 4.5])[:-1] + b', "id": "\\ud83d\\ude00"}'  # an escaped pair is fine
    assert parse_infer_request(paired, None, SPEC).request_id == "\U0001f600"


UTF8_FIX = "send JSON encoded as UTF-8"


def _with_raw_id(raw: bytes) -> bytes:
    """A valid JSON request whose "id" string holds `raw` bytes as they are, not escaped."""
    return _json_request([1, 2, 3, 4.5])[:-1] + b', "id": "' + raw + b'"}'


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xed\xa0\x80", "invalid continuation byte"),  # U+D800 encoded as UTF-8: json.loads(bytes) took it
        (b"\xed\xbf\xbf", "invalid continuation byte"),  # U+DFFF
        (b"\xc0\xaf", "invalid start byte"),  # an overlong "/"
        (b"\xff", "invalid start byte"),
        (b"\xe2\x82", "unexpected end of data"),  # cut short: the last bytes of the body
    ],
    ids=["surrogate D800", "surrogate DFFF", "overlong", "0xff", "truncated"],
)
def test_a_body_that_is_not_strict_utf8_is_400_naming_the_byte(raw, reason):
    body = _with_raw_id(raw)[: -2 if raw == b"\xe2\x82" else None]
    offset = body.index(raw)
    with pytest.raises(ClientError) as raised:
        parse_infer_request(body, None, SPEC)
    expected = f"request body is not valid UTF-8 (byte 0x{raw[0]:02x} at offset {offset}: {reason}); {UTF8_FIX}"
    assert (raised.value.status, raised.value.message) == (400, expected)


@pytest.mark.parametrize(
    ("encoding", "message"),
    [
        (
            "utf-16",
            "request body is not valid UTF-8 (byte 0xff at offset 0: invalid start byte); send JSON encoded as UTF-8",
        ),
        (
            "utf-16-le",
            "request body is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 "
            "(char 1)",
        ),
        (
            "utf-32",
            "request body is not valid UTF-8 (byte 0xff at offset 0: invalid start byte); send JSON encoded as UTF-8",
        ),
    ],
)
def test_a_utf16_or_utf32_body_is_refused_not_guessed(encoding, message):
    """json.loads(bytes) detects UTF-16 and UTF-32 and would parse them; the protocol's JSON is UTF-8."""
    body = _json_request([1, 2, 3, 4]).decode().encode(encoding)
    with pytest.raises(ClientError) as raised:
        parse_infer_request(body, None, SPEC)
    assert (raised.value.status, raised.value.message) == (400, message)


def test_a_raw_surrogate_in_the_json_header_of_a_binary_request_is_400():
    body, header_length = _binary_request(np.zeros((1, 1, 2, 2), np.float32), "FP32")
    header = body[: int(header_length)].replace(b'{"inputs"', b'{"id": "\xed\xa0\x80", "inputs"')
    with pytest.raises(ClientError) as raised:
        parse_infer_request(header + body[int(header_length) :], str(len(header)), SPEC)
    assert (raised.value.status, raised.value.message) == (
        400,
        f"request body is not valid UTF-8 (byte 0xed at offset 8: invalid continuation byte); {UTF8_FIX}",
    )


def test_valid_utf8_ids_are_read_and_echoed():
    assert parse_infer_request(_with_raw_id("é😀".encode()), None, SPEC).request_id == "é😀"


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "FP64"])
def test_binary_input_is_read_in_its_datatype_and_served_as_fp32(datatype):
    values = np.arange(8, dtype=np.float64).reshape(2, 1, 2, 2) / 4
    numpy_type = {"FP32": "<f4", "FP16": "<f2", "FP64": "<f8"}[datatype]
    body, header_length = _binary_request(values.astype(numpy_type), datatype)
    parsed = parse_infer_request(body, header_length, SPEC)
    np.testing.assert_array_equal(parsed.images, values.astype(np.float32))


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [
        (b"{bad", None, "not valid JSON"),
        (b"[1, 2]", None, "must be a JSON object"),
        (_json_request([1, 2, 3]), None, "has 3 values, the shape needs 4"),
        (_json_request([1, 2, 3, 4], shape=(1, 1, 2, 3)), None, "does not match [B, 1, 2, 2]"),
        (_json_request([1] * 20, shape=(5, 1, 2, 2)), None, "batch of 5 images is larger than the allowed 4"),
        (_json_request([], shape=(0, 1, 2, 2)), None, "input shape [0, 1, 2, 2] does not match [B, 1, 2, 2]"),
        (_json_request([], shape=(-1, 1, 2, 2)), None, "input shape [-1, 1, 2, 2] does not match"),
        (_json_request([1, 2, 3, 4], datatype="INT32"), None, "datatype 'INT32' is not accepted"),
        (_json_request([1, "2", 3, 4]), None, "list of numbers"),
        (_json_request([[1, 2], [3]]), None, "list of numbers"),
        (_json_request([1, float("nan"), 3, 4]), None, "NaN or infinite"),
        (_json_request([1, 2, 3, 1e300], datatype="FP64"), None, "NaN or infinite"),
        (_json_request([1, 2, 3, 4], parameters={"top_k": 4}), None, "top_k must be an integer"),
        (_json_request([1, 2, 3, 4], outputs=[{"name": "features"}]), None, "unknown output 'features'"),
        (
            json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 2, 2], "datatype": "FP32"}]}).encode(),
            None,
            "unknown input 'x'",
        ),
        (json.dumps({"inputs": []}).encode(), None, "exactly one tensor named 'input'"),
        (_json_request([1, 2, 3, 4]), "abc", "must be an integer"),
        (b"[" * 100_000 + b"]" * 100_000, None, "nested too deeply"),
        (_json_request([1, 2, 3, 4]), "100000", "outside the body"),
        # nesting must be flat or exactly the shape; JSON true/false are not numbers, even among numbers
        (_json_request([[1, 2, 3, 4]]), None, "nested as [1, 4] but the shape is [1, 1, 2, 2]"),
        (_json_request([[[1, 2]], [[3, 4]]]), None, "nested as [2, 1, 2] but the shape is [1, 1, 2, 2]"),
        (_json_request([1, 2, True, 4]), None, "list of numbers"),
        (_json_request([[[[1, 2], [False, 4]]]]), None, "list of numbers"),
        # the declared datatype bounds JSON values as it bounds binary ones
        (_json_request([1, 2, 3, 70000], datatype="FP16"), None, "NaN or infinite"),
        (b'{"inputs": [], "inputs": []}', None, "gives the key 'inputs' more than once"),
        (b'{"parameters": {"top_k": ' + b"1" * 5000 + b"}}", None, "integer with too many digits"),
        (json.dumps({"inputs": [_TENSOR, _TENSOR]}).encode(), None, "exactly one tensor named 'input'"),
        (
            b'{"inputs": [{"name": "input", "name": "x", "shape": [1, 1, 2, 2], "datatype": "FP32", '
            b'"data": [1, 2, 3, 4]}]}',
            None,
            "gives the key 'name' more than once",
        ),
    ],
)
def test_malformed_requests_are_400_with_a_reason(body, header_length, message):
    with pytest.raises(ClientError) as raised:
        parse_infer_request(body, header_length, SPEC)
    assert raised.value.status == 400 and message in raised.value.message


def _full_request() -> dict:
    """A valid request that gives every field the parser reads."""
    return {
        "id": "r1",
        "parameters": {"top_k": 2, "binary_data_output": False},
        "inputs": [{**_TENSOR, "parameters": {}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}, {"name": "labels"}],
    }


ABSENT = object()


def _with(path: str, value) -> bytes:
    """The full request with the field at `path` ("inputs.0.datatype") set to `value`, or removed for ABSENT."""
    request = _full_request()
    *parents, last = [int(part) if part.isdigit() else part for part in path.split(".")]
    container = functools.reduce(operator.getitem, parents, request)
    if value is ABSENT:
        del container[last]
    else:
        container[last] = value
    return json.dumps(request).encode()


def test_the_full_request_parses_field_by_field():
    parsed = parse_infer_request(json.dumps(_full_request()).encode(), None, SPEC)
    assert parsed.request_id == "r1" and parsed.top_k == 2
    assert [(output.name, output.binary) for output in parsed.outputs] == [("logits", True), ("labels", False)]
    np.testing.assert_array_equal(parsed.images.reshape(-1), [1, 2, 3, 4])


MUST_BE_AN_OBJECT = [0, False, "", [], "{}"]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("id", 5, "'id' must be a string, got an integer"),
        ("id", ["r1"], "'id' must be a string, got a list"),
        *[("parameters", value, "'parameters' must be an object, got ") for value in MUST_BE_AN_OBJECT],
        ("parameters.top_k", "2", "'parameters.top_k' must be an integer, got a string"),
        ("parameters.top_k", 2.0, "'parameters.top_k' must be an integer, got a number"),
        ("parameters.top_k", True, "'parameters.top_k' must be an integer, got true or false"),
        ("parameters.binary_data_output", 1, "'parameters.binary_data_output' must be true or false, got an integer"),
        ("parameters.binary_data_output", "true", "'parameters.binary_data_output' must be true or false, got a str"),
        ("parameters.binary_data_output", [], "'parameters.binary_data_output' must be true or false, got a list"),
        ("inputs.0.name", ["input"], "'inputs[0].name' must be a string, got a list"),
        ("inputs.0.name", {"input": 1}, "'inputs[0].name' must be a string, got an object"),
        ("inputs.0.name", ABSENT, "'inputs[0].name' is required (a string)"),
        ("inputs.0.datatype", ["FP32"], "'inputs[0].datatype' must be a string, got a list"),
        ("inputs.0.datatype", {"FP32": 1}, "'inputs[0].datatype' must be a string, got an object"),
        ("inputs.0.datatype", 32, "'inputs[0].datatype' must be a string, got an integer"),
        ("inputs.0.datatype", ABSENT, "'inputs[0].datatype' is required (a string)"),
        *[
            ("inputs.0.shape", shape, "'inputs[0].shape' must be a list of integers [B, 1, 2, 2]")
            for shape in ([1.0, 1, 2, 2], [True, 1, 2, 2], ["1", 1, 2, 2], [[1], 1, 2, 2], "1,1,2,2", {}, ABSENT)
        ],
        *[
            ("inputs.0.parameters", value, "'inputs[0].parameters' must be an object, got ")
            for value in MUST_BE_AN_OBJECT
        ],
        ("inputs.0.parameters.binary_data_size", "16", "'inputs[0].parameters.binary_data_size' must be an integer"),
        ("inputs.0.parameters.binary_data_size", True, "'inputs[0].parameters.binary_data_size' must be an integer"),
        ("inputs.0.parameters.binary_data_size", 16, "inputs[0] has both 'data' and parameters.binary_data_size"),
        ("inputs.0.data", "1,2,3,4", "'inputs[0].data' must be a list, got a string"),
        ("inputs.0.data", {"0": 1}, "'inputs[0].data' must be a list, got an object"),
        ("outputs", "logits", "'outputs' must be a list, got a string"),
        ("outputs", {"name": "logits"}, "'outputs' must be a list, got an object"),
        ("outputs", [], "'outputs' must be a non-empty list of objects"),
        ("outputs.0", None, "'outputs[0]' must be an object, got null"),
        ("outputs.1", "labels", "'outputs[1]' must be an object, got a string"),
        ("outputs.0.name", ["logits"], "'outputs[0].name' must be a string, got a list"),
        ("outputs.0.name", {"logits": 1}, "'outputs[0].name' must be a string, got an object"),
        ("outputs.0.name", ABSENT, "'outputs[0].name' is required (a string)"),
        ("outputs.1.name", "logits", "output 'logits' is requested more than once"),
        *[
            ("outputs.0.parameters", value, "'outputs[0].parameters' must be an object, got ")
            for value in MUST_BE_AN_OBJECT
        ],
        ("outputs.1.parameters", [], "'outputs[1].parameters' must be an object, got a list"),
        (
            "outputs.0.parameters.binary_data",
            1,
            "'outputs[0].parameters.binary_data' must be true or false, got an int",
        ),
        ("outputs.0.parameters.binary_data", "false", "'outputs[0].parameters.binary_data' must be true or false"),
        # Triton's classification extension is not served: never plain logits to a client that asked for it
        *[
            (f"{path}.{key}", value, f"'{where}.{key}' is not supported; {fix}")
            for path, where in [
                ("parameters", "parameters"),
                ("inputs.0.parameters", "inputs[0].parameters"),
                ("outputs.0.parameters", "outputs[0].parameters"),
            ]
            for key, fix in [
                ("classification", "request the 'labels' output"),
                ("shared_memory_region", "send the tensor in the request body"),
            ]
            for value in (3, "3", True, None)
        ],
        # a key the protocol does not define is a typo until proven otherwise: never dropped silently
        ("output", [{"name": "logits"}], "the request has the unknown key 'output'; the keys are id, parameters"),
        ("paramters", {"top_k": 3}, "the request has the unknown key 'paramters'"),
        ("inputs.0.dtype", "FP32", "inputs[0] has the unknown key 'dtype'"),
        ("outputs.0.binary_data", True, "outputs[0] has the unknown key 'binary_data'"),
    ],
)
def test_a_field_of_the_wrong_type_or_an_unknown_key_is_400_naming_it(path, value, message):
    with pytest.raises(ClientError) as raised:
        parse_infer_request(_with(path, value), None, SPEC)
    assert raised.value.status == 400 and message in raised.value.message, raised.value.message


OUTPUT_TOP_K = "'outputs[0].parameters.top_k' is not read there; it goes in parameters.top_k (the request's parameters)"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        # top_k read only at the request level: with an output it left the answer at top 1, whatever its value
        *[("outputs.0.parameters.top_k", value, OUTPUT_TOP_K) for value in (3, 3.0, True, "3", None, 0)],
        (
            "inputs.0.parameters.top_k",
            3,
            "'inputs[0].parameters.top_k' is not read there; it goes in parameters.top_k (the request's parameters)",
        ),
        *[
            (
                "inputs.0.parameters.binary_data",
                value,
                "'inputs[0].parameters.binary_data' is not read there; it goes in outputs[i].parameters.binary_data "
                "(an input sends binary_data_size)",
            )
            for value in (True, False, "yes")
        ],
        (
            "parameters.binary_data",
            True,
            "'parameters.binary_data' is not read there; it goes in outputs[i].parameters.binary_data (an input "
            "sends binary_data_size)",
        ),
        (
            "outputs.0.parameters.binary_data_output",
            True,
            "'outputs[0].parameters.binary_data_output' is not read there; it goes in parameters.binary_data_output "
            "(the request's parameters)",
        ),
        (
            "outputs.0.parameters.binary_data_size",
            4,
            "'outputs[0].parameters.binary_data_size' is not read there; it goes in "
            "inputs[0].parameters.binary_data_size",
        ),
        # any other key is a typo or a feature this server lacks: named, with the keys read there
        (
            "outputs.0.parameters.topk",
            3,
            "'outputs[0].parameters' has the unknown key 'topk'; the keys read there are binary_data",
        ),
        (
            "parameters.topk",
            3,
            "'parameters' has the unknown key 'topk'; the keys read there are top_k, binary_data_output",
        ),
        (
            "parameters.priority",
            1,
            "'parameters' has the unknown key 'priority'; the keys read there are top_k, binary_data_output",
        ),
        (
            "inputs.0.parameters.shared_memory_byte_size",
            16,
            "'inputs[0].parameters' has the unknown key "
            "'shared_memory_byte_size'; the keys read there are binary_data_size",
        ),
    ],
)
def test_a_parameter_not_read_where_it_is_sent_is_400_saying_where_it_goes(path, value, message):
    with pytest.raises(ClientError) as raised:
        parse_infer_request(_with(path, value), None, SPEC)
    assert (raised.value.status, raised.value.message) == (400, message)


def test_an_output_top_k_beyond_any_float_is_refused_like_any_other():
    """1e400 reads as inf: refused for where it is, before its value could matter."""
    body = _with("outputs.0.parameters.top_k", 123456789).replace(b"123456789", b"1e400")
    with pytest.raises(ClientError) as raised:
        parse_infer_request(body, None, SPEC)
    assert (raised.value.status, raised.value.message) == (400, OUTPUT_TOP_K)


def test_null_optional_fields_mean_absent():
    """Clients that serialise an unset optional field send null; it takes the default, as if left out."""
    request = {
        "id": None,
        "parameters": {"top_k": None, "binary_data_output": None},
        "inputs": [{**_TENSOR, "parameters": None}],
        "outputs": None,
    }
    parsed = parse_infer_request(json.dumps(request).encode(), None, SPEC)
    assert parsed.request_id is None and parsed.top_k == 1
    assert [(output.name, output.binary) for output in parsed.outputs] == [
        ("logits", False),
        ("probabilities", False),
        ("labels", False),
    ]


def test_an_output_binary_data_flag_overrides_binary_data_output():
    request = {
        "inputs": [_TENSOR],
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "logits", "parameters": {"binary_data": False}}, {"name": "labels"}],
    }
    parsed = parse_infer_request(json.dumps(request).encode(), None, SPEC)
    assert [(output.name, output.binary) for output in parsed.outputs] == [("logits", False), ("labels", True)]


def _head_of(size: int) -> bytes:
    """A complete GET head of exactly `size` bytes (its padding in one header)."""
    start, end = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Pad: ", b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


def _h11_outcome(data: bytes):
    """What the server's h11 connection makes of `data` arriving in one read: the request, or its refusal."""
    connection = BoundedHeadConnection(max_body_bytes=1024 * 1024)
    connection.receive_data(data)
    try:
        return connection.next_event()
    except h11.RemoteProtocolError:
        return connection.refusal


MANY_HEADERS = b"".join(b"X-H%d: %s\r\n" % (index, b"v" * 100) for index in range(200))


@pytest.mark.parametrize(
    ("data", "refusal"),
    [
        (_head_of(MAX_HEAD_BYTES + 1), (431, HEAD_TOO_LONG)),  # whole in one read: h11 alone accepts any size
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + MANY_HEADERS + b"\r\n", (431, HEAD_TOO_LONG)),
        (_head_of(MAX_HEAD_BYTES + 8)[:-4], (431, HEAD_TOO_LONG)),  # still arriving: h11's own check
        (b"GET /?" + b"a" * MAX_HEAD_BYTES + b" HTTP/1.1\r\nHost: x\r\n\r\n", (414, LINE_TOO_LONG)),
        (b"GET /?" + b"a" * MAX_HEAD_BYTES, (414, LINE_TOO_LONG)),
        (b"GET /v2 /health HTTP/1.1\r\nHost: x\r\n\r\n", (400, "malformed HTTP request: illegal request line")),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            (501, "Transfer-Encoding 'gzip' is not supported; send the body with a Content-Length, or with"),
        ),
    ],
)
def test_h11_refusals_carry_the_status_to_answer_with(data, refusal):
    status, message = _h11_outcome(data)
    assert status == refusal[0] and message.startswith(refusal[1]), message


REQUEST_LINE_RULE = (
    "malformed HTTP request: illegal request line; send METHOD TARGET HTTP/1.1 with single spaces, the target "
    "without spaces or raw non-ASCII bytes (percent-encode them)"
)
HEADER_LINE_RULE = (
    "malformed HTTP request: illegal header line; send each header as Name: value (no space before the colon, no "
    "control characters)"
)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET /v2/models/\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", REQUEST_LINE_RULE),
        (b"GET /v2 /health HTTP/1.1\r\nHost: x\r\n\r\n", REQUEST_LINE_RULE),
        (b"\x00GET / HTTP/1.1\r\n\r\n", REQUEST_LINE_RULE),
        (b"GET / HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n", HEADER_LINE_RULE),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", HEADER_LINE_RULE),
    ],
)
def test_a_head_h11_refuses_is_told_in_words_without_byte_reprs(data, message):
    """h11 quotes the refused line as bytearray(b'...'); the client is told what a valid one looks like."""
    assert _h11_outcome(data) == (400, message)


def test_a_head_of_exactly_the_limit_is_a_request():
    event = _h11_outcome(_head_of(MAX_HEAD_BYTES))
    assert isinstance(event, h11.Request) and event.target == b"/v2/health/live"


def test_binary_byte_counts_must_match_shape_and_body():
    array = np.zeros((1, 1, 2, 2), np.float32)
    body, header_length = _binary_request(array, "FP32", declared=12)
    with pytest.raises(ClientError, match=r"binary_data_size 12 does not match shape x datatype \(16 bytes\)"):
        parse_infer_request(body, header_length, SPEC)
    body, header_length = _binary_request(array, "FP32")
    with pytest.raises(ClientError, match="body carries 20 bytes of binary tensor data, expected 16"):
        parse_infer_request(body + b"\0" * 4, header_length, SPEC)


def test_binary_response_layout_follows_the_extension():
    logits = np.array([[1.0, 2.0]], np.float32)
    labels = np.array([["cat", "dög"]], dtype=object)
    outputs = [OutputTensor("logits", "FP32", logits, True), OutputTensor("labels", "BYTES", labels, True)]
    body, headers = encode_infer_response({"model_name": "m"}, outputs)
    json_length = int(headers["inference-header-content-length"])
    header = json.loads(body[:json_length])
    sizes = [output["parameters"]["binary_data_size"] for output in header["outputs"]]
    assert sizes == [8, 4 + 3 + 4 + 4] and len(body) == json_length + sum(sizes)
    np.testing.assert_array_equal(np.frombuffer(body[json_length : json_length + 8], "<f4"), [1.0, 2.0])
    assert body[json_length + 8 :] == struct.pack("<I", 3) + b"cat" + struct.pack("<I", 4) + "dög".encode()
    assert serialize_bytes(np.array([b"\x00"], dtype=object)) == b"\x01\x00\x00\x00\x00"


def test_json_response_has_no_binary_header():
    body, headers = encode_infer_response({}, [OutputTensor("logits", "FP32", np.ones((1, 2), np.float32), False)])
    assert headers == {"content-type": "application/json"}
    assert json.loads(body)["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 1.0]}]


def test_softmax_and_classify_response_are_exact():
    logits = np.log(np.array([0.2, 0.5, 0.3], np.float32))
    np.testing.assert_allclose(softmax(logits[None])[0], [0.2, 0.5, 0.3], rtol=1e-6)
    response = classify_response(logits, 2, ("a", "b", "c"))
    assert response["labels"] == ["b", "c"] and response["top_k"] == 2
    np.testing.assert_allclose(response["scores"], [0.5, 0.3], rtol=1e-6)


def test_softmax_is_exact_for_logits_whose_exp_overflows():
    logits = np.array([[1000.0, 1000.0 - np.log(3.0), -1e30], [-1e30, 0.0, -1e30]], np.float32)
    probabilities = softmax(logits)
    np.testing.assert_allclose(probabilities, [[0.75, 0.25, 0.0], [0.0, 1.0, 0.0]], rtol=1e-3, atol=0)
    response = classify_response(logits[0], 3, ("a", "b", "c"))
    assert response["labels"] == ["a", "b", "c"] and response["scores"][2] == 0.0


def _png(pixels: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_preprocessing_follows_the_card_formula():
    pixels = np.array([[0, 51], [102, 255]], np.uint8)
    recipe = Preprocess(2, 2, 1, 1 / 255, (0.5,), (0.25,))
    tensor = image_to_tensor(_png(pixels, "L"), recipe)
    expected = (pixels.astype(np.float32) / 255 - 0.5) / 0.25
    assert tensor.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(tensor[0, 0], expected, rtol=1e-6)


def test_rgb_image_becomes_grayscale_and_is_resized():
    rgb = np.full((8, 6, 3), 200, np.uint8)
    tensor = image_to_tensor(_png(rgb, "RGB"), Preprocess(4, 4, 1, 1 / 255, (0.0,), (1.0,)))
    assert tensor.shape == (1, 1, 4, 4)
    np.testing.assert_allclose(tensor, 200 / 255, rtol=1e-6)


def _saved(image_format: str) -> bytes:
    """A real 4 x 4 image in a format Pillow can write but okdpipe does not decode."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format=image_format)
    return buffer.getvalue()


def _float_tiff() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(buffer, format="TIFF")
    return buffer.getvalue()


def _huge_png_header() -> bytes:
    """A valid 1-pixel PNG whose header claims 5000 x 5000 pixels: refused before any decoding."""
    png = bytearray(_png(np.zeros((1, 1), np.uint8), "L"))
    png[16:24] = struct.pack(">II", 5000, 5000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))  # IHDR's CRC covers type + data
    return bytes(png)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "body is empty"),
        (b"not an image", "unknown format"),
        (_saved("EPS"), "unknown format"),  # Pillow would run Ghostscript on these bytes
        (_saved("ICO"), "unknown format"),
        (_float_tiff(), "image cannot be classified: 'F' images (floating-point or 32-bit) have no 8-bit reading"),
        (_png(np.zeros((4, 4), np.uint8), "L")[:30], "not a decodable image"),
        (_huge_png_header(), "image of 5000x5000 pixels is too large"),
    ],
)
def test_undecodable_image_is_400(data, message):
    with pytest.raises(ClientError) as raised:
        image_to_tensor(data, Preprocess(2, 2, 1, 1.0, (0.0,), (1.0,)))
    assert raised.value.status == 400 and message in raised.value.message


def test_multipart_file_part_is_extracted_byte_exact():
    payload = b"\x89PNG\r\n\x1a\n\r\n--not-the-boundary\r\n"
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + payload + b"\r\n--XyZ--\r\n"
    )
    assert multipart_file(body, "multipart/form-data; boundary=XyZ") == payload
    with pytest.raises(ClientError, match="without a boundary"):
        multipart_file(body, "multipart/form-data")


def test_histogram_renders_cumulative_buckets():
    histogram = Histogram("h", "help", (1, 2))
    for value in (1, 2, 2, 5):
        histogram.observe(value)
    assert histogram.render().splitlines()[2:] == [
        'h_bucket{le="1"} 1',
        'h_bucket{le="2"} 3',
        'h_bucket{le="+Inf"} 4',
        "h_sum 10",
        "h_count 4",
    ]


def test_server_metrics_count_errors_by_kind():
    metrics = ServerMetrics(queue_depth=lambda: 3, ready=lambda: 1)
    metrics.observe_request("/r", "POST", 200, 0.01)
    metrics.observe_request("/r", "POST", 400, 0.01)
    metrics.observe_request("/r", "POST", 503, 0.01)
    metrics.observe_request("/r", "POST", 501, 0.01)  # a Transfer-Encoding refused: the client's, not a fault
    metrics.observe_request("/r", "POST", 500, 0.01)
    text = metrics.render()
    assert 'okdpipe_requests_total{route="/r",method="POST",status="400"} 1' in text
    assert 'okdpipe_request_errors_total{route="/r",kind="client"} 2' in text
    assert 'okdpipe_request_errors_total{route="/r",kind="server"} 2' in text
    assert "okdpipe_queue_depth 3" in text and "okdpipe_model_ready 1" in text


def run_bounded(scenario, timeout_s: float = 10.0):
    """A batcher that drops a request must fail the test, not hang it."""
    return asyncio.run(asyncio.wait_for(scenario, timeout_s))


def _batcher_run(calls: list, release: threading.Event | None = None):
    """A fake model: logits = per-image sum, so each caller can check it got its own rows back."""

    def run(batch: np.ndarray) -> np.ndarray:
        if release is not None:
            release.wait(timeout=5)
        calls.append(len(batch))
        return batch.reshape(len(batch), -1).sum(axis=1, keepdims=True)

    return run


def test_batcher_gathers_concurrent_requests_and_splits_in_order():
    calls: list[int] = []

    async def scenario():
        batcher = MicroBatcher(_batcher_run(calls), max_batch=8, max_delay_s=0.05, max_queue=64)
        batcher.start()
        requests = [np.full((size, 1), float(index)) for index, size in enumerate((1, 3, 2, 1))]
        results = await asyncio.gather(*(batcher.submit(images) for images in requests))
        await batcher.stop()
        return requests, results

    requests, results = run_bounded(scenario())
    assert calls == [7]
    for images, logits in zip(requests, results):
        np.testing.assert_array_equal(logits, images)


def test_batcher_never_splits_a_request_and_carries_it_to_the_next_batch():
    calls: list[int] = []

    async def scenario():
        batcher = MicroBatcher(_batcher_run(calls), max_batch=4, max_delay_s=0.05, max_queue=64)
        batcher.start()
        await asyncio.gather(*(batcher.submit(np.ones((size, 1))) for size in (3, 2, 2)))
        await batcher.stop()

    run_bounded(scenario())
    assert calls == [3, 4]


def test_batcher_refuses_beyond_max_queue_without_growing():
    release = threading.Event()

    async def scenario():
        batcher = MicroBatcher(_batcher_run([], release), max_batch=2, max_delay_s=0.0, max_queue=3)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(np.ones((2, 1))))
        await asyncio.sleep(0.05)  # the first batch is now inside the (blocked) model call
        waiting = asyncio.ensure_future(batcher.submit(np.ones((2, 1))))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="2 images are waiting"):
            await batcher.submit(np.ones((2, 1)))
        release.set()
        await asyncio.gather(running, waiting)
        depth = batcher.waiting_images
        await batcher.stop()
        return depth

    assert run_bounded(scenario()) == 0


def test_batcher_spends_the_delay_only_after_seeing_concurrency():
    async def scenario():
        batcher = MicroBatcher(_batcher_run([]), max_batch=8, max_delay_s=0.3, max_queue=64)
        batcher.start()
        started = time.perf_counter()
        await batcher.submit(np.ones((1, 1)))
        lone = time.perf_counter() - started
        await batcher.submit(np.ones((2, 1)))  # a multi-image batch: there is concurrency to wait for
        started = time.perf_counter()
        await batcher.submit(np.ones((1, 1)))
        waited = time.perf_counter() - started
        await batcher.stop()
        return lone, waited

    lone, waited = run_bounded(scenario())
    assert lone < 0.1 and waited >= 0.29
