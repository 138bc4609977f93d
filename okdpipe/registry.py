"""One generic name -> object registry, used for backbones, methods and datasets.

A name a registry does not hold may come from a plug-in not imported yet (okdpipe/plugins.py): the registry
loads the pending ones (installed entry points, the environment's OKDPIPE_PLUGINS) before it gives up."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from okdpipe.errors import OkdpipeError

T = TypeVar("T")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # what --arch a,b / timm:NAME / a config list can select


class Registry(Generic[T]):
    """Maps names to objects; `register` works as a decorator."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        if not isinstance(name, str) or not NAME.fullmatch(name):  # a plug-in's mistake, at its import: one line
            raise ValueError(
                f"{self.kind} name {name!r} cannot be selected: use letters, digits, '_', '-' and '.' only "
                "(no ',' which separates names, no ':' which marks timm:/torchvision:, no spaces)"
            )

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str, also: tuple[str, ...] = ()) -> T:
        """The object registered as `name`; an unknown name is one line listing the registered names and `also`
        (other forms the caller accepts, e.g. timm:NAME), and any installed plug-in that failed to load."""
        if name not in self._items:
            _load_pending_plugins()
        if name not in self._items:
            from okdpipe.plugins import broken_note

            choices = [*sorted(self._items), *also]
            known = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else "".join(choices)
            raise OkdpipeError(f"unknown {self.kind} {name!r}; choose one of: {known}{broken_note()}")
        return self._items[name]

    def names(self) -> list[str]:
        """The names registered so far (installed plug-ins are not imported for this: see get)."""
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _load_pending_plugins() -> None:
    from okdpipe.plugins import load_pending

    load_pending()
