"""What the commands print, and how much: `--quiet` (errors and machine output only), the default (progress and
results, with third-party libraries' warnings and log noise kept out), `--verbose` (everything, libraries
included). `--json` output always goes to stdout alone, so it can be piped into `jq`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from typing import Any

QUIET, NORMAL, VERBOSE = 0, 1, 2
NOISY_LOGGERS = (
    "onnxruntime",
    "onnxscript",
    "torch",
    "torch.onnx",
    "matplotlib",
    "PIL",
    "albumentations",
    "uvicorn.error",
    "httpx",
)
_level = NORMAL


def set_verbosity(level: int) -> None:
    """Called once by the CLI's top-level options; quietens the libraries below VERBOSE."""
    global _level
    _level = level
    if level >= VERBOSE:
        return
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("ORT_LOG_SEVERITY_LEVEL", "3")  # read by onnxruntime's default logger: errors only
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def verbosity() -> int:
    return _level


def say(text: str = "", *, err: bool = False) -> None:
    """A human line: shown unless --quiet. `err=True` sends it to stderr (used when stdout carries --json)."""
    if _level > QUIET:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)


def emit_json(result: Any) -> None:
    """One machine-readable JSON document on stdout (NaN and inf refused: they are not JSON)."""
    sys.stdout.write(json.dumps(result, indent=1, allow_nan=False, default=str) + "\n")
    sys.stdout.flush()
