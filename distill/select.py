"""`okdpipe select`: score every shippable candidate of a finished run on the validation split, pick one, and
write it as a self-describing MODEL.pt.

Candidates: each student (extracted to a plain network), the method's extras (FFSD's leader, PCL's mean
teachers, OKDPH's hybrid) and, when every student has the same architecture, a uniform weight average of the
students ("soup"). Weight-averaged candidates get their BatchNorm statistics recomputed first (averaging weights
invalidates them) on a seeded, shuffled, class-balanced sample of training images, recorded in selection.json;
their accuracy without recalibration is reported too. A candidate whose weights or validation logits are not
finite is refused: never scored as a number, never shipped (selection.json lists it under "refused"). The ensemble
of all students is scored as the reference the shipped model tries to approach. The test split is never read here.
Each row records the candidate's own architecture, parameters and MACs (peers may differ in all three).

With a shipping precision (`select --precision int8`), each candidate is also scored as it would ship (the
export stage quantizes it: `okdpipe.export.select_int8`, passed in by the command, since this stage may not
import export), and the choice ranks that figure; selection.json records both precisions per candidate.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Protocol

import torch
from torch import nn

from okdpipe.datasets import make_loader
from okdpipe.distill.evaluate import Accuracy, calibration_sample, recalibrate_bn
from okdpipe.distill.finished import FinishedRun, load_run
from okdpipe.distill.methods import Candidate
from okdpipe.distill.models import count_macs
from okdpipe.distill.trackers import log_selection
from okdpipe.distill.trainer import build_models
from okdpipe.errors import OkdpipeError
from okdpipe.files import atomic_write_files, check_can_write_file, file_sha256, json_text
from okdpipe.modelfile import ModelInfo, model_file_bytes, non_finite_tensors
from okdpipe.run import now_iso
from okdpipe.scoring import drop_points

STRATEGIES = "auto, best, leader, mean-teacher, hybrid, soup, student:N, or a candidate's name"


@dataclass
class Scored:
    name: str
    model: nn.Module
    top1: float
    top5: float
    params: int
    macs: int
    weight_averaged: bool = False
    top1_without_bn_recalibration: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)
    refused: Optional[str] = None  # why the candidate can never ship (non-finite weights or logits)
    shipped: Optional[dict[str, Any]] = None  # its validation figures at the shipping precision, when not fp32

    @property
    def ship_top1(self) -> float:
        """The top-1 the choice ranks: at the precision it ships in."""
        return self.top1 if self.shipped is None else self.shipped["val_top1"]

    def row(self) -> dict[str, Any]:
        row = {
            "candidate": self.name,
            "arch": self.model.arch,
            "val_top1": self.top1,
            "val_top5": self.top5,
            "params": self.params,
            "macs": self.macs,
            "weight_averaged": self.weight_averaged,
        }
        if self.weight_averaged:
            row["val_top1_without_bn_recalibration"] = self.top1_without_bn_recalibration
        if self.shipped is not None:
            row["fp32"] = {"val_top1": self.top1, "val_top5": self.top5}
            row[self.shipped["precision"]] = {k: v for k, v in self.shipped.items() if k != "precision"}
        return row


class ShippingPrecision(Protocol):
    """Scores a candidate as it would ship in another precision (e.g. INT8); built by a higher stage."""

    name: str

    def settings(self) -> dict[str, Any]:
        """How candidates are converted, for selection.json."""

    def score(self, model: nn.Module, session: Selection) -> dict[str, Any]:
        """{"val_top1", ...} of the converted model on the validation split; OkdpipeError if it cannot be
        scored (non-finite logits), which refuses the candidate."""


def soup(students) -> nn.Module:
    """Uniform average of every student's weights and float buffers, as a plain network (model soup,
    Wortsman et al. 2022: the mean, not the sum)."""
    states = [students.member_state(i) for i in range(students.count)]
    model = students.extract(0)
    averaged = {
        k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
        for k, v in states[0].items()
    }
    model.load_state_dict(averaged)
    return model


def non_finite_weights(model: nn.Module) -> bool:
    return bool(non_finite_tensors(model.state_dict().items()))


class NonFiniteLogits(Exception):
    """A candidate answered NaN or inf on the validation split."""


@torch.no_grad()
def top_accuracy(model: nn.Module, loader) -> tuple[float, float]:
    """(top-1, top-5) on the split; raises NonFiniteLogits rather than count a NaN answer as a class."""
    meter = Accuracy()
    model.eval()
    for batch in loader.epoch(0):
        logits = model(batch.views[0])
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteLogits
        meter.update(logits, batch.labels)
    result = meter.result()
    return result["top1"], result["top5"]


def ensemble_accuracy(finished: FinishedRun, loader) -> float:
    """Validation top-1 of the method's ensemble (the reference the shipped student approaches)."""
    meter = Accuracy()
    for batch in loader.epoch(0):
        meter.update(finished.ensemble_logits(batch.views), batch.labels)
    return meter.result()["top1"]


