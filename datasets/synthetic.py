"""A tiny deterministic dataset for tests: class-dependent smooth patterns plus noise, learnable by a small net."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from okdpipe.datasets.rng import STREAM_SYNTHETIC, cpu_generator
from okdpipe.datasets.spec import DATASETS, AugmentConfig, DatasetSpec
from okdpipe.datasets.splits import RawDataset, TensorSplit
from okdpipe.errors import OkdpipeError

NOISE_LEVEL = 40.0  # pixel std of the per-image noise on top of the class pattern (0..255 scale)


def class_patterns(generator: torch.Generator, num_classes: int, channels: int, size: int) -> torch.Tensor:
    """One smooth pattern per class in [0, 255]: random 4x4 grids upsampled, made left-right symmetric so a
    horizontal flip (the default augmentation) keeps an image's class."""
    coarse = torch.rand(num_classes, channels, 4, 4, generator=generator)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return 255.0 * (smooth + smooth.flip(-1)) / 2


def sample_split(patterns: torch.Tensor, count: int, generator: torch.Generator) -> TensorSplit:
    """Labels cycle through the classes (balanced); each image is its class pattern plus Gaussian noise."""
    labels = torch.arange(count) % len(patterns)
    noise = NOISE_LEVEL * torch.randn((count, *patterns.shape[1:]), generator=generator)
    images = (patterns[labels] + noise).round().clamp(0, 255).to(torch.uint8)
    return TensorSplit(images, labels)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pixels = images.double().div(255).transpose(0, 1).flatten(1)
    return tuple(round(v, 4) for v in pixels.mean(1).tolist()), tuple(round(v, 4) for v in pixels.std(1).tolist())


@DATASETS.register("synthetic")
def load_synthetic(
    data_dir: None = None,
    *,
    num_classes: int = 4,
    size: int = 16,
    channels: int = 3,
    n_train: int = 64,
    n_test: int = 32,
    data_seed: int = 0,
) -> RawDataset:
    """Everything is a function of the options (data_seed picks the patterns and noise; data_dir is ignored).
    mean/std are measured on the generated training images. Fingerprint: sha256 of all images and labels."""
    if min(num_classes, size, channels, n_train) < 1 or n_test < 0:
        raise OkdpipeError("synthetic needs num_classes, size, channels, n_train >= 1 and n_test >= 0")
    generator = cpu_generator(data_seed, STREAM_SYNTHETIC)
    patterns = class_patterns(generator, num_classes, channels, size)
    train, test = sample_split(patterns, n_train, generator), sample_split(patterns, n_test, generator)
    mean, std = channel_stats(train.images)
    spec = DatasetSpec(
        name="synthetic",
        num_classes=num_classes,
        labels=tuple(f"class{c}" for c in range(num_classes)),
        in_channels=channels,
        input_size=(size, size),
        mean=mean,
        std=std,
        augment=AugmentConfig(crop_padding=2, hflip=True),
    )
    digest = hashlib.sha256()
    for split in (train, test):
        digest.update(split.images.numpy().tobytes() + split.labels.numpy().tobytes())
    return RawDataset(spec, train, test, digest.hexdigest(), f"synthetic(seed={data_seed})")
