"""`okdpipe bench ARTIFACT...`: the typer command (torch and onnxruntime are imported only when it runs).

Exit codes: 0 all gates pass (or none given), 1 a gate failed or a user-fixable problem, 2 bad usage
(unparseable gate, unknown metric, missing baseline, bad --batch-sizes). Reports are written before the exit,
so CI can upload them whatever the verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Literal, Optional

import typer


def _batch_sizes(text: str) -> str:
    from okdpipe.export.bench import parse_batch_sizes

    try:
        parse_batch_sizes(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return text


def bench_command(
    artifacts: Annotated[List[Path], typer.Argument(help="Artifact directories (model.json + model.onnx).")],
    dataset: Annotated[Optional[str], typer.Option(help="Dataset for accuracy; default: the card's.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Dataset directory; default: the model file's record.")] = None,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.", callback=_batch_sizes)] = "1,8,64",
    threads: Annotated[Optional[int], typer.Option(min=1, help="Intra-op threads (ORT and torch); default: runtime's.")] = None,
    provider: Annotated[Literal["cpu", "cuda"], typer.Option(help="ONNX Runtime execution provider.")] = "cpu",
    report: Annotated[Path, typer.Option(help="report.json path; .md and .png are written beside it.")] = Path("report.json"),
    gate: Annotated[Optional[List[str]], typer.Option(help="Gate such as 'top1>=0.90', 'p99_ms@1<=baseline*1.1'; repeatable.")] = None,
    policy: Annotated[Optional[Path], typer.Option(help="YAML list of gates.")] = None,
    baseline: Annotated[Optional[Path], typer.Option(help="An earlier report.json for relative gates.")] = None,
    junit: Annotated[Optional[Path], typer.Option(help="Write gate results as JUnit XML here.")] = None,
    max_samples: Annotated[Optional[int], typer.Option(min=1, help="Use at most this many test images.")] = None,
    no_ensemble: Annotated[bool, typer.Option("--no-ensemble", help="Skip the peer-ensemble reference.")] = False,
    no_pytorch: Annotated[bool, typer.Option("--no-pytorch", help="Skip the PyTorch eager reference.")] = False,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed runs before timing each batch size.")] = 10,
    min_seconds: Annotated[float, typer.Option(min=0.0, help="Time each batch size at least this long.")] = 1.0,
) -> None:
    """Benchmark exported models (latency, throughput, memory, test accuracy) against PyTorch and the
    ensemble, write report.json/.md/.png, and fail (exit 1) when a deployment gate fails."""
    from okdpipe.errors import OkdpipeError
    from okdpipe.export.bench import BenchOptions, parse_batch_sizes, run_bench
    from okdpipe.export.gate import evaluate_gates, failed, load_baseline, validate_gates
    from okdpipe.export.report import print_summary, write_reports

    options = BenchOptions(
        batch_sizes=parse_batch_sizes(batch_sizes), threads=threads, provider=provider, dataset=dataset,
        data_dir=None if data_dir is None else str(data_dir), max_samples=max_samples,
        compare_pytorch=not no_pytorch, compare_ensemble=not no_ensemble, warmup=warmup, min_seconds=min_seconds,
    )
    gates = list(gate or [])
    previous = load_baseline(baseline)
    validate_gates(gates, policy, previous, options.batch_sizes)  # usage errors before minutes of timing
    result = run_bench(artifacts, options)
    results = evaluate_gates(result, gates, policy, previous)
    paths = write_reports(result, results, report, junit=junit)
    print_summary(result, results)
    typer.echo(" ".join(str(path) for path in paths.values()))
    bad = failed(results)
    if bad:
        worst = "; ".join(f"{r.artifact}: {r.expression} ({r.detail})" for r in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise OkdpipeError(f"{len(bad)} of {len(results)} gates failed: {worst}{more}")
