"""Connection rules uvicorn does not have: a socket must deliver a complete request head within
`--header-timeout-s` of connecting (or of its previous response), or it is closed. A head may be at most
MAX_HEAD_BYTES long. And a request h11 refuses (a non-ASCII byte in the target, a malformed header, a head over
the limit) is answered in JSON like every other error, with the status that says why, not uvicorn's text/plain
400 or a reset connection.

uvicorn only times out a keep-alive connection after a response; a socket that connects and sends nothing,
or dribbles its headers a byte at a time (slowloris), would be held open forever. Body deadlines are the
app's (`Admission`, answered 408), since by then there is a request to answer.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

# h11's own default: room for any real client's headers (an API key is at most 4 KiB), and bounded so a client
# cannot make the server buffer an endless head.
MAX_HEAD_BYTES = 16 * 1024
# After refusing a request, what the client may still send (the rest of a long head) is read and dropped, up to
# this many bytes: closing with unread bytes would reset the connection (see _HeadDeadlineProtocol._linger).
MAX_DISCARD_BYTES = 1024 * 1024
LINE_TOO_LONG = f"request line longer than {MAX_HEAD_BYTES} bytes; shorten the URL (send inputs in a POST body)"
HEAD_TOO_LONG = f"request head longer than {MAX_HEAD_BYTES} bytes; send fewer or shorter headers"


class BoundedHeadConnection(h11.Connection):
    """h11's server side with two gaps closed. h11 holds a head to its size limit only while the head is still
    arriving: one that arrives whole in a single read (up to 256 KiB) is accepted at any size; here every head is
    measured. And uvicorn drops h11's error before it calls send_400_response; here `refusal` keeps the status and
    message to answer with."""

    def __init__(self) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.refusal: tuple[int, str] | None = None

    def next_event(self):
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as error:
            self.refusal = self._h11_refusal(error)
            raise
        if isinstance(event, h11.Request):
            self.refusal = oversized_head(event) or ambiguous_framing(event)
            if self.refusal is not None:
                raise h11.RemoteProtocolError(self.refusal[1], self.refusal[0])
        return event

    def _h11_refusal(self, error: h11.RemoteProtocolError) -> tuple[int, str]:
        """h11's suggested status: 400 (malformed), 501 (a Transfer-Encoding other than chunked), or 431 when its
        buffer outgrew the limit before the head ended; that is a 414 when not even the request line ended."""
        if error.error_status_hint == 431:
            return (431, HEAD_TOO_LONG) if b"\n" in self.trailing_data[0] else (414, LINE_TOO_LONG)
        return error.error_status_hint, f"malformed HTTP request: {str(error)[:200]}"


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


class _HeadDeadlineProtocol(H11Protocol):
    head_timeout_s: float = 10.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conn = BoundedHeadConnection()
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
        suggests with the JSON body {"error": ...} every other error has, then the connection closes."""
        status, message = self.conn.refusal
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


def guarded_h11_protocol(head_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with a deadline of `head_timeout_s` seconds on each request head."""
    return type("GuardedH11Protocol", (_HeadDeadlineProtocol,), {"head_timeout_s": head_timeout_s})
