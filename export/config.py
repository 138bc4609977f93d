"""ExportConfig: every option of `okdpipe export`, declared once. The command's flags, the pipeline's `export:`
section, `--config FILE` and `okdpipe.api.export` all compile into it, and every value is checked here, before
export touches its destination."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from okdpipe.plugins import PLUGINS_HELP, PluginNames
from okdpipe.stage_config import RecordedPath, StageConfig

# Opsets 18+ come from torch's dynamo exporter, 13-17 from its TorchScript exporter (the dynamo exporter builds
# nothing below 18 and its down-conversion fails on ordinary CNNs). Outside this range the export is refused.
MIN_OPSET, DYNAMO_MIN_OPSET, MAX_OPSET = 13, 18, 23
# --tune-budget: trials (30) or seconds (300s), digits 0-9 written plainly (no padding: 007 is refused, as every
# other numeric option refuses it)
TUNE_BUDGET = re.compile(r"(0|[1-9][0-9]*)(s?)")
PLAIN_INT8_ONLY = ("calib_method", "tune_budget", "sensitivity_samples")  # read by export/quantize.py and tune.py


class ExportConfig(StageConfig):
    format: Literal["onnx", "triton"] = Field("onnx", description="plain ONNX artifacts or a Triton model repository")
    quantize: Literal["none", "fp16", "int8", "int8-dynamic"] = Field("none", description="extra precision beside fp32")
    calib_size: int = Field(512, ge=1, le=1_000_000, description="training images used to calibrate int8 ranges")
    calib_method: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="int8 calibration method")
    opset: int = Field(18, ge=MIN_OPSET, le=MAX_OPSET, description=f"ONNX opset version ({MIN_OPSET}-{MAX_OPSET})")
    max_accuracy_drop: float = Field(
        1.0, ge=0, le=100, description="fail if validation top-1 drops more (percentage points)"
    )
    tune_budget: str = Field(
        "30",
        description="int8 search when plain int8 misses the limit: trials (30) or seconds (300s); 0 = off",
    )
    sensitivity_samples: int = Field(
        512, ge=16, le=1_000_000, description="validation images the per-node int8 sensitivity analysis uses"
    )
    qat_epochs: int = Field(
        0, ge=0, le=1000, description="quantization-aware fine-tuning epochs before the int8 export (0 = off)"
    )
    qat_teacher: Literal["ensemble", "labels"] = Field(
        "ensemble", description="QAT teacher: the run's peer ensemble (+ labels), or the labels alone"
    )
    qat_lr: float = Field(1e-3, gt=0, le=10, description="QAT learning rate (SGD momentum 0.9, cosine to 0)")
    qat_alpha: float = Field(0.9, ge=0, le=1, description="QAT loss: (1-alpha) CE + alpha T^2 KL to the teacher")
    qat_temperature: float = Field(4.0, gt=0, le=100, description="QAT distillation temperature T")
    qat_batch_size: int = Field(128, ge=1, le=65536, description="QAT training batch size (images)")
    qat_seed: int = Field(0, ge=0, le=2**31 - 1, description="QAT seed: batch order and augmentation")
    data_dir: RecordedPath = Field(None, description="dataset directory, overriding the one the model file records")
    parity_batch: int = Field(32, ge=2, le=4096, description="validation images in the parity check's batch")
    triton_max_batch_size: int = Field(64, ge=1, le=1 << 16, description="Triton max_batch_size")
    triton_instance: Literal["cpu", "gpu"] = Field("cpu", description="Triton instance_group kind")
    plugins: PluginNames = Field(default_factory=list, description=PLUGINS_HELP + " (a model file names its own)")

    @field_validator("tune_budget", mode="before")
    @classmethod
    def _budget_is_trials_or_seconds(cls, value: object) -> str:
        text = str(value).strip()
        if not TUNE_BUDGET.fullmatch(text):
            raise ValueError(f"tune_budget {value!r} must be a plain number of trials (30) or of seconds (300s)")
        return text

    @model_validator(mode="after")
    def _qat_reads_no_plain_int8_option(self) -> ExportConfig:
        """QAT calibrates its own way (EMA min/max, export/qat.py) and runs neither the search nor the sensitivity
        analysis: one of their options given beside --qat-epochs would be silently ignored."""
        ignored = [name for name in PLAIN_INT8_ONLY if name in self.model_fields_set]
        if self.qat_epochs and ignored:
            flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
            raise ValueError(
                f"plain int8's {flags} would be ignored: --qat-epochs replaces plain int8 (QAT calibrates its own "
                "way and runs no search); drop them or --qat-epochs"
            )
        return self

    @model_validator(mode="after")
    def _qat_needs_int8(self) -> ExportConfig:
        if self.qat_epochs and self.quantize != "int8":
            raise ValueError(
                f"--qat-epochs {self.qat_epochs} needs --quantize int8 (QAT ships a static int8 model), "
                f"not {self.quantize!r}"
            )
        return self
