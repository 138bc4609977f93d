"""A comparison protocol (configs/fmnist-compare.yaml): named entries -- a method at its paper defaults, or a
variant of one with other hyperparameters -- each trained for every seed on one shared base config.

The YAML is checked when read (unknown keys refused, every entry's distill config validated), so a typo fails
before hours of training, not after."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import Field, field_validator

from okdpipe.config import Strict, build_config, read_yaml, validated
from okdpipe.errors import OkdpipeError


class Variant(Strict):
    """A method with other settings: any distill config key (method_params, epochs, ...) beside `method`."""

    model_config = {**Strict.model_config, "extra": "allow"}
    method: str


class Protocol(Strict):
    out: str = Field(description="folder of the run directories (large, not committed)")
    records: str = Field(description="folder of one small JSON per finished run, and summary.md")
    seeds: list[int] = Field(min_length=1)
    methods: list[str] = Field(min_length=1)
    base: dict[str, Any] = Field(default_factory=dict, description="the distill config every entry shares")
    method_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    variant_seeds: Optional[list[int]] = None
    variants: dict[str, Variant] = Field(default_factory=dict)

    @field_validator("methods", "seeds", "variant_seeds")
    @classmethod
    def _distinct(cls, items: Optional[list]) -> Optional[list]:
        if items is not None and len(set(items)) != len(items):
            raise ValueError("an item is listed twice (a run would be trained and counted twice)")
        return items


def read_protocol(path: Path) -> dict[str, Any]:
    """The protocol as the plain mapping the runner and the summary read, after checking every entry."""
    protocol = validated(Protocol, read_yaml(path), str(path)).model_dump()
    if protocol["variant_seeds"] is None:
        del protocol["variant_seeds"]  # the variants run on the methods' seeds
    clash = set(protocol["methods"]) & set(protocol.get("variants", {}))
    if clash:
        raise OkdpipeError(f"{path}: {', '.join(sorted(clash))} is both a method and a variant; rename the variant")
    for name in entries(protocol):
        try:
            build_config(entry_config(protocol, name, protocol["seeds"][0]), {}, [])
        except OkdpipeError as exc:
            raise OkdpipeError(f"{path}: entry {name}: {exc}") from None
    return protocol


def entries(protocol: dict) -> list[str]:
    return [*protocol["methods"], *protocol.get("variants", {})]


def entry_config(protocol: dict, name: str, seed: int) -> dict:
    """The distill config of one entry: a method name, or a variant {method, method_params, ...}."""
    variant = protocol.get("variants", {}).get(name, {"method": name})
    method = variant["method"]
    overrides = {k: v for k, v in variant.items() if k != "method"}
    return {
        **protocol["base"],
        **protocol.get("method_overrides", {}).get(method, {}),
        **overrides,
        "method": method,
        "seed": seed,
    }


def schedule(protocol: dict, names: list[str] | None, seeds: list[int] | None) -> list[tuple[str, int]]:
    """(entry, seed) pairs to run, seed-major (a partial table has every method at seed 0 first), methods first."""
    plan = []
    for group, group_seeds in (
        (protocol["methods"], protocol["seeds"]),
        (list(protocol.get("variants", {})), protocol.get("variant_seeds", protocol["seeds"])),
    ):
        for seed in seeds or group_seeds:
            plan += [(name, seed) for name in group if names is None or name in names]
    return plan


def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / f"{name}-s{seed}"


def record_path(records: Path, name: str, seed: int) -> Path:
    return records / f"{name}-s{seed}.json"
