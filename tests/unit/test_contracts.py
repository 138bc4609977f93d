"""The stage contracts by value: the model card (one reader, one writer, one normalisation), the versioned-file
header check, and the data source that every stage rebuilds a split from (its recorded seed and val_split)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from okdpipe.contracts.card import CARD, CARD_NAME, PIXEL_SCALE, Preprocess, read_card, write_card
from okdpipe.contracts.data import DataSource
from okdpipe.contracts.report import REPORT, BenchReport
from okdpipe.errors import OkdpipeError
from okdpipe.modelfile import MODEL_FILE

MEAN = [0.25, 0.5, 0.75]
STD = [0.5, 0.125, 2.0]


def valid_fields() -> dict:
    """A complete card for a 3-channel 4x5 input and 3 classes (model.onnx's content is irrelevant to the card)."""
    return {
        "name": "tiny-synthetic",
        "file": "model.onnx",
        "precision": "fp32",
        "input": {"name": "input", "shape": [None, 3, 4, 5], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": "logits", "shape": [None, 3], "dtype": "float32"},
        "preprocess": {"size": [4, 5], "channels": 3, "scale": PIXEL_SCALE, "mean": list(MEAN), "std": list(STD)},
        "labels": ["cat", "dog", "eel"],
        "dataset": "synthetic",
        "opset": 13,
        "provenance": {"model_file": "/nowhere/model.pt"},
    }


@pytest.fixture
def artifact(tmp_path):
    directory = tmp_path / "fp32"
    directory.mkdir()
    (directory / "model.onnx").write_bytes(bytes(range(256)) * 4)
    return directory


def set_path(fields: dict, path: tuple, value) -> dict:
    fields = copy.deepcopy(fields)
    target = fields
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return fields


def labels_and_classes(fields: dict) -> dict:
    """num_classes 1 with one label, so the only problem is num_classes itself."""
    fields = set_path(fields, ("output", "shape"), [None, 1])
    return set_path(fields, ("labels",), ["only"])


INVALID = {
    "std zero": lambda f: set_path(f, ("preprocess", "std"), [0.5, 0.0, 2.0]),
    "std negative": lambda f: set_path(f, ("preprocess", "std"), [0.5, -0.125, 2.0]),
    "mean too short": lambda f: set_path(f, ("preprocess", "mean"), [0.25, 0.5]),
    "std too long": lambda f: set_path(f, ("preprocess", "std"), [0.5, 0.125, 2.0, 1.0]),
    "labels fewer than classes": lambda f: set_path(f, ("labels",), ["cat", "dog"]),
    "labels more than classes": lambda f: set_path(f, ("labels",), ["cat", "dog", "eel", "fox"]),
    "num_classes 1": labels_and_classes,
    "NaN in mean": lambda f: set_path(f, ("preprocess", "mean"), [0.25, math.nan, 0.75]),
    "inf in std": lambda f: set_path(f, ("preprocess", "std"), [0.5, math.inf, 2.0]),
    "opset a string": lambda f: set_path(f, ("opset",), "13"),
    "opset a float": lambda f: set_path(f, ("opset",), 13.0),
    "opset a bool": lambda f: set_path(f, ("opset",), True),
    "name with slash": lambda f: set_path(f, ("name",), "a/b"),
    "name empty": lambda f: set_path(f, ("name",), ""),
    "name with NUL": lambda f: set_path(f, ("name",), "a\x00b"),
    "name with a newline": lambda f: set_path(f, ("name",), "a\nb"),
    "name with a query mark": lambda f: set_path(f, ("name",), "a?b"),
    "name with a percent": lambda f: set_path(f, ("name",), "a%2Fb"),
    "name dot-dot": lambda f: set_path(f, ("name",), ".."),
    "preprocess size disagrees with input": lambda f: set_path(f, ("preprocess", "size"), [5, 4]),
    "input dtype int8": lambda f: set_path(f, ("input", "dtype"), "int8"),
    "input shape 3-d": lambda f: set_path(f, ("input", "shape"), [None, 3, 4]),
    "scale zero": lambda f: set_path(f, ("preprocess", "scale"), 0),
    # hand-edited INT8 sections: a traceback from serve and bench before, now one line
    "quantization.tuning a list": lambda f: {**f, "quantization": {"tuning": [1]}},
    "quantization.tuning a string": lambda f: {**f, "quantization": {"tuning": "abc"}},
    "quantization.sensitivity a list": lambda f: {**f, "quantization": {"sensitivity": [1]}},
    "quantization.sensitivity.nodes a number": lambda f: {**f, "quantization": {"sensitivity": {"nodes": 5}}},
    "quantization.fp32_nodes a string": lambda f: {**f, "quantization": {"fp32_nodes": "conv"}},
}


def assert_one_line(error: pytest.ExceptionInfo) -> None:
    message = str(error.value)
    assert message and "\n" not in message and "Traceback" not in message


# ---------------------------------------------------------------------------------------------- the card


def test_write_then_read_round_trips_every_field(artifact):
    fields = valid_fields()
    written = write_card(artifact, fields)
    read = read_card(artifact)
    assert read == written
    assert read.name == "tiny-synthetic" and read.precision == "fp32" and read.opset == 13
    assert (read.channels, read.height, read.width, read.num_classes) == (3, 4, 5, 3)
    assert read.labels == ("cat", "dog", "eel")
    assert read.preprocess == Preprocess(4, 5, 3, PIXEL_SCALE, tuple(MEAN), tuple(STD))
    assert read.model_path == (artifact / "model.onnx").resolve()
    assert read.provenance == {"model_file": "/nowhere/model.pt"}
    raw = json.loads((artifact / CARD_NAME).read_text())
    assert raw["format"] == CARD.name and raw["format_version"] == CARD.version
    import hashlib

    assert raw["sha256"] == {"model.onnx": hashlib.sha256((artifact / "model.onnx").read_bytes()).hexdigest()}
    for key, value in fields.items():
        assert raw[key] == value


def test_write_card_overrides_a_forged_header_and_hash(artifact):
    forged = {**valid_fields(), "format": "okdpipe-card", "format_version": 99, "sha256": {"model.onnx": "0" * 64}}
    write_card(artifact, forged)
    raw = json.loads((artifact / CARD_NAME).read_text())
    assert raw["format_version"] == CARD.version and raw["sha256"]["model.onnx"] != "0" * 64
    read_card(artifact)


@pytest.mark.parametrize("case", sorted(INVALID))
def test_write_card_refuses_an_invalid_field_and_writes_nothing(artifact, case):
    with pytest.raises(OkdpipeError) as error:
        write_card(artifact, INVALID[case](valid_fields()))
    assert_one_line(error)
    assert not (artifact / CARD_NAME).exists()


@pytest.mark.parametrize("case", sorted(INVALID))
def test_read_card_refuses_an_invalid_field(artifact, case):
    write_card(artifact, valid_fields())
    raw = json.loads((artifact / CARD_NAME).read_text())
    bad = INVALID[case]({k: v for k, v in raw.items()})
    # json.dumps writes NaN/Infinity (allow_nan) exactly as a hand-edited or foreign card might hold them
    (artifact / CARD_NAME).write_text(json.dumps(bad))
    with pytest.raises(OkdpipeError) as error:
        read_card(artifact)
    assert_one_line(error)


def test_read_card_refuses_a_model_file_with_one_flipped_byte(artifact):
    write_card(artifact, valid_fields())
    data = bytearray((artifact / "model.onnx").read_bytes())
    data[100] ^= 0x01
    (artifact / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(OkdpipeError, match="sha256") as error:
        read_card(artifact)
    assert_one_line(error)


def test_read_card_refuses_a_changed_external_data_file(artifact):
    (artifact / "model.onnx.data").write_bytes(b"\x00" * 64)
    write_card(artifact, valid_fields())
    assert set(json.loads((artifact / CARD_NAME).read_text())["sha256"]) == {"model.onnx", "model.onnx.data"}
    (artifact / "model.onnx.data").write_bytes(b"\x00" * 63 + b"\x01")
    with pytest.raises(OkdpipeError, match="model.onnx.data"):
        read_card(artifact)


def test_missing_files_are_one_line_errors(artifact, tmp_path):
    with pytest.raises(OkdpipeError) as error:
        write_card(artifact, {**valid_fields(), "file": "absent.onnx"})
    assert_one_line(error)
    assert not (artifact / CARD_NAME).exists()
    with pytest.raises(OkdpipeError) as error:
        read_card(artifact)  # no model.json
    assert_one_line(error)
    with pytest.raises(OkdpipeError) as error:
        read_card(tmp_path / "no-such-dir")
    assert_one_line(error)
    write_card(artifact, valid_fields())
    (artifact / "model.onnx").unlink()
    with pytest.raises(OkdpipeError) as error:
        read_card(artifact)
    assert_one_line(error)


def test_a_card_naming_a_file_outside_its_directory_is_refused(artifact, tmp_path):
    (tmp_path / "outside.onnx").write_bytes(b"x")
    write_card(artifact, valid_fields())
    raw = json.loads((artifact / CARD_NAME).read_text())
    raw["file"] = "../outside.onnx"
    raw["sha256"]["../outside.onnx"] = __import__("hashlib").sha256(b"x").hexdigest()
    (artifact / CARD_NAME).write_text(json.dumps(raw))
    with pytest.raises(OkdpipeError):
        read_card(artifact)


def test_card_that_is_not_json_or_not_an_object_is_one_line(artifact):
    (artifact / CARD_NAME).write_text("{not json")
    with pytest.raises(OkdpipeError) as error:
        read_card(artifact)
    assert_one_line(error)
    (artifact / CARD_NAME).write_text("[1, 2]")
    with pytest.raises(OkdpipeError) as error:
        read_card(artifact)
    assert_one_line(error)


def test_preprocess_normalise_is_the_documented_formula():
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, size=(2, 3, 4, 5), dtype=np.uint8)
    pre = Preprocess(4, 5, 3, PIXEL_SCALE, tuple(MEAN), tuple(STD))
    got = pre.normalise(pixels)
    expected = np.empty((2, 3, 4, 5), dtype=np.float64)
    for n in range(2):
        for c in range(3):
            for y in range(4):
                for x in range(5):
                    expected[n, c, y, x] = (int(pixels[n, c, y, x]) / 255.0 - MEAN[c]) / STD[c]
    assert got.dtype == np.float32 and got.shape == pixels.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # one pixel written out: 200/255 = 0.784..., channel 2: (0.7843 - 0.75) / 2.0
    one = Preprocess(1, 1, 3, PIXEL_SCALE, tuple(MEAN), tuple(STD)).normalise(np.full((1, 3, 1, 1), 200, np.uint8))
    np.testing.assert_allclose(
        one.ravel(),
        [(200 / 255 - 0.25) / 0.5, (200 / 255 - 0.5) / 0.125, (200 / 255 - 0.75) / 2.0],
        rtol=1e-5,
        atol=1e-6,
    )


def test_preprocess_normalise_honours_a_non_default_scale():
    pre = Preprocess(1, 2, 3, 0.5, (1.0, 2.0, 3.0), (2.0, 4.0, 8.0))
    pixels = np.array([[[[10, 20]], [[30, 40]], [[50, 60]]]], dtype=np.uint8)
    expected = (pixels.astype(np.float64) * 0.5 - np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1)) / np.array(
        [2.0, 4.0, 8.0]
    ).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(pre.normalise(pixels), expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------- file formats


def test_current_and_older_versions_are_read():
    assert REPORT.check({"format": REPORT.name, "format_version": 2}, "r") == 2
    assert REPORT.check({"format": REPORT.name, "format_version": 1}, "r") == 1
    assert REPORT.check({"schema_version": 1}, "r") == 1  # written before the common header
    assert CARD.check({"format": "okdpipe-card", "format_version": 1}, "c") == 1
    assert MODEL_FILE.check({"format": "okdpipe-model", "format_version": 1}, "m") == 1


@pytest.mark.parametrize(
    "payload",
    [
        {"format": "okdpipe-model", "format_version": 1},  # another okdpipe format
        {"format": "okdpipe-bench-report", "format_version": True},  # True == 1, but a bool is not a version
        {"format": "okdpipe-bench-report", "format_version": 99},
        {"format": "okdpipe-bench-report", "format_version": "2"},
        {"format": "okdpipe-bench-report", "format_version": 2.0001},
        {"format": "okdpipe-bench-report"},
        {"schema_version": 99},
        {"schema_version": True},
        [1, 2],
        "okdpipe-bench-report",
    ],
)
def test_bad_headers_are_one_line_errors(payload):
    with pytest.raises(OkdpipeError) as error:
        REPORT.check(payload, "somewhere/report.json")
    assert_one_line(error)
    assert "somewhere/report.json" in str(error.value)


def test_card_format_version_true_is_refused(artifact):
    write_card(artifact, valid_fields())
    raw = json.loads((artifact / CARD_NAME).read_text())
    raw["format_version"] = True
    (artifact / CARD_NAME).write_text(json.dumps(raw))
    with pytest.raises(OkdpipeError, match="format_version True"):
        read_card(artifact)


def legacy_entry(**overrides) -> dict:
    entry = {
        "name": "resnet8-synthetic",
        "kind": "onnx",
        "precision": "fp32",
        "path": "out/fp32",
        "dataset": "synthetic",
        "of": [],
        "provenance": {},
        "device": "CPUExecutionProvider",
        "params": 78000,
        "macs": 1200000,
        "start_ms": 12.5,
        "memory": {"peak_rss_delta_mb": 3.0, "method": "rss"},
        "accuracy": {"split": "test", "top1": 0.75, "top5": 1.0, "samples": 32},
        "latency": {
            "1": {
                "batch_size": 1,
                "runs": 100,
                "p50_ms": 0.5,
                "p90_ms": 0.6,
                "p99_ms": 0.7,
                "mean_ms": 0.55,
                "min_ms": 0.4,
                "images_per_s": 1818.0,
                "gflops_per_s": None,
                "peak_fraction": None,
            }
        },
    }
    entry.update(overrides)
    return entry


def test_a_schema_version_1_bench_report_is_read_back():
    legacy = {
        "schema_version": 1,
        "created": "2026-01-01T00:00:00Z",
        "options": {"batch_sizes": [1]},
        "machine": {"cpu": "x"},
        "runtime": {"onnxruntime": "1"},
        "artifacts": [legacy_entry()],
        "references": [legacy_entry(name="ref", kind="pytorch", device="torch:cpu")],
        "notes": ["n"],
        "gates": [
            {
                "expression": "top1>=0.5",
                "metric": "top1",
                "value": 0.75,
                "threshold": 0.5,
                "passed": True,
                "detail": "ok",
                "artifact": "resnet8-synthetic",
                "name": None,
            }
        ],
    }
    report = BenchReport.from_dict(legacy, "old.json")
    [entry] = report.artifacts
    assert entry.session is None  # v1 did not record it
    assert entry.accuracy.top1 == 0.75 and entry.latency[1].p99_ms == 0.7 and entry.memory.peak_rss_delta_mb == 3.0
    assert report.references[0].kind == "pytorch" and report.gates[0].passed is True
    again = BenchReport.from_dict(report.to_dict(), "new.json")  # and it is written back as the current version
    assert report.to_dict()["format_version"] == REPORT.version and "schema_version" not in report.to_dict()
    assert again == report


def test_a_damaged_bench_report_is_one_line():
    with pytest.raises(OkdpipeError) as error:
        BenchReport.from_dict(
            {
                **REPORT.header(),
                "created": "x",
                "options": {},
                "machine": {},
                "runtime": {},
                "artifacts": [{"name": "only-a-name"}],
            },
            "bad.json",
        )
    assert_one_line(error)


# ---------------------------------------------------------------------------------------- the data source


def split_images(split) -> np.ndarray:
    return np.concatenate([pixels for pixels, _ in split.iter_batches(1000)])


def test_from_record_carries_the_recorded_seed_and_val_split_into_load():
    from okdpipe.datasets import load_dataset

    source = DataSource.from_record({"dataset": "synthetic", "val_split": 0.25, "seed": 3}, "model.pt")
    assert (source.seed, source.val_split) == (3, 0.25)
    bundle = source.load()
    seed3 = load_dataset("synthetic", val_split=0.25, seed=3)
    seed0 = load_dataset("synthetic", val_split=0.25, seed=0)
    assert len(bundle.val) == len(seed3.val) == 16  # 0.25 of 64, not the default 0.1
    np.testing.assert_array_equal(split_images(bundle.val), split_images(seed3.val))
    np.testing.assert_array_equal(split_images(bundle.train), split_images(seed3.train))
    assert not np.array_equal(split_images(bundle.val), split_images(seed0.val))


def test_from_record_carries_options_and_train_subset():
    from okdpipe.datasets import load_dataset

    source = DataSource.from_record(
        {
            "dataset": "synthetic",
            "val_split": 0.25,
            "seed": 5,
            "train_subset": 2,
            "options": {"data_seed": 4, "n_train": 32},
        },
        "model.pt",
    )
    bundle = source.load()
    expected = load_dataset("synthetic", val_split=0.25, seed=5, train_subset=2, data_seed=4, n_train=32)
    assert len(bundle.train) == 2 * 4
    np.testing.assert_array_equal(split_images(bundle.train), split_images(expected.train))
    np.testing.assert_array_equal(split_images(bundle.val), split_images(expected.val))
    assert DataSource.from_record(source.as_record(), "again") == source


@pytest.mark.parametrize(
    "record",
    [
        None,
        {},
        {"dataset": ""},
        {"dataset": 3},
        {"dataset": "synthetic", "seed": "3"},
        {"dataset": "synthetic", "seed": True},
        {"dataset": "synthetic", "val_split": 1.0},
        {"dataset": "synthetic", "val_split": math.nan},
        {"dataset": "synthetic", "val_split": -0.1},
        {"dataset": "synthetic", "train_subset": 0},
        {"dataset": "synthetic", "options": []},
        {"dataset": "synthetic", "sede": 3},
    ],
)
def test_from_record_refuses_a_bad_record_in_one_line(record):
    with pytest.raises(OkdpipeError) as error:
        DataSource.from_record(record, "model.pt")
    assert_one_line(error)
