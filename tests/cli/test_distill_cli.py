"""The CLI as a user meets it: help, version, the resolved config, and one-line errors."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from okdpipe import __version__
from okdpipe.cli import app

runner = CliRunner()


def test_help_lists_commands_without_importing_torch():
    code = "import sys; from okdpipe.cli import app; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "distill" in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"okdpipe {__version__}"


def test_dry_run_prints_the_resolved_config(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("method: vanilla\nepochs: 7\nlr: 0.05\n")
    result = runner.invoke(app, ["distill", "--config", str(config), "--epochs", "3", "--set", "batch_size=32",
                                 "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "epochs: 3\n" in result.output and "lr: 0.05\n" in result.output and "batch_size: 32\n" in result.output


def one_line_error(args, fragment):
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) <= 2 and lines[-1].startswith("error: ") and fragment in lines[-1], result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, fragment", [
    (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent/fmnist"], "/nonexistent/fmnist"),
    (["--dataset", "nosuchset"], "unknown dataset"),
    (["--arch", "resnet9000", "--dataset", "synthetic"], "resnet9000"),
    (["--method", "nosuchmethod", "--dataset", "synthetic"], "unknown method"),
    (["--epochs", "0", "--dataset", "synthetic"], "epochs"),
    (["--set", "vanilla.temperature=3", "--dataset", "synthetic"], "temperature"),
])
def test_bad_input_is_one_line_and_exit_1(tmp_path, args, fragment):
    one_line_error(["distill", *args, "--out", str(tmp_path / "r")], fragment)


def test_corrupt_fashion_mnist_names_the_file(tmp_path):
    data = tmp_path / "fm"
    data.mkdir()
    for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"]:
        (data / f"{name}.gz").write_bytes(b"not gzip")
    one_line_error(["distill", "--data-dir", str(data), "--out", str(tmp_path / "r")], "idx")


def test_missing_config_file(tmp_path):
    one_line_error(["distill", "--config", str(tmp_path / "none.yaml")], "none.yaml")
