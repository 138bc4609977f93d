"""A full disk, a NaN figure or a signal never leaves a half-written set of files nor a traceback: writes of
several files are all-or-none, torch.save's wrapped ENOSPC is one line, and SIGTERM unwinds like Ctrl-C."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import time
from types import SimpleNamespace

import pytest
import torch
import typer
from typer.testing import CliRunner

from okdpipe import files
from okdpipe.cli_support import friendly_errors
from okdpipe.errors import GateFailed, OkdpipeError
from okdpipe.modelfile import atomic_torch_save


class FillingDisk(io.BufferedWriter):
    """A file on a disk with `space` bytes left, shared by every file: a write past it fails as ENOSPC does."""

    space = 0

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > FillingDisk.space:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        FillingDisk.space -= size
        return super().write(data)


@pytest.fixture
def disk_space(monkeypatch):
    def arm(space: int) -> None:
        FillingDisk.space = space
        monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: FillingDisk(io.FileIO(fd, "wb")))

    return arm


def test_several_files_are_replaced_all_or_none(tmp_path, disk_space):
    old = {tmp_path / name: f"old {name}".encode() for name in ("report.json", "report.md", "report.png")}
    for path, data in old.items():
        path.write_bytes(data)
    disk_space(6)
    with pytest.raises(OkdpipeError, match="report.png: cannot write \\(No space left on device\\)"):
        files.atomic_write_files({path: b"new" for path in old})
    assert {path: path.read_bytes() for path in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md", "report.png"]  # no temps


@pytest.mark.parametrize("failure", ["full disk", "interrupt"])
def test_a_failed_write_removes_the_folders_it_created_and_keeps_the_others(tmp_path, disk_space, monkeypatch, failure):
    (tmp_path / "kept").mkdir()
    new = {tmp_path / "kept" / "a" / "b" / "report.json": b"{}", tmp_path / "kept" / "c" / "report.md": b"# r"}
    if failure == "full disk":
        disk_space(3)
        expected = pytest.raises(OkdpipeError, match="No space left on device")
    else:
        monkeypatch.setattr(files.os, "replace", lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        expected = pytest.raises(KeyboardInterrupt)
    with expected:
        files.atomic_write_files(new)
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]  # a/, a/b/ and c/ are gone; kept/ stays
    with pytest.raises(KeyboardInterrupt if failure == "interrupt" else OkdpipeError):
        files.atomic_write(tmp_path / "kept" / "d" / "model.json", lambda handle: handle.write(b"{}"))
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]


def test_checking_an_output_path_creates_nothing(tmp_path):
    files.check_can_write_file(tmp_path / "new" / "deeper" / "report.json", "the json report")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OkdpipeError, match="a-file is a file, not a folder"):
        files.check_can_write_file(tmp_path / "a-file" / "sub" / "report.json", "the json report")


def test_torch_save_on_a_full_disk_is_one_line_and_writes_nothing(tmp_path, disk_space):
    disk_space(100)
    with pytest.raises(OkdpipeError, match="MODEL.pt: cannot write \\(No space left on device\\)"):
        atomic_torch_save({"w": torch.ones(3)}, tmp_path / "MODEL.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_non_finite_figure_is_never_recorded(tmp_path):
    files.atomic_write_json(tmp_path / "keep.json", {"top1": 0.5})
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(GateFailed, match="non-finite number"):
            files.atomic_write_json(tmp_path / "keep.json", {"nested": [{"top1": bad}]})
    assert json.loads((tmp_path / "keep.json").read_text()) == {"top1": 0.5}


def test_disk_error_is_found_behind_a_library_wrapper():
    no_space = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    try:
        try:
            raise no_space
        except OSError as inner:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from inner
    except RuntimeError as wrapped:
        assert files.disk_error(wrapped) is no_space
    assert files.disk_error(RuntimeError("a bug")) is None
    assert files.disk_error(OSError(errno.ENOENT, "missing")) is None  # not the disk's state: stays a bug


def run_command(body) -> tuple[int, str, list[str]]:
    events: list[str] = []

    def command() -> None:
        try:
            body()
        finally:
            events.append("unwound")

    app = typer.Typer()
    app.command()(friendly_errors(command))
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    # Python's Ctrl-C handler, as in a terminal: a job started in the background by a script ignores SIGINT
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = CliRunner().invoke(app, [])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return result.exit_code, result.output, events


def test_a_wrapped_full_disk_error_is_one_line_exit_2():
    def body():
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/out/model.onnx")
        except OSError as exc:
            raise RuntimeError("export failed") from exc

    code, output, events = run_command(body)
    assert (code, output) == (
        2,
        "error: /out/model.onnx: cannot write (No space left on device); free space or choose another --out\n",
    )
    assert events == ["unwound"]


@pytest.mark.parametrize(
    "args",
    [
        ["distill", "--method", "vanilla", "--arch", "resnet20", "--epochs", "1", "--dry-run", "--out", "{long}/run"],
        ["select", "{long}"],
        ["export", "{long}/MODEL.pt", "--format", "onnx", "--out", "OUT"],
        ["bench", "{long}"],
        ["serve", "{long}"],
        ["report", "{long}", "--out", "OUT"],
    ],
    ids=lambda args: args[0],
)
def test_a_path_name_over_255_bytes_is_one_line_exit_2_in_every_command(tmp_path, args):
    """The kernel refuses such a name wherever it is used (ENAMETOOLONG); each command met it at another call."""
    from okdpipe.cli import app

    long = str(tmp_path / ("a" * 300))
    result = CliRunner().invoke(app, [arg.format(long=long).replace("OUT", str(tmp_path / "o")) for arg in args])
    assert result.exit_code == 2, result.output
    [line] = result.output.splitlines()
    assert line.startswith(f"error: {long[:60]}...")  # a long path is shortened in the message
    assert "at most 255 bytes; choose a shorter path" in line


@pytest.mark.parametrize(
    "args",
    [
        ["distill", "--method", "vanilla", "--arch", "resnet8", "--epochs", "1", "--dry-run", "--out", "{bad}"],
        ["export", "{bad}/model.pt", "--format", "onnx", "--out", "{good}"],
        ["export", "{good}/model.pt", "--format", "onnx", "--out", "{bad}"],
        ["bench", "{bad}"],
        ["serve", "{good}", "--api-key-file", "{bad}"],
    ],
    ids=lambda args: "-".join(args[:1] + [a for a in args if a.startswith("{")]),
)
def test_an_argument_that_is_not_utf8_is_refused_before_any_work(tmp_path, args):
    """A file name in another encoding reaches Python as lone surrogates: training wrote into it, then export
    failed at ONNX Runtime's constructor with a message about 'incompatible constructor arguments'."""
    from okdpipe.cli import app

    bad = os.fsdecode(bytes(tmp_path) + b"/caf\xe9")  # Latin-1 e-acute: not UTF-8
    good = tmp_path / "good"
    result = CliRunner().invoke(app, [arg.format(bad=bad, good=good) for arg in args])
    assert result.exit_code == 2, result.output
    [line] = result.output.splitlines()
    assert line.startswith("error: b'") and "caf\\xe9" in line and "': not valid UTF-8" in line
    assert not (tmp_path / "good").exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_link_loop_or_a_dangling_link_is_named_not_called_missing(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for link in (loop, tmp_path / "dangling"):
        assert files.missing_or_kind(link, "a run directory") == (
            "is a link to nothing (its target is missing, or it loops), not a run directory"
        )
    assert files.missing_or_kind(tmp_path / "nowhere", "a run directory") == "no such run directory"
    assert files.path_error(RuntimeError("a bug")) is None and files.path_error(OSError(errno.ENOENT, "x")) is None
    message = files.path_error_message(OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(loop)))
    assert (
        message
        == f"{loop}: Too many levels of symbolic links; a symbolic link on it points back into itself; fix the link"
    )


