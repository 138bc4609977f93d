"""`okdpipe export MODEL.pt --out DIR`: the typer command (torch and onnx are imported only when it runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer


def export_command(
    model_file: Annotated[Path, typer.Argument(help="MODEL.pt written by `okdpipe select`.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory: OUT/fp32 and OUT/<precision>.")],
    format: Annotated[Literal["onnx", "triton"], typer.Option(help="Plain ONNX artifacts or a Triton model repository.")] = "onnx",
    quantize: Annotated[Literal["none", "fp16", "int8", "int8-dynamic"], typer.Option(help="Extra precision beside fp32.")] = "none",
    calib_size: Annotated[int, typer.Option(help="Training images used to calibrate int8 activation ranges.")] = 512,
    calib_method: Annotated[Literal["minmax", "entropy", "percentile"], typer.Option(help="int8 calibration method.")] = "minmax",
    opset: Annotated[int, typer.Option(help="ONNX opset version.")] = 18,
    max_accuracy_drop: Annotated[float, typer.Option(help="Fail if validation top-1 drops more (percentage points).")] = 1.0,
    data_dir: Annotated[Optional[Path], typer.Option(help="Dataset directory, overriding the one the model file records.")] = None,
    triton_max_batch_size: Annotated[int, typer.Option(help="Triton max_batch_size.")] = 64,
    triton_instance: Annotated[Literal["cpu", "gpu"], typer.Option(help="Triton instance_group kind.")] = "cpu",
) -> None:
    """Export a model file to ONNX, check parity and accuracy, and write model cards."""
    from okdpipe.export.pipeline import ExportOptions, export_model

    options = ExportOptions(
        format=format, quantize=quantize, calib_size=calib_size, calib_method=calib_method, opset=opset,
        max_accuracy_drop=max_accuracy_drop, data_dir=None if data_dir is None else str(data_dir),
        triton_max_batch_size=triton_max_batch_size, triton_instance=triton_instance,
    )
    for directory in export_model(model_file, out, options):
        typer.echo(str(directory))
