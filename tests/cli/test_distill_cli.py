"""The CLI as a user meets it: help, version, the resolved config, and one-line errors."""

import subprocess
import sys
import time

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
    result = runner.invoke(
        app, ["distill", "--config", str(config), "--epochs", "3", "--set", "batch_size=32", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "epochs: 3\n" in result.output and "lr: 0.05\n" in result.output and "batch_size: 32\n" in result.output


def test_dry_run_shows_the_backbones_recipe_unless_a_flag_overrides_it():
    mobilenet = runner.invoke(app, ["distill", "--arch", "mobilenetv2", "--dry-run"])
    assert mobilenet.exit_code == 0, mobilenet.output
    assert "channels_last: true\n" in mobilenet.output and "lr: 0.1\n" in mobilenet.output
    chosen = runner.invoke(app, ["distill", "--arch", "mobilenetv2", "--set", "channels_last=false", "--dry-run"])
    assert chosen.exit_code == 0 and "channels_last: false\n" in chosen.output
    resnet = runner.invoke(app, ["distill", "--arch", "resnet8", "--dry-run"])
    assert resnet.exit_code == 0 and "channels_last: false\n" in resnet.output


def one_line_error(args, fragment, code=2):
    """Exit `code`, and stderr is exactly one line: `error: ...` holding `fragment`; never a traceback."""
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith("error: ") and fragment in result.stderr, result.stderr
    assert "Traceback" not in result.output
    return result


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent/fmnist"], "/nonexistent/fmnist"),
        (["--dataset", "nosuchset"], "unknown dataset"),
        (["--arch", "resnet9000", "--dataset", "synthetic"], "resnet9000"),
        (["--method", "nosuchmethod", "--dataset", "synthetic"], "unknown method"),
        (["--epochs", "0", "--dataset", "synthetic"], "epochs"),
        (["--set", "vanilla.temperature=3", "--dataset", "synthetic"], "temperature"),
        (["--lr", "nan", "--dataset", "synthetic"], "lr: Input should be a finite number"),
        (["--lr", "inf", "--dataset", "synthetic"], "lr: Input should be a finite number"),
        (["--val-split", "2", "--dataset", "synthetic"], "val_split: Input should be less than 1"),
        (["--batch-size", "-1", "--dataset", "synthetic"], "batch_size: Input should be greater than or equal to 1"),
        (["--set", "lr=[1", "--dataset", "synthetic"], "--set lr: not valid YAML"),
        (["--set", "lr=0.1", "--set", "lr=0.2"], "lr is set twice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, fragment):
    one_line_error(["distill", *args, "--out", str(tmp_path / "r")], fragment)


def test_corrupt_fashion_mnist_names_the_file(tmp_path):
    data = tmp_path / "fm"
    data.mkdir()
    for name in [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]:
        (data / f"{name}.gz").write_bytes(b"not gzip")
    one_line_error(["distill", "--data-dir", str(data), "--out", str(tmp_path / "r")], "idx")


def test_missing_config_file(tmp_path):
    one_line_error(["distill", "--config", str(tmp_path / "none.yaml")], "none.yaml")


BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{x}: &{x} [{', '.join(['*' + y] * 9)}]\n" for x, y in zip("bcdefghi", "abcdefgh")
)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (BOMB.encode(), "aliases (*name) are not allowed"),
        (b"\x89PNG\r\n\x1a\n", "not UTF-8 text"),
        (b"- 1\n- 2\n", "must be a mapping"),
    ],
)
def test_hostile_config_files_are_refused_at_once(tmp_path, content, fragment):
    (tmp_path / "c.yaml").write_bytes(content)
    started = time.perf_counter()
    one_line_error(["distill", "--config", str(tmp_path / "c.yaml"), "--dry-run"], fragment)
    assert time.perf_counter() - started < 5


def test_an_out_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    one_line_error(["distill", "--dataset", "synthetic", "--out", str(tmp_path / "f")], "is a file")


def test_a_run_directory_in_use_is_refused_at_once_naming_the_holder(tmp_path):
    code = (
        "import sys, time; from okdpipe.run import RunDir\n"
        "with RunDir(sys.argv[1]).locked():\n    print('locked', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "r")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        one_line_error(
            ["distill", "--dataset", "synthetic", "--out", str(tmp_path / "r")],
            f"is in use by another okdpipe run (pid {holder.pid} on ",
        )
    finally:
        holder.kill()
        holder.wait()


