"""Bench's report shows each INT8 artifact's per-node sensitivity ranking (from its model card) as a table."""

from __future__ import annotations

from types import SimpleNamespace

from okdpipe.bench.report import markdown, print_summary
from okdpipe.bench.run import sensitivity_rows
from okdpipe.contracts.report import BenchReport, Entry

MACHINE = {
    "cpu_model": "test cpu",
    "logical_cpus": 2,
    "cpu_features": {"avx2": True},
    "provider": "CPUExecutionProvider",
    "threads": 1,
    "peak_gflops": {"gflops": 10.0, "method": "test"},
}


def ranking(count: int) -> list[dict]:
    """Nodes n1..nN, error 1/rank; n1's logits were non-finite when it alone was quantized."""
    rows = [
        {"rank": r, "node": f"n{r}", "op_type": "Conv", "error": 1.0 / r, "top1_drop_points": 10.0 / r}
        for r in range(1, count + 1)
    ]
    rows[0].update(error=None, top1_drop_points=None)
    return rows


def card_with(nodes: list[dict], kept: list[str]):
    return SimpleNamespace(raw={"quantization": {"fp32_nodes": kept, "sensitivity": {"nodes": nodes}}})


def test_the_cards_ranking_is_carried_with_fp32_nodes_marked():
    rows = sensitivity_rows(card_with(ranking(3), ["n2"]))
    assert [(r["node"], r["fp32"]) for r in rows] == [("n1", False), ("n2", True), ("n3", False)]
    assert sensitivity_rows(SimpleNamespace(raw={"quantization": None})) == []
    assert sensitivity_rows(SimpleNamespace(raw={})) == []


def report_with(entry: Entry) -> BenchReport:
    return BenchReport("2026-01-01T00:00:00Z", {}, MACHINE, {"onnxruntime": "x", "torch": "y"}, [entry])


def test_markdown_ranks_the_top_ten_and_points_to_the_card():
    rows = sensitivity_rows(card_with(ranking(12), ["n1", "n3"]))
    entry = Entry("m-int8", "onnx", "int8", "out/int8", "synthetic", sensitivity=rows)
    text = markdown(report_with(entry), [])
    title = (
        "### INT8 sensitivity of m-int8 (most sensitive first; 2 node(s) kept in FP32; 2 more nodes in its model card)"
    )
    assert title in text
    table = text.split(title, 1)[1].strip().splitlines()
    assert table[0] == "| rank | node | op type | error | top-1 drop (points) | kept in FP32 |"
    assert table[2] == "| 1 | n1 | Conv | non-finite | - | yes |"
    assert table[3] == "| 2 | n2 | Conv | 0.5 | 5.00 |  |"
    assert table[4] == "| 3 | n3 | Conv | 0.3333 | 3.33 | yes |"
    assert len([line for line in table if line.startswith("| ")]) == 1 + 10  # header + the ten most sensitive


def test_no_table_without_a_ranking_and_the_report_round_trips():
    plain = Entry("m-fp32", "onnx", "fp32", "out/fp32", "synthetic")
    assert "INT8 sensitivity" not in markdown(report_with(plain), [])
    ranked = Entry("m-int8", "onnx", "int8", "out/int8", "synthetic", sensitivity=ranking(2))
    again = BenchReport.from_dict(report_with(ranked).to_dict(), "report.json")
    assert again.artifacts[0].sensitivity == ranking(2)


def test_the_terminal_summary_prints_the_table():
    from rich.console import Console

    console = Console(record=True, width=200)
    rows = sensitivity_rows(card_with(ranking(2), ["n2"]))
    print_summary(report_with(Entry("m-int8", "onnx", "int8", "out/int8", "synthetic", sensitivity=rows)), [], console)
    text = console.export_text()
    assert "INT8 sensitivity of m-int8" in text and "n2" in text
