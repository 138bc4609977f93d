"""The bounds of a shippable model's input contract, checked by both of its records: MODEL.pt (okdpipe.modelfile)
and the model card (okdpipe.contracts.card). One set of rules, so a model file is never accepted that yields a
card serve refuses, and no record can ask a reader for an absurd allocation or a computation float32 cannot hold.

Each check returns the problem as text, or None; the callers add where and how to fix it.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any

MAX_CHANNELS = 64  # multispectral stacks at most; an image has 1, 3 or 4
MAX_SIDE = 8192  # pixels per side
MAX_INPUT_VALUES = 1 << 26  # C*H*W of one image: 256 MB as float32, far above any classifier's input
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841
MAX_LABEL_CHARS = 256
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32
MAX_PIXEL = 255  # images reach the model as 8-bit pixels (okdpipe.contracts.pixels)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A real number a float holds finitely (a bool is not one; nor is a JSON integer of 400 digits, which
    math.isfinite cannot even convert)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def input_shape_problem(channels: Any, height: Any, width: Any) -> str | None:
    """Positive integers within the bounds, so a reader can allocate one image."""
    sizes = {"channels": (channels, MAX_CHANNELS), "height": (height, MAX_SIDE), "width": (width, MAX_SIDE)}
    for what, (value, limit) in sizes.items():
        if not (is_int(value) and 1 <= value <= limit):
            return f"input {what} {value!r} must be an integer from 1 to {limit}"
    if channels * height * width > MAX_INPUT_VALUES:
        return f"input {channels}x{height}x{width} holds more than {MAX_INPUT_VALUES:,} values per image"
    return None


def num_classes_problem(num_classes: Any) -> str | None:
    if not (is_int(num_classes) and 2 <= num_classes <= MAX_CLASSES):
        return f"num_classes {num_classes!r} must be an integer from 2 to {MAX_CLASSES:,}"
    return None


def normalisation_problem(scale: Any, mean: Any, std: Any, channels: int) -> str | None:
    """x = (pixel * scale - mean) / std must be a float32 computation with finite results for every 8-bit pixel:
    each number finite and representable (a std of 1e-300 is 0 in float32), and the largest |x| below float32's
    maximum."""
    for key, values in (("mean", mean), ("std", std)):
        if not (isinstance(values, (list, tuple)) and all(is_finite_number(v) for v in values)):
            return f"{key} is {values!r}, not a list of finite numbers"
        if len(values) != channels:
            return f"{key} lists {len(values)} values, the input has {channels} channels"
    if not (is_finite_number(scale) and FLOAT32_TINY <= scale <= FLOAT32_MAX):
        return f"pixel scale {scale!r} must be a positive number float32 can hold"
    if not all(FLOAT32_TINY <= s <= FLOAT32_MAX for s in std):
        return f"std {list(std)} must have std > 0 for every channel, and within float32 range"
    if any(abs(m) > FLOAT32_MAX for m in mean):
        return f"mean {list(mean)} is beyond float32's range"
    # each float32 step of normalise(): pixel * scale, then minus mean, then divided by std
    steps = (MAX_PIXEL * scale, MAX_PIXEL * scale + max(abs(m) for m in mean))
    largest = steps[1] / min(std)
    if max(*steps, largest) > FLOAT32_MAX:
        return f"scale {scale:g}, mean and std {list(std)} overflow float32 for some pixel values"
    return None


def labels_problem(labels: Any, num_classes: int) -> str | None:
    """One distinct, non-empty, single-line name per class: a client reads the answer by its label."""
    if not (isinstance(labels, (list, tuple)) and all(isinstance(label, str) for label in labels)):
        return f"labels must be a list of {num_classes} strings"
    if len(labels) != num_classes:
        return f"labels must be {num_classes} strings, one per class (got {len(labels)})"
    bad = next((label for label in labels if not _is_display_text(label)), None)
    if bad is not None:
        return f"label {bad[:40]!r} must be printable text of 1 to {MAX_LABEL_CHARS} characters"
    seen: dict[str, str] = {}
    for label in labels:  # "é" composed or decomposed, "Shirt" and "Shirt ": one name to a reader
        key = unicodedata.normalize("NFC", label.strip())
        if key in seen:  # ascii(): the two spellings of "é" look alike on screen, their escapes do not
            return (
                f"labels {ascii(seen[key])} and {ascii(label)} name one class (the same after Unicode NFC "
                "normalisation and trimming spaces); every class needs its own label"
            )
        seen[key] = label
    return None


def _is_display_text(label: str) -> bool:
    return bool(label.strip()) and len(label) <= MAX_LABEL_CHARS and label.isprintable()
