"""A decoded image -> the model's uint8 pixels: one function that training, export, bench and `/classify` share.

An image folder holds whatever people have (grayscale, RGBA screenshots, palette GIFs, CMYK JPEGs, 16-bit PNGs,
phone photos with an EXIF rotation, every size). Training decodes them with `image_pixels` and the model card
records the resize policy, so `okdpipe serve` turns the same file into the same input, value for value.

Torch-free: `okdpipe serve` imports it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from okdpipe.contracts.card import RESIZE_POLICIES

# RESIZE_POLICIES, how an image of another size reaches the model's (height, width):
#   stretch       resize to exactly (height, width), ignoring the aspect ratio (what okdpipe always did);
#   shorter-side  scale so the image covers (height, width), then cut the centre out (torchvision's
#                 Resize + CenterCrop, in one resampling step: ImageOps.fit).
RESAMPLE = Image.Resampling.BILINEAR
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_TARGET_MODES = {1: "L", 3: "RGB"}
# The formats decoded, by training and by `/classify` alike (Pillow's names; a phone's MPO opens as JPEG). Pillow
# would also open EPS (by running Ghostscript on the bytes), PSD, ICO and dozens more; a file of another format is
# reported like any unreadable image.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
# The largest image decoded, by training and by `/classify` alike: far above any classifier input, far below what
# could exhaust memory (a "decompression bomb" PNG declares 50000 x 50000 pixels in a few kilobytes).
MAX_IMAGE_PIXELS = 4096 * 4096
IMAGE_CHANNELS = tuple(_TARGET_MODES)  # what an image file converts to; a model of other channels takes tensors


class UnsupportedImage(ValueError):
    """A decodable image whose values okdpipe cannot turn into 8-bit pixels without inventing a scale."""


def image_pixels(image: Image.Image, channels: int, size: tuple[int, int], policy: str = "stretch") -> np.ndarray:
    """uint8 [H, W, channels]: upright (EXIF), converted to `channels`, brought to `size` = (H, W) by `policy`."""
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"unknown resize policy {policy!r}; choose one of: {', '.join(RESIZE_POLICIES)}")
    image = to_channels(ImageOps.exif_transpose(image), channels)
    height, width = size
    if image.size != (width, height):
        image = (
            ImageOps.fit(image, (width, height), RESAMPLE)
            if policy == "shorter-side"
            else image.resize((width, height), RESAMPLE)
        )
    return np.asarray(image, dtype=np.uint8).reshape(height, width, channels)


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode -> "L" (channels=1) or "RGB" (channels=3).

    16-bit images keep their top 8 bits (Pillow's own conversion clips everything above 255 to white), and one whose
    values are all below 256 (8-bit values saved wide) is refused rather than read as black; alpha is
    dropped (as torchvision's `convert("RGB")` does); palettes expand through RGBA so a transparent index does
    not warn; grayscale becomes RGB by repeating the channel; colour becomes gray by ITU-R 601-2 luma.
    """
    target = _TARGET_MODES.get(channels)
    if target is None:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image.mode == "F" or image.mode.startswith("I;32"):
        raise UnsupportedImage(
            f"{image.mode!r} images (floating-point or 32-bit) have no 8-bit reading; save 8 or 16 bit"
        )
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 0xFFFF):  # mode "I" holds 32-bit integers too
            raise UnsupportedImage("a 32-bit integer image with values beyond 16 bits; save 8 or 16 bit")
        if values.size and 0 < values.max() < 0x100:  # 8-bit values in a 16- or 32-bit file: their top 8 bits are 0
            raise UnsupportedImage(
                f"a {image.mode!r} image whose values all lie below 256 would read as black at 8 bits (its top 8 "
                "bits); save it 8 bit, or scale its values to the 16-bit range"
            )
        wide = values.astype(np.uint32) >> 8
        image = Image.fromarray(wide.clip(0, 255).astype(np.uint8))
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    elif image.mode not in ("1", "L", "LA", "RGB", "RGBA", "RGBX") and target == "L":
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, F: through RGB, which Pillow converts from all
    return image if image.mode == target else image.convert(target)
