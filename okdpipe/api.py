"""okdpipe's Python API: the same stages as the CLI, taking the same config models (one declaration per stage).

    from okdpipe import api

    api.fit(api.DistillConfig(method="dml", arch="resnet8", epochs=1, train_subset=50), "runs/dml")
    chosen = api.select("runs/dml")                                   # -> runs/dml/model.pt
    cards = api.export(chosen.model_file, "runs/dml/export", api.ExportConfig(quantize="int8"))
    report = api.bench([card.directory for card in cards], api.BenchConfig(batch_sizes=[1], gates=["top1>=0.5"]))
    app = api.serve_app(cards[0].directory)                           # a FastAPI app: uvicorn.run(app)

Errors are `okdpipe.errors.OkdpipeError` (bad input) and its subclass `GateFailed` (a check failed), with the
same one-line messages the CLI prints. Heavy imports happen inside each function.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from okdpipe.bench.config import BenchConfig
from okdpipe.config import DistillConfig
from okdpipe.distill.select_command import SelectConfig
from okdpipe.export.config import ExportConfig
from okdpipe.serve.config import ServeConfig

__all__ = [
    "BenchConfig",
    "DistillConfig",
    "ExportConfig",
    "SelectConfig",
    "Selected",
    "ServeConfig",
    "bench",
    "export",
    "fit",
    "load_model",
    "load_run",
    "select",
    "serve_app",
]

PathLike = str | os.PathLike


def fit(config: DistillConfig, out: PathLike, *, resume: bool = False, echo=print) -> dict[str, Any]:
    """`okdpipe distill`: train `config` into the run directory `out`; returns the run's final summary."""
    from okdpipe.distill.methods import METHODS  # noqa: F401  (registers every method)
    from okdpipe.distill.trainer import fit as train
    from okdpipe.run import RunDir

    return train(config, RunDir(Path(out)), resume=resume, echo=echo)


@dataclass
class Selected:
    """What `select` shipped: the model file, the chosen candidate and every candidate's validation figures."""

    model_file: Path
    chosen: str
    val_top1: float
    candidates: list[dict[str, Any]]
    ensemble: dict[str, Any]


def select(run_dir: PathLike, config: SelectConfig | None = None, *, out: PathLike | None = None) -> Selected:
    """`okdpipe select`: score every candidate on validation, write MODEL.pt (default RUN_DIR/model.pt)."""
    from okdpipe.export.select_int8 import select_shipping

    cfg = config or SelectConfig()
    rows, ensemble, chosen, path = select_shipping(Path(run_dir), cfg, None if out is None else Path(out))
    return Selected(Path(path), chosen.name, chosen.top1, rows, ensemble)


def export(model_file: PathLike, out: PathLike, config: ExportConfig | None = None) -> list:
    """`okdpipe export`: verified ONNX artifacts in OUT/<precision>; returns their model cards
    (`okdpipe.contracts.card.ModelCard`)."""
    from okdpipe.export.exporter import export_model

    return export_model(Path(model_file), Path(out), config or ExportConfig())


def bench(
    artifacts: list[PathLike],
    config: BenchConfig | None = None,
    *,
    policy: PathLike | None = None,
    baseline: PathLike | None = None,
    report: PathLike | None = None,
):
    """`okdpipe bench`: a `BenchReport` with the config's gates evaluated (`report.gates`; nothing is raised
    for a failed gate: check each `report.gates[i].passed`). Writes report.json/.md/.png when `report` is given."""
    from okdpipe.bench.gate import plan_gates
    from okdpipe.bench.report import write_reports
    from okdpipe.bench.run import bench as measure

    config = config or BenchConfig()
    paths = [None if path is None else Path(path) for path in (policy, baseline)]
    result = measure([Path(a) for a in artifacts], config, plan_gates(config.gates, *paths, tuple(config.batch_sizes)))
    if report is not None:
        write_reports(result, Path(report))
    return result


def serve_app(artifact_dir: PathLike, config: ServeConfig | None = None):
    """`okdpipe serve`'s FastAPI app for one artifact directory (host, port and log level are the ASGI server's:
    run it with e.g. `uvicorn.run(app)`). The API key comes from `config.api_key_file` or OKDPIPE_API_KEY."""
    from okdpipe.serve.app import create_app
    from okdpipe.serve.server import read_api_key

    cfg = config or ServeConfig()
    key = read_api_key(None if cfg.api_key_file is None else Path(cfg.api_key_file))
    return create_app(cfg.settings(Path(artifact_dir), key))


def load_model(model_file: PathLike):
    """A model file (MODEL.pt) as (eval-mode torch network, ModelInfo), its weights verified."""
    from okdpipe.distill.models import load_model_file

    return load_model_file(model_file)


def load_run(run_dir: PathLike, device: str = "auto"):
    """A finished run (`okdpipe.distill.finished.FinishedRun`): config, students, method, data splits."""
    from okdpipe.distill.finished import load_run as load

    return load(run_dir, device)