def test_a_bug_keeps_its_traceback():
    code, _, _ = run_command(lambda: 1 / 0)
    assert code == 1  # CliRunner caught the ZeroDivisionError itself: it was not turned into a user error


@pytest.mark.parametrize(
    ("sig", "code", "message"),
    [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGHUP, 129, "SIGHUP"), (signal.SIGINT, 130, "Ctrl-C")],
)
def test_signals_unwind_then_exit_with_error_line(sig, code, message):
    def body():
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler runs at the next bytecode: never reached
        raise AssertionError("the signal did not interrupt the command")

    got_code, output, events = run_command(body)
    assert (got_code, output) == (code, f"error: interrupted ({message})\n")
    assert events == ["unwound"]


def test_a_second_sigterm_does_not_interrupt_the_clean_up():
    cleaned: list[str] = []

    def body():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # impatient: a second stop request while unwinding
            time.sleep(0.05)
            cleaned.append("staging removed")

    code, output, events = run_command(body)
    assert (code, output, cleaned, events) == (143, "error: interrupted (SIGTERM)\n", ["staging removed"], ["unwound"])


def test_a_nameless_full_disk_error_or_a_truncated_file_is_named_by_the_folder(tmp_path, monkeypatch):
    """onnx.save inside onnxruntime's quantizer raises ENOSPC without a file name; its C++ shape inference can
    instead leave a truncated file that the next step fails to parse. Both say which folder could not be written;
    a failure while the disk has room stays what it is."""
    nameless = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(OkdpipeError) as error, files.writes_into(tmp_path):
        raise nameless
    assert str(error.value) == f"{tmp_path}: cannot write (No space left on device); free space or choose another --out"
    named = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/out/model.onnx")
    with pytest.raises(OSError) as kept, files.writes_into(tmp_path):
        raise named  # it names its file: friendly_errors says so
    assert kept.value is named
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: SimpleNamespace(free=4096))
    with pytest.raises(OkdpipeError, match=r"cannot write \(the disk is full\)"), files.writes_into(tmp_path):
        raise ValueError("Error parsing message with type 'onnx.ModelProto': Wire format was corrupt")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: SimpleNamespace(free=10 << 30))
    with pytest.raises(ValueError, match="Wire format"), files.writes_into(tmp_path):
        raise ValueError("Error parsing message with type 'onnx.ModelProto': Wire format was corrupt")


