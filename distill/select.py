"""`okdpipe select`: score every shippable candidate of a finished run on the validation split, pick one, and
write it as a self-describing MODEL.pt.

Candidates: each student (extracted to a plain network), the method's extras (FFSD's leader, PCL's mean
teachers, OKDPH's hybrid) and a uniform weight average of the students ("soup"). Weight-averaged candidates get
their BatchNorm statistics recomputed on training images first (averaging weights invalidates them); their
accuracy without recalibration is reported too. The ensemble of all students is scored as the reference the
shipped model tries to approach. The test split is never read here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from okdpipe.config import DistillConfig
from okdpipe.datasets import load_dataset, make_loader
from okdpipe.distill.checkpoint import load_checkpoint
from okdpipe.distill.evaluate import Accuracy, recalibrate_bn
from okdpipe.distill.methods import Candidate
from okdpipe.distill.trainer import autocast_for, build_models, resolve_device
from okdpipe.errors import OkdpipeError
from okdpipe.files import atomic_write_json, file_sha256
from okdpipe.modelfile import ModelInfo, save_model_file
from okdpipe.run import RunDir, now_iso

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

    def row(self) -> dict[str, Any]:
        row = {"candidate": self.name, "val_top1": self.top1, "val_top5": self.top5, "params": self.params,
               "macs": self.macs, "weight_averaged": self.weight_averaged}
        if self.weight_averaged:
            row["val_top1_without_bn_recalibration"] = self.top1_without_bn_recalibration
        return row


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on `example` (batch 1), counting Conv2d and Linear layers."""
    total = 0

    def conv(module: nn.Conv2d, _inputs, output):
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += output.numel() * kernel

    def linear(module: nn.Linear, _inputs, output):
        nonlocal total
        total += output.numel() * module.in_features

    hooks = [m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else linear)
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for hook in hooks:
            hook.remove()
    return total


def soup(students) -> nn.Module:
    """Uniform average of every student's weights and float buffers, as a plain network."""
    states = [students.member_state(i) for i in range(students.count)]
    model = students.extract(0)
    averaged = {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
                for k, v in states[0].items()}
    model.load_state_dict(averaged)
    return model


@torch.no_grad()
def top_accuracy(model: nn.Module, loader) -> tuple[float, float]:
    meter = Accuracy()
    model.eval()
    for batch in loader.epoch(0):
        meter.update(model(batch.views[0]), batch.labels)
    result = meter.result()
    return result["top1"], result["top5"]


@torch.no_grad()
def ensemble_accuracy(students, method, loader, autocast) -> float:
    meter = Accuracy()
    students.eval()
    method.eval()
    for batch in loader.epoch(0):
        with autocast():
            out = students(batch.views, features=method.needs_features, stages=method.needs_stages)
            meter.update(method.ensemble_logits(out), batch.labels)
    return meter.result()["top1"]


class Selection:
    """A finished run, rebuilt from its verified checkpoint, with its data splits."""

    def __init__(self, run_dir: Path, bn_batches: int, device: str = "auto"):
        self.run = RunDir(run_dir)
        check_run(self.run)
        self.state = load_checkpoint(self.run)
        self.cfg = DistillConfig(**{**self.state["config"], "device": device})
        self.device = resolve_device(device)
        self.bundle = load_dataset(self.cfg.dataset, self.cfg.data_dir, val_split=self.cfg.val_split,
                                   seed=self.cfg.seed, train_subset=self.cfg.train_subset, **self.cfg.data_options)
        self.students, self.method = build_models(self.cfg, self.bundle.spec, self.device)
        self.students.load_state_dict(self.state["students"])
        self.method.load_state_dict(self.state["method"])
        make = lambda split: make_loader(split, self.bundle.spec, batch_size=self.cfg.eval_batch_size,  # noqa: E731
                                         train=False, device=self.device, seed=self.cfg.seed)
        self.val_loader, self.calib_loader = make(self.bundle.val), make(self.bundle.train)
        self.bn_batches = bn_batches
        if len(self.bundle.val) == 0:
            raise OkdpipeError(f"{run_dir}: the run has no validation split (val_split=0); nothing to select on")

    def candidates(self) -> dict[str, Candidate]:
        found = {f"student:{i}": Candidate(self.students.extract(i)) for i in range(self.students.count)}
        found.update(self.method.candidates())
        if self.students.count > 1:
            found["soup"] = Candidate(soup(self.students), weight_averaged=True)
        return found

    def score(self, name: str, candidate: Candidate) -> Scored:
        model = candidate.model.to(self.device)
        without = None
        if candidate.weight_averaged:
            without = top_accuracy(model, self.val_loader)[0]
            recalibrate_bn(model, self.calib_loader.epoch(0), self.bn_batches)
        top1, top5 = top_accuracy(model, self.val_loader)
        spec = self.bundle.spec
        example = torch.zeros(1, spec.in_channels, *spec.input_size, device=self.device)
        return Scored(name, model, top1, top5, sum(p.numel() for p in model.parameters()),
                      count_macs(model, example), candidate.weight_averaged, without)

    def ensemble_row(self) -> dict[str, Any]:
        spec = self.bundle.spec
        example = torch.zeros(1, 1, spec.in_channels, *spec.input_size, device=self.device)
        macs = count_macs(_LogitsOnly(self.students), example)
        top1 = ensemble_accuracy(self.students, self.method, self.val_loader,
                                 autocast_for(self.device, self.cfg.precision))
        return {"candidate": "ensemble", "val_top1": top1, "params": sum(p.numel() for p in self.students.parameters()),
                "macs": macs, "reference": True}


