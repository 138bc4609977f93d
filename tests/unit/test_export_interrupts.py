"""Export is all-or-nothing under failure and interruption: publishing over an earlier export either completes or
leaves OUT byte for byte as it was (an OSError, Ctrl-C or SIGTERM at any rename), and an interrupt inside torch's
exporter, even one torch wrapped or Python swallowed, stops the export as an interrupt, never as an error."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
from test_export import make_model_file

from okdpipe.cli_support import Terminated
from okdpipe.contracts.card import read_card
from okdpipe.errors import OkdpipeError
from okdpipe.export import exporter, fakequant, onnx_export, qat
from okdpipe.export.config import ExportConfig
from okdpipe.export.exporter import LOCK_FILE, export_model

FP16 = ExportConfig(quantize="fp16")


def artifacts(out: Path) -> dict[str, bytes]:
    """Every file and folder in OUT (folders as b""), by content, besides the export's (released) lock file."""
    return {
        str(p.relative_to(out)): p.read_bytes() if p.is_file() else b""
        for p in sorted(out.rglob("*"))
        if p.name != LOCK_FILE
    }


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Model A exported to fp32 + fp16 (the earlier export in OUT) and model B likewise (the one published over it)."""
    root = tmp_path_factory.mktemp("interrupts")
    old_model, _, _ = make_model_file(root / "a.pt", seed=0)
    new_model, _, _ = make_model_file(root / "b.pt", seed=1)
    export_model(old_model, root / "old", FP16)
    export_model(new_model, root / "new", FP16)
    assert artifacts(root / "old") != artifacts(root / "new")  # the two are told apart by content
    return {"old": root / "old", "new": root / "new", "new_model": new_model}


@pytest.fixture
def quick_build(exports, monkeypatch):
    """build_artifacts stages model B's verified folders as they are (the minutes of export are not under test)."""

    def build(ctx, staging):
        for precision in ("fp32", "fp16"):
            shutil.copytree(exports["new"] / precision, staging / precision)
        return {precision: read_card(staging / precision) for precision in ("fp32", "fp16")}

    monkeypatch.setattr(exporter, "build_artifacts", build)


def failing_rename(monkeypatch, nth: int, failure: BaseException, after: bool) -> None:
    """publish's `nth` rename raises `failure`: before it moves anything, or (after=True) once it has moved the
    folder, as a signal handled at the next bytecode would. Renames outside publish (atomic file writes) are real."""
    real_publish, real_replace = exporter.publish, os.replace
    count = 0

    def replace(source, target):
        nonlocal count
        count += 1
        if count == nth and not after:
            raise failure
        real_replace(source, target)
        if count == nth:
            raise failure

    def publish(*args):
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", replace)
            return real_publish(*args)

    monkeypatch.setattr(exporter, "publish", publish)


def earlier_export(exports, out: Path, precisions: str) -> None:
    """Model A's export in OUT: fp32 + fp16, fp32 alone (where model B's fp16 then lands in an empty place), or
    fp32 + fp16 + int8 (an int8 B does not replace: it is moved aside too, and must come back)."""
    shutil.copytree(exports["old"], out)
    if precisions == "fp32":
        shutil.rmtree(out / "fp16")
    if precisions == "fp32+fp16+int8":
        shutil.copytree(out / "fp16", out / "int8")


# Publishing B's fp32 + fp16 is a rename per old folder moved aside (fp16, fp32), then one per new folder moved in.
RENAMES = (
    [("fp32+fp16", nth) for nth in (1, 2, 3, 4)]
    + [("fp32", nth) for nth in (1, 2, 3)]
    + [("fp32+fp16+int8", nth) for nth in (1, 2, 3, 4, 5)]
)


