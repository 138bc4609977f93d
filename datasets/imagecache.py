"""The decode cache: a split's decoded uint8 images on disk, so later epochs and later runs do not decode again.

One file per (listed folder or list file, decoder settings) in the cache directory: $OKDPIPE_CACHE, else
$XDG_CACHE_HOME/okdpipe/decoded, else ~/.cache/okdpipe/decoded. Inside, the key it was built for: sha256 over the
listing (every file's path, size, mtime, inode, change time and label, in order) and the decoder (size, channels,
resize policy). A changed, added or removed file changes the key, and the file is rebuilt in place (the cache
never grows with stale copies). The file is an uncompressed .npz written atomically; zip's CRC-32 on every member
catches a damaged file when it is read, and a damaged or inconsistent file is decoded again, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from okdpipe.console import say
from okdpipe.errors import OkdpipeError
from okdpipe.files import atomic_write

CACHE_ENV = "OKDPIPE_CACHE"
CACHE_FORMAT = 2  # 2: the key holds inodes and change times


@dataclass
class Decoded:
    """A split's decode: the pixels of the files that decoded (uint8 [N, C, H, W]), their positions in the listing,
    and (position, reason) for each file that did not."""

    images: np.ndarray
    kept: np.ndarray
    bad: list[tuple[int, str]]

    @classmethod
    def of(cls, results: list, shape: tuple[int, int, int]) -> Decoded:
        """From decode_files' results: HWC pixels or a reason string per file."""
        kept = [i for i, result in enumerate(results) if not isinstance(result, str)]
        bad = [(i, result) for i, result in enumerate(results) if isinstance(result, str)]
        images = np.stack([results[i] for i in kept]) if kept else np.zeros((0, shape[1], shape[2], shape[0]), np.uint8)
        return cls(np.ascontiguousarray(images.transpose(0, 3, 1, 2)), np.asarray(kept, dtype=np.int64), bad)

    def check(self, total: int, shape: tuple[int, int, int]) -> None:
        """Consistent with a listing of `total` files decoded to `shape` (C, H, W); ValueError if not."""
        kept, bad = self.kept, [i for i, _ in self.bad]
        if self.images.dtype != np.uint8 or self.images.shape != (len(kept), *shape):
            raise ValueError(f"images {self.images.dtype} {self.images.shape}, expected uint8 (N, {shape})")
        if len(kept) + len(bad) != total or sorted({*kept.tolist(), *bad}) != list(range(total)):
            raise ValueError("kept and bad positions do not cover the listing")
        if len(kept) and (kept.dtype != np.int64 or np.any(np.diff(kept) <= 0)):
            raise ValueError("kept positions are not increasing")


def cache_dir() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "okdpipe" / "decoded"


def listing_key(lines: list[str], decoder_key: str) -> str:
    digest = hashlib.sha256(f"okdpipe-decoded/{CACHE_FORMAT}\n{decoder_key}\n".encode())
    for line in lines:
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class ImageCache:
    """The cache file of one listed source (a split folder or a list file) decoded one way."""

    path: Path

    @classmethod
    def of(cls, source: Path, decoder_key: str, directory: Path | None = None) -> ImageCache:
        name = hashlib.sha256(f"{source.resolve()}\n{decoder_key}".encode()).hexdigest()[:32]
        return cls((directory or cache_dir()) / f"{name}.npz")

    def load(self, key: str, total: int, shape: tuple[int, int, int]) -> Decoded | None:
        """The cached decode for `key`; None when absent, built for another listing, or damaged (said so)."""
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as archive:
                meta = json.loads(str(archive["meta"]))
                if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
                    return None  # the folder changed since: rebuilt, silently
                decoded = Decoded(archive["images"], archive["kept"], [(int(i), str(r)) for i, r in meta["bad"]])
            decoded.check(total, shape)
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as error:
            say(f"decode cache {self.path} is damaged ({error}); decoding again", err=True)
            return None
        return decoded

    def save(self, key: str, decoded: Decoded) -> None:
        """Write atomically; a cache that cannot be written (read-only, full disk) costs time, not the run."""
        meta = json.dumps({"format": CACHE_FORMAT, "key": key, "bad": decoded.bad})
        try:
            atomic_write(
                self.path,
                lambda handle: np.savez(handle, images=decoded.images, kept=decoded.kept, meta=np.array(meta)),
            )
        except OkdpipeError as error:
            say(f"decoded images not cached ({error})", err=True)
