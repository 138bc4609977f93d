"""The model card (model.json): everything serving and benchmarking need to use an exported model.

An *artifact directory* is any directory holding `model.json` and the .onnx file it names. The card
records the input contract (shape, dtype, layout, preprocessing), labels, parity and accuracy numbers,
the runtime versions and where the model came from, plus the sha256 of the .onnx so a swapped or
damaged file is caught before it serves wrong answers.

This module must not import torch: `okdpipe serve` reads cards from a torch-free install.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from okdpipe.errors import OkdpipeError
from okdpipe.files import atomic_write_text, file_sha256

CARD_FORMAT = "okdpipe-card"
CARD_VERSION = 1
CARD_NAME = "model.json"
REQUIRED_KEYS = ("name", "file", "precision", "input", "output", "preprocess", "labels", "sha256")


def write_card(directory: str | os.PathLike, card: dict[str, Any]) -> dict[str, Any]:
    """Write `card` as DIR/model.json, filling in `sha256` of the file it names; returns the written card.

    The hash is computed here rather than by callers so a card can never describe a file it was not
    written beside.
    """
    directory = Path(directory)
    onnx_path = directory / card["file"]
    if not onnx_path.is_file():
        raise OkdpipeError(f"{onnx_path}: cannot write a card for a missing model file")
    sha256 = {card["file"]: file_sha256(onnx_path)}
    ordered = {"format": CARD_FORMAT, "format_version": CARD_VERSION, **card}
    ordered.update(format=CARD_FORMAT, format_version=CARD_VERSION, sha256=sha256)
    atomic_write_text(directory / CARD_NAME, json.dumps(ordered, indent=1) + "\n")
    return ordered


def read_card(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and verify DIR/model.json and the sha256 of the .onnx it names. Raises OkdpipeError."""
    directory = Path(directory)
    card = _load_json(directory / CARD_NAME)
    _check_header(directory, card)
    _check_model_hash(directory, card)
    return card


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise OkdpipeError(f"{path.parent}: not an artifact directory (no {CARD_NAME}); create one with `okdpipe export`")
    try:
        card = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OkdpipeError(f"{path}: not valid JSON ({exc}); re-run `okdpipe export`") from None
    if not isinstance(card, dict):
        raise OkdpipeError(f"{path}: a model card must be a JSON object; re-run `okdpipe export`")
    return card


def _check_header(directory: Path, card: dict[str, Any]) -> None:
    path = directory / CARD_NAME
    if card.get("format") != CARD_FORMAT:
        raise OkdpipeError(f"{path}: not an okdpipe model card (no 'format: {CARD_FORMAT}'); re-run `okdpipe export`")
    if card.get("format_version") != CARD_VERSION:
        raise OkdpipeError(
            f"{path}: card format version {card.get('format_version')} is not supported (expects {CARD_VERSION}); "
            "re-export with this okdpipe version"
        )
    missing = [key for key in REQUIRED_KEYS if key not in card]
    if missing:
        raise OkdpipeError(f"{path}: card lacks {', '.join(missing)}; re-run `okdpipe export`")


def _check_model_hash(directory: Path, card: dict[str, Any]) -> None:
    onnx_path = directory / card["file"]
    if not onnx_path.is_file():
        raise OkdpipeError(f"{onnx_path}: model file named by the card is missing; re-run `okdpipe export`")
    expected = card["sha256"].get(card["file"]) if isinstance(card["sha256"], dict) else None
    if file_sha256(onnx_path) != expected:
        raise OkdpipeError(
            f"{onnx_path}: sha256 does not match its model card (file changed or corrupt); re-run `okdpipe export`"
        )
