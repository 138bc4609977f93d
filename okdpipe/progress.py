"""Progress on long work (accuracy over a split, and the like): a bar on a terminal, a plain line in logs.

On a terminal (stderr is a TTY) a transient rich bar shows done/total and the time left. In a log a bar would be
noise, so one plain line is written at the end, and only for work that took long enough for someone to wonder
(LOG_AFTER_SECONDS). Nothing is shown under --quiet. Torch-free: serving and the stage contracts may use it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

from okdpipe.console import QUIET, say, verbosity

LOG_AFTER_SECONDS = 20.0


@contextlib.contextmanager
def progress(total: int, label: str, unit: str = "images") -> Iterator[Callable[[int], None]]:
    """Yields `advance(n)`: n more of `total` done."""
    started = time.monotonic()
    done = [0]
    if verbosity() > QUIET and sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(label, total=total)
            yield lambda n: bar.advance(task, n)
        return
    yield lambda n: done.__setitem__(0, done[0] + n)
    seconds = time.monotonic() - started
    if seconds >= LOG_AFTER_SECONDS:
        say(f"{label}: {done[0]:,} {unit} in {seconds:.0f} s", err=True)
