"""`okdpipe distill`: flags compile into the same DistillConfig a YAML file holds."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

DEVICE_HELP = "auto = CUDA when visible, else CPU."


def complete(registry: str, incomplete: str) -> list[str]:
    """Shell completion: the registered method, backbone or dataset names that start with what was typed
    (installed plug-ins' included)."""
    from okdpipe.plugins import load_installed

    load_installed()
    if registry == "datasets":
        from okdpipe.datasets import DATASETS as names
    elif registry == "methods":
        from okdpipe.distill.methods import METHODS as names
    else:
        from okdpipe.distill.models import MODELS as names
    return [name for name in names.names() if name.startswith(incomplete)]


def distill_command(
    method: Optional[str] = typer.Option(
        None,
        help="vanilla, dml, one, pcl, ffsd, okdph, mbde.",
        autocompletion=lambda incomplete: complete("methods", incomplete),
    ),
    arch: Optional[str] = typer.Option(
        None,
        help="Backbone name, e.g. resnet20 (see the README), or timm:NAME / torchvision:NAME; one for every "
        "student, or one per student: resnet8,mobilenetv2 (dml and vanilla only).",
        autocompletion=lambda incomplete: complete("models", incomplete),
    ),
    students: Optional[int] = typer.Option(None, help="Number of peer students (default: the method's)."),
    dataset: Optional[str] = typer.Option(
        None,
        help="fashion-mnist, cifar10, cifar100, cinic10, imagefolder.",
        autocompletion=lambda incomplete: complete("datasets", incomplete),
    ),
    data_dir: Optional[str] = typer.Option(None, help="Where the dataset's files are."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs."),
    batch_size: Optional[int] = typer.Option(None, help="Images per step."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    val_split: Optional[float] = typer.Option(None, help="Fraction of train held out for validation."),
    train_subset: Optional[int] = typer.Option(None, help="Images per class kept for training."),
    skip_bad_images: bool = typer.Option(
        False,
        "--skip-bad-images",
        help="Image folders: leave out unreadable or truncated files (listed) instead of refusing them.",
    ),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 on GPU), fp32 or bf16."),
    seed: Optional[int] = typer.Option(None, help="Seed for initialisation, split, order and augmentation."),
    fused: Optional[bool] = typer.Option(
        None,
        "--fused/--no-fused",
        help="Run same-architecture peers as one grouped network (vanilla, DML, OKDPH; faster on GPU only).",
    ),
    nproc_per_node: Optional[int] = typer.Option(
        None,
        help="Data-parallel processes on this machine (one GPU "
        "each on CUDA); --batch-size is the global batch. "
        "Or launch with torchrun --nproc-per-node N.",
    ),
    logger: list[str] = typer.Option(
        [],
        "--logger",
        help="Experiment tracker beside metrics.jsonl: tensorboard or mlflow (repeatable; pip install "
        "'okdpipe\\[tracking]').",
    ),
    mlflow_uri: Optional[str] = typer.Option(
        None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else a file store ./mlruns)."
    ),
    init: Optional[str] = typer.Option(
        None,
        help="Start the students from this local weights file: a state dict, an okdpipe MODEL.pt, or a timm or "
        "torchvision checkpoint (.pth, .safetensors). A classifier of another class count is re-initialised.",
    ),
    init_partial: bool = typer.Option(
        False,
        "--init-partial",
        help="Load an --init file that matches only part of the students (the rest stays random); without it "
        "such a file is refused.",
    ),
    plugin: list[str] = typer.Option(
        [],
        "--plugin",
        help="Import this module (or .py file) first: it registers backbones, datasets or methods. Repeatable; "
        "adds to the config's plugins.",
    ),
    out: Optional[Path] = typer.Option(
        None, help="Run directory (default runs/METHOD-ARCH-DATASET-sSEED; ARCH a+b for one per student)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    config: Optional[Path] = typer.Option(None, help="YAML config; flags override it."),
    set_: list[str] = typer.Option([], "--set", help="Override any key, e.g. --set okdph.gamma=0.5."),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Check what the run checks before its first step (config, device, data, memory, --init, the run "
        "folder), print the resolved config and exit; writes nothing.",
    ),
) -> None:
    """Train students together by online distillation (or vanilla) and record the run directory.

    Exit code: 0 trained; 1 training diverged (a NaN/inf loss or weight; the last good checkpoint is kept);
    2 bad input (flags, config, data, a damaged or busy run directory, an output that cannot be written)."""
    from okdpipe.config import build_config, dump_yaml, read_yaml

    flags = dict(
        method=method,
        arch=arch,
        students=students,
        dataset=dataset,
        data_dir=data_dir,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        val_split=val_split,
        train_subset=train_subset,
        device=device,
        precision=precision,
        seed=seed,
        fused=fused,
        nproc_per_node=nproc_per_node,
        loggers=logger or None,
        mlflow_uri=mlflow_uri,
        init=init,
        init_partial=init_partial or None,
    )
    file_values = read_yaml(config) if config else {}
    if resume and not config and out and (out / "config.yaml").is_file():
        file_values = read_yaml(out / "config.yaml")
    if plugin:
        listed = file_values.get("plugins") or []
        flags["plugins"] = [*listed, *plugin] if isinstance(listed, list) else plugin
    cfg = build_config(file_values, flags, set_)
    if skip_bad_images:  # a loader option, so select/export/bench rebuild the same splits from the record
        cfg.data_options = {**cfg.data_options, "skip_bad_images": True}
    if cfg.init and not resume:
        from okdpipe.distill.init_weights import check_weights_file

        check_weights_file(cfg.init)
    archs = cfg.arch.replace(":", "-").replace(",", "+")  # one per student: resnet8+mobilenetv2
    run_dir = out or Path("runs") / f"{cfg.method}-{archs}-{cfg.dataset}-s{cfg.seed}"
    if dry_run:
        from okdpipe.distill.trainer import preflight
        from okdpipe.run import RunDir

        # everything the real run checks before its first step (data, memory, --init, the run folder); no writes
        typer.echo(dump_yaml(preflight(cfg, RunDir(run_dir), resume)), nl=False)
        return
    run(cfg, run_dir, resume)


def run(cfg, run_dir: Path, resume: bool) -> None:
    """Train and report. Under torchrun every process runs this; only rank 0 speaks (its errors included)."""
    from okdpipe.console import say
    from okdpipe.distill.distributed import is_main_process, launched_world_size
    from okdpipe.distill.methods import METHODS  # noqa: F401  (registers every method)
    from okdpipe.distill.trainer import check_before_announcing, fit
    from okdpipe.errors import OkdpipeError
    from okdpipe.run import RunDir

    if not is_main_process():
        try:
            fit(cfg, RunDir(run_dir), resume=resume, echo=say)
        except OkdpipeError as exc:
            raise typer.Exit(exc.exit_code) from None  # rank 0 reports the same error
        return
    check_before_announcing(cfg, RunDir(run_dir), resume)  # a refused start never says "resuming" first
    world_size = launched_world_size() or cfg.nproc_per_node
    processes = f" on {world_size} processes" if world_size > 1 else ""
    say(f"{'resuming' if resume else 'training'} {cfg.method} x {cfg.arch} on {cfg.dataset}{processes} -> {run_dir}")
    result = fit(cfg, RunDir(run_dir), resume=resume, echo=say)
    best = max((v["top1"], k) for k, v in result["val"].items() if k.startswith("student:"))
    test = result["test"]
    measured = (
        f"test (measured once, not used for choices): {test[best[1]]['top1']:.2%}; "
        f"ensemble {test['ensemble']['top1']:.2%}"
        if test
        else "no test split, so no test metrics"
    )
    say(f"done: best student on validation {best[1]} {best[0]:.2%}; {measured}")
    say(f"next: okdpipe select {run_dir}")
