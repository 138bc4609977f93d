"""Start-up failures are one `error:` line and exit code 2, never a traceback; the API key comes from a file or
from OKDPIPE_API_KEY."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import httpx
import pytest

from okdpipe.errors import OkdpipeError
from okdpipe.serve.server import read_api_key

TOKEN = "env-token-123"


@pytest.fixture()
def artifact_copy(artifact_dir, tmp_path):
    target = tmp_path / "artifact"
    shutil.copytree(artifact_dir, target)
    return target


def start_and_fail(artifact, *options: str, env: dict[str, str] | None = None) -> str:
    """Runs the server expecting it to refuse to start; returns its one stderr line."""
    environment = {key: value for key, value in os.environ.items() if key != "OKDPIPE_API_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "okdpipe.serve", str(artifact), *options],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environment, **(env or {})},
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_port_in_use_is_one_line(artifact_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = start_and_fail(artifact_dir, "--port", str(port))
    assert line == (
        f"error: cannot listen on 127.0.0.1:{port} (Address already in use); pick a free --port or another --host"
    )


def test_a_host_that_does_not_resolve_is_named_as_that(artifact_dir):
    """The resolver's code (-2) is no errno: it once read "(Unknown error -2); pick a free --port"."""
    line = start_and_fail(artifact_dir, "--host", "no-such-host.invalid", "--port", "0")
    assert line.startswith("error: --host no-such-host.invalid: not a name this machine can resolve (")
    assert line.endswith("); give an address such as 127.0.0.1 or a known host name")


@pytest.mark.parametrize(
    ("card_changes", "message"),
    [
        (
            {
                "input": {"name": "input", "shape": [None, 3, 28, 28], "dtype": "float32", "layout": "NCHW"},
                "preprocess": {"size": [28, 28], "channels": 3, "mean": [0, 0, 0], "std": [1, 1, 1]},
            },
            "the model cannot run the card's input [1, 3, 28, 28] (",
        ),
        (
            {"output": {"name": "logits", "shape": [None, 5]}, "labels": list("abcde")},
            "model output shape [1, 10] is not [1, 5] as the card says; re-export the model",
        ),
        (
            {"input": {"name": "input", "shape": [None, 1, 28, 28], "dtype": "float16", "layout": "NCHW"}},
            "the model cannot run the card's input",
        ),
    ],
)
def test_card_that_disagrees_with_the_graph_is_one_line(artifact_copy, card_writer, card_changes, message):
    card_writer(artifact_copy, **card_changes)
    assert message in start_and_fail(artifact_copy, "--port", "0")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--max-delay-ms", "nan"), "--max-delay-ms nan: Input should be a finite number"),
        (("--body-timeout-s", "inf"), "--body-timeout-s inf: Input should be a finite number"),
        (("--max-inflight-mb", "-1"), "--max-inflight-mb -1.0: Input should be greater than or equal to 0.001"),
        (("--max-body-mb", "128"), "options: max_body_mb 128 exceeds max_inflight_mb 64; raise max_inflight_mb"),
        (("--port", "70000"), "--port 70000: Input should be less than or equal to 65535"),
    ],
)
def test_bad_option_values_are_one_line(artifact_dir, options, message):
    assert message in start_and_fail(artifact_dir, "--port", "0", *options)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "must hold one non-empty token"),
        (b"\xff\xfe\x00binary", "is not UTF-8 text"),
        (b"two tokens\n", "must hold one non-empty token of printable ASCII without spaces"),
        (b"k" * 5000, "is larger than 4,096 bytes"),
    ],
)
def test_api_key_file_that_is_not_one_text_token_is_one_line(artifact_dir, tmp_path, content, message):
    key_file = tmp_path / "key"
    key_file.write_bytes(content)
    assert message in start_and_fail(artifact_dir, "--port", "0", "--api-key-file", str(key_file))


def test_api_key_file_that_is_a_device_is_read_boundedly(tmp_path):
    with pytest.raises(OkdpipeError, match="is larger than 4,096 bytes"):
        read_api_key("/dev/zero", environment={})


def test_api_key_from_environment_and_file_together_is_refused(artifact_dir, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("file-token")
    line = start_and_fail(artifact_dir, "--port", "0", "--api-key-file", str(key_file), env={"OKDPIPE_API_KEY": TOKEN})
    assert line == "error: both --api-key-file and OKDPIPE_API_KEY are set; keep one"
    assert "must hold one non-empty token" in start_and_fail(artifact_dir, "--port", "0", env={"OKDPIPE_API_KEY": " "})


def test_api_key_from_environment_guards_the_server(start_server):
    with start_server(env={"OKDPIPE_API_KEY": TOKEN}) as server:
        assert httpx.get(server.url + "/v2", timeout=5).status_code == 401
        assert httpx.get(server.url + "/v2", headers={"authorization": "Bearer wrong"}, timeout=5).status_code == 401
        assert httpx.get(server.url + "/v2", headers={"authorization": f"Bearer {TOKEN}"}, timeout=5).status_code == 200
        assert httpx.get(server.url + "/v2/health/live", timeout=5).status_code == 200
