"""The serving card reader and model loader: every bad artifact is a one-line OkdpipeError naming the fix."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from okdpipe.contracts.card import read_card
from okdpipe.errors import OkdpipeError
from okdpipe.serve.app import ServeSettings, load_classifier


@pytest.fixture()
def artifact_copy(artifact_dir, tmp_path):
    target = tmp_path / "artifact"
    shutil.copytree(artifact_dir, target)
    return target


def _edit_card(directory, **changes):
    card = json.loads((directory / "model.json").read_text())
    card.update(changes)
    (directory / "model.json").write_text(json.dumps(card))


def test_card_reads_what_serving_needs(artifact_dir):
    card = read_card(artifact_dir)
    assert (card.name, card.input_name, card.output_name) == ("tiny-cnn", "input", "logits")
    assert (card.channels, card.height, card.width, card.num_classes) == (1, 28, 28, 10)
    assert card.labels == tuple(json.loads((artifact_dir / "model.json").read_text())["labels"])
    assert card.labels[0] == "T-shirt/top" and len(card.labels) == 10
    assert card.preprocess.mean == (0.286,) and card.preprocess.std == (0.353,)
    assert card.preprocess.scale == pytest.approx(1 / 255)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "model.json").unlink(), "no model.json"),
        (lambda d: (d / "model.json").write_text("{not json"), "not valid JSON"),
        (lambda d: _edit_card(d, format="other"), "no 'format: okdpipe-card' header"),
        (lambda d: _edit_card(d, format_version=2), "format_version 2 is not supported"),
        (lambda d: _edit_card(d, file="missing.onnx"), "'missing.onnx' named by the card is not in"),
        (lambda d: _edit_card(d, file="../model.onnx"), "is not in"),
        (lambda d: _edit_card(d, sha256={}), "no sha256 for 'model.onnx'"),
        (lambda d: _edit_card(d, sha256={"model.onnx": 12345}), "no sha256 for 'model.onnx'"),
        (lambda d: _edit_card(d, sha256={"model.onnx": "0" * 64, "extra.bin": 7}), "model.onnx sha256 is"),
        (
            lambda d: _edit_card(d, input={"name": "input", "shape": [None, 1, 28], "dtype": "float32"}),
            "is not [null, C, H, W] NCHW",
        ),
        (lambda d: _edit_card(d, labels=["a", "b"]), "labels must be 10 strings"),
        (
            lambda d: _edit_card(d, preprocess={"size": [32, 32], "channels": 1, "mean": [0], "std": [1]}),
            "disagree with input",
        ),
        (lambda d: _edit_card(d, preprocess={"size": [28, 28], "channels": 1, "mean": [0], "std": [0]}), "std > 0"),
        (
            lambda d: _edit_card(d, preprocess={"size": [28, 28], "channels": 1, "mean": "abc", "std": [1]}),
            "preprocess mean is 'abc', not a list of finite numbers",
        ),
        (
            lambda d: _edit_card(d, preprocess={"size": [28, 28], "channels": 1, "mean": [0, 0], "std": [1]}),
            "preprocess mean lists 2 values, the input has 1 channels",
        ),
        (lambda d: _edit_card(d, format_version=1.0), "format_version 1.0 is not supported"),
        (lambda d: _edit_card(d, format_version=True), "format_version True is not supported"),
        (lambda d: _edit_card(d, precision="int4"), "precision 'int4' is not one of fp32, fp16, int8, int8-dynamic"),
        (lambda d: _edit_card(d, accuracy=float("nan")), "non-finite number (NaN)"),
        (lambda d: _edit_card(d, parity={"max_abs_diff": float("inf")}), "non-finite number (Infinity)"),
        (lambda d: _edit_card(d, accuracy=0.9), "'accuracy' must be a JSON object"),
        (lambda d: _edit_card(d, accuracy={"val_top1": "0.9"}), "'accuracy.val_top1' is '0.9', not a number in [0, 1]"),
        (lambda d: _edit_card(d, accuracy={"val_top1": 1.5}), "'accuracy.val_top1' is 1.5"),
        (lambda d: _edit_card(d, accuracy={"val_samples": 0}), "'accuracy.val_samples' is 0, not a positive integer"),
        (lambda d: _edit_card(d, parity={"max_abs_diff": -1}), "'parity.max_abs_diff' is -1"),
        (lambda d: _edit_card(d, parity={"top1_agreement": True}), "'parity.top1_agreement' is True"),
        (lambda d: _edit_card(d, quantization=[]), "quantization must be a JSON object or null"),
        (
            lambda d: _edit_card(d, input={"name": "input", "shape": [None, 1, 10**9, 28], "dtype": "float32"}),
            "input height 1000000000 must be an integer from 1 to 8192",
        ),
        (
            lambda d: _edit_card(d, input={"name": "input", "shape": [None, 64, 8192, 8192], "dtype": "float32"}),
            "holds more than 67,108,864 values per image",
        ),
        (lambda d: _edit_card(d, output={"name": "logits", "shape": [None, 10**7]}), "from 2 to 100,000"),
        (
            lambda d: _edit_card(d, preprocess={"size": [28, 28], "channels": 1, "mean": [0], "std": [1e-300]}),
            "std > 0 for every channel, and within float32 range",
        ),
        (
            lambda d: _edit_card(
                d, preprocess={"size": [28, 28], "channels": 1, "mean": [0], "std": [1], "scale": 1e300}
            ),
            "pixel scale 1e+300 must be a positive number float32 can hold",
        ),
        (
            lambda d: _edit_card(
                d, preprocess={"size": [28, 28], "channels": 1, "mean": [0], "std": [1e-37], "scale": 1}
            ),
            "overflow float32",
        ),
        (lambda d: _edit_card(d, labels=["a"] * 9 + [""]), "label '' must be printable text"),
        (lambda d: _edit_card(d, labels=["a", "a", *"cdefghij"]), "labels 'a' and 'a' name one class"),
        (
            lambda d: _edit_card(
                d, preprocess={"size": [28, 28], "channels": 1, "mean": [0], "std": [1e38], "scale": 1e38}
            ),
            "overflow float32",  # x = (255 * 1e38 - 0) / 1e38 is 255, but 255 * 1e38 is inf in float32
        ),
        (lambda d: _edit_card(d, labels=[*"abcdefghi", "x\ny"]), "must be printable text"),
    ],
)
def test_bad_card_is_one_line_okdpipe_error(artifact_copy, damage, message):
    damage(artifact_copy)
    with pytest.raises(OkdpipeError) as raised:
        read_card(artifact_copy)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_missing_directory_is_okdpipe_error(tmp_path):
    with pytest.raises(OkdpipeError, match="no such artifact directory; pass the folder `okdpipe export` wrote"):
        read_card(tmp_path / "nowhere")


def test_sha256_mismatch_is_detected(artifact_copy):
    with open(artifact_copy / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(OkdpipeError, match=r"model.onnx sha256 is .* the card says .* \(file changed\)"):
        read_card(artifact_copy)


def test_unloadable_onnx_is_okdpipe_error(artifact_copy, card_writer):
    (artifact_copy / "model.onnx").write_bytes(b"this is not a protobuf")
    card_writer(artifact_copy)
    with pytest.raises(OkdpipeError, match="onnxruntime cannot load model.onnx: .*; re-export the model"):
        load_classifier(ServeSettings(artifact_dir=artifact_copy))


def test_graph_of_another_precision_under_the_card_is_refused(artifact_copy, card_writer):
    """An FP16 graph behind an fp32 card (hash updated, so only the graph can tell) would be served and benchmarked
    as fp32: serve and bench refuse it by reading the graph's initializers (and operators, for INT8)."""
    from okdpipe.bench.config import BenchConfig
    from okdpipe.bench.run import run_bench
    from okdpipe.export.quantize import convert_fp16

    convert_fp16(artifact_copy / "model.onnx", artifact_copy / "fp16.onnx")
    (artifact_copy / "fp16.onnx").replace(artifact_copy / "model.onnx")
    card_writer(artifact_copy)
    assert read_card(artifact_copy).precision == "fp32"  # the card alone is consistent
    expected = "model.onnx computes in fp16 but its card says fp32"
    with pytest.raises(OkdpipeError, match=expected):
        load_classifier(ServeSettings(artifact_dir=artifact_copy))
    with pytest.raises(OkdpipeError, match=expected):
        run_bench([artifact_copy], BenchConfig())


