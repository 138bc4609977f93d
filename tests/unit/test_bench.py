"""okdpipe.bench on a real tiny finished run (2 x resnet8, synthetic) selected and exported to ONNX."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from datafixtures import write_fashion

from okdpipe.bench import measure
from okdpipe.bench.config import BenchConfig
from okdpipe.bench.gate import evaluate_gates
from okdpipe.bench.report import write_reports
from okdpipe.bench.run import run_bench
from okdpipe.config import DistillConfig
from okdpipe.contracts.card import read_card
from okdpipe.contracts.report import BenchReport
from okdpipe.datasets import load_dataset
from okdpipe.distill.finished import load_run
from okdpipe.distill.models import count_macs, load_model_file
from okdpipe.distill.trainer import fit
from okdpipe.errors import OkdpipeError
from okdpipe.export.config import ExportConfig
from okdpipe.export.exporter import export_model
from okdpipe.run import RunDir
from okdpipe.stage_config import resolve

QUICK = dict(batch_sizes=[1, 4], threads=1, warmup=1, min_seconds=0.02)
RESNET8_PARAMS = 77_652  # 3-channel input, 4 classes (synthetic)
RESNET8_MACS = 3_125_504  # per 3x16x16 image


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """fit (1 epoch) -> select -> export fp32, then one bench of it shared by the read-only tests."""
    from okdpipe.distill.select import select

    root = tmp_path_factory.mktemp("bench")
    cfg = DistillConfig(
        method="vanilla",
        arch="resnet8",
        dataset="synthetic",
        epochs=1,
        batch_size=8,
        val_split=0.25,
        students=2,
        device="cpu",
    )
    fit(cfg, RunDir(root / "run"), echo=lambda *_: None)
    _, _, _, model_path = select(root / "run", "auto", None, 4, device="cpu")
    [card] = export_model(model_path, root / "out", ExportConfig())
    artifact = card.directory
    report = run_bench([artifact], BenchConfig(**QUICK))
    return {"root": root, "artifact": artifact, "model_path": model_path, "report": report}


def test_report_schema(tiny):
    report = tiny["report"].to_dict()
    assert list(report) == [
        "format",
        "format_version",
        "created",
        "options",
        "machine",
        "runtime",
        "artifacts",
        "references",
        "notes",
        "gates",
    ]
    assert (report["format"], report["format_version"]) == ("okdpipe-bench-report", 2)
    assert report["notes"] == [] and report["gates"] == []
    assert [e["kind"] for e in report["artifacts"] + report["references"]] == ["onnx", "pytorch", "ensemble"]
    for entry in report["artifacts"] + report["references"]:
        assert list(entry) == [
            "name",
            "kind",
            "precision",
            "path",
            "dataset",
            "of",
            "provenance",
            "device",
            "session",
            "params",
            "macs",
            "start_ms",
            "memory",
            "accuracy",
            "latency",
            "sensitivity",
        ]
        assert entry["sensitivity"] == []  # an fp32 artifact (and the references) have no INT8 ranking
        assert list(entry["latency"]) == ["1", "4"]
    assert set(report["machine"]["cpu_features"]) >= {"avx2", "avx512_vnni", "avx_vnni", "amx_int8"}
    assert report["machine"]["threads"] == 1 and report["machine"]["peak_gflops"]["gflops"] > 0
    assert {"onnxruntime", "torch", "numpy", "python"} <= set(report["runtime"])
    assert json.loads(json.dumps(report)) == report  # JSON-serialisable, reads back unchanged
    assert BenchReport.from_dict(json.loads(json.dumps(report)), "report.json") == tiny["report"]


def test_latency_points_are_consistent(tiny):
    peak = tiny["report"].machine["peak_gflops"]["gflops"]
    for entry in tiny["report"].entries():
        for batch, point in entry.latency.items():
            assert point.batch_size == int(batch) and point.runs >= measure.MIN_RUNS
            assert 0 < point.min_ms <= point.p50_ms <= point.p90_ms <= point.p99_ms
            assert point.images_per_s == pytest.approx(int(batch) * 1000 / point.mean_ms)
            assert point.gflops_per_s == pytest.approx(2 * entry.macs * point.images_per_s / 1e9)
            assert point.peak_fraction == pytest.approx(point.gflops_per_s / peak)


def test_accuracy_equals_an_independent_onnxruntime_evaluation(tiny):
    card = read_card(tiny["artifact"])
    session = ort.InferenceSession(str(tiny["artifact"] / "model.onnx"), providers=["CPUExecutionProvider"])
    test = load_dataset("synthetic").test
    mean = np.array(card.preprocess.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array(card.preprocess.std, dtype=np.float32).reshape(1, 3, 1, 1)
    inputs = (test.images.numpy().astype(np.float32) / 255.0 - mean) / std
    predicted = session.run(None, {"input": inputs})[0].argmax(1)
    accuracy = tiny["report"].artifacts[0].accuracy
    assert accuracy.split == "test" and accuracy.samples == len(test) == 32
    assert accuracy.top1 == float(np.mean(predicted == test.labels.numpy()))
    assert accuracy.top5 == 1.0  # 4 classes: the true class is always among the top 5


def test_pytorch_reference_matches_the_model_file(tiny):
    artifact, pytorch = tiny["report"].artifacts[0], tiny["report"].references[0]
    model, _ = load_model_file(tiny["model_path"])
    assert pytorch.of == [artifact.name] and pytorch.provenance["model_file"] == str(tiny["model_path"].resolve())
    assert artifact.params == pytorch.params == RESNET8_PARAMS
    assert artifact.macs == pytorch.macs == count_macs(model, torch.zeros(1, 3, 16, 16)) == RESNET8_MACS
    assert pytorch.accuracy.top1 == artifact.accuracy.top1  # parity-checked export: same argmax


def test_ensemble_reference_averages_all_students(tiny):
    ensemble = tiny["report"].references[1]
    run = load_run(tiny["root"] / "run", device="cpu")
    test, spec = run.bundle.test, run.bundle.spec
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    inputs = (test.images.float() / 255 - mean) / std
    with torch.no_grad():
        logits = torch.stack([run.students.extract(i).eval()(inputs) for i in range(2)]).mean(0)
    assert ensemble.accuracy.top1 == float((logits.argmax(1) == test.labels).float().mean())
    assert ensemble.params == 2 * RESNET8_PARAMS and ensemble.macs == 2 * RESNET8_MACS
    assert ensemble.provenance["students"] == 2 and ensemble.provenance["method"] == "vanilla"


def test_missing_sources_are_skipped_with_notes_and_max_samples_caps(tiny, tmp_path):
    moved = tmp_path / "fp32"
    shutil.copytree(tiny["artifact"], moved)
    card = json.loads((moved / "model.json").read_text())
    card["provenance"].update(run_dir=str(tmp_path / "gone"), model_file=str(tmp_path / "gone.pt"))
    (moved / "model.json").write_text(json.dumps(card))  # the sha256 covers model.onnx only
    report = run_bench([moved], BenchConfig(**{**QUICK, "batch_sizes": [2]}, max_samples=10))
    assert report.references == []
    assert any("gone.pt" in note and "PyTorch row and MACs skipped" in note for note in report.notes)
    assert any("gone not found; ensemble row skipped" in note for note in report.notes)
    [artifact] = report.artifacts
    assert artifact.accuracy.samples == 10 and artifact.macs is None
    assert artifact.latency[2].gflops_per_s is None


@pytest.mark.parametrize(
    ("field", "fragment"),
    [("input", "do not match the card's single input 'pixels'"), ("output", "lack the card's output 'pixels'")],
)
def test_a_card_naming_tensors_the_graph_lacks_is_one_line(tiny, tmp_path, field, fragment):
    """bench feeds and reads tensors by the card's names: a card edited (or copied from another model) to name
    others crashed inside onnxruntime; serve refused the same card. Now both refuse it alike."""
    moved = tmp_path / "fp32"
    shutil.copytree(tiny["artifact"], moved)
    card = json.loads((moved / "model.json").read_text())
    card[field]["name"] = "pixels"
    (moved / "model.json").write_text(json.dumps(card))  # the sha256 covers model.onnx only
    with pytest.raises(OkdpipeError, match=re.escape(f"{moved}: model {field}s")) as error:
        run_bench([moved], BenchConfig(**QUICK, compare_pytorch=False, compare_ensemble=False))
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_wrong_dataset_for_the_model_is_a_clear_error(tiny, tmp_path):
    write_fashion(tmp_path / "fm", n_train=20, n_test=10)
    options = BenchConfig(**QUICK, dataset="fashion-mnist", data_dir=str(tmp_path / "fm"), compare_ensemble=False)
    with pytest.raises(OkdpipeError, match=r"gives \(1, 28, 28\) images but the model takes \(3, 16, 16\)"):
        run_bench([tiny["artifact"]], options)


def test_cuda_provider_without_cuda_is_a_clear_error(tiny):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(OkdpipeError, match="has no CUDAExecutionProvider.*use --provider cpu"):
        run_bench([tiny["artifact"]], BenchConfig(provider="cuda"))


def test_reports_are_written(tiny, tmp_path):
    results = evaluate_gates(tiny["report"], ["top1>=0", "p99_ms@1<=0"])
    paths = write_reports(
        replace(tiny["report"], gates=results), tmp_path / "r" / "report.json", junit=tmp_path / "junit.xml"
    )
    assert sorted(paths) == ["json", "junit", "md", "png"]
    written = json.loads(paths["json"].read_text())
    assert [g["passed"] for g in written["gates"]] == [True, False]
    assert written["artifacts"] == tiny["report"].to_dict()["artifacts"]
    text = paths["md"].read_text()
    assert "### What the student saves" in text and "**1 of 2 gates failed**" in text
    assert "2.00x fewer MACs" in text
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 10_000


def test_time_calls_counts_warmup_and_minimum_runs():
    calls = []
    times = measure.time_calls(lambda: calls.append(1), warmup=3, min_seconds=0.0, min_runs=7)
    assert len(times) == 7 and len(calls) == 10 and all(t >= 0 for t in times)


def test_latency_point_percentiles():
    point = measure.latency_point([float(v) for v in range(1, 101)], batch_size=10, macs=1_000_000, peak_gflops=2.0)
    assert [point.p50_ms, point.p90_ms, point.p99_ms] == pytest.approx([50.5, 90.1, 99.01], abs=1e-9)
    assert point.mean_ms == 50.5 and point.images_per_s == pytest.approx(10 * 1000 / 50.5)
    assert point.gflops_per_s == pytest.approx(2e6 * point.images_per_s / 1e9)


def test_peak_memory_sees_an_allocation(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t  123456 kB\nVmRSS:\t  100000 kB\n")
    assert measure.status_kib("VmHWM", str(status)) == 123456
    assert measure.status_kib("VmSwap", str(status)) is None
    with measure.PeakMemory() as memory:
        block = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB, every page touched
        del block
    assert memory.result.method in ("VmHWM growth after clear_refs reset", "VmRSS growth")
    if memory.result.method.startswith("VmHWM"):  # freed before exit: only the peak can still see it
        assert memory.result.peak_rss_delta_mb >= 60


def test_parse_batch_sizes():
    assert BenchConfig(batch_sizes="1, 8,64").batch_sizes == [1, 8, 64]
    for repeated in ("1, 8,64,8", [2, 2]):
        with pytest.raises(ValueError, match="is listed twice"):
            BenchConfig(batch_sizes=repeated)
    for bad in ("", "1,x", "0", "-1"):
        with pytest.raises(ValueError, match="positive integers"):
            BenchConfig(batch_sizes=bad)


def test_bad_options_are_rejected(tiny):
    with pytest.raises(OkdpipeError, match="unknown provider 'tpu'"):  # refused when the config is built
        resolve(BenchConfig, None, {"provider": "tpu"})
    with pytest.raises(OkdpipeError, match="no artifact directories"):
        run_bench([], BenchConfig())


def test_an_artifact_answering_nan_fails_as_a_check_not_an_accuracy(tiny, tmp_path):
    import onnx
    from onnx import numpy_helper

    from okdpipe.contracts.card import write_card
    from okdpipe.errors import GateFailed

    moved = tmp_path / "fp32"
    shutil.copytree(tiny["artifact"], moved)
    graph = onnx.load(str(moved / "model.onnx"))
    weight = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    poisoned = numpy_helper.to_array(weight).copy()
    poisoned[...] = np.nan
    weight.CopyFrom(numpy_helper.from_array(poisoned, weight.name))
    onnx.save(graph, str(moved / "model.onnx"))
    fields = read_card(tiny["artifact"]).raw
    write_card(moved, {k: v for k, v in fields.items() if k not in ("format", "format_version", "sha256")})
    config = BenchConfig(**QUICK, max_samples=8, compare_pytorch=False, compare_ensemble=False)
    with pytest.raises(GateFailed, match="non-finite logits") as error:
        run_bench([moved], config)
    assert error.value.exit_code == 1 and "\n" not in str(error.value)
