"""Train, select and measure every (entry, seed) of a comparison protocol, in this process.

Each entry trains exactly as `okdpipe distill --config <its config> --out OUT/<entry>-s<seed>` would (the same
config, compiled the same way), then `okdpipe select --strategy auto` picks the model to ship on the validation
split, and the shipped MODEL.pt is measured once on the test split. A finished run leaves a small record in the
protocol's `records` folder (committed, so the table can be filled over several sittings and machines): a run
with a record is skipped, a finished run without one is only selected and measured, and a killed run resumes
from its last checkpoint.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

from okdpipe.compare.protocol import entries, entry_config, record_path, run_dir
from okdpipe.console import say
from okdpipe.errors import OkdpipeError
from okdpipe.files import atomic_write_json, atomic_write_text, check_can_create_folder, loads_finite


def check_entries(protocol: dict) -> None:
    """Every entry's method exists and takes its hyperparameters: a typo in a variant fails now, not after hours
    of the entries before it."""
    from okdpipe.config import build_config, validate_params
    from okdpipe.distill.methods import METHODS

    for name in entries(protocol):
        try:
            cfg = build_config(entry_config(protocol, name, protocol["seeds"][0]), {}, [])
            validate_params(METHODS.get(cfg.method).Params, cfg.method_params, cfg.method)
        except OkdpipeError as exc:
            raise OkdpipeError(f"entry {name}: {exc}") from None


def manifest(path: Path) -> dict:
    file = path / "manifest.json"
    if not file.is_file():
        return {}
    try:
        return loads_finite(file.read_text())
    except (ValueError, OSError) as exc:
        raise OkdpipeError(f"{file}: not a readable manifest ({exc}); delete {path} to train that run again") from None


def train(protocol: dict, out: Path, name: str, seed: int) -> None:
    """Train one entry (resume a killed run; leave a finished one alone). The entry's config is also written
    beside its run directory, as the YAML `okdpipe distill --config` would take."""
    from okdpipe.config import build_config, dump_yaml
    from okdpipe.distill.checkpoint import has_checkpoint
    from okdpipe.distill.methods import METHODS  # noqa: F401  (registers every method)
    from okdpipe.distill.trainer import check_before_announcing, fit
    from okdpipe.run import RunDir

    path = run_dir(out, name, seed)
    if manifest(path).get("status") == "finished":
        return
    cfg = build_config(entry_config(protocol, name, seed), {}, [])
    atomic_write_text(out / f".{name}-s{seed}.yaml", dump_yaml(cfg))
    resume = has_checkpoint(RunDir(path))
    check_before_announcing(cfg, RunDir(path), resume)  # a run folder fit refuses is named before "training"
    say(f"{'resuming' if resume else 'training'} {cfg.method} ({name}) seed {seed} -> {path}")
    fit(cfg, RunDir(path), resume=resume, echo=say)


def model_file_accuracy(model_file: Path, split: str = "test") -> float:
    """Top-1 of a MODEL.pt on its own dataset's `split` ("val" or "test"), from the file alone. The test split is
    measured once, for the record, and never used to choose anything."""
    import torch

    from okdpipe.contracts.data import DataSource
    from okdpipe.datasets import make_loader
    from okdpipe.distill.models import load_model_file

    model, info = load_model_file(model_file)
    bundle = DataSource.from_record(info.provenance["data"], model_file).load()  # the split select scored on
    images = bundle.test if split == "test" else bundle.val
    loader = make_loader(images, bundle.spec, batch_size=512, train=False, device="cpu")
    with torch.no_grad():
        hits = sum(int((model(b.views[0]).argmax(1) == b.labels).sum()) for b in loader.epoch(0))
    return hits / len(images)


def chosen_val_top1(selection: dict) -> float:
    """The validation top-1 that `okdpipe select` recorded for the model it chose (selection.json)."""
    return next(c["val_top1"] for c in selection["candidates"] if c["chosen"])


def select_and_measure(out: Path, records: Path, name: str, seed: int) -> dict:
    """Select the run's model to ship (auto strategy, on validation), measure it on test, write its record."""
    from okdpipe.distill.methods import METHODS  # noqa: F401  (registers every method)
    from okdpipe.distill.select import select
    from okdpipe.distill.select_command import SelectConfig

    path = run_dir(out, name, seed)
    defaults = SelectConfig()
    select(path, "auto", None, defaults.bn_batches, defaults.device)
    selection = loads_finite((path / "selection.json").read_text())
    state = manifest(path)
    result = {
        "entry": name,
        "method": state["config"]["method"],
        "seed": seed,
        "shipped": selection["chosen"],
        "shipped_val_top1": chosen_val_top1(selection),
        "shipped_test_top1": model_file_accuracy(Path(selection["model_file"])),
        "ensemble_test_top1": state["test"]["ensemble"]["top1"],
        "students_test_top1": {k: v["top1"] for k, v in state["test"].items() if k.startswith("student:")},
        "extras_test_top1": {
            k: v["top1"] for k, v in state["test"].items() if not k.startswith("student:") and k != "ensemble"
        },
        "candidates_val": {c["candidate"]: c for c in selection["candidates"]},
        "train_seconds": sum(e["seconds"] for e in state["epochs"]),
        "precise_bn_seconds": sum(e.get("precise_bn_seconds", 0.0) for e in state["epochs"]),  # not in train_seconds
        "wall_seconds": wall_seconds(state),
        "students": state["students"]["count"],
        "config": state["config"],
    }
    atomic_write_json(record_path(records, name, seed), result)
    return result


