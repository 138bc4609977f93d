"""`okdpipe select`: candidates, BN recalibration, validation-only choice, a self-describing MODEL.pt."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from okdpipe.config import DistillConfig
from okdpipe.distill.select import Scored, choose, count_macs, select
from okdpipe.distill.trainer import fit
from okdpipe.errors import OkdpipeError
from okdpipe.run import RunDir

CFG = dict(arch="resnet8", dataset="synthetic", epochs=2, batch_size=8, lr=0.05, val_split=0.25)


@pytest.fixture(scope="module")
def vanilla_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "vanilla"
    fit(DistillConfig(method="vanilla", students=2, **CFG), RunDir(root), echo=lambda _: None)
    return root


def test_every_candidate_scored_and_the_best_chosen(vanilla_run):
    rows, ensemble, chosen, path = select(vanilla_run, "auto", None, bn_batches=4)
    names = [r["candidate"] for r in rows]
    assert names == ["student:0", "student:1", "soup"]
    best = max(rows, key=lambda r: (r["val_top1"], -r["params"]))
    assert chosen.name == best["candidate"] and [r["chosen"] for r in rows].count(True) == 1
    soup_row = rows[2]
    assert soup_row["weight_averaged"] and "val_top1_without_bn_recalibration" in soup_row
    assert ensemble["candidate"] == "ensemble" and ensemble["params"] == 2 * rows[0]["params"]
    selection = json.loads((vanilla_run / "selection.json").read_text())
    assert selection["split"] == "val" and selection["chosen"] == chosen.name
    assert path == vanilla_run / "model.pt" and path.is_file()


def test_model_file_reloads_in_a_fresh_process_without_the_run(vanilla_run, tmp_path):
    _, _, chosen, _ = select(vanilla_run, "student:1", tmp_path / "m.pt", bn_batches=4)
    hidden = vanilla_run.rename(tmp_path / "hidden")  # nothing of the run is needed to use the model
    try:
        code = (
            "import sys, torch\n"
            "from okdpipe.modelfile import load_model_file\n"
            "from okdpipe.datasets import load_dataset, make_loader\n"
            "model, info = load_model_file(sys.argv[1])\n"
            "d = info.provenance['data']\n"
            "bundle = load_dataset(d['dataset'], d['data_dir'], val_split=d['val_split'], seed=d['seed'])\n"
            "loader = make_loader(bundle.val, bundle.spec, batch_size=512, train=False, device='cpu')\n"
            "hits = sum(int((model(b.views[0]).argmax(1) == b.labels).sum()) for b in loader.epoch(0))\n"
            "print(hits / len(bundle.val), info.provenance['candidate'])\n"
        )
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.pt")], capture_output=True, text=True,
                             check=True).stdout.split()
        assert float(out[0]) == pytest.approx(chosen.top1, abs=1e-12) and out[1] == "student:1"
    finally:
        hidden.rename(vanilla_run)


def test_ties_go_to_the_smaller_model():
    small, big = nn.Linear(2, 2), nn.Linear(20, 2)
    scored = [Scored("student:0", big, 0.9, 1.0, 42, 0), Scored("student:1", small, 0.9, 1.0, 6, 0),
              Scored("soup", small, 0.8, 1.0, 6, 0)]
    assert choose(scored, "auto", "best-student").name == "student:1"
    assert choose(scored, "soup", "best-student").name == "soup"
    with pytest.raises(OkdpipeError, match="has no such candidate"):
        choose(scored, "leader", "best-student")
    with pytest.raises(OkdpipeError, match="unknown --strategy"):
        choose(scored, "nonsense", "best-student")


def test_count_macs_of_a_conv_and_a_linear():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    assert count_macs(model, torch.zeros(1, 1, 5, 5)) == 4 * 25 * 9 + 100 * 3


def test_bad_run_directories(vanilla_run, tmp_path):
    with pytest.raises(OkdpipeError, match="no such run directory"):
        select(tmp_path / "missing", "auto", None, 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OkdpipeError, match="not an okdpipe run"):
        select(tmp_path / "empty", "auto", None, 4)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(vanilla_run, unfinished)
    manifest = json.loads((unfinished / "manifest.json").read_text())
    (unfinished / "manifest.json").write_text(json.dumps({**manifest, "status": "training"}))
    with pytest.raises(OkdpipeError, match="--resume"):
        select(unfinished, "auto", None, 4)
    tampered = tmp_path / "tampered"
    shutil.copytree(vanilla_run, tampered)
    with open(tampered / "checkpoints" / "last.pt", "r+b") as handle:
        handle.seek(-100, 2)
        handle.write(b"\0" * 8)
    with pytest.raises(OkdpipeError, match="sha256"):
        select(tampered, "auto", None, 4)
