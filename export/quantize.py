"""INT8 (static QDQ, dynamic) and FP16 variants of an exported fp32 ONNX model.

Static INT8 follows ONNX Runtime's CPU advice (docstring of `quantize_static`, ORT 1.31): QDQ format,
uint8 activations, int8 per-channel weights, and `reduce_range=True` (7-bit weights) on x86 CPUs without
VNNI, whose u8s8 multiply-add (VPMADDUBSW) saturates int16 pair sums; VNNI (VPDPBUSD) accumulates in
int32 and needs no reduction. The choice and the detected features go into the card.
"""

from __future__ import annotations

import contextlib
import io
import platform
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from okdpipe.console import VERBOSE, verbosity
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


def calibration_reader(train, preprocess, calib_size: int, input_name: str) -> BatchReader:
    """The first `calib_size` training images, normalised as served, streamed one batch at a time."""
    from okdpipe.scoring import normalised_batches

    samples = min(calib_size, len(train))
    batches = normalised_batches(train, CALIB_BATCH, preprocess, limit=samples)
    return BatchReader((inputs for inputs, _ in batches), -(-samples // CALIB_BATCH), input_name)


def quantize_int8_static(fp32_path, out_path, reader: BatchReader, method: str, settings: dict) -> dict:
    """Pre-process (shape inference, Conv+BN folding), calibrate on the reader's batches, write a QDQ int8 model
    with the CPU's recommended settings (one shot; `Int8Workbench` when a search quantizes many times)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    recipe = Recipe(method=method, per_channel=settings.get("per_channel", True))
    if method not in CALIB_METHODS:
        raise OkdpipeError(f"unknown calibration method {method!r}; choose one of: {', '.join(CALIB_METHODS)}")
    with tempfile.TemporaryDirectory(dir=Path(out_path).parent, prefix=".quant-") as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        _quantize_prepared(prepared, out_path, reader, recipe, settings, None)
    return static_record(recipe, reader.samples, settings)


@dataclass(frozen=True)
class Recipe:
    """One way to quantize a graph statically: the calibration (method and, for percentile, the percentile of
    |activation| kept in range), per-channel or per-tensor weights, and the nodes left in FP32."""

    method: str = "minmax"
    percentile: float | None = None
    per_channel: bool = True
    fp32_nodes: tuple[str, ...] = field(default=())

    def calibration(self) -> tuple[str, float | None]:
        """What the activation ranges depend on: trials differing only in weights or FP32 nodes share them."""
        return (self.method, self.percentile)

    def keeping(self, nodes: Iterable[str]) -> Recipe:
        return replace(self, fp32_nodes=tuple(nodes))

    def label(self) -> str:
        method = self.method if self.percentile is None else f"percentile {self.percentile:g}"
        granularity = "per-channel" if self.per_channel else "per-tensor"
        kept = f", {len(self.fp32_nodes)} node(s) in FP32" if self.fp32_nodes else ""
        return f"{method}, {granularity}{kept}"

    def record(self) -> dict:
        calibration = {"method": self.method}
        if self.percentile is not None:
            calibration["percentile"] = self.percentile
        return {"calibration": calibration, "per_channel": self.per_channel, "fp32_nodes": list(self.fp32_nodes)}


class Int8Workbench:
    """One pre-processed FP32 graph, calibrated once per calibration setting and then quantized as often as a
    search needs: ORT's calibration cache (`calibration_cache_path`) holds each setting's activation ranges, so a
    trial that only changes weight granularity or the FP32 nodes costs a graph rewrite, not a calibration pass."""

    def __init__(self, fp32_path: Path, work_dir: Path, readers: Callable[[], BatchReader], settings: dict):
        from onnxruntime.quantization.shape_inference import quant_pre_process

        self.work_dir, self._readers, self.settings = Path(work_dir), readers, settings
        self.prepared = self.work_dir / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(self.prepared))
        self._samples: dict[tuple, int] = {}

    def quantize(self, recipe: Recipe, out_path: Path, only: str | None = None) -> dict:
        """Write `recipe`'s QDQ model to `out_path` (with `only`, that one node quantized and every other node
        left in FP32: how a sensitivity analysis isolates a node); returns its card record."""
        key = recipe.calibration()
        cache = self.work_dir / f"ranges-{recipe.method}-{recipe.percentile}.json"
        reader = None if cache.is_file() else self._readers()
        _quantize_prepared(self.prepared, out_path, reader, recipe, self.settings, cache, only)
        if reader is not None:
            self._samples[key] = reader.samples
        return self.record(recipe)

    def record(self, recipe: Recipe) -> dict:
        """The card's `quantization` section for a recipe this workbench has quantized."""
        return static_record(recipe, self._samples[recipe.calibration()], self.settings)


def quantized_nodes(int8_path: Path) -> list[tuple[str, str]]:
    """(name, op type) of every node the QDQ graph computes on dequantized inputs: the nodes a sensitivity
    analysis can hand back to FP32 one at a time (`nodes_to_exclude` takes these names)."""
    import onnx

    graph = onnx.load(str(int8_path), load_external_data=False).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return [
        (node.name, node.op_type)
        for node in graph.node
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") and dequantized.intersection(node.input)
    ]


def quantized_claims(int8_path: Path, fp32_nodes: Iterable[str]) -> list[str]:
    """The nodes of `fp32_nodes` that the graph does not keep in FP32: absent from it, or computing on an integer
    constant (a weight or bias stored as int8/int32 behind a DequantizeLinear). An empty list when the claim holds.
    (A kept node may still read an activation quantized for another consumer: only its own constants are checked.)"""
    import onnx

    graph = onnx.load(str(int8_path), load_external_data=False).graph
    constants = {init.name for init in graph.initializer}
    integer_constants = {
        node.output[0] for node in graph.node if node.op_type == "DequantizeLinear" and node.input[0] in constants
    }
    nodes = {node.name: node for node in graph.node}
    return [name for name in fp32_nodes if name not in nodes or integer_constants.intersection(nodes[name].input)]


def _quantize_prepared(
    prepared, out_path, reader, recipe: Recipe, settings: dict, cache: Path | None, only: str | None = None
) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if recipe.method not in CALIB_METHODS:
        raise OkdpipeError(f"unknown calibration method {recipe.method!r}; choose one of: {', '.join(CALIB_METHODS)}")
    extra = {"CalibStridedMinMax": 1}
    if recipe.percentile is not None:
        extra["CalibPercentile"] = recipe.percentile
    # ORT's histogram calibrators print their progress on stdout, which carries --json output: kept off it
    with contextlib.redirect_stdout(sys.stderr if verbosity() >= VERBOSE else io.StringIO()):
        quantize_static(
            str(prepared),
            str(out_path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=recipe.per_channel,
            nodes_to_quantize=[only] if only else None,
            reduce_range=settings["reduce_range"],
            activation_type=getattr(QuantType, settings["activation_type"]),
            weight_type=getattr(QuantType, settings["weight_type"]),
            nodes_to_exclude=list(recipe.fp32_nodes),
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[recipe.method],
            extra_options=extra,
            calibration_cache_path=cache,
        )


def static_record(recipe: Recipe, samples: int, settings: dict) -> dict:
    """The card's `quantization` section for a static QDQ model."""
    described = recipe.record()
    return {
        "method": "static",
        "format": "QDQ",
        **settings,
        "calibration": {**described["calibration"], "samples": samples, "split": "train"},
        "per_channel": recipe.per_channel,
        "fp32_nodes": described["fp32_nodes"],
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
