"""MODEL.pt: one self-describing, pickle-free checkpoint of a single shippable network.

A model file is a plain dict of tensors, strings and numbers saved with `torch.save`, so that
`torch.load(weights_only=True)` reads it without unpickling arbitrary objects. It carries everything
export needs: the architecture and its arguments, the input it expects, its labels and where it came from.

    {
      "format": "okdpipe-model", "format_version": 1, "okdpipe_version": "0.1.0",
      "arch": "resnet20", "arch_kwargs": {}, "num_classes": 10, "in_channels": 1,
      "input_size": [28, 28], "mean": [...], "std": [...], "labels": [...], "dataset": "fashion-mnist",
      "provenance": {"run_dir": ..., "method": ..., "candidate": ..., "val_top1": ...},
      "arch_source": {"plugin": "my_models", "module": ..., "package": ..., "version": ...}  (a plug-in's
                     architecture) or {"library": "timm", "version": "1.0.31"} (timm:/torchvision:); else absent,
      "weights_sha256": "<sha256 over the state dict's names, dtypes, shapes and bytes>",
      "state_dict": {...},
    }
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from okdpipe import __version__
from okdpipe.contracts import inputs
from okdpipe.contracts.card import PIXEL_SCALE
from okdpipe.contracts.versioned import FileFormat
from okdpipe.errors import OkdpipeError
from okdpipe.files import atomic_write, missing_or_kind
from okdpipe.interrupts import reraise_interrupt

MODEL_FILE = FileFormat("okdpipe-model", 1, "model file", "create it again with `okdpipe select RUN_DIR`")


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
    # Where the architecture's code comes from when it is not okdpipe's own: the plug-in or library that must
    # be loaded to rebuild it (taken from the model's `arch_source` when saved).
    arch_source: dict[str, str] = field(default_factory=dict)


def weights_sha256(state_dict: dict) -> str:
    """Hash names, dtypes, shapes and raw bytes, so any change to the weights changes the hash."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def torch_bytes(obj: Any) -> bytes:
    """What torch.save writes for `obj`, serialised in memory: writing to a file itself, torch wraps a full disk's
    OSError in a RuntimeError, which would be a traceback instead of one line."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def non_finite_tensors(named: Iterable[tuple[str, Any]]) -> list[str]:
    """The names of the floating-point tensors among (name, tensor) pairs that hold a NaN or inf, in order: one
    device sync for all of them. Training, select, MODEL.pt and export all ask this before trusting weights."""
    import torch

    floats = [(name, tensor) for name, tensor in named if tensor.is_floating_point()]
    if not floats:
        return []
    finite = torch.stack([torch.isfinite(tensor.detach()).all() for _, tensor in floats]).tolist()
    return [name for (name, _), ok in zip(floats, finite) if not ok]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    data = torch_bytes(obj)
    atomic_write(path, lambda handle: handle.write(data))


def save_model_file(model, info: ModelInfo, path: str | os.PathLike) -> str:
    """Save `model` (a plain network from the backbone registry) with `info`; returns the file's sha256.
    Refused, writing nothing, when a field is invalid or a weight is not finite (see model_file_bytes)."""
    data = model_file_bytes(model, info, path)
    atomic_write(path, lambda handle: handle.write(data))
    return hashlib.sha256(data).hexdigest()


def model_file_bytes(model, info: ModelInfo, path: str | os.PathLike) -> bytes:
    """The bytes of `model`'s MODEL.pt (`path` names it in errors), for a caller that writes it together with
    other files. The plug-in or library that built the architecture (`model.arch_source`) is recorded so a
    reader without it gets a one-line error."""
    check_info(info, path)
    source = dict(info.arch_source or getattr(model, "arch_source", {}) or {})
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    non_finite = non_finite_tensors(state.items())
    if non_finite:
        raise OkdpipeError(
            f"{path}: not written: weight {non_finite[0]} (and {len(non_finite) - 1} more) holds "
            "NaN or inf; the model diverged, retrain it with a lower --lr"
        )
    payload = {
        **MODEL_FILE.header(),
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
        **({"arch_source": {k: str(v) for k, v in source.items()}} if source else {}),
        "weights_sha256": weights_sha256(state),
        "state_dict": state,
    }
    return torch_bytes(payload)


def read_model_file(path: str | os.PathLike) -> tuple[dict, ModelInfo]:
    """Read and verify a model file; returns (state_dict, info). Raises OkdpipeError on any problem."""

    path = Path(path)
    if not path.is_file():
        raise OkdpipeError(
            f"{path}: {missing_or_kind(path, 'a model file')}; create one with `okdpipe select RUN_DIR --out {path}`"
        )
    payload = load_tensors(path, "not a readable okdpipe model file", "pass the MODEL.pt `okdpipe select` wrote")
    MODEL_FILE.check(payload, path)
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not state or not all(_is_tensor(v) for v in state.values()):
        raise OkdpipeError(f"{path}: the model file holds no state_dict of tensors; {MODEL_FILE.fix}")
    refuse_unreadable_tensors(state.items(), path)
    if weights_sha256(state) != payload.get("weights_sha256"):
        raise OkdpipeError(f"{path}: weights do not match their recorded sha256; the file is corrupt")
    info = info_from_payload(payload, path)
    return state, info


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def unreadable_tensor(named: Iterable[tuple[str, Any]]) -> tuple[str, str] | None:
    """The first (name, kind) among (name, tensor) pairs whose values are not a plain dense array: a meta tensor
    (a shape without data, as models built on torch.device("meta") have) or any layout but strided (sparse COO,
    CSR, jagged). Hashing, the NaN check and loading all read the values, which these cannot give."""
    import torch

    for name, tensor in named:
        if tensor.is_meta:
            return name, "meta"
        if tensor.layout != torch.strided:
            return name, str(tensor.layout).removeprefix("torch.")
    return None


def refuse_unreadable_tensors(named: Iterable[tuple[str, Any]], where: object) -> None:
    """One line naming the first tensor of a weights file (`where`) that unreadable_tensor finds."""
    found = unreadable_tensor(named)
    if found:
        name, kind = found
        raise OkdpipeError(
            f"{where}: the file holds {kind} tensors ({name}), which okdpipe cannot load; save dense weights"
        )


def info_from_payload(payload: dict, where: object) -> ModelInfo:
    """ModelInfo from a model file's fields, each checked (type, length, std > 0, one label per class)."""
    try:
        info = ModelInfo(
            arch=payload["arch"],
            arch_kwargs=payload.get("arch_kwargs", {}),
            num_classes=payload["num_classes"],
            in_channels=payload["in_channels"],
            input_size=tuple(payload["input_size"]),
            mean=tuple(payload["mean"]),
            std=tuple(payload["std"]),
            labels=tuple(payload["labels"]),
            dataset=payload.get("dataset", ""),
            provenance=payload.get("provenance", {}),
            arch_source=payload.get("arch_source", {}),
        )
    except (KeyError, TypeError) as exc:
        raise OkdpipeError(f"{where}: the model file lacks or mistypes field {exc}; {MODEL_FILE.fix}") from None
    check_info(info, where)
    return info


