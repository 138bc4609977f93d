"""Image files -> uint8 pixels: the decoder, and decoding a whole split in worker processes with progress.

A file that cannot be decoded (truncated, not an image, missing) does not stop the others: its reason is
collected, so the loader can list every bad file at once and then refuse or skip them (--skip-bad-images).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from okdpipe.console import QUIET, say, verbosity
from okdpipe.contracts.pixels import IMAGE_FORMATS, MAX_IMAGE_PIXELS, image_pixels
from okdpipe.errors import OkdpipeError

CHUNK = 64  # files per task sent to a worker: large enough to amortise pickling, small enough for a smooth bar
PLAIN_PROGRESS_EVERY_S = 10.0  # off a terminal (CI logs), one progress line at most this often


@dataclass(frozen=True)
class ImageDecoder:
    """File -> HWC uint8 at `size` (H, W) with `channels` (1 or 3), by okdpipe.contracts.pixels (the same function
    `okdpipe serve` uses); picklable so worker processes can use it.

    policy: how an image of another size reaches `size` ("stretch" or "shorter-side"); exact=True makes another
    size an error instead (fixed-size datasets like CINIC-10).
    """

    size: tuple[int, int]
    channels: int = 3
    policy: str = "stretch"
    exact: bool = False

    @property
    def key(self) -> str:
        """Everything that changes the decoded pixels, for the decode cache."""
        return f"{self.size[0]}x{self.size[1]}x{self.channels}/{self.policy}/{'exact' if self.exact else 'resized'}"

    def __call__(self, path: Path) -> np.ndarray:
        return self.decode(read_image(path), path)

    def decode(self, raw: bytes, path: Path) -> np.ndarray:
        """Pixels, or one OkdpipeError naming the file and why."""
        try:
            return self.pixels(raw)
        except BadImage as error:
            raise OkdpipeError(f"{path}: {error}; replace or delete the file") from None

    def pixels(self, raw: bytes) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:  # checked from the header, before decoding
                    raise BadImage(
                        f"image of {image.width}x{image.height} pixels is over the {MAX_IMAGE_PIXELS:,}-pixel limit "
                        "that okdpipe serve applies too; shrink it"
                    )
                if self.exact and image.size != (self.size[1], self.size[0]):
                    height, width = self.size
                    raise BadImage(f"image is {image.height}x{image.width}, expected {height}x{width}")
                return image_pixels(image, self.channels, self.size, self.policy)
        except BadImage:
            raise
        except UnidentifiedImageError:
            raise BadImage(f"cannot decode image (not one of the formats read: {', '.join(IMAGE_FORMATS)})") from None
        except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
            raise BadImage(f"cannot decode image ({error or type(error).__name__})") from None


class BadImage(Exception):
    """Why one file gave no pixels."""


def read_image_file(path: Path) -> bytes:
    """A file's bytes, only when it is a regular file: read() on a FIFO nobody writes blocks forever and a device
    (/dev/zero) never ends, so either is a bad image, and so is a folder named like an image (photo.jpg/).
    O_NONBLOCK: even opening the FIFO must not wait; the kind is taken from the opened file, not the name."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        kind = special_kind(os.fstat(fd).st_mode)
        if kind:
            raise BadImage(f"not a regular file but {kind}")
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read()
    finally:
        os.close(fd)


def special_kind(mode: int) -> str:
    """What a non-regular file is, in words ("" for a regular file)."""
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a pipe (FIFO)"), (stat.S_ISSOCK, "a socket"))
    if stat.S_ISREG(mode):
        return ""
    return next((word for test, word in kinds if test(mode)), "a device")


def read_image(path: Path) -> bytes:
    """read_image_file, or one OkdpipeError naming the file (for datasets that refuse every bad file: CINIC-10)."""
    try:
        return read_image_file(path)
    except OSError as error:
        raise OkdpipeError(f"{path}: cannot read ({error.strerror or error}); replace or delete the file") from None
    except BadImage as error:
        raise OkdpipeError(f"{path}: {error}; replace or delete the file") from None


def decode_chunk(decoder: ImageDecoder, paths: Sequence[Path]) -> list[np.ndarray | str]:
    """Each file's pixels, or the reason it has none (a worker's task: one bad file must not fail the chunk)."""
    results: list[np.ndarray | str] = []
    for path in paths:
        try:
            results.append(decoder.pixels(read_image_file(path)))
        except OSError as error:
            results.append(f"cannot read ({error.strerror or error})")
        except BadImage as error:
            results.append(str(error))
    return results


def decode_files(paths: Sequence[Path], decoder: ImageDecoder, workers: int, label: str) -> list[np.ndarray | str]:
    """decode_chunk over every file, in order, on `workers` processes (in this one for a single chunk)."""
    chunks = [paths[start : start + CHUNK] for start in range(0, len(paths), CHUNK)]
    workers = min(workers, len(chunks))
    if multiprocessing.current_process().daemon:
        workers = 1  # a daemonic process (a DataLoader worker) may not start children
    results: list[np.ndarray | str] = []
    with progress(len(paths), label) as advance:
        if workers <= 1:
            for chunk in chunks:
                results += decode_chunk(decoder, chunk)
                advance(len(results))
            return results
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for decoded in pool.map(decode_chunk, repeat(decoder), chunks):
                results += decoded
                advance(len(results))
    return results


def default_workers() -> int:
    """The CPUs this process may use (a container's or taskset's limit, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def progress(total: int, label: str) -> Iterator:
    """A rich bar on a terminal; off one (CI logs, pipes) a plain line at most every PLAIN_PROGRESS_EVERY_S
    seconds and a closing one, only when decoding takes that long (a quick decode prints nothing: stdout may
    carry --json, and a bad-input error must stay the one line on stderr)."""
    if verbosity() <= QUIET:
        yield lambda done: None
    elif sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(label, total=total)
            yield lambda done: bar.update(task, completed=done)
    else:
        lines = PlainProgress(total, label)
        yield lines.advance
        if lines.printed:
            say(f"{label}: {total:,} images in {time.monotonic() - lines.start:.1f} s", err=True)


class PlainProgress:
    """`label: done/total images` lines on stderr, at most one per PLAIN_PROGRESS_EVERY_S."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.printed = total, label, False
        self.start = self.last = time.monotonic()

    def advance(self, done: int) -> None:
        if done < self.total and time.monotonic() - self.last >= PLAIN_PROGRESS_EVERY_S:
            self.last, self.printed = time.monotonic(), True
            say(f"{self.label}: {done:,}/{self.total:,} images", err=True)
