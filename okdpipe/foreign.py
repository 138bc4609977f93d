"""Code okdpipe runs but did not write: the backbones, datasets and methods of plug-ins, and timm/torchvision models.

An exception out of such code in the middle of a run (a forward that fails on the validation batch size, a
method's step() that raises at step N, a decode that fails on one file) is the plug-in's failure, not okdpipe's
bug: `blamed` turns it into one line naming the component, its plug-in, where the run was and the exception
(`PluginFailed`, exit 3). Which code is foreign comes from the registry entries the stage uses (okdpipe.plugins
records which plug-in registered what): an exception whose traceback passes through one of those modules, or a
`ForeignBreach` raised by okdpipe's checks on what a foreign component returned, is blamed on it; every other
exception is okdpipe's own bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

from okdpipe.errors import OkdpipeError, PluginFailed


@dataclass(frozen=True)
class Foreign:
    """One component of a stage that foreign code provides, and the module whose frames are that code."""

    kind: str  # backbone, dataset or method
    name: str
    origin: str  # "plug-in 'my_models'" or "timm"
    module: str

    def owns(self, module: str) -> bool:
        return module == self.module or module.startswith(self.module + ".")

    def fix(self) -> str:
        if self.origin.startswith("plug-in"):
            return f"fix the plug-in or choose another {self.kind}"
        return f"choose another {self.kind} (or report it to {self.origin})"


class ForeignBreach(Exception):
    """Raised by okdpipe's own checks on what a component of `kind` returned (a loss that is not a scalar, an image
    of the wrong shape): the component's fault when foreign code provides it, okdpipe's bug otherwise."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def registered(kind: str, name: str, obj: Any) -> Optional[Foreign]:
    """The registry entry `obj` (a builder, loader or method class) as a Foreign part; None for okdpipe's own."""
    from okdpipe.plugins import provider

    record = provider(obj)
    return Foreign(kind, name, f"plug-in {record['plugin']!r}", record["module"]) if record else None


def dataset(name: str) -> list[Foreign]:
    """The dataset `name` as a foreign part when a plug-in registered it (a list: what `blamed` takes)."""
    from okdpipe.datasets import DATASETS

    part = registered("dataset", name, DATASETS.get(name))
    return [part] if part is not None else []


def culprit(exc: BaseException, parts: Iterable[Foreign]) -> Optional[Foreign]:
    """The foreign part to blame for `exc`: the one named by a ForeignBreach, else the one owning the innermost
    frame of its traceback that foreign code owns; None when no foreign code is involved."""
    parts = list(parts)
    if isinstance(exc, ForeignBreach):
        return next((part for part in parts if part.kind == exc.kind), None)
    for frame, _ in reversed(list(traceback.walk_tb(exc.__traceback__))):
        module = frame.f_globals.get("__name__", "")
        owner = next((part for part in parts if part.owns(module)), None)
        if owner is not None:
            return owner
    return None


@contextlib.contextmanager
def blamed(parts: list[Foreign], where: Callable[[], str], after: Callable[[], str] = lambda: "") -> Iterator[None]:
    """Run the block; an exception foreign code caused becomes PluginFailed: `<kind> '<name>' from plug-in 'x'
    failed <where()>: <Type>: <message> — <fix><after()>`. okdpipe's own errors and bugs pass unchanged."""
    try:
        yield
    except OkdpipeError:
        raise
    except Exception as exc:
        part = culprit(exc, parts)
        if part is None:
            raise
        # a breach's message says what came back; any other exception's type says what happened
        what = first_line(exc) if isinstance(exc, ForeignBreach) else f"{type(exc).__name__}: {first_line(exc)}"
        message = f"{part.kind} {part.name!r} from {part.origin} failed {where()}: {what} — {part.fix()}{after()}"
        raise PluginFailed(message) from None


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]