def check_info(info: ModelInfo, where: object) -> None:
    """Every field a model card will be built from, so no artifact is exported that serve would refuse."""
    problem = _info_problem(info)
    if problem:
        raise OkdpipeError(f"{where}: {problem}; {MODEL_FILE.fix}")


def _info_problem(info: ModelInfo) -> str | None:
    """The card's rules (okdpipe.contracts.inputs) for the fields a card is built from, then the file's own."""
    size = tuple(info.input_size)
    checks = [
        None if isinstance(info.arch, str) and info.arch else f"arch {info.arch!r} must be a non-empty string",
        inputs.num_classes_problem(info.num_classes),
        None if len(size) == 2 else f"input_size {list(size)} must be two integers (height, width)",
        inputs.input_shape_problem(info.in_channels, *size) if len(size) == 2 else None,
        inputs.normalisation_problem(PIXEL_SCALE, info.mean, info.std, info.in_channels),
        inputs.labels_problem(info.labels, info.num_classes),
        None if isinstance(info.dataset, str) else "dataset must be a string",
        None
        if isinstance(info.arch_kwargs, dict)
        and isinstance(info.provenance, dict)
        and isinstance(info.arch_source, dict)
        and all(isinstance(v, str) for v in info.arch_source.values())
        else "arch_kwargs and provenance must be mappings, arch_source a mapping of strings",
    ]
    return next((problem for problem in checks if problem), None)


def load_tensors(path: Path, what: str, fix: str) -> Any:
    """torch.load with weights_only=True (nothing in the file is executed); a file it refuses is one line:
    `{path}: {what} ({why}); {fix}`."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        reraise_interrupt(exc)  # a Ctrl-C or SIGTERM that torch's error was raised over stays an interrupt
        raise OkdpipeError(f"{path}: {what} ({load_failure(exc)}); {fix}") from None


def load_failure(exc: BaseException) -> str:
    """Why torch.load refused a file, in a few words (its messages run to paragraphs): the first sentence of its
    first line, cut at a word, or what a weights-only refusal means."""
    text = str(exc).strip()
    if "Weights only load failed" in text:
        return "it holds pickled Python objects, which okdpipe never unpickles: they could run code"
    sentence = (text.splitlines() or [type(exc).__name__])[0].split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= 160 else sentence[:157].rsplit(" ", 1)[0] + "..."
