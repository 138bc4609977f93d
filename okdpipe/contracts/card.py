"""The model card (`model.json`) beside every exported model: its one reader, its one writer, its preprocessing.

An *artifact directory* holds `model.json` and the .onnx file it names. The card records the input contract
(shape, dtype, layout, preprocessing), labels, opset, parity and accuracy figures, runtime versions and
provenance, plus the sha256 of the .onnx (and any external-data file) so a swapped or damaged file is caught
before it serves wrong answers. Export writes it through `write_card`, which validates the card exactly as
`read_card` does, so an artifact that serve or bench would refuse is never written.

Torch-free and numpy-free at import: `okdpipe serve` reads cards from a torch-free install.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from okdpipe.contracts import inputs
from okdpipe.contracts.versioned import FileFormat
from okdpipe.errors import OkdpipeError
from okdpipe.files import atomic_write_text, file_sha256, loads_finite, missing_or_kind

CARD = FileFormat("okdpipe-card", 1, "model card", "re-run `okdpipe export` to rewrite the artifact")
CARD_NAME = "model.json"
MODEL_DTYPES = ("float32", "float16")
PRECISIONS = ("fp32", "fp16", "int8", "int8-dynamic")
STATIC_INT8_OPS = frozenset(
    {"QuantizeLinear", "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearGlobalAveragePool"}
)
DYNAMIC_INT8_OPS = frozenset({"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"})
FLOAT16 = 10  # onnx.TensorProto.FLOAT16
PIXEL_SCALE = 1.0 / 255.0
# How an image of another size reaches the input size (okdpipe.contracts.pixels applies them): "stretch" resizes
# to exactly (H, W); "shorter-side" scales to cover (H, W) and cuts out the centre. Cards without one: stretch.
RESIZE_POLICIES = ("stretch", "shorter-side")


@dataclass(frozen=True)
class Preprocess:
    """Image -> model input: convert to `channels`, bring to (height, width) by the `resize` policy the training
    images went through (okdpipe.contracts.pixels.image_pixels), then x = (pixel * scale - mean[c]) / std[c].

    The one normalisation formula: export's parity and accuracy checks, bench and serve all call `normalise`.
    """

    height: int
    width: int
    channels: int
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "stretch"

    def normalise(self, pixels):
        """uint8 (or float) pixels [N, C, H, W] -> float32 model input of the same shape."""
        import numpy as np

        array = np.asarray(pixels, dtype=np.float32) * np.float32(self.scale)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        return (array - mean) / std

    def as_dict(self) -> dict[str, Any]:
        return {
            "size": [self.height, self.width],
            "channels": self.channels,
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
        }


@dataclass(frozen=True)
class ModelCard:
    """A model card, checked against the files beside it. `raw` keeps every recorded field (parity, accuracy,
    quantization, runtime) for reports."""

    name: str
    precision: str
    model_path: Path
    input_name: str
    input_dtype: str
    output_name: str
    channels: int
    height: int
    width: int
    num_classes: int
    preprocess: Preprocess
    labels: tuple[str, ...]
    opset: int | None
    provenance: dict[str, Any]
    raw: dict[str, Any]

    @property
    def directory(self) -> Path:
        return self.model_path.parent


def read_card(artifact_dir: str | os.PathLike) -> ModelCard:
    """Read and validate `artifact_dir/model.json` and the hashes of the files it names."""
    artifact_dir = Path(artifact_dir)
    return parse_card(_load_card_json(artifact_dir), artifact_dir)


def write_card(artifact_dir: str | os.PathLike, fields: dict[str, Any]) -> ModelCard:
    """Write `fields` as DIR/model.json with the header and the sha256 of the file it names filled in here, so a
    card never describes a file it was not written beside; refused, writing nothing, if the card is invalid."""
    artifact_dir = Path(artifact_dir)
    onnx_name = fields.get("file")
    if not isinstance(onnx_name, str) or not (artifact_dir / onnx_name).is_file():
        raise OkdpipeError(f"{artifact_dir}: cannot write a card for a missing model file {onnx_name!r}")
    raw = {**CARD.header(), **fields, **CARD.header(), "sha256": _hashes(artifact_dir, onnx_name)}
    card = parse_card(raw, artifact_dir)
    try:
        text = json.dumps(raw, indent=1, allow_nan=False) + "\n"
    except ValueError:
        raise OkdpipeError(
            f"{artifact_dir}: the model card holds a non-finite number (NaN or inf); nothing was "
            "written. Check the model's weights and parity figures"
        ) from None
    atomic_write_text(artifact_dir / CARD_NAME, text)
    return card


def parse_card(raw: dict[str, Any], artifact_dir: Path) -> ModelCard:
    """Every check a reader needs, each a one-line OkdpipeError naming the field and the fix."""
    CARD.check(raw, artifact_dir / CARD_NAME)
    for section in ("input", "output", "preprocess"):
        if not isinstance(raw.get(section), dict):
            raise _fail(f"model card has no '{section}' object")
    model_path = _checked_model_file(artifact_dir, raw)
    channels, height, width = _checked_input_shape(raw)
    num_classes = _checked_num_classes(raw)
    _checked_quantization(raw)
    return ModelCard(
        name=_checked_name(raw),
        precision=_checked_precision(raw),
        model_path=model_path,
        input_name=_required_str(raw["input"], "name", "input.name"),
        input_dtype=_checked_input_dtype(raw),
        output_name=_required_str(raw["output"], "name", "output.name"),
        channels=channels,
        height=height,
        width=width,
        num_classes=num_classes,
        preprocess=_checked_preprocess(raw, channels, height, width),
        labels=_checked_labels(raw, num_classes),
        opset=_checked_opset(raw),
        provenance=_checked_provenance(raw),
        raw=_checked_records(raw),
    )


def _hashes(artifact_dir: Path, onnx_name: str) -> dict[str, str]:
    """The model file and its external-data file (`model.onnx.data`), when the exporter wrote one."""
    names = [onnx_name] + [name for name in (onnx_name + ".data",) if (artifact_dir / name).is_file()]
    return {name: file_sha256(artifact_dir / name) for name in names}


def _fail(problem: str, fix: str = CARD.fix) -> OkdpipeError:
    return OkdpipeError(f"{problem}; {fix}")


def _load_card_json(artifact_dir: Path) -> dict[str, Any]:
    if not artifact_dir.is_dir():
        problem = f"{artifact_dir}: {missing_or_kind(artifact_dir, 'an artifact directory')}"
        raise _fail(problem, "pass the folder `okdpipe export` wrote")
    card_path = artifact_dir / CARD_NAME
    if not card_path.is_file():
        raise _fail(f"no {CARD_NAME} in {artifact_dir}", "pass the folder `okdpipe export` wrote")
    try:
        card = loads_finite(card_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _fail(f"{card_path} is not valid JSON ({error})") from None
    except ValueError as error:  # NaN / Infinity: a card never records a non-finite figure as if it were fine
        raise _fail(f"{card_path}: the card holds a {error}") from None
    if not isinstance(card, dict):
        raise _fail(f"{card_path} must hold a JSON object")
    return card


def _required_str(section: dict[str, Any], key: str, where: str) -> str:
    value = section.get(key)
    if not isinstance(value, str) or not value:
        raise _fail(f"model card field '{where}' must be a non-empty string")
    return value


URL_SPECIAL = "/?#%\\"  # a served model's name is a path segment of its routes


def _checked_name(card: dict[str, Any]) -> str:
    name = _required_str(card, "name", "name")
    unsafe = not name.isprintable() or any(char in name for char in URL_SPECIAL) or name in ("", ".", "..")
    if unsafe or name.strip() != name:  # isprintable: no NUL, newline or other control character
        raise _fail(f"model name {name!r} cannot appear in a URL path", "rename the model in model.json")
    return name


def _checked_model_file(artifact_dir: Path, card: dict[str, Any]) -> Path:
    filename = _required_str(card, "file", "file")
    model_path = (artifact_dir / filename).resolve()
    if model_path.parent != artifact_dir.resolve() or not model_path.is_file():
        raise _fail(f"model file {filename!r} named by the card is not in {artifact_dir}")
    hashes = card.get("sha256")
    if not isinstance(hashes, dict) or not isinstance(hashes.get(filename), str):
        raise _fail(f"model card has no sha256 for {filename!r}")
    for listed_name, expected in hashes.items():  # also external-data files (model.onnx.data) when listed
        _check_sha256(artifact_dir, listed_name, expected)
    return model_path


def _check_sha256(artifact_dir: Path, filename: str, expected: object) -> None:
    path = artifact_dir / filename
    if not path.is_file():
        raise _fail(f"{filename} listed in the card's sha256 is missing from {artifact_dir}")
    actual = file_sha256(path)
    if not isinstance(expected, str) or actual != expected.lower():
        raise _fail(f"{filename} sha256 is {actual[:12]}..., the card says {str(expected)[:12]}... (file changed)")


def _checked_input_shape(card: dict[str, Any]) -> tuple[int, int, int]:
    shape = card["input"].get("shape")
    layout = card["input"].get("layout", "NCHW")
    if not (isinstance(shape, list) and len(shape) == 4 and shape[0] in (None, -1)) or layout != "NCHW":
        raise _fail(f"model card input shape {str(shape)[:80]} / layout {layout!r} is not [null, C, H, W] NCHW")
    problem = inputs.input_shape_problem(*shape[1:])
    if problem:
        raise _fail(f"model card {problem}")
    return shape[1], shape[2], shape[3]


def _checked_input_dtype(card: dict[str, Any]) -> str:
    dtype = card["input"].get("dtype", "float32")
    if dtype not in MODEL_DTYPES:
        raise _fail(f"model input dtype {dtype!r} is not served (supported: {', '.join(MODEL_DTYPES)})")
    return dtype


def _checked_num_classes(card: dict[str, Any]) -> int:
    shape = card["output"].get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and shape[0] in (None, -1)):
        raise _fail(f"model card output shape {str(shape)[:80]} is not [null, num_classes]")
    problem = inputs.num_classes_problem(shape[1])
    if problem:
        raise _fail(f"model card output {problem}")
    return shape[1]


def _checked_preprocess(card: dict[str, Any], channels: int, height: int, width: int) -> Preprocess:
    section = card["preprocess"]
    mean, std, scale = section.get("mean"), section.get("std"), section.get("scale", PIXEL_SCALE)
    if section.get("channels") != channels or section.get("size") != [height, width]:
        raise _fail(f"preprocess channels/size {section.get('channels')}/{section.get('size')} disagree with input")
    problem = inputs.normalisation_problem(scale, mean, std, channels)
    if problem:
        raise _fail(f"preprocess {problem}")
    resize = section.get("resize", "stretch")
    if resize not in RESIZE_POLICIES:
        raise _fail(f"preprocess resize {resize!r} is not one of: {', '.join(RESIZE_POLICIES)}")
    mean, std = tuple(map(float, mean)), tuple(map(float, std))
    return Preprocess(height, width, channels, float(scale), mean, std, resize)


def _checked_labels(card: dict[str, Any], num_classes: int) -> tuple[str, ...]:
    """Class names for the 'labels' output; an absent list falls back to the class index as text."""
    labels = card.get("labels")
    if labels is None:
        return tuple(str(index) for index in range(num_classes))
    problem = inputs.labels_problem(labels, num_classes)
    if problem:
        raise _fail(f"model card {problem}")
    return tuple(labels)


def _checked_opset(card: dict[str, Any]) -> int | None:
    opset = card.get("opset")
    if opset is not None and not _is_positive_int(opset):
        raise _fail(f"model card opset {opset!r} must be a positive integer")
    return opset


def _checked_precision(card: dict[str, Any]) -> str:
    precision = _required_str(card, "precision", "precision")
    if precision not in PRECISIONS:
        raise _fail(f"model card precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


def check_graph_precision(card: ModelCard) -> None:
    """The graph must compute in the card's precision: an INT8 graph under an fp32 card would be benchmarked,
    gated and served as fp32. Called by bench and serve before they use a graph (it parses the protobuf)."""
    actual = graph_precision(card.model_path)
    if actual != card.precision:
        raise _fail(f"{card.model_path.name} computes in {actual} but its card says {card.precision}")


def graph_precision(model_path: Path) -> str:
    """What an exported graph computes in, read from its operators and initializers (not from any name)."""
    import onnx  # protobuf only; serve's torch-free install has it

    try:
        graph = onnx.load(str(model_path), load_external_data=False).graph
    except Exception as exc:  # a damaged protobuf raises DecodeError and others
        raise _fail(f"{model_path.name} is not a readable ONNX model ({type(exc).__name__})") from None
    ops = {node.op_type for node in graph.node}
    if ops & DYNAMIC_INT8_OPS:
        return "int8-dynamic"
    if ops & STATIC_INT8_OPS:
        return "int8"
    if any(tensor.data_type == FLOAT16 for tensor in graph.initializer):
        return "fp16"
    return "fp32"


# The figures export records: each section an object, each number in its range (a reader may report or gate on them).
RECORD_RANGES = {
    "parity": {"max_abs_diff": (0.0, math.inf), "top1_agreement": (0.0, 1.0)},
    "accuracy": {"val_top1": (0.0, 1.0), "fp32_val_top1": (0.0, 1.0), "drop_points": (-100.0, 100.0)},
}


def _checked_records(card: dict[str, Any]) -> dict[str, Any]:
    for section, ranges in RECORD_RANGES.items():
        record = card.get(section)
        if record is None:
            continue
        if not isinstance(record, dict):
            raise _fail(f"model card '{section}' must be a JSON object")
        for key, (low, high) in ranges.items():
            value = record.get(key)
            if value is not None and not (inputs.is_finite_number(value) and low <= value <= high):
                raise _fail(f"model card '{section}.{key}' is {value!r}, not a number in [{low:g}, {high:g}]")
        samples = record.get("val_samples")
        if samples is not None and not _is_positive_int(samples):
            raise _fail(f"model card '{section}.val_samples' is {samples!r}, not a positive integer")
    return card


def _checked_provenance(card: dict[str, Any]) -> dict[str, Any]:
    provenance = card.get("provenance") or {}
    if not isinstance(provenance, dict):
        raise _fail("model card provenance must be a JSON object")
    return provenance


def _checked_quantization(card: dict[str, Any]) -> None:
    """INT8 cards: the nodes kept in FP32, every tuning trial's accuracy and the sensitivity ranking, when recorded,
    are well formed; an accuracy is a finite fraction or absent (a failed trial names its failure instead)."""
    section = card.get("quantization")
    if section is None:
        return
    if not isinstance(section, dict):
        raise _fail("model card quantization must be a JSON object or null")
    nodes = section.get("fp32_nodes", [])
    if not (isinstance(nodes, list) and all(isinstance(node, str) and node for node in nodes)):
        raise _fail("model card quantization.fp32_nodes must list node names")
    trials = _optional_object(section, "tuning").get("trials", [])
    for trial in trials if isinstance(trials, list) else [None]:
        top1 = trial.get("val_top1") if isinstance(trial, dict) else "missing"
        if not (top1 is None and trial.get("failure")) and not (inputs.is_finite_number(top1) and 0 <= top1 <= 1):
            raise _fail(f"model card quantization trial {trial!r} has no finite val_top1 in [0, 1] nor a failure")
    ranking = _optional_object(section, "sensitivity").get("nodes", [])
    if not isinstance(ranking, list):
        raise _fail("model card quantization.sensitivity.nodes must be node rows ranked 1, 2, 3, ...")
    ranks = [row.get("rank") if isinstance(row, dict) else None for row in ranking]
    if ranks != list(range(1, len(ranks) + 1)) or not all(isinstance(row.get("node"), str) for row in ranking):
        raise _fail("model card quantization.sensitivity.nodes must be node rows ranked 1, 2, 3, ...")


def _optional_object(section: dict[str, Any], key: str) -> dict[str, Any]:
    """quantization.<key>: a JSON object, or absent/null (read as empty); anything else is a damaged card."""
    value = section.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(f"model card quantization.{key} must be a JSON object or null")
    return value


def _is_positive_int(value: Any) -> bool:
    return inputs.is_int(value) and value > 0
