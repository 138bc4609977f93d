"""`okdpipe serve ARTIFACT_DIR`: the typer command. Only typer/pathlib/typing at module level, so that
`okdpipe --help` never pays for onnxruntime or FastAPI."""

from pathlib import Path
from typing import Annotated, Optional

import typer

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def serve_command(
    artifact_dir: Annotated[Path, typer.Argument(help="Folder written by `okdpipe export` (model.json + .onnx).")],
    host: Annotated[str, typer.Option(help="Interface to bind; loopback unless you mean to expose it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Server processes, each with its own model copy.")] = 1,
    max_batch: Annotated[int, typer.Option(min=1, help="Most images per onnxruntime call.")] = 32,
    max_delay_ms: Annotated[float, typer.Option(min=0.0, help="Longest wait for a batch to fill, in ms.")] = 2.0,
    max_queue: Annotated[int, typer.Option(min=1, help="Most images waiting; beyond it 503 + Retry-After.")] = 256,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="Largest request body in MiB (else 413).")] = 16.0,
    threads: Annotated[Optional[int], typer.Option(min=1, help="onnxruntime intra-op threads (default: all cores).")] = None,
    api_key_file: Annotated[Optional[Path], typer.Option(help="File holding a bearer token required on every "
                                                          "route except /v2/health/*.")] = None,
    log_level: Annotated[str, typer.Option(help="critical, error, warning, info or debug.")] = "info",
) -> None:
    """Serve an exported model over the Open Inference Protocol v2 (KServe/Triton REST) with micro-batching."""
    from okdpipe.errors import OkdpipeError
    from okdpipe.serve.app import ServeSettings
    from okdpipe.serve.server import read_api_key, run_server

    if log_level.lower() not in LOG_LEVELS:
        raise OkdpipeError(f"--log-level {log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    if max_batch > max_queue:
        raise OkdpipeError(f"--max-batch {max_batch} exceeds --max-queue {max_queue}; raise --max-queue")
    settings = ServeSettings(
        artifact_dir=artifact_dir,
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        max_queue=max_queue,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        intra_op_threads=threads,
        api_key=read_api_key(api_key_file),
    )
    raise typer.Exit(run_server(settings, host, port, workers, log_level, api_key_file))
