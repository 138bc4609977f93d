"""The data source: which dataset, where, and how its splits were drawn. Every stage rebuilds a split through
`DataSource.load()`, so export scores and calibrates on exactly the images selection scored on, and bench
measures on the same test split, never re-deriving the split with a seed of its own.

A run records it in its config; `okdpipe select` copies it into the model file (`provenance["data"]`); export
and bench read it back from there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from okdpipe.errors import OkdpipeError


@dataclass(frozen=True)
class DataSource:
    """dataset + directory + the validation hold-out (fraction and seed) + the training subset + loader options."""

    dataset: str
    data_dir: str | None = None
    val_split: float = 0.1
    seed: int = 0
    train_subset: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_run(cls, cfg) -> DataSource:
        """The data a distillation config (okdpipe.config.DistillConfig) trains and validates on."""
        return cls(cfg.dataset, cfg.data_dir, cfg.val_split, cfg.seed, cfg.train_subset, dict(cfg.data_options))

    @classmethod
    def from_record(cls, record: Any, where: object) -> DataSource:
        """Read a recorded source (a model file's provenance["data"]), checking every field's type."""
        if not isinstance(record, dict) or not isinstance(record.get("dataset"), str) or not record["dataset"]:
            raise OkdpipeError(f"{where}: records no dataset; re-create it with `okdpipe select`")
        unknown = sorted(set(record) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise OkdpipeError(f"{where}: unknown data source field(s) {', '.join(unknown)}")
        source = cls(**record)
        source.check(where)
        return source

    def check(self, where: object) -> None:
        split, seed, subset = self.val_split, self.seed, self.train_subset
        problems = [
            (
                isinstance(split, bool)
                or not isinstance(split, (int, float))
                or not math.isfinite(split)
                or not 0 <= split < 1,
                f"val_split {split!r} must be a number in [0, 1)",
            ),
            (isinstance(seed, bool) or not isinstance(seed, int), f"seed {seed!r} must be an integer"),
            (
                subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1),
                f"train_subset {subset!r} must be a positive integer or null",
            ),
            (self.data_dir is not None and not isinstance(self.data_dir, str), "data_dir must be a string or null"),
            (not isinstance(self.options, dict), "options must be a mapping"),
        ]
        for bad, problem in problems:
            if bad:
                raise OkdpipeError(f"{where}: data source {problem}")

    def __hash__(self) -> int:  # options is a dict: hash the canonical record (stages cache splits by source)
        import json

        return hash(json.dumps(self.as_record(), sort_keys=True, default=str))

    def with_data_dir(self, data_dir: str | None) -> DataSource:
        """The same source read from another directory (`--data-dir`); None keeps the recorded one."""
        return self if data_dir is None else replace(self, data_dir=str(data_dir))

    def as_record(self) -> dict[str, Any]:
        return {**asdict(self), "options": dict(self.options)}

    def load(self):
        """train/val/test (`okdpipe.datasets.DataBundle`) exactly as the run drew them."""
        from okdpipe.datasets import load_dataset

        return load_dataset(
            self.dataset,
            self.data_dir,
            val_split=self.val_split,
            seed=self.seed,
            train_subset=self.train_subset,
            **self.options,
        )
