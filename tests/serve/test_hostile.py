"""Hostile clients against the real server: slow and idle sockets, uploads that stop halfway, bodies that exhaust
the byte budget, client-chosen metric labels, inputs that make the model's outputs non-finite, odd query
strings, and images that are expensive to decode. The server must stay reachable, answer every request with
one JSON line, and log only JSON."""

from __future__ import annotations

import io
import json
import re
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

MODEL = "tiny-cnn"
INFER = f"/v2/models/{MODEL}/infer"
CLASSIFY = f"/v2/models/{MODEL}/classify"
MIB = 1024 * 1024


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity, which Python's json would otherwise accept and no other parser does."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name} in {text[:200]}"))


def one_line_error(response: httpx.Response, status: int, fragment: str) -> str:
    assert response.status_code == status, response.text
    message = strict_json(response.text)["error"]
    assert fragment in message and "\n" not in message
    return message


def json_infer(images: np.ndarray) -> dict:
    return {
        "inputs": [{"name": "input", "shape": list(images.shape), "datatype": "FP32", "data": images.tolist()}],
        "outputs": [{"name": "logits"}, {"name": "probabilities"}],
    }


def open_request(port: int, head: bytes, body_part: bytes = b"") -> socket.socket:
    """A connection that has sent `head` (and maybe part of a body) and then goes quiet."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head + body_part)
    return sock


def upload_head(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> str:
    sock.settimeout(timeout)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks).decode()


def read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[str, bytes]:
    """One response from a connection that stays open: its head, then its Content-Length bytes of body."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a whole response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a whole response body: {body!r}"
        body += chunk
    return head.decode(), body


def closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def metric(url: str, sample: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_for(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} not reached within {timeout} s")


def assert_log_is_json_without_errors(log: str) -> None:
    for line in log.splitlines():
        entry = json.loads(line)  # every line is one JSON object: no bare tracebacks
        assert entry.get("level") not in ("error", "critical") and "exception" not in entry, line


@pytest.fixture(scope="module")
def guarded_server(start_server):
    """Short connection deadlines and a 2 MiB byte budget (1 MiB bodies), so attacks resolve in about a second."""
    options = (
        "--header-timeout-s",
        "1",
        "--body-timeout-s",
        "1",
        "--max-body-mb",
        "1",
        "--max-inflight-mb",
        "2",
        "--max-batch",
        "8",
        "--threads",
        "1",
    )
    with start_server(*options) as server:
        yield server


@pytest.mark.parametrize("top_k", ["²", "1e3", "-1", "+1", " 1", "1.0", "0x1", "١", "9" * 5000, ""])
def test_top_k_that_is_not_a_plain_ascii_integer_is_one_line_400(client, top_k):
    png = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png, format="PNG")
    response = client.post(CLASSIFY, params={"top_k": top_k}, content=png.getvalue())
    one_line_error(response, 400, "top_k must be an integer between 1 and 10")


@pytest.mark.parametrize("header_length", ["²", "-5", "1e2", "9" * 5000])
def test_binary_header_length_that_is_not_a_plain_integer_is_400(client, header_length):
    response = client.post(INFER, content=b"{}", headers={"Inference-Header-Content-Length": header_length.encode()})
    one_line_error(response, 400, "Inference-Header-Content-Length must be an integer")


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET /v2/health/ready?x=\xff HTTP/1.1",  # a raw non-ASCII byte in the query
        b"GET /v2/models/\xc3\xa9 HTTP/1.1",  # ... and in the path
        b"GET /v2 /health HTTP/1.1",  # a space inside the target
        b"GET /v2/health/ready HTTP/1.1\r\nno colon in this header",  # a malformed header line
    ],
)
def test_requests_http_cannot_parse_get_a_json_400_and_the_server_keeps_serving(server, request_line):
    sock = open_request(server.port, request_line + b"\r\nHost: x\r\n\r\n")
    head, _, body = read_until_closed(sock).partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 400") and "content-type: application/json" in head.lower()
    assert strict_json(body)["error"].startswith("malformed HTTP request")
    assert httpx.get(server.url + "/v2/health/live", timeout=5).status_code == 200


@pytest.mark.parametrize(
    ("head", "status", "message"),
    [
        (
            b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
            431,
            "request head longer than 16384 bytes; send fewer or shorter headers",
        ),
        (
            b"GET /v2/health/live?" + b"a" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            414,
            "request line longer than 16384 bytes; shorten the URL",
        ),
        (
            b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-H%d: %s\r\n" % (index, b"v" * 100) for index in range(300))
            + b"\r\n",
            431,
            "request head longer than 16384 bytes",
        ),
        (
            b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}",
            400,
            "malformed HTTP request: both Content-Length and Transfer-Encoding are given",
        ),
    ],
    ids=["200 KB header line", "200 KB URL", "300 headers", "two framings"],
)
def test_oversized_request_heads_get_a_json_431_or_414_then_close(server, head, status, message):
    """The answer must reach the client: closing while its head is still arriving would reset the connection
    (read_until_closed then raises ConnectionResetError) and lose the answer."""
    sock = open_request(server.port, head)
    answer = read_until_closed(sock)
    sock.close()
    response_head, _, body = answer.partition("\r\n\r\n")
    assert response_head.startswith(f"HTTP/1.1 {status} "), answer[:300]
    assert "content-type: application/json" in response_head.lower()
    assert "connection: close" in response_head.lower()
    assert strict_json(body)["error"].startswith(message)
    assert httpx.get(server.url + "/v2/health/live", timeout=5).status_code == 200


