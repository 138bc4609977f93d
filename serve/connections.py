"""Connection rules uvicorn does not have: a socket must deliver a complete request head within
`--header-timeout-s` of connecting (or of its previous response), or it is closed. A head may be at most
MAX_HEAD_BYTES long. And a request h11 refuses (a non-ASCII byte in the target, a malformed header, a head over
the limit) is answered in JSON like every other error, with the status that says why, not uvicorn's text/plain
400 or a reset connection.

uvicorn only times out a keep-alive connection after a response; a socket that connects and sends nothing,
or dribbles its headers a byte at a time (slowloris), would be held open forever. Body deadlines are the
app's (`Admission`, answered 408), since by then there is a request to answer.

A chunked body is refused here (413) as soon as its chunk-size lines declare more than `--max-body-mb`, and a
chunk-size line is refused (400) as soon as what has arrived of it cannot start a valid one: the app only sees
the chunks' bytes, so it would wait for bytes a client announced and never sends (then answer 408, late).

A chunked body ends for the app at its last chunk: the trailer section after it (fields this server ignores) is
read before the next request, but never holds the answer.

Every request refused here is counted in /metrics under the route "(refused)"; it never reaches a route.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from http import HTTPStatus

import h11
from h11._readers import ChunkedReader, maybe_read_from_IDLE_client
from h11._receivebuffer import ReceiveBuffer
from uvicorn.protocols.http.h11_impl import H11Protocol

from okdpipe.serve.metrics import REFUSED_ROUTE, REFUSED_SCOPE_KEY, ServerMetrics
from okdpipe.serve.protocol import coding_not_supported, given_more_than_once

# h11's own default: room for any real client's headers (an API key is at most 4 KiB), and bounded so a client
# cannot make the server buffer an endless head.
MAX_HEAD_BYTES = 16 * 1024
# After refusing a request, what the client may still send (the rest of a long head) is read and dropped, up to
# this many bytes: closing with unread bytes would reset the connection (see _GuardedProtocol._linger).
MAX_DISCARD_BYTES = 1024 * 1024
LINE_TOO_LONG = f"request line longer than {MAX_HEAD_BYTES} bytes; shorten the URL (send inputs in a POST body)"
HEAD_TOO_LONG = f"request head longer than {MAX_HEAD_BYTES} bytes; send fewer or shorter headers"
BODY_LINE_TOO_LONG = f"malformed HTTP request: a chunk-size or trailer line longer than {MAX_HEAD_BYTES} bytes"
CHUNK_SIZE_LINE_ILLEGAL = (
    "illegal chunk-size line; send 1 to 20 hexadecimal digits (0-9, a-f), an optional ;extension, then CRLF"
)
# h11 quotes the bytes it refuses as Python reprs (bytearray(b'\xef\xbc\x91')); the client is told in words what a
# valid one looks like instead, by the start of h11's message.
H11_MESSAGES_IN_WORDS = {
    "illegal request line": "illegal request line; send METHOD TARGET HTTP/1.1 with single spaces, the target "
    "without spaces or raw non-ASCII bytes (percent-encode them)",
    "illegal header line": "illegal header line; send each header as Name: value (no space before the colon, no "
    "control characters)",
    "illegal chunk header": CHUNK_SIZE_LINE_ILLEGAL,
    "malformed chunk footer": "a chunk holds more data than its chunk-size line declares; end each chunk's data "
    "with CRLF right after the declared size",
}
# The blank line that ends a request head (h11's own pattern), and a Transfer-Encoding line of one.
_HEAD_END = re.compile(rb"\n\r?\n")
_TRANSFER_ENCODING_LINE = re.compile(rb"^transfer-encoding:([^\r\n]*)", re.IGNORECASE | re.MULTILINE)
# What of a chunk-size line may have arrived before its CRLF: h11's grammar (1 to 20 hex digits, then a
# ";extension" or blanks) cut anywhere. Anything else can never become a valid line.
_PARTIAL_CHUNK_LINE = re.compile(rb"(?P<size>[0-9A-Fa-f]{1,20})(;[^\n]*|[ \t]*\r?)")
# A refused request's method label is read from its first bytes (h11 has consumed a head it refuses):
# enough for the longest method the metrics know, OPTIONS, and the space after it.
METHOD_PEEK_BYTES = 8


class BoundedHeadConnection(h11.Connection):
    """h11's server side with three gaps closed. h11 holds a head to its size limit only while the head is still
    arriving: one that arrives whole in a single read (up to 256 KiB) is accepted at any size; here every head is
    measured. A chunked body is held to `max_body_bytes` by what its chunk-size lines declare (`LimitedChunkReader`).
    And uvicorn drops h11's error before it calls send_400_response; here `refusal` keeps the status and
    message to answer with, and `request_start` the first bytes of the request, for the method label."""

    def __init__(self, max_body_bytes: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.max_body_bytes = max_body_bytes
        self.refusal: tuple[int, str] | None = None
        self.request_start = b""
        self.request_started_at = time.perf_counter()

    def next_event(self):
        self._note_request_start()
        reading_body = self.their_state is h11.SEND_BODY
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as error:
            self.refusal = self._h11_refusal(error, reading_body)
            raise
        if isinstance(event, h11.Request):
            self.refusal = oversized_head(event) or ambiguous_framing(event)
            if self.refusal is not None:
                raise h11.RemoteProtocolError(self.refusal[1], self.refusal[0])
        return event

    @property
    def awaiting_trailer_section(self) -> bool:
        """True once a chunked body's last chunk (size 0) is read and only its trailer section is still to come."""
        reader = self._reader
        return self.their_state is h11.SEND_BODY and isinstance(reader, LimitedChunkReader) and reader._reading_trailer

    def start_next_cycle(self) -> None:
        super().start_next_cycle()
        self.request_start = b""

    def _note_request_start(self) -> None:
        """Keep the first METHOD_PEEK_BYTES of a request whose head has not been parsed yet (and when it began)."""
        if self.their_state is not h11.IDLE or len(self.request_start) >= METHOD_PEEK_BYTES:
            return
        if not self.request_start:
            self.request_started_at = time.perf_counter()
        self.request_start = self.trailing_data[0][:METHOD_PEEK_BYTES]

    def _get_io_object(self, role, event, io_dict):
        """h11's reader or writer for the new state, with its chunked-body reader swapped for the limited one and its
        head reader for one that refuses a Transfer-Encoding it cannot read in words of its own."""
        io_object = super()._get_io_object(role, event, io_dict)
        if type(io_object) is ChunkedReader:
            return LimitedChunkReader(self.max_body_bytes)
        if io_object is maybe_read_from_IDLE_client:
            return read_request_head
        return io_object

    def _h11_refusal(self, error: h11.RemoteProtocolError, reading_body: bool) -> tuple[int, str]:
        """h11's suggested status: 400 (malformed), 413 (a chunked body declared too large), 501 (a
        Transfer-Encoding other than chunked alone, RFC 9112 section 6.1), or 431 when its buffer outgrew the limit
        before an event ended: in a head that is a 431 (a 414 when not even the request line ended), in a chunked
        body a 400."""
        status = error.error_status_hint
        if status in (413, 501):  # worded here already: the request is well-formed, only too large or unsupported
            return status, str(error)
        if status == 431 and reading_body:
            return 400, BODY_LINE_TOO_LONG
        if status == 431:
            return (431, HEAD_TOO_LONG) if b"\n" in self.trailing_data[0] else (414, LINE_TOO_LONG)
        return status, in_words(str(error))


