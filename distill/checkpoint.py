"""Training checkpoints: one self-describing file per run, written atomically, verified on load.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so `torch.load(weights_only=True)` reads
it. Its sha256 is recorded in the run manifest when written and checked before a resume or a select.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from okdpipe import __version__
from okdpipe.errors import OkdpipeError
from okdpipe.modelfile import atomic_torch_save
from okdpipe.run import RunDir

FORMAT = "okdpipe-checkpoint"
FORMAT_VERSION = 1
LAST = "last.pt"


def save_checkpoint(run: RunDir, state: dict[str, Any]) -> Path:
    path = run.checkpoints / LAST
    atomic_torch_save({"format": FORMAT, "format_version": FORMAT_VERSION, "okdpipe_version": __version__,
                       **state}, path)
    run.record_artifact(path, epoch=state["epoch"])
    return path


def load_checkpoint(run: RunDir) -> dict[str, Any]:
    """Read RUN_DIR/checkpoints/last.pt after checking it against the manifest's sha256."""
    path = run.checkpoints / LAST
    run.verify_artifact(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise OkdpipeError(f"{path}: unreadable checkpoint ({str(exc).splitlines()[0][:160]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise OkdpipeError(f"{path}: not an okdpipe training checkpoint")
    if state.get("format_version") != FORMAT_VERSION:
        raise OkdpipeError(
            f"{path}: checkpoint format {state.get('format_version')} is not supported by okdpipe "
            f"{__version__}; re-run distill with this version"
        )
    return state


def has_checkpoint(run: RunDir) -> bool:
    return (run.checkpoints / LAST).is_file()
