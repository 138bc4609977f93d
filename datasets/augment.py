"""Batched augmentation on the device: per-sample crop, flip and cutout without a Python loop over samples.

Parameters are drawn on the CPU from a seeded torch.Generator and only then moved to the device, so a given
(seed, epoch) produces the same pixels on CPU and GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from okdpipe.datasets.spec import AugmentConfig


@dataclass
class AugmentDraws:
    """Per-sample parameters of one epoch, indexed [view, position in the epoch's order].

    offsets: int64 [V, N, 2], (dy, dx) of the crop window inside the padded image, each in [0, 2 * padding].
    flips: bool [V, N], mirror left-right.
    centres: int64 [V, N, 2], (y, x) of the cutout square's centre, uniform over the image.
    """

    offsets: torch.Tensor
    flips: torch.Tensor
    centres: torch.Tensor

    def to(self, device: torch.device) -> AugmentDraws:
        return AugmentDraws(self.offsets.to(device), self.flips.to(device), self.centres.to(device))

    def window(self, start: int, stop: int) -> AugmentDraws:
        """Positions [start, stop) of every view, flattened view-major to [V * B, ...]."""
        return AugmentDraws(
            self.offsets[:, start:stop].reshape(-1, 2),
            self.flips[:, start:stop].reshape(-1),
            self.centres[:, start:stop].reshape(-1, 2),
        )


def draw_augment(
    generator: torch.Generator, views: int, count: int, config: AugmentConfig, size: tuple[int, int]
) -> AugmentDraws:
    """Every parameter is drawn whatever the config, so enabling one augmentation never shifts another's draws."""
    height, width = size
    offsets = torch.randint(0, 2 * config.crop_padding + 1, (views, count, 2), generator=generator)
    flips = torch.rand((views, count), generator=generator) < 0.5
    centres = torch.stack(
        [
            torch.randint(0, height, (views, count), generator=generator),
            torch.randint(0, width, (views, count), generator=generator),
        ],
        dim=-1,
    )
    return AugmentDraws(offsets, flips & config.hflip, centres)


def crop_and_flip(images: torch.Tensor, draws: AugmentDraws, padding: int) -> torch.Tensor:
    """uint8 [B, C, H, W] -> [V * B, C, H, W]: zero-pad once, then one gather with per-sample row/column indices.

    A flipped crop reads its window's columns in reverse, so crop and flip are the same gather.
    """
    count, channels, height, width = images.shape
    padded = F.pad(images, (padding,) * 4) if padding else images
    device = images.device
    rows = draws.offsets[:, :1] + torch.arange(height, device=device)
    cols = draws.offsets[:, 1:] + torch.arange(width, device=device)
    cols = torch.where(draws.flips[:, None], cols.flip(1), cols)
    sample = torch.arange(len(rows), device=device) % count  # view-major: entry v * B + b reads image b
    channel = torch.arange(channels, device=device)
    return padded[
        sample[:, None, None, None], channel[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]
    ]


def cutout_keep_mask(centres: torch.Tensor, side: int, size: tuple[int, int]) -> torch.Tensor:
    """bool [N, H, W], False inside the side x side square starting at centre - side // 2 (clipped at the border)."""
    height, width = size
    top_left = centres - side // 2
    rows = torch.arange(height, device=centres.device)
    cols = torch.arange(width, device=centres.device)
    in_rows = (rows >= top_left[:, :1]) & (rows < top_left[:, :1] + side)
    in_cols = (cols >= top_left[:, 1:]) & (cols < top_left[:, 1:] + side)
    return ~(in_rows[:, :, None] & in_cols[:, None, :])


def normalise(
    images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 [..., C, H, W] -> float32 (x / 255 - mean) / std; cutout zeroes after normalising (DeVries & Taylor
    2017), so a hole carries the dataset mean rather than black. Both loader paths use this one function."""
    out = images.float().div_(255).sub_(mean[:, None, None]).div_(std[:, None, None])
    if keep is not None:
        out.mul_(keep.unsqueeze(-3))
    return out


def augment_batch(
    images: torch.Tensor, draws: AugmentDraws, config: AugmentConfig, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """uint8 [B, C, H, W] and V views' draws -> normalised float32 [V, B, C, H, W], each view its own draw."""
    views = len(draws.flips) // len(images)
    if config.crop_padding or config.hflip:
        pixels = crop_and_flip(images, draws, config.crop_padding)
    else:
        pixels = images.repeat(views, 1, 1, 1)
    keep = cutout_keep_mask(draws.centres, config.cutout, tuple(images.shape[-2:])) if config.cutout else None
    return normalise(pixels, mean, std, keep).unflatten(0, (views, len(images)))
