"""Running the app under uvicorn: logging, graceful shutdown with exit status 0, and multi-process workers.

Shutdown: on SIGTERM/SIGINT uvicorn stops accepting connections, lets in-flight requests finish (each
connection closes after its current response), then runs the lifespan shutdown that stops the batcher.
Readiness turns false as soon as the signal arrives so load balancers stop routing here during the drain.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import uvicorn

from okdpipe.errors import OkdpipeError
from okdpipe.serve.app import ServeSettings, ServingState, create_app, load_classifier

SETTINGS_ENV = "OKDPIPE_SERVE_SETTINGS"
GRACEFUL_SHUTDOWN_S = 30
_SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line; access-log records already are JSON and pass through untouched."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "okdpipe.serve.access":
            return record.getMessage()
        timestamp = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        entry = {"ts": timestamp, "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    for name in ("okdpipe.serve", "uvicorn.error"):
        named = logging.getLogger(name)
        named.handlers = [handler]
        named.setLevel(level.upper())
        named.propagate = False


def read_api_key(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except OSError as error:
        raise OkdpipeError(f"cannot read --api-key-file {path} ({error.strerror}); pass a readable file") from None
    if not key or len(key.split()) != 1:
        raise OkdpipeError(f"--api-key-file {path} must hold one non-empty token without spaces")
    return key


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server that reports not-ready the moment a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, state: ServingState):
        super().__init__(config)
        self.serving_state = state

    def handle_exit(self, sig: int, frame) -> None:
        self.serving_state.ready = False
        super().handle_exit(sig, frame)


def run_server(settings: ServeSettings, host: str, port: int, workers: int, log_level: str,
               api_key_file: Path | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns 0 after a graceful shutdown. Artifact problems raise OkdpipeError
    before the port is bound."""
    configure_logging(log_level)
    _warn_if_exposed(host, settings.api_key)
    if workers > 1:
        return _run_workers(settings, host, port, workers, log_level, api_key_file)
    app = create_app(settings)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, log_level=log_level.lower(),
                            access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, server_header=False)
    server = _DrainingServer(config, app.state.serving)
    _run_with_quiet_signals(server)
    if not server.started:
        raise OkdpipeError(f"could not start serving on {host}:{port} (see the log above); pick a free --port")
    return 0


def _warn_if_exposed(host: str, api_key: str | None) -> None:
    if host in LOOPBACK_HOSTS:
        return
    exposure = "with bearer-token auth" if api_key else "WITHOUT authentication (see --api-key-file)"
    logging.getLogger("okdpipe.serve").warning(
        "binding %s: reachable from other machines, %s, over plain HTTP (put TLS in front)", host, exposure)


def _run_with_quiet_signals(server: uvicorn.Server) -> None:
    """uvicorn re-raises the shutdown signal after draining so the default handler would kill us with it
    (exit 143/130); installing no-op handlers first makes a graceful stop exit 0."""
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in _SHUTDOWN_SIGNALS}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_workers(settings: ServeSettings, host: str, port: int, workers: int, log_level: str,
                 api_key_file: Path | None) -> int:
    """N processes, each with its own model and batcher (and its own /metrics, per process)."""
    load_classifier(settings)  # fail fast with a clean OkdpipeError before any worker starts
    environment = {**asdict(settings), "artifact_dir": str(settings.artifact_dir), "api_key": None,
                   "api_key_file": str(api_key_file) if api_key_file else None, "log_level": log_level}
    os.environ[SETTINGS_ENV] = json.dumps(environment)
    uvicorn.run("okdpipe.serve.server:app_from_environment", factory=True, host=host, port=port,
                workers=workers, log_config=None, log_level=log_level.lower(), access_log=False,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, server_header=False)
    return 0


def app_from_environment():
    """uvicorn worker factory: rebuilds the settings `_run_workers` left in the environment."""
    values = json.loads(os.environ[SETTINGS_ENV])
    configure_logging(values.pop("log_level"))
    api_key_file = values.pop("api_key_file")
    values["artifact_dir"] = Path(values["artifact_dir"])
    values["api_key"] = read_api_key(Path(api_key_file) if api_key_file else None)
    return create_app(ServeSettings(**values))
