"""The distillation config: one pydantic model that YAML files and CLI flags both compile into.

Unknown keys are rejected everywhere (a typo must not silently fall back to a default); no float may be NaN or
infinite and every number has its range. Method-specific hyperparameters live under `method_params` and are
validated by the method's own `Hparams` model. YAML is read with aliases refused and a size cap, so a small
hostile file cannot expand into gigabytes ("billion laughs").
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from okdpipe.errors import OkdpipeError
from okdpipe.files import MAX_INT_DIGITS, read_user_file, recorded_path
from okdpipe.plugins import PLUGINS_HELP, PluginNames
from okdpipe.stage_config import RecordedPath

MAX_CONFIG_BYTES = 1 << 20  # configs are a few hundred bytes; a bigger file is a mistake or an attack
MAX_YAML_DEPTH = 32  # the deepest okdpipe config nests 3 levels
OPTIMIZER_KEYS = ("optimizer", "momentum", "weight_decay")  # what a method may default (Method.optimizer_defaults)
# what a backbone may default (distill/models/base.py `recipe`): how it trains well, as timm's per-model configs
RECIPE_KEYS = ("lr", "warmup_epochs", "schedule", "grad_clip", "channels_last", "precise_bn", *OPTIMIZER_KEYS)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, strict=True)


class DistillConfig(Strict):
    """Everything a distillation run depends on; written to RUN_DIR/config.yaml."""

    plugins: PluginNames = Field(default_factory=list, description=PLUGINS_HELP)
    method: str = "vanilla"
    arch: str = Field("resnet20", description="a registered backbone, timm:NAME or torchvision:NAME")
    students: Optional[int] = Field(None, ge=1, le=16, description="number of peers; None = the method's default")
    dataset: str = "fashion-mnist"
    data_dir: RecordedPath = None
    val_split: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of train held out for every choice")
    train_subset: Optional[int] = Field(None, ge=1, description="images per class kept for training")
    epochs: int = Field(2, ge=1, le=100_000)
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
    precise_bn: bool = Field(
        False,
        description="recompute the students' BatchNorm statistics on a class-balanced training sample before each "
        "validation (PreciseBN), so eval-mode accuracy reflects the weights where running averages lag them (small "
        "data, many BN layers); training itself is unchanged",
    )
    compile: bool = False
    fused: bool = Field(
        False,
        description="same-architecture peers as one grouped network (vanilla, DML, OKDPH); "
        "faster on GPU only, see BENCHMARKS.md",
    )
    view_augment: Literal["method", "same"] = Field(
        "method",
        description="per-view augmentation: the method's policy (OKDPH: flip+rotate, flip+cutout, "
        "RandAugment for the hybrid) or 'same' (every view a fresh draw of the dataset's own)",
    )
    seed: int = Field(0, ge=0, lt=2**31, description="seed for initialisation, split, order and augmentation")
    workers: int = Field(
        0,
        ge=0,
        le=256,
        description="DataLoader workers for a dataset read file by file (a plug-in's FileSplit); built-in datasets "
        "and image folders are decoded into memory once (image folders: data_options.decode_workers)",
    )
    nproc_per_node: int = Field(
        1,
        ge=1,
        le=1024,
        description="data-parallel processes, one GPU each on CUDA; batch_size is the global batch, split evenly",
    )
    eval_batch_size: int = Field(512, ge=1)
    init: Optional[str] = Field(
        None,
        description="initial weights for every student: a state dict, an okdpipe MODEL.pt, or a timm or torchvision "
        "checkpoint (.pth, .safetensors); a local file, never downloaded",
    )
    init_partial: bool = Field(
        False,
        description="load an init file that matches only part of the students (the rest stays random, extra "
        "weights of the file are left out); without it such a file is refused",
    )
    method_params: dict[str, Any] = Field(default_factory=dict)
    data_options: dict[str, Any] = Field(default_factory=dict, description="extra dataset loader options")
    loggers: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="experiment trackers beside metrics.jsonl (which is always written): tensorboard, mlflow",
    )
    mlflow_uri: Optional[str] = Field(
        None, description="MLflow tracking URI; None = $MLFLOW_TRACKING_URI, else a file store ./mlruns"
    )

    @field_validator("init")
    @classmethod
    def _init_is_a_local_path(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and ("://" in value or not value.strip()):
            raise ValueError("init must be the path of a local file (okdpipe never downloads weights)")
        return recorded_path(value)

    @model_validator(mode="after")
    def _milestones_in_range(self) -> DistillConfig:
        if any(not 0 < m < 1 for m in self.milestones):
            raise ValueError("milestones are fractions of the run, each strictly between 0 and 1")
        return self

    @model_validator(mode="after")
    def _init_partial_needs_init(self) -> DistillConfig:
        if self.init_partial and not self.init:
            raise ValueError("init_partial is set but init is not; pass the weights file with --init PATH")
        return self

    @model_validator(mode="before")
    @classmethod
    def _one_arch_per_student(cls, values: Any) -> Any:
        """`arch` names one backbone for every student, or one per student (a YAML list or `a,b`), kept as one
        comma-separated string so a single-arch config reads as before and config.yaml round-trips. A list sets
        `students` when that is unset; a list of another length than an explicit `students` is refused."""
        if not isinstance(values, dict) or "arch" not in values:
            return values
        names = arch_names(values["arch"])
        count = values.get("students")
        if len(names) > 1 and count is not None and count != len(names):
            raise ValueError(
                f"arch names {len(names)} architectures ({', '.join(names)}) but students is {count}; "
                "give one architecture per student, or one for all"
            )
        return {**values, "arch": ",".join(names), **({"students": len(names)} if len(names) > 1 else {})}


def arch_names(value: Any) -> list[str]:
    """The backbone names of an `arch` value: one name, `a,b`, or a list of names."""
    items = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(item, str) for item in items):
        raise ValueError(f"arch must be a backbone name or a list of names, not {value!r}")
    names = [name.strip() for item in items for name in item.split(",")]
    if not names:
        raise ValueError("arch is an empty list; name a backbone (e.g. resnet20) or one per student")
    if not all(names):
        raise ValueError(f"arch {value!r} has an empty name; write e.g. resnet8,mobilenetv2")
    return names


def student_archs(cfg: DistillConfig, count: int) -> list[str]:
    """Student i's architecture, for each of the run's `count` students: `arch`'s one name for all, or its i-th."""
    names = arch_names(cfg.arch)
    return names * count if len(names) == 1 else names


