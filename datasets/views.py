"""Per-view augmentation policies on the device-side batched path: each view (each student) gets its own KIND of
augmentation, drawn per image, on top of the dataset's crop (and flip, where the view keeps it).

OKDPH's official code trains every model on a different augmentation type; methods.md lists crop+flip,
crop+flip+cutout(16), crop+RandAugment(2, 9) and crop+flip+rotate(15) for CIFAR-100's first student. Policy
"okdph" (`view_policy`): student 0 crop+flip+rotate(15), student 1 crop+flip+cutout(16), further students
alternate the two, and the hybrid's view (the last) crop+RandAugment(2, 9), no flip. Policy "same": every view
a fresh draw of the dataset's own augmentation (okdpipe's behaviour before issue 14).

Everything is per image and batched: the parameters are drawn on the CPU from the epoch's generator (after the
crop/flip/cutout draws, which they never shift), geometric transforms are one `grid_sample` with a per-image
affine matrix, and each RandAugment op runs once per slot on the images that drew it. RandAugment follows
torchvision's op set and magnitude scale (Cubuk et al. 2020; magnitude M of 30 bins), except Equalize, which
uses the plain CDF mapping (PIL also spreads its steps evenly; the results differ by at most a grey level).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from okdpipe.datasets.augment import AugmentDraws, crop_and_flip, cutout_keep_mask, normalise
from okdpipe.datasets.spec import AugmentConfig
from okdpipe.errors import OkdpipeError

POLICIES = ("same", "okdph")


@dataclass(frozen=True)
class ViewAugment:
    """One view's augmentation beyond the dataset's crop: flip kept or not, cutout side, rotation range in
    degrees (uniform in [-rotate, rotate]), RandAugment (ops per image N, magnitude M of 30; N = 0: off)."""

    hflip: bool = True
    cutout: int = 0
    rotate: float = 0.0
    randaugment: tuple[int, int] = (0, 0)


FLIP_ROTATE = ViewAugment(rotate=15.0)
FLIP_CUTOUT = ViewAugment(cutout=16)
RANDAUGMENT = ViewAugment(hflip=False, randaugment=(2, 9))


def view_policy(name: str, views: int) -> tuple[ViewAugment, ...] | None:
    """The per-view augmentations of policy `name` for `views` views (None: every view the dataset's own)."""
    if name not in POLICIES:
        raise OkdpipeError(f"unknown augmentation policy {name!r}; choose one of: {', '.join(POLICIES)}")
    if name == "same" or views < 2:
        return None
    students = tuple(FLIP_ROTATE if i % 2 == 0 else FLIP_CUTOUT for i in range(views - 1))
    return (*students, RANDAUGMENT)


@dataclass
class PolicyDraws:
    """Per-image parameters [V, N, ...]: rotation angles (degrees), RandAugment op indices and signs per slot."""

    angles: torch.Tensor
    ops: torch.Tensor
    signs: torch.Tensor

    def to(self, device: torch.device) -> PolicyDraws:
        return PolicyDraws(self.angles.to(device), self.ops.to(device), self.signs.to(device))

    def window(self, start: int, stop: int) -> PolicyDraws:
        return PolicyDraws(self.angles[:, start:stop], self.ops[:, start:stop], self.signs[:, start:stop])


def draw_policy(generator: torch.Generator, policy: tuple[ViewAugment, ...], count: int) -> PolicyDraws:
    """Every view draws the same shapes whatever it uses, so changing one view never shifts another's draws."""
    views, slots = len(policy), max(v.randaugment[0] for v in policy)
    ranges = torch.tensor([v.rotate for v in policy])[:, None]
    angles = (torch.rand((views, count), generator=generator) * 2 - 1) * ranges
    ops = torch.randint(0, len(OPS), (views, count, slots), generator=generator)
    signs = torch.where(torch.rand((views, count, slots), generator=generator) < 0.5, -1.0, 1.0)
    return PolicyDraws(angles, ops, signs)


def affine(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Per-image affine warp about the centre (normalised coordinates), zero fill, nearest neighbour (the
    default of torchvision's RandomRotation and RandAugment): [n, C, H, W], [n, 2, 3]."""
    grid = F.affine_grid(matrices.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate image i by degrees[i] (counter-clockwise on screen)."""
    theta = degrees * math.pi / 180
    cos, sin = torch.cos(theta), torch.sin(theta)
    rows = [torch.stack([cos, -sin, torch.zeros_like(cos)], 1), torch.stack([sin, cos, torch.zeros_like(cos)], 1)]
    return affine(images, torch.stack(rows, 1))


def shear_or_translate(images: torch.Tensor, amount: torch.Tensor, entry: tuple[int, int]) -> torch.Tensor:
    """Identity affine with one entry set per image: (0, 1) shear x, (1, 0) shear y, (0, 2) / (1, 2) translate
    (in normalised units: 2 = the image's width or height)."""
    matrices = torch.eye(2, 3, device=images.device).repeat(len(images), 1, 1)
    matrices[:, entry[0], entry[1]] = amount
    return affine(images, matrices)


def grey(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma (PIL's "L"), [n, 1, H, W]; single-channel images are their own grey."""
    if images.shape[1] == 1:
        return images
    return (images * torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)).sum(1, True)


def blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: other + factor * (image - other), clamped to [0, 1]."""
    return (other + factor.view(-1, 1, 1, 1) * (images - other)).clamp(0, 1)


def smooth(images: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH kernel (centre 5, others 1, / 13), border pixels kept, for Sharpness."""
    kernel = torch.ones(3, 3, device=images.device)
    kernel[1, 1] = 5
    channels = images.shape[1]
    out = F.conv2d(images, (kernel / 13).expand(channels, 1, 3, 3), padding=1, groups=channels)
    out[..., [0, -1], :], out[..., :, [0, -1]] = images[..., [0, -1], :], images[..., :, [0, -1]]
    return out


def equalize(images: torch.Tensor) -> torch.Tensor:
    """Per image and channel, grey levels mapped through their CDF: (cdf - cdf_min) / (total - cdf_min)."""
    levels = (images * 255).round().long().flatten(2)
    hist = torch.zeros(*levels.shape[:2], 256, device=images.device).scatter_add_(
        2, levels, torch.ones_like(levels, dtype=torch.float)
    )
    cdf = hist.cumsum(2)
    low = cdf.gather(2, levels.min(2, keepdim=True).values)
    lut = ((cdf - low) / (cdf[..., -1:] - low).clamp_min(1)).clamp(0, 1)
    return lut.gather(2, levels).view_as(images)


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """Per image and channel, stretch [min, max] to [0, 1] (constant channels unchanged)."""
    low, high = images.amin((2, 3), keepdim=True), images.amax((2, 3), keepdim=True)
    span = high - low
    return torch.where(span > 0, (images - low) / span.clamp_min(1e-12), images)


def posterize(images: torch.Tensor, level: float) -> torch.Tensor:
    """Keep 8 - round(4 level) bits (torchvision's bins: 7 bits at M = 9)."""
    drop = 2 ** int(round(4 * level))
    return torch.floor(images * 255 / drop) * drop / 255


# RandAugment's ops (torchvision's list) on images in [0, 1]: f(images, signs, level), level = M / 30.
OPS = (
    lambda x, s, lv: x,
    lambda x, s, lv: shear_or_translate(x, -s * 0.3 * lv, (0, 1)),
    lambda x, s, lv: shear_or_translate(x, -s * 0.3 * lv, (1, 0)),
    lambda x, s, lv: shear_or_translate(x, -s * 2 * (150 / 331) * lv, (0, 2)),
    lambda x, s, lv: shear_or_translate(x, -s * 2 * (150 / 331) * lv, (1, 2)),
    lambda x, s, lv: rotate(x, s * 30 * lv),
    lambda x, s, lv: blend(x, torch.zeros_like(x), 1 + s * 0.9 * lv),  # Brightness
    lambda x, s, lv: blend(x, grey(x).repeat(1, x.shape[1], 1, 1), 1 + s * 0.9 * lv),  # Color
    lambda x, s, lv: blend(x, grey(x).mean((1, 2, 3), keepdim=True).expand_as(x), 1 + s * 0.9 * lv),  # Contrast
    lambda x, s, lv: blend(x, smooth(x), 1 + s * 0.9 * lv),  # Sharpness
    lambda x, s, lv: posterize(x, lv),
    lambda x, s, lv: torch.where(x >= 1 - lv, 1 - x, x),  # Solarize, threshold 255 (1 - M/30)
    lambda x, s, lv: autocontrast(x),
    lambda x, s, lv: equalize(x),
)


def randaugment(images: torch.Tensor, ops: torch.Tensor, signs: torch.Tensor, count: int, level: float):
    """`count` slots; in each, every image applies the op it drew (each op runs once, on its images)."""
    out = images.clone()
    for slot in range(count):
        for index, op in enumerate(OPS):
            chosen = torch.nonzero(ops[:, slot] == index).flatten()
            if len(chosen):
                out[chosen] = op(out[chosen], signs[chosen, slot], level).to(out.dtype)
    return out


def augment_policy(
    images: torch.Tensor,
    draws: AugmentDraws,
    extra: PolicyDraws,
    config: AugmentConfig,
    policy: tuple[ViewAugment, ...],
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """uint8 [B, C, H, W] -> normalised float32 [V, B, C, H, W]: the dataset's crop, then view v's flip,
    rotation, RandAugment and cutout (the `augment_batch` of per-view policies)."""
    count, size = len(images), tuple(images.shape[-2:])
    kept = torch.tensor([v.hflip for v in policy], device=images.device)[:, None]
    flips = draws.flips.view(len(policy), count) & kept
    cropped = crop_and_flip(images, AugmentDraws(draws.offsets, flips.flatten(), draws.centres), config.crop_padding)
    views = cropped.float().div_(255).unflatten(0, (len(policy), count))
    out = []
    for v, view in enumerate(policy):
        pixels = views[v]
        if view.rotate:
            pixels = rotate(pixels, extra.angles[v])
        if view.randaugment[0]:
            slots, magnitude = view.randaugment
            pixels = randaugment(pixels, extra.ops[v], extra.signs[v], slots, magnitude / 30)
        side = view.cutout or config.cutout
        keep = cutout_keep_mask(draws.centres.view(len(policy), count, 2)[v], side, size) if side else None
        out.append(normalise(pixels.mul(255), mean, std, keep))
    return torch.stack(out)
