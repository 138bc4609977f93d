"""Every registered method through the shared loop: it learns, its extras are scored, and a run killed mid-epoch
resumes to exactly the same students and method state. A new method is covered without a new test."""

import json

import pytest
import torch

from okdpipe.config import DistillConfig
from okdpipe.distill.checkpoint import load_checkpoint
from okdpipe.distill.methods import METHODS
from okdpipe.distill.trainer import fit
from okdpipe.run import RunDir

STEPS_PER_EPOCH = 6  # synthetic: 48 training images after the 25% validation split, batches of 8


def config(method: str) -> DistillConfig:
    return DistillConfig(
        method=method,
        arch="resnet8",
        dataset="synthetic",
        epochs=3,
        batch_size=8,
        lr=0.05,
        val_split=0.25,
        eval_batch_size=64,
        seed=1,
    )


def epoch_records(run: RunDir) -> list[dict]:
    return [json.loads(line) for line in run.metrics_path.read_text().splitlines() if '"kind": "epoch"' in line]


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", METHODS.names())
def test_method_trains_and_resumes_exactly(method, tmp_path):
    straight, killed = RunDir(tmp_path / "straight"), RunDir(tmp_path / "killed")
    fit(config(method), straight, echo=lambda _: None)
    records = epoch_records(straight)
    losses = [r["train"]["loss"] for r in records]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    # The total may rise while a method's KD weights ramp up; the first student's own CE must fall.
    ce = [r["train"]["ce/s0"] for r in records]
    assert ce[-1] < ce[0], f"{method}: student 0's cross-entropy did not fall: {ce}"
    val = records[-1]["val"]
    assert {"ensemble", "student:0"} <= set(val)
    assert "loss" in records[-1]["train"]

    assert fit(config(method), killed, stop_after_steps=STEPS_PER_EPOCH + 2, echo=lambda _: None) == {"stopped": True}
    fit(config(method), killed, resume=True, echo=lambda _: None)
    a, b = load_checkpoint(straight), load_checkpoint(killed)
    assert same_state(a["students"], b["students"]), f"{method}: students differ after resume"
    assert same_state(a["method"], b["method"]), f"{method}: method state differs after resume"
    assert [r["val"] for r in epoch_records(killed)] == [r["val"] for r in records]


@pytest.mark.parametrize("method", METHODS.names())
def test_students_extract_to_plain_networks_matching_the_container(method):
    cls = METHODS.get(method)
    cfg = config(method)
    from okdpipe.datasets import load_dataset
    from okdpipe.distill.trainer import build_models

    spec = load_dataset("synthetic", val_split=0.25).spec
    students, _ = build_models(cfg, spec, torch.device("cpu"))
    students.eval()
    views = torch.randn(max(1, cls.per_student_views * students.count), 2, spec.in_channels, *spec.input_size)
    out = students(views)
    for i in range(students.count):
        plain = students.extract(i).eval()
        assert type(plain).__module__.startswith("okdpipe.distill.models")
        torch.testing.assert_close(plain(views[i if views.shape[0] > 1 else 0]), out.logits[i], rtol=0, atol=0)