def test_card_and_graph_must_agree_on_input_name(artifact_copy):
    _edit_card(artifact_copy, input={"name": "pixels", "shape": [None, 1, 28, 28], "dtype": "float32"})
    with pytest.raises(OkdpipeError, match=r"model inputs \['input'\] do not match the card's single input 'pixels'"):
        load_classifier(ServeSettings(artifact_dir=artifact_copy))


def test_classifier_matches_direct_onnxruntime_and_warms_up(artifact_dir, reference_logits, images):
    classifier = load_classifier(ServeSettings(artifact_dir=artifact_dir))
    classifier.warm_up((1, 16))
    np.testing.assert_array_equal(classifier.run(images), reference_logits(images))


def test_cli_reports_bad_artifact_in_one_line_and_exits_with_the_input_error_code(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "okdpipe.serve", str(tmp_path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == OkdpipeError.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: no model.json in {tmp_path}; pass the folder `okdpipe export` wrote"
    ]


def test_served_session_is_built_by_the_shared_factory_as_described(artifact_dir):
    from okdpipe.ortsession import session_options

    classifier = load_classifier(ServeSettings(artifact_dir=artifact_dir, intra_op_threads=2))
    assert (
        classifier.session_options
        == session_options(2)
        == {
            "providers": ["CPUExecutionProvider"],
            "intra_op_num_threads": 2,
            "inter_op_num_threads": 1,
            "execution_mode": "sequential",
            "graph_optimization_level": "all",
            "config_entries": {"session.intra_op.allow_spinning": "0"},
        }
    )
    applied = classifier.session.get_session_options()
    assert (applied.intra_op_num_threads, applied.inter_op_num_threads) == (2, 1)
    assert applied.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert classifier.session.get_providers() == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("threads", "provider", "message"),
    [
        (-1, "cpu", "threads must be a positive integer or unset, got -1"),
        (True, "cpu", "got True"),
        (None, "tpu", "unknown provider 'tpu'; choose one of: cpu, cuda"),
    ],
)
def test_session_options_refuse_bad_settings(threads, provider, message):
    from okdpipe.ortsession import session_options

    with pytest.raises(OkdpipeError, match=re.escape(message)):
        session_options(threads, provider)


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_a_model_no_image_converts_to_takes_tensors_and_classify_says_so(tmp_path, caplog, card_writer):
    """A 2-channel model (a plug-in dataset of, say, two spectral bands) serves /infer; /classify cannot turn a
    PNG into 2 channels and answered 'body is not a decodable image (ValueError)' before."""
    import torch
    from starlette.testclient import TestClient

    from okdpipe.serve.app import create_app

    name = "tiny-cnn"  # the card's name (card_writer's default)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10)).eval()
    model(torch.zeros(1, 2, 8, 8))
    torch.onnx.export(
        model,
        (torch.zeros(2, 2, 8, 8),),
        str(tmp_path / "model.onnx"),
        dynamo=True,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
        verbose=False,
    )
    preprocess = {"size": [8, 8], "channels": 2, "scale": 1 / 255, "mean": [0.5, 0.5], "std": [0.25, 0.25]}
    card_writer(
        tmp_path,
        input={"name": "input", "shape": [None, 2, 8, 8], "dtype": "float32", "layout": "NCHW"},
        preprocess=preprocess,
    )
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    with caplog.at_level("WARNING", "okdpipe.serve"), TestClient(create_app(ServeSettings(tmp_path))) as client:
        refused = client.post(f"/v2/models/{name}/classify", content=png.getvalue())
        tensor = {"inputs": [{"name": "input", "shape": [1, 2, 8, 8], "datatype": "FP32", "data": [0.5] * 128}]}
        answered = client.post(f"/v2/models/{name}/infer", json=tensor)
    assert refused.status_code == 400
    assert refused.json()["error"] == (
        f"model '{name}' takes 2-channel input, which no image file converts to (only 1 or 3 channels); "
        f"send the tensor to /v2/models/{name}/infer"
    )
    assert answered.status_code == 200 and len(answered.json()["outputs"][0]["data"]) == 10
    assert "takes 2-channel input: /classify answers 400" in caplog.text
