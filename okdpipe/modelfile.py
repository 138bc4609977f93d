"""MODEL.pt: one self-describing, pickle-free checkpoint of a single shippable network.

A model file is a plain dict of tensors, strings and numbers saved with `torch.save`, so that
`torch.load(weights_only=True)` reads it without unpickling arbitrary objects. It carries everything
export needs: the architecture and its arguments, the input it expects, its labels and where it came from.

    {
      "format": "okdpipe-model", "format_version": 1, "okdpipe_version": "0.1.0",
      "arch": "resnet20", "arch_kwargs": {}, "num_classes": 10, "in_channels": 1,
      "input_size": [28, 28], "mean": [...], "std": [...], "labels": [...], "dataset": "fashion-mnist",
      "provenance": {"run_dir": ..., "method": ..., "candidate": ..., "val_top1": ...},
      "weights_sha256": "<sha256 over the state dict's names, dtypes, shapes and bytes>",
      "state_dict": {...},
    }
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from okdpipe import __version__
from okdpipe.errors import OkdpipeError
from okdpipe.files import atomic_write, file_sha256

FORMAT = "okdpipe-model"
FORMAT_VERSION = 1


@dataclass
class ModelInfo:
    """What a shipped network is: everything but its weights."""

    arch: str
    num_classes: int
    in_channels: int
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...]
    dataset: str = ""
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)


def weights_sha256(state_dict: dict) -> str:
    """Hash names, dtypes, shapes and raw bytes, so any change to the weights changes the hash."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    atomic_write(path, lambda handle: torch.save(obj, handle))


def save_model_file(model, info: ModelInfo, path: str | os.PathLike) -> str:
    """Save `model` (a plain network from the backbone registry) with `info`; returns the file's sha256."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "okdpipe_version": __version__,
        "arch": info.arch,
        "arch_kwargs": dict(info.arch_kwargs),
        "num_classes": int(info.num_classes),
        "in_channels": int(info.in_channels),
        "input_size": [int(s) for s in info.input_size],
        "mean": [float(m) for m in info.mean],
        "std": [float(s) for s in info.std],
        "labels": [str(label) for label in info.labels],
        "dataset": info.dataset,
        "provenance": dict(info.provenance),
        "weights_sha256": weights_sha256(state),
        "state_dict": state,
    }
    atomic_torch_save(payload, path)
    return file_sha256(path)


def read_model_file(path: str | os.PathLike) -> tuple[dict, ModelInfo]:
    """Read and verify a model file; returns (state_dict, info). Raises OkdpipeError on any problem."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise OkdpipeError(f"{path}: no such model file; create one with `okdpipe select RUN_DIR --out {path}`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise OkdpipeError(f"{path}: not a readable okdpipe model file ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise OkdpipeError(
            f"{path}: not an okdpipe model file (no 'format: {FORMAT}' header); "
            "export models produced by `okdpipe select`"
        )
    if payload.get("format_version") != FORMAT_VERSION:
        raise OkdpipeError(
            f"{path}: model file format version {payload.get('format_version')} is not supported "
            f"by okdpipe {__version__} (expects {FORMAT_VERSION})"
        )
    state = payload["state_dict"]
    if weights_sha256(state) != payload.get("weights_sha256"):
        raise OkdpipeError(f"{path}: weights do not match their recorded sha256; the file is corrupt")
    info = ModelInfo(
        arch=payload["arch"],
        arch_kwargs=dict(payload.get("arch_kwargs", {})),
        num_classes=payload["num_classes"],
        in_channels=payload["in_channels"],
        input_size=tuple(payload["input_size"]),
        mean=tuple(payload["mean"]),
        std=tuple(payload["std"]),
        labels=tuple(payload["labels"]),
        dataset=payload.get("dataset", ""),
        provenance=dict(payload.get("provenance", {})),
    )
    return state, info


def load_model_file(path: str | os.PathLike):
    """Build the network a model file describes and load its verified weights; returns (model, info)."""
    from okdpipe.distill.models import create_model

    state, info = read_model_file(path)
    model = create_model(info.arch, num_classes=info.num_classes, in_channels=info.in_channels, **info.arch_kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise OkdpipeError(f"{path}: weights do not fit architecture {info.arch!r} ({first})") from None
    return model.eval(), info
