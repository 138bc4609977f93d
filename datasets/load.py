"""load_dataset: a registered loader's official splits, plus the validation hold-out and the training subset."""

from __future__ import annotations

import inspect
from pathlib import Path

from okdpipe.contracts.inputs import labels_problem
from okdpipe.datasets.spec import DATASETS
from okdpipe.datasets.splits import DataBundle, balanced_subset, stratified_holdout
from okdpipe.errors import OkdpipeError
from okdpipe.foreign import blamed, dataset


def check_options(name: str, loader, options: dict) -> None:  # noqa: ANN001 - any registered loader
    """Unknown options are an error, not silently ignored (a typo would otherwise change nothing)."""
    accepted = [p for p in inspect.signature(loader).parameters if p != "data_dir"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise OkdpipeError(
            f"dataset {name!r} has no option {', '.join(unknown)}; its options are: {', '.join(accepted) or 'none'}"
        )


def check_labels(labels: tuple[str, ...], where: str, fix: str) -> None:
    """The model card's rules for labels (okdpipe.contracts.inputs), applied when the data is read: a class name
    that no card can carry fails before training, not at export after it."""
    problem = labels_problem(list(labels), len(labels))
    if problem:
        raise OkdpipeError(f"{where}: {problem}; {fix}")


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    val_split: float = 0.1,
    seed: int = 0,
    train_subset: int | None = None,
    **options,
) -> DataBundle:
    """Train/val/test of a registered dataset.

    val_split: fraction of each class of the training set held out for validation, chosen by `seed` (0 -> val
    empty); ignored when the dataset ships its own validation split (cinic10, imagefolder with val/).
    train_subset: keep this many images per class of what remains for training (None = all).
    The test split is never touched by either.
    """
    loader = DATASETS.get(name)
    check_options(name, loader, options)
    with blamed(dataset(name), lambda: "while loading its splits"):  # a plug-in's loader: its exception is one line
        raw = loader(Path(data_dir) if data_dir is not None else None, **options)
    check_labels(raw.spec.labels, f"dataset {name!r}", "fix the names its loader gives the classes")
    if raw.val is None:
        train, val = stratified_holdout(raw.train, val_split, raw.spec.num_classes, seed, raw.spec.labels)
    else:
        train, val = raw.train, raw.val
    if train_subset is not None:
        train = balanced_subset(train, train_subset, raw.spec.labels, seed)
    return DataBundle(raw.spec, train, val, raw.test, raw.fingerprint, raw.source)