class Selection:
    """A finished run, rebuilt from its verified checkpoint, with its data splits."""

    def __init__(self, run_dir: Path, bn_batches: int, device: str = "auto"):
        self.finished = load_run(run_dir, device)
        self.run, self.cfg, self.device, self.bundle = (
            self.finished.run,
            self.finished.cfg,
            self.finished.device,
            self.finished.bundle,
        )
        self.students, self.method = self.finished.students, self.finished.method
        make = lambda split: make_loader(
            split,
            self.bundle.spec,
            batch_size=self.cfg.eval_batch_size,  # noqa: E731
            train=False,
            device=self.device,
            seed=self.cfg.seed,
        )
        self.calibration = calibration_sample(
            self.bundle.train, bn_batches * self.cfg.eval_batch_size, self.bundle.spec.num_classes, self.cfg.seed
        )
        self.val_loader, self.calib_loader = make(self.bundle.val), make(self.calibration.split)
        self.bn_batches = bn_batches
        if len(self.bundle.val) == 0:
            raise OkdpipeError(f"{run_dir}: the run has no validation split (val_split=0); nothing to select on")

    def candidates(self) -> dict[str, Candidate]:
        return shipping_candidates(self.students, self.method)

    def score(self, name: str, candidate: Candidate) -> Scored:
        model = candidate.model.to(self.device)
        spec = self.bundle.spec
        example = torch.zeros(1, spec.in_channels, *spec.input_size, device=self.device)
        scored = Scored(
            name,
            model,
            0.0,
            0.0,
            sum(p.numel() for p in model.parameters()),
            count_macs(model, example),
            candidate.weight_averaged,
        )
        try:
            self.measure(scored)
        except NonFiniteLogits:
            scored.refused = "non-finite validation logits"
        if non_finite_weights(model):  # after recalibration too: BN statistics are weights of the shipped file
            scored.refused = "non-finite weights"
        return scored

    def measure(self, scored: Scored) -> None:
        """Validation accuracy, after recomputing BN statistics on the calibration sample if weight-averaged."""
        if scored.weight_averaged:
            try:
                scored.top1_without_bn_recalibration = top_accuracy(scored.model, self.val_loader)[0]
            except NonFiniteLogits:
                pass  # stale statistics may overflow; only the recalibrated model can ship
            recalibrate_bn(scored.model, self.calib_loader.epoch(0), self.bn_batches)
        scored.top1, scored.top5 = top_accuracy(scored.model, self.val_loader)

    def ensemble_row(self) -> dict[str, Any]:
        top1 = ensemble_accuracy(self.finished, self.val_loader)
        return {
            "candidate": "ensemble",
            "val_top1": top1,
            "params": sum(p.numel() for p in self.students.parameters()),
            "macs": self.finished.ensemble_macs(),
            "reference": True,
        }


def choose(scored: list[Scored], strategy: str, method_ships: str) -> Scored:
    """auto: the most accurate single model, ties to the smaller one, then to the name. Refused candidates
    (non-finite) never ship: a strategy left with nothing else is an error naming them."""
    pool = strategy_pool(scored, strategy, method_ships)
    shippable = [s for s in pool if s.refused is None]
    if not shippable:
        refused = "; ".join(f"{s.name} has {s.refused}" for s in pool)
        raise OkdpipeError(
            f"--strategy {strategy}: {refused}, so it is never shipped (the run diverged); "
            f"retrain it, e.g. with a lower --lr"
        )
    return min(shippable, key=lambda s: (-s.ship_top1, s.params, s.name))


def shipping_candidates(students, method) -> dict[str, Candidate]:
    """Every model select can ship from a run: each student, the method's own (leader, mean teachers, hybrid) and,
    for peers of one architecture, their weight-averaged soup."""
    found = {f"student:{i}": Candidate(students.extract(i)) for i in range(students.count)}
    found.update(method.candidates())
    if students.count > 1 and len(set(students.archs)) == 1:  # weights average only within one architecture
        found["soup"] = Candidate(soup(students), weight_averaged=True)
    return found


def candidate_names(cfg) -> list[str]:
    """The candidates a run of `cfg` will offer, known before it trains (they depend on the method, the student
    count and architectures, not on the data): the pipeline checks its select strategy against them up front."""
    students, method = build_models(cfg, SimpleNamespace(num_classes=10, in_channels=3), torch.device("cpu"))
    return list(shipping_candidates(students, method))


def pool_names(names: list[str], strategy: str, method_ships: str) -> list[str]:
    """The names of the candidates `strategy` chooses among; a strategy the run cannot serve is one line."""
    pools = {
        "auto": names,
        "best": [n for n in names if n.startswith("student:")],
        "mean-teacher": [n for n in names if n.startswith("mean-teacher:")],
        **{exact: [n for n in names if n == exact] for exact in ("leader", "hybrid", "soup")},
    }
    numbered = re.fullmatch(r"(student|mean-teacher):[0-9]+", strategy)  # a candidate name, only not in this run
    pool = pools.get(strategy, [strategy] if strategy in names else [] if numbered else None)
    if pool is None:
        raise OkdpipeError(f"unknown --strategy {strategy!r}; use {STRATEGIES} (this run has: {', '.join(names)})")
    if not pool:
        raise OkdpipeError(
            f"--strategy {strategy}: this run ({method_ships} method) has no such candidate; it has: {', '.join(names)}"
        )
    return pool


