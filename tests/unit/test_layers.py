"""The layering the README draws, checked on every import statement in the source (function-level ones too):
entry points on top, then the stages, each importing only downwards, then the foundation (the core in okdpipe/
and the data loaders), which imports no stage. Serving and the stage contracts never import torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "okdpipe": "okdpipe",
    "okdpipe.bench": "bench",
    "okdpipe.datasets": "datasets",
    "okdpipe.distill": "distill",
    "okdpipe.export": "export",
    "okdpipe.serve": "serve",
}
ENTRY_POINTS = {
    "okdpipe.cli",
    "okdpipe.api",
    "okdpipe.pipeline",
    "okdpipe.pipeline_command",
    "okdpipe.select_command",
    "okdpipe.env_command",
    "okdpipe.__main__",
    "okdpipe.compare.runner",
    "okdpipe.compare.command",
}
# Higher number = higher layer; a module may import its own layer (within its own package) or any lower one.
STAGE_LAYER = {"okdpipe.bench": 4, "okdpipe.serve": 4, "okdpipe.export": 3, "okdpipe.distill": 2}
FOUNDATION, ENTRY = 1, 5
TORCH_FREE = ("okdpipe.serve", "okdpipe.contracts", "okdpipe.ortsession", "okdpipe.stage_config")


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            found[".".join((package, *parts)).removesuffix(".__init__")] = path
    return found


def imports(path: Path, name: str) -> set[str]:
    """Every module `name` imports, absolute or relative, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(name.split(".")[: -node.level] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def layer(module: str) -> tuple[int, str]:
    """(layer, the unit a module belongs to: a stage package, or 'entry' / 'foundation')."""
    if module in ENTRY_POINTS:
        return ENTRY, "entry"
    for package, number in STAGE_LAYER.items():
        if module == package or module.startswith(package + "."):
            return number, package
    return FOUNDATION, "foundation"


ALL = modules()


@pytest.mark.parametrize("name", sorted(ALL))
def test_imports_go_downwards_only(name):
    own_layer, own_unit = layer(name)
    bad = []
    for target in imports(ALL[name], name):
        if not target.startswith("okdpipe") or target not in ALL:
            continue
        target_layer, target_unit = layer(target)
        sideways = target_layer == own_layer and target_unit != own_unit and own_unit != "entry"
        if target_layer > own_layer or sideways:
            bad.append(f"{target} ({target_unit})")
    assert not bad, f"{name} ({own_unit}) imports upwards or sideways: {', '.join(sorted(bad))}"


@pytest.mark.parametrize("name", sorted(n for n in ALL if n.startswith(TORCH_FREE)))
def test_serving_and_contracts_are_torch_free(name):
    heavy = {t for t in imports(ALL[name], name) if t.split(".")[0] in ("torch", "torchvision")}
    assert not heavy, f"{name} imports {heavy}; `okdpipe serve` must run without torch"


def test_the_check_sees_every_package():
    """The walk must find the stages, or the tests above would pass vacuously."""
    assert {
        "okdpipe.bench.run",
        "okdpipe.serve.app",
        "okdpipe.export.exporter",
        "okdpipe.distill.trainer",
        "okdpipe.datasets.load",
        "okdpipe.contracts.card",
        "okdpipe.cli",
    } <= set(ALL)
    assert len(ALL) > 80


def test_an_upward_import_is_caught(tmp_path):
    """The checker itself: a core module importing a stage is reported."""
    source = tmp_path / "bad.py"
    source.write_text("def f():\n    from okdpipe.export.exporter import export_model\n")
    found = imports(source, "okdpipe.files")
    assert "okdpipe.export.exporter" in found
    assert layer("okdpipe.export.exporter")[0] > layer("okdpipe.files")[0]
