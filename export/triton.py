"""A Triton Inference Server model repository entry for an exported ONNX model.

Layout (Triton "Model Repository" docs): REPO/<model name>/config.pbtxt and REPO/<model name>/<version>/
model.onnx, `model.onnx` being the onnxruntime backend's default file name. The model card sits beside
the .onnx in the version directory, so that directory is also an okdpipe artifact directory.
With max_batch_size > 0 Triton owns the batch axis: dims in the config leave it out.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from okdpipe.contracts.card import CARD_NAME
from okdpipe.errors import OkdpipeError
from okdpipe.files import atomic_write_text

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "uint8": "TYPE_UINT8", "int64": "TYPE_INT64"}
INSTANCE_KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
MODEL_VERSION = "1"


def _tensor_entry(tensor: dict) -> str:
    dims = ", ".join(str(int(d)) for d in tensor["shape"][1:])  # drop the batch axis, Triton adds it
    return (
        f'  {{\n    name: "{tensor["name"]}"\n    data_type: {TRITON_DTYPES[tensor["dtype"]]}\n'
        f"    dims: [ {dims} ]\n  }}"
    )


def triton_config(name: str, card: dict, max_batch_size: int = 64, instance: str = "cpu", count: int = 1) -> str:
    """config.pbtxt text (protobuf text format of Triton's ModelConfig) for the model a card describes."""
    if max_batch_size < 1:
        raise OkdpipeError(f"--triton-max-batch-size must be >= 1 (got {max_batch_size}): the model has a batch axis")
    if instance not in INSTANCE_KINDS:
        raise OkdpipeError(f"unknown Triton instance kind {instance!r}; choose one of: cpu, gpu")
    return (
        f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {max_batch_size}\n'
        f"input [\n{_tensor_entry(card['input'])}\n]\n"
        f"output [\n{_tensor_entry(card['output'])}\n]\n"
        f"dynamic_batching {{ }}\n"
        f"instance_group [\n  {{\n    kind: {INSTANCE_KINDS[instance]}\n    count: {count}\n  }}\n]\n"
    )


def write_triton_model(
    repository: str | os.PathLike,
    name: str,
    artifact_dir: str | os.PathLike,
    card: dict,
    max_batch_size: int = 64,
    instance: str = "cpu",
) -> Path:
    """Copy an artifact directory into REPO/<name>/1/ and write REPO/<name>/config.pbtxt; returns REPO/<name>.
    `okdpipe export` builds into its staging folder with this, then publishes REPO/<name> whole by renames that a
    failure, an interrupt or a kill undoes (exporter.prepare_publish and publish)."""
    model_dir = Path(repository) / name
    version_dir = model_dir / MODEL_VERSION
    version_dir.mkdir(parents=True, exist_ok=True)
    for file_name in (card["file"], CARD_NAME):
        shutil.copy2(Path(artifact_dir) / file_name, version_dir / file_name)
    text = triton_config(name, card, max_batch_size=max_batch_size, instance=instance)
    atomic_write_text(model_dir / "config.pbtxt", text)
    return model_dir
