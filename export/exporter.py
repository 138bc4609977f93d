"""`okdpipe export`: MODEL.pt -> OUT/fp32 (+ OUT/<precision>) artifact directories, or a Triton repository.

Every option is checked (ExportConfig) and the model file verified before OUT is touched. Every artifact is built
in a hidden staging directory inside OUT and published only after all checks pass (finite weights, parity,
accuracy drop), all precisions together, so a failed or interrupted export changes nothing. OUT is locked while an
export writes it; staging directories that a killed export left behind are removed by the next one, which first rolls
back a publish that was killed midway (its journal lists the renames), so OUT holds the earlier export again.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from okdpipe import __version__
from okdpipe.contracts.card import PIXEL_SCALE, PRECISIONS, ModelCard, Preprocess, read_card, write_card
from okdpipe.contracts.data import DataSource
from okdpipe.errors import GateFailed, OkdpipeError
from okdpipe.export import onnx_export, qat, quantize, tune
from okdpipe.export.config import ExportConfig
from okdpipe.export.sensitivity import Probe, analyse
from okdpipe.files import (
    atomic_write_json,
    check_can_create_folder,
    file_sha256,
    kind_of,
    loads_finite,
    not_ours_to_replace,
    writes_into,
)
from okdpipe.interrupts import surfacing_interrupts
from okdpipe.modelfile import ModelInfo, non_finite_tensors
from okdpipe.ortsession import create_session
from okdpipe.scoring import drop_points, first_batch, score

ONNX_FILE = "model.onnx"
STAGING_PREFIX = ".export-"
LOCK_FILE = ".export.lock"
JOURNAL_FILE = "publish-journal.json"  # in the staging folder while a publish runs: the renames it makes
REPLACED = ".replaced"  # in the staging folder: the earlier folders of OUT, moved aside while publishing
TRITON_STAGING = "triton"  # in the staging folder: the Triton repository entries, complete before they are published


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
    peers: Any = None  # the run's students, QAT's teacher (--qat-teacher ensemble), loaded before OUT is touched


def export_model(model_path: str | os.PathLike, out_dir: str | os.PathLike, config: ExportConfig) -> list[ModelCard]:
    """Export, verify and card a model file; returns the cards of the artifacts written (in OUT/<precision>, or
    in the Triton repository's version folders)."""
    from okdpipe.locks import exclusive_lock

    with surfacing_interrupts() as raise_swallowed:  # an error that an interrupt caused is that interrupt
        ctx = export_context(model_path, config)
        created = not Path(out_dir).exists()
        ctx.out_dir = out_dir = writable_dir(Path(out_dir))
        check_triton_models(out_dir, ctx)
        with exclusive_lock(out_dir / LOCK_FILE, f"another export is writing {out_dir}"):
            try:
                roll_back_killed_publish(out_dir)
                remove_stale_staging(out_dir)
                staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=STAGING_PREFIX))
                try:
                    staged = build_artifacts(ctx, staging)
                    raise_swallowed()  # told to stop while building: publish nothing
                    renames = prepare_publish(staged, out_dir, ctx, staging)
                    publish(renames, out_dir, staging)
                finally:
                    discard_staging(staging)
                qat.remove_work(out_dir)
                return published_cards(staged, out_dir, ctx)
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
    peers = qat.load_peers(info, model_path) if config.qat_epochs and config.qat_teacher == "ensemble" else None
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
        peers=peers,
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
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise GateFailed(
            f"{where}: weight {bad[0]}{more} holds NaN or inf; the model diverged and is not exported: "
            "retrain it with a lower --lr"
        )


