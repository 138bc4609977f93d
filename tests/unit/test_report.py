"""`okdpipe report`: run directories written by hand (a finished run with its selection, and one still training
with a torn last line) rendered to PNGs, one self-contained HTML page and a Markdown summary."""

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from okdpipe.errors import OkdpipeError
from okdpipe.report.build import write_report
from okdpipe.report.runs import read_run

pytestmark = pytest.mark.timeout(120)
PNG = b"\x89PNG\r\n\x1a\n"


def step(n, loss, lr):
    return {"kind": "step", "epoch": (n - 1) // 4 + 1, "step": n, "lr": lr, "images_per_s": 100.0, "loss": loss,
            "ce/s0": loss / 2, "ce/s1": loss / 2}  # fmt: skip


def epoch(n, s0, s1, ens):
    val = {"student:0": {"top1": s0, "top5": 0.9}, "student:1": {"top1": s1, "top5": 0.95}, "ensemble": {"top1": ens}}
    return {"kind": "epoch", "epoch": n, "train": {"loss": 1.0}, "seconds": 1.0, "images_per_s": 100.0, "val": val}


def write_run(root, lines, *, epochs=3, selection=None, status="finished", method="dml"):
    root.mkdir(parents=True)
    text = "".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines)
    (root / "metrics.jsonl").write_text(text)
    manifest = {"manifest_version": 1, "status": status, "config": {"method": method, "arch": "resnet8",
                "dataset": "fashion-mnist", "epochs": epochs}}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    if selection:
        (root / "selection.json").write_text(json.dumps(selection))
    return root


SELECTION = {
    "strategy": "auto",
    "chosen": "student:1",
    "candidates": [
        {"candidate": "student:0", "val_top1": 0.70, "params": 1000, "macs": 2_000_000, "chosen": False},
        {"candidate": "student:1", "val_top1": 0.75, "params": 1000, "macs": 2_000_000, "chosen": True},
        {
            "candidate": "soup",
            "val_top1": 0.50,
            "val_top1_without_bn_recalibration": 0.1,
            "params": 1000,
            "macs": 2_000_000,
            "weight_averaged": True,
            "chosen": False,
        },
    ],  # fmt: skip
    "ensemble": {"candidate": "ensemble", "val_top1": 0.76, "params": 2000, "macs": 4_000_000, "reference": True},
}


@pytest.fixture()
def finished(tmp_path):
    lines = [step(4, 2.0, 0.1), epoch(1, 0.5, 0.55, 0.56), step(8, 1.5, 0.05), epoch(2, 0.70, 0.75, 0.76)]
    return write_run(tmp_path / "dml-run", lines, epochs=2, selection=SELECTION)


@pytest.fixture()
def training(tmp_path):
    """Still training: no selection, status training, and the trainer half-way through appending a line."""
    lines = [step(4, 2.2, 0.1), epoch(1, 0.4, 0.45, 0.47), '{"kind": "step", "epoch": 2, "st']
    return write_run(tmp_path / "pcl-run", lines, epochs=5, status="training", method="pcl")


