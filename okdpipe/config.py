"""The distillation config: one pydantic model that YAML files and CLI flags both compile into.

Unknown keys are rejected everywhere (a typo must not silently fall back to a default). Method-specific
hyperparameters live under `method_params` and are validated by the method's own `Hparams` model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from okdpipe.errors import OkdpipeError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DistillConfig(Strict):
    """Everything a distillation run depends on; written to RUN_DIR/config.yaml."""

    method: str = "vanilla"
    arch: str = "resnet20"
    students: Optional[int] = Field(None, ge=1, le=16, description="number of peers; None = the method's default")
    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None
    val_split: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of train held out for every choice")
    train_subset: Optional[int] = Field(None, ge=1, description="images per class kept for training")
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.1, gt=0, description="peak learning rate (after warm-up), per batch of batch_size")
    optimizer: Literal["sgd", "nesterov", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: list[float] = Field([0.5, 0.75], description="step schedule: fractions of the run")
    lr_decay: float = Field(0.1, gt=0, le=1, description="step schedule: factor at each milestone")
    warmup_epochs: float = Field(0.0, ge=0)
    grad_clip: Optional[float] = Field(None, gt=0, description="max global grad norm; None = off")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = False
    compile: bool = False
    fused: bool = Field(False, description="same-architecture peers as one grouped network (vanilla, DML); "
                                           "faster on GPU only, see BENCHMARKS.md")
    seed: int = 0
    workers: int = Field(0, ge=0, description="data-loading workers (image folders only)")
    nproc_per_node: int = Field(1, ge=1, description="data-parallel processes, one GPU each on CUDA; batch_size "
                                                     "is the global batch, split evenly between them")
    eval_batch_size: int = Field(512, ge=1)
    method_params: dict[str, Any] = Field(default_factory=dict)
    data_options: dict[str, Any] = Field(default_factory=dict, description="extra dataset loader options")

    @model_validator(mode="after")
    def _milestones_in_range(self) -> "DistillConfig":
        if any(not 0 < m < 1 for m in self.milestones):
            raise ValueError("milestones are fractions of the run, each strictly between 0 and 1")
        return self


def validation_message(error: ValidationError) -> str:
    """The first validation problem as `where: what`, for one-line errors."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "config"
    return f"{where}: {first['msg']}"


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise OkdpipeError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise OkdpipeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise OkdpipeError(f"{path}: the config must be a mapping of keys to values")
    return data


def parse_set(assignments: list[str]) -> dict[str, Any]:
    """Turn `--set okdph.gamma=0.5` into {"okdph": {"gamma": 0.5}}; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise OkdpipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set okdph.gamma=0.5")
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return nested


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any], sets: list[str]) -> DistillConfig:
    """Merge YAML < flags < --set; `--set METHOD.key=v` lands in method_params."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    method = merged.get("method", "vanilla")
    params = dict(merged.get("method_params") or {})
    for section, values in parse_set(sets).items():
        if section == method and isinstance(values, dict):
            params.update(values)
        elif section in DistillConfig.model_fields and section != "method_params":
            merged[section] = values
        else:
            raise OkdpipeError(f"--set {section}...: use '{method}.<param>=value' or a top-level config key")
    merged["method_params"] = params
    try:
        return DistillConfig(**merged)
    except ValidationError as exc:
        raise OkdpipeError(f"bad config: {validation_message(exc)}") from None


def validate_params(model: type[BaseModel], params: dict[str, Any], method: str) -> BaseModel:
    """Validate a method's hyperparameters; unknown keys name the known ones."""
    try:
        return model(**params)
    except ValidationError as exc:
        known = ", ".join(model.model_fields) or "none"
        raise OkdpipeError(f"bad {method} parameter {validation_message(exc)} (known: {known})") from None


def dump_yaml(config: DistillConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
