"""A bounded, schema-driven fuzz of the v2 endpoints against the real server on loopback (hypothesis, a few hundred
requests, derandomised so CI sees the same ones): every answer is a 2xx or 4xx whose body is strict JSON (never
a 5xx, never a bare NaN, never a hang), and the server stays healthy and logs no error."""

from __future__ import annotations

import io
import json
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

MODEL = "tiny-cnn"
IMAGE_SHAPE = [1, 28, 28]
FUZZ_SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), 128, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# Values chosen to sit on the boundaries the server checks; hypothesis mixes them with arbitrary ones.
ODD_TEXT = st.sampled_from(["", "0", "1", "10", "11", "-1", "²", "1e3", "٣", " 1", "1_0", "9" * 30, "nan", "NaN"])
NAMES = st.sampled_from([MODEL, "input", "logits", "labels", "probabilities"]) | st.text(max_size=12)
SCALES = st.sampled_from([0.0, 1.0, 1e30, 3e38])
DATATYPES = st.sampled_from(["FP32", "FP16", "FP64", "INT32", "BYTES", "BOOL"]) | st.text(max_size=6)
JSON_LEAVES = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
ANY_JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def valid_infer_request(draw) -> dict:
    """A request the server must answer 200 (or 422 when SCALES drives the logits to inf/NaN)."""
    batch = draw(st.integers(1, 4))
    values = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).uniform(-1, 1, batch * 784) * draw(SCALES)
    data = values.astype(np.float32).tolist()  # finite, but 3e38 overflows the model's sums to NaN
    outputs = draw(
        st.lists(st.sampled_from(["logits", "probabilities", "labels"]), min_size=1, max_size=3, unique=True)
    )
    return {
        "inputs": [{"name": "input", "shape": [batch, *IMAGE_SHAPE], "datatype": "FP32", "data": data}],
        "outputs": [{"name": name, "parameters": {"binary_data": draw(st.booleans())}} for name in outputs],
        "parameters": {"top_k": draw(st.integers(1, 10))},
        "id": draw(st.text(max_size=8)),
    }


# Schema-driven mutations: each replaces one field of a valid request with something hostile.
MUTATIONS = {
    ("inputs",): st.just([]) | ANY_JSON,
    ("inputs", 0, "name"): NAMES | ANY_JSON,
    ("inputs", 0, "shape"): st.lists(st.integers(-5, 5000), max_size=5) | ANY_JSON,
    ("inputs", 0, "datatype"): DATATYPES | ANY_JSON,
    ("inputs", 0, "data"): st.lists(st.floats(width=32), max_size=8) | ANY_JSON,
    ("inputs", 0, "parameters"): st.fixed_dictionaries({"binary_data_size": st.integers(-8, 10**6) | ANY_JSON}),
    ("outputs",): st.lists(st.fixed_dictionaries({"name": NAMES}), max_size=3) | ANY_JSON,
    ("outputs", 0, "parameters"): ANY_JSON,
    ("parameters",): ANY_JSON,
    ("parameters", "top_k"): st.integers(-2, 12) | ANY_JSON,
    ("parameters", "binary_data_output"): ANY_JSON,
    ("id",): ANY_JSON,
}


def _set(document, path: tuple, value) -> None:
    for key in path[:-1]:
        if not isinstance(document, (dict, list)) or (isinstance(document, list) and len(document) <= key):
            return
        document = document[key]
    if isinstance(document, dict):
        document[path[-1]] = value


@st.composite
def infer_bodies(draw) -> tuple[bytes, dict[str, str]]:
    """JSON or binary-extension bodies: a valid request with up to two fields mutated."""
    request, binary = draw(valid_infer_request()), b""
    if draw(st.booleans()):  # the binary tensor extension: the data leaves the JSON header
        tensor = request["inputs"][0]
        binary = np.asarray(tensor.pop("data"), "<f4").tobytes()
        tensor["parameters"] = {"binary_data_size": len(binary)}
    for path in draw(st.lists(st.sampled_from(list(MUTATIONS)), max_size=2)):
        _set(request, path, draw(MUTATIONS[path]))
    header = json.dumps(request).encode()
    if not binary:
        return header, {"content-type": "application/json"}
    declared = draw(st.just(str(len(header))) | ODD_TEXT | st.integers(-10, 10_000).map(str))
    return header + binary + draw(st.binary(max_size=8)), {"inference-header-content-length": declared}


