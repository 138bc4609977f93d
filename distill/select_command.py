"""SelectConfig: the options of `okdpipe select RUN_DIR`, declared once. The typer command is
okdpipe/select_command.py, an entry point: `--precision int8` composes this stage's selection with the export
stage's INT8 scoring, which this stage may not import."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from okdpipe.stage_config import StageConfig


class SelectConfig(StageConfig):
    """The command's flags, the pipeline's `select:` section and `okdpipe.api.select` compile into this."""

    strategy: str = Field(
        "auto", description="auto, best, leader, mean-teacher, hybrid, soup, student:N, or any candidate name"
    )
    bn_batches: int = Field(
        50,
        ge=1,
        le=100_000,
        description="training batches used to recompute BatchNorm statistics of weight-averaged candidates",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when visible, else CPU")
    precision: Literal["fp32", "int8"] = Field(
        "fp32", description="rank candidates as they ship: int8 quantizes each (export's defaults) and scores that"
    )
