"""One advisory lock for a folder being written (a run directory, an export's OUT): `flock` on a lock file,
released by the kernel when the holder exits however it exits (even kill -9), so a stale file never blocks."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from okdpipe.errors import OkdpipeError


@contextlib.contextmanager
def exclusive_lock(path: Path, busy: str) -> Iterator[None]:
    """Hold `path` (created if missing) exclusively; a second holder fails at once with `busy` and who holds it."""
    import fcntl

    from okdpipe.run import now_iso

    try:
        handle = open(path, "a+")
    except OSError as exc:
        raise OkdpipeError(f"{path.parent}: cannot write there ({exc.strerror})") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(200).strip() or "another process"
            raise OkdpipeError(f"{busy} ({holder}); wait for it to finish or choose another --out") from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {now_iso()}\n")
        handle.flush()
        yield
