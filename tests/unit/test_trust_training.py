"""Issue 13 on the training side: nothing non-finite is recorded, a damaged or busy run directory and an
unwritable output are one-line errors, a batch that cannot fit is refused before training."""

import errno
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from okdpipe.config import DistillConfig
from okdpipe.distill import trainer
from okdpipe.distill.checkpoint import load_checkpoint
from okdpipe.distill.methods import METHODS
from okdpipe.distill.methods.vanilla import Vanilla
from okdpipe.distill.trainer import fit
from okdpipe.errors import GateFailed, OkdpipeError
from okdpipe.files import atomic_write_text, file_sha256
from okdpipe.run import RunDir

# synthetic: 64 training images, 48 after the 25% validation split -> 6 steps of 8 per epoch
TINY = dict(
    method="vanilla",
    arch="resnet8",
    students=1,
    dataset="synthetic",
    epochs=2,
    batch_size=8,
    lr=0.05,
    eval_batch_size=64,
    val_split=0.25,
)
STEPS_PER_EPOCH = 6


def tiny(**changes) -> DistillConfig:
    return DistillConfig(**{**TINY, **changes})


def quiet(_):
    pass


def poison_step(monkeypatch, at_step: int, poison) -> None:
    """Make `poison(session, losses)` happen after the real training step number `at_step` (0-based)."""
    real = trainer.train_step

    def step(s, batch, ctx):
        losses = real(s, batch, ctx)
        if ctx.step == at_step:
            poison(s, losses)
        return losses

    monkeypatch.setattr(trainer, "train_step", step)


def nan_loss(s, losses):
    losses["loss"] = losses["loss"] * float("nan")


def inf_weight(s, losses):
    with torch.no_grad():
        next(s.students.parameters()).view(-1)[0] = float("inf")


def inf_loss(s, losses):
    losses["loss"] = losses["loss"] * float("inf")


@pytest.mark.parametrize("poison", [nan_loss, inf_loss], ids=["nan", "inf"])
def test_a_nan_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, poison):
    run = RunDir(tmp_path / "r")
    poison_step(monkeypatch, STEPS_PER_EPOCH + 2, poison)  # epoch 2, step 9 (1-based)
    saved, real_save = [], trainer.save_checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint", lambda run, state: saved.append(file_sha256(real_save(run, state))))
    with pytest.raises(GateFailed) as err:
        fit(tiny(), run, echo=quiet)
    message = str(err.value)
    assert "epoch 2, step 9 (of 12)" in message and "checkpoint (epoch 1) is kept" in message
    assert "\n" not in message and err.value.exit_code == 1
    assert len(saved) == 1 and file_sha256(run.checkpoints / "last.pt") == saved[0]  # epoch 1's, untouched
    assert load_checkpoint(run)["epoch"] == 1
    records = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]  # strict JSON: no NaN
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1]
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["status"] == "diverged" and manifest["error"] == message


def test_non_finite_weights_at_the_end_of_an_epoch_stop_before_the_checkpoint(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "r")
    poison_step(monkeypatch, STEPS_PER_EPOCH - 1, inf_weight)  # the loss of that step was still finite
    with pytest.raises(
        GateFailed,
        match=r"the weight members\.0\.\S+ became NaN or infinite at epoch 1, step 6 .*"
        r"no epoch had finished, so there is no checkpoint",
    ):
        fit(tiny(), run, echo=quiet)
    assert not (run.checkpoints / "last.pt").exists()
    records = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    assert [r["kind"] for r in records] == ["step"]  # the last step's (finite) loss, no epoch record


