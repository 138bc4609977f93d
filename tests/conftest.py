"""Suite-wide: the shared data fixtures (tests/unit/datafixtures.py) importable from every test folder, and image
folders' decode cache in a temporary folder, never in the user's ~/.cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "unit"))  # `from datafixtures import ...` in serve/, cli/, e2e/


@pytest.fixture(autouse=True, scope="session")
def private_decode_cache(tmp_path_factory):
    """OKDPIPE_CACHE for this process and every CLI or server subprocess the tests start."""
    previous = os.environ.get("OKDPIPE_CACHE")
    os.environ["OKDPIPE_CACHE"] = str(tmp_path_factory.mktemp("decode-cache"))
    yield
    if previous is None:
        os.environ.pop("OKDPIPE_CACHE", None)
    else:
        os.environ["OKDPIPE_CACHE"] = previous


@pytest.fixture(scope="session")
def write_plugin(tmp_path_factory):
    """write_plugin(module, source) -> the path of a plug-in file `module`.py, in a folder of its own. A module name
    is imported once per session, so fixtures that write one are module- or session-scoped."""

    def write(module: str, source: str) -> Path:
        path = tmp_path_factory.mktemp(module) / f"{module}.py"
        path.write_text(source)
        return path

    return write
