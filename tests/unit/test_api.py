"""The Python API (okdpipe.api) takes the same config models as the CLI and gives the same results: one tiny DML
run on synthetic data through fit -> select -> export -> bench -> serve_app, checked against the files the
stages wrote and against the CLI's --dry-run of the same config."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from okdpipe import api
from okdpipe.contracts.card import read_card
from okdpipe.errors import GateFailed, OkdpipeError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    cfg = api.DistillConfig(
        method="dml", arch="resnet8", dataset="synthetic", val_split=0.25, epochs=1, batch_size=8, lr=0.05, device="cpu"
    )
    summary = api.fit(cfg, root / "run", echo=lambda _: None)
    chosen = api.select(root / "run", api.SelectConfig(bn_batches=2, device="cpu"))
    cards = api.export(
        chosen.model_file, root / "export", api.ExportConfig(quantize="int8", calib_size=16, max_accuracy_drop=100.0)
    )
    return root, summary, chosen, cards


def test_fit_and_select_write_what_they_return(pipeline):
    root, summary, chosen, _ = pipeline
    selection = json.loads((root / "run" / "selection.json").read_text())
    assert chosen.model_file == root / "run" / "model.pt" and chosen.model_file.is_file()
    assert selection["chosen"] == chosen.chosen
    assert selection["candidates"] == chosen.candidates
    scored = {row["candidate"]: row for row in chosen.candidates}
    for name, row in scored.items():  # what select scored a student at is what training recorded for it
        if name.startswith("student:"):
            assert row["val_top1"] == pytest.approx(summary["val"][name]["top1"], abs=1e-9)
    assert chosen.val_top1 == max(row["val_top1"] for row in scored.values())
    model, info = api.load_model(chosen.model_file)
    assert info.provenance["candidate"] == chosen.chosen and not model.training


def test_export_returns_the_cards_it_wrote(pipeline):
    root, _, _, cards = pipeline
    assert [card.precision for card in cards] == ["fp32", "int8"]
    for card in cards:
        assert card == read_card(root / "export" / card.precision)
        assert card.opset == api.ExportConfig().opset


def test_bench_evaluates_the_config_gates_without_raising(pipeline):
    _, _, _, cards = pipeline
    config = api.BenchConfig(
        batch_sizes=[1],
        threads=1,
        max_samples=8,
        warmup=0,
        min_seconds=0.01,
        compare_ensemble=False,
        gates=["top1>=0.0", "top1>1.0"],
    )
    report = api.bench([card.directory for card in cards], config)
    assert [(g.expression, g.artifact, g.passed) for g in report.gates] == [
        ("top1>=0.0", cards[0].name, True),
        ("top1>=0.0", cards[1].name, True),
        ("top1>1.0", cards[0].name, False),
        ("top1>1.0", cards[1].name, False),
    ]
    assert [e.kind for e in report.references] == ["pytorch"]


def test_serve_app_answers_like_onnxruntime(pipeline):
    from fastapi.testclient import TestClient

    from okdpipe.ortsession import create_session

    _, _, _, cards = pipeline
    card = cards[0]
    image = np.random.default_rng(0).normal(size=(1, card.channels, card.height, card.width)).astype(np.float32)
    session, _ = create_session(card.model_path)
    expected = session.run([card.output_name], {card.input_name: image})[0]
    body = {
        "inputs": [
            {"name": card.input_name, "shape": list(image.shape), "datatype": "FP32", "data": image.ravel().tolist()}
        ]
    }
    with TestClient(api.serve_app(card.directory)) as client:
        answer = client.post(f"/v2/models/{card.name}/infer", json=body)
    assert answer.status_code == 200, answer.text
    logits = np.asarray(answer.json()["outputs"][0]["data"], dtype=np.float32).reshape(expected.shape)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_bad_input_raises_the_cli_errors(pipeline, tmp_path):
    root, _, chosen, _ = pipeline
    with pytest.raises(OkdpipeError, match="no such run directory"):
        api.select(tmp_path / "missing")
    with pytest.raises(GateFailed, match="loses"):
        api.export(
            chosen.model_file,
            tmp_path / "out",
            api.ExportConfig.model_construct(
                **{**api.ExportConfig().model_dump(), "quantize": "int8", "calib_size": 16, "max_accuracy_drop": -1.0}
            ),
        )


def test_the_cli_resolves_the_same_config(pipeline, tmp_path):
    """`okdpipe export --config F --dry-run` prints the ExportConfig the API builds from the same values."""
    _, _, chosen, _ = pipeline
    config = tmp_path / "export.yaml"
    config.write_text("quantize: fp16\nopset: 17\n")
    command = ["export", str(chosen.model_file), "--out", str(tmp_path / "out"), "--config", str(config), "--dry-run"]
    printed = subprocess.run(
        [sys.executable, "-m", "okdpipe", *command],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert yaml.safe_load(printed) == api.ExportConfig(quantize="fp16", opset=17).model_dump(mode="json")