def table_rows(markdown: str, header_start: str) -> list[list[str]]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_a_finished_run_gets_curves_its_last_epoch_and_the_candidates_against_the_ensemble(tmp_path, finished):
    written = write_report([finished], tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == ["accuracy.png", "candidates.png", "losses.png", "lr.png", "report.html", "report.md"]
    for png in (tmp_path / "out").glob("*.png"):
        assert png.read_bytes().startswith(PNG)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "2/2 epochs recorded; status: finished." in md
    assert table_rows(md, "| model |") == [
        ["student:0", "70.00", "90.00", "70.00", "2"],
        ["**student:1**", "**75.00**", "**95.00**", "**75.00**", "**2**"],
        ["_ensemble_", "_76.00_", "", "_76.00_", "_2_"],
    ]
    assert table_rows(md, "| candidate |") == [
        ["student:0", "70.00", "-6.00", "", "1,000", "2.0", ""],
        ["**student:1**", "**75.00**", "**-1.00**", "", "**1,000**", "**2.0**", "**shipped**"],
        ["soup", "50.00", "-26.00", "10.00", "1,000", "2.0", ""],
        ["_ensemble_", "_76.00_", "_+0.00_", "", "_2,000_", "_4.0_", "_reference_"],
    ]


def test_the_html_page_is_self_contained(tmp_path, finished):
    write_report([finished], tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 4
    assert all(source.startswith("data:image/png;base64,") for source in sources)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in sources}
    assert embedded == {p.read_bytes() for p in (tmp_path / "out").glob("*.png")}
    assert "http" not in page and "<link" not in page  # nothing to fetch
    assert '<tr class="shipped"><td>student:1</td>' in page


def test_a_run_still_training_is_reported_as_far_as_it_got(tmp_path, training):
    run = read_run(training)
    assert (len(run.steps), len(run.epochs), run.skipped_lines, run.selection) == (1, 1, 1, None)
    write_report([training], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "1/5 epochs recorded; status: training; not selected yet" in md
    assert "1 unreadable metrics line(s) skipped" in md
    assert "candidates.png" not in md and not (tmp_path / "out" / "candidates.png").exists()


def test_several_runs_are_overlaid_and_tabled_side_by_side(tmp_path, finished, training):
    written = write_report([finished, training], tmp_path / "out")
    assert "overlay.png" in {p.name for p in written}
    assert "1-dml-run-accuracy.png" in {p.name for p in written} and "2-pcl-run-lr.png" in {p.name for p in written}
    md = (tmp_path / "out" / "report.md").read_text()
    assert table_rows(md, "| run |") == [
        ["dml-run", "dml", "resnet8", "fashion-mnist", "2/2", "75.00", "76.00", "student:1", "75.00", "finished"],
        ["pcl-run", "pcl", "resnet8", "fashion-mnist", "1/5", "45.00", "47.00", "", "", "training"],
    ]


def test_non_finite_and_foreign_lines_are_skipped_not_plotted(tmp_path):
    lines = [step(4, 2.0, 0.1), '{"kind": "step", "epoch": 1, "step": 8, "lr": NaN, "loss": 1.0}\n', "[1, 2]\n"]
    lines += [{"kind": "epoch", "epoch": 1, "val": {"student:0": {"top1": 1e400}}}]  # 1e400 parses as inf
    run = read_run(write_run(tmp_path / "r", lines, status="training"))
    assert [s["step"] for s in run.steps] == [4] and run.epochs == [] and run.skipped_lines == 3


@pytest.mark.parametrize("text", ["", "[]\n", "\x00\xff garbage\n", '{"kind": "step", "step": 4}\n'])
def test_a_finished_run_without_one_readable_epoch_line_is_damaged(tmp_path, text):
    root = write_run(tmp_path / "r", [text])
    with pytest.raises(OkdpipeError, match="the run finished but no epoch line can be read"):
        read_run(root)
    done = okdpipe("report", root, "--out", tmp_path / "out")
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr


def okdpipe(*args):
    return subprocess.run([sys.executable, "-m", "okdpipe", *map(str, args)], capture_output=True, text=True)


def test_cli_writes_the_report_and_refuses_a_folder_that_is_not_a_run(tmp_path, finished):
    done = okdpipe("report", finished, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "report.html" in done.stdout
    (tmp_path / "empty").mkdir()
    bad = okdpipe("report", tmp_path / "empty", "--out", tmp_path / "out2")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
    assert "not a run directory" in bad.stderr
    (finished / "selection.json").write_text("{not json")
    damaged = okdpipe("report", finished, "--out", tmp_path / "out3")
    assert damaged.returncode == 2 and "run `okdpipe select` again" in damaged.stderr


@pytest.mark.parametrize(
    "damage, fragment",
    [
        ({"candidates": [1, "x", None]}, "lacks a name or a val_top1"),
        ({"candidates": [{"candidate": "student:0", "val_top1": "high"}]}, "lacks a name or a val_top1"),
        ({"candidates": [{"candidate": "student:0"}]}, "lacks a name or a val_top1"),
        ({"candidates": []}, "no candidates"),
        ({"ensemble": "x"}, "ensemble 'x' lacks a val_top1"),
    ],
)
def test_a_selection_that_parses_but_is_damaged_is_one_line(tmp_path, damage, fragment):
    run = write_run(tmp_path / "run", [epoch(1, 0.5, 0.6, 0.7)], selection={**SELECTION, **damage})
    with pytest.raises(OkdpipeError, match=f"damaged selection .*{re.escape(fragment)}"):
        read_run(run)


@pytest.mark.parametrize(
    "make, kind",
    [
        (lambda path: path.write_text("x"), "a file"),
        (lambda path: os.mkfifo(path), "a device, pipe or socket"),
    ],
)
def test_an_out_that_is_not_a_folder_is_named_for_what_it_is(tmp_path, finished, make, kind):
    """`--out /dev/null` is a device, not "a file": the message names what the user pointed at."""
    out = tmp_path / "out"
    make(out)
    with pytest.raises(OkdpipeError, match=f"^--out {re.escape(str(out))}: is {kind}; give a folder for the report$"):
        write_report([finished], out)
    with pytest.raises(OkdpipeError, match="--out /dev/null: is a device, pipe or socket; give a folder"):
        write_report([finished], Path("/dev/null"))
