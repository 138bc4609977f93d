"""`--dry-run` refuses what a real run refuses before it starts: every mistake below gives the same first
`error:` line (exit 2) with and without `--dry-run`, and a dry run writes nothing. A dry run that passed a config
which the real run then refused would be worse than no dry run.

The commands run in-process (typer's CliRunner): a hundred fresh interpreters importing torch took minutes, and
test_conventions already runs the CLI as a real process for the exit-code table."""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from okdpipe.cli import app
from okdpipe.distill.models import create_model
from tests.cli.test_conventions import (  # noqa: F401  (fixtures)
    QUICK,
    ROOT,
    artifact,
    assert_usage_error,
    finished_run,
    model_file,
    okdpipe,
)


def okdpipe_in_process(*args, cwd: Path) -> SimpleNamespace:
    """`okdpipe ARGS` run in this process from `cwd`, with what assert_usage_error reads. What a run changes in
    the process (the folder, the plug-ins it loaded and names to child processes) is put back after it: later
    tests in the same process must not inherit a plug-in."""
    from okdpipe import plugins

    previous, named, loaded = Path.cwd(), list(plugins._named), dict(plugins._loaded)
    environment = os.environ.get(plugins.ENVIRONMENT)
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, [str(arg) for arg in args], env={"COLUMNS": "200"})
    finally:
        os.chdir(previous)
        plugins._named[:], plugins._loaded = named, loaded
        os.environ.pop(plugins.ENVIRONMENT, None)
        if environment is not None:
            os.environ[plugins.ENVIRONMENT] = environment
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr)


SMOKE = yaml.safe_load((ROOT / "configs" / "pipeline-smoke.yaml").read_text())
DISTILL = ["distill", "--method", "vanilla", "--dataset", "synthetic", "--epochs", "1", "--out", "T/run"]