@pytest.mark.parametrize("split, bad", [("val", math.nan), ("val", math.inf), ("test", math.nan), ("test", -math.inf)])
def test_finite_weights_with_non_finite_metrics_are_divergence_not_a_write_error(tmp_path, monkeypatch, split, bad):
    """A huge lr can leave the weights finite and the logits infinite: the loss of the second validation (or of
    the test split) is NaN. That ends the run as diverged (exit 1, manifest says so), never a JSON-writer error."""
    run = RunDir(tmp_path / "r")
    real, calls = trainer.evaluate_run, []

    def evaluate_run(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == (2 if split == "val" else 3):  # validation after epochs 1 and 2, then test
            result["student:0"]["loss"] = bad
        return result

    monkeypatch.setattr(trainer, "evaluate_run", evaluate_run)
    with pytest.raises(GateFailed) as err:
        fit(tiny(), run, echo=quiet)
    message = str(err.value)
    assert f"the {split if split == 'test' else 'validation'} figure or weight" in message
    assert "student:0.loss" in message and "epoch 2, step 12 (of 12)" in message
    assert f"checkpoint (epoch {1 if split == 'val' else 2}) is kept" in message
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["status"] == "diverged" and manifest["error"] == message
    assert "test" not in manifest


def test_first_nonfinite_tensor_names_parameters_and_buffers():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    assert trainer.first_nonfinite_tensor([net]) is None
    net[1].running_var[1] = float("nan")
    assert trainer.first_nonfinite_tensor([net]) == "1.running_var"
    net[0].bias.data[0] = float("-inf")
    assert trainer.first_nonfinite_tensor([net]) == "0.bias"


def test_non_finite_tensors_lists_every_bad_float_tensor_in_order_and_ignores_integers():
    from okdpipe.modelfile import non_finite_tensors

    state = {
        "a": torch.tensor([1.0, float("inf")]),
        "steps": torch.tensor([7]),  # integers are never non-finite
        "b": torch.zeros(3, dtype=torch.float16),
        "c": torch.tensor([[float("nan")]], dtype=torch.float64),
        "d": torch.tensor(-1e38),
    }
    assert non_finite_tensors(state.items()) == ["a", "c"]
    assert non_finite_tensors([]) == [] and non_finite_tensors([("n", torch.tensor([3]))]) == []


def hold_lock_in_another_process(root):
    """A process that takes the run's lock and sleeps; returns it once it holds the lock."""
    code = (
        "import sys, time; from okdpipe.run import RunDir\n"
        "with RunDir(sys.argv[1]).locked():\n    print('locked', flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_into_a_locked_directory_fails_at_once_and_a_dead_holder_does_not_block(tmp_path):
    run = RunDir(tmp_path / "r")
    holder = hold_lock_in_another_process(run.root)
    try:
        with pytest.raises(OkdpipeError, match=rf"is in use by another okdpipe run \(pid {holder.pid} on "):
            fit(tiny(epochs=1), run, echo=quiet)
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # like kill -9: no cleanup runs, the lock file stays
        holder.wait()
    assert (run.root / ".lock").is_file()
    fit(tiny(epochs=1), run, echo=quiet)
    assert load_checkpoint(run)["epoch"] == 1


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A run stopped in its second epoch, with epoch 1's checkpoint (copied by each test that damages it)."""
    root = tmp_path_factory.mktemp("killed") / "r"
    fit(tiny(), RunDir(root), stop_after_steps=STEPS_PER_EPOCH + 2, echo=quiet)
    return root


@pytest.fixture
def damaged(killed, tmp_path):
    import shutil

    shutil.copytree(killed, tmp_path / "r")
    return RunDir(tmp_path / "r")


def resave_checkpoint(run: RunDir, change) -> None:
    """Rewrite last.pt with `change` applied and record its new hash, as a careless tool would."""
    state = torch.load(run.checkpoints / "last.pt", weights_only=True)
    change(state)
    torch.save(state, run.checkpoints / "last.pt")
    run.record_artifact(run.checkpoints / "last.pt", epoch=1)


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda run: run.manifest_path.write_text("[]"), "corrupt manifest (a list, not an object)"),
        (lambda run: run.manifest_path.write_text('"x"'), "corrupt manifest (a str, not an object)"),
        (
            lambda run: run.manifest_path.write_text(json.dumps({"manifest_version": 1, "artifacts": []})),
            "corrupt manifest (artifacts: Input should be a valid dictionary",
        ),
        (
            lambda run: run.manifest_path.write_text(
                json.dumps({"manifest_version": 1, "artifacts": {"checkpoints/last.pt": {"bytes": 1}}})
            ),
            "corrupt manifest (artifacts.checkpoints/last.pt.sha256: Field required)",
        ),
        (
            lambda run: resave_checkpoint(run, lambda state: state.pop("students")),
            "damaged checkpoint (students: Field required)",
        ),
        (
            lambda run: resave_checkpoint(run, lambda state: state.update(history=[])),
            "damaged checkpoint (Value error, history must hold one summary",
        ),
        (
            lambda run: resave_checkpoint(run, lambda state: state["students"].pop(next(iter(state["students"])))),
            "the checkpoint does not fit this run's models (Error(s) in loading state_dict",
        ),
        (
            lambda run: resave_checkpoint(run, lambda state: state.update(config=[1])),
            "damaged checkpoint (config: Input should be a valid dictionary",
        ),
    ],
)
def test_a_damaged_run_directory_is_one_line_on_resume(damaged, damage, fragment):
    damage(damaged)
    with pytest.raises(OkdpipeError) as err:
        fit(tiny(), damaged, resume=True, echo=quiet)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_torn_last_metrics_line_is_dropped_on_resume(damaged):
    with open(damaged.metrics_path, "a") as handle:
        handle.write('{"kind": "step", "epoch": 2, "lo')  # a kill in the middle of a write
    fit(tiny(), damaged, resume=True, echo=quiet)
    records = [json.loads(line) for line in damaged.metrics_path.read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]


