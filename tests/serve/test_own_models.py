"""Your own model, end to end through the CLI as a user runs it: the example plug-in package (installed by `make
setup`, found through its entry point) and a timm and a torchvision student, each trained, selected, exported
with the parity gate, benchmarked and served; a file plug-in's model file refused by export until the plug-in
is named."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 900  # the whole chain on 2 busy CPU cores; each command is far quicker on CI's machine
QUICK_BENCH = ["--batch-sizes", "1", "--threads", "1", "--warmup", "0", "--min-seconds", "0.01", "--max-samples", "16"]


def okdpipe(*args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    python = ROOT / ".venv" / "bin" / "python"
    base = {k: v for k, v in os.environ.items() if k != "OKDPIPE_PLUGINS"}  # no plug-in inherited from the tests
    return subprocess.run(
        [str(python if python.exists() else sys.executable), "-m", "okdpipe", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**base, "PYTHONWARNINGS": "ignore", **(env or {})},
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    return result


def train_select_export(run: Path, *distill_args: str, bench: bool = True) -> dict:
    """distill (1 epoch) -> select -> export (-> bench); returns the fp32 model card."""
    ok(okdpipe("distill", *distill_args, "--epochs", "1", "--batch-size", "16", "--out", run))
    ok(okdpipe("select", run))
    ok(okdpipe("export", run / "model.pt", "--out", run / "export"))
    if not bench:
        return json.loads((run / "export" / "fp32" / "model.json").read_text())
    report = run / "report.json"
    ok(okdpipe("bench", run / "export" / "fp32", *QUICK_BENCH, "--report", report, "--gate", "top1>=0"))
    assert [g["passed"] for g in json.loads(report.read_text())["gates"]] == [True]
    return json.loads((run / "export" / "fp32" / "model.json").read_text())


def served_logits(start_server, artifact: Path, images: np.ndarray) -> np.ndarray:
    card = json.loads((artifact / "model.json").read_text())
    with start_server(artifact=artifact) as server:
        response = httpx.post(
            f"{server.url}/v2/models/{card['name']}/infer",
            json={
                "inputs": [
                    {"name": "input", "shape": list(images.shape), "datatype": "FP32", "data": images.ravel().tolist()}
                ],
                "outputs": [{"name": "logits"}],
            },  # fmt: skip
            timeout=30,
        )
    assert response.status_code == 200, response.text
    [output] = response.json()["outputs"]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def onnx_logits(artifact: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": images})[0]


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
def test_example_plugin_package_is_trained_selected_exported_and_served(tmp_path, start_server):
    run = tmp_path / "plugin"
    card = train_select_export(
        run,
        "--arch",
        "example_cnn",
        "--dataset",
        "fmnist-footwear",
        "--method",
        "ensemble-kd",
        "--train-subset",
        "5",
        bench=False,
    )
    model_file = __import__("torch").load(run / "model.pt", weights_only=True)
    assert model_file["arch_source"]["plugin"] == "okdpipe_example"
    assert model_file["arch_source"]["package"] == "okdpipe-example-plugin"
    assert card["labels"] == ["Sandal", "Sneaker", "Ankle boot"]
    # A real sneaker from Fashion-MNIST's test set, as a PNG, through /classify.
    from okdpipe.datasets.fashion_mnist import load_fashion_mnist

    test = load_fashion_mnist().test
    sneaker = test.images[int((test.labels == 7).nonzero()[0])][0].numpy()
    buffer = io.BytesIO()
    Image.fromarray(sneaker, "L").save(buffer, format="PNG")
    with start_server(artifact=run / "export" / "fp32") as server:
        response = httpx.post(
            f"{server.url}/v2/models/{card['name']}/classify?top_k=3", content=buffer.getvalue(), timeout=30
        )
    assert response.status_code == 200, response.text
    assert sorted(response.json()["labels"]) == ["Ankle boot", "Sandal", "Sneaker"]


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("arch", ["timm:mobilenetv3_small_050", "torchvision:mobilenet_v3_small"])
def test_library_student_is_trained_selected_exported_benchmarked_and_served(arch, tmp_path, start_server):
    run = tmp_path / "run"
    synthetic = ["--dataset", "synthetic", "--set", "data_options.channels=1"]
    card = train_select_export(run, "--method", "dml", "--arch", arch, *synthetic)
    assert card["name"] == arch.replace(":", "-") + "-synthetic"
    assert card["input"]["shape"][1:] == [1, 16, 16]
    images = np.random.default_rng(0).normal(size=(2, 1, 16, 16)).astype(np.float32)
    served = served_logits(start_server, run / "export" / "fp32", images)
    np.testing.assert_allclose(served, onnx_logits(run / "export" / "fp32", images), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
def test_file_plugin_model_needs_its_plugin_to_export(tmp_path):
    plugin = tmp_path / "okdpipe_test_cli_plugin.py"
    plugin.write_text(
        "from torch import nn\n"
        "from okdpipe.distill.models import MODELS, Backbone\n\n\n"
        "@MODELS.register('clicnn')\n"
        "def clicnn(num_classes, in_channels=3):\n"
        "    stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU())\n"
        "    return Backbone(stem, [nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())], "
        "nn.Linear(8, num_classes), [8])\n"
    )
    run = tmp_path / "run"
    ok(okdpipe("distill", "--plugin", plugin, "--arch", "clicnn", "--dataset", "synthetic", "--epochs", "1",
               "--out", run))  # fmt: skip
    ok(okdpipe("select", run))  # no --plugin: the run's config names it
    refused = okdpipe("export", run / "model.pt", "--out", run / "export")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.splitlines()[0] == (
        f"error: {run / 'model.pt'}: architecture 'clicnn' comes from plug-in '{plugin}', which is not loaded; "
        f"pass --plugin {plugin}"
    )
    ok(okdpipe("export", run / "model.pt", "--out", run / "export", "--plugin", plugin))
    assert (run / "export" / "fp32" / "model.onnx").is_file()
