"""Scoring a classifier on real images: the one top-k accuracy computation (numpy) that export's checks and bench
both use, over batches normalised by the model card's one formula (`Preprocess.normalise`).

A prediction function maps a float32 batch [B, C, H, W] to logits [B, K] (ONNX Runtime or eager PyTorch alike).
Non-finite logits are never scored as if they were fine: `score` raises GateFailed, naming how many rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from okdpipe.errors import GateFailed, OkdpipeError
from okdpipe.progress import progress

Predict = Callable[[np.ndarray], np.ndarray]
SCORE_BATCH = 256
DROP_DECIMALS = 9  # a real drop is a multiple of 100/N points (N images): 1e-4 or coarser up to a million images


def drop_points(reference_top1: float, top1: float) -> float:
    """How many percentage points `top1` lies below `reference_top1`, rounded to DROP_DECIMALS. Rounding takes off
    the float error of a difference of two fractions, which would otherwise put a drop of exactly the limit over
    it: (0.30 - 0.29) * 100 is 1.0000000000000009, and `--max-accuracy-drop 1` would refuse one image in 100."""
    return round((reference_top1 - top1) * 100.0, DROP_DECIMALS)


def normalised_batches(
    split, batch_size: int, preprocess, limit: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(float32 NCHW inputs, int64 labels) from a dataset split (`iter_batches` of uint8 pixels), at most
    `limit` images in all."""
    seen = 0
    for pixels, labels in split.iter_batches(batch_size):
        if limit is not None and seen >= limit:
            return
        keep = len(labels) if limit is None else min(len(labels), limit - seen)
        seen += keep
        yield preprocess.normalise(pixels[:keep]), np.asarray(labels[:keep], dtype=np.int64)


def first_batch(split, batch_size: int, preprocess) -> np.ndarray:
    return next(normalised_batches(split, batch_size, preprocess, limit=batch_size))[0]


@dataclass
class TopK:
    """Top-1 and top-5 hits; ties go to the lower class index, as argmax does."""

    top1_hits: int = 0
    top5_hits: int = 0
    samples: int = 0

    def add(self, logits: np.ndarray, labels: np.ndarray) -> None:
        ranked = np.argsort(-logits, axis=1, kind="stable")[:, : min(5, logits.shape[1])]
        hits = ranked == labels[:, None]
        self.top1_hits += int(hits[:, 0].sum())
        self.top5_hits += int(hits.any(axis=1).sum())
        self.samples += len(labels)

    @property
    def top1(self) -> float:
        return self.top1_hits / max(self.samples, 1)

    @property
    def top5(self) -> float:
        return self.top5_hits / max(self.samples, 1)


def score(predict: Predict, split, preprocess, *, what: str, batch_size: int = SCORE_BATCH) -> TopK:
    """Top-k accuracy of `predict` over the whole split. A non-finite logit is a failed check on the model
    (GateFailed, exit code 1, as export's parity check treats it), never an accuracy."""
    result = TopK()
    with progress(len(split), f"accuracy of {what}") as advance:
        for inputs, labels in normalised_batches(split, batch_size, preprocess):
            logits = np.asarray(predict(inputs))
            bad_rows = int((~np.isfinite(logits)).any(axis=1).sum())
            if bad_rows:
                raise GateFailed(
                    f"{what} gives non-finite logits (NaN or inf) for {bad_rows} of {len(labels)} "
                    "images in a batch; its weights are damaged or diverged: retrain or re-select"
                )
            result.add(logits, labels)
            advance(len(labels))
    if result.samples == 0:
        raise OkdpipeError(f"{what}: the split to score on is empty")
    return result
