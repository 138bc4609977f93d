"""`okdpipe env`: what this installation runs on, for bug reports and for reading benchmark figures."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Annotated, Any

import typer

PACKAGES = (
    "torch",
    "torchvision",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "onnxruntime-gpu",
    "numpy",
    "typer",
    "pydantic",
    "fastapi",
    "uvicorn",
    "albumentations",
)


def environment_report() -> dict[str, Any]:
    """Versions, ONNX Runtime's execution providers, the CPU's int8/fp16 instruction sets, CUDA devices."""
    from okdpipe import __version__
    from okdpipe.cpu import cpu_features, cpu_model

    return {
        "okdpipe": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "onnxruntime_providers": _ort_providers(),
        "cpu": {"model": cpu_model(), "features": cpu_features()},
        "cuda": _cuda_devices(),
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _ort_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def _cuda_devices() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"available": False, "devices": [], "note": "torch is not installed"}
    if not torch.cuda.is_available():
        return {"available": False, "devices": [], "torch_cuda_build": torch.version.cuda}
    devices = [
        {
            "index": i,
            "name": torch.cuda.get_device_name(i),
            "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
        }
        for i in range(torch.cuda.device_count())
    ]
    return {"available": True, "devices": devices, "torch_cuda_build": torch.version.cuda}


def env_command(
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Print versions (okdpipe, torch, onnx, onnxruntime and its execution providers), the CPU's int8/fp16
    instruction sets and the CUDA devices."""
    from okdpipe.console import emit_json

    report = environment_report()
    if json_output:
        emit_json(report)
        return
    typer.echo(f"okdpipe {report['okdpipe']} on Python {report['python']} ({report['platform']})")
    for name, version in report["packages"].items():
        typer.echo(f"  {name:<16} {version or '-'}")
    typer.echo(f"onnxruntime providers: {', '.join(report['onnxruntime_providers']) or 'none'}")
    features = [flag for flag, present in report["cpu"]["features"].items() if present]
    typer.echo(f"cpu: {report['cpu']['model']}; {', '.join(features) or 'no avx2/avx512/vnni/amx flags'}")
    cuda = report["cuda"]
    names = ", ".join(f"{d['index']}: {d['name']} ({d['memory_gib']} GiB)" for d in cuda["devices"])
    typer.echo(f"cuda: {names if cuda['available'] else 'not available'}")
