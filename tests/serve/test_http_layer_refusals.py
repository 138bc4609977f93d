"""Requests the HTTP layer refuses before a route answers them: chunked bodies refused from what their chunk-size
lines declare (not after bytes the client never sends), and every refusal counted in /metrics once, under fixed
labels, however many distinct methods and paths hostile clients send."""

from __future__ import annotations

import random
import re
import string
import time

import h11
import httpx
import pytest
from test_hostile import (
    assert_log_is_json_without_errors,
    closed_by_server,
    open_request,
    read_until_closed,
    strict_json,
)

from okdpipe.serve.connections import BODY_LINE_TOO_LONG, CHUNK_SIZE_LINE_ILLEGAL, BoundedHeadConnection
from okdpipe.serve.metrics import KNOWN_METHODS

MIB = 1024 * 1024  # the shared `server` fixture runs with --max-body-mb 1
INFER = "/v2/models/tiny-cnn/infer"
CHUNKED_HEAD = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
TOO_LARGE = "chunked request body declares at least"
COUNTERS = ("okdpipe_requests_total", "okdpipe_request_errors_total")


def answer_within(port: int, data: bytes, seconds: float) -> tuple[str, str]:
    """Send `data`, keep the socket open (the client waits, as a hanging one would), and return the response head
    and body, which must come within `seconds` (the server half-closes after a refusal)."""
    sock = open_request(port, data)
    started = time.monotonic()
    try:
        answer = read_until_closed(sock, timeout=seconds)
    except TimeoutError:
        pytest.fail(f"no answer within {seconds} s")
    finally:
        sock.close()
    assert time.monotonic() - started < seconds
    head, _, body = answer.partition("\r\n\r\n")
    return head, body


def assert_refused(head: str, body: str, status: int, fragment: str) -> None:
    assert head.startswith(f"HTTP/1.1 {status} "), head
    assert "content-type: application/json" in head.lower() and "connection: close" in head.lower(), head
    assert fragment in strict_json(body)["error"], body


@pytest.mark.parametrize(
    ("size_line", "declared"),
    [
        (b"FFFFFFFFFFFFFFFFFFFF\r\n", 16**20 - 1),
        (b"FFFFFFFFFFFFFFFFFFFF", 16**20 - 1),
        (b"100001\r\n", MIB + 1),
        (b"100001;ext=1", MIB + 1),
    ],
    ids=["20 hex digits", "20 hex digits, no CRLF yet", "1 MiB + 1", "1 MiB + 1 with an extension, no CRLF yet"],
)
def test_a_chunk_declared_over_the_body_limit_is_413_at_once(server, size_line, declared):
    head, body = answer_within(server.port, CHUNKED_HEAD + size_line, seconds=2)
    assert_refused(head, body, 413, f"{TOO_LARGE} {declared} bytes, over the 1048576-byte limit (--max-body-mb)")
    assert httpx.get(server.url + "/v2/health/live", timeout=5).status_code == 200


def test_chunks_declaring_more_than_the_limit_together_are_413_before_the_last_arrives(server):
    """Two chunks of 512 KiB arrive whole; the third declares one byte more than the limit leaves, and is refused
    without a byte of its data."""
    half = MIB // 2
    chunks = (b"%x\r\n" % half + b"a" * half + b"\r\n") * 2
    head, body = answer_within(server.port, CHUNKED_HEAD + chunks + b"1\r\n", seconds=2)
    assert_refused(head, body, 413, f"{TOO_LARGE} {MIB + 1} bytes")


@pytest.mark.parametrize(
    "size_line",
    [b"zz\r\n", b"zz", b"1" * 21, b"5;ext\n", b"5 x", b"\r\n", b"-5\r\n", "１\r\n".encode()],
    ids=[
        "not hex",
        "not hex, no CRLF yet",
        "21 digits",
        "LF alone",
        "junk after blanks",
        "empty",
        "a sign",
        "fullwidth",
    ],
)
def test_a_malformed_chunk_size_line_is_400_at_once(server, size_line):
    head, body = answer_within(server.port, CHUNKED_HEAD + size_line, seconds=2)
    assert_refused(head, body, 400, f"malformed HTTP request: {CHUNK_SIZE_LINE_ILLEGAL}")
    assert strict_json(body)["error"] == f"malformed HTTP request: {CHUNK_SIZE_LINE_ILLEGAL}"


