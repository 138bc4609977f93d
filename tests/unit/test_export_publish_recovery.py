"""Publishing survives everything, for plain ONNX folders and for a Triton repository alike: a failure or an interrupt
anywhere in a Triton publish leaves the earlier repository byte for byte, and a publish killed outright (kill -9,
power loss: no clean-up runs) is rolled back by the next export from the journal it left, before that export
removes the staging folder holding the only copy of the earlier artifacts. A damaged journal stops the next export
with one line and leaves the staging folder alone."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_export import make_model_file

from okdpipe.contracts.card import read_card
from okdpipe.errors import OkdpipeError
from okdpipe.export import exporter
from okdpipe.export.config import ExportConfig
from okdpipe.export.exporter import JOURNAL_FILE, LOCK_FILE, STAGING_PREFIX, export_model

# fp32 + static int8, quick: no search, a small calibration and sensitivity sample (their numbers are not under test)
INT8 = dict(quantize="int8", max_accuracy_drop=100.0, tune_budget="0", calib_size=16, sensitivity_samples=16)
LAYOUTS = {"onnx": ExportConfig(**INT8), "triton": ExportConfig(format="triton", **INT8)}
PRECISIONS = ("fp32", "int8")
# Both layouts publish two folders over two earlier ones: two renames aside, then two in.
RENAMES = 4


def tree(out: Path) -> dict[str, str]:
    """Every file (by sha256) and folder under OUT, besides the export's (released) lock file."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
        for p in sorted(out.rglob("*"))
        if p.name != LOCK_FILE
    }


def staging_folders(out: Path) -> list[Path]:
    return sorted(out.glob(STAGING_PREFIX + "*"))


def staged_as_built(folders: Path, seen: list[dict[str, str]] | None = None):
    """A build_artifacts that stages the verified folders of an earlier export as they are (the minutes of export
    are not under test), recording in `seen` OUT as it was when building began (after any roll-back)."""

    def build(ctx, staging):
        if seen is not None:
            seen.append({k: v for k, v in tree(ctx.out_dir).items() if not k.startswith(STAGING_PREFIX)})
        for precision in PRECISIONS:
            shutil.copytree(folders / precision, staging / precision)
        return {precision: read_card(staging / precision) for precision in PRECISIONS}

    return build


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Model A (the earlier export) and model B (published over it): each exported once to fp32 + int8 folders,
    then published from those into a fresh OUT in each layout."""
    root = tmp_path_factory.mktemp("publish-recovery")
    found = {}
    for name, seed in (("a", 0), ("b", 1)):
        model_file = make_model_file(root / f"{name}.pt", seed=seed)[0]
        export_model(model_file, root / f"{name}-folders", LAYOUTS["onnx"])
        found[name] = {"model": model_file, "folders": root / f"{name}-folders"}
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(exporter, "build_artifacts", staged_as_built(root / f"{name}-folders"))
            for layout, config in LAYOUTS.items():
                export_model(model_file, root / f"{name}-{layout}", config)
                found[name][layout] = root / f"{name}-{layout}"
    assert tree(found["a"]["folders"]) != tree(found["b"]["folders"])  # told apart by content
    return found


@pytest.fixture
def quick_build(models, monkeypatch):
    """`quick_build(x)`: build_artifacts stages model x's folders (staged_as_built); returns the list in which it
    records OUT as each build found it."""

    def use(which: str) -> list[dict[str, str]]:
        seen: list[dict[str, str]] = []
        monkeypatch.setattr(exporter, "build_artifacts", staged_as_built(models[which]["folders"], seen))
        return seen

    return use


def earlier_and_new(models, tmp_path: Path, layout: str) -> tuple[Path, dict, dict]:
    """OUT holding model A's export in `layout`; returns OUT, A's tree and the tree B's export gives."""
    shutil.copytree(models["a"][layout], tmp_path / "out")
    return tmp_path / "out", tree(models["a"][layout]), tree(models["b"][layout])


# ------------------------------------------------------------------------------ Triton: all or nothing in-process


