"""One advisory lock for a folder being written (a run directory, an export's OUT): `flock` on a lock file,
released by the kernel when the holder exits however it exits (even kill -9), so a stale file never blocks."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

from okdpipe.errors import OkdpipeError


@contextlib.contextmanager
def exclusive_lock(path: Path, busy: str) -> Iterator[None]:
    """Hold `path` (created if missing) exclusively; a second holder fails at once with `busy` and who holds it."""
    import fcntl

    from okdpipe.run import now_iso

    handle = open_lock_file(path)
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


def open_lock_file(path: Path):
    """Open (or create) the lock file itself, never what a link there points to: writing the holder into it would
    clobber someone else's file. A pipe or device there is refused too (opened without blocking, then checked)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        descriptor = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link
            raise OkdpipeError(f"{path} is a link, not okdpipe's lock file; remove it") from None
        raise OkdpipeError(f"{path.parent}: cannot write there ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise OkdpipeError(f"{path} is not a regular file (a pipe or device), not okdpipe's lock file; remove it")
    return os.fdopen(descriptor, "a+")
