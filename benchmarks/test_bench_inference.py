"""ONNX Runtime latency of an exported artifact per batch size: what `okdpipe serve` pays per request batch."""

from __future__ import annotations

import numpy as np
import pytest

ARCHS = ("resnet8", "resnet20")
PRECISIONS = ("fp32", "int8")
BATCH_SIZES = (1, 8, 64)


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_ort_inference(benchmark, exported, pinned_threads, arch, precision, batch_size):
    from okdpipe.export import onnx_export
    from okdpipe.export.exporter import ONNX_FILE
    from okdpipe.ortsession import create_session

    # the session `okdpipe serve` and `okdpipe bench` build for this artifact and thread count
    session, _ = create_session(exported(arch)[precision] / ONNX_FILE, threads=pinned_threads)
    inputs = np.random.default_rng(0).standard_normal((batch_size, 1, 28, 28)).astype(np.float32)
    benchmark.extra_info.update(images=batch_size, threads=pinned_threads)
    logits = benchmark(onnx_export.run_session, session, inputs)
    assert logits.shape == (batch_size, 10) and np.isfinite(logits).all()
