"""Operations: bearer auth, bounded queue (503 + Retry-After), graceful shutdown under load, and no torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

MODEL = "tiny-cnn"
INFER = f"/v2/models/{MODEL}/infer"
TOKEN = "s3cret-token"


def infer_body(batch: int, seed: int = 0) -> dict:
    images = np.random.default_rng(seed).normal(size=(batch, 1, 28, 28)).astype(np.float32)
    return {
        "inputs": [{"name": "input", "shape": list(images.shape), "datatype": "FP32", "data": images.tolist()}],
        "outputs": [{"name": "logits"}],
    }


def wait_for_queue_depth(url: str, depth: int, headers: dict | None = None, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics", headers=headers).text
        if re.search(rf"^okdpipe_queue_depth {depth}$", text, re.MULTILINE):
            return
        time.sleep(0.01)
    raise AssertionError(f"queue depth never reached {depth}")


@pytest.fixture(scope="module")
def strict_server(start_server, tmp_path_factory):
    """Auth on; a queue of 4 images with batches of up to 4 that wait 800 ms to fill, so a second 3-image
    request arriving while the first waits must overflow the queue."""
    key_file = tmp_path_factory.mktemp("key") / "api.key"
    key_file.write_text(TOKEN + "\n")
    options = ("--api-key-file", str(key_file), "--max-batch", "4", "--max-queue", "4", "--max-delay-ms", "800")
    with start_server(*options) as server:
        yield server


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/v2/health/live", {}, 200),
        ("/v2/health/ready", {}, 200),
        ("/v2", {}, 401),
        ("/metrics", {}, 401),
        (f"/v2/models/{MODEL}", {"authorization": "Bearer wrong"}, 401),
        (f"/v2/models/{MODEL}", {"authorization": TOKEN}, 401),
        (f"/v2/models/{MODEL}", {"authorization": f"Bearer {TOKEN}"}, 200),
        (f"/v2/models/{MODEL}", {"authorization": f"bearer {TOKEN}"}, 200),
    ],
)
def test_bearer_token_guards_everything_but_health(strict_server, path, headers, status):
    response = httpx.get(strict_server.url + path, headers=headers)
    assert response.status_code == status
    if status == 401:
        assert response.json() == {"error": "missing or wrong bearer token"}
        assert response.headers["www-authenticate"] == "Bearer"


def test_full_queue_answers_503_with_retry_after_then_recovers(strict_server):
    auth = {"authorization": f"Bearer {TOKEN}"}
    # a 2-image batch shows the batcher there is concurrency, so the next request waits for company
    assert httpx.post(strict_server.url + INFER, json=infer_body(2), headers=auth, timeout=10).status_code == 200
    first: dict = {}
    waiting = threading.Thread(
        target=lambda: first.update(
            response=httpx.post(strict_server.url + INFER, json=infer_body(3), headers=auth, timeout=10)
        )
    )
    waiting.start()
    wait_for_queue_depth(strict_server.url, 3, auth)
    refused = httpx.post(strict_server.url + INFER, json=infer_body(3), headers=auth, timeout=10)
    waiting.join(timeout=10)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "server is at capacity (3 images are waiting (limit 4))" in refused.json()["error"]
    assert first["response"].status_code == 200
    assert httpx.post(strict_server.url + INFER, json=infer_body(4), headers=auth, timeout=10).status_code == 200


def _load_until_refused(url: str, outcomes: list, stop_at: float) -> None:
    """A client in a loop: records every status it receives, stops once the server refuses connections."""
    with httpx.Client(base_url=url, timeout=10.0) as http:
        while time.monotonic() < stop_at:
            try:
                outcomes.append(http.post(INFER, json=infer_body(1)).status_code)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as error:
                outcomes.append(type(error).__name__)
                return


def test_sigterm_mid_load_finishes_accepted_requests_and_exits_0(start_server, reference_logits):
    with start_server("--max-delay-ms", "1000", "--max-batch", "32") as server:
        assert httpx.post(server.url + INFER, json=infer_body(2), timeout=10).status_code == 200  # see above
        pending: list = [None] * 8
        bodies = [infer_body(1, seed) for seed in range(8)]

        def call(index: int) -> None:
            pending[index] = httpx.post(server.url + INFER, json=bodies[index], timeout=20)

        in_flight = [threading.Thread(target=call, args=(index,)) for index in range(8)]
        for thread in in_flight:
            thread.start()
        wait_for_queue_depth(server.url, 8)
        background: list = []
        loaders = [
            threading.Thread(target=_load_until_refused, args=(server.url, background, time.monotonic() + 15))
            for _ in range(3)
        ]
        for thread in loaders:
            thread.start()
        exit_code = server.stop()
        for thread in in_flight + loaders:
            thread.join(timeout=20)
        log = server.log()
    assert exit_code == 0
    for body, response in zip(bodies, pending):
        assert response.status_code == 200
        expected = reference_logits(np.array(body["inputs"][0]["data"], np.float32))
        np.testing.assert_allclose(
            np.array(response.json()["outputs"][0]["data"]).reshape(1, 10), expected, rtol=1e-5, atol=1e-6
        )
    # late arrivals: served, refused while draining or at capacity (503 + Retry-After), or the socket is closed
    assert set(background) <= {200, 503, "ConnectError", "RemoteProtocolError", "ReadError"}
    served_ok = [json.loads(line) for line in log.splitlines() if '"route": "/v2/models/{name}/infer"' in line]
    # every request the server completed reached its client: none was processed and then dropped
    assert sum(entry["status"] == 200 for entry in served_ok) == 1 + 8 + background.count(200)
    assert "Application shutdown complete." in log


NO_TORCH_SCRIPT = """
import sys
from pathlib import Path
from starlette.testclient import TestClient
from okdpipe.serve.app import ServeSettings, create_app
import okdpipe.serve.command, okdpipe.serve.server
app = create_app(ServeSettings(artifact_dir=Path(sys.argv[1])))
with TestClient(app) as client:
    body = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}
    assert client.post("/v2/models/tiny-cnn/infer", json=body).status_code == 200
    assert client.get("/metrics").status_code == 200