def raises(code: int):
    """A stand-in for os/pathlib calls that fails as the system would with `code`."""

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


enospc = raises(errno.ENOSPC)


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_leaves_the_old_file(damaged, monkeypatch):
    before = file_sha256(damaged.checkpoints / "last.pt")

    real_fsync = os.fsync

    def disk_fills_while_saving(fd):  # only the checkpoint's temp file meets the full disk
        if "last.pt.pending" in os.readlink(f"/proc/self/fd/{fd}"):
            enospc()
        real_fsync(fd)

    monkeypatch.setattr("okdpipe.files.os.fsync", disk_fills_while_saving)
    with pytest.raises(OkdpipeError, match=r"last\.pt\.pending: cannot write \(No space left on device\)"):
        fit(tiny(), damaged, resume=True, echo=quiet)
    assert file_sha256(damaged.checkpoints / "last.pt") == before
    assert sorted(p.name for p in damaged.checkpoints.iterdir()) == ["last.pt"]  # no temp or pending file


def test_atomic_write_failing_mid_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "card.json"
    atomic_write_text(path, "old")

    def half_then_full(handle):
        handle.write(b"ha")
        enospc()

    from okdpipe.files import atomic_write

    with pytest.raises(OkdpipeError, match="No space left on device"):
        atomic_write(path, half_then_full)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["card.json"]


def test_a_read_only_or_file_out_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OkdpipeError, match="file is a file, not a folder; choose another path"):
        fit(tiny(), RunDir(tmp_path / "file"), echo=quiet)
    monkeypatch.setattr("pathlib.Path.mkdir", raises(errno.EROFS))
    with pytest.raises(OkdpipeError, match=r"cannot create the run directory \(Read-only file system\)"):
        fit(tiny(), RunDir(tmp_path / "ro"), echo=quiet)


def test_a_batch_that_cannot_fit_is_refused_with_an_estimate(tmp_path, monkeypatch):
    session = trainer.build_session(tiny(), RunDir(tmp_path / "probe"))
    per_image, largest = trainer.activation_floats(session)
    need = per_image * 8 * 4  # fp32 on CPU, batch 8: every layer's output of every image is kept for backward
    assert need > 2 * largest * 16 * 4  # (the evaluation pass of 16 images needs less)
    monkeypatch.setattr(trainer, "available_bytes", lambda device: need - 1)
    with pytest.raises(
        OkdpipeError,
        match=rf"--batch-size 8 \(--eval-batch-size 64\): a step needs about "
        rf"{need / 2**30:.1f} GiB .* more than the",
    ):
        fit(tiny(), RunDir(tmp_path / "r"), echo=quiet)
    monkeypatch.setattr(trainer, "available_bytes", lambda device: need)
    trainer.check_memory(session)  # exactly enough passes


class NesterovVanilla(Vanilla):
    optimizer_defaults = {"optimizer": "nesterov", "weight_decay": 1e-4}


