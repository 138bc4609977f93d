"""`okdpipe select --precision int8`: choose the student by how it ships. Every candidate is exported to ONNX,
quantized to static INT8 exactly as `okdpipe export --quantize int8` quantizes it by default (the CPU's settings,
`calib_size` training images, `calib_method`), and scored on the validation split; the selection ranks that
figure. Lives in the export stage because it quantizes; the distill stage's selection receives it as a
`ShippingPrecision` (okdpipe.distill.select).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

from okdpipe.contracts.card import PIXEL_SCALE, Preprocess
from okdpipe.export import onnx_export, quantize
from okdpipe.export.config import ExportConfig
from okdpipe.ortsession import create_session
from okdpipe.scoring import score


class Int8Precision:
    """Plain static INT8 (no accuracy-aware search: every candidate is held to the same recipe)."""

    name = "int8"

    def __init__(self, config: ExportConfig | None = None):
        self.config = config or ExportConfig()
        self._settings = quantize.int8_settings(quantize.cpu_features())
        self.calibration_samples: int | None = None  # images calibration read (calib_size or the whole train split)

    def settings(self) -> dict[str, Any]:
        return {
            "recipe": "plain static QDQ, as `okdpipe export --quantize int8` before any accuracy-aware search",
            "calibration": {"method": self.config.calib_method, "samples": self.calibration_samples, "split": "train"},
            "per_channel": self._settings["per_channel"],
            "reduce_range": self._settings["reduce_range"],
            "opset": self.config.opset,
        }

    def score(self, model, session) -> dict[str, Any]:
        """INT8 validation top-1/top-5 of `model` and its drop (points) from the FP32 PyTorch top-1."""
        spec = session.bundle.spec
        preprocess = Preprocess(*spec.input_size, spec.in_channels, PIXEL_SCALE, spec.mean, spec.std)
        with tempfile.TemporaryDirectory(prefix="okdpipe-select-int8-") as work:
            fp32, int8 = Path(work) / "fp32.onnx", Path(work) / "int8.onnx"
            shape = (spec.in_channels, *spec.input_size)
            onnx_export.export_onnx(copy.deepcopy(model).cpu(), shape, fp32, self.config.opset)
            reader = quantize.calibration_reader(
                session.bundle.train, preprocess, self.config.calib_size, onnx_export.INPUT_NAME
            )
            quantize.quantize_int8_static(fp32, int8, reader, self.config.calib_method, self._settings)
            self.calibration_samples = reader.samples
            int8_session, _ = create_session(int8)
            result = score(
                lambda batch: onnx_export.run_session(int8_session, batch),
                session.bundle.val,
                preprocess,
                what="the int8 model of a candidate",
            )
        return {"val_top1": result.top1, "val_top5": result.top5, "val_samples": result.samples}


def select_shipping(run_dir: Path, cfg, out: Path | None):
    """`okdpipe select` with SelectConfig `cfg`: the distill stage's selection, ranked at `cfg.precision`."""
    from okdpipe.distill.methods import METHODS  # noqa: F401  (registers every method)
    from okdpipe.distill.select import select

    precision = Int8Precision() if cfg.precision == "int8" else None
    return select(Path(run_dir), cfg.strategy, out, cfg.bn_batches, cfg.device, precision)
