"""Atomic writes and file hashes, shared by every stage (torch-free: the serving path imports it)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import select
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from okdpipe.errors import GateFailed, OkdpipeError

PIPE_WAIT_S = 10.0  # how long a named pipe may stay silent (a writer like `<(cat key)` answers in milliseconds)
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
PATH_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ELOOP, errno.EACCES, errno.EPERM})
MAX_INT_DIGITS = 100  # no figure okdpipe records comes near; a longer integer is damage, not data


def _default_mode() -> int:
    """The mode open() would give a new file (0666 minus the umask); mkstemp's own 0600 would hide model
    cards and checkpoints from a server or container running as another user."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call `write` on a temp file in the same directory, fsync, then rename: never a half-written file. A
    failure to write (disk full, read-only, permissions) is one OkdpipeError line, with the old file intact."""
    _replace_together({Path(path): write})


def atomic_write_files(contents: dict[Path, bytes]) -> None:
    """Replace several files together (a report and its companions): every temp file is written and synced
    before the first rename, so a full disk leaves all the old files and none of the new."""
    _replace_together({Path(path): lambda handle, data=data: handle.write(data) for path, data in contents.items()})


def _replace_together(writers: dict[Path, Callable[[BinaryIO], None]]) -> None:
    """Write every file to a synced temp, then rename them all. Any failure or interrupt removes the temps and
    the folders this call created, so nothing is left half-written and no empty folder is left behind."""
    for path in writers:
        _refuse_special(path, "output")
    created = _make_parents(list(writers))
    written: list[tuple[Path, Path]] = []
    try:
        for path, write in writers.items():
            written.append((_written_temp(path, write), path))
        for tmp, path in written:
            os.replace(tmp, path)
    except BaseException as exc:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        _remove_empty(created)
        if isinstance(exc, OSError):
            raise _cannot_write(path, exc) from None
        raise


def _refuse_broken_link(folder: Path, what: str) -> None:
    """A folder to write into, or one of its ancestors, that is a link to nothing: creating it would fail with
    "File exists" (a dangling link) or "Too many levels of symbolic links" (a loop), naming neither the link."""
    broken = next((p for p in [folder, *folder.parents] if p.is_symlink() and not p.exists()), None)
    if broken is not None:
        raise OkdpipeError(
            f"{what} {folder}: {broken} is a link to nothing (its target is missing, or it loops); "
            "remove the link or choose another path"
        )


def _refuse_special(path: Path, what: str) -> None:
    """An existing target that is not a regular file (a device such as /dev/null, a FIFO, a socket, or a link to
    one) is never replaced: renaming over it would delete a device node as root, and writing into it loses the
    output. A folder is named as such so the user passes a file path inside it; a folder that is a link to nothing
    is named as that."""
    _refuse_broken_link(path.parent, what)
    if path.is_dir():
        raise OkdpipeError(f"{what} {path} is a folder; pass a file path such as {path / 'report.json'}")
    if path.exists() and not path.is_file():
        raise OkdpipeError(
            f"{what} {path} is not a regular file (a device, pipe or socket); pass the path of a file to write"
        )


def _make_parents(paths: list[Path]) -> list[Path]:
    """Create the folders `paths` need; returns those it created, deepest first, so that a failed write can
    remove them again (an interrupted or failed report must not leave an empty folder behind)."""
    created: list[Path] = []
    for path in paths:
        missing = [folder for folder in [path.parent, *path.parent.parents] if not folder.exists()]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _remove_empty(created)
            raise _cannot_write(path, exc) from None
        created = missing + created
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only ever removes an empty folder


def _written_temp(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """A synced temp file beside `path` (whose folder exists) holding what `write` wrote; nothing left behind when
    it fails."""
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{_temp_stem(path.name)}.", suffix=".tmp")
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    tmp = Path(name)
    try:
        os.chmod(tmp, _default_mode())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _cannot_write(path, exc) from None
        raise
    return tmp


def _temp_stem(name: str) -> str:
    """The start of a file's name that its temp file's name keeps: at most 200 bytes, so that the temp's name (14
    bytes more) fits the file system's 255 wherever the file's own name does."""
    return os.fsdecode(os.fsencode(name)[:200])


def disk_error(exc: BaseException) -> OSError | None:
    """The full-disk, quota or read-only error behind `exc` (libraries wrap it in their own exception types), or
    None: such a failure is the machine's state, not a bug, and deserves one line rather than a traceback."""
    return _os_error_behind(exc, DISK_ERRNOS)