def strategy_pool(scored: list[Scored], strategy: str, method_ships: str) -> list[Scored]:
    """The scored candidates `strategy` chooses among."""
    by_name = {s.name: s for s in scored}
    return [by_name[name] for name in pool_names(list(by_name), strategy, method_ships)]


def check_inputs(run_dir: Path, out: Optional[Path], strategy: str = "auto") -> None:
    """What select refuses before scoring, in the order it does (`--dry-run` runs this): a run that is missing,
    unfinished, diverged or damaged (its checkpoint verified, data and models rebuilt), a strategy the run has no
    candidate for, then the model path."""
    finished = load_run(run_dir, device="cpu")
    pool_names(list(shipping_candidates(finished.students, finished.method)), strategy, finished.method.ships)
    check_can_write_file(out or finished.run.root / "model.pt", "--out")


def select(
    run_dir: Path,
    strategy: str,
    out: Optional[Path],
    bn_batches: int,
    device: str = "auto",
    precision: Optional[ShippingPrecision] = None,
):
    """Score, choose, write selection.json and MODEL.pt; returns (rows, ensemble row, chosen, model path).
    With `precision`, every shippable candidate is also scored converted, and the choice ranks that score."""
    session = Selection(run_dir, bn_batches, device)
    candidates = session.candidates()
    pool_names(list(candidates), strategy, session.method.ships)  # before minutes of scoring
    check_can_write_file(out or session.run.root / "model.pt", "--out")
    scored = [session.score(name, c) for name, c in candidates.items()]
    if precision is not None:
        for candidate in scored:
            score_shipped(candidate, precision, session)
    chosen = choose(scored, strategy, session.method.ships)
    ensemble = session.ensemble_row()
    out = out or session.run.root / "model.pt"
    model_bytes = model_file_bytes(chosen.model.cpu(), model_info(session, chosen), out)
    sha = hashlib.sha256(model_bytes).hexdigest()
    rows = [dict(s.row(), chosen=s is chosen) for s in scored if s.refused is None]
    selection = json_text(
        {
            "created": now_iso(),
            "strategy": strategy,
            "precision": "fp32" if precision is None else precision.name,
            **({} if precision is None else {precision.name: precision.settings()}),
            "split": "val",
            "bn_recalibration_batches": bn_batches,
            "bn_recalibration_sample": session.calibration.record(session.bundle.spec.num_classes),
            "chosen": chosen.name,
            "model_file": str(out),
            "model_sha256": sha,
            "candidates": rows,
            "refused": [{"candidate": s.name, "reason": s.refused} for s in scored if s.refused],
            "ensemble": ensemble,
        },
        "selection.json",
    )
    # together or not at all: a full disk never leaves a new MODEL.pt beside an old selection.json
    atomic_write_files({Path(out): model_bytes, session.run.root / "selection.json": selection.encode()})
    session.run.update_manifest(
        selection={
            "strategy": strategy,
            "chosen": chosen.name,
            "model_file": str(out),
            "model_sha256": sha,
            "val_top1": chosen.top1,
            **({} if precision is None else {f"{precision.name}_val_top1": chosen.ship_top1}),
        }
    )
    log_selection(session.run.root)  # a run tracked in MLflow gets selection.json and the model file
    return rows, ensemble, chosen, out


def score_shipped(candidate: Scored, precision: ShippingPrecision, session: Selection) -> None:
    """The candidate's figures at the shipping precision; refused if it cannot be scored there."""
    if candidate.refused is not None:
        return
    try:
        figures = precision.score(candidate.model, session)
    except OkdpipeError as error:
        candidate.refused = f"{precision.name}: {error}"
        return
    drop = drop_points(candidate.top1, figures["val_top1"])
    candidate.shipped = {"precision": precision.name, **figures, "drop_points": drop}


def model_info(session: Selection, chosen: Scored) -> ModelInfo:
    spec, cfg = session.bundle.spec, session.cfg
    return ModelInfo(
        arch=chosen.model.arch,  # the shipped network's own: peers may differ (`--arch resnet8,mobilenetv2`)
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        input_size=spec.input_size,
        mean=spec.mean,
        std=spec.std,
        labels=spec.labels,
        dataset=spec.name,
        provenance={
            "run_dir": str(session.run.root.resolve()),
            "method": cfg.method,
            "candidate": chosen.name,
            "val_top1": chosen.top1,
            "checkpoint_sha256": file_sha256(session.run.checkpoints / "last.pt"),
            "data": session.finished.data.as_record(),
        },
    )
