"""Splits (in memory or on disk), the stratified validation hold-out, the class-balanced subset, and the bundle."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from okdpipe.datasets.rng import STREAM_HOLDOUT, STREAM_SUBSET, cpu_generator
from okdpipe.datasets.spec import DatasetSpec
from okdpipe.errors import OkdpipeError
from okdpipe.files import missing_or_kind

UintBatch = tuple[torch.Tensor, torch.Tensor]  # uint8 [B, C, H, W], int64 [B]


class Split(Protocol):
    """What every split offers; loaders and export only rely on this."""

    labels: torch.Tensor

    def __len__(self) -> int: ...

    def iter_batches(self, batch_size: int) -> Iterator[UintBatch]: ...

    def read(self, index: int) -> np.ndarray: ...

    def subset(self, indices: torch.Tensor) -> Split: ...


class TensorSplit:
    """A split held in memory as one uint8 tensor [N, C, H, W]; the loader's fast path moves it to the device once."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            shape = tuple(images.shape)
            raise ValueError(f"TensorSplit needs uint8 [N,C,H,W] and N labels, got {images.dtype} {shape}")
        self.images = images
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def iter_batches(self, batch_size: int) -> Iterator[UintBatch]:
        for start in range(0, len(self), batch_size):
            yield self.images[start : start + batch_size], self.labels[start : start + batch_size]

    def read(self, index: int) -> np.ndarray:
        """One image as HWC uint8, the layout albumentations and cv2 expect."""
        return np.ascontiguousarray(self.images[index].permute(1, 2, 0).numpy())

    def subset(self, indices: torch.Tensor) -> TensorSplit:
        return TensorSplit(self.images[indices], self.labels[indices])


class FileSplit:
    """A split of image files decoded on demand by `decode(path) -> HWC uint8` (a picklable callable for workers)."""

    def __init__(self, paths: Sequence[Path], labels: torch.Tensor, decode: Callable[[Path], np.ndarray]):
        self.paths = tuple(paths)
        self.labels = labels.to(torch.int64)
        self.decode = decode

    def __len__(self) -> int:
        return len(self.labels)

    def iter_batches(self, batch_size: int) -> Iterator[UintBatch]:
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            images = [torch.from_numpy(self.read(i)).permute(2, 0, 1) for i in range(start, stop)]
            yield torch.stack(images), self.labels[start:stop]

    def read(self, index: int) -> np.ndarray:
        return self.decode(self.paths[index])

    def subset(self, indices: torch.Tensor) -> FileSplit:
        return FileSplit([self.paths[i] for i in indices.tolist()], self.labels[indices], self.decode)


@dataclass
class RawDataset:
    """What a registered loader returns: the official splits (val only where the dataset ships one)."""

    spec: DatasetSpec
    train: Split
    test: Split
    fingerprint: str
    source: str
    val: Split | None = None


@dataclass
class DataBundle:
    """The three splits a pipeline run uses, with provenance: sha256 over what was read, and from where."""

    spec: DatasetSpec
    train: Split
    val: Split
    test: Split
    fingerprint: str
    source: str


def class_indices(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Indices of each class, in ascending order."""
    return [torch.nonzero(labels == c).flatten() for c in range(num_classes)]


def stratified_holdout(
    split: Split, fraction: float, num_classes: int, seed: int, names: Sequence[str] | None = None
) -> tuple[Split, Split]:
    """Hold out round(fraction * n_c) images of every class c, chosen by `seed`, so val has train's class mix.

    With fraction > 0 every class gives at least one validation image and keeps at least one training image
    (a small class of an unbalanced folder would otherwise be missing from validation, or from training); a
    class of fewer than two images cannot, and is an error naming it. Both parts keep the original order (indices
    sorted), so the result is independent of how classes interleave.
    """
    if not 0.0 <= fraction < 1.0:
        raise OkdpipeError(f"val_split must be in [0, 1), got {fraction}; pass e.g. --val-split 0.1")
    generator = cpu_generator(seed, STREAM_HOLDOUT)
    held = []
    for c, members in enumerate(class_indices(split.labels, num_classes)):
        count = held_out_count(len(members), fraction, names[c] if names else str(c))
        held.append(members[torch.randperm(len(members), generator=generator)][:count])
    val_mask = torch.zeros(len(split), dtype=torch.bool)
    val_mask[torch.cat(held)] = True
    return split.subset(torch.nonzero(~val_mask).flatten()), split.subset(torch.nonzero(val_mask).flatten())


def held_out_count(size: int, fraction: float, name: str) -> int:
    """round(fraction * size), kept within [1, size - 1] when fraction > 0."""
    if fraction == 0:
        return 0
    if size < 2:
        raise OkdpipeError(
            f"class {name!r} has {size} training image(s): holding out a validation split needs at least 2 per "
            "class (one to train on, one to validate); add images of it, or provide a val/ split"
        )
    return min(max(1, int(round(fraction * size))), size - 1)


def balanced_subset(split: Split, per_class: int, labels: Sequence[str], seed: int) -> Split:
    """Keep `per_class` images of every class, chosen by `seed` (for few-shot and quick runs)."""
    if per_class < 1:
        raise OkdpipeError(f"train_subset must be a positive per-class count, got {per_class}")
    generator = cpu_generator(seed, STREAM_SUBSET)
    kept = []
    for name, members in zip(labels, class_indices(split.labels, len(labels))):
        if len(members) < per_class:
            raise OkdpipeError(
                f"train_subset={per_class} but class {name!r} has only {len(members)} training images; lower it"
            )
        kept.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return split.subset(torch.sort(torch.cat(kept)).values)


def require_dir(data_dir: Path) -> None:
    if not data_dir.is_dir():
        raise OkdpipeError(
            f"--data-dir {data_dir}: {missing_or_kind(data_dir, 'a data directory')}; "
            "pass --data-dir with a folder of the data"
        )


def check_labels(labels: np.ndarray, num_classes: int, source: Path | str) -> None:
    """Labels outside [0, num_classes) mean a corrupt or mismatched file; say which."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise OkdpipeError(
            f"{source}: labels out of range [{labels.min()}, {labels.max()}] for {num_classes} classes; "
            "the file is corrupt or belongs to another dataset"
        )
