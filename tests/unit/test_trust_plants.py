"""Issue 13, the adversary's round: each test pins, by value, a check that a planted bug once slipped past
(inf accepted where only NaN was refused, top-5 counted as top-4 or top-6, a bound loosened, a NaN gate passing,
a half-written report set, a corrupt checkpoint loaded). The expected values are worked out here, not by the
code under test."""

from __future__ import annotations

import errno
import os
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from okdpipe import files
from okdpipe.bench.config import BenchConfig
from okdpipe.bench.gate import OPERATORS, evaluate_gates
from okdpipe.bench.report import write_reports
from okdpipe.config import DistillConfig
from okdpipe.contracts.inputs import input_shape_problem, normalisation_problem
from okdpipe.contracts.report import Accuracy as ReportAccuracy
from okdpipe.contracts.report import BenchReport, Entry, LatencyPoint
from okdpipe.distill.checkpoint import load_checkpoint
from okdpipe.distill.evaluate import Accuracy
from okdpipe.distill.select import NonFiniteLogits, non_finite_weights, top_accuracy
from okdpipe.distill.trainer import fit
from okdpipe.errors import GateFailed, OkdpipeError
from okdpipe.export.config import ExportConfig
from okdpipe.export.exporter import check_finite_weights
from okdpipe.run import RunDir
from okdpipe.scoring import TopK, score
from okdpipe.serve.config import ServeConfig
from okdpipe.stage_config import StageConfig, resolve

NON_FINITE = [float("nan"), float("inf"), -float("inf")]
FLOAT32_MAX = float(np.finfo(np.float32).max)


def linear_with_weight(value: float) -> nn.Linear:
    """A 3 -> 2 layer whose weight [0, 0] is `value` (every other number finite)."""
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight[0, 0] = value
    return layer


# ---------------------------------------------------------------- plants 1 and 2: an inf weight is not "finite"


@pytest.mark.parametrize("bad", NON_FINITE)
def test_select_flags_a_nan_or_inf_weight(bad):
    assert non_finite_weights(linear_with_weight(bad)) is True
    assert non_finite_weights(linear_with_weight(0.5)) is False


@pytest.mark.parametrize("bad", NON_FINITE)
def test_export_refuses_a_nan_or_inf_weight(bad):
    with pytest.raises(GateFailed, match="weight weight holds NaN or inf"):
        check_finite_weights(linear_with_weight(bad), "MODEL.pt")
    check_finite_weights(linear_with_weight(0.5), "MODEL.pt")  # a finite model passes


class FixedLogits(nn.Module):
    """Answers the same logits whatever the input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits


def one_batch_loader(labels: list[int]):
    batch = SimpleNamespace(views=[torch.zeros(len(labels), 1)], labels=torch.tensor(labels))
    return SimpleNamespace(epoch=lambda _: [batch])


@pytest.mark.parametrize("bad", NON_FINITE)
def test_select_refuses_logits_with_one_non_finite_row(bad):
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0]])
    logits[2, 1] = bad  # one number in one row of four
    with pytest.raises(NonFiniteLogits):
        top_accuracy(FixedLogits(logits), one_batch_loader([0, 1, 0, 1]))


# ---------------------------------------------------------------- plant 3: scoring refuses an inf logit row


class OneBatchSplit:
    """Two 1x1 images, labels 0 and 1, in one batch."""

    def __len__(self):
        return 2

    def iter_batches(self, size):
        yield np.zeros((2, 1, 1, 1), np.uint8), np.array([0, 1])


class AsFloat:
    def normalise(self, pixels):
        return pixels.astype(np.float32)


@pytest.mark.parametrize("bad", NON_FINITE)
def test_score_refuses_one_non_finite_logit_row(bad):
    logits = np.array([[1.0, 0.0], [0.0, bad]], np.float32)
    with pytest.raises(GateFailed, match="non-finite logits \\(NaN or inf\\) for 1 of 2 images"):
        score(lambda inputs: logits, OneBatchSplit(), AsFloat(), what="model.onnx", batch_size=2)


# ---------------------------------------------------------------- plant 4: top-5 is five classes, not four or six

# 8 classes ranked 0 (highest logit) to 7; the labels sit at rank 1, 5 and 6: top-1 hits 1, top-5 hits 2
RANKED_LOGITS = np.tile(np.arange(8, 0, -1, dtype=np.float32), (3, 1))
RANK_1_5_6_LABELS = np.array([0, 4, 5])


def test_scoring_top5_counts_the_fifth_class_and_not_the_sixth():
    topk = TopK()
    topk.add(RANKED_LOGITS, RANK_1_5_6_LABELS)
    assert (topk.top1_hits, topk.top5_hits, topk.samples) == (1, 2, 3)


def test_evaluate_top5_counts_the_fifth_class_and_not_the_sixth():
    meter = Accuracy()
    meter.update(torch.from_numpy(RANKED_LOGITS), torch.from_numpy(RANK_1_5_6_LABELS))
    result = meter.result()
    assert (result["top1"], result["top5"]) == (1 / 3, 2 / 3)


# ---------------------------------------------------------------- plant 5: stage configs refuse inf and NaN


class UnboundedFloat(StageConfig):
    """A stage option with no bounds at all: only the base config's rule stands between it and inf."""

    value: float = 0.0


