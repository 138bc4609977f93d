"""PyTorch -> ONNX with a dynamic batch axis, plus ONNX Runtime sessions and the parity check.

Named `onnx_export` rather than `onnx` so the module never shadows the `onnx` package for anyone
who runs a file from this folder directly.

Graph optimisation: the dynamo exporter's `optimize=True` (onnxscript's optimizer: constant folding,
Conv+BatchNorm folding in eval mode, dead-code elimination). It emits only standard ONNX ops at the
requested opset, so the file runs in any runtime. ORT's offline ORT_ENABLE_BASIC pass was tried and
gives the same ops but stamps eight ORT-private opset domains into the file, so it is left to run-time.
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np

from okdpipe.errors import OkdpipeError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
TRACE_BATCH = 2  # torch.export specialises sizes 0 and 1, so trace with 2 to keep the batch axis symbolic
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 5e-2


def export_onnx(model, input_shape: tuple[int, int, int], path: str | os.PathLike, opset: int = 18) -> None:
    """Export `model` (eval mode) to one self-contained .onnx file with a symbolic batch axis."""
    import onnx
    import torch

    model = model.eval()
    sample = torch.zeros(TRACE_BATCH, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        program = torch.onnx.export(
            model, (sample,), dynamo=True, opset_version=opset, optimize=True, verbose=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
        )
    except Exception as exc:  # the exporter raises many types; the first line names the unsupported op
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise OkdpipeError(f"ONNX export failed at opset {opset} ({first}); try another --opset") from None
    program.save(str(path), external_data=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def cpu_session(path: str | os.PathLike, threads: int | None = None):
    """A fresh ONNX Runtime CPU session; `threads` pins intra-op threads for reproducible timings."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(session, batch: np.ndarray) -> np.ndarray:
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def torch_logits(model, batch: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).float().numpy()


def parity_report(
    reference, candidate, batches: Iterable[np.ndarray], tolerance: float | None, reference_name: str
) -> dict:
    """Compare logits of two callables (batch -> logits) on real inputs; raise if over `tolerance`.

    The bound is relative-ish: max|a-b| <= tolerance * max(1, max|reference logits|). fp32 kernels that
    merely reorder sums differ by ~1e-6 of the logit scale, while a wrong op or weight differs by >1e-2,
    so 1e-4 separates the two with two orders of magnitude to spare either side. fp16 (10-bit mantissa,
    eps ~1e-3 compounded over depth) gets 5e-2. `tolerance=None` only reports (int8: there the accuracy
    drop on the validation split is the gate, not the logits).
    """
    sizes, worst, scale, agree, total = [], 0.0, 1.0, 0, 0
    for batch in batches:
        expected, actual = reference(batch), candidate(batch)
        worst = max(worst, float(np.max(np.abs(expected - actual))))
        scale = max(scale, float(np.max(np.abs(expected))))
        agree += int(np.sum(expected.argmax(1) == actual.argmax(1)))
        total, sizes = total + len(batch), sizes + [len(batch)]
    report = {"max_abs_diff": worst, "top1_agreement": agree / max(total, 1), "batches": sizes,
              "tolerance": tolerance, "reference": reference_name}
    if tolerance is not None and not worst <= tolerance * scale:
        raise OkdpipeError(
            f"parity check failed: ONNX Runtime logits differ from {reference_name} by {worst:.3g} "
            f"(> {tolerance:g} x logit scale {scale:.3g}) at batches {sizes}; try another --opset"
        )
    return report


def parity_batches(first_batch: np.ndarray) -> list[np.ndarray]:
    """Batch 1 and batch N from the same real images: covers the batch-1 fast paths and the dynamic axis."""
    return [first_batch[:1], first_batch]
