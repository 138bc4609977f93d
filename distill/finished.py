"""A finished run, rebuilt from its verified checkpoint: `load_run()` is how select and bench (and the user's
own code) get the students, the method, the run's config and the run's exact data splits.

`FinishedRun.ensemble_logits` is the one ensemble forward pass outside training: all students on the same
views, combined by the method's own `ensemble_logits` (ONE's gate, PCL's mean, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from okdpipe.config import DistillConfig, validated
from okdpipe.console import say
from okdpipe.contracts.data import DataSource
from okdpipe.distill.checkpoint import load_checkpoint
from okdpipe.distill.models import count_macs
from okdpipe.distill.trainer import autocast_for, build_models, resolve_device
from okdpipe.errors import GateFailed, OkdpipeError
from okdpipe.files import missing_or_kind
from okdpipe.run import RunDir


@dataclass
class FinishedRun:
    run: RunDir
    cfg: DistillConfig
    checkpoint: dict
    device: torch.device
    data: DataSource
    bundle: object  # okdpipe.datasets.DataBundle: train / val / test and the spec
    students: torch.nn.Module
    method: torch.nn.Module

    @property
    def spec(self):
        return self.bundle.spec

    def ensemble_logits(self, views: torch.Tensor) -> torch.Tensor:
        """views [V, B, C, H, W] (V = 1: every student sees the same images) -> the ensemble's logits [B, K]."""
        with torch.inference_mode(), autocast_for(self.device, self.cfg.precision)():
            out = self.students(views, features=self.method.needs_features, stages=self.method.needs_stages)
            return self.method.ensemble_logits(out)

    def ensemble_macs(self) -> int:
        """MACs per image of all students together (what running the ensemble costs)."""
        example = torch.zeros(1, 1, self.spec.in_channels, *self.spec.input_size, device=self.device)
        return count_macs(self.students, example)


def check_run(run: RunDir) -> None:
    if not run.root.is_dir():
        raise OkdpipeError(
            f"{run.root}: {missing_or_kind(run.root, 'a run directory')}; "
            f"train one with `okdpipe distill --out {run.root}`"
        )
    manifest = run.read_manifest()
    if manifest.get("stage") != "distill" or "config" not in manifest:
        raise OkdpipeError(f"{run.root}: not an okdpipe run directory (no distill manifest)")
    if manifest.get("status") == "diverged":
        raise GateFailed(
            f"{run.root}: training diverged ({str(manifest.get('error'))[:200]}); there is nothing to "
            "ship: train again with a lower --lr"
        )
    if manifest.get("status") != "finished":
        raise OkdpipeError(
            f"{run.root}: training did not finish; continue it with `okdpipe distill --out {run.root} --resume`"
        )


def load_run(run_dir: str | Path, device: str = "auto") -> FinishedRun:
    """The finished run in `run_dir`: config, verified checkpoint, students and method in eval mode, data splits."""
    run = RunDir(Path(run_dir))
    check_run(run)
    checkpoint = load_checkpoint(run)
    cfg = validated(DistillConfig, {**checkpoint["config"], "device": device}, f"{run.root}: damaged run config")
    resolved = resolve_device(device)
    data = DataSource.of_run(cfg)
    bundle = data.load()
    warn_if_data_changed(run, bundle)
    students, method = build_models(cfg, bundle.spec, resolved)
    students.load_state_dict(checkpoint["students"])
    method.load_state_dict(checkpoint["method"])
    return FinishedRun(run, cfg, checkpoint, resolved, data, bundle, students.eval(), method.eval())


def warn_if_data_changed(run: RunDir, bundle) -> None:
    """Say so when the dataset is not the one the run trained on (files added, removed, relabelled or rewritten;
    for an image folder also one copied without its modification times). The validation split is drawn from the
    training files again, so it may now hold images the students trained on, and every figure measured on it is
    suspect. A warning, not a refusal: a folder copied to another machine changes the fingerprint too."""
    recorded = (run.read_manifest().get("dataset") or {}).get("fingerprint")
    if isinstance(recorded, str) and recorded != bundle.fingerprint:
        say(
            f"warning: {run.root}: the dataset at {bundle.source} is not the one this run trained on (fingerprint "
            f"{bundle.fingerprint[:12]}, the run recorded {recorded[:12]}); validation figures may include trained "
            "images: restore the data the run trained on",
            err=True,
        )