LONG_URL_HEAD = b"GET /?" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"


def sends_fail_within(sock: socket.socket, seconds: float) -> bool:
    """Whether sending a byte every 0.1 s fails (the server closed the socket) within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sock.sendall(b"a")
        except (BrokenPipeError, ConnectionResetError):
            return True
        time.sleep(0.1)
    return False


def test_a_refused_connection_closes_within_the_header_timeout_though_the_client_keeps_it_open(guarded_server):
    """After the answer the server reads on (so that closing resets nothing) but not for ever."""
    sock = open_request(guarded_server.port, LONG_URL_HEAD)
    assert read_until_closed(sock).startswith("HTTP/1.1 414 ")  # the server has finished sending
    assert sends_fail_within(sock, seconds=3)  # and then closes, 1 s (--header-timeout-s) later
    sock.close()


def test_a_refused_client_that_keeps_sending_is_cut_off(server):
    """What the server reads on after a refusal is bounded in bytes too (1 MiB), not only by the 10 s timeout."""
    sock = open_request(server.port, LONG_URL_HEAD)
    assert read_until_closed(sock).startswith("HTTP/1.1 414 ")
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(64):
            sock.sendall(b"x" * MIB)
    sock.close()


def test_non_finite_outputs_are_a_clear_422_never_bare_nan(client):
    huge = np.full((2, 1, 28, 28), 3e38, np.float32)  # finite input; the convolution overflows to inf - inf = NaN
    huge[0] = 0.0
    message = one_line_error(client.post(INFER, json=json_infer(huge)), 422, "outputs are not finite for image 1")
    assert "preprocessed as the card says" in message


def test_huge_but_finite_logits_give_exact_probabilities(client, reference_logits):
    """Softmax must subtract the row maximum: these logits are around 1e29, and exp() of them overflows."""
    images = np.full((1, 1, 28, 28), 1e30, np.float32)
    logits = reference_logits(images)
    assert np.isfinite(logits).all() and np.abs(logits).max() > 1e28
    response = client.post(INFER, json=json_infer(images))
    assert response.status_code == 200, response.text
    probabilities = np.array(strict_json(response.text)["outputs"][1]["data"])
    expected = np.zeros(10)
    expected[np.argmax(logits)] = 1.0
    np.testing.assert_array_equal(probabilities, expected)


def test_client_chosen_methods_paths_and_model_names_create_no_metric_series(client, server):
    def hostile_round(tag: str) -> None:
        for index in range(10):
            client.request(f"X{tag}{index}", "/v2/health/live")
            client.get(f"/v2/models/{tag}-model-{index}")
            client.post(f"/v2/models/{tag}-model-{index}/infer", json={})
            client.get(f"/{tag}/path/{index}")

    hostile_round("zqa")  # may create the fixed "other"/"unmatched" series once
    client.get("/metrics")  # and the scrape's own series
    before = client.get("/metrics").text
    hostile_round("zqb")
    after = client.get("/metrics").text
    assert [line.rsplit(" ", 1)[0] for line in after.splitlines()] == [
        line.rsplit(" ", 1)[0] for line in before.splitlines()
    ]
    assert "zqa" not in after and "zqb" not in after and 'method="other"' in after


def test_idle_and_slowloris_sockets_are_closed_and_the_server_stays_reachable(guarded_server):
    port = guarded_server.port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(40)]
    dribbling = [open_request(port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ") for _ in range(10)]
    with httpx.Client(base_url=guarded_server.url, timeout=5) as http:
        started = time.monotonic()
        assert http.get("/v2/health/live").status_code == 200
        assert time.monotonic() - started < 1.0
    for sock in dribbling:
        sock.sendall(b"a")  # a byte now and then does not extend the header deadline
    assert all(closed_by_server(sock, within=3.0) for sock in idle + dribbling)
    assert_log_is_json_without_errors(guarded_server.log())


@pytest.fixture(scope="module")
def keep_alive_server(start_server):
    """A 1 s header deadline but a 5 s body deadline: a request can still be uploading when the header deadline
    armed at connect time fires."""
    with start_server("--header-timeout-s", "1", "--body-timeout-s", "5", "--threads", "1") as server:
        yield server


def closed_within(sock: socket.socket, seconds: float, dribble: bool) -> bool:
    """Whether the server closes `sock` within `seconds`, the client sending a byte every 0.25 s if `dribble`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if dribble:
            try:
                sock.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                return True
        if closed_by_server(sock, within=0.25):
            return True
    return False