@contextlib.contextmanager
def writes_into(folder: Path) -> Iterator[None]:
    """Name `folder` when a library's write fails for a full disk: onnx and onnxruntime raise ENOSPC without a file
    name, and a library that writes from C++ may leave a truncated file that the next step fails to parse (a
    protobuf DecodeError). Any failure while the disk holding `folder` is (almost) full is reported as that."""
    try:
        yield
    except OkdpipeError:
        raise
    except Exception as exc:
        full = disk_error(exc)
        if full is not None and full.filename:
            raise  # the error names its file already
        if full is None and not disk_nearly_full(folder):
            raise
        raise OkdpipeError(full_disk_message(folder, full.strerror if full else "the disk is full")) from None


def full_disk_message(where: str | os.PathLike | None, reason: str) -> str:
    """The one line for a write the disk refused (full, quota, read-only), naming where when that is known."""
    prefix = f"{where}: " if where else ""
    return f"{prefix}cannot write ({reason}); free space or choose another --out"


def disk_nearly_full(folder: Path, margin: int = 1 << 20) -> bool:
    """Less than `margin` bytes free on the file system that holds `folder` (or its nearest existing parent)."""
    try:
        return shutil.disk_usage(nearest_existing(folder)).free < margin
    except OSError:
        return False


def nearest_existing(path: Path) -> Path:
    """`path` itself or its nearest ancestor that exists (the root always does)."""
    return next(ancestor for ancestor in [path, *path.parents] if ancestor.exists())


def path_error(exc: BaseException) -> OSError | None:
    """The error behind `exc` that a path itself causes wherever it is used (a name too long, a link loop, no
    permission), or None. Any command may meet one in any path the user gives; it is never okdpipe's bug."""
    return _os_error_behind(exc, PATH_ERRNOS)


def _os_error_behind(exc: BaseException, errnos: frozenset[int]) -> OSError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in errnos:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def path_error_message(exc: OSError, what: str = "") -> str:
    """One line for a path_error: what the path is for (when known), the path (a long one shortened) and what to
    do."""
    name = os.fsdecode(exc.filename) if exc.filename is not None else "a path"
    if len(name) > 120:
        name = f"{name[:60]}...{name[-40:]} ({len(os.fsencode(name))} bytes)"
    fix = {
        errno.ENAMETOOLONG: "each folder or file name may have at most 255 bytes; choose a shorter path",
        errno.ELOOP: "a symbolic link on it points back into itself; fix the link",
    }.get(exc.errno, "choose a path you may read and write, or change its permissions")
    reason = f"{exc.strerror} for the file system" if exc.errno == errno.ENAMETOOLONG else exc.strerror
    return f"{what + ' ' if what else ''}{name}: {reason}; {fix}"


def _cannot_write(path: Path, exc: OSError) -> OkdpipeError:
    """One line for a write that failed before its rename: a path the file system refuses is named as that (not as
    a full disk), and the line says what is left there, an earlier file untouched or no file at all."""
    if exc.errno in PATH_ERRNOS and exc.filename is not None:
        return OkdpipeError(path_error_message(exc))
    left = "the previous file is unchanged" if path.is_file() else f"no file was written at {path.name}"
    return OkdpipeError(f"{path}: cannot write ({exc.strerror or exc}); {left}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode()))


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json_text(data, path))


def json_text(data: Any, path: str | os.PathLike) -> str:
    """Strict JSON (what loads_finite reads back): a NaN or infinity is never recorded as if it were a figure."""
    try:
        return json.dumps(data, indent=2, allow_nan=False) + "\n"
    except ValueError:
        raise GateFailed(f"{path}: not written: it would record a non-finite number (NaN or inf)") from None


def loads_finite(text: str) -> Any:
    """json.loads that refuses NaN and Infinity (ValueError "non-finite number (NaN)"): okdpipe writes strict JSON
    (allow_nan=False), so a file holding them is damaged or not ours, never a figure to report or gate on. JSON
    nested deeper than Python's recursion limit (`[[[[...]]]]`, a few KB) is a JSONDecodeError like any other
    malformed file, not a RecursionError traceback."""

    def refuse(token: str) -> None:
        raise ValueError(f"non-finite number ({token})")

    def integer(digits: str) -> int:  # int() itself refuses past 4300 digits, in a paragraph
        if len(digits) > MAX_INT_DIGITS:
            raise json.JSONDecodeError(f"an integer of {len(digits):,} digits", "", 0)
        return int(digits)

    def number(digits: str) -> float:  # 1e999 is valid JSON, and float() makes it inf
        value = float(digits)
        if not math.isfinite(value):
            refuse(digits[:24])
        return value

    try:
        return json.loads(text, parse_constant=refuse, parse_int=integer, parse_float=number)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text if isinstance(text, str) else "", 0) from None


