"""`okdpipe export MODEL.pt --out DIR`: the typer command (torch and onnx are imported only when it runs).

Exit codes (okdpipe/errors.py): 0 exported, 1 a check failed (parity, INT8 accuracy drop that the search within
--tune-budget could not bring under --max-accuracy-drop, or that --qat-epochs of quantization-aware training left
over it; non-finite weights; a QAT loss that diverged), 2 bad input or usage (including --qat-epochs without
--quantize int8, and --qat-teacher ensemble for a model file whose run is gone), 130 Ctrl-C, 143 SIGTERM. Nothing
is written to DIR unless every check passes and nothing stopped the export; an interrupted or failed QAT export
leaves only DIR/.qat-<key>/, from which the same command resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from okdpipe.export.config import ExportConfig
from okdpipe.stage_config import flag


def export_command(
    model_file: Annotated[Path, typer.Argument(help="MODEL.pt written by `okdpipe select`.")],
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Output directory: OUT/fp32 and OUT/<precision>.")
    ] = None,
    format: Annotated[Optional[str], flag(ExportConfig, "format")] = None,
    quantize: Annotated[Optional[str], flag(ExportConfig, "quantize")] = None,
    calib_size: Annotated[Optional[int], flag(ExportConfig, "calib_size")] = None,
    calib_method: Annotated[Optional[str], flag(ExportConfig, "calib_method")] = None,
    opset: Annotated[Optional[int], flag(ExportConfig, "opset")] = None,
    max_accuracy_drop: Annotated[Optional[float], flag(ExportConfig, "max_accuracy_drop")] = None,
    tune_budget: Annotated[Optional[str], flag(ExportConfig, "tune_budget")] = None,
    sensitivity_samples: Annotated[Optional[int], flag(ExportConfig, "sensitivity_samples")] = None,
    qat_epochs: Annotated[Optional[int], flag(ExportConfig, "qat_epochs")] = None,
    qat_teacher: Annotated[Optional[str], flag(ExportConfig, "qat_teacher")] = None,
    qat_lr: Annotated[Optional[float], flag(ExportConfig, "qat_lr")] = None,
    qat_alpha: Annotated[Optional[float], flag(ExportConfig, "qat_alpha")] = None,
    qat_temperature: Annotated[Optional[float], flag(ExportConfig, "qat_temperature")] = None,
    qat_batch_size: Annotated[Optional[int], flag(ExportConfig, "qat_batch_size")] = None,
    qat_seed: Annotated[Optional[int], flag(ExportConfig, "qat_seed")] = None,
    data_dir: Annotated[Optional[str], flag(ExportConfig, "data_dir")] = None,
    triton_max_batch_size: Annotated[Optional[int], flag(ExportConfig, "triton_max_batch_size")] = None,
    triton_instance: Annotated[Optional[str], flag(ExportConfig, "triton_instance")] = None,
    plugin: Annotated[Optional[list[str]], flag(ExportConfig, "plugins", "--plugin")] = None,
    config: Annotated[
        Optional[Path],
        typer.Option(help="YAML holding these options (as the pipeline's export: section); flags override it."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.")] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the written model cards as JSON on stdout.")
    ] = False,
) -> None:
    """Export a model file to ONNX, check parity and accuracy, and write model cards."""
    from okdpipe.console import emit_json, say
    from okdpipe.errors import OkdpipeError
    from okdpipe.stage_config import resolve, show

    flags = dict(
        format=format,
        quantize=quantize,
        calib_size=calib_size,
        calib_method=calib_method,
        opset=opset,
        max_accuracy_drop=max_accuracy_drop,
        tune_budget=tune_budget,
        sensitivity_samples=sensitivity_samples,
        qat_epochs=qat_epochs,
        qat_teacher=qat_teacher,
        qat_lr=qat_lr,
        qat_alpha=qat_alpha,
        qat_temperature=qat_temperature,
        qat_batch_size=qat_batch_size,
        qat_seed=qat_seed,
        data_dir=data_dir,
        triton_max_batch_size=triton_max_batch_size,
        triton_instance=triton_instance,
        plugins=plugin or None,
    )
    cfg = resolve(ExportConfig, config, flags)
    if out is None:
        raise OkdpipeError("export needs --out DIR (where OUT/fp32 and OUT/<precision> are written)")
    from okdpipe.export.exporter import check_inputs, export_model

    if dry_run:  # everything the export checks before its first minute of work, with the same lines
        check_inputs(model_file, out, cfg)
        show(cfg)
        return

    cards = export_model(model_file, out, cfg)
    if json_output:
        emit_json({"artifacts": [{"directory": str(card.directory), **card.raw} for card in cards]})
        return
    for card in cards:
        say(str(card.directory))
    if cfg.quantize == "fp16":
        say(f"note: {fp16_on_this_cpu()}")


def fp16_on_this_cpu() -> str:
    """What to expect of FP16 under ONNX Runtime on this machine's CPU (bench measures it and says so again)."""
    from okdpipe.cpu import cpu_features, fp16_slowness

    return (
        f"fp16 is for GPUs: on this CPU expect it slower than fp32 ({fp16_slowness(cpu_features())}); "
        "`okdpipe bench` measures both"
    )