@pytest.mark.parametrize("after", [False, True], ids=["before-rename", "after-rename"])
@pytest.mark.parametrize(("earlier", "nth"), RENAMES)
@pytest.mark.parametrize(
    "failure",
    [KeyboardInterrupt(), Terminated(signal.SIGTERM), OSError(errno.EIO, os.strerror(errno.EIO))],
    ids=["ctrl-c", "sigterm", "oserror"],
)
def test_a_publish_stopped_at_any_rename_leaves_the_earlier_export_exactly(
    exports, quick_build, tmp_path, monkeypatch, earlier, nth, failure, after
):
    earlier_export(exports, tmp_path / "before", earlier)
    out = tmp_path / "out"
    shutil.copytree(tmp_path / "before", out)
    failing_rename(monkeypatch, nth, failure, after)
    expected = OkdpipeError if isinstance(failure, OSError) else type(failure)
    with pytest.raises(expected) as raised:
        export_model(exports["new_model"], out, FP16)
    if isinstance(failure, KeyboardInterrupt):
        assert raised.value is failure  # the same interrupt: SIGTERM still exits 143, Ctrl-C 130
    else:
        assert "could not publish the export" in str(raised.value) and raised.value.exit_code == 2
    assert artifacts(out) == artifacts(tmp_path / "before")  # and so no staging folder either


@pytest.mark.parametrize("earlier", ["fp32+fp16", "fp32"])
def test_an_unbroken_publish_replaces_the_earlier_export(exports, quick_build, tmp_path, earlier):
    """The control for the test above: the same publish without a failure leaves model B's export."""
    out = tmp_path / "out"
    earlier_export(exports, out, earlier)
    export_model(exports["new_model"], out, FP16)
    assert artifacts(out) == artifacts(exports["new"])


def test_the_staging_folders_of_a_killed_export_are_removed_by_the_next(exports, quick_build, tmp_path):
    """kill -9 runs no clean-up: its staging folder (half-built artifacts, or old ones moved aside mid-publish) stays
    until the next export into the same OUT."""
    out = tmp_path / "out"
    shutil.copytree(exports["old"], out)
    shutil.copytree(exports["new"] / "fp32", out / ".export-killed1" / "fp32")
    shutil.copytree(exports["old"] / "fp16", out / ".export-killed2" / ".replaced" / "fp16")
    export_model(exports["new_model"], out, FP16)
    assert artifacts(out) == artifacts(exports["new"])


def exporter_hit_by(interrupt: KeyboardInterrupt):
    """torch.onnx.export as a SIGTERM during one of its lazy imports left it (torch 2.9): the half-imported module
    fails with an AttributeError while the interrupt unwinds, and the exporter wraps that in its own error."""

    def export(*args, **kwargs):
        try:
            try:
                raise interrupt
            except KeyboardInterrupt:
                raise AttributeError("partially initialized module 'torch._inductor' has no attribute 'x'")  # noqa: B904
        except AttributeError as exc:
            raise RuntimeError("Failed to export the model with torch.export.") from exc

    return export


def raising(interrupt: KeyboardInterrupt):
    def export(*args, **kwargs):
        raise interrupt

    return export


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt(), Terminated(signal.SIGTERM)], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("exporter_under_test", [raising, exporter_hit_by], ids=["plain", "wrapped-by-torch"])
def test_an_interrupt_inside_torch_onnx_export_is_not_an_export_failure(
    tmp_path, monkeypatch, interrupt, exporter_under_test
):
    model = make_model_file(tmp_path / "model.pt")[1]
    monkeypatch.setattr(onnx_export, "_export_dynamo", exporter_under_test(interrupt))
    with pytest.raises(KeyboardInterrupt) as raised:
        onnx_export.export_onnx(model, (3, 16, 16), tmp_path / "model.onnx", ExportConfig().opset)
    assert raised.value is interrupt


def test_the_qat_wrappers_let_an_interrupt_through(tmp_path, monkeypatch):
    """QAT's other broad `except`s (tracing the network, loading its checkpoint) turn failures into one line too."""
    interrupt = Terminated(signal.SIGTERM)
    monkeypatch.setattr(fakequant.fx, "symbolic_trace", exporter_hit_by(interrupt))
    monkeypatch.setattr(qat.torch, "load", exporter_hit_by(interrupt))
    with pytest.raises(Terminated) as traced:
        fakequant.prepare(make_model_file(tmp_path / "model.pt")[1], {"reduce_range": False})
    (tmp_path / qat.CHECKPOINT_FILE).write_bytes(b"")
    with pytest.raises(Terminated) as loaded:
        qat.resume(tmp_path, None, None)
    assert traced.value is loaded.value is interrupt