def pipeline_file(tmp_path: Path, out: str | None = None, **distill) -> Path:
    data = {**SMOKE, "distill": {**SMOKE["distill"], **distill}}
    if out is not None:
        data["out"] = out
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# (args with A = an artifact, M = a model file, R = a finished run, T/... = under tmp_path, P... = a pipeline file
# made by `pipeline_file`; a fragment of the first line)
MISTAKES = {
    "data option nobody has": ([*DISTILL, "--set", "data_options.bogus=1"], "has no option bogus"),
    "init from a device": ([*DISTILL, "--init", "/dev/zero"], "not a regular file"),
    "init that is absent": ([*DISTILL, "--init", "T/absent.pt"], "no such file"),
    "policy is a folder": (["bench", "A", *QUICK, "--report", "T/r.json", "--policy", "T"], "--policy"),
    "baseline is not a report": (
        ["bench", "A", *QUICK, "--report", "T/r.json", "--baseline", "T/list.yaml"],
        "--baseline",
    ),
    "baseline gate without one": (
        ["bench", "A", *QUICK, "--report", "T/r.json", "--gate", "top1>=baseline"],
        "--baseline",
    ),
    "bench artifact absent": (["bench", "T/absent", *QUICK, "--report", "T/r.json"], "absent"),
    "report under a file": (["bench", "A", *QUICK, "--report", "T/list.yaml/r.json"], "is a file, not a folder"),
    "api key from a device": (["serve", "A", "--port", "1", "--api-key-file", "/dev/zero"], "--api-key-file"),
    "api key empty": (["serve", "A", "--port", "1", "--api-key-file", "T/empty"], "--api-key-file"),
    "serve artifact absent": (["serve", "T/absent", "--port", "1"], "absent"),
    "pipeline out in /proc": (["pipeline", "P:/proc/okdpipe-out"], "is not writable"),
    "pipeline out under a file": (["pipeline", "P:T/list.yaml/out"], "is a file, not a folder"),
    "pipeline data option": (["pipeline", "P+bogus"], "has no option bogus"),
    "export a model from elsewhere": (["export", "T/list.yaml", "--out", "T/out"], "list.yaml"),
    "export out is a file": (["export", "M", "--out", "T/list.yaml"], "is a file"),
    "export out under a file": (["export", "M", "--out", "T/list.yaml/out"], "is a file, not a folder"),
    "export QAT teacher without a run": (
        ["export", "M", "--out", "T/out", "--quantize", "int8", "--qat-epochs", "1"],
        "--qat-teacher labels",
    ),
    "select a folder that is no run": (["select", "T"], "not an okdpipe run directory"),
    "select out under a file": (["select", "R", "--out", "T/list.yaml/model.pt"], "is a file, not a folder"),
    "select a strategy the run lacks": (["select", "R", "--strategy", "leader"], "has no such candidate"),
    "select out is a pipe": (["select", "R", "--out", "T/fifo"], "not a regular file"),
    "bench report is a pipe": (["bench", "A", *QUICK, "--report", "T/fifo"], "not a regular file"),
    "bench artifact twice": (["bench", "A", "A/", *QUICK, "--report", "T/r.json"], "given twice"),
    "bench artifact twice via a link": (["bench", "A", "T/alink", *QUICK, "--report", "T/r.json"], "given twice"),
    "bench artifact twice as a copy": (["bench", "T/acopy", "A", *QUICK, "--report", "T/r.json"], "identical bytes"),
    "distill metrics file is a pipe": ([*DISTILL[:-1], "T/piped"], "metrics.jsonl: not a regular file"),
    "pipeline state file is a pipe": (["pipeline", "P:T/piped"], "pipeline.json is not a regular file"),
    "export precision folder is a pipe": (["export", "M", "--out", "T/piped"], "is not a folder of an earlier export"),
    "export lock file is a pipe": (["export", "M", "--out", "T/locked"], "is not the export's lock file"),
    "distill run lock is a link": ([*DISTILL[:-1], "T/linkedlock"], ".lock: not a regular file (a link,"),
    "distill out is a dangling link": ([*DISTILL[:-1], "T/dangling"], "dangling is a link to nothing"),
    "export out below a link loop": (["export", "M", "--out", "T/loop/x"], "loop is a link to nothing"),
    "select out below a dangling link": (["select", "R", "--out", "T/dangling/m.pt"], "dangling is a link to nothing"),
    "pipeline stage folder is a link": (["pipeline", "P:T/linked"], "export: not a folder of this pipeline"),
    "pipeline stage folder is a pipe": (["pipeline", "P:T/locked"], "distill: not a folder of this pipeline"),
    "bench batch size twice": (["bench", "A", *QUICK, "--batch-sizes", "1,1", "--report", "T/r.json"], "listed twice"),
    "distill on a GPU nobody has": pytest.param(
        [*DISTILL, "--device", "cuda"],
        "no CUDA device is visible",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
    ),
    "distill more processes than cores": ([*DISTILL, "--nproc-per-node", "64", "--batch-size", "64"], "at most"),
    "distill warm-up longer than the run": ([*DISTILL, "--set", "warmup_epochs=5"], "longer than the run"),
    "distill subset larger than the data": ([*DISTILL, "--train-subset", "100000"], "lower it"),
    "distill batch beyond memory": (
        ["distill", "--dataset", "fashion-mnist", "--arch", "mobilenetv2", "--batch-size", "50000", "--out", "T/run"],
        "GiB for activations",
    ),
    "distill uneven batch beyond the split, 2 processes": (
        [*DISTILL, "--batch-size", "64", "--nproc-per-node", "2", "--set", "data_options.n_train=63"],
        "cannot share evenly",
    ),
    "distill backbone breaking the contract": (
        [*DISTILL, "--arch", "extra_class_cnn", "--plugin", "T/extra_class_plugin.py"],
        "backbone 'extra_class_cnn' gives logits of shape [2, 5] for a batch of 2, expected [2, 4]",
    ),
    "distill init that is not weights": ([*DISTILL, "--init", "T/list.yaml"], "not a readable weights file"),
    "distill init of BatchNorm counters only": (
        [*DISTILL, "--arch", "resnet8", "--init", "T/counters.pt"],
        "loads no weight: the only entries it shares with the students are 9 integer counter(s)",
    ),
    "distill out is a device": ([*DISTILL[:-1], "/dev/null"], "not a folder"),
    "distill out in /proc": ([*DISTILL[:-1], "/proc/okdpipe-run"], "is not writable"),
    "pipeline on a GPU nobody has": pytest.param(
        ["pipeline", "P+distill.device=cuda"],
        "no CUDA device is visible",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
    ),
    "pipeline bench provider absent": (["pipeline", "P+bench.provider=cuda"], "no CUDAExecutionProvider"),
    "pipeline strategy the method lacks": (["pipeline", "P+select.strategy=leader"], "has no such candidate"),
    "pipeline student that is not there": (["pipeline", "P+select.strategy=student:9"], "has no such candidate"),
}


