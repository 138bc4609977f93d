"""Experiment trackers beside metrics.jsonl: TensorBoard and MLflow (`--logger`, repeatable).

metrics.jsonl stays the source of truth and is always written; a tracker receives the same numbers, so a user
can watch a run in the tool they already use. Only the process that writes the run directory (rank 0) opens
trackers. Each one records where it writes in the manifest ("trackers"), so `--resume` continues the same
TensorBoard log directory (what the killed run logged after its checkpoint is purged, and the replayed epoch writes
it again) and the same MLflow run (which cannot delete points: steps it already holds keep their first value, the
same number on CPU, where training is deterministic).

Names are shared by both backends, and every point's x is the optimiser step (as Lightning logs), so one axis
serves the per-step and the per-epoch numbers: `train/<term>` per logged step (the total loss and each method's
terms, e.g. `train/ce/s0`), `lr` and `images_per_s`; at each epoch's last step `epoch` and `val/top1/<model>`,
`val/top5/<model>` (fractions, 0-1) for every student, the ensemble and the method's own models. A model name's
colon becomes an underscore (`student_0`): a file store names a file after each metric, and Windows refuses colons.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

from okdpipe.errors import OkdpipeError
from okdpipe.run import RunDir

TENSORBOARD_DIR = "tensorboard"
EXTRA = "pip install 'okdpipe[tracking]'"
NEEDS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # logger -> the module it imports
EXPERIMENT = "okdpipe"
ARTIFACTS = ("config.yaml", "manifest.json", "selection.json")


def require(loggers: Iterable[str]) -> None:
    """Fail before training starts when a logger's package is missing (one line naming the extra)."""
    for logger in loggers:
        if importlib.util.find_spec(NEEDS[logger]) is None:
            raise OkdpipeError(f"--logger {logger}: the {NEEDS[logger]} package is not installed; run {EXTRA}")


def metric_name(*parts: str) -> str:
    """One metric name for both backends: MLflow allows letters, digits, `_ - . / ` and spaces only."""
    return "/".join(parts).replace(":", "_")


def step_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The tracker metrics of one `kind: step` line of metrics.jsonl."""
    skip = {"kind", "epoch", "step", "lr", "images_per_s"}
    values = {metric_name("train", k): float(v) for k, v in record.items() if k not in skip}
    return {**values, "lr": float(record["lr"]), "images_per_s": float(record["images_per_s"])}


def epoch_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The tracker metrics of one epoch: its number and every model's validation accuracy (fractions, 0-1)."""
    accuracies = {
        metric_name("val", measure, model): float(value)
        for model, scores in summary["val"].items()
        for measure, value in scores.items()
        if measure in ("top1", "top5")
    }
    return {"epoch": float(summary["epoch"]), **accuracies}