def in_words(h11_message: str) -> str:
    """What to tell the client for h11's `h11_message`: the words of H11_MESSAGES_IN_WORDS for one that quotes the
    refused bytes, else h11's own (a few words, such as 'conflicting Content-Length headers') or this module's."""
    words = next((words for start, words in H11_MESSAGES_IN_WORDS.items() if h11_message.startswith(start)), None)
    return f"malformed HTTP request: {words or h11_message[:200]}"


def read_request_head(buf: ReceiveBuffer) -> h11.Request | None:
    """h11's request-head reader, refusing first (400) a complete head in `buf` that repeats Transfer-Encoding, and
    saying (501) that a Transfer-Encoding h11 does not implement is unsupported, where h11 calls it malformed."""
    encoding_lines = transfer_encodings(bytes(buf))
    problem = repeated_transfer_encoding(encoding_lines)
    if problem is not None:
        raise h11.LocalProtocolError(problem, error_status_hint=400)
    try:
        return maybe_read_from_IDLE_client(buf)
    except h11.LocalProtocolError as error:
        if error.error_status_hint != 501 or not encoding_lines:
            raise
        raise h11.LocalProtocolError(transfer_coding_not_supported(encoding_lines[0]), error_status_hint=501) from None


def transfer_encodings(buffered: bytes) -> list[bytes]:
    """The value of each Transfer-Encoding line of the complete request head at the start of `buffered` (none while
    the head is still arriving)."""
    end = _HEAD_END.search(buffered)
    return [] if end is None else _TRANSFER_ENCODING_LINE.findall(buffered, 0, end.start())