@pytest.mark.parametrize("before", ["an earlier file", "no file"])
def test_a_full_disk_says_what_is_left_where_the_file_goes(tmp_path, disk_space, before):
    """The line says "the previous file is unchanged" only when there was one; a new file says none was written."""
    report = tmp_path / "report.json"
    if before == "an earlier file":
        report.write_text("{}")
    disk_space(3)
    with pytest.raises(OkdpipeError) as error:
        files.atomic_write_text(report, "a report")
    left = "the previous file is unchanged" if before == "an earlier file" else "no file was written at report.json"
    assert str(error.value) == f"{report}: cannot write (No space left on device); {left}"
    assert [p.name for p in tmp_path.iterdir()] == (["report.json"] if before == "an earlier file" else [])


def test_a_file_name_near_255_bytes_is_written_through_its_temp_file(tmp_path):
    """The temp file beside it keeps only the start of the name: a 250-byte name is written, not refused."""
    for name in ("b" * 250, "\u00e9" * 127):  # 254 bytes of two-byte characters
        files.atomic_write_text(tmp_path / name, "x")
        assert (tmp_path / name).read_text() == "x"
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("errno_", [errno.ENAMETOOLONG, errno.ELOOP])
def test_a_config_path_the_file_system_refuses_is_named_as_that_not_as_unreadable(tmp_path, errno_):
    """pipeline, compare and distill read their config through read_user_file: a 300-byte name said "config file
    cannot read it (File name too long)", as if the file were at fault."""
    from okdpipe.config import read_yaml

    if errno_ == errno.ENAMETOOLONG:
        path = tmp_path / ("a" * 300 + ".yaml")
        expected = f"config file {str(path)[:60]}...{str(path)[-40:]} ({len(str(path))} bytes): File name too long "
        expected += "for the file system; each folder or file name may have at most 255 bytes; choose a shorter path"
    else:
        path = tmp_path / "loop.yaml"
        path.symlink_to(path)
        expected = f"config file {path}: Too many levels of symbolic links; a symbolic link on it points back into "
        expected += "itself; fix the link"
    with pytest.raises(OkdpipeError) as error:
        read_yaml(path)
    assert str(error.value) == expected