def validation_message(error: ValidationError) -> str:
    """The first validation problem as `where: what`, for one-line errors."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


# Plain scalars read by YAML 1.2's core schema, not PyYAML's YAML 1.1 rules: under 1.1 `1e-3` is a string (no dot),
# `010` is octal 8, `1:30` is 90 (base 60) and `yes`/`off` are booleans; here numbers are decimal, `0x10`/`1:30` stay
# strings (which a numeric field then refuses), and only true/false are booleans.
INT_TAG, FLOAT_TAG, BOOL_TAG = (f"tag:yaml.org,2002:{kind}" for kind in ("int", "float", "bool"))
CORE_INT = re.compile(r"^[-+]?[0-9]+$")
CORE_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
CORE_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


class _BoundedLoader(yaml.SafeLoader):
    """safe_load without aliases and with bounded nesting, reading numbers and booleans as YAML 1.2 does (above).
    An alias is a reference, so nine lines of them expand to 9**9 items when the config is validated or printed
    ("billion laughs"); okdpipe's configs never need one, nor more than a few levels of nesting (deep nesting
    exhausts the recursion of every later reader)."""

    depth = 0
    yaml_implicit_resolvers = {
        first: [(tag, pattern) for tag, pattern in resolvers if tag not in (INT_TAG, FLOAT_TAG, BOOL_TAG)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"aliases (*name) are not allowed, line {mark.line + 1}")
        if self.depth >= MAX_YAML_DEPTH:
            raise yaml.YAMLError(f"nested deeper than {MAX_YAML_DEPTH} levels")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        """A key given twice is an error: YAML would silently keep the last one, and which one the user meant is
        a guess (as with `--set`)."""
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the mapping's own construction refuses it
            if key in seen:
                raise yaml.YAMLError(f"key {key!r} is given twice (line {key_node.start_mark.line + 1}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _decimal_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node)
    if not CORE_INT.match(text):  # an explicit `!!int 0x10` is still refused
        raise yaml.YAMLError(f"{text!r} is not a decimal integer (line {node.start_mark.line + 1})")
    digits = len(text.lstrip("+-"))
    if digits > MAX_INT_DIGITS:  # as in every JSON okdpipe reads; int() refuses 4,301 with a traceback
        raise yaml.YAMLError(f"an integer of {digits} digits (line {node.start_mark.line + 1}); no option takes one")
    return int(text)


_BoundedLoader.add_implicit_resolver(BOOL_TAG, CORE_BOOL, list("tTfF"))
_BoundedLoader.add_implicit_resolver(INT_TAG, CORE_INT, list("-+0123456789"))  # before float: `1` is an int
_BoundedLoader.add_implicit_resolver(FLOAT_TAG, CORE_FLOAT, list("-+.0123456789"))
_BoundedLoader.add_constructor(INT_TAG, _decimal_int)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python values, or one line naming `where` and the problem (aliases refused)."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)
    except yaml.YAMLError as exc:
        raise OkdpipeError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None


def read_text_file(path: str | Path, what: str = "config file", limit: int = MAX_CONFIG_BYTES) -> str:
    """A small UTF-8 text file's contents, or one line saying why not (missing, a folder, too big, binary, a
    silent pipe)."""
    raw = read_user_file(path, what, limit)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OkdpipeError(f"{path}: {what} is not UTF-8 text (byte {exc.start})") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file that must hold a mapping of keys to values."""
    data = parse_yaml(read_text_file(path), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OkdpipeError(f"{path}: the config must be a mapping of keys to values, not a {type(data).__name__}")
    return data


def parse_set(assignments: list[str]) -> dict[str, Any]:
    """Turn `--set okdph.gamma=0.5` into {"okdph": {"gamma": 0.5}}; values are parsed as YAML. A key given
    twice, or both as a value and as a section (`a=1` and `a.b=2`), is an error: which one wins would be a guess."""
    nested: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise OkdpipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set okdph.gamma=0.5")
        *parents, leaf = parts
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise OkdpipeError(f"--set {item!r}: {part} was already set to a value, not a section")
        if leaf in node:
            raise OkdpipeError(f"--set {item!r}: {key} is set twice; keep one --set {key}=...")
        node[leaf] = parse_yaml(raw, f"--set {key}")
    return nested


def merged_over(base: Any, override: Any) -> Any:
    """`override` laid over `base` key by key where both are mappings (`--set data_options.size=32` changes that
    one option and keeps the config file's others), else `override` itself."""
    if not (isinstance(base, Mapping) and isinstance(override, Mapping)):
        return override
    return {**base, **{key: merged_over(base.get(key), value) for key, value in override.items()}}


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any], sets: list[str]) -> DistillConfig:
    """Merge YAML < flags < --set; `--set METHOD.key=v` lands in method_params; `--set section.key=v` changes one
    key of a mapping section (data_options) and keeps its others."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    method = merged.get("method", "vanilla")
    params = merged.get("method_params") or {}
    if not isinstance(params, Mapping):
        raise OkdpipeError("bad config: method_params must be a mapping of hyperparameters to values")
    params = dict(params)
    for section, values in parse_set(sets).items():
        if section == method and isinstance(values, dict):
            params.update(values)
        elif section in DistillConfig.model_fields and section != "method_params":
            merged[section] = merged_over(merged.get(section), values)
        else:
            raise OkdpipeError(f"--set {section}...: use '{method}.<param>=value' or a top-level config key")
    merged["method_params"] = params
    return validated(DistillConfig, merged, "bad config")


def validated(model: type[BaseModel], values: Any, context: str) -> Any:
    """`model` from `values`, or one line: `context: where: what`."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise OkdpipeError(f"{context}: {validation_message(exc)}") from None


