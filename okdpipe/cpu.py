"""What this CPU is and which int8- and fp16-relevant instruction sets it has: read by export (INT8 settings, the
FP16 warning), bench (the machine it measured) and `okdpipe env`."""

from __future__ import annotations

import os
import platform
from pathlib import Path

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "avx512_fp16", "fp16", "asimdhp")
FP16_ARITHMETIC = ("avx512_fp16", "asimdhp")  # x86 AVX512-FP16; Arm's half-precision SIMD (Linux: "asimdhp")
CPUINFO = "/proc/cpuinfo"


def cpu_features(cpuinfo: str | os.PathLike = CPUINFO) -> dict[str, bool]:
    """Which int8/fp16-relevant instruction sets this CPU reports (all False where /proc/cpuinfo is absent)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        text = ""
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return {flag: flag in flags for flag in CPU_FLAGS}


def native_fp16(features: dict[str, bool]) -> bool:
    """Whether the CPU computes in FP16 itself. Without it, ONNX Runtime's CPU provider runs an FP16 model by
    casting to FP32 around each layer, which is slower than FP32 throughout (onnxruntime issue 16778)."""
    return any(features.get(flag, False) for flag in FP16_ARITHMETIC)


def fp16_slowness(features: dict[str, bool]) -> str:
    """Why FP16 runs slower than FP32 under ONNX Runtime's CPU provider on a CPU with `features`."""
    if native_fp16(features):
        return "ONNX Runtime's CPU provider has few FP16 kernels"
    return "this CPU has no native FP16 arithmetic, so ONNX Runtime casts to FP32 around each layer"


def cpu_model(cpuinfo: str | os.PathLike = CPUINFO) -> str:
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
