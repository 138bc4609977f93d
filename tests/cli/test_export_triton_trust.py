"""`okdpipe export --format triton` never replaces what is not an earlier Triton export: a pipe, file or link where a
model folder, its config.pbtxt or its version folder would go is refused before any work, by the export and by its
`--dry-run` alike (exit 2, one `error:` line naming the path), and left where it was. Only the models this export
publishes are looked at: their names come from the model file (arch, dataset, precision)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from test_export import make_model_file
from typer.testing import CliRunner

from okdpipe.cli import app

FP32_MODEL = "resnet8-synthetic"  # what make_model_file's resnet8 on the synthetic dataset is published as
INT8_MODEL = "resnet8-synthetic-int8"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return make_model_file(tmp_path_factory.mktemp("triton-trust") / "model.pt")[0]


def export(model_file: Path, out: Path, *options: str):
    return CliRunner().invoke(app, ["export", str(model_file), "--out", str(out), "--format", "triton", *options])


def fifo(path: Path, outside: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)


def regular_file(path: Path, outside: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("someone else's\n")


def linked(path: Path, outside: Path) -> None:
    """A link at `path` to a real folder, or for config.pbtxt a real file, outside OUT."""
    if path.name == "config.pbtxt":
        outside.write_text('name: "someone else\'s"\n')
    else:
        outside.mkdir()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(outside)


def is_fifo(path: Path) -> bool:
    return stat.S_ISFIFO(path.lstat().st_mode)


# (where, under OUT, something that is not an earlier export sits; how it is made; --quantize; fragment of the line)
NOT_AN_EXPORT = {
    "config.pbtxt is a pipe": (f"{FP32_MODEL}/config.pbtxt", fifo, "none", "is not the config of"),
    "version folder is a pipe": (f"{FP32_MODEL}/1", fifo, "none", "is not the version folder of"),
    "model folder is a pipe": (FP32_MODEL, fifo, "none", "is not the folder of"),
    "model folder is a file": (FP32_MODEL, regular_file, "none", "is not the folder of"),
    "model folder is a link": (FP32_MODEL, linked, "none", "is not the folder of"),
    "config.pbtxt is a link": (f"{FP32_MODEL}/config.pbtxt", linked, "none", "is not the config of"),
    "the int8 model's config.pbtxt is a pipe": (f"{INT8_MODEL}/config.pbtxt", fifo, "int8", "is not the config of"),
    "the int8 model's version folder is a pipe": (f"{INT8_MODEL}/1", fifo, "int8", "is not the version folder of"),
}


def snapshot(out: Path) -> dict[str, str]:
    """Every entry under OUT by kind (what a refused export must leave as it was, a pipe still a pipe)."""
    return {str(p.relative_to(out)): stat.filemode(p.lstat().st_mode)[0] for p in sorted(out.rglob("*"))}


@pytest.mark.timeout(120)  # a regression that opened the pipe would hang: fail instead
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "export"])
@pytest.mark.parametrize(("where", "make", "quantize", "fragment"), NOT_AN_EXPORT.values(), ids=NOT_AN_EXPORT.keys())
def test_what_is_no_earlier_triton_export_is_refused_and_kept(
    model_file, tmp_path, where, make, quantize, fragment, dry_run
):
    out = tmp_path / "repo"
    place = out / where
    make(place, tmp_path / "elsewhere")
    before = snapshot(out)
    result = export(model_file, out, "--quantize", quantize, *(["--dry-run"] if dry_run else []))
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and f"{place} {fragment}" in line and "remove it" in line
    assert snapshot(out) == before  # a pipe still a pipe, a link still a link


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("where", "quantize"),
    [("other-model/config.pbtxt", "int8"), ("other-model/1", "none"), (f"{INT8_MODEL}/config.pbtxt", "none")],
    ids=["another model's config", "another model's version folder", "int8 model not exported now"],
)
def test_a_pipe_in_a_model_this_export_does_not_publish_is_no_concern(model_file, tmp_path, where, quantize):
    """The control: the names checked are the ones publishing replaces, not every folder of the repository."""
    out = tmp_path / "repo"
    fifo(out / where, tmp_path)
    result = export(model_file, out, "--quantize", quantize, "--dry-run")
    assert result.exit_code == 0, result.output
    assert is_fifo(out / where)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "export"])
@pytest.mark.parametrize("other", ["2/model.onnx", "labels.txt"], ids=["another version", "a labels file"])
def test_what_else_a_replaced_model_folder_holds_is_refused_and_kept(model_file, tmp_path, other, dry_run):
    """Triton serves every version folder of a model (and reads files its config names): okdpipe writes only
    config.pbtxt and 1/, so anything else in a model folder it would replace is someone else's, refused and kept."""
    out = tmp_path / "repo"
    first = export(model_file, out)
    assert first.exit_code == 0, first.output
    extra = out / FP32_MODEL / other
    extra.parent.mkdir(exist_ok=True)
    extra.write_bytes(b"someone else's")
    result = export(model_file, out, *(["--dry-run"] if dry_run else []))
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: --out {out}: {out / FP32_MODEL} also holds {other.split('/')[0]}, ")
    assert "move them out or choose another --out" in line
    assert extra.read_bytes() == b"someone else's"
