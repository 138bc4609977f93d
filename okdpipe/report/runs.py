"""What `okdpipe report` reads from a run directory, without torch and without trusting the run to be finished.

A run that is still training has a partial metrics.jsonl whose last line may be torn (the trainer appends while
we read), no selection.json yet, and a manifest that says "training". Each of those is reported as it is: a torn
or foreign line is skipped and counted, a missing selection leaves the candidate table out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from okdpipe.errors import OkdpipeError
from okdpipe.files import loads_finite, missing_or_kind
from okdpipe.run import RunDir

MAX_METRICS_BYTES = 256 << 20  # a 10,000-epoch run logs a few MB; more is not a metrics file


@dataclass
class RunHistory:
    """One run's logged numbers: step lines (losses, lr) and epoch lines (validation of every model)."""

    name: str
    root: Path
    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    skipped_lines: int = 0
    manifest: dict[str, Any] = field(default_factory=dict)
    selection: Optional[dict[str, Any]] = None

    @property
    def status(self) -> str:
        return self.manifest.get("status", "unknown")

    @property
    def planned_epochs(self) -> Optional[int]:
        return self.manifest.get("config", {}).get("epochs")

    def models(self) -> list[str]:
        """Every model validated in any epoch, students first in number order, then the others by name."""
        names = {name for epoch in self.epochs for name in epoch.get("val", {})}
        return sorted(names, key=model_order)

    def loss_terms(self) -> list[str]:
        """The loss keys of the step lines: `loss` first, then each method term (`ce/s0`, ...)."""
        skip = {"kind", "epoch", "step", "lr", "images_per_s"}
        keys = {key for step in self.steps for key in step if key not in skip}
        return sorted(keys, key=lambda k: (k != "loss", k))

    def shipped(self) -> Optional[str]:
        return self.selection.get("chosen") if self.selection else None


def model_order(name: str) -> tuple:
    """student:0 < student:1 < ... < student:10 < ensemble < the method's own models, by name."""
    kind, _, number = name.partition(":")
    if kind == "student" and number.isascii() and number.isdigit():
        return (0, int(number), "")
    return (1 if name == "ensemble" else 2, 0, name)


def numbers_are_finite(record: dict[str, Any]) -> bool:
    """Every number in a metrics record (nested ones too) is finite and not a bool posing as one."""
    values = list(record.values())
    while values:
        value = values.pop()
        if isinstance(value, dict):
            values.extend(value.values())
        elif isinstance(value, float) and not math.isfinite(value):
            return False
    return True


def read_metrics(path: Path) -> tuple[list[dict], list[dict], int]:
    """(step lines, epoch lines, lines skipped): a torn, foreign or non-finite line is skipped, never fatal."""
    if not path.is_file():
        return [], [], 0
    try:
        if path.stat().st_size > MAX_METRICS_BYTES:
            raise OkdpipeError(f"{path}: larger than {MAX_METRICS_BYTES >> 20} MiB; is it a metrics file?")
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise OkdpipeError(f"{path}: cannot read ({exc.strerror})") from None
    steps, epochs, skipped = [], [], 0
    for line in text.splitlines():
        try:
            record = loads_finite(line)
        except ValueError:
            skipped += 1
            continue
        if not isinstance(record, dict) or not numbers_are_finite(record):
            skipped += 1
        elif record.get("kind") == "step" and isinstance(record.get("step"), int):
            steps.append(record)
        elif record.get("kind") == "epoch" and isinstance(record.get("epoch"), int):
            epochs.append(valid_epoch(record))
        else:
            skipped += 1
    return steps, epochs, skipped


def valid_epoch(record: dict[str, Any]) -> dict[str, Any]:
    """An epoch line with only the models whose top-1 is a number (a hand-edited line cannot break a plot)."""
    val = record.get("val") if isinstance(record.get("val"), dict) else {}
    kept = {k: v for k, v in val.items() if isinstance(v, dict) and isinstance(v.get("top1"), (int, float))}
    return {**record, "val": kept}


def read_selection(path: Path) -> Optional[dict[str, Any]]:
    """selection.json, or None when select has not run yet; a damaged one is an error naming the fix."""
    if not path.is_file():
        return None
    try:
        selection = loads_finite(path.read_text())
    except (ValueError, OSError) as exc:
        raise OkdpipeError(f"{path}: not a readable selection ({exc}); run `okdpipe select` again") from None
    if not isinstance(selection, dict) or not isinstance(selection.get("candidates"), list):
        raise OkdpipeError(f"{path}: not an okdpipe selection (no candidate list); run `okdpipe select` again")
    problem = selection_problem(selection)
    if problem:
        raise OkdpipeError(f"{path}: damaged selection ({problem}); run `okdpipe select` again")
    return selection


def selection_problem(selection: dict[str, Any]) -> Optional[str]:
    """What the report reads of a selection, checked: candidates with a name and a top-1 in [0, 1], an ensemble
    object with one; None when it is all there."""

    def top1_ok(row: Any) -> bool:
        value = row.get("val_top1") if isinstance(row, dict) else None
        return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0

    candidates = selection["candidates"]
    if not candidates:
        return "no candidates"
    for row in candidates:
        if not (isinstance(row, dict) and isinstance(row.get("candidate"), str) and top1_ok(row)):
            return f"candidate {row!r:.80} lacks a name or a val_top1 in [0, 1]"
    ensemble = selection.get("ensemble")
    if ensemble is not None and not top1_ok(ensemble):
        return f"ensemble {ensemble!r:.80} lacks a val_top1 in [0, 1]"
    return None


def read_run(path: Path) -> RunHistory:
    """One run directory; a folder that holds neither metrics nor a manifest is not a run (one-line error)."""
    run = RunDir(path)
    if not path.is_dir():
        raise OkdpipeError(
            f"{path}: {missing_or_kind(path, 'a run directory')}; give the --out of an `okdpipe distill` run"
        )
    if not run.metrics_path.is_file() and not run.manifest_path.is_file():
        raise OkdpipeError(f"{path}: not a run directory (no metrics.jsonl or manifest.json); give a distill --out")
    steps, epochs, skipped = read_metrics(run.metrics_path)
    manifest = run.read_manifest() if run.manifest_path.is_file() else {}
    if manifest.get("status") == "finished" and not epochs:  # a finished run logged every epoch: damaged
        raise OkdpipeError(
            f"{run.metrics_path}: the run finished but no epoch line can be read ({skipped} lines skipped); "
            "the metrics file is damaged or replaced"
        )
    return RunHistory(
        name=path.resolve().name,
        root=path,
        steps=steps,
        epochs=epochs,
        skipped_lines=skipped,
        manifest=manifest,
        selection=read_selection(path / "selection.json"),
    )


def unique_names(runs: list[RunHistory]) -> list[RunHistory]:
    """Give runs with the same folder name (a/run, b/run) distinct labels: parent/name."""
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = f"{r.root.resolve().parent.name}/{r.name}"
    return runs
