"""Admission by bytes: every request body is counted against one server-wide budget while it is read, parsed
and answered, so memory is bounded by admitted bytes however many clients upload at once.

The queue bounds images waiting for the model; this bounds what comes before: 80 clients each sending 16 MiB
slowly would otherwise hold 80 x 16 MiB in memory. A body declared (Content-Length) larger than what is left
is refused at once with 503 + Retry-After; a chunked body is counted chunk by chunk. A body that does not
arrive within the body timeout is answered 408 (a slow-upload client holds its bytes no longer than that).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request

from okdpipe.serve.protocol import ClientError, plain_int

RETRY_AFTER_S = "1"
_CLOSE = {"connection": "close"}  # the unread rest of the body must not be parsed as a next request


@dataclass
class _Held:
    bytes: int = 0


class Admission:
    def __init__(self, max_body_bytes: int, max_held_bytes: int, body_timeout_s: float):
        self.max_body_bytes = max_body_bytes
        self.max_held_bytes = max_held_bytes
        self.body_timeout_s = body_timeout_s
        self.held_bytes = 0

    @contextlib.asynccontextmanager
    async def body(self, request: Request) -> AsyncIterator[bytes]:
        """The whole body, its bytes held against the budget until the `async with` block ends."""
        held = _Held()
        try:
            yield await self._read(request, held)
        finally:
            self.held_bytes -= held.bytes

    async def _read(self, request: Request, held: _Held) -> bytes:
        # Any length h11 accepts (up to 20 digits): under plain_int's default of 18, a 19- or 20-digit length
        # would count as undeclared and its body be awaited (408 after the body timeout) instead of refused now.
        declared = plain_int(request.headers.get("content-length"), max_digits=20)
        if declared is not None and declared > self.max_body_bytes:
            raise self._too_large(f"request body of {declared} bytes")
        self._hold(held, declared or 0)
        chunks, total = [], 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                async for chunk in request.stream():
                    total += len(chunk)
                    if total > self.max_body_bytes:
                        raise self._too_large("request body")
                    self._hold(held, total)
                    chunks.append(chunk)
        except TimeoutError:
            raise ClientError(
                408,
                f"request body not received within {self.body_timeout_s:g} s "
                "(--body-timeout-s); send it faster or in a smaller request",
                _CLOSE,
            ) from None
        return b"".join(chunks)

    def _hold(self, held: _Held, total: int) -> None:
        """Raise this request's share of the budget to `total` bytes, or refuse it (503) if that is not free."""
        extra = total - held.bytes
        if extra <= 0:
            return
        if self.held_bytes + extra > self.max_held_bytes:
            raise ClientError(
                503,
                f"server is at capacity ({self.held_bytes} request bytes in flight, limit "
                f"{self.max_held_bytes}, --max-inflight-mb); retry shortly",
                {"retry-after": RETRY_AFTER_S, **_CLOSE},
            )
        self.held_bytes += extra
        held.bytes = total

    def _too_large(self, what: str) -> ClientError:
        return ClientError(413, f"{what} exceeds the {self.max_body_bytes}-byte limit (--max-body-mb)", _CLOSE)
