"""`okdpipe select`: candidates, BN recalibration on a seeded class-balanced sample (exact statistics on an image
folder sorted by class), the soup as a mean, non-finite candidates refused, validation-only choice, a
self-describing MODEL.pt."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from datafixtures import write_image_folder
from torch import nn

from okdpipe.config import DistillConfig
from okdpipe.datasets import load_dataset
from okdpipe.distill.checkpoint import load_checkpoint, save_checkpoint
from okdpipe.distill.evaluate import calibration_indices
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
            "from okdpipe.distill.models import load_model_file\n"
            "from okdpipe.datasets import load_dataset, make_loader\n"
            "model, info = load_model_file(sys.argv[1])\n"
            "d = info.provenance['data']\n"
            "bundle = load_dataset(d['dataset'], d['data_dir'], val_split=d['val_split'], seed=d['seed'])\n"
            "loader = make_loader(bundle.val, bundle.spec, batch_size=512, train=False, device='cpu')\n"
            "hits = sum(int((model(b.views[0]).argmax(1) == b.labels).sum()) for b in loader.epoch(0))\n"
            "print(hits / len(bundle.val), info.provenance['candidate'])\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "m.pt")], capture_output=True, text=True, check=True
        ).stdout.split()
        assert float(out[0]) == pytest.approx(chosen.top1, abs=1e-12) and out[1] == "student:1"
    finally:
        hidden.rename(vanilla_run)


def test_ties_go_to_the_smaller_model():
    small, big = nn.Linear(2, 2), nn.Linear(20, 2)
    scored = [
        Scored("student:0", big, 0.9, 1.0, 42, 0),
        Scored("student:1", small, 0.9, 1.0, 6, 0),
        Scored("soup", small, 0.8, 1.0, 6, 0),
    ]
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


def test_calibration_indices_are_seeded_shuffled_and_class_balanced():
    labels = torch.arange(40) // 10  # sorted by class, as image folders and CINIC-10 list their files
    drawn = calibration_indices(labels, 12, 4, seed=3)
    assert len(set(drawn.tolist())) == 12 and torch.bincount(labels[drawn], minlength=4).tolist() == [3, 3, 3, 3]
    assert drawn.tolist() != sorted(drawn.tolist())  # shuffled: every batch mixes classes
    assert torch.equal(drawn, calibration_indices(labels, 12, 4, seed=3))
    assert not torch.equal(drawn, calibration_indices(labels, 12, 4, seed=4))
    assert sorted(calibration_indices(labels, 100, 4, seed=3).tolist()) == list(range(40))  # all, if fewer
    small = torch.tensor([0] * 2 + [1] * 20 + [2] * 20)
    assert torch.bincount(small[calibration_indices(small, 12, 3, seed=0)]).tolist() == [2, 5, 5]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """Two vanilla students, one epoch, on an image folder whose training files are sorted by class."""
    root = tmp_path_factory.mktemp("folder")
    write_image_folder(root / "data", {"train": 48}, ["a", "b", "c", "d"], size=8)
    cfg = DistillConfig(
        method="vanilla",
        students=2,
        arch="resnet8",
        dataset="imagefolder",
        data_dir=str(root / "data"),
        data_options={"image_size": 8},
        epochs=1,
        batch_size=12,
        eval_batch_size=6,
        val_split=0.25,
        seed=5,
    )
    fit(cfg, RunDir(root / "run"), echo=lambda _: None)
    return root


def test_soup_statistics_are_exactly_those_of_the_drawn_class_balanced_sample(folder_run):
    """2 batches of 6 drawn from 36 training images sorted by class: the soup's first BN holds the mean over the
    batches of each batch's mean and unbiased variance (cumulative average), computed here on the recorded
    sample; and its weights are the mean, not the sum, of the students'."""
    _, _, chosen, _ = select(folder_run / "run", "soup", folder_run / "soup.pt", bn_batches=2)
    sample = json.loads((folder_run / "run" / "selection.json").read_text())["bn_recalibration_sample"]
    bundle = load_dataset("imagefolder", folder_run / "data", val_split=0.25, seed=5, image_size=8)
    indices = torch.tensor(sample["indices"])
    assert sample["seed"] == 5 and len(indices) == 12
    assert torch.bincount(bundle.train.labels[indices], minlength=4).tolist() == [3, 3, 3, 3]
    pixels = torch.stack([torch.from_numpy(bundle.train.read(i)).permute(2, 0, 1) for i in indices.tolist()])
    mean, std = torch.tensor(bundle.spec.mean).view(1, 3, 1, 1), torch.tensor(bundle.spec.std).view(1, 3, 1, 1)
    students = load_checkpoint(RunDir(folder_run / "run"))["students"]
    conv = (students["members.0.stem.0.weight"] + students["members.1.stem.0.weight"]) / 2
    model = chosen.model.cpu()
    torch.testing.assert_close(model.stem[0].weight, conv)
    with torch.no_grad():
        maps = torch.nn.functional.conv2d((pixels.float() / 255 - mean) / std, conv, padding=1)
    batches = maps.split(6)
    expected_mean = sum(b.mean(dim=(0, 2, 3)) for b in batches) / 2
    expected_var = sum(b.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for b in batches) / 2
    torch.testing.assert_close(model.stem[1].running_mean, expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.stem[1].running_var, expected_var, rtol=1e-5, atol=1e-6)


def test_a_non_finite_candidate_is_refused_and_never_shipped(vanilla_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(vanilla_run, broken)
    run = RunDir(broken)
    state = load_checkpoint(run)
    state["students"]["members.0.classifier.bias"][0] = float("nan")
    save_checkpoint(run, state)
    rows, _, chosen, _ = select(broken, "auto", None, bn_batches=4)
    assert chosen.name == "student:1" and [r["candidate"] for r in rows] == ["student:1"]
    refused = json.loads((broken / "selection.json").read_text())["refused"]
    assert refused == [
        {"candidate": "student:0", "reason": "non-finite weights"},
        {"candidate": "soup", "reason": "non-finite weights"},
    ]
    with pytest.raises(OkdpipeError, match="student:0 has non-finite weights") as error:
        select(broken, "student:0", tmp_path / "m.pt", bn_batches=4)
    assert "\n" not in str(error.value) and not (tmp_path / "m.pt").exists()


def test_select_warns_when_the_data_is_not_what_the_run_trained_on(tmp_path, capsys):
    """The validation split is drawn again from the training files: after a file is added it may hold an image
    the students trained on. Select says so (nothing said when the data is unchanged)."""
    from okdpipe.distill.finished import load_run

    write_image_folder(tmp_path / "data", {"train": 16}, ["a", "b"], size=8)
    cfg = DistillConfig(
        method="vanilla",
        students=1,
        arch="resnet8",
        dataset="imagefolder",
        data_dir=str(tmp_path / "data"),
        data_options={"image_size": 8},
        epochs=1,
        batch_size=4,
        val_split=0.25,
    )
    fit(cfg, RunDir(tmp_path / "run"), echo=lambda _: None)
    capsys.readouterr()
    load_run(tmp_path / "run", "cpu")
    assert "warning:" not in capsys.readouterr().err
    shutil.copy(tmp_path / "data" / "train" / "a" / "00000.png", tmp_path / "data" / "train" / "a" / "extra.png")
    load_run(tmp_path / "run", "cpu")
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert f"{tmp_path / 'run'}: the dataset at {tmp_path / 'data'} is not the one this run trained on" in line
    assert "validation figures may include trained images" in line