class TensorBoard:
    """Scalars and the resolved config in RUN/tensorboard (TensorBoard's own event files)."""

    def __init__(self, run: RunDir, config_yaml: str, resumed_after_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = run.root / TENSORBOARD_DIR
        # purge_step: TensorBoard's reader drops every point the killed run logged after the checkpoint
        self.writer = SummaryWriter(
            str(self.log_dir), purge_step=resumed_after_step + 1 if resumed_after_step else None
        )
        if not resumed_after_step:
            self.writer.add_text("config", "```yaml\n" + config_yaml + "```", 0)

    def record(self) -> dict[str, Any]:
        return {"log_dir": TENSORBOARD_DIR}

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def attach(self, path: Path) -> None:
        """TensorBoard keeps no files; the run directory holds them."""

    def close(self, failed: bool) -> None:
        self.writer.close()


class MLflow:
    """One MLflow run per okdpipe run: params from the resolved config, the same metrics, files as artifacts."""

    def __init__(self, uri: str, run_name: str, params: dict[str, str], previous: dict[str, Any]):
        allow_file_store(uri)
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = previous.get("run_id") if previous.get("tracking_uri") == uri else None
        self.logged_through = 0  # steps MLflow already holds (from before a resume): never logged twice
        if self.run_id and self.exists(self.run_id):
            self.client.update_run(self.run_id, status="RUNNING")
            self.logged_through = max((m.step for m in self.client.get_metric_history(self.run_id, "lr")), default=0)
            return
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def exists(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:  # noqa: BLE001 -- MlflowException for a run this store does not hold
            return False

    def record(self) -> dict[str, Any]:
        return {"tracking_uri": self.uri, "run_id": self.run_id}

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if step <= self.logged_through:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def attach(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def allow_file_store(uri: str) -> None:
    """MLflow 3 refuses its file store (./mlruns) unless MLFLOW_ALLOW_FILE_STORE=true: it is in maintenance mode,
    but it needs no database or server, which is what a default for one person's runs should be. A user who
    set the variable keeps their choice; a database or server URI is left alone."""
    if "://" not in uri or uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The resolved config as MLflow params: nested keys joined by dots, every value as text."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def mlflow_uri(configured: Optional[str], previous: dict[str, Any]) -> str:
    """--mlflow-uri, else $MLFLOW_TRACKING_URI, else the store the run used before (resume from another folder),
    else a file store ./mlruns (made absolute, so a resume from elsewhere finds it)."""
    chosen = configured or os.environ.get("MLFLOW_TRACKING_URI") or previous.get("tracking_uri")
    if chosen:
        return chosen
    return Path("mlruns").resolve().as_uri()


class Trackers:
    """The trackers of one run, used as a context: closed (marked failed in MLflow on an error) however the
    loop ends. Empty for ranks other than 0 and when no logger is chosen."""

    def __init__(self, backends: list[Any] = ()):
        self.backends = list(backends)

    def log_step(self, record: dict[str, Any]) -> None:
        for backend in self.backends:
            backend.log(step_metrics(record), record["step"])

    def log_epoch(self, summary: dict[str, Any], step: int) -> None:
        """`step`: the optimiser step the epoch ended on (the x of every tracker point)."""
        for backend in self.backends:
            backend.log(epoch_metrics(summary), step)

    def attach(self, run: RunDir, names: Iterable[str] = ARTIFACTS) -> None:
        """Copy the run's files that exist now (config, manifest, selection) to every tracker that stores files."""
        for name in names:
            if (run.root / name).is_file():
                for backend in self.backends:
                    backend.attach(run.root / name)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        for backend in self.backends:
            backend.close(failed=kind is not None)


def open_trackers(
    run: RunDir, config: dict[str, Any], config_yaml: str, loggers: list[str], uri: Optional[str], resumed_after: int
) -> Trackers:
    """Open the chosen trackers for rank 0 and record them in the manifest (what a resume continues);
    `resumed_after`: the last step of the checkpoint a resumed run starts from (0 for a new run)."""
    previous = run.read_manifest().get("trackers", {}) if resumed_after else {}
    backends: list[Any] = []
    for logger in dict.fromkeys(loggers):
        if logger == "tensorboard":
            backends.append(TensorBoard(run, config_yaml, resumed_after))
        else:
            chosen = mlflow_uri(uri, previous.get("mlflow", {}))
            try:
                backends.append(MLflow(chosen, run.root.name, flat_params(config), previous.get("mlflow", {})))
            except OkdpipeError:
                raise
            except Exception as exc:  # MLflow's own errors: an unreachable server, a store path it cannot create
                first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
                raise OkdpipeError(
                    f"MLflow tracking URI {chosen!r} cannot be used ({type(exc).__name__}: {first}); "
                    "pass a reachable server or a writable folder with --mlflow-uri"
                ) from None
    if backends:
        names = dict.fromkeys(loggers)
        run.update_manifest(trackers={name: b.record() for name, b in zip(names, backends)})
    return Trackers(backends)


def log_selection(run_root: Path) -> None:
    """After `okdpipe select`: attach selection.json, the updated manifest and the model file to the run's MLflow
    run (TensorBoard keeps no files). A run without MLflow is left alone."""
    run = RunDir(run_root)
    recorded = run.read_manifest().get("trackers", {}).get("mlflow")
    if not recorded:
        return
    require(["mlflow"])
    allow_file_store(recorded["tracking_uri"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=recorded["tracking_uri"])
    selection = run.read_manifest().get("selection", {})
    files = [run.root / "selection.json", run.manifest_path, Path(selection.get("model_file", run.root / "model.pt"))]
    for path in files:
        if path.is_file():
            client.log_artifact(recorded["run_id"], str(path))
