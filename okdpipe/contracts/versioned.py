"""One header check for every versioned file okdpipe writes: `{"format": NAME, "format_version": N, ...}`.

A reader names the versions it understands (the current one and older ones it can still read); anything else
is a one-line error that says what the file is and how to get a current one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from okdpipe.errors import OkdpipeError


@dataclass(frozen=True)
class FileFormat:
    """A versioned file format: its header name, the version written now, older versions still read."""

    name: str
    version: int
    what: str  # "model card", for messages
    fix: str  # how to get a current file, for messages
    also_reads: tuple[int, ...] = ()
    legacy_key: str | None = None  # files from before the common header carried `{legacy_key: 1}` instead

    def header(self) -> dict[str, Any]:
        return {"format": self.name, "format_version": self.version}

    def check(self, payload: Any, where: object) -> int:
        """The file's version after checking its header; raises OkdpipeError naming `where` otherwise."""
        if self.legacy_key and isinstance(payload, dict) and "format" not in payload and self.legacy_key in payload:
            payload = {"format": self.name, "format_version": payload[self.legacy_key]}
        if not isinstance(payload, dict) or payload.get("format") != self.name:
            raise OkdpipeError(f"{where}: not an okdpipe {self.what} (no 'format: {self.name}' header); {self.fix}")
        version = payload.get("format_version")
        readable = (self.version, *self.also_reads)
        if type(version) is not int or version not in readable:  # 1.0 and true compare equal to 1: refused
            raise OkdpipeError(
                f"{where}: {self.what} format_version {version!r} is not supported (this okdpipe reads "
                f"{', '.join(map(str, readable))}); {self.fix}"
            )
        return version
