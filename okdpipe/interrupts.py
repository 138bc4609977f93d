"""An interrupt (Ctrl-C, or SIGTERM/SIGHUP as okdpipe.cli_support.Terminated) stops an export as an interrupt.

Python raises a signal's exception wherever the main thread happens to be, and two places there lose it:
- inside an import: torch's exporter imports lazily, the half-imported module then fails with an AttributeError
  raised while the interrupt unwound, and the exporter wraps that in its own error. The interrupt survives only as
  a `__context__` deep in the chain (seen: SIGTERM during torch.onnx.export ended as "ONNX export failed ... try
  another --opset", exit 2). `reraise_interrupt` finds it and raises it instead.
- inside a weakref callback or `__del__` (importlib's module locks use one): Python prints "Exception ignored"
  and runs on, and okdpipe's handler already ignores further signals, so the export would finish and publish
  after being told to stop. `surfacing_interrupts` keeps such an interrupt so that it is raised before publishing.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


def interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The interrupt `exc` is, or was raised while handling (its causes and contexts, at any depth); None if none."""
    pending, seen = [exc], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        if isinstance(current, KeyboardInterrupt):
            return current
        seen.add(id(current))
        pending += [current.__cause__, current.__context__]
    return None


def reraise_interrupt(exc: BaseException) -> None:
    """Raise the interrupt behind `exc`, if any: for every broad `except` that turns failures into user errors."""
    interrupt = interrupt_behind(exc)
    if interrupt is not None and interrupt is not exc:
        raise interrupt from None


@contextlib.contextmanager
def surfacing_interrupts() -> Iterator[Callable[[], None]]:
    """Within the block, an interrupt leaves as that interrupt: one that an error was raised over, and one that
    Python swallowed (kept, not printed), which stays the reason for any error after it. The block gets a check
    that raises a swallowed interrupt, to call before anything is published."""
    kept: list[KeyboardInterrupt] = []
    previous = sys.unraisablehook

    def keep_interrupts(unraisable) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous(unraisable)
            return
        kept.append(unraisable.exc_value)
        if previous is not sys.__unraisablehook__:  # the CLI's hook sends the signal again: a long build stops now
            previous(unraisable)

    def raise_kept() -> None:
        if kept:
            raise kept[0]

    sys.unraisablehook = keep_interrupts
    try:
        yield raise_kept
    except BaseException as exc:
        reraise_interrupt(exc)
        raise_kept()  # e.g. a module that the swallowed interrupt left half-imported fails later
        raise
    finally:
        sys.unraisablehook = previous
