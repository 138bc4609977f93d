"""JSON nested deeper than Python's recursion limit (a few KB of brackets) in any file okdpipe reads back is a
damaged file like any other: one `error:` line, exit 2, never a RecursionError traceback."""

from __future__ import annotations

import shutil

from tests.cli.test_conventions import (  # noqa: F401  (fixtures)
    QUICK,
    artifact,
    assert_usage_error,
    finished_run,
    model_file,
    okdpipe,
)

DEEP = "[" * 50_000 + "]" * 50_000


def test_a_deeply_nested_card_baseline_selection_or_metrics_line_is_one_line(artifact, finished_run, tmp_path):  # noqa: F811
    card = tmp_path / "card"
    shutil.copytree(artifact, card)
    (card / "model.json").write_text(DEEP)
    assert_usage_error(okdpipe("bench", card, *QUICK, "--report", tmp_path / "r.json", "--dry-run"), 2, "model.json")

    (tmp_path / "baseline.json").write_text(DEEP)
    bench = ["bench", artifact, *QUICK, "--report", tmp_path / "r.json", "--baseline", tmp_path / "baseline.json"]
    assert_usage_error(okdpipe(*bench, "--dry-run"), 2, "nested too deeply")

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "selection.json").write_text(DEEP)
    assert_usage_error(okdpipe("report", run, "--out", tmp_path / "report"), 2, "nested too deeply")
    (run / "selection.json").unlink()
    with (run / "metrics.jsonl").open("a") as metrics:
        metrics.write(DEEP + "\n")  # a damaged line is skipped and counted, as any other
    result = okdpipe("report", run, "--out", tmp_path / "report")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
