"""Accuracy-aware post-training INT8: when plain static INT8 loses more validation top-1 than
`--max-accuracy-drop`, search before giving up, within `--tune-budget` (trials or seconds).

The search, in a fixed order (no randomness, so a trial budget gives the same trials and the same result on every
run of the same model and data):
  1. calibration: every other method and parameter (minmax, entropy, percentile 99.999 / 99.99 / 99.9);
  2. weight granularity: the best recipe so far with per-tensor instead of per-channel weights (or back);
  3. fallback: rank the best recipe's nodes by sensitivity (export/sensitivity.py), then keep the most sensitive
     in FP32 one more at a time until the drop is within the limit.
It stops at the first trial within the limit. Every trial is scored on the whole validation split, exactly as the
export's final check scores the artifact; a trial whose logits are not finite fails (it is never an accuracy).
The sensitivity pass is not a trial (its cost counts against a budget in seconds).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from okdpipe.errors import GateFailed, OkdpipeError
from okdpipe.export.config import TUNE_BUDGET
from okdpipe.export.quantize import Int8Workbench, Recipe
from okdpipe.export.sensitivity import OutOfBudget, Predict, Probe, analyse
from okdpipe.scoring import drop_points

ORT_DEFAULT_PERCENTILE = 99.999  # what ORT's percentile calibrator keeps when given no CalibPercentile
CALIBRATIONS = (
    ("minmax", None),
    ("entropy", None),
    ("percentile", 99.999),
    ("percentile", 99.99),
    ("percentile", 99.9),
)


@dataclass(frozen=True)
class TuneBudget:
    """`--tune-budget`: a number of trials (`20`) or of seconds (`120s`); `0` turns the search off."""

    trials: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str) -> TuneBudget:
        match = TUNE_BUDGET.fullmatch(str(text).strip())
        if not match:
            raise OkdpipeError(f"--tune-budget {text!r}: give a plain number of trials (20) or of seconds (120s)")
        value = int(match.group(1))
        return cls(seconds=float(value)) if match.group(2) else cls(trials=value)

    @property
    def off(self) -> bool:
        return (self.trials or self.seconds or 0) == 0

    def record(self) -> dict:
        return {"trials": self.trials} if self.trials is not None else {"seconds": self.seconds}


@dataclass
class Trial:
    number: int
    phase: str  # plain, calibration, granularity or fallback
    recipe: Recipe
    val_top1: float | None
    drop_points: float | None
    meets: bool
    seconds: float
    path: Path | None = None
    failure: str | None = None

    def record(self) -> dict:
        return {
            "trial": self.number,
            "phase": self.phase,
            **self.recipe.record(),
            "val_top1": self.val_top1,
            "drop_points": self.drop_points,
            "meets_limit": self.meets,
            "seconds": round(self.seconds, 3),
            **({"failure": self.failure} if self.failure else {}),
        }


@dataclass
class Outcome:
    """The search's result: the trial shipped (None when nothing met the limit), every trial, the ranking."""

    chosen: Trial | None
    trials: list[Trial]
    sensitivity: dict | None
    stopped: str = ""
    budget: TuneBudget = field(default_factory=TuneBudget)

    def record(self) -> dict:
        return {
            "budget": self.budget.record(),
            "chosen_trial": None if self.chosen is None else self.chosen.number,
            "stopped": self.stopped,
            "trials": [t.record() for t in self.trials],
        }


