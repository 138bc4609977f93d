"""ServeConfig: every option of `okdpipe serve`, declared once. The command's flags, `--config FILE` and
`okdpipe.api.serve_app` compile into it; values are range-checked here (NaN and inf refused), so every bad
option is one `error:` line before the model is loaded."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from okdpipe.stage_config import StageConfig

MIB = 1024 * 1024


class ServeConfig(StageConfig):
    host: str = Field("127.0.0.1", min_length=1, description="interface to bind; loopback unless you mean to expose it")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    max_batch: int = Field(32, ge=1, le=4096, description="most images per onnxruntime call")
    max_delay_ms: float = Field(2.0, ge=0, le=10_000, description="longest wait for a batch to fill, in ms")
    max_queue: int = Field(256, ge=1, le=1_000_000, description="most images waiting; beyond it 503 + Retry-After")
    max_body_mb: float = Field(16.0, ge=0.001, le=4096, description="largest request body in MiB (else 413)")
    max_inflight_mb: float = Field(
        64.0,
        ge=0.001,
        le=65536,
        description="most request-body MiB held at once over all requests; beyond it 503 + Retry-After",
    )
    header_timeout_s: float = Field(
        10.0,
        ge=0.01,
        le=3600,
        description="seconds a connection may take to send a request's headers (idle sockets closed)",
    )
    body_timeout_s: float = Field(
        30.0, ge=0.01, le=3600, description="seconds a request may take to send its body (else 408)"
    )
    threads: Optional[int] = Field(None, ge=1, le=1024, description="onnxruntime intra-op threads (default: all cores)")
    api_key_file: Optional[str] = Field(
        None,
        description="file holding a bearer token required on every route except /v2/health/*; or set OKDPIPE_API_KEY",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="log level")

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if self.max_batch > self.max_queue:
            raise ValueError(f"max_batch {self.max_batch} exceeds max_queue {self.max_queue}; raise max_queue")
        if self.max_body_mb > self.max_inflight_mb:
            raise ValueError(
                f"max_body_mb {self.max_body_mb:g} exceeds max_inflight_mb {self.max_inflight_mb:g}; "
                "raise max_inflight_mb"
            )
        return self

    def settings(self, artifact_dir, api_key: str | None):
        """The running server's settings (okdpipe.serve.app.ServeSettings) for one artifact directory."""
        from okdpipe.serve.app import ServeSettings

        return ServeSettings(
            artifact_dir=artifact_dir,
            max_batch=self.max_batch,
            max_delay_ms=self.max_delay_ms,
            max_queue=self.max_queue,
            max_body_bytes=int(self.max_body_mb * MIB),
            max_inflight_bytes=int(self.max_inflight_mb * MIB),
            header_timeout_s=self.header_timeout_s,
            body_timeout_s=self.body_timeout_s,
            intra_op_threads=self.threads,
            api_key=api_key,
        )
