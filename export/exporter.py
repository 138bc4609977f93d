"""`okdpipe export`: MODEL.pt -> OUT/fp32 (+ OUT/<precision>) artifact directories, or a Triton repository.

Every artifact is built in a hidden staging directory inside OUT and moved into place only after all
checks (parity, accuracy drop) pass, so a failed export leaves no artifact behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from okdpipe import __version__
from okdpipe.errors import OkdpipeError
from okdpipe.export import data as export_data
from okdpipe.export import onnx_export, quantize
from okdpipe.export.card import write_card
from okdpipe.files import file_sha256
from okdpipe.modelfile import load_model_file

PRECISIONS = ("none", "fp16", "int8", "int8-dynamic")
FORMATS = ("onnx", "triton")
PARITY_BATCH = 32
ONNX_FILE = "model.onnx"


@dataclass
class ExportOptions:
    """Every flag of `okdpipe export`, so a config file could hold the same thing."""

    format: str = "onnx"
    quantize: str = "none"
    calib_size: int = 512
    calib_method: str = "minmax"
    opset: int = 18
    max_accuracy_drop: float = 1.0  # percentage points of validation top-1
    data_dir: str | None = None
    parity_batch: int = PARITY_BATCH
    triton_max_batch_size: int = 64
    triton_instance: str = "cpu"


@dataclass
class ExportContext:
    """What every variant needs: the network, its description, real data and the fp32 reference numbers."""

    model: Any
    info: Any
    model_path: Path
    train: Any
    val: Any
    normalise: export_data.Normaliser
    parity_inputs: list[np.ndarray]
    options: ExportOptions
    fp32_top1: float | None = None


def export_model(model_path: str | os.PathLike, out_dir: str | os.PathLike, options: ExportOptions) -> list[Path]:
    """Export, verify and card a model file; returns the artifact (or Triton model) directories written."""
    _check_options(options)
    model, info = load_model_file(model_path)
    out_dir = _writable_dir(Path(out_dir))
    train, val = export_data.load_splits(info, options.data_dir)
    normalise = export_data.Normaliser(info.mean, info.std)
    first = export_data.first_batch(val, options.parity_batch, normalise)
    ctx = ExportContext(model, info, Path(model_path), train, val, normalise,
                        onnx_export.parity_batches(first), options)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as staging:
        staged = _build_artifacts(ctx, Path(staging))
        return _publish(staged, out_dir, ctx)


def _check_options(options: ExportOptions) -> None:
    if options.quantize not in PRECISIONS:
        raise OkdpipeError(f"unknown --quantize {options.quantize!r}; choose one of: {', '.join(PRECISIONS)}")
    if options.format not in FORMATS:
        raise OkdpipeError(f"unknown --format {options.format!r}; choose one of: {', '.join(FORMATS)}")
    if options.calib_size < 1:
        raise OkdpipeError(f"--calib-size must be >= 1 (got {options.calib_size})")
    if options.parity_batch < 2:
        raise OkdpipeError(f"parity batch must be >= 2 to exercise the dynamic batch axis (got {options.parity_batch})")


def _writable_dir(out_dir: Path) -> Path:
    """Create OUT and prove it is writable before spending minutes on export."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as exc:
        raise OkdpipeError(f"--out {out_dir}: cannot write there ({exc.strerror or exc}); choose another directory") from None
    return out_dir


def _build_artifacts(ctx: ExportContext, staging: Path) -> dict[str, tuple[Path, dict]]:
    """Build fp32 and the requested variant under `staging`; every check runs before anything is published."""
    fp32_dir = staging / "fp32"
    staged = {"fp32": (fp32_dir, _build_fp32(ctx, fp32_dir))}
    if ctx.options.quantize != "none":
        precision = ctx.options.quantize
        variant_dir = staging / precision
        staged[precision] = (variant_dir, _build_variant(ctx, fp32_dir / ONNX_FILE, variant_dir, precision))
    return staged


def _build_fp32(ctx: ExportContext, directory: Path) -> dict:
    directory.mkdir(parents=True)
    onnx_path = directory / ONNX_FILE
    input_shape = (ctx.info.in_channels, *ctx.info.input_size)
    onnx_export.export_onnx(ctx.model, input_shape, onnx_path, opset=ctx.options.opset)
    session = onnx_export.cpu_session(onnx_path)
    parity = onnx_export.parity_report(
        _torch_predict(ctx.model), _ort_predict(session), ctx.parity_inputs,
        onnx_export.FP32_TOLERANCE, "pytorch-fp32",
    )
    ctx.fp32_top1, samples = export_data.top1_accuracy(_ort_predict(session), ctx.val, ctx.normalise)
    accuracy = {"val_top1": ctx.fp32_top1, "val_samples": samples, "fp32_val_top1": ctx.fp32_top1, "drop_points": 0.0}
    return write_card(directory, _card(ctx, "fp32", parity, None, accuracy))