def test_a_methods_optimizer_defaults_apply_unless_set_and_are_recorded(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS._items, "nesterov-vanilla", NesterovVanilla)
    from okdpipe.config import build_config

    cfg = trainer.with_method_defaults_of(build_config({"method": "nesterov-vanilla"}, {}, []))
    assert (cfg.optimizer, cfg.weight_decay, cfg.momentum) == ("nesterov", 1e-4, 0.9)
    chosen = trainer.with_method_defaults_of(
        build_config({"method": "nesterov-vanilla", "weight_decay": 0.0}, {}, ["optimizer=sgd"])
    )
    assert (chosen.optimizer, chosen.weight_decay) == ("sgd", 0.0)
    run = RunDir(tmp_path / "r")
    fit(tiny(method="nesterov-vanilla"), run, stop_after_steps=STEPS_PER_EPOCH + 1, echo=quiet)
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["optimizer"] == {
        "optimizer": "nesterov",
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "method_defaults": {"optimizer": "nesterov", "weight_decay": 1e-4},
        "backbone_recipe": {},
    }
    assert manifest["config"]["optimizer"] == "nesterov"
    groups = load_checkpoint(run)["optimizer"]["param_groups"]
    assert groups[0]["nesterov"] is True and groups[0]["weight_decay"] == 1e-4
    fit(tiny(method="nesterov-vanilla"), run, resume=True, echo=quiet)  # the resolved config resumes


def test_a_backbones_recipe_trains_unless_overridden_and_is_recorded(tmp_path, monkeypatch):
    from okdpipe.distill.models import MODELS, recipe
    from okdpipe.distill.models.cifar_resnet import resnet8

    slow_resnet8 = recipe(lr=0.02, warmup_epochs=0.5)(lambda **kw: resnet8(**kw))
    monkeypatch.setitem(MODELS._items, "slow-resnet8", slow_resnet8)
    cfg = {k: v for k, v in TINY.items() if k != "lr"}  # TINY sets lr, which would hide the recipe's
    run = RunDir(tmp_path / "r")
    fit(DistillConfig(**{**cfg, "arch": "slow-resnet8"}), run, stop_after_steps=STEPS_PER_EPOCH + 1, echo=quiet)
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["optimizer"]["backbone_recipe"] == {"lr": 0.02, "warmup_epochs": 0.5}
    assert (manifest["config"]["lr"], manifest["config"]["warmup_epochs"]) == (0.02, 0.5)
    assert "lr: 0.02\n" in run.config_path.read_text()
    group = load_checkpoint(run)["optimizer"]["param_groups"][0]
    # the last step of epoch 1 (step 5 of 12, warm-up 3 steps) is 2/9 of the way down the cosine
    assert group["base_lr"] == 0.02 and group["lr"] == pytest.approx(0.02 * 0.5 * (1 + math.cos(2 * math.pi / 9)))
    overridden = RunDir(tmp_path / "o")
    fit(DistillConfig(**{**cfg, "arch": "slow-resnet8", "lr": 0.1}), overridden, stop_after_steps=7, echo=quiet)
    assert json.loads(overridden.manifest_path.read_text())["config"]["lr"] == 0.1


def test_a_full_disk_while_recording_the_checkpoint_keeps_the_old_one_resumable(damaged, monkeypatch):
    before = file_sha256(damaged.checkpoints / "last.pt")
    real_record = RunDir.record_artifact

    def record_on_a_full_disk(self, path, **kw):  # the manifest's atomic write meets a full disk
        with monkeypatch.context() as full:
            full.setattr("okdpipe.files.os.fsync", enospc)
            return real_record(self, path, **kw)

    monkeypatch.setattr(RunDir, "record_artifact", record_on_a_full_disk)
    with pytest.raises(OkdpipeError, match=r"manifest\.json: cannot write \(No space left on device\)"):
        fit(tiny(), damaged, resume=True, echo=quiet)
    monkeypatch.setattr(RunDir, "record_artifact", real_record)
    assert sorted(p.name for p in damaged.checkpoints.iterdir()) == ["last.pt"]
    assert file_sha256(damaged.checkpoints / "last.pt") == before and load_checkpoint(damaged)["epoch"] == 1