EXTRA_CLASS_PLUGIN = """
from torch import nn
from okdpipe.distill.models import MODELS, Backbone

@MODELS.register("extra_class_cnn")
def extra_class_cnn(num_classes, in_channels=3):
    stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU())
    return Backbone(stem, [nn.Identity()], nn.Linear(8, num_classes + 1), [8])
"""


def concrete(args: list[str], tmp_path: Path, fixtures: dict[str, Path]) -> list:
    result = []
    for arg in args:
        if arg in fixtures:
            result.append(fixtures[arg])
        elif arg.endswith("/") and arg[:-1] in fixtures:  # the same path spelled with a trailing slash
            result.append(f"{fixtures[arg[:-1]]}/")
        elif arg == "T" or arg.startswith("T/"):
            result.append(tmp_path / arg[2:] if arg != "T" else tmp_path)
        elif arg.startswith("P:"):
            out = arg[2:]
            result.append(pipeline_file(tmp_path, str(tmp_path / out[2:]) if out.startswith("T/") else out))
        elif arg == "P+bogus":
            result.append(pipeline_file(tmp_path, str(tmp_path / "out"), data_options={"bogus": 1}))
        elif arg.startswith("P+"):  # P+section.key=value
            (section, key), value = arg[2:].split("=")[0].split("."), arg.split("=")[1]
            path = pipeline_file(tmp_path, str(tmp_path / "out"))
            data = yaml.safe_load(path.read_text())
            data[section] = {**data.get(section, {}), key: value}
            path.write_text(yaml.safe_dump(data))
            result.append(path)
        else:
            result.append(arg)
    return result


@pytest.mark.parametrize("args, fragment", MISTAKES.values(), ids=MISTAKES.keys())
def test_a_dry_run_refuses_what_the_real_run_refuses(artifact, model_file, finished_run, tmp_path, args, fragment):  # noqa: F811
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "extra_class_plugin.py").write_text(EXTRA_CLASS_PLUGIN)
    counters = {k: v for k, v in create_model("resnet8", 4, 3).state_dict().items() if "num_batches" in k}
    torch.save(counters, tmp_path / "counters.pt")  # BatchNorm counters and no weight: --init refuses it
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "alink").symlink_to(artifact, target_is_directory=True)
    shutil.copytree(artifact, tmp_path / "acopy")
    (tmp_path / "piped").mkdir()
    for name in ("metrics.jsonl", "pipeline.json", "fp32"):  # where distill, pipeline and export write
        os.mkfifo(tmp_path / "piped" / name)
    (tmp_path / "locked").mkdir()
    for name in (".export.lock", "distill"):
        os.mkfifo(tmp_path / "locked" / name)
    (tmp_path / "linkedlock").mkdir()
    (tmp_path / "linkedlock" / ".lock").symlink_to(tmp_path / "list.yaml")  # writing the holder would clobber it
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    (tmp_path / "loop").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "export").symlink_to(tmp_path, target_is_directory=True)  # out of OUT
    command = concrete(args, tmp_path, {"A": artifact, "M": model_file, "R": finished_run})
    before = sorted(tmp_path.rglob("*"))
    dry = okdpipe_in_process(*command, "--dry-run", cwd=tmp_path)
    assert_usage_error(dry, 2, fragment)
    assert sorted(tmp_path.rglob("*")) == before  # a dry run writes nothing
    real = okdpipe_in_process(*command, cwd=tmp_path)
    assert_usage_error(real, 2, fragment)
    assert first_line(real) == first_line(dry)
    assert sorted(tmp_path.rglob("*")) == before  # ... and a refused run writes nothing either


def first_line(result) -> str:
    """The first stderr line, free memory masked (it moves between two runs)."""
    return re.sub(r"[\d.]+ GiB available", "N GiB available", result.stderr.splitlines()[0])


def test_serve_dry_run_refuses_a_port_in_use_as_the_real_start_does(artifact, tmp_path):  # noqa: F811
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        dry = okdpipe("serve", artifact, "--port", port, "--dry-run", cwd=tmp_path)
        real = okdpipe("serve", artifact, "--port", port, cwd=tmp_path)
    assert_usage_error(dry, 2, f"cannot listen on 127.0.0.1:{port}")
    assert_usage_error(real, 2, f"cannot listen on 127.0.0.1:{port}")
    assert first_line(real) == first_line(dry)