def _build_variant(ctx: ExportContext, fp32_path: Path, directory: Path, precision: str) -> dict:
    directory.mkdir(parents=True)
    onnx_path = directory / ONNX_FILE
    quantization = _convert(ctx, fp32_path, onnx_path, precision)
    session = onnx_export.cpu_session(onnx_path)
    tolerance = onnx_export.FP16_TOLERANCE if precision == "fp16" else None
    parity = onnx_export.parity_report(
        _torch_predict(ctx.model), _ort_predict(session), ctx.parity_inputs, tolerance, "pytorch-fp32"
    )
    accuracy = _accuracy_with_drop(ctx, session, precision)
    return write_card(directory, _card(ctx, precision, parity, quantization, accuracy))


def _convert(ctx: ExportContext, fp32_path: Path, onnx_path: Path, precision: str) -> dict:
    if precision == "fp16":
        return quantize.convert_fp16(fp32_path, onnx_path)
    settings = quantize.int8_settings(quantize.cpu_features())
    if precision == "int8-dynamic":
        return quantize.quantize_int8_dynamic(fp32_path, onnx_path, settings)
    samples = min(ctx.options.calib_size, len(ctx.train))
    batches = export_data.normalised_batches(ctx.train, quantize.CALIB_BATCH, ctx.normalise, limit=samples)
    reader = quantize.BatchReader((inputs for inputs, _ in batches), -(-samples // quantize.CALIB_BATCH),
                                  onnx_export.INPUT_NAME)
    return quantize.quantize_int8_static(fp32_path, onnx_path, reader, ctx.options.calib_method, settings)


def _accuracy_with_drop(ctx: ExportContext, session, precision: str) -> dict:
    """Validation top-1 of the variant and its drop vs fp32, in percentage points; raises over the limit."""
    top1, samples = export_data.top1_accuracy(_ort_predict(session), ctx.val, ctx.normalise)
    drop = (ctx.fp32_top1 - top1) * 100.0
    if drop > ctx.options.max_accuracy_drop:
        raise OkdpipeError(
            f"{precision} loses {drop:.2f} points of validation top-1 ({ctx.fp32_top1:.4f} -> {top1:.4f}), over "
            f"--max-accuracy-drop {ctx.options.max_accuracy_drop:g}; try --calib-method entropy/percentile, "
            "a larger --calib-size, or raise the limit"
        )
    return {"val_top1": top1, "val_samples": samples, "fp32_val_top1": ctx.fp32_top1, "drop_points": drop}


def _torch_predict(model) -> Callable[[np.ndarray], np.ndarray]:
    return lambda batch: onnx_export.torch_logits(model, batch)


def _ort_predict(session) -> Callable[[np.ndarray], np.ndarray]:
    return lambda batch: onnx_export.run_session(session, batch)


def _card(ctx: ExportContext, precision: str, parity: dict, quantization: dict | None, accuracy: dict) -> dict:
    info = ctx.info
    height, width = (int(s) for s in info.input_size)
    return {
        "name": model_name(info, precision),
        "file": ONNX_FILE,
        "precision": precision,
        "input": {"name": onnx_export.INPUT_NAME, "shape": [None, info.in_channels, height, width],
                  "dtype": "float32", "layout": "NCHW"},
        "output": {"name": onnx_export.OUTPUT_NAME, "shape": [None, info.num_classes], "dtype": "float32"},
        "preprocess": {"size": [height, width], "channels": info.in_channels, "scale": ctx.normalise.scale,
                       "mean": list(info.mean), "std": list(info.std)},
        "labels": list(info.labels),
        "dataset": export_data.data_source(info, ctx.options.data_dir)["dataset"],
        "opset": ctx.options.opset,
        "parity": parity,
        "quantization": quantization,
        "accuracy": accuracy,
        "runtime": runtime_versions(),
        "provenance": _provenance(ctx),
        "sha256": {},
    }


def model_name(info, precision: str = "fp32") -> str:
    """`resnet20-fashion-mnist`, `resnet20-fashion-mnist-int8`: unique when several variants are served."""
    parts = [info.arch, info.dataset] + ([] if precision == "fp32" else [precision])
    return "-".join(part for part in parts if part)


def runtime_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "okdpipe": __version__}


def _provenance(ctx: ExportContext) -> dict:
    recorded = ctx.info.provenance
    return {"model_file": str(ctx.model_path.resolve()), "model_sha256": file_sha256(ctx.model_path),
            "run_dir": recorded.get("run_dir"), "candidate": recorded.get("candidate"),
            "method": recorded.get("method")}


def _publish(staged: dict[str, tuple[Path, dict]], out_dir: Path, ctx: ExportContext) -> list[Path]:
    """Move verified artifacts into OUT (or lay out a Triton repository); replaces earlier exports."""
    if ctx.options.format == "triton":
        return _publish_triton(staged, out_dir, ctx)
    written = []
    for precision, (directory, _) in staged.items():
        target = out_dir / precision
        shutil.rmtree(target, ignore_errors=True)
        os.replace(directory, target)
        written.append(target)
    return written


def _publish_triton(staged: dict[str, tuple[Path, dict]], out_dir: Path, ctx: ExportContext) -> list[Path]:
    from okdpipe.export.triton import write_triton_model

    written = []
    for directory, card in staged.values():
        shutil.rmtree(out_dir / card["name"], ignore_errors=True)
        written.append(write_triton_model(out_dir, card["name"], directory, card, ctx.options.triton_max_batch_size,
                                          ctx.options.triton_instance))
    return written