def transfer_coding_not_supported(value: bytes) -> str:
    """Why a Transfer-Encoding other than `chunked` alone (the one coding h11 reads, RFC 9112 section 6.1: a 501)
    cannot be read, and what can."""
    supported = "send the body with a Content-Length, or with Transfer-Encoding: chunked alone"
    return coding_not_supported("Transfer-Encoding", value.decode("latin-1"), supported)


def repeated_transfer_encoding(values: list[bytes]) -> str | None:
    """Why the Transfer-Encoding line `values` of a request head give it more than once, else None.
    h11 answers it 501 (Not Implemented), as if the coding were unknown; like any other header that decides how the
    body is read given twice (middleware.SINGLE_HEADERS), it is a 400. `chunked, chunked` on one line says the same
    (RFC 9110 section 5.3), and a body is chunked once only (RFC 9112 section 7)."""
    if len(values) > 1:
        return given_more_than_once("header transfer-encoding", len(values))
    codings = [coding.strip().lower() for coding in values[0].split(b",")] if values else []
    if codings.count(b"chunked") > 1:
        return f"header transfer-encoding lists chunked {codings.count(b'chunked')} times; send it once"
    return None


class LimitedChunkReader(ChunkedReader):
    """h11's chunked-body reader, refusing the body from what its chunk-size lines declare rather than from the
    bytes that follow them: once the sizes declared so far exceed `max_body_bytes` (413), or once the start of a
    chunk-size line can no longer become a valid one (400). A client that declares a huge chunk, or sends a broken
    size line without its CRLF, and then waits, is answered at once instead of hanging until the body timeout.

    It reads h11's private chunk state (`_bytes_in_chunk` and friends), so an h11 that renames them fails the serve
    tests that send chunked bodies rather than serving without the limit."""

    def __init__(self, max_body_bytes: int) -> None:
        super().__init__()
        self.max_body_bytes = max_body_bytes
        self.delivered_bytes = 0  # chunk bytes already handed on as Data events

    def __call__(self, buf: ReceiveBuffer):
        event = super().__call__(buf)
        if isinstance(event, h11.Data):
            self.delivered_bytes += len(event.data)
        self._check_declared(self._bytes_in_chunk)
        if event is None and self._at_size_line() and buf:
            self._check_partial_size_line(bytes(buf))
        return event

    def _at_size_line(self) -> bool:
        return self._bytes_in_chunk == 0 and not self._bytes_to_discard and not self._reading_trailer

    def _check_partial_size_line(self, line: bytes) -> None:
        """`line` is what has arrived of the next chunk-size line (no CRLF yet): refuse it if it cannot become a
        valid one, or if its digits so far (more can only add to them) already declare too much."""
        match = _PARTIAL_CHUNK_LINE.fullmatch(line)
        if match is None:
            raise h11.RemoteProtocolError(CHUNK_SIZE_LINE_ILLEGAL, error_status_hint=400)
        self._check_declared(int(match["size"], 16))

    def _check_declared(self, pending_bytes: int) -> None:
        declared = self.delivered_bytes + pending_bytes
        if declared > self.max_body_bytes:
            raise h11.RemoteProtocolError(
                f"chunked request body declares at least {declared} bytes, over the {self.max_body_bytes}-byte "
                "limit (--max-body-mb)",
                error_status_hint=413,
            )


def oversized_head(request: h11.Request) -> tuple[int, str] | None:
    """(414, why) for a request line over MAX_HEAD_BYTES, (431, why) for a head over it, else None. Sizes are of
    the head as h11 parsed it (without optional whitespace), so never more than what the client sent."""
    line = len(request.method) + len(request.target) + len(b"  HTTP/1.1\r\n")
    if line > MAX_HEAD_BYTES:
        return 414, LINE_TOO_LONG
    head = line + sum(len(name) + len(value) + len(b": \r\n") for name, value in request.headers) + len(b"\r\n")
    return (431, HEAD_TOO_LONG) if head > MAX_HEAD_BYTES else None


