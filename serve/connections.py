"""Connection deadlines uvicorn does not have: a socket must deliver a complete request head within
`--header-timeout-s` of connecting (or of its previous response), or it is closed. And a request h11 cannot
parse (a non-ASCII byte in the target, a malformed header) is answered in JSON like every other error, not with
uvicorn's text/plain 400.

uvicorn only times out a keep-alive connection after a response; a socket that connects and sends nothing,
or dribbles its headers a byte at a time (slowloris), would be held open forever. Body deadlines are the
app's (`Admission`, answered 408), since by then there is a request to answer.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class _HeadDeadlineProtocol(H11Protocol):
    head_timeout_s: float = 10.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
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
        """uvicorn's 400 for an unparseable request, with the JSON body {"error": ...} every other error has."""
        body = json.dumps({"error": f"malformed HTTP request: {msg}"}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

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
