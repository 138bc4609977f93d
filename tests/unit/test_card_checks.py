"""Each model card check by the line it gives: a card wrong in one field is refused naming that field (by write_card,
writing nothing, and by read_card), and a card at the edge of every range is accepted. The one-line checks in
test_contracts.py let a planted bug pass when the card still failed for some other reason, or when the edge cases
were never tried (a bound made exclusive, a range widened, a check dropped)."""

from __future__ import annotations

import json

import pytest
from test_contracts import set_path, valid_fields

from okdpipe.contracts.card import CARD_NAME, read_card, write_card
from okdpipe.errors import OkdpipeError


def with_section(section: str, value) -> callable:
    return lambda fields: {**fields, section: value}


def sensitivity(*rows) -> dict:
    return {"sensitivity": {"nodes": [{"rank": rank, "node": node} for rank, node in rows]}}


NAMED = {
    "val_samples zero": (with_section("accuracy", {"val_top1": 0.5, "val_samples": 0}), "'accuracy.val_samples' is 0"),
    "top1 agreement above 1": (with_section("parity", {"top1_agreement": 1.001}), "'parity.top1_agreement' is 1.001"),
    "negative max_abs_diff": (with_section("parity", {"max_abs_diff": -0.5}), "'parity.max_abs_diff' is -0.5"),
    "drop above 100 points": (with_section("accuracy", {"drop_points": 100.5}), "'accuracy.drop_points' is 100.5"),
    "accuracy a list": (with_section("accuracy", [0.5]), "model card 'accuracy' must be a JSON object"),
    "name with a trailing space": (lambda f: {**f, "name": "tiny "}, "model name 'tiny ' cannot appear in a URL path"),
    "input of a fixed batch": (lambda f: set_path(f, ("input", "shape"), [1, 3, 4, 5]), "input shape [1, 3, 4, 5]"),
    "output of a fixed batch": (lambda f: set_path(f, ("output", "shape"), [8, 3]), "output shape [8, 3] is not"),
    "opset zero": (lambda f: {**f, "opset": 0}, "opset 0 must be a positive integer"),
    "resize unknown": (lambda f: set_path(f, ("preprocess", "resize"), "crop"), "preprocess resize 'crop' is not"),
    "provenance a list": (lambda f: {**f, "provenance": ["x"]}, "provenance must be a JSON object"),
    "fp32 node unnamed": (with_section("quantization", {"fp32_nodes": [""]}), "fp32_nodes must list node names"),
    "trial above 1": (
        with_section("quantization", {"tuning": {"trials": [{"val_top1": 1.5}]}}),
        "quantization trial {'val_top1': 1.5} has no finite val_top1",
    ),
    "trial without accuracy or failure": (
        with_section("quantization", {"tuning": {"trials": [{"val_top1": None}]}}),
        "quantization trial {'val_top1': None} has no finite val_top1",
    ),
    "ranks from 0": (with_section("quantization", sensitivity((0, "a"), (1, "b"))), "ranked 1, 2, 3"),
    "a rank skipped": (with_section("quantization", sensitivity((1, "a"), (3, "b"))), "ranked 1, 2, 3"),
}

EDGES = {
    "accuracy": {"val_top1": 0.0, "fp32_val_top1": 1.0, "drop_points": -100.0, "val_samples": 1},
    "parity": {"max_abs_diff": 0.0, "top1_agreement": 1.0},
    "quantization": {
        "fp32_nodes": ["conv1"],
        "tuning": {"trials": [{"val_top1": 0.0}, {"val_top1": 1.0}, {"val_top1": None, "failure": "parity"}]},
        **sensitivity((1, "a"), (2, "b")),
    },
    "opset": 1,
}


@pytest.fixture
def artifact(tmp_path):
    directory = tmp_path / "fp32"
    directory.mkdir()
    (directory / "model.onnx").write_bytes(bytes(range(256)))
    return directory


@pytest.mark.parametrize("case", sorted(NAMED))
def test_a_card_wrong_in_one_field_is_refused_naming_it(artifact, case):
    change, says = NAMED[case]
    with pytest.raises(OkdpipeError) as written:
        write_card(artifact, change(valid_fields()))
    assert says in str(written.value)
    assert not (artifact / CARD_NAME).exists()
    write_card(artifact, valid_fields())
    (artifact / CARD_NAME).write_text(json.dumps(change(json.loads((artifact / CARD_NAME).read_text()))))
    with pytest.raises(OkdpipeError) as read:
        read_card(artifact)
    assert says in str(read.value)


@pytest.mark.parametrize("drop", [-100.0, 100.0])
def test_a_card_at_the_edge_of_every_range_is_accepted(artifact, drop):
    fields = {**valid_fields(), **EDGES, "accuracy": {**EDGES["accuracy"], "drop_points": drop}}
    fields["preprocess"] = {**fields["preprocess"], "resize": "shorter-side"}
    card = write_card(artifact, fields)
    assert read_card(artifact) == card
    assert (card.raw["accuracy"]["drop_points"], card.opset, card.preprocess.resize) == (drop, 1, "shorter-side")
