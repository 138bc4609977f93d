"""`okdpipe bench ARTIFACT...`: the typer command (torch and onnxruntime are imported only when it runs).

Exit codes (the table in okdpipe/errors.py): 0 all gates pass (or none given), 1 a gate failed, 2 bad input or
usage (unparseable gate, unknown metric, missing baseline, bad --batch-sizes, a damaged artifact). Reports are
written before the exit, so CI can upload them whatever the verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from okdpipe.bench.config import BenchConfig
from okdpipe.stage_config import flag, resolve, show

if TYPE_CHECKING:
    from okdpipe.bench.gate import GatePlan


def bench_command(
    artifacts: Annotated[list[Path], typer.Argument(help="Artifact directories (model.json + model.onnx).")],
    dataset: Annotated[Optional[str], flag(BenchConfig, "dataset")] = None,
    data_dir: Annotated[Optional[str], flag(BenchConfig, "data_dir")] = None,
    batch_sizes: Annotated[Optional[str], flag(BenchConfig, "batch_sizes")] = None,
    threads: Annotated[Optional[int], flag(BenchConfig, "threads")] = None,
    provider: Annotated[Optional[str], flag(BenchConfig, "provider")] = None,
    max_samples: Annotated[Optional[int], flag(BenchConfig, "max_samples")] = None,
    pytorch: Annotated[Optional[bool], flag(BenchConfig, "compare_pytorch", "--pytorch/--no-pytorch")] = None,
    ensemble: Annotated[Optional[bool], flag(BenchConfig, "compare_ensemble", "--ensemble/--no-ensemble")] = None,
    warmup: Annotated[Optional[int], flag(BenchConfig, "warmup")] = None,
    min_seconds: Annotated[Optional[float], flag(BenchConfig, "min_seconds")] = None,
    gate: Annotated[Optional[list[str]], flag(BenchConfig, "gates", "--gate")] = None,
    plugin: Annotated[Optional[list[str]], flag(BenchConfig, "plugins", "--plugin")] = None,
    policy: Annotated[Optional[Path], typer.Option(help="YAML list of gates (added to --gate).")] = None,
    baseline: Annotated[Optional[Path], typer.Option(help="An earlier report.json for relative gates.")] = None,
    report: Annotated[Path, typer.Option(help="report.json path; .md and .png are written beside it.")] = Path(
        "report.json"
    ),
    junit: Annotated[Optional[Path], typer.Option(help="Write gate results as JUnit XML here.")] = None,
    config: Annotated[
        Optional[Path],
        typer.Option(help="YAML holding these options (as the pipeline's bench: section); flags override it."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.")] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON on stdout (tables go to stderr).")
    ] = False,
) -> None:
    """Benchmark exported models (latency, throughput, memory, test accuracy) against PyTorch and the
    ensemble, write report.json/.md/.png, and fail (exit 1) when a deployment gate fails."""

    flags = dict(
        dataset=dataset,
        data_dir=data_dir,
        batch_sizes=batch_sizes,
        threads=threads,
        provider=provider,
        max_samples=max_samples,
        compare_pytorch=pytorch,
        compare_ensemble=ensemble,
        warmup=warmup,
        min_seconds=min_seconds,
        gates=gate or None,
        plugins=plugin or None,
    )
    cfg = resolve(BenchConfig, config, flags)
    plan = check_inputs(cfg, artifacts, policy, baseline, report, junit)
    if dry_run:
        show(cfg)
        return
    run(artifacts, cfg, plan, report=report, junit=junit, json_output=json_output)


def check_inputs(
    cfg: BenchConfig,
    artifacts: list[Path],
    policy: Path | None,
    baseline: Path | None,
    report: Path,
    junit: Path | None,
) -> GatePlan:
    """What bench refuses before timing anything (and `--dry-run` too): unreadable cards, gates, the policy file,
    the baseline report, and report paths that cannot be written. Returns the gates, each file read once."""
    from okdpipe.bench.gate import plan_gates
    from okdpipe.bench.report import report_paths
    from okdpipe.contracts.card import read_card
    from okdpipe.errors import OkdpipeError
    from okdpipe.files import check_can_write_file

    seen: dict[object, Path] = {}
    for artifact in artifacts:
        card = read_card(artifact)  # verifies the graph's sha256, so equal hashes are equal graphs
        for key in (artifact.resolve(), tuple(sorted(card.raw["sha256"].items()))):  # one folder twice, or a copy
            first = seen.setdefault(key, artifact)
            if first is not artifact:
                raise OkdpipeError(
                    f"{artifact}: the same model as {first} (the same folder, or a copy with identical bytes), "
                    "given twice; pass each artifact once"
                )
    plan = plan_gates(cfg.gates, policy, baseline, tuple(cfg.batch_sizes))
    for what, path in report_paths(report, junit).items():
        check_can_write_file(path, f"the {what} report")
    return plan


def run(
    artifacts: list[Path], cfg: BenchConfig, plan: GatePlan, *, report: Path, junit: Path | None, json_output: bool
) -> None:
    from okdpipe.bench.report import print_summary, write_reports
    from okdpipe.bench.run import bench
    from okdpipe.console import QUIET, emit_json, say, verbosity

    result = bench(artifacts, cfg, plan)
    paths = write_reports(result, report, junit)
    if json_output:
        emit_json(result.to_dict())
    elif verbosity() > QUIET:
        print_summary(result, result.gates)
        say(" ".join(str(path) for path in paths.values()))
    raise_if_gates_failed(result)


def raise_if_gates_failed(report) -> None:
    """GateFailed (exit 1) naming the first three failures."""
    from okdpipe.bench.gate import failed
    from okdpipe.errors import GateFailed

    bad = failed(report.gates)
    if bad:
        worst = "; ".join(f"{r.artifact}: {r.expression} ({r.detail})" for r in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise GateFailed(f"{len(bad)} of {len(report.gates)} gates failed: {worst}{more}")
