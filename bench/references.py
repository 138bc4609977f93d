"""What the shipped student saves: the rows bench measures beside the ONNX artifacts, each skipped with a note
when its source is missing.

- `pytorch`: the MODEL.pt named by the card's provenance, eager PyTorch, same data and batch sizes;
- `ensemble`: all students of the run named by the provenance (`okdpipe.distill.finished.load_run`), combined by
  the method's own ensemble (`FinishedRun.ensemble_logits`), eager, on the test split of the run's own data,
  normalised with that dataset's mean/std.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from okdpipe.bench.measure import PeakMemory, torch_threads
from okdpipe.bench.run import Bench, test_accuracy
from okdpipe.contracts.card import PIXEL_SCALE, ModelCard, Preprocess
from okdpipe.contracts.data import DataSource
from okdpipe.contracts.report import Entry
from okdpipe.errors import OkdpipeError


class References:
    def __init__(self, bench: Bench):
        self.bench = bench

    def entries(self, cards: list[ModelCard]) -> list[Entry]:
        """One PyTorch row per distinct model file, then one ensemble row per distinct run directory."""
        rows = []
        if self.bench.config.compare_pytorch:
            for group in _group(cards, "model_file").values():
                if self.bench.origin(group[0]):
                    rows.append(self.pytorch_entry(group))
        if self.bench.config.compare_ensemble:
            for card in cards:
                if not card.provenance.get("run_dir"):
                    self.bench.note(f"{card.name}: the card records no run directory; ensemble row skipped")
            for run_dir, group in _group(cards, "run_dir").items():
                row = self.ensemble_entry(Path(run_dir), [card.name for card in group])
                rows += [row] if row else []
        return rows

    def pytorch_entry(self, cards: list[ModelCard]) -> Entry:
        bench, card = self.bench, cards[0]
        origin = bench.origin(card)
        source = bench.data_source(card)
        split = bench.test_split(source)
        predict = eager_predict(origin["model"].to(bench.torch_device), bench.torch_device)
        with torch_threads(bench.config.threads), PeakMemory() as memory:
            latency = bench.latency(predict, split, card.preprocess, origin["macs"])
        path = card.provenance["model_file"]
        return Entry(
            f"{card.name.removesuffix('-' + card.precision)} (pytorch)",
            "pytorch",
            "fp32",
            path,
            source.dataset,
            of=[c.name for c in cards],
            provenance={"model_file": path},
            device=f"torch:{bench.torch_device}",
            params=origin["params"],
            macs=origin["macs"],
            start_ms=origin["load_ms"],
            memory=memory.result,
            accuracy=test_accuracy(predict, split, card.preprocess, f"{path} (pytorch)"),
            latency=latency,
        )

    def ensemble_entry(self, run_dir: Path, of: list[str]) -> Entry | None:
        """All students of the run, combined by the method; None (with a note) when the run cannot be rebuilt."""
        if not run_dir.is_dir():
            self.bench.note(f"run directory {run_dir} not found; ensemble row skipped")
            return None
        try:
            return ensemble_entry(self.bench, run_dir, of)
        except OkdpipeError as exc:  # a reference, not the gated model: report why and go on
            self.bench.note(f"ensemble of {run_dir} skipped: {exc}")
            return None


def _group(cards: list[ModelCard], key: str) -> dict[str, list[ModelCard]]:
    groups: dict[str, list[ModelCard]] = {}
    for card in cards:
        value = card.provenance.get(key)
        if value:
            groups.setdefault(value, []).append(card)
    return groups


def load_origin(path: Path) -> dict:
    """Model file -> eval-mode network with its parameter count, MACs per image and recorded data source."""
    import torch

    from okdpipe.distill.models import count_macs, load_model_file

    began = time.perf_counter()
    model, info = load_model_file(path)
    load_ms = (time.perf_counter() - began) * 1000.0
    example = torch.zeros(1, info.in_channels, *info.input_size)
    recorded = info.provenance.get("data")
    data = DataSource.from_record(recorded, path) if recorded else DataSource(info.dataset)
    return {
        "model": model,
        "params": sum(p.numel() for p in model.parameters()),
        "macs": count_macs(model, example),
        "load_ms": load_ms,
        "data": data,
    }


def eager_predict(model, device: str) -> Callable[[np.ndarray], np.ndarray]:
    """numpy batch -> numpy logits through eager PyTorch (synchronised on CUDA so timings are complete)."""
    import torch

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch).to(device)).float().cpu().numpy()

    return predict


def students_label(archs: list[str]) -> str:
    """`3 x resnet20` for peers of one architecture, `resnet8 + mobilenetv2` for one each."""
    return f"{len(archs)} x {archs[0]}" if len(set(archs)) == 1 else " + ".join(archs)


def ensemble_entry(bench: Bench, run_dir: Path, of: list[str]) -> Entry:
    """The run's students + method from the verified checkpoint; accuracy on the run's own test split."""
    import torch

    from okdpipe.bench.run import capped_test_split
    from okdpipe.distill.finished import load_run

    run = load_run(run_dir, device=bench.torch_device)
    spec, cfg = run.spec, run.cfg
    test = capped_test_split(run.data, bench.config.max_samples)
    preprocess = Preprocess(*spec.input_size, spec.in_channels, PIXEL_SCALE, tuple(spec.mean), tuple(spec.std))

    def predict(batch: np.ndarray) -> np.ndarray:
        return run.ensemble_logits(torch.from_numpy(batch).to(run.device)[None]).float().cpu().numpy()

    macs = run.ensemble_macs()
    with torch_threads(bench.config.threads), PeakMemory() as memory:
        latency = bench.latency(predict, test, preprocess, macs)
    students, archs = run.students.count, run.students.archs
    return Entry(
        f"ensemble ({students_label(archs)}, {cfg.method})",
        "ensemble",
        "fp32",
        str(run_dir),
        cfg.dataset,
        of=of,
        provenance={"run_dir": str(run_dir), "method": cfg.method, "students": students, "arch": cfg.arch},
        device=f"torch:{bench.torch_device}",
        params=sum(p.numel() for p in run.students.parameters()),
        macs=macs,
        memory=memory.result,
        accuracy=test_accuracy(predict, test, preprocess, f"the ensemble of {run_dir}"),
        latency=latency,
    )