def counted(monkeypatch, name: str, module, fail_at: int | None, failure: BaseException | None, after: bool):
    """Wrap module.name (os.replace or shutil.copy2) for one export: count the calls, and make call `fail_at` raise
    `failure` before it acts, or (after=True) once it has acted, as a signal handled at the next bytecode would."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == fail_at and not after:
            raise failure
        result = real(*args, **kwargs)
        if len(calls) == fail_at:
            raise failure
        return result

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_a_triton_publish_makes_these_renames_and_copies(models, quick_build, tmp_path, monkeypatch):
    """The control for the test below, and what it counts on: publishing B's two Triton models over A's writes
    two configs and the journal (3 atomic renames), makes 4 renames in OUT and copies 2 files per model."""
    out, _, new = earlier_and_new(models, tmp_path, "triton")
    quick_build("b")
    replaces = counted(monkeypatch, "replace", os, None, None, False)
    copies = counted(monkeypatch, "copy2", shutil, None, None, False)
    export_model(models["b"]["model"], out, LAYOUTS["triton"])
    assert tree(out) == new
    renamed_in_out = [args for args in replaces if Path(args[0]).parent == out or Path(args[1]).parent == out]
    assert (len(replaces), len(renamed_in_out), len(copies)) == (3 + RENAMES, RENAMES, 4)


TRITON_FAILURES = (
    [("replace", nth, kind, False) for nth in range(1, 3 + RENAMES + 1) for kind in ("oserror", "ctrl-c")]
    + [("replace", nth, "ctrl-c", True) for nth in range(1, 3 + RENAMES + 1)]
    + [("copy2", nth, kind, False) for nth in range(1, 5) for kind in ("oserror", "ctrl-c")]
)


@pytest.mark.parametrize(
    ("call", "nth", "kind", "after"),
    TRITON_FAILURES,
    ids=[f"{c}-{n}-{k}{'-after' if a else ''}" for c, n, k, a in TRITON_FAILURES],
)
def test_a_triton_publish_stopped_anywhere_keeps_the_earlier_repository(
    models, quick_build, tmp_path, monkeypatch, call, nth, kind, after
):
    out, earlier, _ = earlier_and_new(models, tmp_path, "triton")
    quick_build("b")
    failure = KeyboardInterrupt() if kind == "ctrl-c" else OSError(errno.EIO, os.strerror(errno.EIO))
    counted(monkeypatch, call, os if call == "replace" else shutil, nth, failure, after)
    with pytest.raises(KeyboardInterrupt if kind == "ctrl-c" else OkdpipeError) as raised:
        export_model(models["b"]["model"], out, LAYOUTS["triton"])
    if kind == "ctrl-c":
        assert raised.value is failure
    else:
        assert raised.value.exit_code == 2 and "\n" not in str(raised.value)
        assert "Input/output error" in str(raised.value)
    assert tree(out) == earlier  # byte for byte, and no staging folder left


# ------------------------------------------------------------------------------------- a publish killed outright


class Killed(BaseException):
    """Stops the in-process export once OUT has been copied as kill -9 would have left it."""


def killed_at(monkeypatch, out: Path, renames_done: int | str, frozen: Path) -> None:
    """Copy OUT to `frozen` exactly as a kill would leave it: after publish wrote its journal and made
    `renames_done` renames (0: none yet; RENAMES: all, before the commit), or "committed" (journal removed, the
    staging folder not yet); then stop the export. No clean-up the killed process would not have run is copied."""
    real_publish, real_replace = exporter.publish, os.replace

    def freeze():
        shutil.copytree(out, frozen, symlinks=True)
        raise Killed

    def publish(*args):
        if renames_done == 0:
            freeze()
        if renames_done == "committed":
            real_publish(*args)
            freeze()
        count = 0

        def replace(source, target):
            nonlocal count
            real_replace(source, target)
            count += 1
            if count == renames_done:
                freeze()

        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", replace)
            real_publish(*args)

    monkeypatch.setattr(exporter, "publish", publish)


KILL_POINTS = [0, 1, 2, 3, RENAMES]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("renames_done", KILL_POINTS, ids=[f"after-{n}-renames" for n in KILL_POINTS])
def test_the_next_export_rolls_back_a_publish_killed_midway_before_anything_else(
    models, quick_build, tmp_path, monkeypatch, capsys, layout, renames_done
):
    out, earlier, new = earlier_and_new(models, tmp_path, layout)
    quick_build("b")
    frozen = tmp_path / "killed"
    killed_at(monkeypatch, out, renames_done, frozen)
    with pytest.raises(Killed):
        export_model(models["b"]["model"], out, LAYOUTS[layout])
    [staging] = staging_folders(frozen)
    assert (staging / JOURNAL_FILE).is_file()
    if renames_done:
        assert tree(frozen) != earlier  # half-published: the earlier export is not all in OUT
    monkeypatch.undo()
    seen = quick_build("b")
    capsys.readouterr()
    export_model(models["b"]["model"], frozen, LAYOUTS[layout])
    assert seen == [earlier]  # rolled back, byte for byte, before the new export began
    assert capsys.readouterr().err == (
        f"note: --out {frozen}: an export killed while publishing was rolled back to the earlier one\n"
    )
    assert tree(frozen) == new


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_publish_killed_after_its_commit_is_not_rolled_back(models, quick_build, tmp_path, monkeypatch, layout):
    """The journal's removal is the commit point: killed after it, the new export stands and only the staging
    folder (holding the replaced artifacts) is removed by the next export."""
    out, _, new = earlier_and_new(models, tmp_path, layout)
    quick_build("b")
    frozen = tmp_path / "killed"
    killed_at(monkeypatch, out, "committed", frozen)
    with pytest.raises(Killed):
        export_model(models["b"]["model"], out, LAYOUTS[layout])
    assert staging_folders(frozen) and not list(frozen.glob(f"{STAGING_PREFIX}*/{JOURNAL_FILE}"))
    monkeypatch.undo()
    seen = quick_build("b")
    export_model(models["b"]["model"], frozen, LAYOUTS[layout])
    assert seen == [new]
    assert tree(frozen) == new


KILL_AT = """
import os, shutil, signal, sys
from pathlib import Path
from okdpipe.contracts.card import read_card
from okdpipe.export import exporter

