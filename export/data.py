"""Real images for export: validation inputs for parity and accuracy, training images for calibration.

The split is rebuilt from the model file's provenance (`provenance["data"]`: dataset, data_dir,
val_split, seed) so the validation images are exactly the ones selection scored on, never test images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from okdpipe.errors import OkdpipeError


@dataclass
class Normaliser:
    """x = (pixel * scale - mean) / std per channel: the same arithmetic the model card tells servers."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1.0 / 255.0

    def __call__(self, pixels) -> np.ndarray:
        array = np.asarray(pixels, dtype=np.float32) * np.float32(self.scale)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        return (array - mean) / std


def data_source(info, data_dir: str | None) -> dict[str, Any]:
    """Where the model's data came from; `--data-dir` overrides the recorded directory."""
    source = dict(info.provenance.get("data") or {"dataset": info.dataset})
    if not source.get("dataset"):
        raise OkdpipeError("model file records no dataset; export needs one to check parity and accuracy")
    if data_dir is not None:
        source["data_dir"] = str(data_dir)
    return source


def load_splits(info, data_dir: str | None = None):
    """(train, val) splits of the dataset the model was selected on."""
    from okdpipe.datasets import load_dataset

    source = data_source(info, data_dir)
    bundle = load_dataset(
        source["dataset"], source.get("data_dir"),
        val_split=float(source.get("val_split", 0.1)), seed=int(source.get("seed", 0)),
        **dict(source.get("options") or {}),  # loader options (e.g. synthetic's size), when recorded
    )
    if bundle.val is None or len(bundle.val) == 0:
        raise OkdpipeError(f"dataset {source['dataset']!r} has an empty validation split; record val_split > 0")
    return bundle.train, bundle.val


def normalised_batches(split, batch_size: int, normalise: Normaliser, limit: int | None = None
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(float32 NCHW inputs, int64 labels) batches, at most `limit` images in all."""
    seen = 0
    for pixels, labels in split.iter_batches(batch_size):
        if limit is not None and seen >= limit:
            return
        keep = len(labels) if limit is None else min(len(labels), limit - seen)
        seen += keep
        yield normalise(pixels[:keep]), np.asarray(labels[:keep], dtype=np.int64)


def first_batch(split, batch_size: int, normalise: Normaliser) -> np.ndarray:
    return next(normalised_batches(split, batch_size, normalise, limit=batch_size))[0]


def top1_accuracy(predict, split, normalise: Normaliser, batch_size: int = 256) -> tuple[float, int]:
    """Top-1 accuracy of `predict` (batch -> logits) over the whole split; returns (accuracy, samples)."""
    correct = total = 0
    for inputs, labels in normalised_batches(split, batch_size, normalise):
        correct += int(np.sum(predict(inputs).argmax(1) == labels))
        total += len(labels)
    return correct / max(total, 1), total