def swallow(interrupt: KeyboardInterrupt) -> None:
    """Raise `interrupt` where Python only prints it ("Exception ignored in ...") and runs on: a weakref callback,
    as importlib's module locks use."""

    class Thing:
        pass

    def callback(ref) -> None:
        raise interrupt

    thing = Thing()
    ref = weakref.ref(thing, callback)
    del thing
    assert ref() is None


@pytest.mark.parametrize("then", ["build ends", "build fails"])
def test_an_interrupt_python_swallowed_while_building_stops_the_export_before_publishing(
    exports, quick_build, tmp_path, monkeypatch, capsys, then
):
    out = tmp_path / "out"
    shutil.copytree(exports["old"], out)
    interrupt, build = Terminated(signal.SIGTERM), exporter.build_artifacts

    def build_interrupted(ctx, staging):
        swallow(interrupt)  # okdpipe's handler now ignores further signals: nobody would ask again
        if then == "build fails":  # e.g. the half-imported module the interrupt left behind
            raise OkdpipeError("ONNX export failed at opset 18 (AttributeError); try another --opset")
        return build(ctx, staging)

    monkeypatch.setattr(exporter, "build_artifacts", build_interrupted)
    with pytest.raises(Terminated) as raised:
        export_model(exports["new_model"], out, FP16)
    assert raised.value is interrupt
    assert artifacts(out) == artifacts(exports["old"])
    assert "Exception ignored" not in capsys.readouterr().err  # the one line `error: interrupted` stays alone


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt(), Terminated(signal.SIGTERM)], ids=["ctrl-c", "sigterm"])
def test_an_error_an_interrupt_caused_anywhere_in_the_build_is_that_interrupt(
    exports, quick_build, tmp_path, monkeypatch, interrupt
):
    """Not only torch.onnx.export: ONNX Runtime, onnx and the quantizer import lazily too, behind no wrapper."""
    out = tmp_path / "out"
    shutil.copytree(exports["old"], out)
    monkeypatch.setattr(exporter, "build_artifacts", exporter_hit_by(interrupt))
    with pytest.raises(KeyboardInterrupt) as raised:
        export_model(exports["new_model"], out, FP16)
    assert raised.value is interrupt
    assert artifacts(out) == artifacts(exports["old"])


# Preambles for the real command that send it a real SIGTERM at a chosen point, through okdpipe's own handler.
SIGTERM_AT = {
    # torch.onnx.export imports torch._inductor lazily: the interrupted import once came out as "ONNX export
    # failed ... try another --opset", exit 2
    "torch-import": """
class StopOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == "torch._inductor":
            sys.meta_path.remove(self)
            print("signal sent", file=sys.stderr)
            os.kill(os.getpid(), signal.SIGTERM)
sys.meta_path.insert(0, StopOnImport())
""",
    # right after model B's fp32 moved into OUT, model A's fp32 and fp16 being aside: the worst point to stop
    "mid-publish": """
real_replace = os.replace
def replace(source, target):
    real_replace(source, target)
    if os.path.dirname(os.path.abspath(target)) == os.path.abspath(OUT):
        os.replace = real_replace
        print("signal sent", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGTERM)
os.replace = replace
""",
}


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("where", SIGTERM_AT)
def test_sigterm_exits_143_in_one_line_and_keeps_the_earlier_export(exports, tmp_path, where):
    """The real command over model A's export, sent SIGTERM inside torch's exporter or in the middle of publishing:
    exit 143, the one line every command prints when interrupted, and model A's export exactly as it was."""
    out = tmp_path / "out"
    shutil.copytree(exports["old"], out)
    preamble = f"import os, signal, sys\nOUT = {str(out)!r}\n{SIGTERM_AT[where]}from okdpipe.cli import main\nmain()\n"
    args = ["export", str(exports["new_model"]), "--out", str(out), "--quantize", "fp16"]
    result = subprocess.run([sys.executable, "-c", preamble, *args], capture_output=True, text=True, timeout=150)
    if where == "torch-import" and "signal sent" not in result.stderr:
        pytest.skip("this torch imports torch._inductor before export, not during it")
    assert (result.returncode, result.stderr) == (143, "signal sent\nerror: interrupted (SIGTERM)\n")
    assert artifacts(out) == artifacts(exports["old"])