class _LogitsOnly(nn.Module):
    """Students as a plain module for MAC counting (their forward returns a dataclass)."""

    def __init__(self, students):
        super().__init__()
        self.students = students

    def forward(self, views):
        return self.students(views).logits


def check_run(run: RunDir) -> None:
    if not run.root.is_dir():
        raise OkdpipeError(f"{run.root}: no such run directory; train one with `okdpipe distill --out {run.root}`")
    manifest = run.read_manifest()
    if manifest.get("stage") != "distill" or "config" not in manifest:
        raise OkdpipeError(f"{run.root}: not an okdpipe run directory (no distill manifest)")
    if manifest.get("status") != "finished":
        raise OkdpipeError(f"{run.root}: training did not finish; continue it with "
                           f"`okdpipe distill --out {run.root} --resume`")


def choose(scored: list[Scored], strategy: str, method_ships: str) -> Scored:
    """auto: the most accurate single model, ties to the smaller one, then to the name."""
    by_name = {s.name: s for s in scored}
    students = [s for s in scored if s.name.startswith("student:")]
    pools = {
        "auto": scored,
        "best": students,
        "leader": [by_name["leader"]] if "leader" in by_name else [],
        "mean-teacher": [s for s in scored if s.name.startswith("mean-teacher:")],
        "hybrid": [by_name["hybrid"]] if "hybrid" in by_name else [],
        "soup": [by_name["soup"]] if "soup" in by_name else [],
    }
    pool = pools.get(strategy, [by_name[strategy]] if strategy in by_name else None)
    if pool is None:
        raise OkdpipeError(f"unknown --strategy {strategy!r}; use {STRATEGIES} (this run has: "
                           f"{', '.join(by_name)})")
    if not pool:
        raise OkdpipeError(f"--strategy {strategy}: this run ({method_ships} method) has no such candidate; "
                           f"it has: {', '.join(by_name)}")
    return min(pool, key=lambda s: (-s.top1, s.params, s.name))


def select(run_dir: Path, strategy: str, out: Optional[Path], bn_batches: int, device: str = "auto"):
    """Score, choose, write selection.json and MODEL.pt; returns (rows, ensemble row, chosen, model path)."""
    session = Selection(run_dir, bn_batches, device)
    scored = [session.score(name, c) for name, c in session.candidates().items()]
    chosen = choose(scored, strategy, session.method.ships)
    ensemble = session.ensemble_row()
    out = out or session.run.root / "model.pt"
    sha = save_model_file(chosen.model.cpu(), model_info(session, chosen), out)
    rows = [dict(s.row(), chosen=s is chosen) for s in scored]
    atomic_write_json(session.run.root / "selection.json", {
        "created": now_iso(), "strategy": strategy, "split": "val", "bn_recalibration_batches": bn_batches,
        "chosen": chosen.name, "model_file": str(out), "model_sha256": sha, "candidates": rows,
        "ensemble": ensemble})
    session.run.update_manifest(selection={"strategy": strategy, "chosen": chosen.name, "model_file": str(out),
                                           "model_sha256": sha, "val_top1": chosen.top1})
    return rows, ensemble, chosen, out


def model_info(session: Selection, chosen: Scored) -> ModelInfo:
    spec, cfg = session.bundle.spec, session.cfg
    return ModelInfo(
        arch=cfg.arch, num_classes=spec.num_classes, in_channels=spec.in_channels, input_size=spec.input_size,
        mean=spec.mean, std=spec.std, labels=spec.labels, dataset=spec.name,
        provenance={
            "run_dir": str(session.run.root.resolve()), "method": cfg.method, "candidate": chosen.name,
            "val_top1": chosen.top1, "checkpoint_sha256": file_sha256(session.run.checkpoints / "last.pt"),
            "data": {"dataset": cfg.dataset, "data_dir": cfg.data_dir, "val_split": cfg.val_split,
                     "seed": cfg.seed, "options": dict(cfg.data_options)},
        },
    )