@st.composite
def image_bodies(draw) -> tuple[bytes, dict[str, str]]:
    image = draw(st.sampled_from([_png(28), _png(3), _png(28)[:40], b"GIF89a", b""]))
    if draw(st.booleans()):
        return image, {"content-type": draw(st.sampled_from(["image/png", "application/octet-stream", ""]))}
    boundary = draw(st.sampled_from(["XyZ", "", "a" * 70]))
    part = b'--XyZ\r\nContent-Disposition: form-data; name="f"; filename="a.png"\r\n\r\n' + image
    body = part + draw(st.sampled_from([b"\r\n--XyZ--\r\n", b"", b"--XyZ"]))
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


@st.composite
def routes(draw) -> tuple[str, str]:
    """Any method on a known route with fuzzed model names and versions, or an arbitrary path."""
    name = draw(st.just(MODEL) | NAMES.map(lambda text: quote(text, safe="")))
    version = draw(st.sampled_from(["", "/versions/1"]) | ODD_TEXT.map(lambda text: "/versions/" + quote(text)))
    ends = st.sampled_from(["/infer", "/classify", "", "/ready"])
    path = draw(
        ends.map(lambda end: f"/v2/models/{name}{version}{end}")
        | st.sampled_from(["/v2", "/v2/health/live", "/v2/health/ready", "/metrics"])
        | st.text(max_size=20).map(lambda text: "/" + quote(text))
    )
    method = draw(
        st.sampled_from(["POST", "GET", "PUT", "DELETE", "HEAD", "OPTIONS"])
        | st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=8)
    )
    return method, path


def assert_valid_answer(method: str, response: httpx.Response) -> None:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
    if method == "HEAD" or not response.content:
        return
    length = int(response.headers.get("inference-header-content-length", len(response.content)))
    content_type = response.headers.get("content-type", "")
    assert content_type.startswith(("application/json", "application/octet-stream", "text/plain; version=0.0.4"))
    if content_type.startswith(("application/json", "application/octet-stream")):
        json.loads(response.content[:length], parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))


@pytest.fixture(scope="module")
def fuzz_client(server):
    with httpx.Client(base_url=server.url, timeout=10.0) as http:
        yield http


def send(
    http: httpx.Client,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict | None = None,
    params: dict | None = None,
) -> None:
    # non-ASCII values go as UTF-8 bytes; surrounding spaces are not legal in a header value
    raw_headers = {key: value.strip().encode() for key, value in (headers or {}).items()}
    assert_valid_answer(method, http.request(method, path, params=params, content=body, headers=raw_headers))


@pytest.mark.timeout(120)
@settings(FUZZ_SETTINGS, max_examples=150)
@given(body=infer_bodies(), versioned=st.booleans())
def test_fuzzed_infer_gets_json_2xx_or_4xx(fuzz_client, body, versioned):
    send(fuzz_client, "POST", f"/v2/models/{MODEL}{'/versions/1' if versioned else ''}/infer", *body)


@pytest.mark.timeout(60)
@settings(FUZZ_SETTINGS, max_examples=60)
@given(body=image_bodies(), top_k=st.none() | ODD_TEXT | st.text(max_size=6))
def test_fuzzed_classify_gets_json_2xx_or_4xx(fuzz_client, body, top_k):
    send(fuzz_client, "POST", f"/v2/models/{MODEL}/classify", *body, params={} if top_k is None else {"top_k": top_k})


@pytest.mark.timeout(60)
@settings(FUZZ_SETTINGS, max_examples=100)
@given(route=routes(), body=st.sampled_from([b"", b"{}", b"\x00" * 100]))
def test_fuzzed_routes_and_methods_get_json_2xx_or_4xx(fuzz_client, route, body):
    send(fuzz_client, *route, body)


def test_server_is_healthy_and_logged_no_error_after_the_fuzz(server):
    assert httpx.get(server.url + "/v2/health/ready", timeout=5).status_code == 200
    for line in server.log().splitlines():
        entry = json.loads(line)
        assert entry.get("level") not in ("error", "critical"), line