NEW, KILL_AFTER = Path(sys.argv.pop(1)), int(sys.argv.pop(1))

def build(ctx, staging):  # model B's verified folders as they are
    for precision in ("fp32", "int8"):
        shutil.copytree(NEW / precision, staging / precision)
    return {precision: read_card(staging / precision) for precision in ("fp32", "int8")}

real_publish, real_replace = exporter.publish, os.replace
renamed = 0

def replace(source, target):
    global renamed
    real_replace(source, target)
    renamed += 1
    if renamed == KILL_AFTER:
        os.kill(os.getpid(), signal.SIGKILL)

def publish(*args):
    os.replace = replace
    real_publish(*args)

exporter.build_artifacts, exporter.publish = build, publish
from okdpipe.cli import main
main()
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_real_kill_9_between_renames_is_rolled_back_by_the_next_export(models, quick_build, tmp_path, layout):
    """The real command, SIGKILLed after publish's second rename (A's two folders aside, none of B's in: the worst
    point), then the same command again."""
    out, earlier, new = earlier_and_new(models, tmp_path, layout)
    args = ["export", str(models["b"]["model"]), "--out", str(out), "--format", layout, "--quantize", "int8"]
    args += ["--tune-budget", "0", "--max-accuracy-drop", "100"]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AT, str(models["b"]["folders"]), "2", *args],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == []  # both of A's aside, B's not in
    seen = quick_build("b")
    export_model(models["b"]["model"], out, LAYOUTS[layout])
    assert seen == [earlier]
    assert tree(out) == new


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_second_interrupt_that_stops_the_undo_leaves_the_staging_folder_for_the_next_export(
    models, quick_build, tmp_path, monkeypatch, layout
):
    """Ctrl-C at publish's third rename, and again at the undo's first: OUT is half-published, so the staging folder
    (A's folders aside in it) and its journal stay, and the next export rolls them back before publishing."""
    out, earlier, new = earlier_and_new(models, tmp_path, layout)
    quick_build("b")
    real_publish, real_replace = exporter.publish, os.replace
    calls = 0

    def replace(source, target):
        nonlocal calls
        calls += 1
        if calls in (3, 4):  # publish's third rename; the undo's first
            raise KeyboardInterrupt
        real_replace(source, target)

    def publish(*args):
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", replace)
            return real_publish(*args)

    monkeypatch.setattr(exporter, "publish", publish)
    with pytest.raises(KeyboardInterrupt):
        export_model(models["b"]["model"], out, LAYOUTS[layout])
    [staging] = staging_folders(out)
    assert (staging / JOURNAL_FILE).is_file() and len(list((staging / ".replaced").iterdir())) == 2
    monkeypatch.undo()
    seen = quick_build("b")
    export_model(models["b"]["model"], out, LAYOUTS[layout])
    assert seen == [earlier]
    assert tree(out) == new


# -------------------------------------------------------------------------------- damage: stop, delete nothing


