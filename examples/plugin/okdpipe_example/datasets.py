"""`fmnist-footwear`: a dataset made from another one, as your own data often is.

A dataset loader takes the data directory and options and returns okdpipe's `RawDataset`: a `DatasetSpec`
(labels, channels, size, normalisation, augmentation), the train and test splits as uint8 tensors, a fingerprint
of what was read and where it came from. okdpipe adds the validation hold-out and `--train-subset`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from okdpipe.datasets import DATASETS, DatasetSpec, TensorSplit
from okdpipe.datasets.fashion_mnist import SPEC as FASHION_MNIST
from okdpipe.datasets.fashion_mnist import load_fashion_mnist
from okdpipe.datasets.splits import RawDataset

FOOTWEAR = (5, 7, 9)  # Fashion-MNIST's Sandal, Sneaker, Ankle boot

SPEC = DatasetSpec(
    name="fmnist-footwear",
    num_classes=len(FOOTWEAR),
    labels=tuple(FASHION_MNIST.labels[c] for c in FOOTWEAR),
    in_channels=1,
    input_size=(28, 28),
    mean=FASHION_MNIST.mean,
    std=FASHION_MNIST.std,
    augment=FASHION_MNIST.augment,
)


def footwear(split: TensorSplit) -> TensorSplit:
    """The split's footwear images, relabelled 0..2 in FOOTWEAR's order."""
    keep = torch.isin(split.labels, torch.tensor(FOOTWEAR))
    relabel = torch.full((10,), -1, dtype=torch.int64)
    relabel[list(FOOTWEAR)] = torch.arange(len(FOOTWEAR))
    return TensorSplit(split.images[keep], relabel[split.labels[keep]])


@DATASETS.register("fmnist-footwear")
def load_footwear(data_dir: Path | None = None) -> RawDataset:
    """18,000 train / 3,000 test images, 28x28 grayscale, 3 classes; Fashion-MNIST's files, found as it finds them."""
    full = load_fashion_mnist(data_dir)
    fingerprint = hashlib.sha256(f"footwear{FOOTWEAR}:{full.fingerprint}".encode()).hexdigest()
    return RawDataset(SPEC, footwear(full.train), footwear(full.test), fingerprint, full.source)