print("torch" in sys.modules, sorted(name for name in sys.modules if name.startswith("torch")))
"""


def test_serving_never_imports_torch(artifact_dir):
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH_SCRIPT, str(artifact_dir)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False []"


def test_command_module_imports_only_typer_at_top_level():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, okdpipe.serve.command as c; "
            "print(sorted(m for m in ('onnxruntime', 'fastapi', 'uvicorn', 'numpy', 'torch') "
            "if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == "[]", result.stderr


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_model_failure_is_a_json_500_and_the_server_keeps_serving(artifact_dir, caplog):
    from starlette.testclient import TestClient

    from okdpipe.contracts.card import read_card
    from okdpipe.serve.app import ServeSettings, create_app
    from okdpipe.serve.model import OnnxClassifier

    class FailsOnLargeInputs(OnnxClassifier):
        def run(self, batch: np.ndarray) -> np.ndarray:
            if np.abs(batch).max() > 1000:
                raise RuntimeError("simulated onnxruntime failure")
            return super().run(batch)

    app = create_app(ServeSettings(artifact_dir=artifact_dir), FailsOnLargeInputs(read_card(artifact_dir)))
    body = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [5000.0] * 784}]}
    with TestClient(app) as client:
        failed = client.post(INFER, json=body)
        body["inputs"][0]["data"] = [0.0] * 784
        recovered = client.post(INFER, json=body)
    assert failed.status_code == 500 and failed.json() == {"error": "internal server error (logged on the server)"}
    assert recovered.status_code == 200
    assert "simulated onnxruntime failure" in caplog.text


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_images_being_decoded_never_hold_up_infer(artifact_dir, monkeypatch):
    """Image decoding has its own threads: /classify requests stuck in a slow decode (every decode thread busy)
    left /infer waiting behind them (8.7 s in an outside test) when both shared one pool."""
    import threading

    from starlette.testclient import TestClient

    from okdpipe.serve import app as serve_app

    release, busy = threading.Event(), threading.Semaphore(0)

    def slow_decode(*args):
        busy.release()
        release.wait(30)
        raise serve_app.ClientError(400, "decode abandoned by the test")

    monkeypatch.setattr(serve_app, "_image_batch", slow_decode)
    body = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}
    with TestClient(serve_app.create_app(serve_app.ServeSettings(artifact_dir=artifact_dir))) as client:
        stuck = [
            threading.Thread(target=client.post, args=(f"/v2/models/{MODEL}/classify",), kwargs={"content": b"x"})
            for _ in range(serve_app.PARSE_THREADS)
        ]
        for thread in stuck:
            thread.start()
        assert all(busy.acquire(timeout=10) for _ in stuck)  # every decode thread is now held
        try:
            answered = {}
            infer = threading.Thread(target=lambda: answered.update(response=client.post(INFER, json=body)))
            infer.start()
            infer.join(timeout=10)
            assert "response" in answered and answered["response"].status_code == 200
        finally:
            release.set()
            for thread in stuck:
                thread.join(timeout=10)