def read_user_file(path: str | os.PathLike, what: str, limit: int, wait_s: float | None = None) -> bytes:
    """A small file a user names (a config, a key, a list, a policy), read boundedly in size and time: a folder, an
    unreadable path or more than `limit` bytes (/dev/zero) is one line, and so is a pipe that stays silent for
    `wait_s` (a FIFO nobody writes blocks open() and read() forever). Process substitution, `<(vault read ...)`,
    works: its writer answers at once."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # never blocks, even on a FIFO without a writer
    except IsADirectoryError:
        raise OkdpipeError(f"{path}: the {what} is a folder; pass a file") from None
    except OSError as exc:
        if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP):  # the path is at fault, not the file it names
            raise OkdpipeError(path_error_message(exc, what)) from None
        reason = "not found" if isinstance(exc, FileNotFoundError) else f"cannot read it ({exc.strerror})"
        raise OkdpipeError(f"{path}: {what} {reason}") from None
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise OkdpipeError(f"{path}: the {what} is a folder; pass a file")
    with os.fdopen(fd, "rb", buffering=0) as handle:
        data = _read_within(handle, limit + 1, PIPE_WAIT_S if wait_s is None else wait_s, f"{path}: the {what}")
    if len(data) > limit:
        raise OkdpipeError(f"{path}: the {what} is larger than {limit:,} bytes; is it the right file?")
    return data


def _read_within(handle, size: int, wait_s: float, what: str) -> bytes:
    """Up to `size` bytes until end of file; a pipe or device that sends nothing for `wait_s` is an error."""
    deadline = time.monotonic() + wait_s
    chunks: list[bytes] = []
    received = 0
    while received < size:
        if not select.select([handle], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise OkdpipeError(f"{what} sent nothing for {wait_s:g} s (a pipe nobody writes?); pass a file")
        try:
            chunk = handle.read(size - received)
        except OSError as exc:
            raise OkdpipeError(f"{what}: cannot read it ({exc.strerror})") from None
        if chunk is None:  # a pipe with nothing after all
            continue
        if not chunk:  # end of file (a regular file is always "ready")
            break
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256, streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_can_write_file(path: str | os.PathLike, what: str) -> None:
    """Refuse, before minutes of work, an output file path that cannot be written: a folder, a path through a
    file, or a read-only folder. Nothing is created here: the write creates missing folders (and removes them
    again if it fails), so a refused or interrupted run leaves no empty folder behind."""
    path = Path(path)
    _refuse_special(path, what)
    check_can_create_folder(path.parent, what)


def recorded_path(value: str | None) -> str | None:
    """A path the user typed, as configs and records keep it: absolute (`~` expanded), since select, export,
    bench and a resume read the record from another folder. Blank and None pass through for the validators."""
    return os.path.abspath(os.path.expanduser(value)) if value and value.strip() else value


def kind_of(path: Path) -> str:
    """What stands at an existing path, for a message: /dev/null is not "a file" to the user who typed it."""
    if path.is_dir():
        return "a folder"
    return "a file" if path.is_file() else "a device, pipe or socket"


def not_ours_to_replace(path: Path, folder: bool) -> bool:
    """Something other than a real folder (folder=True) or regular file stands at `path`: a link, a pipe, a device
    or the other kind. Publishing moves what is there aside and drops it, so that is someone else's, not ours."""
    return path.is_symlink() or path.exists() and not (path.is_dir() if folder else path.is_file())


def missing_or_kind(path: Path, wanted: str) -> str:
    """Why `path` is not `wanted` (given with its article): "no such run directory" when nothing is there, else
    what is there instead ("is a device, pipe or socket, not a run directory")."""
    if path.is_symlink() and not path.exists():
        return f"is a link to nothing (its target is missing, or it loops), not {wanted}"
    if not path.exists():
        return "no such " + wanted.split(" ", 1)[1]
    return f"is {kind_of(path)}, not {wanted}"


def check_can_create_folder(folder: str | os.PathLike, what: str) -> None:
    """Refuse a folder that cannot be created or written into, leaving nothing behind: its nearest existing
    ancestor must be a folder in which a folder can really be made (permission bits say nothing to root, nor about
    /proc or a read-only mount, so a probe folder is made and removed)."""
    folder = Path(folder)
    _refuse_broken_link(folder, what)
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise OkdpipeError(f"{what} {folder}: {existing} is {kind_of(existing)}, not a folder; choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".okdpipe-probe-"))
    except OSError as exc:
        raise OkdpipeError(
            f"{what} {folder}: {existing} is not writable ({exc.strerror or exc}); choose another path"
        ) from None
