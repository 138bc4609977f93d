"""`okdpipe export`: MODEL.pt -> OUT/fp32 (+ OUT/<precision>) artifact directories, or a Triton repository.

Every option is checked (ExportConfig) and the model file verified before OUT is touched. Every artifact is built
in a hidden staging directory inside OUT and published only after all checks pass (finite weights, parity,
accuracy drop), all precisions together, so a failed or interrupted export changes nothing. OUT is locked while an
export writes it; staging directories that a killed export left behind are removed by the next one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from okdpipe import __version__
from okdpipe.contracts.card import PIXEL_SCALE, PRECISIONS, ModelCard, Preprocess, read_card, write_card
from okdpipe.contracts.data import DataSource
from okdpipe.errors import GateFailed, OkdpipeError
from okdpipe.export import onnx_export, qat, quantize, tune
from okdpipe.export.config import ExportConfig
from okdpipe.export.sensitivity import Probe, analyse
from okdpipe.files import check_can_create_folder, file_sha256
from okdpipe.interrupts import surfacing_interrupts
from okdpipe.modelfile import ModelInfo, non_finite_tensors
from okdpipe.ortsession import create_session
from okdpipe.scoring import first_batch, score

ONNX_FILE = "model.onnx"
STAGING_PREFIX = ".export-"
LOCK_FILE = ".export.lock"


@dataclass
class ExportContext:
    """What every variant needs: the network, its description, real data and the fp32 reference numbers."""

    model: Any
    info: ModelInfo
    model_path: Path
    source: DataSource
    train: Any
    val: Any
    preprocess: Preprocess
    parity_inputs: list[np.ndarray]
    config: ExportConfig
    fp32_top1: float | None = None
    spec: Any = None  # the dataset's DatasetSpec (QAT's training loader augments as training did)
    out_dir: Path | None = None  # OUT, where QAT keeps its resumable work folder


def export_model(model_path: str | os.PathLike, out_dir: str | os.PathLike, config: ExportConfig) -> list[ModelCard]:
    """Export, verify and card a model file; returns the cards of the artifacts written (in OUT/<precision>, or
    in the Triton repository's version folders)."""
    from okdpipe.locks import exclusive_lock

    with surfacing_interrupts() as raise_swallowed:  # an error that an interrupt caused is that interrupt
        ctx = export_context(model_path, config)
        created = not Path(out_dir).exists()
        ctx.out_dir = out_dir = writable_dir(Path(out_dir))
        with exclusive_lock(out_dir / LOCK_FILE, f"another export is writing {out_dir}"):
            try:
                remove_stale_staging(out_dir)
                with tempfile.TemporaryDirectory(dir=out_dir, prefix=STAGING_PREFIX) as staging:
                    staged = build_artifacts(ctx, Path(staging))
                    raise_swallowed()  # told to stop while building: publish nothing
                    published = publish(staged, out_dir, ctx, Path(staging))
                qat.remove_work(out_dir)
                return published
            except BaseException:
                if created and not any(out_dir.glob(qat.WORK_PREFIX + "*")):
                    # a failed or interrupted export into a new OUT leaves no folder holding only its lock (a QAT
                    # work folder stays: the same command resumes from it)
                    shutil.rmtree(out_dir, ignore_errors=True)
                raise


def export_context(model_path: str | os.PathLike, config: ExportConfig) -> ExportContext:
    """The verified model file, its data and its parity batches: everything checked before OUT is touched."""
    from okdpipe.distill.models import load_model_file

    model, info = load_model_file(model_path)
    check_finite_weights(model, model_path)
    if config.qat_epochs and config.qat_teacher == "ensemble":
        qat.teacher_run(info, model_path)
    source = recorded_source(info, model_path).with_data_dir(config.data_dir)
    bundle = source.load()
    check_fits_dataset(info, bundle.spec, model_path)
    if len(bundle.val) == 0:
        raise OkdpipeError(
            f"dataset {source.dataset!r} has an empty validation split; export needs one to check "
            "parity and accuracy (record val_split > 0 when training)"
        )
    # The resize policy the training images went through (image folders), so serve resizes the same way.
    preprocess = Preprocess(*info.input_size, info.in_channels, PIXEL_SCALE, info.mean, info.std, bundle.spec.resize)
    first = first_batch(bundle.val, config.parity_batch, preprocess)
    return ExportContext(
        model,
        info,
        Path(model_path),
        source,
        bundle.train,
        bundle.val,
        preprocess,
        onnx_export.parity_batches(first),
        config,
        spec=bundle.spec,
    )


def check_fits_dataset(info: ModelInfo, spec, where: object) -> None:
    """The model file's input and classes must be its dataset's: parity and accuracy run the dataset's images."""
    recorded = (info.in_channels, *info.input_size, info.num_classes)
    actual = (spec.in_channels, *spec.input_size, spec.num_classes)
    if recorded != actual:
        shape = "{}x{}x{} inputs and {} classes"
        raise OkdpipeError(
            f"{where}: the model file says {shape.format(*recorded)}, its dataset {spec.name!r} gives "
            f"{shape.format(*actual)}; create the file again with `okdpipe select RUN_DIR`"
        )


def recorded_source(info: ModelInfo, where: object) -> DataSource:
    """The data the model was selected on, as the model file records it (older files: the dataset alone)."""
    record = info.provenance.get("data")
    return DataSource.from_record(record, where) if record else DataSource.from_record({"dataset": info.dataset}, where)


def check_finite_weights(model, where: object) -> None:
    bad = non_finite_tensors(model.state_dict().items())
    if bad:
        raise GateFailed(
            f"{where}: weight {bad[0]} (and {len(bad) - 1} more) holds NaN or inf; the model "
            "diverged and is not exported: retrain it with a lower --lr"
        )


def writable_dir(out_dir: Path) -> Path:
    """Create OUT and prove it is writable before spending minutes on export."""
    check_out_dir(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as exc:
        raise OkdpipeError(
            f"--out {out_dir}: cannot write there ({exc.strerror or exc}); choose another directory"
        ) from None
    return out_dir


def check_out_dir(out_dir: Path) -> None:
    """OUT must be a folder, or a path where one can be made, and each precision folder in it a real folder
    (publishing replaces it; a file, pipe or link there is not an export to replace); nothing is created."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OkdpipeError(f"--out {out_dir} is a file; pass a directory (it is created if missing)")
    check_can_create_folder(out_dir, "--out")
    lock = out_dir / LOCK_FILE
    if lock.is_symlink() or lock.exists() and not lock.is_file():
        raise OkdpipeError(f"--out {out_dir}: {lock} is not the export's lock file (a link, folder or pipe); remove it")
    for precision in PRECISIONS:
        place = out_dir / precision
        if place.is_symlink() or place.exists() and not place.is_dir():
            raise OkdpipeError(
                f"--out {out_dir}: {place} is not a folder of an earlier export (a file, link or pipe); "
                "remove it or choose another --out"
            )


def check_inputs(model_path: str | os.PathLike, out_dir: str | os.PathLike, config: ExportConfig) -> None:
    """What export refuses before its first minute of work, in the order it does (`--dry-run` runs this): the
    model file, its data and the QAT teacher (export_context), then OUT."""
    export_context(model_path, config)
    check_out_dir(Path(out_dir))


def remove_stale_staging(out_dir: Path) -> None:
    """Staging folders of an export that was killed (we hold OUT's lock, so none is in use)."""
    for stale in out_dir.glob(STAGING_PREFIX + "*"):
        if stale.is_dir() and stale.name != LOCK_FILE:
            shutil.rmtree(stale, ignore_errors=True)


def build_artifacts(ctx: ExportContext, staging: Path) -> dict[str, ModelCard]:
    """Build fp32 and the requested variant under `staging`; every check runs before anything is published."""
    fp32_dir = staging / "fp32"
    staged = {"fp32": build_fp32(ctx, fp32_dir)}
    if ctx.config.quantize != "none":
        precision = ctx.config.quantize
        staged[precision] = build_variant(ctx, fp32_dir / ONNX_FILE, staging / precision, precision)
    return staged


def build_fp32(ctx: ExportContext, directory: Path) -> ModelCard:
    directory.mkdir(parents=True)
    onnx_path = directory / ONNX_FILE
    opset = onnx_export.export_onnx(
        ctx.model, (ctx.info.in_channels, *ctx.info.input_size), onnx_path, ctx.config.opset
    )
    predict = ort_predict(onnx_path)
    parity = onnx_export.parity_report(
        torch_predict(ctx.model), predict, ctx.parity_inputs, onnx_export.FP32_TOLERANCE, "pytorch-fp32"
    )
    result = score(predict, ctx.val, ctx.preprocess, what=f"{ctx.model_path} exported to fp32 ONNX")
    ctx.fp32_top1 = result.top1
    accuracy = {
        "val_top1": result.top1,
        "val_samples": result.samples,
        "fp32_val_top1": result.top1,
        "drop_points": 0.0,
    }
    return write_card(directory, card_fields(ctx, "fp32", opset, parity, None, accuracy))


def build_variant(ctx: ExportContext, fp32_path: Path, directory: Path, precision: str) -> ModelCard:
    """A quantized variant, its parity against the PyTorch model it must match (the fake-quantized network for
    QAT, else the fp32 model: reported only for int8, whose gate is the accuracy drop) and its accuracy."""
    directory.mkdir(parents=True)
    onnx_path = directory / ONNX_FILE
    reference, reference_name = ctx.model, "pytorch-fp32"
    tolerance = onnx_export.FP16_TOLERANCE if precision == "fp16" else None
    if precision == "int8" and ctx.config.qat_epochs:
        trained = qat.quantization_aware_int8(ctx, onnx_path)
        quantization, reference, reference_name, tolerance = (
            trained.record,
            trained.network,
            "pytorch-fake-quant",
            qat.QAT_TOLERANCE,
        )
    elif precision == "int8":
        quantization = build_int8(ctx, fp32_path, onnx_path)
    else:
        quantization = convert(ctx, fp32_path, onnx_path, precision)
    predict = ort_predict(onnx_path)
    parity = onnx_export.parity_report(torch_predict(reference), predict, ctx.parity_inputs, tolerance, reference_name)
    accuracy = accuracy_with_drop(ctx, predict, precision)
    if quantization.get("method") == "qat":  # the whole QAT story in one section: what it reached, as shipped
        quantization["outcome"] = {"val_top1": accuracy["val_top1"], "drop_points": accuracy["drop_points"], **parity}
    opset = onnx_export.graph_opset(_load_graph(onnx_path))
    return write_card(directory, card_fields(ctx, precision, opset, parity, quantization, accuracy))


def convert(ctx: ExportContext, fp32_path: Path, onnx_path: Path, precision: str) -> dict:
    if precision == "fp16":
        return quantize.convert_fp16(fp32_path, onnx_path)
    return quantize.quantize_int8_dynamic(fp32_path, onnx_path, quantize.int8_settings(quantize.cpu_features()))


def calibration_reader(ctx: ExportContext) -> quantize.BatchReader:
    return quantize.calibration_reader(ctx.train, ctx.preprocess, ctx.config.calib_size, onnx_export.INPUT_NAME)


def build_int8(ctx: ExportContext, fp32_path: Path, onnx_path: Path) -> dict:
    """Plain static INT8 and, when it misses --max-accuracy-drop, the accuracy-aware search (export/tune.py)
    within --tune-budget; the card records the recipe shipped, the nodes kept in FP32, every trial and the
    per-node sensitivity ranking. GateFailed when nothing within the budget meets the limit."""
    settings = quantize.int8_settings(quantize.cpu_features())
    budget = tune.TuneBudget.parse(ctx.config.tune_budget)
    with tempfile.TemporaryDirectory(dir=onnx_path.parent.parent, prefix=".tune-") as work:
        # one calibration pass per calibration setting, shared by the plain model, the analysis and the trials
        workbench = quantize.Int8Workbench(fp32_path, Path(work), lambda: calibration_reader(ctx), settings)
        plain_recipe = quantize.Recipe(ctx.config.calib_method, per_channel=settings["per_channel"])
        started = time.monotonic()
        workbench.quantize(plain_recipe, onnx_path)
        plain = int8_trial(ctx, onnx_path, plain_recipe, started)
        probe = Probe.from_split(ctx.val, ctx.preprocess, ctx.config.sensitivity_samples, ort_predict(fp32_path))
        if plain.meets or budget.off:
            outcome = tune.Outcome(plain if plain.meets else None, [plain], None, "plain int8", budget)
        else:
            evaluate = lambda path: val_top1(ctx, path, "an int8 tuning trial")  # noqa: E731
            outcome = tune.Int8Tuner(
                workbench, ort_predict, evaluate, ctx.fp32_top1, ctx.config.max_accuracy_drop, budget, probe
            ).run(plain)
        if outcome.chosen is None:
            raise GateFailed(missed_limit(ctx, outcome))
        if outcome.chosen is not plain:
            shutil.copyfile(outcome.chosen.path, onnx_path)
        sensitivity = outcome.sensitivity or analyse(workbench, outcome.chosen.recipe, probe, ort_predict, Path(work))
        record = workbench.record(outcome.chosen.recipe)
    return {**record, "sensitivity": sensitivity, "tuning": outcome.record()}


def int8_trial(ctx: ExportContext, onnx_path: Path, recipe: quantize.Recipe, started: float) -> tune.Trial:
    """The plain INT8 model as trial 0 of the search (a failed trial when its logits are not finite)."""
    try:
        top1 = val_top1(ctx, onnx_path, f"the int8 export of {ctx.model_path}")
    except GateFailed as failed:
        return tune.Trial(0, "plain", recipe, None, None, False, time.monotonic() - started, onnx_path, str(failed))
    drop = (ctx.fp32_top1 - top1) * 100.0
    meets = drop <= ctx.config.max_accuracy_drop
    return tune.Trial(0, "plain", recipe, top1, drop, meets, time.monotonic() - started, onnx_path)


def val_top1(ctx: ExportContext, onnx_path: Path, what: str) -> float:
    return score(ort_predict(onnx_path), ctx.val, ctx.preprocess, what=what).top1


def missed_limit(ctx: ExportContext, outcome: tune.Outcome) -> str:
    """One line: how close the best trial came, what the search tried and what to change."""
    limit = ctx.config.max_accuracy_drop
    scored = [t for t in outcome.trials if t.drop_points is not None]
    if not scored:
        return f"int8 gives non-finite logits in every trial ({outcome.trials[0].failure}); the export is refused"
    best = min(scored, key=lambda t: (t.drop_points, t.number))
    loss = (
        f"int8 loses {best.drop_points:.2f} points of validation top-1 ({ctx.fp32_top1:.4f} -> {best.val_top1:.4f}), "
        f"over --max-accuracy-drop {limit:g}"
    )
    if outcome.budget.off:
        return f"{loss}; allow an accuracy-aware search with --tune-budget 30 (trials) or 300s, or raise the limit"
    return (
        f"{loss}, at best in {len(outcome.trials)} trials ({best.recipe.label()}; {outcome.stopped}); "
        "raise --tune-budget or --max-accuracy-drop"
    )


def accuracy_with_drop(ctx: ExportContext, predict, precision: str) -> dict:
    """Validation top-1 of the variant and its drop vs fp32, in percentage points; GateFailed over the limit."""
    result = score(predict, ctx.val, ctx.preprocess, what=f"the {precision} export of {ctx.model_path}")
    drop = (ctx.fp32_top1 - result.top1) * 100.0
    if not drop <= ctx.config.max_accuracy_drop:
        raise GateFailed(
            f"{precision} loses {drop:.2f} points of validation top-1 ({ctx.fp32_top1:.4f} -> {result.top1:.4f}), "
            f"over --max-accuracy-drop {ctx.config.max_accuracy_drop:g}; {retry_hint(ctx, precision)}"
        )
    return {"val_top1": result.top1, "val_samples": result.samples, "fp32_val_top1": ctx.fp32_top1, "drop_points": drop}


def retry_hint(ctx: ExportContext, precision: str) -> str:
    if precision == "int8" and ctx.config.qat_epochs:
        return "try more --qat-epochs, another --qat-lr, or raise the limit"
    return "try --calib-method entropy/percentile, a larger --calib-size, or raise the limit"


def torch_predict(model) -> Callable[[np.ndarray], np.ndarray]:
    return lambda batch: onnx_export.torch_logits(model, batch)


def ort_predict(onnx_path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """A session built exactly as `okdpipe serve` builds it, so the checks verify what is served."""
    session, _ = create_session(onnx_path)
    return lambda batch: onnx_export.run_session(session, batch)


def _load_graph(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def card_fields(
    ctx: ExportContext, precision: str, opset: int, parity: dict, quantization: dict | None, accuracy: dict
) -> dict:
    info = ctx.info
    height, width = (int(s) for s in info.input_size)
    return {
        "name": model_name(info, precision),
        "file": ONNX_FILE,
        "precision": precision,
        "input": {
            "name": onnx_export.INPUT_NAME,
            "shape": [None, info.in_channels, height, width],
            "dtype": "float32",
            "layout": "NCHW",
        },
        "output": {"name": onnx_export.OUTPUT_NAME, "shape": [None, info.num_classes], "dtype": "float32"},
        "preprocess": ctx.preprocess.as_dict(),
        "labels": list(info.labels),
        "dataset": ctx.source.dataset,
        "opset": opset,
        "parity": parity,
        "quantization": quantization,
        "accuracy": accuracy,
        "runtime": runtime_versions(),
        "provenance": provenance(ctx),
    }


def model_name(info: ModelInfo, precision: str = "fp32") -> str:
    """`resnet20-fashion-mnist`, `resnet20-fashion-mnist-int8`: unique when several variants are served
    (`timm:resnet10t` becomes `timm-resnet10t`: a name that sits in URLs and Triton folder names)."""
    parts = [info.arch.replace(":", "-"), info.dataset] + ([] if precision == "fp32" else [precision])
    return "-".join(part for part in parts if part)


def runtime_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "okdpipe": __version__,
    }


def provenance(ctx: ExportContext) -> dict:
    recorded = ctx.info.provenance
    return {
        "model_file": str(ctx.model_path.resolve()),
        "model_sha256": file_sha256(ctx.model_path),
        "run_dir": recorded.get("run_dir"),
        "candidate": recorded.get("candidate"),
        "method": recorded.get("method"),
        "data": ctx.source.as_record(),
    }


def publish(staged: dict[str, ModelCard], out_dir: Path, ctx: ExportContext, staging: Path) -> list[ModelCard]:
    """Move the verified artifacts into OUT together (or lay out a Triton repository), replacing earlier exports:
    the old ones are first moved aside into the staging folder, so that a failure or an interrupt (Ctrl-C,
    SIGTERM) between renames can be undone: OUT then holds the earlier export exactly. Every earlier precision
    folder goes, not only those exported now: an old model's int8 beside this model's fp32 would ship two models
    as one export."""
    if ctx.config.format == "triton":
        return publish_triton(staged, out_dir, ctx)
    aside = staging / ".replaced"
    aside.mkdir()
    moves: list[tuple[Path, Path]] = []
    try:
        for precision in sorted(set(staged) | set(PRECISIONS)):
            if (out_dir / precision).exists():
                move(out_dir / precision, aside / precision, moves)
        for precision, card in staged.items():
            move(card.directory, out_dir / precision, moves)
    except BaseException as exc:  # an interrupt too: the staging folder, removed next, holds the old artifacts
        undo(moves)
        if isinstance(exc, OSError):
            raise OkdpipeError(
                f"--out {out_dir}: could not publish the export ({exc.strerror or exc}); the earlier artifacts are kept"
            ) from None
        raise
    return [read_card(out_dir / precision) for precision in staged]


def move(source: Path, target: Path, moves: list[tuple[Path, Path]]) -> None:
    """Rename a folder, recorded BEFORE it happens: an interrupt raised just after the rename, before any
    bookkeeping after it, must still be undone."""
    moves.append((source, target))
    os.replace(source, target)


def undo(moves: list[tuple[Path, Path]]) -> None:
    """Reverse the renames that happened, last first (new folders back into staging, then the old ones back into
    OUT); a recorded rename that never ran is recognised by its source still being in place."""
    for source, target in reversed(moves):
        if target.exists() and not source.exists():
            os.replace(target, source)


def publish_triton(staged: dict[str, ModelCard], out_dir: Path, ctx: ExportContext) -> list[ModelCard]:
    from okdpipe.export.triton import write_triton_model

    written = []
    for card in staged.values():
        shutil.rmtree(out_dir / card.name, ignore_errors=True)
        model_dir = write_triton_model(
            out_dir, card.name, card.directory, card.raw, ctx.config.triton_max_batch_size, ctx.config.triton_instance
        )
        written.append(read_card(model_dir / "1"))
    return written