STAGE_FLOATS = [
    (ExportConfig, "max_accuracy_drop"),
    (BenchConfig, "min_seconds"),
    (ServeConfig, "max_delay_ms"),
    (ServeConfig, "max_body_mb"),
    (ServeConfig, "header_timeout_s"),
    (UnboundedFloat, "value"),
]


@pytest.mark.parametrize("cls, field", STAGE_FLOATS)
@pytest.mark.parametrize("bad", NON_FINITE)
def test_stage_configs_refuse_inf_and_nan(cls, field, bad):
    with pytest.raises(ValidationError):
        cls(**{field: bad})
    assert getattr(cls(**{field: 1.0}), field) == 1.0


def test_an_unbounded_stage_float_names_the_finite_rule():
    with pytest.raises(ValidationError, match="finite number"):
        UnboundedFloat(value=float("inf"))


def test_an_inf_flag_is_a_one_line_error_naming_the_flag():
    with pytest.raises(OkdpipeError, match="^--max-accuracy-drop inf: ") as err:
        resolve(ExportConfig, None, {"max_accuracy_drop": float("inf")})
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- plant 6: input contract bounds, at the boundary


@pytest.mark.parametrize(
    "shape, allowed",
    [
        ((1, 8192, 8192), True),  # 2**26 values: exactly the limit
        ((4, 4096, 4096), True),  # 2**26 again
        ((4, 4096, 4097), False),  # 4 * 4096 * 4097 = 2**26 + 16384
        ((2, 8192, 8192), False),  # 2**27
        ((64, 8192, 8192), False),  # every side within its bound, 2**32 values in all
    ],
)
def test_input_shape_refuses_more_than_2_to_the_26_values(shape, allowed):
    assert (input_shape_problem(*shape) is None) is allowed


@pytest.mark.parametrize("largest_over_max, allowed", [(0.5, True), (0.99, True), (1.01, False), (1.5, False)])
def test_normalisation_refuses_a_pixel_that_overflows_float32(largest_over_max, allowed):
    """scale 1, mean 0: pixel 255 becomes 255 / std; std chosen so that is `largest_over_max` of float32's max
    (std stays a normal float32, about 2e-37 to 5e-37)."""
    std = 255.0 / (largest_over_max * FLOAT32_MAX)
    assert (normalisation_problem(1.0, [0.0], [std], 1) is None) is allowed


# ---------------------------------------------------------------- plant 7: the report set is written all or none


