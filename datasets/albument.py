"""The albumentations path: decode per sample (PIL), augment per view on the CPU, collate into uint8 batches.

Every sample's draw is seeded from (seed, epoch, index, view), so an epoch is reproducible whatever the number of
workers and whichever worker serves the sample.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from okdpipe.datasets.rng import STREAM_SAMPLE, derive_seed
from okdpipe.datasets.spec import AugmentConfig
from okdpipe.datasets.splits import Split
from okdpipe.foreign import ForeignBreach

SampleKey = tuple[int, int]  # (epoch, index into the split)


def cutout_transforms(side: int, size: tuple[int, int]) -> list[A.BasicTransform]:
    """DeVries-style cutout from CoarseDropout, which only places holes wholly inside the image.

    Padding side // 2 before and side - side // 2 - 1 after makes the hole's top-left range over exactly H (W)
    positions, i.e. centre - side // 2 for a centre uniform over the image; cropping back clips the hole at the
    border. The mask (1 = keep) records the hole so it is zeroed after normalising, as on the tensor path.
    """
    height, width = size
    before, after = side // 2, side - side // 2 - 1
    return [
        A.Pad(padding=(before, before, after, after), fill=0, fill_mask=1),  # (left, top, right, bottom)
        A.CoarseDropout(
            num_holes_range=(1, 1),
            hole_height_range=(side, side),
            hole_width_range=(side, side),
            fill=0,
            fill_mask=0,
            p=1.0,
        ),
        A.Crop(x_min=before, y_min=before, x_max=before + width, y_max=before + height),
    ]


def albumentations_pipeline(config: AugmentConfig, size: tuple[int, int]) -> A.Compose:
    """Zero-pad + random crop, horizontal flip, cutout: the same operations, order and ranges as augment.py."""
    height, width = size
    padding = config.crop_padding
    steps: list[A.BasicTransform] = []
    if padding:
        steps += [
            A.PadIfNeeded(
                min_height=height + 2 * padding,
                min_width=width + 2 * padding,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=1,
            ),
            A.RandomCrop(height=height, width=width),
        ]
    if config.hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if config.cutout:
        steps += cutout_transforms(config.cutout, size)
    return A.Compose(steps)


class AugmentedViews(Dataset):
    """Item (epoch, index) -> (uint8 views [V, C, H, W], keep mask bool [V, H, W] or None, label)."""

    def __init__(
        self, split: Split, config: AugmentConfig, views: int, seed: int, size: tuple[int, int], channels: int
    ):
        self.split, self.config, self.views, self.seed = split, config, views, seed
        self.shape = (*size, channels)  # what every read() must give: HWC
        self.pipeline = None if config.is_identity else albumentations_pipeline(config, size)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        epoch, index = key
        image = self.split.read(index)
        self.check_image(image, index)
        drawn = [
            self.draw_view(image, derive_seed(self.seed, epoch, index, view, STREAM_SAMPLE))
            for view in range(self.views)
        ]
        pixels = torch.stack([torch.from_numpy(p).permute(2, 0, 1) for p, _ in drawn])
        keep = torch.stack([torch.from_numpy(k) for _, k in drawn]) if self.config.cutout else None
        return pixels, keep, int(self.split.labels[index])

    def check_image(self, image: object, index: int) -> None:
        """A split read image by image is a plug-in's (its decode or its own Split): an image of another dtype or
        shape would fail later in augmentation or collation, far from its cause."""
        if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == self.shape:
            return
        got = f"{image.dtype} {list(image.shape)}" if isinstance(image, np.ndarray) else f"a {type(image).__name__}"
        paths = getattr(self.split, "paths", None)
        which = f"image {index}" + (f" ({paths[index]})" if paths is not None else "")
        raise ForeignBreach(
            "dataset", f"{which} was read as {got}, expected uint8 {list(self.shape)} (height, width, channels)"
        )

    def draw_view(self, image: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self.pipeline is None:
            return image, None
        self.pipeline.set_random_seed(seed)
        if not self.config.cutout:
            return self.pipeline(image=image)["image"], None
        out = self.pipeline(image=image, mask=np.ones(image.shape[:2], dtype=np.uint8))
        return out["image"], out["mask"].astype(bool)


def collate_views(
    samples: list[tuple[torch.Tensor, torch.Tensor | None, int]],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """-> uint8 [V, B, C, H, W], keep [V, B, H, W] or None, int64 labels [B] (view-major like the tensor path)."""
    pixels = torch.stack([s[0] for s in samples], dim=1)
    keep = torch.stack([s[1] for s in samples], dim=1) if samples[0][1] is not None else None
    return pixels, keep, torch.tensor([s[2] for s in samples], dtype=torch.int64)
