"""Nothing a client sends is silently ignored or half-read, over real HTTP: a body that is not strict UTF-8, a query
parameter a route does not read, a parameter sent where it is not read, a media type in another letter case. Each
answer is checked by status and by its whole one-line message."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

MODEL = "tiny-cnn"
INFER = f"/v2/models/{MODEL}/infer"
CLASSIFY = f"/v2/models/{MODEL}/classify"
MODEL_ROUTES = ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")
# Every route and the route template its message names: GET routes answer HEAD too.
READ_ROUTES = [
    ("/v2/health/live", "/v2/health/live"),
    ("/v2/health/ready", "/v2/health/ready"),
    ("/v2", "/v2"),
    ("/metrics", "/metrics"),
    (f"/v2/models/{MODEL}", MODEL_ROUTES[0]),
    (f"/v2/models/{MODEL}/versions/1", MODEL_ROUTES[1]),
    (f"/v2/models/{MODEL}/ready", MODEL_ROUTES[0] + "/ready"),
    (f"/v2/models/{MODEL}/versions/1/ready", MODEL_ROUTES[1] + "/ready"),
]
pytestmark = pytest.mark.timeout(60)


def error_of(response: httpx.Response) -> tuple[int, str]:
    """(status, message) of a JSON error answer, the message one line."""
    message = json.loads(response.content)["error"]
    assert "\n" not in message
    return response.status_code, message


def one_image_request(**extra) -> dict:
    data = np.zeros(784, np.float32).tolist()
    return {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": data}], **extra}


def png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((28, 28), 200, np.uint8), "L").save(buffer, format="PNG")
    return buffer.getvalue()


def form(boundary: str = "XyZ-b0undary") -> bytes:
    """A multipart/form-data body with the PNG as its one file part."""
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + png()
        + f"\r\n--{boundary}--\r\n".encode()
    )


def test_an_encoded_surrogate_in_the_id_is_400_never_echoed(client):
    """ED A0 80 is U+D800 encoded as UTF-8: json.loads(bytes) decoded it with 'surrogatepass', and the id came back
    as "\\ud800" with a 200."""
    body = json.dumps(one_image_request(id="@@")).encode().replace(b"@@", b"\xed\xa0\x80")
    offset = body.index(b"\xed")
    answer = client.post(INFER, content=body, headers={"content-type": "application/json"})
    assert error_of(answer) == (
        400,
        f"request body is not valid UTF-8 (byte 0xed at offset {offset}: invalid continuation byte); "
        "send JSON encoded as UTF-8",
    )


@pytest.mark.parametrize(("path", "template"), READ_ROUTES)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_read_route_refuses_any_query_parameter(client, path, template, method):
    answer = client.request(method, path, params={"topk": "5"})
    assert answer.status_code == 400
    if method == "GET":
        assert error_of(answer) == (400, f"unknown query parameter 'topk'; {template} takes no query parameters")


@pytest.mark.parametrize("versioned", [False, True])
def test_infer_refuses_a_query_parameter(client, versioned):
    """/infer reads its options from the JSON body; a top_k in the query would be dropped."""
    path = f"/v2/models/{MODEL}/versions/1/infer" if versioned else INFER
    template = MODEL_ROUTES[versioned] + "/infer"
    answer = client.post(path, params={"top_k": "3"}, json=one_image_request())
    assert error_of(answer) == (400, f"unknown query parameter 'top_k'; {template} takes no query parameters")


@pytest.mark.parametrize(
    ("query", "name"),
    [("topk=5", "topk"), ("top_k=3&topk=5", "topk"), ("k=3", "k"), ("Top_K=3", "Top_K"), ("top_k=3&", None)],
)
def test_classify_refuses_a_query_parameter_other_than_top_k(client, query, name):
    answer = client.post(f"{CLASSIFY}?{query}", content=png())
    if name is None:  # an empty pair is no parameter
        assert answer.status_code == 200 and answer.json()["top_k"] == 3
        return
    template = MODEL_ROUTES[0] + "/classify"
    assert error_of(answer) == (400, f"unknown query parameter {name!r}; {template} takes only top_k")


@pytest.mark.parametrize("value", ["1e400", "3.0", "true", "3", "null"])
def test_top_k_with_an_output_is_400_saying_where_it_goes(client, value):
    """It was ignored whatever its value (the labels came back top 1)."""
    request = one_image_request(outputs=[{"name": "labels", "parameters": {"top_k": "@@"}}])
    body = json.dumps(request).replace('"@@"', value).encode()
    answer = client.post(INFER, content=body)
    assert error_of(answer) == (
        400,
        "'outputs[0].parameters.top_k' is not read there; it goes in parameters.top_k (the request's parameters)",
    )


def test_the_request_level_top_k_is_read(client):
    answer = client.post(INFER, json=one_image_request(parameters={"top_k": 3}, outputs=[{"name": "labels"}]))
    assert answer.status_code == 200 and answer.json()["outputs"][0]["shape"] == [1, 3]


@pytest.mark.parametrize(
    "content_type",
    [
        "Multipart/Form-Data; boundary={b}",
        "MULTIPART/FORM-DATA; BOUNDARY={b}",
        'multipart/form-data; Boundary="{b}"',
        "multipart/form-data ; charset=utf-8; boundary={b}",
        "multipart/form-data;boundary={b}",
    ],
)
def test_the_multipart_media_type_and_parameter_names_are_case_insensitive(client, content_type):
    boundary = "XyZ-b0undary"
    answer = client.post(
        CLASSIFY,
        params={"top_k": "2"},
        content=form(boundary),
        headers={"content-type": content_type.format(b=boundary)},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["top_k"] == 2


def test_the_boundary_value_is_case_sensitive(client):
    """Only the value keeps its case (RFC 2046): a boundary that differs in case from the body's finds no part."""
    answer = client.post(
        CLASSIFY, content=form("XyZ-b0undary"), headers={"content-type": "multipart/form-data; boundary=xyz-b0undary"}
    )
    assert error_of(answer) == (400, "multipart body has no file part; send the image as a form field with a filename")


def test_a_boundary_given_twice_is_400(client):
    content_type = "multipart/form-data; boundary=XyZ-b0undary; BOUNDARY=other"
    answer = client.post(CLASSIFY, content=form("XyZ-b0undary"), headers={"content-type": content_type})
    assert error_of(answer) == (400, "Content-Type gives the parameter 'boundary' more than once; give it once")
