"""Training checkpoints: one self-describing file per run, written atomically, verified on load.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so `torch.load(weights_only=True)` reads
it. Its sha256 is recorded in the run manifest when written and checked before a resume or a select; its
fields are checked by type before anything is loaded from them, so a damaged one is a one-line error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from okdpipe import __version__
from okdpipe.config import validation_message
from okdpipe.contracts.versioned import FileFormat
from okdpipe.errors import OkdpipeError
from okdpipe.files import file_sha256
from okdpipe.modelfile import atomic_torch_save, load_tensors
from okdpipe.run import RunDir

CHECKPOINT = FileFormat(
    "okdpipe-checkpoint", 1, "training checkpoint", "re-run distill with this version of okdpipe into a new --out"
)
LAST = "last.pt"
PENDING = "last.pt.pending"  # a new checkpoint between being written and replacing last.pt


class CheckpointFields(BaseModel):
    """What `fit` and `load_run` read from a checkpoint."""

    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)
    epoch: int = Field(ge=1, description="finished epochs")
    config: dict[str, Any]
    students: dict[str, torch.Tensor]
    method: dict[str, Any]
    optimizer: dict[str, Any]
    extra_optimizers: list[dict[str, Any]]
    history: list[dict[str, Any]]

    @model_validator(mode="after")
    def _one_summary_per_epoch(self) -> CheckpointFields:
        if len(self.history) != self.epoch or not all(isinstance(h.get("val"), dict) for h in self.history):
            raise ValueError(f"history must hold one summary with 'val' per finished epoch ({self.epoch})")
        return self


def save_checkpoint(run: RunDir, state: dict[str, Any]) -> Path:
    """Write the new checkpoint beside the old one, record its sha256, then rename it into place. A failure at
    any point (a full disk, a kill) leaves the old checkpoint with its recorded hash, or a recorded new one that
    the next load puts in place (`settle`): never a checkpoint the manifest disowns."""
    path, pending = run.checkpoints / LAST, run.checkpoints / PENDING
    atomic_torch_save({**CHECKPOINT.header(), "okdpipe_version": __version__, **state}, pending)
    try:
        run.record_artifact(pending, recorded_as=path, epoch=state["epoch"])
    except BaseException:
        pending.unlink(missing_ok=True)
        raise
    os.replace(pending, path)
    return path


def settle(run: RunDir) -> None:
    """Finish or undo a save that stopped between its steps: a pending file whose hash the manifest records was
    killed just before its rename; any other pending file was never recorded."""
    pending = run.checkpoints / PENDING
    if not pending.is_file():
        return
    entry = run.read_manifest()["artifacts"].get(f"{run.checkpoints.name}/{LAST}")
    if entry is not None and file_sha256(pending) == entry["sha256"]:
        os.replace(pending, run.checkpoints / LAST)
    else:
        pending.unlink()


def load_checkpoint(run: RunDir) -> dict[str, Any]:
    """Read RUN_DIR/checkpoints/last.pt after checking it against the manifest's sha256, then its fields."""
    path = run.checkpoints / LAST
    settle(run)
    run.verify_artifact(path)
    state = load_tensors(path, "unreadable checkpoint", "restore it from a backup or train the run again")
    CHECKPOINT.check(state, path)
    try:
        CheckpointFields.model_validate(state)
    except ValidationError as exc:
        raise OkdpipeError(f"{path}: damaged checkpoint ({validation_message(exc)})") from None
    return state


def has_checkpoint(run: RunDir) -> bool:
    settle(run)
    return (run.checkpoints / LAST).is_file()
