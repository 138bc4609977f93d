"""BenchConfig: every option of `okdpipe bench` that shapes the measurement, declared once. The command's flags,
the pipeline's `bench:` section, `--config FILE` and `okdpipe.api.bench` all compile into it."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from okdpipe.plugins import PLUGINS_HELP, PluginNames
from okdpipe.stage_config import RecordedPath, StageConfig

MAX_BATCH = 65536
PROVIDER_NAMES = ("cpu", "cuda")


class BenchConfig(StageConfig):
    batch_sizes: list[int] = Field([1, 8, 64], min_length=1, description="comma-separated batch sizes to time")
    threads: Optional[int] = Field(
        None, ge=1, le=1024, description="intra-op threads (ORT and torch); default: the runtime's"
    )
    provider: Literal["cpu", "cuda"] = Field("cpu", description="ONNX Runtime execution provider")
    dataset: Optional[str] = Field(None, description="dataset for accuracy; default: the card's")
    data_dir: RecordedPath = Field(None, description="dataset directory; default: the model file's record")
    max_samples: Optional[int] = Field(None, ge=1, description="use at most this many test images")
    compare_pytorch: bool = Field(True, description="time the PyTorch model beside the ONNX artifacts")
    compare_ensemble: bool = Field(True, description="time the peer ensemble beside the ONNX artifacts")
    warmup: int = Field(10, ge=0, le=100_000, description="untimed runs before timing each batch size")
    min_seconds: float = Field(1.0, gt=0, le=3600, description="time each batch size at least this long (s)")
    gates: list[str] = Field(default_factory=list, description="gates such as 'top1>=0.90', 'p99_ms@1<=baseline*1.1'")
    plugins: PluginNames = Field(default_factory=list, description=PLUGINS_HELP + " (a model file names its own)")

    @field_validator("provider", mode="before")
    @classmethod
    def _known_provider(cls, value: Any) -> Any:
        """One line naming the bad value and the choices (pydantic's Literal message names neither clearly)."""
        if value not in PROVIDER_NAMES:
            raise PydanticCustomError(
                "unknown_provider", f"unknown provider {value!r}; choose one of: {', '.join(PROVIDER_NAMES)}"
            )
        return value

    @field_validator("batch_sizes", mode="before")
    @classmethod
    def _parse_batch_sizes(cls, value: Any) -> Any:
        """'1,8,64' (a flag) or [1, 8, 64] (YAML); each in 1..65536, each once (a repeat is a typo)."""
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",")]
            if not all(part.isascii() and part.isdigit() for part in parts):
                raise ValueError(f"{value!r}: expected comma-separated positive integers, e.g. 1,8,64")
            value = [int(part) for part in parts]
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            if any(not 1 <= v <= MAX_BATCH for v in value):
                raise ValueError(f"batch sizes must be positive integers up to {MAX_BATCH}, got {list(value)}")
            repeated = sorted({v for v in value if value.count(v) > 1})
            if repeated:
                raise ValueError(f"batch size {repeated[0]} is listed twice in {list(value)}; list each once")
        return value
