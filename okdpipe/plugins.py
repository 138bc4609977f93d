"""Plug-ins: the user's own backbones, datasets and methods, added without forking okdpipe.

A plug-in is any Python module that, when imported, registers objects with okdpipe's registries
(`okdpipe.distill.models.MODELS`, `okdpipe.datasets.DATASETS`, `okdpipe.distill.methods.METHODS`). It is
loaded in one of three ways:

- named: `--plugin MODULE` (repeatable) or `plugins: [MODULE, ...]` in a config; MODULE is an importable module
  name (installed, or on PYTHONPATH) or the path of a `.py` file;
- installed: a package that declares an entry point in the group `okdpipe.plugins`, e.g. in its pyproject.toml
  `[project.entry-points."okdpipe.plugins"] my_models = "my_models"`; every installed one is loaded the first
  time a registry is asked for a name it does not hold (so `okdpipe --help` stays instant). One that fails to
  load is skipped with a warning, and an unknown-name error then names it;
- inherited: named plug-ins are also written to the environment (`OKDPIPE_PLUGINS`, comma-separated), so
  processes okdpipe starts (data-parallel workers) load them too; users may set the variable themselves.

`provider(obj)` says which plug-in a registered object came from, so that a model file records the plug-in that
built its architecture and loading it without that plug-in is a one-line error naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator

from okdpipe.errors import OkdpipeError
from okdpipe.files import missing_or_kind

ENTRY_POINT_GROUP = "okdpipe.plugins"
ENVIRONMENT = "OKDPIPE_PLUGINS"


@dataclass(frozen=True)
class Plugin:
    """One loaded plug-in: the name a user passes to --plugin, the module it imported, and its package."""

    spec: str  # what --plugin takes to load it again: a module name or a .py file's absolute path
    module: str
    package: str = ""  # the installed distribution providing it ("" for a plain module or file)
    version: str = ""

    def record(self) -> dict[str, str]:
        """What a model file stores about it."""
        return {"plugin": self.spec, "module": self.module, "package": self.package, "version": self.version}


_loaded: dict[str, Plugin] = {}  # module name -> plug-in
_named: list[str] = []  # specs loaded by name (not as entry points): what child processes must load too
_installed_done = False
_broken: dict[str, str] = {}  # installed entry points that failed to load ("name = value") -> why


def load_plugins(specs: list[str]) -> list[Plugin]:
    """Import each named plug-in once (module name or .py file); a failure is one line naming the plug-in."""
    plugins = [_load_one(spec) for spec in specs]
    _named.extend(p.spec for p in plugins if p.spec not in _named)
    if _named:
        os.environ[ENVIRONMENT] = ",".join(dict.fromkeys([*_inherited(), *_named]))
    return plugins


def _load_one(spec: str) -> Plugin:
    spec = spec.strip()
    if not spec:
        raise OkdpipeError("--plugin '': name a module (e.g. my_models) or a .py file")
    is_file = spec.endswith(".py") or os.sep in spec
    known = next((p for p in _loaded.values() if spec in (p.spec, p.module)), None)
    if known is not None:
        return known
    module = _import_file(Path(spec)) if is_file else _import_module(spec)
    plugin = Plugin(str(Path(spec).resolve()) if is_file else spec, module, *_distribution_of(module))
    _loaded[module] = plugin
    return plugin


def _import_module(name: str) -> str:
    if name in sys.modules:
        return name
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):  # the plug-in itself is missing
            raise OkdpipeError(
                f"plug-in {name!r} not found: install the package that provides it, add its folder to "
                "PYTHONPATH, or pass the path of its .py file"
            ) from None
        raise _failed(name, exc) from None
    except OkdpipeError:
        raise
    except (Exception, SystemExit) as exc:  # a plug-in may raise anything while registering, even sys.exit()
        raise _failed(name, exc) from None
    return name


def _import_file(path: Path) -> str:
    if not path.is_file():
        raise OkdpipeError(
            f"plug-in file {path}: {missing_or_kind(path, 'a .py file')}; pass a .py file or a module name"
        )
    name = path.stem
    if name in sys.modules:
        loaded = getattr(sys.modules[name], "__file__", None)
        if loaded and Path(loaded).resolve() == path.resolve():
            return name
        raise OkdpipeError(f"plug-in {path}: a module named {name!r} is already imported; rename the file")
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        del sys.modules[name]
        raise exc if isinstance(exc, OkdpipeError) else _failed(str(path), exc) from None
    return name


def _failed(name: str, exc: BaseException) -> OkdpipeError:
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return OkdpipeError(f"plug-in {name!r} failed to load ({type(exc).__name__}: {first}); fix or update the plug-in")


def _distribution_of(module: str) -> tuple[str, str]:
    """(distribution name, version) of the installed package holding `module`, or ("", "")."""
    from importlib.metadata import packages_distributions, version

    names = packages_distributions().get(module.split(".")[0], [])
    return (names[0], version(names[0])) if names else ("", "")


def _inherited() -> list[str]:
    return [spec.strip() for spec in os.environ.get(ENVIRONMENT, "").split(",") if spec.strip()]


def load_pending() -> bool:
    """Load every plug-in not loaded yet: those the environment names and the installed entry points.
    Returns True when something new was imported (a registry then looks again)."""
    before = len(_loaded)
    load_plugins(_inherited())
    load_installed()
    return len(_loaded) > before


def load_installed() -> list[Plugin]:
    """Import every installed package's `okdpipe.plugins` entry point (once). The entry point names a module,
    or a function that registers things when called."""
    global _installed_done
    if _installed_done:
        return [p for p in _loaded.values() if p.package]
    _installed_done = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        module = entry.value.split(":")[0].strip()
        if module in _loaded:
            continue
        try:
            target = entry.load()
            if callable(target) and not isinstance(target, type(sys)):
                target()
        except (Exception, SystemExit) as exc:  # one broken package must not break every command: skipped
            _skip_broken(f"{entry.name} = {entry.value}", exc)
            continue
        dist = getattr(entry, "dist", None)
        _loaded[module] = Plugin(module, module, dist.name if dist else "", dist.version if dist else "")
    return [p for p in _loaded.values() if p.package]


def _skip_broken(entry: str, exc: BaseException) -> None:
    """Warn once, on stderr, and remember why: a name the broken plug-in would have registered is then unknown,
    and that error names it (`broken_note`)."""
    from okdpipe.console import say

    why = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
    _broken[entry] = why
    say(f"warning: skipping installed plug-in {entry!r} (entry point {ENTRY_POINT_GROUP}): {why}", err=True)


def broken_note() -> str:
    """For an unknown-name error: the installed plug-ins that failed to load, one of which may provide it."""
    if not _broken:
        return ""
    failed = "; ".join(f"{entry!r} ({why})" for entry, why in _broken.items())
    return f"; installed plug-in(s) that failed to load and may provide it: {failed}: fix or uninstall them"


def loaded() -> list[Plugin]:
    return list(_loaded.values())


def loaded_spec(obj: Any) -> str | None:
    """What --plugin takes to load the plug-in `obj` was registered by (named or installed); None when no loaded
    plug-in holds it (okdpipe's own, or registered by the user's own script)."""
    module = getattr(obj, "__module__", "") or ""
    found = [p for p in _loaded.values() if module == p.module or module.startswith(p.module + ".")]
    return found[0].spec if found else None


def provider(obj: Any) -> dict[str, str]:
    """The plug-in an object registered by name comes from, as a model file records it; {} for okdpipe's own."""
    module = getattr(obj, "__module__", "") or ""
    if module == "okdpipe" or module.startswith("okdpipe."):
        return {}
    for plugin in _loaded.values():
        if module == plugin.module or module.startswith(plugin.module + "."):
            return plugin.record()
    package, version = _distribution_of(module) if module else ("", "")
    top = module.split(".")[0]
    return Plugin(top, top, package, version).record()


def missing_plugin_message(record: dict[str, Any], what: str) -> str:
    """One line saying which plug-in must be loaded for `what` and how."""
    spec = str(record.get("plugin", "?"))
    package = str(record.get("package") or "")
    how = f"pass --plugin {spec}" + (f" or install {package}" if package else "")
    return f"{what} comes from plug-in {spec!r}, which is not loaded; {how}"


def checked_plugins(specs: list[str]) -> list[str]:
    """Config validator: naming a plug-in in a config imports it (the only way to check the name), so every
    later registry lookup of that stage sees what it registers. Idempotent; failures are one line. A .py file is
    recorded by its absolute path, so select or export run from another folder find it."""
    return [plugin.spec for plugin in load_plugins(specs)]


PLUGINS_HELP = "plug-in modules (or .py files) to import first; they register backbones, datasets or methods"
PluginNames = Annotated[list[str], AfterValidator(checked_plugins)]