def test_a_save_killed_between_recording_and_renaming_is_finished_on_load(damaged):
    from okdpipe.distill.checkpoint import PENDING

    state = load_checkpoint(damaged)
    state["epoch"], state["history"] = 2, state["history"] * 2
    torch.save(state, damaged.checkpoints / PENDING)  # as save_checkpoint leaves it, killed before its rename
    damaged.record_artifact(damaged.checkpoints / PENDING, recorded_as=damaged.checkpoints / "last.pt", epoch=2)
    assert load_checkpoint(damaged)["epoch"] == 2
    assert sorted(p.name for p in damaged.checkpoints.iterdir()) == ["last.pt"]
    torch.save({"not": "recorded"}, damaged.checkpoints / PENDING)  # killed before its hash was recorded
    assert load_checkpoint(damaged)["epoch"] == 2 and not (damaged.checkpoints / PENDING).exists()


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"lr": float("nan")}, "damaged run config: lr: Input should be a finite number"),
        ({"epochs": "two"}, "damaged run config: epochs: Input should be a valid integer"),
        ({"surprise": 1}, "damaged run config: surprise: Extra inputs are not permitted"),
    ],
)
def test_a_finished_run_with_a_damaged_config_is_one_line_for_select(tmp_path, change, fragment):
    from okdpipe.distill.finished import load_run

    run = RunDir(tmp_path / "r")
    fit(tiny(epochs=1), run, echo=quiet)
    resave_checkpoint(run, lambda state: state["config"].update(change))
    with pytest.raises(OkdpipeError) as err:
        load_run(run.root, device="cpu")
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_precise_bn_sets_statistics_from_the_calibration_sample_and_leaves_training_alone(tmp_path):
    """PreciseBN recomputes the students' BN statistics before each validation: the weights train exactly as
    without it, and the stem's statistics are the stem convolution's output moments over the calibration sample
    (one batch of eval_batch_size here), computed here from the weights and the normalised images."""
    import torch.nn.functional as F

    from okdpipe.contracts.card import PIXEL_SCALE, Preprocess
    from okdpipe.datasets import load_dataset
    from okdpipe.distill.evaluate import calibration_sample

    states = {}
    for precise in (False, True):
        run = RunDir(tmp_path / str(precise))
        fit(tiny(precise_bn=precise), run, echo=quiet)
        states[precise] = load_checkpoint(run)["students"]
        epochs = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
        timed = [e.get("precise_bn_seconds") for e in epochs if e.get("kind") == "epoch"]
        assert all(t > 0 for t in timed) if precise else timed == [None] * len(timed)  # its cost is recorded
    plain, precise = states[False], states[True]
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    assert all(torch.equal(plain[k], precise[k]) for k in plain if not k.endswith(statistics))
    bundle = load_dataset("synthetic", val_split=0.25, seed=0)
    spec = bundle.spec
    sample = calibration_sample(bundle.train, 20 * TINY["eval_batch_size"], spec.num_classes, 0).split
    assert len(sample) <= TINY["eval_batch_size"]  # one calibration batch: the statistics are its moments
    pixels = torch.cat([images for images, _ in sample.iter_batches(1000)]).numpy()
    normalised = Preprocess(*spec.input_size, spec.in_channels, PIXEL_SCALE, spec.mean, spec.std).normalise(pixels)
    stem = F.conv2d(torch.from_numpy(normalised), precise["members.0.stem.0.weight"], padding=1).double()
    torch.testing.assert_close(
        precise["members.0.stem.1.running_mean"].double(), stem.mean((0, 2, 3)), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(precise["members.0.stem.1.running_var"].double(), stem.var((0, 2, 3)), atol=0, rtol=1e-4)
    assert not torch.allclose(plain["members.0.stem.1.running_mean"], precise["members.0.stem.1.running_mean"])


def test_recalibration_restores_each_batchnorm_momentum():
    from types import SimpleNamespace

    from okdpipe.distill.evaluate import recalibrate_bn

    model = torch.nn.Sequential(torch.nn.BatchNorm2d(2, momentum=0.3), torch.nn.BatchNorm2d(2))
    batches = [SimpleNamespace(views=torch.arange(16.0).reshape(1, 2, 2, 2, 2))]
    recalibrate_bn(model, batches, max_batches=1)
    assert [m.momentum for m in model] == [0.3, 0.1]
    torch.testing.assert_close(model[0].running_mean, torch.tensor([5.5, 9.5]))  # channel means of the batch