def writable_dir(out_dir: Path) -> Path:
    """Create OUT and prove it is writable before spending minutes on export; returns it resolved (absolute, links
    followed), as the cards of what is built there name their folders: publishing moves paths relative to OUT."""
    check_out_dir(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as exc:
        raise OkdpipeError(
            f"--out {out_dir}: cannot write there ({exc.strerror or exc}); choose another directory"
        ) from None
    return out_dir.resolve()


def check_out_dir(out_dir: Path) -> None:
    """OUT must be a folder, or a path where one can be made, and each precision folder in it a real folder
    (publishing replaces it; a file, pipe or link there is not an export to replace); nothing is created."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OkdpipeError(f"--out {out_dir} is {kind_of(out_dir)}; pass a directory (it is created if missing)")
    check_can_create_folder(out_dir, "--out")
    lock = out_dir / LOCK_FILE
    if not_ours_to_replace(lock, folder=False):
        raise OkdpipeError(f"--out {out_dir}: {lock} is not the export's lock file (a link, folder or pipe); remove it")
    for precision in PRECISIONS:
        place = out_dir / precision
        if not_ours_to_replace(place, folder=True):
            raise OkdpipeError(
                f"--out {out_dir}: {place} is not a folder of an earlier export (a file, link or pipe); "
                "remove it or choose another --out"
            )


def check_triton_models(out_dir: Path, ctx: ExportContext) -> None:
    """For a Triton repository, each model folder this export replaces must be what an earlier export left there: a
    real folder whose config.pbtxt is a regular file and whose version folder a real folder. Publishing moves the
    whole model folder aside and drops it, so a file, pipe or link there (someone else's) would be lost silently."""
    if ctx.config.format != "triton":
        return
    from okdpipe.export.triton import MODEL_VERSION

    for name in published_names(ctx):
        place = out_dir / name
        for path, folder, role in (
            (place, True, "folder"),
            (place / "config.pbtxt", False, "config"),
            (place / MODEL_VERSION, True, "version folder"),
        ):
            if not_ours_to_replace(path, folder):
                instead = "a file, link or pipe" if folder else "a folder, link or pipe"
                raise OkdpipeError(
                    f"--out {out_dir}: {path} is not the {role} of an earlier Triton export ({instead}); "
                    "remove it or choose another --out"
                )
        check_nothing_else_in(place, out_dir, MODEL_VERSION)


def check_nothing_else_in(place: Path, out_dir: Path, version: str) -> None:
    """A Triton model folder holds what okdpipe writes there (config.pbtxt and version folder `version`) and
    nothing else: another version (2/), a labels file or notes beside them would be dropped with the folder."""
    if place.is_symlink() or not place.is_dir():
        return
    others = sorted(p.name for p in place.iterdir() if p.name not in ("config.pbtxt", version))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise OkdpipeError(
            f"--out {out_dir}: {place} also holds {shown}, which okdpipe does not write (only config.pbtxt and "
            f"version {version}/) and replacing the model would lose; move them out or choose another --out"
        )


def published_names(ctx: ExportContext) -> list[str]:
    """The Triton model names this export publishes: the names its cards get (card_fields), fp32 and the variant."""
    precisions = ["fp32"] + ([] if ctx.config.quantize == "none" else [ctx.config.quantize])
    return [model_name(ctx.info, precision) for precision in precisions]


def check_inputs(model_path: str | os.PathLike, out_dir: str | os.PathLike, config: ExportConfig) -> None:
    """What export refuses before its first minute of work, in the order it does (`--dry-run` runs this): the
    model file, its data and the QAT teacher (export_context), then OUT and, for Triton, the models it replaces."""
    ctx = export_context(model_path, config)
    check_out_dir(Path(out_dir))
    check_triton_models(Path(out_dir), ctx)


def roll_back_killed_publish(out_dir: Path) -> None:
    """A publish killed midway (kill -9, power loss) left OUT half-published: earlier folders aside in its staging
    folder, new ones not all moved in. Its journal still lists the renames (it goes only once all have run), so they
    are undone here, before remove_stale_staging would delete the only copy of the earlier export. We hold OUT's
    lock, so no journal belongs to a running export."""
    for staging in sorted(out_dir.glob(STAGING_PREFIX + "*")):
        journal = staging / JOURNAL_FILE
        if staging.is_symlink() or not staging.is_dir() or not os.path.lexists(journal):
            continue
        renames = read_journal(journal, out_dir)
        try:
            undo(renames)
        except OSError as exc:
            raise OkdpipeError(
                f"--out {out_dir}: could not roll back the interrupted export in {staging} ({exc.strerror or exc}); "
                "it holds the earlier artifacts: move its folders back into OUT, then remove it"
            ) from None
        stranded = [target for source, target in renames if source.parent == out_dir and os.path.lexists(target)]
        if stranded:
            raise OkdpipeError(
                f"--out {out_dir}: {stranded[0]} of an earlier export could not go back (something took its place "
                f"in OUT); inspect both, keep what you need, then remove {staging}"
            )
        journal.unlink()  # OUT is whole again: the staging folder may go
        from okdpipe.console import say

        say(f"note: --out {out_dir}: an export killed while publishing was rolled back to the earlier one", err=True)


def read_journal(journal: Path, out_dir: Path) -> list[tuple[Path, Path]]:
    """The renames a journal lists, as paths in OUT. Damage (not JSON, another shape, a path that leaves OUT or moves
    anything but folders between OUT and this staging folder) is an error that keeps the staging folder: it may
    hold the only copy of an earlier export."""
    staging = journal.parent
    try:
        record = loads_finite(journal.read_text()) if journal.is_file() and not journal.is_symlink() else None
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        record = None
    renames = record.get("renames") if isinstance(record, dict) else None
    if not isinstance(renames, list) or not all(journal_rename(pair, staging.name) for pair in renames):
        raise OkdpipeError(
            f"--out {out_dir}: {journal} is damaged, so the export killed while publishing cannot be rolled back; "
            f"{staging} may hold the only copy of the earlier artifacts: inspect it, move back what you need, "
            "then remove it"
        )
    return [(out_dir / source, out_dir / target) for source, target in renames]


def journal_rename(pair: object, staging_name: str) -> bool:
    """A rename publish makes: [source, target] relative to OUT, one an entry of OUT, the other inside the staging
    folder that holds the journal."""
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(path, str) for path in pair)):
        return False
    source, target = (PurePosixPath(path).parts for path in pair)
    in_out = lambda parts: len(parts) == 1 and plain_name(parts[0])  # noqa: E731
    in_staging = lambda parts: len(parts) > 1 and parts[0] == staging_name and all(map(plain_name, parts))  # noqa: E731
    return (in_out(source) and in_staging(target)) or (in_staging(source) and in_out(target))


