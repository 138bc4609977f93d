"""TensorBoard and MLflow trackers (`--logger`), read back with each tool's own reader: TensorBoard's
EventAccumulator on the event files, MlflowClient on a file store. The expected numbers come from metrics.jsonl,
the source of truth the trackers mirror."""

import json
import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from okdpipe.config import DistillConfig
from okdpipe.distill import trackers
from okdpipe.distill.trainer import fit
from okdpipe.errors import OkdpipeError
from okdpipe.run import RunDir

pytestmark = pytest.mark.timeout(240)

# synthetic: 64 training images, 48 after the 25% validation split -> 6 steps of 8 per epoch
TINY = dict(
    method="dml",
    arch="resnet8",
    students=2,
    dataset="synthetic",
    epochs=3,
    batch_size=8,
    lr=0.05,
    eval_batch_size=64,
    val_split=0.25,
    loggers=["tensorboard", "mlflow"],
)
STEPS_PER_EPOCH = 6


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A private MLflow file store, and no tracking URI leaking in from the environment."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return (tmp_path / "mlruns").as_uri()


def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def jsonl(run: RunDir, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    return [line for line in lines if line["kind"] == kind]


def tensorboard_scalars(run: RunDir, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run.root / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def mlflow_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))


def only_run(uri: str):
    runs = client(uri).search_runs([client(uri).get_experiment_by_name("okdpipe").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def test_both_trackers_hold_the_numbers_of_metrics_jsonl(tmp_path, store):
    run = RunDir(tmp_path / "run")
    fit(DistillConfig(**TINY, mlflow_uri=store), run, echo=lambda _: None)
    steps, epochs = jsonl(run, "step"), jsonl(run, "epoch")
    assert [s["step"] for s in steps] == [6, 12, 18]  # logged at each epoch's end (6 steps < LOG_EVERY_STEPS)
    ends = [6 * e["epoch"] for e in epochs]

    # TensorBoard stores float32: equal to metrics.jsonl's float64 within float32's precision
    for tag, key in [("train/loss", "loss"), ("train/kd/s1", "kd/s1"), ("lr", "lr")]:
        assert tensorboard_scalars(run, tag) == [(s["step"], pytest.approx(s[key], rel=1e-6)) for s in steps]
    ensemble = [pytest.approx(e["val"]["ensemble"]["top1"], rel=1e-6) for e in epochs]
    assert tensorboard_scalars(run, "val/top1/ensemble") == list(zip(ends, ensemble))
    assert [v for _, v in tensorboard_scalars(run, "epoch")] == [1, 2, 3]
    events = EventAccumulator(str(run.root / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "method: dml" in config_text and "epochs: 3" in config_text

    # MLflow stores float64: exactly metrics.jsonl's numbers
    found = only_run(store)
    run_id = found.info.run_id
    assert found.info.status == "FINISHED"
    assert found.data.params["method"] == "dml" and found.data.params["lr"] == "0.05"
    assert found.data.params["loggers"] == "['tensorboard', 'mlflow']"
    assert mlflow_history(store, run_id, "train/ce/s0") == [(s["step"], s["ce/s0"]) for s in steps]
    assert mlflow_history(store, run_id, "val/top1/student_1") == [
        (end, e["val"]["student:1"]["top1"]) for end, e in zip(ends, epochs)
    ]
    artifacts = {a.path for a in client(store).list_artifacts(run_id)}
    assert artifacts == {"config.yaml", "manifest.json"}
    recorded = run.read_manifest()["trackers"]
    assert recorded == {"tensorboard": {"log_dir": "tensorboard"}, "mlflow": {"tracking_uri": store, "run_id": run_id}}


def test_resume_continues_the_same_tracker_runs(tmp_path, store):
    straight = RunDir(tmp_path / "straight")
    fit(DistillConfig(**{**TINY, "loggers": ["tensorboard"]}), straight, echo=lambda _: None)
    killed = RunDir(tmp_path / "killed")
    cfg = DistillConfig(**TINY, mlflow_uri=store)
    # killed mid-epoch 3: epochs 1-2 are checkpointed, steps 13-15 of epoch 3 ran and logged nothing yet
    assert fit(cfg, killed, stop_after_steps=2 * STEPS_PER_EPOCH + 3, echo=lambda _: None) == {"stopped": True}
    first_id = only_run(store).info.run_id
    cosine = lambda step: 0.05 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 18))  # the lr of 1-based `step`
    assert mlflow_history(store, first_id, "lr") == [(6, pytest.approx(cosine(6))), (12, pytest.approx(cosine(12)))]
    fit(cfg, killed, resume=True, echo=lambda _: None)

    resumed = only_run(store)
    assert resumed.info.run_id == first_id and resumed.info.status == "FINISHED"
    steps = jsonl(killed, "step")
    assert mlflow_history(store, first_id, "train/loss") == [(s["step"], s["loss"]) for s in steps]
    # TensorBoard: one point per step, and the same curve as the uninterrupted run's
    assert tensorboard_scalars(killed, "train/loss") == tensorboard_scalars(straight, "train/loss")
    assert [step for step, _ in tensorboard_scalars(killed, "val/top1/student_0")] == [6, 12, 18]


def test_a_resume_purges_what_the_killed_run_logged_after_its_checkpoint(tmp_path, store):
    """A kill after epoch 2's metrics reached the trackers but before its checkpoint was saved: the resume replays
    epoch 2. TensorBoard's reader must show epoch 2 once, from the replay; MLflow (which cannot delete a point)
    once, as first logged. The kill is staged by putting back an epoch-1 checkpoint of other weights (a 1-epoch
    run), so the replay's numbers differ from the first ones."""
    from okdpipe.distill.checkpoint import load_checkpoint, save_checkpoint

    run = RunDir(tmp_path / "run")
    cfg = DistillConfig(**{**TINY, "epochs": 2}, mlflow_uri=store)
    fit(cfg, run, echo=lambda _: None)
    before = tensorboard_scalars(run, "train/loss")
    first_mlflow = mlflow_history(store, only_run(store).info.run_id, "train/loss")
    other = RunDir(tmp_path / "other")
    fit(DistillConfig(**{**TINY, "loggers": [], "epochs": 1}), other, echo=lambda _: None)
    save_checkpoint(run, {**load_checkpoint(other), "config": load_checkpoint(run)["config"]})
    fit(cfg, run, resume=True, echo=lambda _: None)
    after = tensorboard_scalars(run, "train/loss")
    replayed = jsonl(run, "step")[1]["loss"]
    assert [step for step, _ in after] == [6, 12]
    assert after[0] == before[0] and after[1] == (12, pytest.approx(replayed, rel=1e-6))
    assert before[1][1] != pytest.approx(replayed, rel=1e-3)
    assert mlflow_history(store, only_run(store).info.run_id, "train/loss") == first_mlflow


def test_trackers_of_the_run_receive_select_s_files(tmp_path, store):
    run = RunDir(tmp_path / "run")
    fit(DistillConfig(**{**TINY, "epochs": 1, "loggers": ["mlflow"]}, mlflow_uri=store), run, echo=lambda _: None)
    (run.root / "selection.json").write_text("{}\n")
    (run.root / "model.pt").write_bytes(b"weights")
    trackers.log_selection(run.root)
    run_id = only_run(store).info.run_id
    artifacts = {a.path: a.file_size for a in client(store).list_artifacts(run_id)}
    assert set(artifacts) == {"config.yaml", "manifest.json", "selection.json", "model.pt"}
    assert artifacts["model.pt"] == len(b"weights")


def test_a_missing_tracker_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, store):
    monkeypatch.setitem(trackers.NEEDS, "mlflow", "okdpipe_no_such_module")
    with pytest.raises(OkdpipeError) as caught:
        fit(DistillConfig(**TINY, mlflow_uri=store), RunDir(tmp_path / "run"), echo=lambda _: None)
    assert str(caught.value) == (
        "--logger mlflow: the okdpipe_no_such_module package is not installed; run pip install 'okdpipe[tracking]'"
    )
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_metric_names_suit_both_backends():
    record = {"kind": "step", "epoch": 1, "step": 3, "lr": 0.1, "images_per_s": 9.0, "loss": 2.0, "ce/s0": 1.5}
    assert trackers.step_metrics(record) == {"train/loss": 2.0, "train/ce/s0": 1.5, "lr": 0.1, "images_per_s": 9.0}
    summary = {"epoch": 2, "val": {"student:0": {"top1": 0.5, "top5": 0.9, "loss": 1.2}, "hybrid": {"top1": 0.6}}}
    assert trackers.epoch_metrics(summary) == {
        "epoch": 2.0,
        "val/top1/student_0": 0.5,
        "val/top5/student_0": 0.9,
        "val/top1/hybrid": 0.6,
    }


def test_an_unusable_mlflow_uri_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    run = RunDir(tmp_path / "run")
    run.prepare()
    uri = f"file:{tmp_path / 'a-file' / 'sub'}"
    with pytest.raises(OkdpipeError, match=r"MLflow tracking URI .* cannot be used \(NotADirectoryError") as raised:
        trackers.open_trackers(run, {}, "", ["mlflow"], uri, 0)
    assert "\n" not in str(raised.value)
