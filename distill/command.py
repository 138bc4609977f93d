"""`okdpipe distill`: flags compile into the same DistillConfig a YAML file holds."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

DEVICE_HELP = "auto = CUDA when visible, else CPU."


def distill_command(
    method: Optional[str] = typer.Option(None, help="vanilla, dml, one, pcl, ffsd, okdph, mbde."),
    arch: Optional[str] = typer.Option(None, help="Backbone name, e.g. resnet20 (see the README)."),
    students: Optional[int] = typer.Option(None, help="Number of peer students (default: the method's)."),
    dataset: Optional[str] = typer.Option(None, help="fashion-mnist, cifar10, cifar100, cinic10, imagefolder."),
    data_dir: Optional[str] = typer.Option(None, help="Where the dataset's files are."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs."),
    batch_size: Optional[int] = typer.Option(None, help="Images per step."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    val_split: Optional[float] = typer.Option(None, help="Fraction of train held out for validation."),
    train_subset: Optional[int] = typer.Option(None, help="Images per class kept for training."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 on GPU), fp32 or bf16."),
    seed: Optional[int] = typer.Option(None, help="Seed for initialisation, split, order and augmentation."),
    fused: Optional[bool] = typer.Option(None, "--fused/--no-fused",
                                         help="Run same-architecture peers as one grouped network (vanilla, "
                                              "DML; faster on GPU only)."),
    nproc_per_node: Optional[int] = typer.Option(None, help="Data-parallel processes on this machine (one GPU "
                                                            "each on CUDA); --batch-size is the global batch. "
                                                            "Or launch with torchrun --nproc-per-node N."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/METHOD-ARCH-DATASET-sSEED)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    config: Optional[Path] = typer.Option(None, help="YAML config; flags override it."),
    set_: list[str] = typer.Option([], "--set", help="Override any key, e.g. --set okdph.gamma=0.5."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and exit."),
) -> None:
    """Train students together by online distillation (or vanilla) and record the run directory."""
    from okdpipe.config import build_config, dump_yaml, read_yaml

    flags = dict(method=method, arch=arch, students=students, dataset=dataset, data_dir=data_dir,
                 epochs=epochs, batch_size=batch_size, lr=lr, val_split=val_split, train_subset=train_subset,
                 device=device, precision=precision, seed=seed, fused=fused, nproc_per_node=nproc_per_node)
    file_values = read_yaml(config) if config else {}
    if resume and not config and out and (out / "config.yaml").is_file():
        file_values = read_yaml(out / "config.yaml")
    cfg = build_config(file_values, flags, set_)
    if dry_run:
        typer.echo(dump_yaml(cfg), nl=False)
        return
    run_dir = out or Path("runs") / f"{cfg.method}-{cfg.arch}-{cfg.dataset}-s{cfg.seed}"
    run(cfg, run_dir, resume)


def run(cfg, run_dir: Path, resume: bool) -> None:
    """Train and report. Under torchrun every process runs this; only rank 0 speaks (its errors included)."""
    from okdpipe.distill.distributed import is_main_process, launched_world_size
    from okdpipe.distill.methods import METHODS  # noqa: F401  (registers every method)
    from okdpipe.distill.trainer import fit
    from okdpipe.errors import OkdpipeError
    from okdpipe.run import RunDir

    if not is_main_process():
        try:
            fit(cfg, RunDir(run_dir), resume=resume, echo=typer.echo)
        except OkdpipeError:
            raise typer.Exit(1) from None  # rank 0 reports the same error
        return
    world_size = launched_world_size() or cfg.nproc_per_node
    processes = f" on {world_size} processes" if world_size > 1 else ""
    typer.echo(f"{'resuming' if resume else 'training'} {cfg.method} x {cfg.arch} on {cfg.dataset}{processes} "
               f"-> {run_dir}")
    result = fit(cfg, RunDir(run_dir), resume=resume, echo=typer.echo)
    best = max((v["top1"], k) for k, v in result["val"].items() if k.startswith("student:"))
    typer.echo(f"done: best student on validation {best[1]} {best[0]:.2%}; "
               f"test (measured once, not used for choices): "
               f"{result['test'][best[1]]['top1']:.2%}; ensemble {result['test']['ensemble']['top1']:.2%}")
    typer.echo(f"next: okdpipe select {run_dir}")


def select_command(
    run_dir: Path = typer.Argument(..., help="A finished distill run directory."),
    strategy: str = typer.Option("auto", help="auto, best, leader, mean-teacher, hybrid, soup, student:N, "
                                              "or any candidate name."),
    out: Optional[Path] = typer.Option(None, help="Where to write the model (default RUN_DIR/model.pt)."),
    bn_batches: int = typer.Option(50, min=1, help="Training batches used to recompute BatchNorm statistics "
                                                   "of weight-averaged candidates."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Score every candidate on the validation split, pick the model to ship, write a self-describing MODEL.pt."""
    from rich.console import Console
    from rich.table import Table

    from okdpipe.distill.methods import METHODS  # noqa: F401  (registers every method)
    from okdpipe.distill.select import select

    rows, ensemble, chosen, path = select(run_dir, strategy, out, bn_batches, device)
    table = Table(title=f"candidates of {run_dir} (validation split)")
    for column in ("candidate", "val top-1", "no BN recal.", "params", "MMACs", ""):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for row in [*rows, ensemble]:
        recal = row.get("val_top1_without_bn_recalibration")
        table.add_row(row["candidate"], f"{row['val_top1']:.2%}", "" if recal is None else f"{recal:.2%}",
                      f"{row['params']:,}", f"{row['macs'] / 1e6:.1f}",
                      "chosen" if row.get("chosen") else ("reference" if row.get("reference") else ""))
    Console().print(table)
    typer.echo(f"chose {chosen.name} (val top-1 {chosen.top1:.2%}) -> {path}")
    typer.echo(f"next: okdpipe export {path} --format onnx --out {path.parent / 'export'}")
