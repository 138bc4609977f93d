"""Latency of PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8 (static QDQ), per backbone and batch.

    python benchmarks/export_latency.py --models resnet20 resnet32 --threads 2 --runs 50

Untrained weights are enough for latency (the arithmetic is the same). int8 is calibrated on random
normal inputs here, which fixes its ranges but not its speed. Prints one JSON line per (model, batch)
and a Markdown table; medians of `--runs` timed runs after `--warmup` untimed ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from okdpipe.cpu import cpu_features
from okdpipe.distill.models import create_model
from okdpipe.export import onnx_export, quantize
from okdpipe.export.config import ExportConfig
from okdpipe.ortsession import create_session


def median_ms(run: Callable[[], object], warmup: int, runs: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def build_onnx(model, shape: tuple[int, int, int], work: Path) -> tuple[Path, Path]:
    """fp32 export and its int8 static QDQ variant with this CPU's recommended settings."""
    fp32, int8 = work / "fp32.onnx", work / "int8.onnx"
    onnx_export.export_onnx(model, shape, fp32, ExportConfig().opset)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((16, *shape)).astype(np.float32) for _ in range(4)]
    settings = quantize.int8_settings(cpu_features())
    quantize.quantize_int8_static(fp32, int8, quantize.BatchReader(iter(batches), 4, "input"), "minmax", settings)
    return fp32, int8


def bench_model(name: str, shape, batches, threads: int, warmup: int, runs: int) -> list[dict]:
    torch.set_num_threads(threads)
    model = create_model(name, num_classes=10, in_channels=shape[0]).eval()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        fp32, int8 = build_onnx(model, shape, Path(work))
        sessions = {
            "ort_fp32": create_session(fp32, threads=threads)[0],
            "ort_int8": create_session(int8, threads=threads)[0],
        }
        for batch in batches:
            inputs = np.random.default_rng(1).standard_normal((batch, *shape)).astype(np.float32)
            row = {
                "model": name,
                "batch": batch,
                "threads": threads,
                "torch_ms": median_ms(lambda: onnx_export.torch_logits(model, inputs), warmup, runs),
            }
            for key, session in sessions.items():
                row[f"{key}_ms"] = median_ms(lambda s=session: onnx_export.run_session(s, inputs), warmup, runs)
            row["speedup_fp32"] = row["torch_ms"] / row["ort_fp32_ms"]
            row["speedup_int8"] = row["torch_ms"] / row["ort_int8_ms"]
            row["int8_vs_fp32"] = row["ort_fp32_ms"] / row["ort_int8_ms"]
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | batch | PyTorch ms | ORT fp32 ms | ORT int8 ms | fp32 speed-up | int8 speed-up | int8 vs fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['torch_ms']:.2f} | {r['ort_fp32_ms']:.2f} | "
            f"{r['ort_int8_ms']:.2f} | {r['speedup_fp32']:.2f}x | {r['speedup_int8']:.2f}x | "
            f"{r['int8_vs_fp32']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet8", "resnet20", "resnet32"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--shape", nargs=3, type=int, default=[1, 28, 28], metavar=("C", "H", "W"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    rows = []
    for name in args.models:
        rows += bench_model(name, tuple(args.shape), args.batches, args.threads, args.warmup, args.runs)
    for row in rows:
        print(json.dumps(row))
    print(markdown(rows))


if __name__ == "__main__":
    main()
