"""Measurement primitives of `okdpipe bench`, and the description of the machine it measured on.

- latency: `warmup` untimed runs, then timed runs until both `min_seconds` have passed and MIN_RUNS runs were made
  (a point stops early after MAX_SECONDS_PER_POINT once it has MIN_RUNS_SLOW runs); p50/p90/p99/mean/min of the
  per-run wall time (perf_counter around the call), images/s = batch / mean;
- peak memory: growth of the process's peak resident set (Linux VmHWM in /proc/self/status) inside a block,
  after resetting the peak with `echo 5 > /proc/self/clear_refs`; where the reset is refused, the growth of
  VmRSS instead (the report says which);
- arithmetic roof: the best rate of 256/512/1024-square fp32 torch matmuls over ~min(1, max(0.1, min_seconds)) s,
  same thread count. Achieved GFLOP/s = 2 * MACs * images/s / 1e9 and its fraction of that roof. int8 artifacts
  can exceed 100%: VNNI does four int8 multiply-adds where fp32 FMA does one; ORT's blocked fp32 convolutions can
  too, since the roof is a measured matmul rate, not the CPU's theoretical peak.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from okdpipe.contracts.report import LatencyPoint, Memory

MIN_RUNS = 20  # timed runs per point at least: p99 of fewer runs is just the maximum
MIN_RUNS_SLOW = 5
MAX_SECONDS_PER_POINT = 30.0  # a very slow point (a big ensemble at batch 64) stops here once it has 5 runs
PEAK_MATMUL_SIZES = (256, 512, 1024)
STATUS_PATH = "/proc/self/status"
CLEAR_REFS_PATH = "/proc/self/clear_refs"


def time_calls(call: Callable[[], object], warmup: int, min_seconds: float, min_runs: int = MIN_RUNS) -> list[float]:
    """Per-run wall times in ms: `warmup` untimed calls, then calls until `min_seconds` and `min_runs`."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    start = time.perf_counter()
    while True:
        began = time.perf_counter()
        call()
        ended = time.perf_counter()
        times.append((ended - began) * 1000.0)
        elapsed = ended - start
        if (len(times) >= min_runs and elapsed >= min_seconds) or (
            elapsed >= MAX_SECONDS_PER_POINT and len(times) >= MIN_RUNS_SLOW
        ):
            return times


def latency_point(times_ms: list[float], batch_size: int, macs: int | None, peak_gflops: float | None) -> LatencyPoint:
    """Percentiles (numpy linear interpolation) and throughput of one batch size; GFLOP/s where MACs are known."""
    p50, p90, p99 = (float(v) for v in np.percentile(times_ms, [50, 90, 99]))
    mean = float(np.mean(times_ms))
    images_per_s = batch_size * 1000.0 / mean
    gflops = 2.0 * macs * images_per_s / 1e9 if macs else None
    return LatencyPoint(
        batch_size,
        len(times_ms),
        p50,
        p90,
        p99,
        mean,
        float(min(times_ms)),
        images_per_s,
        gflops,
        gflops / peak_gflops if gflops and peak_gflops else None,
    )


def status_kib(field: str, status_path: str = STATUS_PATH) -> int | None:
    """A `VmXXX:  1234 kB` line of /proc/self/status in KiB (None off Linux)."""
    try:
        lines = Path(status_path).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


class PeakMemory:
    """Peak-RSS growth of this process inside a `with` block (see the module docstring for the method)."""

    def __enter__(self) -> PeakMemory:
        self.start_kib = status_kib("VmRSS")
        self.peak_reset = _reset_peak_rss()
        self.result = Memory()
        return self

    def __exit__(self, *exc_info) -> None:
        field = "VmHWM" if self.peak_reset else "VmRSS"
        end_kib = status_kib(field)
        if self.start_kib is not None and end_kib is not None:
            self.result = Memory(
                max(end_kib - self.start_kib, 0) / 1024.0,
                "VmHWM growth after clear_refs reset" if self.peak_reset else "VmRSS growth",
            )


def _reset_peak_rss() -> bool:
    """Linux >= 4.0 resets VmHWM to the current RSS when '5' is written to /proc/self/clear_refs."""
    try:
        with open(CLEAR_REFS_PATH, "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Pin torch's intra-op threads for eager timings (same count as ORT), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def measure_peak_gflops(seconds: float, threads: int | None, device: str = "cpu") -> dict:
    """Best fp32 matmul rate (GFLOP/s) on `device` over PEAK_MATMUL_SIZES, `seconds` split between them.

    The roof that achieved GFLOP/s is compared with. Several sizes, because on small shared VMs the largest
    product falls out of cache and runs at half the rate of a 512 x 512 one (measured: 95 vs 45 GFLOP/s)."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    by_size = {}
    with torch_threads(threads) as used, torch.inference_mode():
        for size in PEAK_MATMUL_SIZES:
            a, b = (torch.randn(size, size, device=device) for _ in range(2))
            times = time_calls(
                lambda: (torch.mm(a, b), sync()), warmup=2, min_seconds=seconds / len(PEAK_MATMUL_SIZES), min_runs=5
            )
            by_size[str(size)] = 2.0 * size**3 / (min(times) / 1000.0) / 1e9
    best = max(by_size, key=by_size.get)
    return {
        "gflops": by_size[best],
        "by_size": by_size,
        "device": device,
        "threads": used,
        "method": f"torch fp32 square matmul, best of sizes {'/'.join(by_size)} (best {best}) over {seconds:g} s",
    }


def machine_info(provider: str, threads: int | None, peak: dict) -> dict:
    import torch

    from okdpipe.cpu import cpu_features, cpu_model

    gpu = torch.cuda.get_device_name(0) if provider == "cuda" and torch.cuda.is_available() else None
    return {
        "cpu_model": cpu_model(),
        "cpu_features": cpu_features(),
        "logical_cpus": os.cpu_count(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "provider": provider,
        "threads": threads,
        "torch_threads": threads or torch.get_num_threads(),
        "peak_gflops": peak,
        "gpu": gpu,
    }


def runtime_versions() -> dict:
    """Versions of what produced the numbers."""
    import onnx
    import onnxruntime
    import torch

    from okdpipe import __version__

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "okdpipe": __version__,
    }
