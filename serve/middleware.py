"""One ASGI middleware around every request: bearer-token auth, metrics, a JSON access-log line, and a JSON 500
for anything unexpected (the traceback goes to the log, never to the client).

Pure ASGI rather than Starlette's BaseHTTPMiddleware: that one buffers responses through extra tasks, which
costs latency on the hot /infer path.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from starlette.requests import ClientDisconnect

from okdpipe.serve.metrics import REFUSED_SCOPE_KEY, ServerMetrics
from okdpipe.serve.protocol import coding_not_supported, given_more_than_once, plain_int

access_logger = logging.getLogger("okdpipe.serve.access")
error_logger = logging.getLogger("okdpipe.serve")

# Liveness/readiness probes (kubelet, load balancers) carry no credentials, so they stay open.
OPEN_PATH_PREFIX = "/v2/health/"
# The one content coding a body may have; RFC 9110 section 15.5.16: a 415 for a content coding names the accepted
# ones in Accept-Encoding.
ACCEPTED_CONTENT_CODING = "identity"
# Headers that decide how a request is read; each may appear once (h11 itself refuses two Content-Lengths, and
# connections.repeated_transfer_encoding two Transfer-Encodings, before the head is parsed).
SINGLE_HEADERS = ("content-type", "content-encoding", "inference-header-content-length", "authorization")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class _Exchange:
    """What one request/response pair reports once it ends."""

    def __init__(self, scope: Scope):
        self.started = time.perf_counter()
        self.status = 0
        self.response_bytes = 0
        self.headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        self.request_id = self.headers.get("x-request-id") or uuid.uuid4().hex[:16]


class ServingMiddleware:
    def __init__(self, app: Callable, metrics: ServerMetrics, api_key: str | None):
        self.app = app
        self.metrics = metrics
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(scope)
        tracked_send = self._tracking_send(send, exchange)
        try:
            if not self._authorised(scope["path"], exchange.headers.get("authorization", "")):
                await send_json_error(
                    tracked_send, 401, "missing or wrong bearer token", {"www-authenticate": "Bearer"}
                )
            elif problem := header_problem(scope["headers"]):
                status, message = problem
                headers = {"accept-encoding": ACCEPTED_CONTENT_CODING} if status == 415 else None
                await send_json_error(tracked_send, status, message, headers)
            else:
                await self.app(scope, receive, tracked_send)
        except ClientDisconnect:  # the client went away mid-upload: nothing to answer, nothing went wrong here
            if not scope.get(REFUSED_SCOPE_KEY):
                error_logger.info(
                    "client disconnected before sending its whole request (%s %s)", scope["method"], scope["path"]
                )
        except Exception:
            error_logger.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if exchange.status == 0:
                await send_json_error(tracked_send, 500, "internal server error (logged on the server)")
        finally:
            if not scope.get(REFUSED_SCOPE_KEY):  # else the HTTP layer answered and counted it (connections.py)
                self._report(scope, exchange)

    def _authorised(self, path: str, authorization: str) -> bool:
        if self.api_key is None or path.startswith(OPEN_PATH_PREFIX):
            return True
        scheme, _, token = authorization.partition(" ")
        # compare_digest takes time independent of where the strings differ: no timing oracle on the key.
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key)

    @staticmethod
    def _tracking_send(send: Send, exchange: _Exchange) -> Send:
        async def tracked(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", exchange.request_id.encode())]
            elif message["type"] == "http.response.body":
                exchange.response_bytes += len(message.get("body", b""))
            await send(message)

        return tracked

    def _report(self, scope: Scope, exchange: _Exchange) -> None:
        seconds = time.perf_counter() - exchange.started
        route = getattr(scope.get("route"), "path", "unmatched")
        status = exchange.status or 499  # no response started: the client went away first
        self.metrics.observe_request(route, scope["method"], status, seconds)
        client = scope.get("client") or ("", 0)
        access_logger.info(
            json.dumps(
                {
                    "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                    "request_id": exchange.request_id,
                    "client": f"{client[0]}:{client[1]}",
                    "method": scope["method"],
                    "path": scope["path"],
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 3),
                    "request_bytes": _declared_length(exchange.headers),
                    "response_bytes": exchange.response_bytes,
                }
            )
        )


def header_problem(raw_headers: list[tuple[bytes, bytes]]) -> tuple[int, str] | None:
    """A request head that cannot be read one way only: a header that decides how the body is read given twice
    (which copy counts would be a guess), or a body compressed with a Content-Encoding (it would be parsed as the
    raw bytes, and refused with a message about JSON or images that misleads). (status, message) or None."""
    names = [name.decode("latin-1").lower() for name, _ in raw_headers]
    for name in SINGLE_HEADERS:
        if names.count(name) > 1:
            return 400, given_more_than_once(f"header {name}", names.count(name))
    encoding = next((value.decode("latin-1") for key, value in raw_headers if key.lower() == b"content-encoding"), "")
    if encoding.strip().lower() not in ("", ACCEPTED_CONTENT_CODING):
        supported = "send the body uncompressed (no Content-Encoding)"
        return 415, coding_not_supported("Content-Encoding", encoding, supported)
    return None


def _declared_length(headers: dict[str, str]) -> int:
    return plain_int(headers.get("content-length")) or 0


async def send_json_error(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(key.encode(), value.encode()) for key, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