def test_a_diverging_run_exits_1_naming_epoch_and_step_and_writes_no_checkpoint(tmp_path):
    result = one_line_error(
        [
            "distill",
            "--dataset",
            "synthetic",
            "--arch",
            "resnet8",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--lr",
            "1e30",
            "--out",
            str(tmp_path / "r"),
        ],
        "training diverged: the loss became NaN or infinite at epoch 1, step ",
        code=1,
    )
    assert "no epoch had finished, so there is no checkpoint" in result.stderr
    assert not (tmp_path / "r" / "checkpoints" / "last.pt").exists()


def test_resume_of_a_damaged_run_directory_is_one_line(tmp_path):
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    (tmp_path / "r" / "checkpoints" / "last.pt").write_bytes(b"x")
    (tmp_path / "r" / "manifest.json").write_text("[1]")
    one_line_error(
        ["distill", "--dataset", "synthetic", "--out", str(tmp_path / "r"), "--resume"],
        "corrupt manifest (a list, not an object)",
    )


def test_no_validation_split_is_refused_before_training(tmp_path):
    one_line_error(
        ["distill", "--dataset", "synthetic", "--arch", "resnet8", "--val-split", "0", "--out", str(tmp_path / "r")],
        "synthetic has no validation images (--val-split 0 and no val split of its own); pass e.g. --val-split 0.1",
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            ["--method", "okdph", "--set", "okdph.gamma=nan"],
            "bad okdph parameter gamma: Input should be a",
        ),
        (["--method", "dml", "--set", "dml.temperature=-1"], "bad dml parameter temperature"),
        (["--method", "okdph", "--students", "1"], "--method okdph needs at least 2 students, got 1"),
        (["--method", "pcl", "--arch", "resnet8,resnet20"], "--method pcl cannot train peers of different"),
        (["--arch", "nonet"], "unknown backbone 'nonet'"),
        (["--dataset", "nope"], "unknown dataset 'nope'"),
    ],
)
def test_dry_run_refuses_what_training_would_refuse(args, fragment):
    one_line_error(["distill", *args, "--dry-run"], fragment)


def test_a_refused_start_leaves_no_run_folder_but_keeps_an_existing_one(tmp_path):
    fresh = tmp_path / "fresh"
    one_line_error(
        ["distill", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"), "--out", str(fresh)], "data directory"
    )
    assert not fresh.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    one_line_error(
        ["distill", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"), "--out", str(mine)], "data directory"
    )
    assert (mine / "notes.txt").read_text() == "keep"


@pytest.mark.timeout(900)  # imports torch: minutes on a busy 2-core machine
@pytest.mark.parametrize("case", ["resume into a dangling link", "resume without a checkpoint", "a finished run"])
def test_a_refused_start_announces_nothing(tmp_path, monkeypatch, capsys, case):
    """`distill --resume --out <dangling link>` printed "resuming ..." before refusing: every check of the run folder
    comes before the line that says the run starts (fit, which would refuse it later, is not reached)."""
    from okdpipe.config import build_config
    from okdpipe.distill import command, trainer
    from okdpipe.errors import OkdpipeError

    out = tmp_path / "r"
    if case == "resume into a dangling link":
        out.symlink_to(tmp_path / "nowhere")
        fragment = f"--out {out}: {out} is a link to nothing (its target is missing, or it loops)"
    elif case == "resume without a checkpoint":
        out.mkdir()
        fragment = f"--resume: {out} has no checkpoint to resume from"
    else:
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / "last.pt").write_bytes(b"x")
        fragment = f"{out} already holds a run; pass --resume to continue it"
    monkeypatch.setattr(trainer, "fit", lambda *args, **kwargs: pytest.fail("fit was reached"))
    cfg = build_config({}, {"dataset": "synthetic", "arch": "resnet8"}, [])
    with pytest.raises(OkdpipeError) as error:
        command.run(cfg, out, resume=case.startswith("resume"))
    assert str(error.value).startswith(fragment)
    assert capsys.readouterr().out == ""
