"""benchmarks/quant_study.py's summary (issue 17's INT8 figures), on hand-made records: drops are FP32 minus INT8
in points, spreads are sample standard deviations, latency is the INT8/FP32 ratio of medians, and the ensemble
teacher's QAT gain is paired run by run."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("quant_study", ROOT / "benchmarks" / "quant_study.py")
quant_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quant_study)


def variant(test, val_drop, p50, nodes=0, exported=True):
    if not exported:
        return {"exported": False, "exit_code": 1}
    return {"exported": True, "test_top1": test, "val_drop_points": val_drop, "fp32_nodes": nodes, "p50_ms": p50}


def record(fp32_test, ptq, tuned, ens, labels):
    return {
        "arch": "resnet8",
        "fp32": {"test_top1": fp32_test, "p50_ms": {"1": 2.0}},
        "variants": {"ptq": ptq, "tuned": tuned, "qat-ensemble": ens, "qat-labels": labels},
    }


def test_summary_states_drops_spreads_ratios_and_the_paired_qat_gain():
    records = [
        record(0.80, variant(0.78, 1.5, {"1": 1.0}), variant(0.79, 0.5, {"1": 1.2}, 2), variant(0.79, 0.4, {"1": 1.0}),
               variant(0.77, 2.0, {"1": 1.0})),
        record(0.82, variant(0.81, 0.5, {"1": 1.0}), variant(0.0, 0.0, {}, exported=False),
               variant(0.80, 0.3, {"1": 1.0}), variant(0.81, 0.6, {"1": 1.0})),
    ]  # fmt: skip
    lines = quant_study.summary(records, ["1"]).splitlines()
    assert "## resnet8 (2 runs): FP32 test top-1 81.00 ± 1.41%" in lines
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ") and "---" not in line}
    # ptq: val drop 1.5 and 0.5 -> 1.00 ± 0.71; test 78 and 81 -> 79.50 ± 2.12; drop 2 and 1 -> 1.50 ± 0.71; 0.5x
    assert rows["ptq"] == "| ptq | 2/2 | 1.00 ± 0.71 | 79.50 ± 2.12% | 1.50 ± 0.71 | 0/0 | 0.50x |"
    assert rows["tuned"] == "| tuned | 1/2 | 0.50 | 79.00% | 1.00 | 2 | 0.60x |"  # the failed export is counted out
    # ensemble minus labels: +2 points in run 1, -1 point in run 2 -> 0.50 ± 2.12, higher in 1 of 2
    assert lines[-1] == (
        "QAT with the ensemble teacher minus QAT with labels only, paired by run: 0.50 ± 2.12 points "
        "(higher in 1 of 2)."
    )


def test_a_model_exported_twice_with_the_same_bytes_is_measured_once(tmp_path):
    """The tuned search keeps plain INT8 when it already meets the budget; bench refuses one model given twice."""
    for name, data in (("ptq", b"a"), ("tuned", b"a"), ("qat", b"b")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_bytes(data)
    folders = [str(tmp_path / name) for name in ("ptq", "tuned", "qat")]
    assert [quant_study.first_with_same_model(f, folders) for f in folders] == [folders[0], folders[0], folders[2]]