@pytest.mark.parametrize("dribble", [False, True], ids=["idle", "dribbling a next head"])
def test_a_kept_alive_connection_gets_a_new_header_deadline_after_each_response(keep_alive_server, dribble):
    """The deadline armed at connect fires while the first request is still uploading, and must leave it be; the
    response then arms a new one for the next head. Without it, an idle socket stays open until uvicorn's 5 s
    keep-alive timeout, and one dribbling its next head (which cancels that timeout) stays open forever."""
    body = json.dumps(json_infer(np.zeros((1, 1, 28, 28), np.float32))).encode()
    sock = open_request(keep_alive_server.port, upload_head(INFER, len(body)))
    time.sleep(1.5)  # past the connect-time header deadline, well within the body deadline
    sock.sendall(body)
    head, _ = read_response(sock)
    assert head.startswith("HTTP/1.1 200") and "connection: close" not in head.lower(), head
    if dribble:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    assert closed_within(sock, seconds=2.5, dribble=dribble)
    sock.close()


def test_slow_body_is_408_and_its_bytes_are_released(guarded_server):
    sock = open_request(guarded_server.port, upload_head(INFER, 1000), b'{"inputs": ')
    answer = read_until_closed(sock)
    sock.close()
    head, _, body = answer.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 408") and "connection: close" in head.lower()
    assert "request body not received within 1 s (--body-timeout-s)" in strict_json(body)["error"]
    wait_for(lambda: metric(guarded_server.url, "okdpipe_inflight_body_bytes") == 0, what="bytes released")


def test_uploads_are_admitted_by_bytes_and_refused_with_503_beyond_the_budget(guarded_server):
    url = guarded_server.url
    holders = [open_request(guarded_server.port, upload_head(INFER, MIB), b"{") for _ in range(2)]
    wait_for(lambda: metric(url, "okdpipe_inflight_body_bytes") == 2 * MIB, what="2 MiB held")
    refused = httpx.post(url + INFER, content=b"x" * 1000, timeout=5)
    one_line_error(refused, 503, "request bytes in flight, limit 2097152, --max-inflight-mb")
    assert refused.headers["retry-after"] == "1"
    for sock in holders:
        sock.close()
    wait_for(lambda: metric(url, "okdpipe_inflight_body_bytes") == 0, what="bytes released")
    images = np.zeros((1, 1, 28, 28), np.float32)
    assert httpx.post(url + INFER, json=json_infer(images), timeout=5).status_code == 200


def test_client_gone_mid_upload_is_neither_a_500_nor_an_error_log(guarded_server):
    url = guarded_server.url
    served_500 = metric(url, 'okdpipe_request_errors_total{route="/v2/models/{name}/infer",kind="server"}')
    disconnects = guarded_server.log().count("client disconnected before sending its whole request")
    for _ in range(3):
        sock = open_request(guarded_server.port, upload_head(INFER, 100_000), b'{"inputs": [' + b"0," * 500)
        time.sleep(0.05)
        sock.close()
    wait_for(
        lambda: guarded_server.log().count("client disconnected before sending its whole request") == disconnects + 3,
        what="three disconnects logged",
    )
    assert metric(url, 'okdpipe_request_errors_total{route="/v2/models/{name}/infer",kind="server"}') == served_500
    assert_log_is_json_without_errors(guarded_server.log())
    assert httpx.get(url + "/v2/health/ready", timeout=5).status_code == 200


def _expensive_png() -> bytes:
    """48 KB that decode to 4096 x 4096 RGB pixels (about 0.4 s of decoding and resizing each)."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4096, 4096, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_decoding_does_not_block_the_event_loop(server):
    """Health checks stay fast while four clients post images that take a while to decode. "Fast" is relative to
    one decode measured here and now, so a loaded machine slows both sides alike: decoding on the event loop
    makes a health check wait for the decodes queued before it (about four), decoding off it much less."""
    from okdpipe.contracts.card import read_card
    from okdpipe.serve.preprocess import image_to_tensor

    png = _expensive_png()
    recipe = read_card(server.artifact).preprocess
    started = time.monotonic()
    image_to_tensor(png, recipe)
    decode_s = time.monotonic() - started
    statuses: list[int] = []

    def post_images() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            statuses.extend(http.post(CLASSIFY, content=png).status_code for _ in range(2))

    posters = [threading.Thread(target=post_images) for _ in range(4)]
    for thread in posters:
        thread.start()
    latencies = []
    while any(thread.is_alive() for thread in posters):
        started = time.monotonic()
        assert httpx.get(server.url + "/v2/health/live", timeout=10).status_code == 200  # a new connection each
        latencies.append(time.monotonic() - started)
        time.sleep(0.02)
    for thread in posters:
        thread.join()
    assert statuses == [200] * 8
    assert len(latencies) > 5 and max(latencies) < 2 * decode_s, (decode_s, sorted(latencies))
