"""Chunked bodies followed by a trailer section (RFC 9112 section 7.1.2): the body is whole at its last chunk, so
the answer never waits for the trailer fields, which this server reads past and ignores. A connection whose trailer
section ends goes on to its next request."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from test_hostile import INFER, json_infer, open_request, read_response, strict_json

CHUNKED_HEAD = (
    f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
).encode()
NEXT_REQUEST = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"


def chunked_body(images: np.ndarray) -> bytes:
    body = json.dumps(json_infer(images)).encode()
    half = len(body) // 2
    return b"".join(b"%x\r\n" % len(part) + part + b"\r\n" for part in (body[:half], body[half:]))


def assert_answered_with_logits(sock, images: np.ndarray, reference_logits, within: float) -> None:
    started = time.monotonic()
    head, body = read_response(sock, timeout=within)
    assert time.monotonic() - started < within
    assert head.startswith("HTTP/1.1 200 "), head
    logits = strict_json(body.decode())["outputs"][0]
    assert logits["name"] == "logits" and logits["shape"] == [len(images), 10]
    np.testing.assert_allclose(np.array(logits["data"]).reshape(-1, 10), reference_logits(images), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "trailer_section",
    [b"0\r\n\r\n", b"0\r\nX-Checksum: abc\r\n\r\n", b"0\r\nX-A: 1\r\nX-B: 2\r\n\r\n", b"0;ext=1\r\nX-A: 1\n\n"],
    ids=["none", "one field", "two fields", "extension, bare LF"],
)
def test_a_chunked_body_with_a_trailer_section_is_answered_and_the_connection_goes_on(
    server, images, reference_logits, trailer_section
):
    sock = open_request(server.port, CHUNKED_HEAD + chunked_body(images[:2]) + trailer_section + NEXT_REQUEST)
    try:
        assert_answered_with_logits(sock, images[:2], reference_logits, within=5)
        assert read_response(sock)[0].startswith("HTTP/1.1 200 ")
    finally:
        sock.close()


def test_the_answer_does_not_wait_for_a_trailer_section_still_arriving(server, images, reference_logits):
    """The trailer section has not ended (its blank line is late): the body is whole, so the answer comes at once,
    not after the 30 s body timeout (408). Once the section ends, the connection serves its next request."""
    sock = open_request(server.port, CHUNKED_HEAD + chunked_body(images[:1]) + b"0\r\nX-Checksum: abc\r\n")
    try:
        assert_answered_with_logits(sock, images[:1], reference_logits, within=5)
        sock.sendall(b"\r\n" + NEXT_REQUEST)
        assert read_response(sock)[0].startswith("HTTP/1.1 200 ")
    finally:
        sock.close()