def test_a_content_length_of_20_digits_is_413_at_once(server):
    """h11 takes lengths of up to 20 digits; one the server did not read as a number waited for the whole body."""
    data = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {'9' * 20}\r\n\r\n{{".encode()
    head, body = answer_within(server.port, data, seconds=2)
    assert_refused(head, body, 413, f"request body of {'9' * 20} bytes exceeds the 1048576-byte limit")


@pytest.fixture(scope="module")
def own_server(start_server):
    """A server of these tests' own, whose log and metrics no other test touches."""
    with start_server("--threads", "1") as server:
        yield server


def test_a_body_error_after_the_app_answered_closes_quietly(own_server):
    """The app answers 404 before reading the body; a broken chunk after that cannot get a second answer. The
    connection closes, and nothing is logged as an error (h11 used to raise inside the protocol)."""
    sock = open_request(own_server.port, CHUNKED_HEAD.replace(b"tiny-cnn", b"nope") + b"5\r\nabcde\r\n")
    sock.settimeout(5)
    answer = b""
    while not answer.endswith(b"}"):
        answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 404 ")
    sock.sendall(b"zz\r\n")
    assert closed_by_server(sock, within=2)
    sock.close()
    assert httpx.get(own_server.url + "/v2/health/live", timeout=5).status_code == 200
    assert_log_is_json_without_errors(own_server.log())


def counter_samples(url: str) -> dict[str, float]:
    """The request and error counters' samples (series -> value), leaving out the scrapes' own /metrics series."""
    text = httpx.get(url + "/metrics", timeout=5).text
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if line.startswith(COUNTERS))
    return {series: float(value) for series, value in samples if 'route="/metrics"' not in series}


def changed(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {series: after[series] - before.get(series, 0.0) for series in after if after[series] != before.get(series)}


@pytest.mark.parametrize(
    ("data", "method", "status"),
    [
        (b"GET /v2 /health HTTP/1.1\r\nHost: x\r\n\r\n", "GET", 400),
        (b"BREW /v2 /health HTTP/1.1\r\nHost: x\r\n\r\n", "other", 400),
        (CHUNKED_HEAD + b"zz\r\n", "POST", 400),
        (CHUNKED_HEAD + b"FFFFFFFFFFFFFFFFFFFF\r\n", "POST", 413),
        (b"GET /?" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "GET", 414),
        (b"DELETE / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", "DELETE", 431),
        (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n".encode(), "POST", 501),
    ],
    ids=["400 head", "400 head, unknown method", "400 chunk line", "413", "414", "431", "501"],
)
def test_each_refusal_is_counted_once_under_fixed_labels(server, data, method, status):
    """Exactly one request and one error more, under route "(refused)": a chunked body refused after the app had
    its head is not counted again by the app (as 499, a client that went away) once the connection ends."""
    before = counter_samples(server.url)
    disconnects = server.log().count("client disconnected")
    head, _ = answer_within(server.port, data, seconds=5)
    assert head.startswith(f"HTTP/1.1 {status} "), head
    time.sleep(0.3)  # time for an app that still held the request to unwind and (wrongly) count it
    kind = "client"  # 501 too: this server's choice not to implement the client's Transfer-Encoding, not a fault
    assert changed(before, counter_samples(server.url)) == {
        f'okdpipe_requests_total{{route="(refused)",method="{method}",status="{status}"}}': 1.0,
        f'okdpipe_request_errors_total{{route="(refused)",kind="{kind}"}}': 1.0,
    }
    assert server.log().count("client disconnected") == disconnects


def _hostile_request(rng: random.Random, index: int) -> tuple[bytes, str]:
    """A request with a random method token and path, refused by the HTTP layer in one of four ways."""
    method = "".join(rng.choices(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~", k=rng.randint(1, 12)))
    path = "/" + "".join(rng.choices(string.ascii_letters + string.digits + '/-._~%"\\{}', k=rng.randint(1, 60)))
    line = f"{method} {path}".encode()
    refusal = index % 4
    if refusal == 0:
        return line + b" x HTTP/1.1\r\nHost: x\r\n\r\n", method  # a space inside the target: 400
    if refusal == 1:
        return line + b"\xff HTTP/1.1\r\nHost: x\r\n\r\n", method  # a non-ASCII byte in it: 400
    if refusal == 2:
        return line + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", method  # 414
    return line + b" HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", method  # 431


def test_hostile_refused_requests_leave_metrics_a_fixed_size(own_server):
    """200 refused requests with random methods and paths: their series use only the fixed route and method
    vocabulary, and /metrics grows by at most the (refused) series that vocabulary allows."""
    httpx.get(own_server.url + "/metrics", timeout=5)  # the scrape's own series exist from here on
    before = httpx.get(own_server.url + "/metrics", timeout=5).text
    rng = random.Random(13)
    tokens = []
    for index in range(200):
        data, method = _hostile_request(rng, index)
        tokens.append(method)
        head, _ = answer_within(own_server.port, data, seconds=5)
        assert re.match(r"HTTP/1.1 (400|414|431) ", head), head
    after = httpx.get(own_server.url + "/metrics", timeout=5).text
    refused = [line for line in after.splitlines() if 'route="(refused)"' in line]
    methods = {re.search(r'method="([^"]*)"', line)[1] for line in refused if "method=" in line}
    assert methods <= KNOWN_METHODS | {"other"} and "other" in methods
    assert not [token for token in tokens if len(token) > 3 and token in after]
    statuses = {re.search(r'status="([^"]*)"', line)[1] for line in refused if "status=" in line}
    assert statuses == {"400", "414", "431"}
    latency_lines = 13 + 2  # the (refused) latency series: 12 bounds and +Inf, then _sum and _count
    bound = (len(KNOWN_METHODS) + 1) * len(statuses) + 1 + latency_lines  # requests, errors (all client), latency
    assert len(after.splitlines()) - len(before.splitlines()) <= bound


def _outcome(data: bytes, max_body_bytes: int = MIB):
    """What BoundedHeadConnection makes of `data`: "waiting" for more bytes, or its refusal."""
    connection = BoundedHeadConnection(max_body_bytes)
    connection.receive_data(data)
    try:
        while connection.next_event() is not h11.NEED_DATA:
            pass
    except h11.RemoteProtocolError:
        return connection.refusal
    return "waiting"


@pytest.mark.parametrize(
    "partial",
    [b"", b"5", b"FFFFF", b"5;", b"5;name=value\r", b"5 \t", b"5 \r", b"100000", b"100000\r\n" + b"a" * 1000],
)
def test_a_chunk_size_line_that_can_still_become_valid_and_within_the_limit_waits(partial):
    assert _outcome(CHUNKED_HEAD + partial) == "waiting"


def test_the_declared_total_counts_every_chunk_and_stops_at_the_limit():
    exact = b"".join(b"%x\r\n" % size + b"a" * size + b"\r\n" for size in (10, 20, 30))
    assert _outcome(CHUNKED_HEAD + exact + b"0\r\n\r\n", max_body_bytes=60) == "waiting"  # next request's head
    status, message = _outcome(CHUNKED_HEAD + exact + b"1\r\n", max_body_bytes=60)
    assert (status, message) == (413, f"{TOO_LARGE} 61 bytes, over the 60-byte limit (--max-body-mb)")


@pytest.mark.parametrize("line", [b"5;" + b"e" * 20_000, b"0\r\nX-Trailer: " + b"t" * 20_000], ids=["size", "trailer"])
def test_an_endless_chunk_size_or_trailer_line_is_a_400_about_the_body(line):
    """h11 stops buffering it at 16 KiB with the status of a head too long (431); it is the body that is broken."""
    assert _outcome(CHUNKED_HEAD + line) == (400, BODY_LINE_TOO_LONG)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # a fullwidth digit (UTF-8 EF BC 91) was refused as "illegal chunk header: bytearray(b'\\xef...')"
        ("１\r\n".encode(), CHUNK_SIZE_LINE_ILLEGAL),
        ("１".encode(), CHUNK_SIZE_LINE_ILLEGAL),  # before its CRLF: refused by what has arrived
        (b"\x00\r\n", CHUNK_SIZE_LINE_ILLEGAL),
        (
            b"5\r\nabcdefg\r\n",
            "a chunk holds more data than its chunk-size line declares; end each chunk's data with CRLF right after "
            "the declared size",
        ),
        (
            b"0\r\nno colon in this trailer\r\n\r\n",
            "illegal header line; send each header as Name: value (no space before the colon, no control characters)",
        ),
    ],
    ids=["fullwidth digit", "fullwidth digit, no CRLF yet", "NUL", "chunk longer than declared", "bad trailer"],
)
def test_a_broken_chunked_body_is_refused_in_words_not_byte_reprs(body, message):
    assert _outcome(CHUNKED_HEAD + body) == (400, f"malformed HTTP request: {message}")


TWICE = "malformed HTTP request: header transfer-encoding is given 2 times; give it once"


@pytest.mark.parametrize(
    ("encodings", "message"),
    [
        (["chunked", "chunked"], TWICE),
        (["chunked", "CHUNKED"], TWICE),
        (["gzip", "chunked"], TWICE),  # h11 refused the first as an unknown coding (501) before seeing the second
        (["chunked", "identity"], TWICE),
        (["chunked"] * 3, "malformed HTTP request: header transfer-encoding is given 3 times; give it once"),
        (["chunked, chunked"], "malformed HTTP request: header transfer-encoding lists chunked 2 times; send it once"),
    ],
)
def test_a_repeated_transfer_encoding_is_400_like_any_repeated_body_header(encodings, message):
    names = ["Transfer-Encoding", "transfer-encoding", "TRANSFER-ENCODING"]
    lines = "".join(f"{names[index % 3]}: {value}\r\n" for index, value in enumerate(encodings))
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode()
    assert _outcome(head + b"5\r\nabcde\r\n0\r\n\r\n") == (400, message)


@pytest.mark.parametrize(
    "data",
    [
        CHUNKED_HEAD + b"0\r\n\r\n",  # one Transfer-Encoding: read as a request
        b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Transfer-Encoding: a\r\nX: transfer-encoding: b\r\n\r\n",
        CHUNKED_HEAD[:-2] + b"Transfer-Enc",  # a head still arriving is h11's to wait for
    ],
    ids=["once", "other headers that hold the name", "incomplete head"],
)
def test_a_head_that_does_not_repeat_transfer_encoding_is_not_refused_for_it(data):
    assert _outcome(data) == "waiting"


def test_a_repeated_transfer_encoding_is_answered_400_in_json_over_the_wire(server):
    data = CHUNKED_HEAD[:-2] + b"Transfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n0\r\n\r\n"
    head, body = answer_within(server.port, data, seconds=5)
    assert_refused(head, body, 400, TWICE)
    assert strict_json(body)["error"] == TWICE


NOT_SUPPORTED = "is not supported; send the body with a Content-Length, or with Transfer-Encoding: chunked alone"


@pytest.mark.parametrize("coding", ["gzip", "gzip, chunked", "chunked, gzip", "deflate", "compress", "identity"])
def test_a_transfer_coding_other_than_chunked_is_501_not_supported_not_malformed(coding):
    """RFC 9112 section 6.1: a coding the server does not implement is a 501, and the request is well-formed."""
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {coding}\r\n\r\n".encode()
    assert _outcome(head) == (501, f"Transfer-Encoding '{coding}' {NOT_SUPPORTED}")


def test_an_unsupported_transfer_coding_is_answered_501_in_json_over_the_wire(server):
    data = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".encode()
    head, body = answer_within(server.port, data + b"5\r\nabcde\r\n0\r\n\r\n", seconds=5)
    assert_refused(head, body, 501, NOT_SUPPORTED)
    assert strict_json(body) == {"error": f"Transfer-Encoding 'gzip, chunked' {NOT_SUPPORTED}"}
