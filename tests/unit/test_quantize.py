"""okdpipe.export.quantize: CPU feature detection, ORT settings, streamed calibration, int8/fp16 graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from okdpipe.cpu import cpu_features, native_fp16
from okdpipe.errors import OkdpipeError
from okdpipe.export import onnx_export, quantize
from okdpipe.export.config import ExportConfig
from okdpipe.ortsession import create_session

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma\n"
VNNI = "flags\t\t: fpu avx2 avx512f avx512_vnni\n"


class WideNet(nn.Module):
    """Enough weights (~150k) that int8's 4x weight shrink dominates the file size."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, 3, padding=1),
            nn.BatchNorm2d(96),
            nn.ReLU(),
            nn.Conv2d(96, 160, 3, padding=1),
            nn.BatchNorm2d(160),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(160, 10)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory):
    torch.manual_seed(0)
    model = WideNet().eval()
    path = tmp_path_factory.mktemp("quant") / "fp32.onnx"
    onnx_export.export_onnx(model, (3, 8, 8), path, ExportConfig().opset)
    return path, model


def cpu_session(path):
    return create_session(path)[0]


def calibration_batches(count: int, batch: int = 4):
    rng = np.random.default_rng(0)
    return [rng.standard_normal((batch, 3, 8, 8)).astype(np.float32) for _ in range(count)]


def op_types(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_cpu_features_parses_flags(tmp_path):
    (tmp_path / "cpuinfo").write_text(AVX2_ONLY)
    assert cpu_features(tmp_path / "cpuinfo") == {
        "avx2": True,
        "avx512f": False,
        "avx512_vnni": False,
        "avx_vnni": False,
        "amx_int8": False,
        "amx_tile": False,
        "avx512_fp16": False,
        "fp16": False,
        "asimdhp": False,
    }
    assert not any(cpu_features(tmp_path / "missing").values())
    (tmp_path / "arm").write_text("processor : 0\nFeatures : fp asimd evtstrm fphp asimdhp cpuid\n")
    assert cpu_features(tmp_path / "arm")["asimdhp"] and native_fp16(cpu_features(tmp_path / "arm"))
    assert not native_fp16(cpu_features(tmp_path / "cpuinfo"))


def test_reduce_range_only_on_x86_without_vnni(tmp_path):
    (tmp_path / "avx2").write_text(AVX2_ONLY)
    (tmp_path / "vnni").write_text(VNNI)
    avx2 = quantize.int8_settings(cpu_features(tmp_path / "avx2"), machine="x86_64")
    vnni = quantize.int8_settings(cpu_features(tmp_path / "vnni"), machine="x86_64")
    arm = quantize.int8_settings(cpu_features(tmp_path / "avx2"), machine="aarch64")
    assert (avx2["reduce_range"], vnni["reduce_range"], arm["reduce_range"]) == (True, False, False)
    assert avx2["activation_type"] == "QUInt8" and avx2["weight_type"] == "QInt8" and avx2["per_channel"]
    assert avx2["cpu_features"]["avx2"] and not avx2["cpu_features"]["avx512_vnni"]


def test_batch_reader_streams_in_strides():
    reader = quantize.BatchReader(iter(calibration_batches(3)), 3, "input")
    assert len(reader) == 3
    reader.set_range(0, 1)
    assert reader.get_next()["input"].shape == (4, 3, 8, 8) and reader.get_next() is None
    reader.set_range(1, 3)
    assert reader.get_next() is not None and reader.get_next() is not None and reader.get_next() is None
    assert reader.samples == 12
    with pytest.raises(ValueError, match="in order"):
        reader.set_range(0, 1)


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_static_int8_is_qdq_and_smaller(fp32_model, tmp_path, method):
    fp32_path, model = fp32_model
    settings = quantize.int8_settings({"avx2": True}, machine="x86_64")
    reader = quantize.BatchReader(iter(calibration_batches(5)), 5, "input")
    record = quantize.quantize_int8_static(fp32_path, tmp_path / "int8.onnx", reader, method, settings)
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types(tmp_path / "int8.onnx")
    assert record["calibration"] == {"method": method, "samples": 20, "split": "train"}
    assert record["reduce_range"] is True and record["format"] == "QDQ"
    size_ratio = (tmp_path / "int8.onnx").stat().st_size / fp32_path.stat().st_size
    assert size_ratio < 0.3
    inputs = calibration_batches(1, batch=16)[0]
    int8_logits = onnx_export.run_session(cpu_session(tmp_path / "int8.onnx"), inputs)
    fp32_logits = onnx_export.torch_logits(model, inputs)
    assert np.abs(int8_logits - fp32_logits).max() < 0.1 * np.abs(fp32_logits).max()


def test_unknown_calibration_method(fp32_model, tmp_path):
    reader = quantize.BatchReader(iter([]), 0, "input")
    with pytest.raises(OkdpipeError, match="unknown calibration method 'kl'"):
        quantize.quantize_int8_static(fp32_model[0], tmp_path / "q.onnx", reader, "kl", {})


def test_dynamic_int8_uses_integer_ops(fp32_model, tmp_path):
    settings = quantize.int8_settings({}, machine="x86_64")
    record = quantize.quantize_int8_dynamic(fp32_model[0], tmp_path / "dyn.onnx", settings)
    assert {"ConvInteger", "DynamicQuantizeLinear"} <= op_types(tmp_path / "dyn.onnx")
    assert record["method"] == "dynamic" and record["calibration"] is None


def test_fp16_keeps_fp32_io_and_stays_close(fp32_model, tmp_path):
    fp32_path, model = fp32_model
    quantize.convert_fp16(fp32_path, tmp_path / "fp16.onnx")
    graph = onnx.load(str(tmp_path / "fp16.onnx")).graph
    float32 = onnx.TensorProto.FLOAT
    assert [v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)] == [float32, float32]
    assert {t.data_type for t in graph.initializer if len(t.dims) == 4} == {onnx.TensorProto.FLOAT16}
    inputs = calibration_batches(1, batch=5)[0]
    fp16_logits = onnx_export.run_session(cpu_session(tmp_path / "fp16.onnx"), inputs)
    fp32_logits = onnx_export.torch_logits(model, inputs)
    assert np.abs(fp16_logits - fp32_logits).max() < onnx_export.FP16_TOLERANCE * max(1, np.abs(fp32_logits).max())
