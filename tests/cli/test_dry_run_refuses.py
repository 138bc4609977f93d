"""`--dry-run` refuses what a real run refuses before it starts: every mistake below gives the same first
`error:` line (exit 2) with and without `--dry-run`, and a dry run writes nothing. A dry run that passed a config
which the real run then refused would be worse than no dry run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.cli.test_conventions import (  # noqa: F401  (fixtures)
    QUICK,
    ROOT,
    artifact,
    assert_usage_error,
    finished_run,
    model_file,
    okdpipe,
)

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
}


def concrete(args: list[str], tmp_path: Path, fixtures: dict[str, Path]) -> list:
    result = []
    for arg in args:
        if arg in fixtures:
            result.append(fixtures[arg])
        elif arg == "T" or arg.startswith("T/"):
            result.append(tmp_path / arg[2:] if arg != "T" else tmp_path)
        elif arg.startswith("P:"):
            out = arg[2:]
            result.append(pipeline_file(tmp_path, str(tmp_path / out[2:]) if out.startswith("T/") else out))
        elif arg == "P+bogus":
            result.append(pipeline_file(tmp_path, str(tmp_path / "out"), data_options={"bogus": 1}))
        else:
            result.append(arg)
    return result


@pytest.mark.parametrize("args, fragment", MISTAKES.values(), ids=MISTAKES.keys())
def test_a_dry_run_refuses_what_the_real_run_refuses(artifact, model_file, finished_run, tmp_path, args, fragment):  # noqa: F811
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "empty").write_text("\n")
    command = concrete(args, tmp_path, {"A": artifact, "M": model_file, "R": finished_run})
    before = sorted(tmp_path.rglob("*"))
    dry = okdpipe(*command, "--dry-run", cwd=tmp_path)
    assert_usage_error(dry, 2, fragment)
    assert sorted(tmp_path.rglob("*")) == before  # a dry run writes nothing
    real = okdpipe(*command, cwd=tmp_path)
    assert_usage_error(real, 2, fragment)
    assert real.stderr.splitlines()[0] == dry.stderr.splitlines()[0]
    assert sorted(tmp_path.rglob("*")) == before  # ... and a refused run writes nothing either
