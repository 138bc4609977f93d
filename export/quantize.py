"""INT8 (static QDQ, dynamic) and FP16 variants of an exported fp32 ONNX model.

Static INT8 follows ONNX Runtime's CPU advice (docstring of `quantize_static`, ORT 1.31): QDQ format,
uint8 activations, int8 per-channel weights, and `reduce_range=True` (7-bit weights) on x86 CPUs without
VNNI, whose u8s8 multiply-add (VPMADDUBSW) saturates int16 pair sums; VNNI (VPDPBUSD) accumulates in
int32 and needs no reduction. The choice and the detected features go into the card.
"""

from __future__ import annotations

import platform
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from okdpipe.cpu import cpu_features  # noqa: F401  (re-exported for the card)
from okdpipe.errors import OkdpipeError

CALIB_METHODS = ("minmax", "entropy", "percentile")
CALIB_BATCH = 32  # images per calibration step; ORT holds this many images' activations at once


def int8_settings(features: dict[str, bool], machine: str | None = None) -> dict:
    """ORT's recommended static-quantisation settings for this CPU (see module docstring)."""
    machine = (machine or platform.machine()).lower()
    is_x86 = machine in ("x86_64", "amd64", "i686", "i386")
    has_vnni = any(features.get(flag, False) for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))
    reduce_range = is_x86 and not has_vnni
    if not is_x86:
        reason = f"{machine}: no VPMADDUBSW saturation, full 8-bit weights"
    elif has_vnni:
        reason = "x86 with VNNI: int32 accumulation, full 8-bit weights"
    else:
        reason = "x86 without VNNI: 7-bit weights avoid u8s8 saturation (ORT advice)"
    return {
        "activation_type": "QUInt8",
        "weight_type": "QInt8",
        "per_channel": True,
        "reduce_range": reduce_range,
        "reason": reason,
        "cpu_features": features,
        "machine": machine,
    }


class BatchReader(CalibrationDataReader):
    """Feeds calibration batches lazily, one at a time.

    With ORT's strided calibration (`CalibStridedMinMax`, honoured by every calibrator) ORT asks for one
    batch per `collect_data` call and folds it into running ranges/histograms, so memory holds one batch
    of images and its activations, not all of them. (ORT 1.31's `CalibMaxIntermediateOutputs` instead
    drops collected batches without folding them in, so it is not used.)
    """

    def __init__(self, batches: Iterable[np.ndarray], count: int, input_name: str):
        self._batches: Iterator[np.ndarray] = iter(batches)
        self._count, self._position, self._stop = count, 0, count
        self._input_name = input_name
        self.samples = 0

    def __len__(self) -> int:
        return self._count

    def set_range(self, start_index: int, end_index: int) -> None:
        if start_index != self._position:
            raise ValueError(f"calibration batches are read in order: asked for {start_index}, at {self._position}")
        self._stop = end_index

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None) if self._position < self._stop else None
        if batch is None:
            return None
        self._position += 1
        self.samples += len(batch)
        return {self._input_name: batch}


def quantize_int8_static(fp32_path, out_path, reader: BatchReader, method: str, settings: dict) -> dict:
    """Pre-process (shape inference, Conv+BN folding), calibrate on `batches`, write a QDQ int8 model."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIB_METHODS:
        raise OkdpipeError(f"unknown calibration method {method!r}; choose one of: {', '.join(CALIB_METHODS)}")
    calibrate = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    with tempfile.TemporaryDirectory(dir=Path(out_path).parent, prefix=".quant-") as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(
            str(prepared),
            str(out_path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=settings["per_channel"],
            reduce_range=settings["reduce_range"],
            activation_type=getattr(QuantType, settings["activation_type"]),
            weight_type=getattr(QuantType, settings["weight_type"]),
            calibrate_method=calibrate,
            extra_options={"CalibStridedMinMax": 1},
        )
    return {
        "method": "static",
        "format": "QDQ",
        "calibration": {"method": method, "samples": reader.samples, "split": "train"},
        **settings,
    }


def quantize_int8_dynamic(fp32_path, out_path, settings: dict) -> dict:
    """Weights int8 offline, activations quantised per batch at run time: no calibration data."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=Path(out_path).parent, prefix=".quant-") as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        # ConvInteger in ORT's CPU provider only takes uint8 weights, so dynamic mode uses QUInt8 weights
        quantize_dynamic(
            str(prepared),
            str(out_path),
            weight_type=QuantType.QInt8,
            per_channel=settings["per_channel"],
            reduce_range=settings["reduce_range"],
        )
    return {
        "method": "dynamic",
        "format": "QOperator",
        "calibration": None,
        **settings,
        "activation_type": "QUInt8 (per batch)",
    }


def convert_fp16(fp32_path, out_path) -> dict:
    """fp16 weights and compute with fp32 graph inputs/outputs, so clients send the same tensors."""
    import onnx
    import onnx_ir
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = onnx_ir.from_proto(convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True))
    # the converter appends its input Casts after their consumers; ONNX requires topological order
    converted.graph.sort()
    model = onnx_ir.to_proto(converted)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out_path))
    return {"method": "fp16", "converter": "onnxruntime.transformers.float16", "keep_io_types": True}