def plain_name(name: str) -> bool:
    """One folder's name: not `/`, `.` or `..` (which would lead out of OUT) and no NUL byte."""
    return name not in ("/", ".", "..") and "\0" not in name


def remove_stale_staging(out_dir: Path) -> None:
    """Staging folders of an export that was killed (we hold OUT's lock, so none is in use; roll_back_killed_publish
    has already put back what one held of an earlier export)."""
    for stale in out_dir.glob(STAGING_PREFIX + "*"):
        if stale.is_dir() and stale.name != LOCK_FILE:
            discard_staging(stale)


def discard_staging(staging: Path) -> None:
    """Remove a staging folder, unless it holds a publish journal: OUT is then half-published and the folder holds
    earlier artifacts (an interrupt stopped the undo, or came before the first rename). Deleting it partly and
    keeping the journal would make the next roll-back move the earlier folders INTO it; the next export rolls it
    back whole instead."""
    if not os.path.lexists(staging / JOURNAL_FILE):
        shutil.rmtree(staging, ignore_errors=True)


def build_artifacts(ctx: ExportContext, staging: Path) -> dict[str, ModelCard]:
    """Build fp32 and the requested variant under `staging`; every check runs before anything is published."""
    fp32_dir = staging / "fp32"
    with writes_into(staging):
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
    onnx_export.check_output_shape(onnx_path, predict, ctx.parity_inputs[-1], ctx.info.num_classes)
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
    check_fp32_claim(onnx_path, record["fp32_nodes"], "the accuracy-aware search kept")
    return {**record, "sensitivity": sensitivity, "tuning": outcome.record()}


def check_fp32_claim(onnx_path: Path, fp32_nodes: list[str], who: str) -> None:
    """The card will say these nodes run in FP32: the written graph must agree, or the export is refused."""
    wrong = quantize.quantized_claims(onnx_path, fp32_nodes)
    if wrong:
        raise GateFailed(
            f"{who} {', '.join(wrong[:3])} in FP32, but the int8 graph lacks it or stores its weights in integers; "
            "the card would not describe the model: export with --tune-budget 0 and report this"
        )


