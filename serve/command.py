"""`okdpipe serve ARTIFACT_DIR`: the typer command. Only typer, pydantic and the config at module level, so that
`okdpipe --help` never pays for onnxruntime or FastAPI."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from okdpipe.serve.config import ServeConfig
from okdpipe.stage_config import flag, resolve, show


def serve_command(
    artifact_dir: Annotated[Path, typer.Argument(help="Folder written by `okdpipe export` (model.json + .onnx).")],
    host: Annotated[Optional[str], flag(ServeConfig, "host")] = None,
    port: Annotated[Optional[int], flag(ServeConfig, "port")] = None,
    max_batch: Annotated[Optional[int], flag(ServeConfig, "max_batch")] = None,
    max_delay_ms: Annotated[Optional[float], flag(ServeConfig, "max_delay_ms")] = None,
    max_queue: Annotated[Optional[int], flag(ServeConfig, "max_queue")] = None,
    max_body_mb: Annotated[Optional[float], flag(ServeConfig, "max_body_mb")] = None,
    max_inflight_mb: Annotated[Optional[float], flag(ServeConfig, "max_inflight_mb")] = None,
    header_timeout_s: Annotated[Optional[float], flag(ServeConfig, "header_timeout_s")] = None,
    body_timeout_s: Annotated[Optional[float], flag(ServeConfig, "body_timeout_s")] = None,
    threads: Annotated[Optional[int], flag(ServeConfig, "threads")] = None,
    api_key_file: Annotated[Optional[str], flag(ServeConfig, "api_key_file")] = None,
    log_level: Annotated[Optional[str], flag(ServeConfig, "log_level")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML holding these options; flags override it.")] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check the card, the API key, the model against its card and the address, print the config, exit.",
        ),
    ] = False,
) -> None:
    """Serve an exported model over the Open Inference Protocol v2 (KServe/Triton REST) with micro-batching.

    One process serves one model on every core and batches concurrent requests together.

    To scale out, run several `okdpipe serve` processes behind a load balancer,
    one per machine, container or NUMA node (see --threads),
    and scrape each one's /metrics as its own Prometheus target.

    The API key comes from --api-key-file or the OKDPIPE_API_KEY environment variable.
    """
    flags = dict(
        host=host,
        port=port,
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        max_queue=max_queue,
        max_body_mb=max_body_mb,
        max_inflight_mb=max_inflight_mb,
        header_timeout_s=header_timeout_s,
        body_timeout_s=body_timeout_s,
        threads=threads,
        api_key_file=api_key_file,
        log_level=log_level,
    )
    cfg = resolve(ServeConfig, config, flags)
    api_key = check_inputs(cfg, artifact_dir)
    if dry_run:  # what the real start refuses next, in its order: the model against its card, then the address
        from okdpipe.serve.app import load_classifier
        from okdpipe.serve.server import bind_listener

        load_classifier(cfg.settings(artifact_dir, api_key))
        bind_listener(cfg.host, cfg.port).close()
        show(cfg)
        return
    from okdpipe.serve.server import run_server

    settings = cfg.settings(artifact_dir, api_key)
    raise typer.Exit(run_server(settings, cfg.host, cfg.port, cfg.log_level))


def check_inputs(cfg: ServeConfig, artifact_dir: Path) -> str | None:
    """What serve refuses before loading the model (and `--dry-run` too): an unreadable or invalid model card,
    and an API key file that is unreadable or holds no usable token. Returns the key (its file read once)."""
    from okdpipe.contracts.card import read_card
    from okdpipe.serve.server import read_api_key

    read_card(artifact_dir)
    return read_api_key(None if cfg.api_key_file is None else Path(cfg.api_key_file))