def wall_seconds(state: dict) -> float:
    """From the run's manifest: first start to finish (a resumed run includes the time it lay killed)."""
    return (datetime.fromisoformat(state["finished"]) - datetime.fromisoformat(state["created"])).total_seconds()


def remaining(started: float, done: int, left: int) -> str:
    """A rough time left, from the mean time of the runs this sitting finished."""
    if not done:
        return ""
    seconds = (time.monotonic() - started) / done * left
    return f", about {seconds / 60:.0f} min left" if left else ""


def check_destinations(out: Path, records: Path, todo: list[tuple[str, int]]) -> None:
    """The records folder and every run folder still to train can be made, before the first line says what will
    run: a dangling link or a file in their place would otherwise stop the protocol hours in, at that run."""
    check_can_create_folder(records, "the protocol's records")
    for name, seed in todo:
        check_can_create_folder(run_dir(out, name, seed), f"entry {name} seed {seed}: the run folder")


def run_protocol(protocol: dict, plan: list[tuple[str, int]]) -> None:
    """Every (entry, seed) of `plan` without a record: trained, selected, measured. One progress line per run
    (a plain line, so logs read the same as a terminal; each run's epochs show distill's own bar)."""
    out, records = Path(protocol["out"]), Path(protocol["records"])
    for path in sorted(records.glob("*-s*.json")):  # a record the summary would refuse stops us before training
        read_record(path, protocol)
    todo = [(name, seed) for name, seed in plan if not record_path(records, name, seed).is_file()]
    check_destinations(out, records, todo)
    say(f"{len(plan) - len(todo)} of {len(plan)} runs already have a record; {len(todo)} to run")
    started = time.monotonic()
    for index, (name, seed) in enumerate(todo):
        run_started = time.monotonic()
        train(protocol, out, name, seed)
        result = select_and_measure(out, records, name, seed)
        say(
            f"[{index + 1}/{len(todo)}] {name} seed {seed}: shipped {result['shipped']} "
            f"{100 * result['shipped_test_top1']:.2f}% test top-1 ({time.monotonic() - run_started:.0f} s"
            f"{remaining(started, index + 1, len(todo) - index - 1)})"
        )


def read_record(path: Path, protocol: dict) -> dict:
    """A committed record, checked against its file name and its protocol: a record copied from another seed or
    protocol, or one trained before the protocol changed, would otherwise fill a row with the wrong run."""
    try:
        record = loads_finite(path.read_text())
    except (ValueError, OSError) as exc:
        raise OkdpipeError(
            f"{path}: not a readable record ({exc}); delete it (the run is trained again) or restore it"
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("method"), str):
        raise OkdpipeError(f"{path}: not a comparison record (no method); delete it (the run is trained again)")
    check_record_matches(path, record, protocol)
    return record


RECORD_NAME = re.compile(r"(?P<entry>.+)-s(?P<seed>[0-9]+)\.json")


def check_record_matches(path: Path, record: dict, protocol: dict) -> None:
    """The entry and seed inside a record are those of its file name, the entry is the protocol's, and every
    setting the record's run was trained with equals what the protocol asks of that entry now (a setting the
    record does not list predates that option and is not compared)."""
    named = RECORD_NAME.fullmatch(path.name)
    entry, seed = record.get("entry", record["method"]), record.get("seed")  # old records name only the method
    fix = "delete it (the run is trained again) or restore it from git"
    if named is None or (entry, seed) != (named["entry"], int(named["seed"])):
        raise OkdpipeError(f"{path}: the record is of entry {entry!r} seed {seed!r}, not what its name says; {fix}")
    if entry not in entries(protocol):
        raise OkdpipeError(f"{path}: {entry} is not an entry of the protocol; delete the record or add the entry")
    trained = record.get("config")
    if not isinstance(trained, dict):
        raise OkdpipeError(f"{path}: the record has no config of its run; {fix}")
    for key, wanted in entry_config(protocol, entry, seed).items():
        if key in trained and trained[key] != wanted:
            raise OkdpipeError(
                f"{path}: its run was trained with {key}={trained[key]!r}, the protocol now asks {wanted!r}; "
                f"delete the record to train it again, or restore the protocol"
            )


def write_summary(protocol: dict, records: Path) -> str:
    """records/summary.md (and summary.png) from every record in the folder; returns the Markdown."""
    from okdpipe.compare.figure import write_figure
    from okdpipe.compare.summary import summarise

    results = [read_record(p, protocol) for p in sorted(records.glob("*-s*.json"))]
    try:
        summary = summarise(protocol, results)
    except (KeyError, TypeError, ValueError) as exc:  # a record that parses but lacks a field the tables read
        raise OkdpipeError(
            f"{records}: a record lacks what the summary reads ({type(exc).__name__}: {exc}); delete the damaged "
            "record (its run is then trained again) or restore it from git"
        ) from None
    atomic_write_text(records / "summary.md", summary + "\n")
    write_figure(protocol, results, records / "summary.png")
    return summary
