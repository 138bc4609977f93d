"""Suite-wide: image folders' decode cache goes to a temporary folder, never into the user's ~/.cache."""

from __future__ import annotations

import os

import pytest


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
