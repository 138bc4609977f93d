"""What a dataset is, independent of where its pixels live: classes, input geometry, normalisation, augmentation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from okdpipe.contracts.card import RESIZE_POLICIES
from okdpipe.errors import OkdpipeError
from okdpipe.registry import Registry


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation, applied per sample and per view.

    crop_padding: pixels of zero padding per side before a random crop back to the input size (0 = off).
    hflip: mirror left-right with probability 0.5.
    cutout: side in pixels of a square zeroed (in normalised space, i.e. set to the dataset mean) around a
        centre drawn uniformly over the image and clipped at the border, as in DeVries & Taylor 2017 (0 = off).
    """

    crop_padding: int = 0
    hflip: bool = False
    cutout: int = 0

    def __post_init__(self) -> None:
        if self.crop_padding < 0 or self.cutout < 0:
            raise OkdpipeError(f"augmentation sizes must be >= 0, got {self}; fix crop_padding/cutout")

    @property
    def is_identity(self) -> bool:
        return self.crop_padding == 0 and not self.hflip and self.cutout == 0


NO_AUGMENT = AugmentConfig()


@dataclass(frozen=True)
class DatasetSpec:
    """Everything a model, an exporter or a server needs to know about the inputs, and nothing about files."""

    name: str
    num_classes: int
    labels: tuple[str, ...]
    in_channels: int
    input_size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...]  # per channel, for pixels scaled to [0, 1]
    std: tuple[float, ...]
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    resize: str = "stretch"  # how images of another size were brought to input_size (the model card records it)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_POLICIES:
            raise OkdpipeError(f"resize {self.resize!r} is not one of: {', '.join(RESIZE_POLICIES)}")
        if len(self.labels) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.labels)} label names for {self.num_classes} classes")
        if not len(self.mean) == len(self.std) == self.in_channels:
            raise ValueError(f"{self.name}: mean/std need one value per channel ({self.in_channels})")


# Each loader takes (data_dir, **options) and returns a `RawDataset` (see splits.py); load_dataset adds the
# validation hold-out and the training subset on top, so that logic exists once.
DATASETS: Registry[Callable[..., object]] = Registry("dataset")