def killed_after_one_rename(models, quick_build, tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A folder as an ONNX publish killed after its first rename left it (A's fp32 aside); returns it and its
    staging folder."""
    out, _, _ = earlier_and_new(models, tmp_path, "onnx")
    quick_build("b")
    killed_at(monkeypatch, out, 1, tmp_path / "killed")
    with pytest.raises(Killed):
        export_model(models["b"]["model"], out, LAYOUTS["onnx"])
    monkeypatch.undo()
    [staging] = staging_folders(tmp_path / "killed")
    return tmp_path / "killed", staging


DAMAGE = {
    "not json": lambda staging: "{renames: [",
    "not a list of renames": lambda staging: json.dumps({"renames": {"fp32": "x"}}),
    "a rename of one path": lambda staging: json.dumps({"renames": [["fp32"]]}),
    "a path out of OUT": lambda staging: json.dumps({"renames": [["../victim", f"{staging.name}/.replaced/fp32"]]}),
    "a path climbing out of the staging folder": lambda staging: json.dumps(
        {"renames": [["fp32", f"{staging.name}/../../victim"]]}
    ),
    "an absolute path": lambda staging: json.dumps({"renames": [["fp32", str(staging / ".replaced" / "fp32")]]}),
    "a rename within OUT": lambda staging: json.dumps({"renames": [["fp32", "int8"]]}),
    "another staging folder": lambda staging: json.dumps({"renames": [["fp32", ".export-other/.replaced/fp32"]]}),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_journal_stops_the_next_export_and_deletes_nothing(
    models, quick_build, tmp_path, monkeypatch, damage
):
    out, staging = killed_after_one_rename(models, quick_build, tmp_path, monkeypatch)
    (staging / JOURNAL_FILE).write_text(damage(staging))
    (tmp_path / "victim").mkdir()  # what a damaged journal could point at outside OUT
    (tmp_path / "victim" / "keep.txt").write_text("not okdpipe's\n")
    before = tree(tmp_path)
    seen = quick_build("b")
    with pytest.raises(OkdpipeError) as raised:
        export_model(models["b"]["model"], out, LAYOUTS["onnx"])
    message = str(raised.value)
    assert raised.value.exit_code == 2 and "\n" not in message
    assert f"{staging / JOURNAL_FILE} is damaged" in message and f"{staging} may hold the only copy" in message
    assert "remove it" in message
    assert seen == [] and tree(tmp_path) == before  # nothing built, nothing moved or deleted


def test_an_earlier_folder_that_cannot_go_back_keeps_the_staging_folder(models, quick_build, tmp_path, monkeypatch):
    """Something put where A's fp32 was, after the kill: the roll-back cannot put A's fp32 back, and the next export
    stops naming it instead of deleting the staging folder that holds it."""
    out, staging = killed_after_one_rename(models, quick_build, tmp_path, monkeypatch)
    (out / "fp32").mkdir()
    before = tree(out)
    quick_build("b")
    with pytest.raises(OkdpipeError) as raised:
        export_model(models["b"]["model"], out, LAYOUTS["onnx"])
    assert f"{staging / '.replaced' / 'fp32'} of an earlier export could not go back" in str(raised.value)
    assert tree(out) == before


def test_a_full_disk_inside_the_quantizer_names_the_staging_folder_and_publishes_nothing(tmp_path, monkeypatch):
    """onnxruntime's pre-processing saves its graph with onnx.save, whose ENOSPC names no file: the line said
    'cannot write (No space left on device)' and nothing else. It now names the folder that could not be written."""
    import onnxruntime.quantization.shape_inference as shape_inference

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shape_inference, "quant_pre_process", full)
    model_file = make_model_file(tmp_path / "model.pt")[0]
    with pytest.raises(OkdpipeError) as error:
        export_model(model_file, tmp_path / "out", ExportConfig(**INT8))
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'out' / STAGING_PREFIX}") and message.endswith(
        ": cannot write (No space left on device); free space or choose another --out"
    )
    assert not (tmp_path / "out").exists()  # a failed export into a new OUT leaves nothing behind


@pytest.mark.parametrize(("spelling", "layout"), [("relative", "onnx"), ("through a link", "triton")])
def test_out_given_relative_or_through_a_link_publishes(tmp_path, monkeypatch, spelling, layout):
    """`okdpipe export runs/x/model.pt --out runs/x/export`, the command select prints, crashed with a ValueError
    traceback: the staged cards name resolved folders, and publishing took their paths relative to OUT as typed."""
    model_file = make_model_file(tmp_path / "model.pt")[0]
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    out = Path("real/out") if spelling == "relative" else tmp_path / "link" / "out"
    config = ExportConfig(format=layout) if layout == "triton" else ExportConfig()
    [card] = export_model(model_file, out, config)
    published = tmp_path / "real" / "out" / ("fp32" if layout == "onnx" else f"{card.name}/1")
    assert card.directory == published and read_card(published).raw["sha256"] == card.raw["sha256"]
    assert not staging_folders(tmp_path / "real" / "out")
