"""Per-node INT8 sensitivity: the error each quantized node introduces on its own.

Measured by quantizing one node at a time, every other node left in FP32, and comparing the logits with the FP32
model's on a fixed sample of validation images. Quantizing a node quantizes the tensors it reads and writes, so
both ends of a badly quantized activation (say a channel with outliers) rank high, and keeping the top of the
ranking in FP32 keeps that tensor in FP32. (Dequantizing one node at a time in the INT8 model misses this: the
tensor stays quantized for its other end.) The score is the mean squared logit error relative to the FP32 logits'
mean square, which ranks nodes even where a few hundred images show no top-1 difference; each node's top-1 drop on
the sample is recorded beside it. The test split is never read here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from okdpipe.export.quantize import Int8Workbench, Recipe, quantized_nodes
from okdpipe.scoring import SCORE_BATCH, drop_points, normalised_batches

Predict = Callable[[np.ndarray], np.ndarray]
METRIC = "mean squared logit error / mean squared FP32 logit, on the validation sample"


class OutOfBudget(Exception):
    """The tuning budget ran out in the middle of a measurement."""


@dataclass
class Probe:
    """A fixed sample of validation images and the FP32 model's logits on them: what each variant is held to."""

    inputs: np.ndarray
    labels: np.ndarray
    fp32_logits: np.ndarray

    @classmethod
    def from_split(cls, split, preprocess, samples: int, fp32: Predict) -> Probe:
        """The first `samples` validation images (a fixed choice: the same sample on every run)."""
        batches = list(normalised_batches(split, SCORE_BATCH, preprocess, limit=samples))
        inputs = np.concatenate([x for x, _ in batches])
        labels = np.concatenate([y for _, y in batches])
        return cls(inputs, labels, logits_of(fp32, inputs))

    @property
    def fp32_top1(self) -> float:
        return float(np.mean(np.argmax(self.fp32_logits, axis=1) == self.labels))

    def measure(self, predict: Predict) -> tuple[float | None, float | None]:
        """(relative logit error, top-1) of a variant on the sample; (None, None) if any logit is not finite."""
        logits = logits_of(predict, self.inputs)
        if not np.isfinite(logits).all():
            return None, None
        top1 = float(np.mean(np.argmax(logits, axis=1) == self.labels))
        return relative_error(logits, self.fp32_logits), top1


def logits_of(predict: Predict, inputs: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [np.asarray(predict(inputs[i : i + SCORE_BATCH])) for i in range(0, len(inputs), SCORE_BATCH)]
    )


def relative_error(logits: np.ndarray, reference: np.ndarray) -> float:
    """0 when the variant answers exactly as FP32; 1 when its error is as large as the FP32 logits themselves."""
    scale = float(np.mean(np.square(reference.astype(np.float64))))
    return float(np.mean(np.square(logits.astype(np.float64) - reference))) / max(scale, 1e-12)


def analyse(
    workbench: Int8Workbench,
    recipe: Recipe,
    probe: Probe,
    predictor: Callable[[Path], Predict],
    work_dir: Path,
    step: Callable[[int, int, str], None] = lambda done, total, node: None,
    out_of_budget: Callable[[], bool] = lambda: False,
) -> dict:
    """Rank every node `recipe` quantizes by the error it introduces alone (most sensitive first); `step`
    reports progress, `out_of_budget` is asked before each node (OutOfBudget when spent)."""
    path = Path(work_dir) / "sensitivity.onnx"
    workbench.quantize(recipe, path)
    int8_error, int8_top1 = probe.measure(predictor(path))
    nodes = quantized_nodes(path)
    rows = []
    for done, (name, op_type) in enumerate(nodes):
        if out_of_budget():
            raise OutOfBudget
        step(done, len(nodes), name)
        workbench.quantize(recipe, path, only=name)
        rows.append(node_row(name, op_type, *probe.measure(predictor(path)), probe.fp32_top1))
    step(len(nodes), len(nodes), "")
    return {
        "split": "val",
        "samples": len(probe.labels),
        "method": "quantize one node at a time, the others in FP32",
        "metric": METRIC,
        "measured_with": recipe.record(),
        "int8_error": int8_error,
        "int8_top1_drop_points": None if int8_top1 is None else drop_points(probe.fp32_top1, int8_top1),
        "nodes": ranked(rows),
    }


def node_row(name: str, op_type: str, error: float | None, top1: float | None, fp32_top1: float) -> dict:
    """One node's figures when it alone is quantized (None where the logits were not finite)."""
    return {
        "node": name,
        "op_type": op_type,
        "error": error,
        "top1_drop_points": None if top1 is None else drop_points(fp32_top1, top1),
    }


def ranked(rows: list[dict]) -> list[dict]:
    """Most sensitive first: non-finite logits, then the largest error (ties to the name)."""
    order = sorted(rows, key=lambda r: (r["error"] is not None, -(r["error"] or 0.0), r["node"]))
    return [{"rank": rank, **row} for rank, row in enumerate(order, start=1)]