def ambiguous_framing(request: h11.Request) -> tuple[int, str] | None:
    """(400, why) for a head giving both Content-Length and Transfer-Encoding: h11 follows the chunked encoding
    and waits for chunks the client never meant to send, and a proxy in front may frame the body the other way
    (request smuggling). RFC 9112 section 6.1 lets a server refuse it; this one does at once."""
    names = {name.lower() for name, _ in request.headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        return 400, "malformed HTTP request: both Content-Length and Transfer-Encoding are given; send one"
    return None


class _GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with the connection rules above; guarded_h11_protocol sets the class attributes."""

    head_timeout_s: float
    max_body_bytes: int
    metrics: ServerMetrics

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conn = BoundedHeadConnection(self.max_body_bytes)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._discarded_bytes: int | None = None  # counts what is dropped once a request is refused

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        if self._discarded_bytes is None:
            super().data_received(data)
            return
        self._discarded_bytes += len(data)
        if self._discarded_bytes > MAX_DISCARD_BYTES:
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        self._end_body_at_last_chunk()

    def _end_body_at_last_chunk(self) -> None:
        """Tell the app a chunked body has ended at its last chunk, not after the trailer section: trailer fields
        change nothing this server reads, and a section still arriving (or never ended) must not hold the answer
        until the body timeout (408). h11 still reads the section before the next request; a connection whose
        section never ends is closed like any answered request still sending (_close_if_stalled)."""
        cycle = self.cycle
        if cycle is None or not cycle.more_body or self.transport.is_closing():
            return
        if self.conn.awaiting_trailer_section:
            cycle.more_body = False
            cycle.message_event.set()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next head gets a deadline of its own: the one armed at connect may have fired while this request was
        # in flight, and uvicorn's keep-alive timeout ends at the first byte, so a dribbling socket stays forever.
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(self.head_timeout_s, self._close_if_stalled)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 refused (named for the one status uvicorn sends): here the status h11
        suggests with the JSON body {"error": ...} every other error has, counted in /metrics, then the connection
        closes. When the app has already answered the request (a 404 sent before its body was read), the body's
        error only closes the connection: a second answer to one request is no HTTP, and h11 would raise."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.transport.close()
            return
        status, message = self.conn.refusal
        if self.cycle is not None and not self.cycle.response_started:  # the app has this request, unanswered
            self._withdraw_request_from_app()
        self._count_refusal(status)
        body = json.dumps({"error": message}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        response = h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase)
        for event in (response, h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self._linger()

    def _withdraw_request_from_app(self) -> None:
        """The app has this request (its head was fine) and waits for its body, which was refused: it sees the
        client gone at once (and lets the body's bytes go), and the scope flag tells the middleware that this
        request is counted here, so it counts it neither twice nor as a client that went away."""
        self.cycle.scope[REFUSED_SCOPE_KEY] = True
        self.cycle.disconnected = True
        self.cycle.message_event.set()

    def _count_refusal(self, status: int) -> None:
        """One request under the fixed route "(refused)"; the method is read from the request's first bytes and
        counted only if it is one the metrics know (else "other"), so no client can add a series."""
        method = self.conn.request_start.partition(b" ")[0].decode("latin-1")
        seconds = time.perf_counter() - self.conn.request_started_at
        self.metrics.observe_request(REFUSED_ROUTE, method, status, seconds)

    def _linger(self) -> None:
        """Close once the client has stopped sending, not at once: closing a socket that still has unread bytes
        makes the kernel reset the connection, and a reset can destroy the answer before the client reads it (a
        client refused halfway through a 200 KB head would get nothing). So: send EOF, drop what still arrives,
        and close when the client closes (eof_received), after MAX_DISCARD_BYTES, or after the head timeout."""
        self.transport.write_eof()
        self._discarded_bytes = 0
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(self.head_timeout_s, self.transport.close)

    def _close_if_stalled(self) -> None:
        """Close quietly, as uvicorn's keep-alive timeout does, when the client still has not sent a request head
        (h11's IDLE) or is still sending the body of a request already answered."""
        waiting_for_head = self.conn.their_state is h11.IDLE
        answered_but_sending = self.conn.our_state is h11.DONE and self.conn.their_state is h11.SEND_BODY
        if (waiting_for_head or answered_but_sending) and not self.transport.is_closing():
            self.transport.close()


def guarded_h11_protocol(head_timeout_s: float, max_body_bytes: int, metrics: ServerMetrics) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with a deadline of `head_timeout_s` seconds on each request head, chunked bodies
    held to `max_body_bytes` as they are declared, and every refusal counted in `metrics`."""
    attributes = {"head_timeout_s": head_timeout_s, "max_body_bytes": max_body_bytes, "metrics": metrics}
    return type("GuardedH11Protocol", (_GuardedProtocol,), attributes)
