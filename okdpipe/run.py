"""The run directory and its manifest: what every stage read and wrote, with hashes.

    RUN_DIR/
      config.yaml      the resolved config (YAML < flags < --set)
      manifest.json    versions, device, dataset fingerprint, per-epoch summary, artifacts with sha256
      metrics.jsonl    one JSON object per logged step and per epoch
      checkpoints/     last.pt (+ best.pt), written atomically each epoch
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from okdpipe import __version__
from okdpipe.errors import OkdpipeError
from okdpipe.files import atomic_write_json, file_sha256

MANIFEST_VERSION = 1


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

    def prepare(self) -> None:
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OkdpipeError(f"{self.root}: cannot create the run directory ({exc.strerror})") from None

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {"manifest_version": MANIFEST_VERSION, "stages": {}, "artifacts": {}}
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise OkdpipeError(f"{self.manifest_path}: corrupt manifest ({exc.msg})") from None
        if manifest.get("manifest_version") != MANIFEST_VERSION:
            raise OkdpipeError(
                f"{self.manifest_path}: manifest version {manifest.get('manifest_version')} is not "
                f"supported by okdpipe {__version__}; re-run the stage into a new directory"
            )
        return manifest

    def update_manifest(self, **sections: Any) -> dict[str, Any]:
        manifest = self.read_manifest()
        manifest.update(sections)
        manifest["updated"] = now_iso()
        atomic_write_json(self.manifest_path, manifest)
        return manifest

    def record_artifact(self, path: Path, **extra: Any) -> dict[str, Any]:
        """Record `path` (inside the run dir) with its sha256 and size in the manifest."""
        manifest = self.read_manifest()
        entry = {"sha256": file_sha256(path), "bytes": path.stat().st_size, **extra}
        manifest.setdefault("artifacts", {})[str(path.relative_to(self.root))] = entry
        manifest["updated"] = now_iso()
        atomic_write_json(self.manifest_path, manifest)
        return entry

    def verify_artifact(self, path: Path) -> None:
        """Raise if `path` is missing or differs from the sha256 the manifest recorded."""
        key = str(path.relative_to(self.root))
        entry = self.read_manifest().get("artifacts", {}).get(key)
        if not path.is_file():
            raise OkdpipeError(f"{path}: missing; the run is incomplete (re-run or --resume the distill stage)")
        if entry is None:
            raise OkdpipeError(f"{path}: not recorded in {self.manifest_path.name}; the run directory is incomplete")
        if file_sha256(path) != entry["sha256"]:
            raise OkdpipeError(f"{path}: sha256 differs from the manifest; the file is corrupt or was replaced")

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
