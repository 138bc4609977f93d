"""A small, torch-free reader for the model card (`model.json`) beside an exported model.

It validates only what serving needs -- format, the model file and its sha256, the input shape, the
preprocessing and the labels -- so `okdpipe serve` starts on any exported artifact without the training code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from okdpipe.errors import OkdpipeError
from okdpipe.files import file_sha256

CARD_FILENAME = "model.json"
CARD_FORMAT = "okdpipe-card"
CARD_FORMAT_VERSION = 1
MODEL_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class Preprocess:
    """Image -> tensor recipe: x = (pixel * scale - mean[c]) / std[c], resized to (height, width)."""

    height: int
    width: int
    channels: int
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class ServingCard:
    """What the server needs from a model card, already checked against the model file."""

    name: str
    model_path: Path
    input_name: str
    input_dtype: str
    output_name: str
    channels: int
    height: int
    width: int
    num_classes: int
    preprocess: Preprocess
    labels: tuple[str, ...]
    raw: dict[str, Any]


def read_serving_card(artifact_dir: Path) -> ServingCard:
    """Read and validate `artifact_dir/model.json`; every problem becomes a one-line OkdpipeError."""
    artifact_dir = Path(artifact_dir)
    card = _load_card_json(artifact_dir)
    _check_format(card)
    model_path = _checked_model_file(artifact_dir, card)
    channels, height, width = _checked_input_shape(card)
    num_classes = _checked_num_classes(card)
    return ServingCard(
        name=_checked_name(card),
        model_path=model_path,
        input_name=_required_str(card["input"], "name", "input.name"),
        input_dtype=_checked_input_dtype(card),
        output_name=_required_str(card["output"], "name", "output.name"),
        channels=channels,
        height=height,
        width=width,
        num_classes=num_classes,
        preprocess=_checked_preprocess(card, channels, height, width),
        labels=_checked_labels(card, num_classes),
        raw=card,
    )


def _fail(problem: str, fix: str = "re-run `okdpipe export` to rewrite the artifact") -> OkdpipeError:
    return OkdpipeError(f"{problem}; {fix}")


def _load_card_json(artifact_dir: Path) -> dict[str, Any]:
    if not artifact_dir.is_dir():
        raise _fail(f"artifact directory {artifact_dir} does not exist", "pass the folder `okdpipe export` wrote")
    card_path = artifact_dir / CARD_FILENAME
    if not card_path.is_file():
        raise _fail(f"no {CARD_FILENAME} in {artifact_dir}", "pass the folder `okdpipe export` wrote")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _fail(f"{card_path} is not valid JSON ({error})") from error
    if not isinstance(card, dict):
        raise _fail(f"{card_path} must hold a JSON object")
    for section in ("input", "output", "preprocess"):
        if not isinstance(card.get(section), dict):
            raise _fail(f"model card {card_path} has no '{section}' object")
    return card


def _check_format(card: dict[str, Any]) -> None:
    if card.get("format") != CARD_FORMAT:
        raise _fail(f"model card format is {card.get('format')!r}, expected {CARD_FORMAT!r}")
    if card.get("format_version") != CARD_FORMAT_VERSION:
        raise _fail(
            f"model card format_version {card.get('format_version')!r} is not supported (this server reads "
            f"{CARD_FORMAT_VERSION})",
            "export again with the okdpipe version that serves it",
        )


def _required_str(section: dict[str, Any], key: str, where: str) -> str:
    value = section.get(key)
    if not isinstance(value, str) or not value:
        raise _fail(f"model card field '{where}' must be a non-empty string")
    return value


def _checked_name(card: dict[str, Any]) -> str:
    name = _required_str(card, "name", "name")
    if "/" in name or name.strip() != name:
        raise _fail(f"model name {name!r} cannot appear in a URL path", "rename the model in model.json")
    return name


def _checked_model_file(artifact_dir: Path, card: dict[str, Any]) -> Path:
    filename = _required_str(card, "file", "file")
    model_path = (artifact_dir / filename).resolve()
    if model_path.parent != artifact_dir.resolve() or not model_path.is_file():
        raise _fail(f"model file {filename!r} named by the card is not in {artifact_dir}")
    hashes = card.get("sha256")
    if not isinstance(hashes, dict) or not isinstance(hashes.get(filename), str):
        raise _fail(f"model card has no sha256 for {filename!r}")
    for listed_name, expected in hashes.items():  # also external-data files (model.onnx.data) when listed
        _check_sha256(artifact_dir, listed_name, expected)
    return model_path


def _check_sha256(artifact_dir: Path, filename: str, expected: object) -> None:
    path = artifact_dir / filename
    if not path.is_file():
        raise _fail(f"{filename} listed in the card's sha256 is missing from {artifact_dir}")
    actual = file_sha256(path)
    if not isinstance(expected, str) or actual != expected.lower():
        raise _fail(f"{filename} sha256 is {actual[:12]}..., the card says {str(expected)[:12]}... (file changed)")


def _checked_input_shape(card: dict[str, Any]) -> tuple[int, int, int]:
    shape = card["input"].get("shape")
    layout = card["input"].get("layout", "NCHW")
    valid = isinstance(shape, list) and len(shape) == 4 and shape[0] in (None, -1)
    if not valid or not all(isinstance(dim, int) and dim > 0 for dim in shape[1:]) or layout != "NCHW":
        raise _fail(f"model card input shape {shape} / layout {layout!r} is not [null, C, H, W] NCHW")
    return shape[1], shape[2], shape[3]


def _checked_input_dtype(card: dict[str, Any]) -> str:
    dtype = card["input"].get("dtype", "float32")
    if dtype not in MODEL_DTYPES:
        raise _fail(f"model input dtype {dtype!r} is not served (supported: {', '.join(MODEL_DTYPES)})")
    return dtype


def _checked_num_classes(card: dict[str, Any]) -> int:
    shape = card["output"].get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0):
        raise _fail(f"model card output shape {shape} is not [null, num_classes]")
    return shape[1]


def _checked_preprocess(card: dict[str, Any], channels: int, height: int, width: int) -> Preprocess:
    section = card["preprocess"]
    mean, std = section.get("mean"), section.get("std")
    if section.get("channels") != channels or section.get("size") != [height, width]:
        raise _fail(f"preprocess channels/size {section.get('channels')}/{section.get('size')} disagree with input")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == channels):
        raise _fail(f"preprocess mean/std must list one value per channel ({channels})")
    if not all(_is_finite_number(value) for value in (*mean, *std)) or min(std) <= 0:
        raise _fail("preprocess mean/std must be finite numbers with std > 0")
    scale = section.get("scale", 1.0 / 255.0)
    if not _is_finite_number(scale) or scale <= 0:
        raise _fail(f"preprocess scale {scale!r} must be a positive number")
    return Preprocess(height, width, channels, float(scale), tuple(map(float, mean)), tuple(map(float, std)))


def _checked_labels(card: dict[str, Any], num_classes: int) -> tuple[str, ...]:
    """Class names for the 'labels' output; an absent list falls back to the class index as text."""
    labels = card.get("labels")
    if labels is None:
        return tuple(str(index) for index in range(num_classes))
    if not (isinstance(labels, list) and len(labels) == num_classes and all(isinstance(x, str) for x in labels)):
        raise _fail(f"model card labels must be {num_classes} strings (one per output class)")
    return tuple(labels)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
