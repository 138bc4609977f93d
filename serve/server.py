"""Running the app under uvicorn: JSON logging, the API key, binding, connection deadlines, and graceful shutdown
with exit status 0.

One process per server: onnxruntime already spreads one model call over every core, and the micro-batcher
only batches requests that reach the same process. To scale out, run several `okdpipe serve` processes (one
per machine or container, or per NUMA node with --threads) behind a load balancer and scrape each one's
/metrics as its own Prometheus target.

Shutdown: on SIGTERM/SIGINT uvicorn stops accepting connections, lets in-flight requests finish (each
connection closes after its current response), then runs the lifespan shutdown that stops the batcher.
Readiness turns false as soon as the signal arrives so load balancers stop routing here during the drain.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import uvicorn

from okdpipe.config import read_text_file
from okdpipe.errors import OkdpipeError
from okdpipe.serve.app import ServeSettings, ServingState, create_app
from okdpipe.serve.connections import guarded_h11_protocol

API_KEY_ENV = "OKDPIPE_API_KEY"
MAX_API_KEY_BYTES = 4096
GRACEFUL_SHUTDOWN_S = 30
BACKLOG = 2048
_SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line; access-log records already are JSON and pass through untouched."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "okdpipe.serve.access":
            return record.getMessage()
        timestamp = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        entry = {
            "ts": timestamp,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str) -> None:
    """Every log line is one JSON object: okdpipe's and uvicorn's loggers at `level`, and the root logger (asyncio,
    warnings, any library) at warning, so nothing reaches stderr as a bare traceback."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    for name in ("okdpipe.serve", "uvicorn.error"):
        named = logging.getLogger(name)
        named.handlers = [handler]
        named.setLevel(level.upper())
        named.propagate = False
    logging.getLogger().handlers = [handler]
    logging.getLogger().setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))
    logging.captureWarnings(True)


def read_api_key(path: Path | None, environment: Mapping[str, str] = os.environ) -> str | None:
    """The bearer token from `--api-key-file` or the OKDPIPE_API_KEY variable (not both); None when neither."""
    from_environment = environment.get(API_KEY_ENV)
    if path is not None and from_environment is not None:
        raise OkdpipeError(f"both --api-key-file and {API_KEY_ENV} are set; keep one")
    if path is not None:
        return _checked_key(_read_key_file(Path(path)), f"--api-key-file {path}")
    if from_environment is not None:
        return _checked_key(from_environment, API_KEY_ENV)
    return None


def _read_key_file(path: Path) -> str:
    return read_text_file(path, "--api-key-file", MAX_API_KEY_BYTES)


def _checked_key(text: str, source: str) -> str:
    key = text.strip()
    if not key or not key.isascii() or not key.isprintable() or len(key.split()) != 1:
        raise OkdpipeError(f"{source} must hold one non-empty token of printable ASCII without spaces")
    return key


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server that reports not-ready the moment a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, state: ServingState):
        super().__init__(config)
        self.serving_state = state

    def handle_exit(self, sig: int, frame) -> None:
        self.serving_state.ready = False
        super().handle_exit(sig, frame)


def run_server(settings: ServeSettings, host: str, port: int, log_level: str) -> int:
    """Serve until SIGTERM/SIGINT; returns 0 after a graceful shutdown. Artifact problems and a port that cannot
    be bound raise OkdpipeError before anything is served."""
    configure_logging(log_level)
    app = create_app(settings)
    listener = bind_listener(host, port)
    _warn_if_exposed(host, settings.api_key)  # once bound: a host that does not resolve exposes nothing
    config = uvicorn.Config(
        app,
        log_config=None,
        log_level=log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        server_header=False,
        http=guarded_h11_protocol(settings.header_timeout_s, settings.max_body_bytes, app.state.serving.metrics),
    )
    server = _DrainingServer(config, app.state.serving)
    with listener:
        _run_with_quiet_signals(server, listener)
    if not server.started:
        raise OkdpipeError(f"could not start serving on {host}:{port} (see the log above)")
    return 0


def bind_listener(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is a one-line error, not uvicorn's exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=BACKLOG)
    except OSError as error:
        if error.errno is not None and error.errno < 0:  # a resolver's code (socket.EAI_*), unknown to os.strerror
            reason = str(error.strerror).split(" (while")[0]
            raise OkdpipeError(
                f"--host {host}: not a name this machine can resolve ({reason}); give an address such as "
                "127.0.0.1 or a known host name"
            ) from None
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise OkdpipeError(f"cannot listen on {host}:{port} ({reason}); pick a free --port or another --host") from None


def _warn_if_exposed(host: str, api_key: str | None) -> None:
    if host in LOOPBACK_HOSTS:
        return
    exposure = "with bearer-token auth" if api_key else f"WITHOUT authentication (see --api-key-file, {API_KEY_ENV})"
    logging.getLogger("okdpipe.serve").warning(
        "binding %s: reachable from other machines, %s, over plain HTTP (put TLS in front)", host, exposure
    )


def _run_with_quiet_signals(server: uvicorn.Server, listener: socket.socket) -> None:
    """uvicorn re-raises the shutdown signal after draining so the default handler would kill us with it
    (exit 143/130); installing no-op handlers first makes a graceful stop exit 0."""
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in _SHUTDOWN_SIGNALS}
    try:
        server.run(sockets=[listener])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
