"""Fixtures for `okdpipe serve`: a real exported artifact (tiny torch CNN -> ONNX via the dynamo exporter + card)
and the real server started as a subprocess on a free loopback port.

Every test here has a time limit (pytest-timeout): a server bug that drops a request must fail the suite,
never hang it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

FASHION_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MODEL_NAME = "tiny-cnn"
STARTUP_TIMEOUT_S = 30.0
TEST_TIMEOUT_S = 120  # per test; the slowest (fuzz, graceful shutdown under load) take about 15 s
SERVE_TESTS = Path(__file__).parent


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if SERVE_TESTS in Path(item.fspath).parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_S))


def build_tiny_cnn():
    """Conv -> ReLU -> pool -> linear: real convolutions at a size that exports in seconds."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    ).eval()


def write_card(directory: Path, onnx_name: str = "model.onnx", name: str = MODEL_NAME, **overrides) -> dict:
    """A card in the export engineer's schema, hashing the ONNX file that is there now."""
    hashes = {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
        if path.name.startswith(onnx_name)
    }  # the .onnx and its external-data file, if any
    card = {
        "format": "okdpipe-card",
        "format_version": 1,
        "name": name,
        "file": onnx_name,
        "precision": "fp32",
        "input": {"name": "input", "shape": [None, 1, 28, 28], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": "logits", "shape": [None, 10], "dtype": "float32"},
        "preprocess": {"size": [28, 28], "channels": 1, "scale": 1 / 255, "mean": [0.286], "std": [0.353]},
        "labels": FASHION_LABELS,
        "dataset": "fashion-mnist",
        "opset": 18,
        "parity": {},
        "quantization": None,
        "accuracy": {},
        "runtime": {},
        "provenance": {"test": True},
        "sha256": hashes,
    }
    card.update(overrides)
    (directory / "model.json").write_text(json.dumps(card, indent=1))
    return card


def export_artifact(model, directory: Path, name: str = MODEL_NAME) -> Path:
    """model.onnx (dynamo exporter, dynamic batch axis) + model.json in `directory`."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        model,
        (torch.zeros(2, 1, 28, 28),),
        str(directory / "model.onnx"),
        dynamo=True,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    write_card(directory, name=name)
    return directory


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory) -> Path:
    return export_artifact(build_tiny_cnn(), tmp_path_factory.mktemp("artifact"))


@pytest.fixture(scope="session")
def reference_session(artifact_dir):
    """Direct onnxruntime on the same file: the ground truth every served answer must equal."""
    import onnxruntime as ort

    return ort.InferenceSession(str(artifact_dir / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def reference_logits(reference_session):
    """images -> logits from direct onnxruntime, for comparing with what the server answers."""
    return lambda images: reference_session.run(["logits"], {"input": images.astype(np.float32)})[0]


@pytest.fixture(scope="session")
def card_writer():
    return write_card


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`python -m okdpipe.serve` in a subprocess; stderr (the JSON logs) goes to a file for inspection."""

    def __init__(self, artifact: Path, log_path: Path, *options: str, env: dict[str, str] | None = None):
        self.artifact = artifact
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "okdpipe.serve", str(artifact), "--port", str(self.port), *options]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, **(env or {})}
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.log()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/v2/health/ready", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S} s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


@contextlib.contextmanager
def running_server(
    artifact: Path, log_path: Path, *options: str, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    server = ServerProcess(artifact, log_path, *options, env=env)
    try:
        server.wait_ready()
        yield server
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.stop()
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="session")
def start_server(request, tmp_path_factory):
    """A factory: `with start_server(*options) as server:` runs a dedicated server for one test (serving the tiny
    CNN, exported only when a test asks for it, unless `artifact` names another)."""

    def start(*options: str, artifact: Path | None = None, env: dict[str, str] | None = None):
        log_path = tmp_path_factory.mktemp("logs") / "server.log"
        return running_server(artifact or request.getfixturevalue("artifact_dir"), log_path, *options, env=env)

    return start


@pytest.fixture(scope="session")
def server(artifact_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    """The main server: small batch delay so concurrent tests form batches; 1 MiB body limit; queue of 64."""
    log_path = tmp_path_factory.mktemp("logs") / "server.log"
    options = ("--max-batch", "16", "--max-delay-ms", "20", "--max-queue", "64", "--max-body-mb", "1", "--threads", "1")
    with running_server(artifact_dir, log_path, *options) as process:
        yield process


@pytest.fixture()
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10.0) as http:
        yield http


@pytest.fixture(scope="session")
def images() -> np.ndarray:
    """Eight distinct normalised 28x28 images at a fixed seed."""
    return np.random.default_rng(0).normal(size=(8, 1, 28, 28)).astype(np.float32)