def int8_trial(ctx: ExportContext, onnx_path: Path, recipe: quantize.Recipe, started: float) -> tune.Trial:
    """The plain INT8 model as trial 0 of the search (a failed trial when its logits are not finite)."""
    try:
        top1 = val_top1(ctx, onnx_path, f"the int8 export of {ctx.model_path}")
    except GateFailed as failed:
        return tune.Trial(0, "plain", recipe, None, None, False, time.monotonic() - started, onnx_path, str(failed))
    drop = drop_points(ctx.fp32_top1, top1)
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
    drop = drop_points(ctx.fp32_top1, result.top1)
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
    parts = [info.arch, info.dataset] + ([] if precision == "fp32" else [precision])
    safe = [re.sub(r"[^A-Za-z0-9._-]+", "-", part).strip("-") for part in parts]  # plug-ins name freely
    return "-".join(part for part in safe if part)


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


def prepare_publish(
    staged: dict[str, ModelCard], out_dir: Path, ctx: ExportContext, staging: Path
) -> list[tuple[Path, Path]]:
    """Lay out what OUT receives, complete, in the staging folder, and plan and journal the renames that publish it:
    every earlier folder it replaces moved aside into the staging folder, then the new ones in. The journal is
    written before the first rename runs, so that a kill between renames can be rolled back by the next export.
    Every earlier precision folder goes, not only those exported now: an old model's int8 beside this model's fp32
    would ship two models as one export. A Triton repository holds other models too: only these names are replaced.
    Nothing in OUT is touched here."""
    try:
        entries = staged_entries(staged, ctx, staging)
        replaced = set(entries) if ctx.config.format == "triton" else set(entries) | set(PRECISIONS)
        aside = staging / REPLACED
        aside.mkdir()
    except OSError as exc:
        raise not_published(out_dir, exc) from None
    renames = [(out_dir / name, aside / name) for name in sorted(replaced) if (out_dir / name).exists()]
    renames += [(folder, out_dir / name) for name, folder in entries.items()]
    pairs = [[str(source.relative_to(out_dir)), str(target.relative_to(out_dir))] for source, target in renames]
    try:
        atomic_write_json(staging / JOURNAL_FILE, {"renames": pairs})
    except BaseException:  # an interrupt just after the write: no rename ran, the staging folder may go
        (staging / JOURNAL_FILE).unlink(missing_ok=True)
        raise
    return renames


def staged_entries(staged: dict[str, ModelCard], ctx: ExportContext, staging: Path) -> dict[str, Path]:
    """The folders publishing moves into OUT, by their name there: each precision's artifact folder, or, for
    Triton, each model's repository entry (config.pbtxt and version folder 1/ holding the artifact)."""
    if ctx.config.format != "triton":
        return {precision: card.directory for precision, card in staged.items()}
    from okdpipe.export.triton import write_triton_model

    repository, config = staging / TRITON_STAGING, ctx.config
    return {
        card.name: write_triton_model(
            repository, card.name, card.directory, card.raw, config.triton_max_batch_size, config.triton_instance
        )
        for card in staged.values()
    }


def publish(renames: list[tuple[Path, Path]], out_dir: Path, staging: Path) -> None:
    """Run the journaled renames, then remove the journal: that unlink is the commit point. A failure or an
    interrupt (Ctrl-C, SIGTERM) before it undoes the renames that ran, so OUT holds the earlier export exactly; a kill
    leaves the journal for the next export to do the same."""
    moves: list[tuple[Path, Path]] = []
    journal = staging / JOURNAL_FILE
    try:
        for source, target in renames:
            move(source, target, moves)
        journal.unlink()
    except BaseException as exc:  # an interrupt too: the staging folder, removed next, holds the old artifacts
        undo(moves)
        journal.unlink(missing_ok=True)  # OUT is the earlier export again: nothing left to roll back
        if isinstance(exc, OSError):
            raise not_published(out_dir, exc) from None
        raise


def not_published(out_dir: Path, exc: OSError) -> OkdpipeError:
    return OkdpipeError(
        f"--out {out_dir}: could not publish the export ({exc.strerror or exc}); the earlier artifacts are kept"
    )


def published_cards(staged: dict[str, ModelCard], out_dir: Path, ctx: ExportContext) -> list[ModelCard]:
    """The cards as published: OUT/<precision>, or each Triton model's version folder."""
    if ctx.config.format != "triton":
        return [read_card(out_dir / precision) for precision in staged]
    from okdpipe.export.triton import MODEL_VERSION

    return [read_card(out_dir / card.name / MODEL_VERSION) for card in staged.values()]


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
