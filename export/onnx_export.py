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
import re
from collections.abc import Iterable

import numpy as np

from okdpipe.errors import GateFailed, OkdpipeError
from okdpipe.files import disk_error, full_disk_message
from okdpipe.interrupts import reraise_interrupt

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
TRACE_BATCH = 2  # torch.export specialises sizes 0 and 1, so trace with 2 to keep the batch axis symbolic
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 5e-2


def export_onnx(model, input_shape: tuple[int, int, int], path: str | os.PathLike, opset: int) -> int:
    """Export `model` (eval mode) to one self-contained .onnx file with a symbolic batch axis, at exactly `opset`
    (checked on the written graph, which is what the card records); returns the graph's opset."""
    import onnx

    from okdpipe.export.config import DYNAMO_MIN_OPSET

    model = model.eval()
    try:
        if opset >= DYNAMO_MIN_OPSET:
            _export_dynamo(model, input_shape, path, opset)
        else:
            _export_torchscript(model, input_shape, path, opset)
    except Exception as exc:  # the exporters raise many types, and bury the operator deep in their text
        reraise_interrupt(exc)  # Ctrl-C or SIGTERM inside one of torch's lazy imports: an interrupt, not a failure
        full = disk_error(exc)
        if full:
            raise OkdpipeError(full_disk_message(path, full.strerror)) from None
        operator = unsupported_operator(exc)
        if operator:
            raise OkdpipeError(
                f"ONNX export failed at opset {opset}: operator {operator} has no ONNX conversion; replace the "
                "layer that uses it, or try another --opset"
            ) from None
        first = ANSI.sub("", str(exc)).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise OkdpipeError(f"ONNX export failed at opset {opset} ({first}); try another --opset") from None
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    written = graph_opset(graph)
    if written != opset:
        raise OkdpipeError(f"the exporter wrote opset {written}, not the requested {opset}; choose another --opset")
    return written


ANSI = re.compile(r"\x1b\[[0-9;]*m")
# How torch's exporters name the operator they cannot convert: dynamo ("No ONNX function found for
# <OpOverload(op='aten.linalg_eig', ...") and TorchScript ("Exporting the operator 'aten::linalg_eigvals' ...").
OPERATOR_PATTERNS = (
    re.compile(r"No ONNX function found for <OpOverload\(op='([\w.:]+)'"),
    re.compile(r"Exporting the operator '([\w.:]+)'"),
    re.compile(r"target=torch\.ops\.([\w.]+?)(?:\.default)?\]"),
)


def unsupported_operator(exc: BaseException) -> str | None:
    """The operator an export failure names, searched through the exception and its causes; None if none."""
    seen = exc
    while seen is not None:
        text = str(seen)
        for pattern in OPERATOR_PATTERNS:
            found = pattern.search(text)
            if found:
                return found.group(1)
        seen = seen.__cause__ or seen.__context__
    return None


def graph_opset(graph) -> int:
    """The default-domain ("" or ai.onnx) opset a graph imports."""
    return next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))


def _export_dynamo(model, input_shape: tuple[int, int, int], path, opset: int) -> None:
    import torch

    sample = torch.zeros(TRACE_BATCH, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(
        model,
        (sample,),
        dynamo=True,
        opset_version=opset,
        optimize=True,
        verbose=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
    )
    program.save(str(path), external_data=False)


def _export_torchscript(model, input_shape: tuple[int, int, int], path, opset: int) -> None:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            (torch.zeros(TRACE_BATCH, *input_shape),),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


def check_output_shape(onnx_path, predict, batch: np.ndarray, num_classes: int) -> None:
    """The graph must answer [batch, num_classes] logits, as the card will say: a backbone whose forward() gives
    another shape exports and even passes parity (PyTorch agrees with itself), then breaks every client that
    trusts the card. Both the graph's declared output and its answer on a real batch are checked."""
    import onnx

    dims = onnx.load(str(onnx_path), load_external_data=False).graph.output[0].type.tensor_type.shape.dim
    declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    answered = list(np.shape(predict(batch)))
    declared_ok = len(declared) == 2 and (declared[1] == num_classes or isinstance(declared[1], str))  # or symbolic
    if answered != [len(batch), num_classes] or not declared_ok:
        raise OkdpipeError(
            f"the exported graph's output {OUTPUT_NAME!r} has shape {declared} and answers a batch of {len(batch)} "
            f"with shape {answered}, but the model file says {num_classes} classes (expected [batch, {num_classes}]);"
            " fix the backbone's forward() so that it returns one logit per class"
        )


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
        check_finite(expected, reference_name)
        check_finite(actual, "ONNX Runtime")
        worst = max(worst, float(np.max(np.abs(expected - actual))))
        scale = max(scale, float(np.max(np.abs(expected))))
        agree += int(np.sum(expected.argmax(1) == actual.argmax(1)))
        total, sizes = total + len(batch), sizes + [len(batch)]
    report = {
        "max_abs_diff": worst,
        "top1_agreement": agree / max(total, 1),
        "batches": sizes,
        "tolerance": tolerance,
        "reference": reference_name,
    }
    if tolerance is not None and not worst <= tolerance * scale:
        raise GateFailed(
            f"parity check failed: ONNX Runtime logits differ from {reference_name} by {worst:.3g} "
            f"(> {tolerance:g} x logit scale {scale:.3g}) at batches {sizes}; try another --opset"
        )
    return report


def parity_batches(first_batch: np.ndarray) -> list[np.ndarray]:
    """Batch 1 and batch N from the same real images: covers the batch-1 fast paths and the dynamic axis."""
    return [first_batch[:1], first_batch]


def check_finite(logits: np.ndarray, who: str) -> None:
    """A model answering NaN or inf never passes parity (max() would silently drop a NaN difference)."""
    bad = int((~np.isfinite(logits)).sum())
    if bad:
        raise GateFailed(
            f"parity check failed: {who} gives {bad} non-finite logits (NaN or inf) on real validation "
            "images; the model's weights are damaged or diverged: retrain or re-select"
        )