class Int8Tuner:
    """Runs the search of the module docstring against one FP32 model's validation split."""

    def __init__(
        self,
        workbench: Int8Workbench,
        predictor: Callable[[Path], Predict],
        evaluate: Callable[[Path], float],
        fp32_top1: float,
        max_drop: float,
        budget: TuneBudget,
        probe: Probe,
    ):
        self.workbench, self.predictor, self.evaluate = workbench, predictor, evaluate
        self.fp32_top1, self.max_drop, self.budget, self.probe = fp32_top1, max_drop, budget, probe
        self.trials: list[Trial] = []
        self.started = time.monotonic()

    def run(self, plain: Trial) -> Outcome:
        self.trials = [plain]
        with progress("int8 tuning", self.budget.trials) as self.show:
            chosen, sensitivity, stopped = self.search(plain.recipe)
        return Outcome(chosen, self.trials, sensitivity, stopped, self.budget)

    def search(self, plain: Recipe) -> tuple[Trial | None, dict | None, str]:
        for recipe in [*other_calibrations(plain), None]:
            recipe = recipe or flipped_granularity(self.best().recipe)
            found = self.attempt("calibration" if recipe.per_channel == plain.per_channel else "granularity", recipe)
            if found or self.spent():
                return found, None, "met the limit" if found else "budget spent"
        best = self.best().recipe
        try:
            sensitivity = analyse(
                self.workbench, best, self.probe, self.predictor, self.workbench.work_dir, self.node_step, self.spent
            )
        except OutOfBudget:
            return None, None, "budget spent during the sensitivity analysis"
        nodes = [row["node"] for row in sensitivity["nodes"]]
        for count in range(1, len(nodes) + 1):
            found = self.attempt("fallback", best.keeping((*best.fp32_nodes, *nodes[:count])))
            if found or self.spent():
                return found, sensitivity, "met the limit" if found else "budget spent"
        return None, sensitivity, "every quantized node tried in FP32"

    def attempt(self, phase: str, recipe: Recipe) -> Trial | None:
        """Quantize and score one recipe; the trial when it meets the limit."""
        trial = self.trial(len(self.trials), phase, recipe)
        self.trials.append(trial)
        verdict = "meets" if trial.meets else (trial.failure or f"drop {trial.drop_points:.2f} points")
        self.show(len(self.trials) - 1, f"trial {trial.number} ({recipe.label()}): {verdict}")
        return trial if trial.meets else None

    def trial(self, number: int, phase: str, recipe: Recipe) -> Trial:
        start = time.monotonic()
        path = self.workbench.work_dir / f"trial-{number}.onnx"
        self.workbench.quantize(recipe, path)
        try:
            top1 = self.evaluate(path)
        except GateFailed as failed:  # non-finite logits: a failed trial, never an accuracy
            return Trial(number, phase, recipe, None, None, False, time.monotonic() - start, path, str(failed))
        drop = drop_points(self.fp32_top1, top1)
        meets = drop <= self.max_drop
        return Trial(number, phase, recipe, top1, drop, meets, time.monotonic() - start, path)

    def best(self) -> Trial:
        """The most accurate trial so far (ties to the earlier); failed trials only if all failed."""
        scored = [t for t in self.trials if t.val_top1 is not None]
        return max(scored, key=lambda t: (t.val_top1, -t.number)) if scored else self.trials[0]

    def spent(self) -> bool:
        tuned = len(self.trials) - 1  # the plain trial is not part of the search
        if self.budget.trials is not None:
            return tuned >= self.budget.trials
        return time.monotonic() - self.started >= (self.budget.seconds or 0)

    def node_step(self, done: int, total: int, node: str) -> None:
        self.show(len(self.trials) - 1, f"sensitivity {done}/{total} {node}")


def other_calibrations(plain: Recipe) -> list[Recipe]:
    """Every calibration of CALIBRATIONS except the one plain INT8 used, at plain's weight granularity."""
    used = (plain.method, plain.percentile or ORT_DEFAULT_PERCENTILE if plain.method == "percentile" else None)
    return [replace(plain, method=m, percentile=p) for m, p in CALIBRATIONS if (m, p) != used]


def flipped_granularity(recipe: Recipe) -> Recipe:
    return replace(recipe, per_channel=not recipe.per_channel)


@contextlib.contextmanager
def progress(label: str, total: int | None):
    """A rich progress bar on a terminal; one plain line per trial in logs; nothing under --quiet."""
    from okdpipe.console import QUIET, say, verbosity

    if verbosity() == QUIET:
        yield lambda done, text: None
        return
    if not sys.stderr.isatty():
        yield lambda done, text: None if text.startswith("sensitivity") else say(f"{label}: {text}", err=True)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("{task.fields[info]}"), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total, info="")
        yield lambda done, text: bar.update(task, completed=done, info=text)
