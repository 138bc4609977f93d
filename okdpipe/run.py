"""The run directory and its manifest: what every stage read and wrote, with hashes.

RUN_DIR/
  config.yaml      the resolved config (YAML < flags < --set)
  manifest.json    versions, device, dataset fingerprint, per-epoch summary, artifacts with sha256
  metrics.jsonl    one JSON object per logged step and per epoch
  checkpoints/     last.pt (+ best.pt), written atomically each epoch
  .lock            held (flock) by the process writing the run; the kernel releases it when that process
                   ends, however it ends, so a stale file never blocks
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from okdpipe import __version__
from okdpipe.config import validation_message
from okdpipe.contracts.versioned import FileFormat
from okdpipe.errors import GateFailed, OkdpipeError
from okdpipe.files import atomic_write_json, file_sha256, kind_of

MANIFEST_VERSION = 1
# Manifests keep their `manifest_version` key (written since version 1); the check is the common one.
MANIFEST = FileFormat(
    "okdpipe-manifest",
    MANIFEST_VERSION,
    "run manifest",
    "re-run the stage into a new directory",
    legacy_key="manifest_version",
)
LOCK_FILE = ".lock"


class ArtifactEntry(BaseModel):
    """One file the manifest vouches for."""

    model_config = ConfigDict(extra="allow")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class ManifestCore(BaseModel):
    """The part of manifest.json every stage relies on; stages add their own sections beside it."""

    model_config = ConfigDict(extra="allow")
    manifest_version: int
    stages: dict[str, Any] = {}
    artifacts: dict[str, ArtifactEntry] = {}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def environment() -> dict[str, Any]:
    """Versions and host facts recorded with every stage."""
    import torch

    return {
        "okdpipe": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


class RunDir:
    """Paths and manifest of one run directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def check_files(self, *more: Path) -> None:
        """Refuse a run directory where training would write through something that is not a regular file: a FIFO
        named metrics.jsonl blocks the first append forever, a device would swallow the checkpoint."""
        if self.checkpoints.exists() and not self.checkpoints.is_dir():
            raise OkdpipeError(f"{self.checkpoints}: not a folder; remove it or choose another --out")
        written = [self.config_path, self.manifest_path, self.metrics_path, self.root / LOCK_FILE, *more]
        for path in written:
            if path.is_symlink() or path.exists() and not path.is_file():
                raise OkdpipeError(
                    f"{path}: not a regular file (a link, folder, device, pipe or socket) where the run writes one; "
                    "remove it or choose another --out"
                )

    def prepare(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise OkdpipeError(f"{self.root}: is {kind_of(self.root)}, not a run directory; choose another --out")
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OkdpipeError(f"{self.root}: cannot create the run directory ({exc.strerror})") from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run directory for writing: a second run into it fails at once, naming the holder."""
        from okdpipe.locks import exclusive_lock

        self.prepare()
        with exclusive_lock(self.root / LOCK_FILE, f"{self.root} is in use by another okdpipe run"):
            yield

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {"manifest_version": MANIFEST_VERSION, "stages": {}, "artifacts": {}}
        try:
            manifest = json.loads(self.manifest_path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise OkdpipeError(f"{self.manifest_path}: corrupt manifest ({getattr(exc, 'msg', exc)})") from None
        except OSError as exc:
            raise OkdpipeError(f"{self.manifest_path}: cannot read the manifest ({exc.strerror})") from None
        check_manifest(manifest, self.manifest_path)
        return manifest

    def update_manifest(self, **sections: Any) -> dict[str, Any]:
        manifest = self.read_manifest()
        manifest.update(sections)
        manifest["updated"] = now_iso()
        atomic_write_json(self.manifest_path, manifest)
        return manifest

    def record_artifact(self, path: Path, recorded_as: Path | None = None, **extra: Any) -> dict[str, Any]:
        """Record `path` (inside the run dir) with its sha256 and size in the manifest, under its own name or
        the name it is about to be renamed to (`recorded_as`)."""
        manifest = self.read_manifest()
        entry = {"sha256": file_sha256(path), "bytes": path.stat().st_size, **extra}
        manifest.setdefault("artifacts", {})[str((recorded_as or path).relative_to(self.root))] = entry
        manifest["updated"] = now_iso()
        atomic_write_json(self.manifest_path, manifest)
        return entry

    def verify_artifact(self, path: Path) -> None:
        """Raise if `path` is missing or differs from the sha256 the manifest recorded."""
        key = str(path.relative_to(self.root))
        entry = self.read_manifest()["artifacts"].get(key)
        if not path.is_file():
            raise OkdpipeError(f"{path}: missing; the run is incomplete (re-run or --resume the distill stage)")
        if entry is None:
            raise OkdpipeError(f"{path}: not recorded in {self.manifest_path.name}; the run directory is incomplete")
        if file_sha256(path) != entry["sha256"]:
            raise OkdpipeError(f"{path}: sha256 differs from the manifest; the file is corrupt or was replaced")

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One JSON line (strict JSON: a NaN is a bug upstream, never written). A torn last line, from a kill
        or a full disk, is dropped on resume."""
        try:
            line = json.dumps(record, allow_nan=False) + "\n"
        except ValueError:
            raise GateFailed(f"a non-finite value in the metrics of epoch {record.get('epoch')}: {record}") from None
        try:
            with open(self.metrics_path, "a") as handle:
                handle.write(line)
        except OSError as exc:
            raise OkdpipeError(f"{self.metrics_path}: cannot write ({exc.strerror})") from None


def check_manifest(manifest: Any, path: Path) -> None:
    """Refuse a manifest of the wrong shape or version in one line (it is read before any file it lists)."""
    if not isinstance(manifest, dict):
        raise OkdpipeError(f"{path}: corrupt manifest (a {type(manifest).__name__}, not an object)")
    MANIFEST.check(manifest, path)
    try:
        core = ManifestCore.model_validate(manifest)
    except ValidationError as exc:
        raise OkdpipeError(f"{path}: corrupt manifest ({validation_message(exc)})") from None
    manifest.setdefault("stages", core.stages)
    manifest.setdefault("artifacts", {})
