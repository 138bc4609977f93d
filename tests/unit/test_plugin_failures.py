"""Plug-in code that fails only in the middle of a run (okdpipe/foreign.py): a backbone that raises at a later
step or in validation, a method whose step() raises or returns a loss that is not a scalar, a dataset that reads
a bad image late or whose loader raises. Each is one line naming the component, its plug-in and where the run was
(PluginFailed, exit 3), and training keeps the checkpoint of its last finished epoch, so --resume continues once
the plug-in is fixed. The contract probe also refuses, at start-up, a backbone that fails on validation's batch
size or that writes into its input."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from okdpipe import plugins
from okdpipe.errors import OkdpipeError, PluginFailed

LATE_FAILURES = textwrap.dedent(
    '''
    """Plug-ins that keep the contract at start-up and fail later, one way each. The tests' runs train on batches
    of four, which the start-up probe (batches of 2 and 3, validation's batch in eval mode) never trains on."""
    from pathlib import Path

    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    from okdpipe.datasets import DATASETS, DatasetSpec, FileSplit
    from okdpipe.datasets.splits import RawDataset
    from okdpipe.distill.methods import METHODS, Hparams, Method
    from okdpipe.distill.models import MODELS, Backbone

    BROKEN = True  # the tests fix the plug-in by clearing it


    class Late(Backbone):
        """Counts its training batches of four; `fails(training)` says when the bug shows."""

        def forward_features(self, x, return_stages=False):
            if self.training and len(x) == 4:
                self.trained = getattr(self, "trained", 0) + 1
            if BROKEN and self.fails(self.training, getattr(self, "trained", 0)):
                raise RuntimeError("lost track of its buffers")
            return super().forward_features(x, return_stages)


    class SecondStep(Late):
        def fails(self, training, trained):
            return training and trained == 2


    class SecondValidation(Late):
        def fails(self, training, trained):
            return not training and trained == 2


    class BigEvalBatches(Backbone):
        def forward_features(self, x, return_stages=False):
            if not self.training and len(x) > 4:
                raise ValueError(f"cannot take {len(x)} images at once")
            return super().forward_features(x, return_stages)


    class Scales(Backbone):
        def forward_features(self, x, return_stages=False):
            return super().forward_features(x.mul_(2), return_stages)


    def tiny_as(backbone_class):
        def build(num_classes, in_channels=3):
            stem = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU())
            stage = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU())
            return backbone_class(stem, [stage], nn.Linear(4, num_classes), [4])
        return build


    MODELS.register("late_second_step")(tiny_as(SecondStep))
    MODELS.register("late_second_validation")(tiny_as(SecondValidation))
    MODELS.register("late_big_eval_batches")(tiny_as(BigEvalBatches))
    MODELS.register("late_scales_input")(tiny_as(Scales))


    class OneStudent(Method):
        Params = Hparams
        layout = "peers"
        default_students = 1
        min_students = 1


    @METHODS.register("late-step-raises")
    class StepRaises(OneStudent):
        def step(self, views, labels, out, ctx):
            if BROKEN and ctx.step == 1:
                raise KeyError("teacher")
            return {"loss": F.cross_entropy(out.logits[0], labels)}


    @METHODS.register("late-loss-per-image")
    class LossPerImage(OneStudent):
        def step(self, views, labels, out, ctx):
            return {"loss": F.cross_entropy(out.logits[0], labels, reduction="none")}


    def decode(path):
        """A flat image per file; the test split's last file comes out as float (a decoder that forgot to convert)."""
        image = np.full((8, 8, 1), int(path.stem.split("-")[1]) * 10, dtype=np.uint8)
        return image.astype(np.float32) if BROKEN and path.stem.startswith("bad") else image


    def files(names):
        return FileSplit([Path(name) for name in names], torch.arange(len(names)) % 2, decode)


    @DATASETS.register("late-bad-file")
    def bad_file(data_dir=None):
        spec = DatasetSpec("late-bad-file", 2, ("a", "b"), 1, (8, 8), (0.5,), (0.25,))
        test = files(["test-0.png", "test-1.png", "test-2.png", "bad-3.png"])
        return RawDataset(spec, files([f"train-{i}.png" for i in range(16)]), test, "late", "late")


    @DATASETS.register("late-loader-raises")
    def loader_raises(data_dir=None):
        raise FileNotFoundError("labels.csv")
    '''
)
SYNTHETIC = {"num_classes": 2, "size": 8, "channels": 1, "n_train": 16, "n_test": 4}


@pytest.fixture(scope="module")
def late(write_plugin) -> Path:
    return write_plugin("okdpipe_test_late_plugin", LATE_FAILURES)


@pytest.fixture()
def broken(late, monkeypatch):
    """The plug-in loaded and broken (tests fix it by clearing BROKEN); OKDPIPE_PLUGINS and the list of plug-ins
    named so far restored afterwards."""
    monkeypatch.delenv(plugins.ENVIRONMENT, raising=False)
    monkeypatch.setattr(plugins, "_named", [])
    [plugin] = plugins.load_plugins([str(late)])
    module = __import__(plugin.module)
    monkeypatch.setattr(module, "BROKEN", True)
    return module


def config(late: Path, **changes):
    """A tiny run: 2 classes of 8x8 images, 2 per class for training, batches of 4 (one step an epoch)."""
    from okdpipe.config import DistillConfig

    settings = dict(method="vanilla", arch="resnet8", dataset="synthetic", data_options=SYNTHETIC, students=1)
    settings.update(epochs=2, train_subset=2, batch_size=4, plugins=[str(late)])
    return DistillConfig(**{**settings, **changes})


def failed_run(cfg, run_dir: Path) -> str:
    """fit(cfg) fails with PluginFailed (exit 3); its one-line message."""
    from okdpipe.distill.trainer import fit
    from okdpipe.run import RunDir

    with pytest.raises(PluginFailed) as error:
        fit(cfg, RunDir(run_dir), echo=lambda _: None)
    assert error.value.exit_code == 3 and "\n" not in str(error.value)
    return str(error.value)


def finished_epochs(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["epoch"]


@pytest.mark.parametrize(
    "arch, where",
    [("late_second_step", "at epoch 2, step 2 (of 2)"), ("late_second_validation", "in validation after epoch 2")],
)
def test_a_backbone_failing_mid_run_is_one_line_and_keeps_the_last_checkpoint(broken, late, tmp_path, arch, where):
    message = failed_run(config(late, arch=arch), tmp_path / "run")
    assert message == (
        f"backbone {arch!r} from plug-in '{late}' failed {where}: RuntimeError: lost track of its buffers — fix the "
        "plug-in or choose another backbone; the last good checkpoint (epoch 1) is kept"
    )
    assert finished_epochs(tmp_path / "run") == 1
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert (manifest["status"], manifest["error"]) == ("failed", message)


def test_resume_continues_once_the_plugin_is_fixed(broken, late, tmp_path):
    from okdpipe.distill.trainer import fit
    from okdpipe.run import RunDir

    cfg = config(late, method="late-step-raises")
    message = failed_run(cfg, tmp_path / "run")
    assert message == (
        f"method 'late-step-raises' from plug-in '{late}' failed at epoch 2, step 2 (of 2): KeyError: 'teacher' — fix "
        "the plug-in or choose another method; the last good checkpoint (epoch 1) is kept"
    )
    broken.BROKEN = False
    fit(cfg, RunDir(tmp_path / "run"), resume=True, echo=lambda _: None)
    assert finished_epochs(tmp_path / "run") == 2
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "finished"


def test_a_loss_that_is_not_a_scalar_is_the_methods_failure_before_any_checkpoint(broken, late, tmp_path):
    message = failed_run(config(late, method="late-loss-per-image"), tmp_path / "run")
    assert message == (
        f"method 'late-loss-per-image' from plug-in '{late}' failed at epoch 1, step 1 (of 2): step() returned "
        "'loss' as a float32 tensor of shape [4], expected a scalar — fix the plug-in or choose another "
        "method; no epoch had finished, so there is no checkpoint"
    )
    assert not (tmp_path / "run").exists()  # nothing could resume: the folder it created is gone


def test_okdpipe_own_method_breaking_the_loss_contract_is_a_bug_with_its_traceback(broken, late, tmp_path, monkeypatch):
    """Only foreign code is blamed: the same breach from okdpipe's own method is a bug to report."""
    from okdpipe.distill.methods.vanilla import Vanilla
    from okdpipe.foreign import ForeignBreach

    monkeypatch.setattr(Vanilla, "step", lambda self, views, labels, out, ctx: {"loss": out.logits[0].sum(1)})
    from okdpipe.distill.trainer import fit
    from okdpipe.run import RunDir

    with pytest.raises(ForeignBreach):
        fit(config(late), RunDir(tmp_path / "run"), echo=lambda _: None)


def test_a_dataset_reading_a_bad_image_late_or_a_loader_that_raises_is_one_line(broken, late, tmp_path):
    message = failed_run(config(late, dataset="late-bad-file", data_options={}, epochs=1), tmp_path / "run")
    assert message == (
        f"dataset 'late-bad-file' from plug-in '{late}' failed in the final test evaluation: image 3 (bad-3.png) "
        "was read as float32 [8, 8, 1], expected uint8 [8, 8, 1] (height, width, channels) — fix the plug-in or "
        "choose another dataset; the last good checkpoint (epoch 1) is kept"
    )
    assert finished_epochs(tmp_path / "run") == 1
    from okdpipe.datasets import load_dataset

    with pytest.raises(PluginFailed) as error:
        load_dataset("late-loader-raises")
    assert str(error.value) == (
        f"dataset 'late-loader-raises' from plug-in '{late}' failed while loading its splits: FileNotFoundError: "
        "labels.csv — fix the plug-in or choose another dataset"
    )


def test_the_cli_reports_a_mid_run_failure_in_one_line_with_exit_3(broken, late, tmp_path):
    from okdpipe.cli import app

    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config(late, arch="late_second_step").model_dump(mode="json")))
    result = CliRunner().invoke(app, ["distill", "--config", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 3, result.output
    assert result.stderr.splitlines() == [
        f"error: backbone 'late_second_step' from plug-in '{late}' failed at epoch 2, step 2 (of 2): RuntimeError: "
        "lost track of its buffers — fix the plug-in or choose another backbone; the last good checkpoint (epoch 1) "
        "is kept"
    ]
    assert "Traceback" not in result.output and finished_epochs(tmp_path / "run") == 1


def probe(arch: str, eval_batch: int = 0) -> None:
    from okdpipe.distill.models import create_model
    from okdpipe.distill.models.contract import check_contract

    model = create_model(arch, num_classes=2, in_channels=1)
    check_contract(model, arch, 2, (1, 8, 8), features=False, stages=False, eval_batch=eval_batch)


def test_the_probe_runs_validations_batch_size_capped_at_64(broken):
    probe("late_big_eval_batches", eval_batch=4)  # validation never passes more than four
    with pytest.raises(OkdpipeError) as error:
        probe("late_big_eval_batches", eval_batch=512)
    assert str(error.value) == (
        "backbone 'late_big_eval_batches' fails a forward pass on a batch of 64 1x8x8 (CxHxW) images (cannot take "
        "64 images at once); fix the backbone or choose one that takes this dataset's images"
    )


def test_the_probe_refuses_a_backbone_that_writes_into_its_input(broken):
    with pytest.raises(OkdpipeError) as error:
        probe("late_scales_input")
    assert str(error.value) == (
        "backbone 'late_scales_input' changes its input images in place for a batch of 2; the peers share each "
        "batch, so fix the backbone's forward to work on a copy (x = x * 2, not x.mul_(2))"
    )
    probe("resnet8")  # okdpipe's own in-place ReLUs work on their own outputs, never on the input