def tiny_report() -> BenchReport:
    point = LatencyPoint(batch_size=1, runs=20, p50_ms=1.0, p90_ms=1.2, p99_ms=1.5, mean_ms=1.1, min_ms=0.9,
                         images_per_s=900.0)  # fmt: skip
    artifact = Entry("net", "onnx", "fp32", "/out/fp32", "synthetic", accuracy=ReportAccuracy("test", 0.9, 1.0, 100))
    artifact.latency = {1: point}
    machine = {"cpu_model": "test cpu", "logical_cpus": 1, "cpu_features": {}, "provider": "cpu", "threads": 1,
               "peak_gflops": {"gflops": 1.0, "method": "none"}}  # fmt: skip
    return BenchReport("2024-01-01T00:00:00Z", {}, machine, {"onnxruntime": "1", "torch": "2"}, [artifact])


def no_space_left(data) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def disk_full_after_one_file(monkeypatch):
    """Every file opened for writing after the first fails on its first write, as on a disk that just filled."""
    real_fdopen, opened = os.fdopen, []

    def fdopen(fd, mode="r", *args, **kwargs):
        handle = real_fdopen(fd, mode, *args, **kwargs)
        if "w" not in mode:
            return handle
        opened.append(fd)
        if len(opened) > 1:
            handle.write = no_space_left
        return handle

    monkeypatch.setattr(files.os, "fdopen", fdopen)
    return opened


def test_write_reports_on_a_disk_that_fills_midway_keeps_every_old_file(tmp_path, disk_full_after_one_file):
    names = ("report.json", "report.md", "report.png", "junit.xml")
    old = {tmp_path / name: f"old {name}".encode() for name in names}
    for path, data in old.items():
        path.write_bytes(data)
    with pytest.raises(OkdpipeError, match="cannot write \\(No space left on device\\)"):
        write_reports(tiny_report(), tmp_path / "report.json", junit=tmp_path / "junit.xml")
    assert len(disk_full_after_one_file) >= 2  # the disk did fill after a file was written
    assert {path: path.read_bytes() for path in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no temp file left behind


# ---------------------------------------------------------------- plant 8: a NaN metric fails every operator


@pytest.mark.parametrize("op", [">=", "<=", ">", "<", "=="])
def test_a_nan_metric_fails_the_gate_whatever_the_operator(op):
    report = tiny_report()
    report.artifacts[0].accuracy.top1 = float("nan")
    [result] = evaluate_gates(report, [f"top1{op}0.5"])
    assert result.passed is False and "not a finite number" in result.detail
    assert OPERATORS[op](float("nan"), 0.5) is False  # the comparison itself, were the finiteness check gone


# ---------------------------------------------------------------- plant 9: a corrupt checkpoint is refused


def flip_a_data_byte(path) -> None:
    """Invert one byte in the middle of the largest stored tensor (the zip stays readable, its bytes change)."""
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    raw = bytearray(path.read_bytes())
    name_length = int.from_bytes(raw[member.header_offset + 26 : member.header_offset + 28], "little")
    extra_length = int.from_bytes(raw[member.header_offset + 28 : member.header_offset + 30], "little")
    middle = member.header_offset + 30 + name_length + extra_length + member.file_size // 2
    raw[middle] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_checkpoint_with_one_flipped_byte_is_refused(tmp_path):
    config = DistillConfig(method="vanilla", arch="resnet8", students=1, dataset="synthetic", epochs=1,
                           batch_size=8, eval_batch_size=64, val_split=0.25)  # fmt: skip
    run = RunDir(tmp_path / "r")
    fit(config, run, echo=lambda _: None)
    load_checkpoint(run)  # the intact file loads
    flip_a_data_byte(run.checkpoints / "last.pt")
    with pytest.raises(OkdpipeError, match="last.pt: sha256 differs from the manifest"):
        load_checkpoint(run)


def test_flipping_a_data_byte_changes_the_file_but_keeps_it_loadable(tmp_path):
    """The damage the test above makes is one torch.load would not notice: only the sha256 check catches it."""
    path = tmp_path / "t.pt"
    torch.save({"w": torch.arange(64, dtype=torch.float32)}, path)
    flip_a_data_byte(path)
    loaded = torch.load(path, weights_only=True)["w"]
    changed = (loaded != torch.arange(64, dtype=torch.float32)).sum()
    assert int(changed) == 1