def with_method_defaults(
    cfg: DistillConfig, defaults: Mapping[str, Any], recipe: Mapping[str, Any] = MappingProxyType({})
) -> DistillConfig:
    """`cfg` with defaults for every key the user did not set. Precedence: config files, flags and --set, then
    the method's optimiser defaults (Method.optimizer_defaults), then the backbone's recipe (`backbone_recipe`),
    then DistillConfig's own. Idempotent: the result has every key set."""
    for what, values, allowed in (("optimizer_defaults", defaults, OPTIMIZER_KEYS), ("a recipe", recipe, RECIPE_KEYS)):
        unknown = set(values) - set(allowed)
        if unknown:
            raise ValueError(f"{what} may set only {allowed}, not {sorted(unknown)}")
    chosen = cfg.model_dump(exclude_unset=True)
    return validated(DistillConfig, {**cfg.model_dump(), **recipe, **defaults, **chosen}, f"{cfg.method} defaults")


def validate_params(model: type[BaseModel], params: dict[str, Any], method: str) -> BaseModel:
    """Validate a method's hyperparameters; unknown keys name the known ones."""
    try:
        return model(**params)
    except ValidationError as exc:
        known = ", ".join(model.model_fields) or "none"
        raise OkdpipeError(f"bad {method} parameter {validation_message(exc)} (known: {known})") from None


def dump_yaml(config: DistillConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
