"""Shared fixtures of the pytest-benchmark suite (`pytest benchmarks --benchmark-only`; see README.md here).

Everything is built from untrained weights and the synthetic dataset shaped like Fashion-MNIST (28x28x1,
10 classes): speed does not depend on what the weights or pixels are, and the suite needs no data files.
Threads are pinned (OKDPIPE_BENCH_THREADS, default 1) so saved baselines compare like with like.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The synthetic loader's options for a Fashion-MNIST-shaped dataset: 1024 training images, 256 held out.
FMNIST_SHAPED = {"num_classes": 10, "size": 28, "channels": 1, "n_train": 1280, "n_test": 64}
VAL_SPLIT = 0.2
THREADS = int(os.environ.get("OKDPIPE_BENCH_THREADS", "1"))


@pytest.fixture(scope="session", autouse=True)
def pinned_threads() -> int:
    torch.set_num_threads(THREADS)
    return THREADS


@pytest.fixture(scope="session")
def fmnist_shaped():
    """The synthetic DataBundle shaped like Fashion-MNIST."""
    from okdpipe.datasets import load_dataset

    return load_dataset("synthetic", val_split=VAL_SPLIT, **FMNIST_SHAPED)


def export_untrained(arch: str, spec, work: Path) -> dict[str, Path]:
    """`okdpipe export --quantize int8` of an untrained `arch` (the real path: parity checks, model cards)."""
    from okdpipe.distill.models import create_model
    from okdpipe.export.config import ExportConfig
    from okdpipe.export.exporter import export_model
    from okdpipe.modelfile import ModelInfo, save_model_file

    torch.manual_seed(0)
    info = ModelInfo(
        arch=arch,
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        input_size=spec.input_size,
        mean=spec.mean,
        std=spec.std,
        labels=spec.labels,
        dataset="synthetic",
        provenance={"data": {"dataset": "synthetic", "val_split": VAL_SPLIT, "seed": 0, "options": FMNIST_SHAPED}},
    )
    model_path = work / f"{arch}.pt"
    save_model_file(create_model(arch, spec.num_classes, spec.in_channels), info, model_path)
    # Untrained weights make accuracy noise; the drop limit is off because only speed is measured here.
    config = ExportConfig(quantize="int8", calib_size=64, max_accuracy_drop=100.0)
    return {card.directory.name: card.directory for card in export_model(model_path, work / arch, config)}


@pytest.fixture(scope="session")
def exported(tmp_path_factory, fmnist_shaped):
    """arch -> {"fp32": dir, "int8": dir}, built once per session on first use."""
    built: dict[str, dict[str, Path]] = {}

    def get(arch: str) -> dict[str, Path]:
        if arch not in built:
            built[arch] = export_untrained(arch, fmnist_shaped.spec, tmp_path_factory.mktemp(f"export-{arch}"))
        return built[arch]

    return get


@pytest.fixture(scope="session")
def train_session(tmp_path_factory):
    """method, batch_size -> a distill.trainer Session (ResNet-8 students, Fashion-MNIST-shaped data, CPU)."""
    from okdpipe.config import DistillConfig
    from okdpipe.distill.trainer import build_session
    from okdpipe.run import RunDir

    def build(method: str, batch_size: int):
        cfg = DistillConfig(
            method=method,
            arch="resnet8",
            dataset="synthetic",
            data_options=FMNIST_SHAPED,
            val_split=VAL_SPLIT,
            batch_size=batch_size,
            epochs=1,
            device="cpu",
        )
        return build_session(cfg, RunDir(tmp_path_factory.mktemp(method)))

    return build
