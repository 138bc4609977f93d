"""`--init PATH` (distill/init_weights.py): students start from a state dict, an okdpipe MODEL.pt, or a timm or
torchvision checkpoint (.pth, .safetensors); the classifier of another class count is re-initialised, an RGB
first conv is summed for grayscale, any other mismatch is one line; the report is exact and kept in the
manifest."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from okdpipe.distill.init_weights import initialise
from okdpipe.distill.models import create_model
from okdpipe.distill.students import Students
from okdpipe.errors import OkdpipeError

ROOT = Path(__file__).resolve().parents[2]
RESNET8_WEIGHTS = 47  # its parameters and BatchNorm running statistics; its 9 BatchNorm counters are not weights


def weight_count(state: dict) -> int:
    """What --init counts as loaded: floating-point tensors (parameters and BatchNorm statistics)."""
    return sum(value.is_floating_point() for value in state.values())


def test_torchvision_checkpoint_fine_tunes_to_another_class_count(tmp_path):
    from torchvision.models import mobilenet_v3_small

    torch.manual_seed(1)
    source = mobilenet_v3_small(weights=None, num_classes=1000).state_dict()  # as torchvision publishes them
    torch.save(source, tmp_path / "mobilenet_v3_small.pth")
    students = Students("torchvision:mobilenet_v3_small", 2, 10, 3)
    fresh = [students.member_state(i)["classifier.weight"].clone() for i in range(2)]
    record = initialise(students, tmp_path / "mobilenet_v3_small.pth")
    for i in range(2):
        state = students.member_state(i)
        for key, value in source.items():
            if not key.startswith("classifier.3."):
                assert torch.equal(state["net." + key], value), key
        assert torch.equal(state["classifier.weight"], fresh[i])  # each keeps its own fresh classifier
    assert (record["loaded"], record["of"]) == (208, 210)  # weights: the 34 BatchNorm counters are not counted
    assert record["reinitialised"] == ["classifier.weight", "classifier.bias"]
    assert record["missing"] == record["unexpected"] == 0 and record["kind"] == "state-dict"
    digest = hashlib.sha256((tmp_path / "mobilenet_v3_small.pth").read_bytes()).hexdigest()
    assert record["sha256"] == digest


def test_timm_safetensors_for_rgb_is_summed_into_a_grayscale_first_conv(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=4).state_dict()
    save_file(source, str(tmp_path / "model.safetensors"))
    students = Students("timm:mobilenetv3_small_050", 1, 4, 1)
    record = initialise(students, tmp_path / "model.safetensors")
    state = students.member_state(0)
    assert torch.allclose(state["net.conv_stem.weight"], source["conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(state["classifier.weight"], source["classifier.weight"])  # same class count: loaded
    assert record["adapted_channels"] == ["net.conv_stem.weight"] and record["loaded"] == weight_count(source)


def test_a_grayscale_model_file_initialises_rgb_students_with_its_first_conv_repeated(tmp_path):
    """The README's fine-tuning example: a Fashion-MNIST MODEL.pt (1 channel) into students of an RGB image
    folder. Each RGB filter is the gray one divided by 3, so a gray image given as (x, x, x) answers as before."""
    torch.manual_seed(4)
    source = create_model("resnet8", 10, 1).state_dict()
    torch.save(source, tmp_path / "gray.pt")
    students = Students("resnet8", 2, 10, 3)
    record = initialise(students, tmp_path / "gray.pt")
    first = next(key for key, value in source.items() if value.dim() == 4)
    state = students.member_state(1)
    expected = torch.cat([source[first] / 3] * 3, dim=1)  # [out, 3, kh, kw]
    assert torch.equal(state[first], expected) and record["adapted_channels"] == [first]
    assert all(torch.equal(state[key], value) for key, value in source.items() if key != first)
    x = torch.rand(1, 1, 8, 8)
    gray = torch.nn.functional.conv2d(x, source[first], padding=1)
    rgb = torch.nn.functional.conv2d(x.repeat(1, 3, 1, 1), state[first], padding=1)
    assert torch.allclose(gray, rgb, atol=1e-6)


def test_a_first_conv_of_another_channel_count_is_one_line_naming_both(tmp_path):
    source = create_model("resnet8", 10, 3).state_dict()
    torch.save(source, tmp_path / "rgb.pt")
    with pytest.raises(OkdpipeError, match=r"takes 3 input channels, the dataset's images have 2; only 3 -> 1 and"):
        initialise(Students("resnet8", 1, 10, 2), tmp_path / "rgb.pt")


def test_wrapped_checkpoints_and_dataparallel_prefixes_are_unwrapped(tmp_path):
    torch.manual_seed(2)
    source = create_model("resnet8", 4, 3).state_dict()
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in source.items()}}, tmp_path / "ckpt.pth")
    students = Students("resnet8", 2, 4, 3)
    record = initialise(students, tmp_path / "ckpt.pth")
    assert all(torch.equal(students.member_state(1)[k], v) for k, v in source.items())
    assert record["loaded"] == RESNET8_WEIGHTS and record["missing"] == 0


def test_shared_trunk_students_and_pcls_mean_teacher_start_from_the_file(tmp_path):
    from okdpipe.distill.methods import METHODS

    torch.manual_seed(3)
    source = create_model("resnet8", 4, 3).state_dict()
    torch.save(source, tmp_path / "resnet8.pt")
    students = Students("resnet8", 3, 4, 3, layout="branches")
    pcl = METHODS.get("pcl")
    method = pcl(students, pcl.Params(), 4)
    initialise(students, tmp_path / "resnet8.pt", method)
    for i in range(3):
        assert all(torch.equal(students.member_state(i)[k], v) for k, v in source.items())
        assert all(torch.equal(method.mean_teacher.member_state(i)[k], v) for k, v in source.items())


def test_anything_else_that_does_not_fit_is_one_line(tmp_path):
    from okdpipe.modelfile import ModelInfo, save_model_file

    source = create_model("resnet8", 4, 3).state_dict()
    source["stages.0.0.residual.0.0.weight"] = torch.zeros(8, 16, 3, 3)
    torch.save(source, tmp_path / "narrow.pt")
    with pytest.raises(OkdpipeError) as error:
        initialise(Students("resnet8", 1, 4, 3), tmp_path / "narrow.pt")
    assert str(error.value).startswith(
        f"--init {tmp_path / 'narrow.pt'}: stages.0.0.residual.0.0.weight has shape [8, 16, 3, 3] in the file but "
        "[16, 16, 3, 3] in the students"
    )
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "foreign.pt")
    with pytest.raises(OkdpipeError, match="none of its 1 entries matches the students' 56"):
        initialise(Students("resnet8", 1, 4, 3), tmp_path / "foreign.pt")
    info = ModelInfo("resnet20", 4, 3, (16, 16), (0.5,) * 3, (0.25,) * 3, ("a", "b", "c", "d"))
    save_model_file(create_model("resnet20", 4, 3), info, tmp_path / "model.pt")
    with pytest.raises(OkdpipeError, match="the model file holds a resnet20, the students are resnet8"):
        initialise(Students("resnet8", 1, 4, 3), tmp_path / "model.pt")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(OkdpipeError, match="not a readable weights file"):
        initialise(Students("resnet8", 1, 4, 3), tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(OkdpipeError, match="not a readable .safetensors file"):
        initialise(Students("resnet8", 1, 4, 3), tmp_path / "junk.safetensors")


def refusal_of_changed_resnet8(path: Path, key: str, change) -> str:
    """--init's one-line refusal of a resnet8 state dict whose entry `key` is replaced by change(entry)."""
    state = create_model("resnet8", 4, 3).state_dict()
    state[key] = change(state[key])
    torch.save(state, path)
    with pytest.raises(OkdpipeError) as error:
        initialise(Students("resnet8", 1, 4, 3), path)
    return str(error.value)


def test_a_classifier_of_another_width_as_well_as_class_count_is_refused_not_reinitialised(tmp_path):
    """Only the class count may differ: a head of another input width means the file is for another network."""
    wide = refusal_of_changed_resnet8(tmp_path / "wide.pt", "classifier.weight", lambda _: torch.zeros(7, 32))
    assert wide == (
        f"--init {tmp_path / 'wide.pt'}: classifier.weight has shape [7, 32] in the file but [4, 64] in the "
        "students; the file is for another architecture or width (only the classifier's class count may differ)"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda state: {index: value for index, value in enumerate(state.values())}, "holds no state dict of tensors"),
        (lambda state: {**state, "classifier.weight": torch.tensor(1.0)}, "classifier.weight has shape [] in the file"),
        (lambda state: {**state, "classifier.bias": torch.zeros(4, dtype=torch.int8)}, "holds int8 values, the"),
        (lambda state: {**state, "classifier.bias": torch.zeros(4, dtype=torch.complex64)}, "holds complex64 values"),
    ],
    ids=["integer keys", "0-dim classifier", "int8 weights", "complex weights"],
)
def test_a_state_dict_of_the_wrong_kind_is_one_line_not_a_traceback(tmp_path, change, message):
    """Integer keys gave an AttributeError and a 0-dim classifier an IndexError; int8 and complex weights were cast
    to float silently (the imaginary part dropped)."""
    torch.save(change(create_model("resnet8", 4, 3).state_dict()), tmp_path / "odd.pt")
    with pytest.raises(OkdpipeError, match=re.escape(message)) as error:
        initialise(Students("resnet8", 1, 4, 3), tmp_path / "odd.pt")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda t: torch.empty_like(t, device="meta"), "meta"),
        (lambda t: t.to_sparse(), "sparse_coo"),
        (lambda t: t.reshape(t.shape[0], -1).to_sparse_csr(), "sparse_csr"),
    ],
    ids=["meta", "sparse", "sparse-csr"],
)
def test_tensors_without_dense_values_are_one_line_naming_the_kind(tmp_path, make, kind):
    """A meta tensor has no data and a sparse one no strided storage: the NaN check raised NotImplementedError."""
    assert refusal_of_changed_resnet8(tmp_path / "odd.pt", "stem.0.weight", make) == (
        f"--init {tmp_path / 'odd.pt'}: the file holds {kind} tensors (stem.0.weight), which okdpipe cannot load; "
        "save dense weights"
    )


def test_a_pickled_module_is_refused_in_one_whole_sentence_with_the_fix(tmp_path):
    """A whole pickled nn.Module needs unpickling (it could run code): refused, with torch's paragraph replaced by
    one whole sentence and the way to re-save it, for --init and for a model file alike."""
    from okdpipe.modelfile import read_model_file

    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(OkdpipeError) as init_error:
        initialise(Students("resnet8", 1, 4, 3), tmp_path / "module.pt")
    with pytest.raises(OkdpipeError) as model_error:
        read_model_file(tmp_path / "module.pt")
    for error, fix in [(init_error, "torch.save(model.state_dict(), path)"), (model_error, "okdpipe select")]:
        message = str(error.value)
        assert "(it holds pickled Python objects, which okdpipe never unpickles: they could run code)" in message
        assert fix in message.split("); ", 1)[1] and "\n" not in message


def test_init_must_be_a_local_file():
    from okdpipe.config import DistillConfig

    with pytest.raises(Exception, match="init must be the path of a local file"):
        DistillConfig(init="https://example.com/resnet18.pth")


def okdpipe(*args) -> subprocess.CompletedProcess:
    python = ROOT / ".venv" / "bin" / "python"
    command = [str(python if python.exists() else sys.executable), "-m", "okdpipe", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_cli_fine_tunes_a_saved_model_with_another_class_count_and_records_it(tmp_path):
    from okdpipe.modelfile import ModelInfo, save_model_file

    torch.manual_seed(4)
    model = create_model("resnet8", 4, 3)
    info = ModelInfo("resnet8", 4, 3, (16, 16), (0.5,) * 3, (0.25,) * 3, ("a", "b", "c", "d"), "synthetic")
    save_model_file(model, info, tmp_path / "model.pt")
    run = tmp_path / "run"
    common = ["distill", "--arch", "resnet8", "--dataset", "synthetic", "--set", "data_options.num_classes=6"]
    result = okdpipe(*common, "--epochs", "1", "--batch-size", "16", "--init", tmp_path / "model.pt", "--out", run)
    assert result.returncode == 0, result.stderr
    assert "init: loaded 45 of 47 weights" in result.stdout
    manifest = json.loads((run / "manifest.json").read_text())
    record = manifest["init"]
    assert record["path"] == str((tmp_path / "model.pt").resolve()) and record["kind"] == "okdpipe-model"
    assert record["sha256"] == hashlib.sha256((tmp_path / "model.pt").read_bytes()).hexdigest()
    assert (record["loaded"], record["reinitialised"]) == (45, ["classifier.weight", "classifier.bias"])
    assert manifest["config"]["init"] == str(tmp_path / "model.pt")
    mismatch = okdpipe(*common, "--arch", "resnet20", "--init", tmp_path / "model.pt", "--out", tmp_path / "bad")
    assert mismatch.returncode == 2 and mismatch.stderr.startswith("error: --init ")
    assert "the model file holds a resnet8, the students are resnet20" in mismatch.stderr.splitlines()[0]
    assert "Traceback" not in mismatch.stderr
    absent = okdpipe(*common, "--init", tmp_path / "absent.pt", "--out", tmp_path / "absent")
    assert absent.returncode == 2 and "absent.pt: no such file" in absent.stderr


@pytest.mark.parametrize("container", ["state-dict", "safetensors"])
def test_non_finite_weights_are_named_not_called_a_divergence(tmp_path, container):
    from safetensors.torch import save_file

    state = create_model("resnet8", 10, 1).state_dict()
    state["stem.0.weight"][0, 0, 0, 0] = float("nan")
    state["classifier.bias"][1] = float("inf")
    path = tmp_path / "weights.pt"
    torch.save(state, path) if container == "state-dict" else save_file(state, str(path))
    with pytest.raises(OkdpipeError) as error:
        initialise(Students("resnet8", 2, 10, 1), path)
    assert str(error.value) == (
        f"--init {path}: the file holds non-finite weights: tensor stem.0.weight (and 1 more) has NaN or inf "
        "values; pass a file of finite weights"
    )


def test_a_safetensors_file_is_recognised_by_its_content_not_its_name(tmp_path):
    from safetensors.torch import save_file

    source = create_model("resnet8", 10, 1).state_dict()
    save_file(source, str(tmp_path / "renamed.pth"))  # a .safetensors download saved under another name
    torch.save(source, tmp_path / "plain.pth")
    for name, kind in (("renamed.pth", "safetensors"), ("plain.pth", "state-dict")):
        students = Students("resnet8", 1, 10, 1)
        record = initialise(students, tmp_path / name)
        assert (record["kind"], record["loaded"]) == (kind, RESNET8_WEIGHTS)
        assert torch.equal(students.member_state(0)["stem.0.weight"], source["stem.0.weight"])


def test_a_training_checkpoint_is_refused_naming_the_model_file_to_pass(tmp_path):
    from okdpipe import api

    run = tmp_path / "run"
    api.fit(api.DistillConfig(method="vanilla", arch="resnet8", dataset="synthetic", epochs=1, students=1), run)
    last = run / "checkpoints" / "last.pt"
    with pytest.raises(OkdpipeError) as error:
        initialise(Students("resnet8", 1, 4, 3), last)
    assert str(error.value) == (
        f"--init {last}: this is an okdpipe training checkpoint (every student, with optimiser state), not one "
        f"model's weights; pass the MODEL.pt that `okdpipe select {run}` writes from it, or continue that run with "
        f"`okdpipe distill --resume --out {run}`"
    )


def refusal(path: Path, state: dict, students: Students | None = None) -> str:
    """--init's one-line refusal of `state` saved at `path`, for one resnet8 student of 4 classes."""
    torch.save(state, path)
    with pytest.raises(OkdpipeError) as error:
        initialise(students or Students("resnet8", 1, 4, 3), path)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_file_that_matches_only_batchnorm_counters_loads_no_weight_and_is_refused(tmp_path):
    """num_batches_tracked has the same name and shape in every network with the same BatchNorm names: matching
    only those counters was reported as a success, and training started from random weights."""
    counters = {k: v for k, v in create_model("resnet8", 4, 3).state_dict().items() if "num_batches" in k}
    foreign = {"fc.weight": torch.zeros(3, 3), **counters}
    assert refusal(tmp_path / "counters.pt", foreign) == (
        f"--init {tmp_path / 'counters.pt'}: loads no weight: the only entries it shares with the students are 9 "
        "integer counter(s) (stem.1.num_batches_tracked, stages.0.0.residual.0.1.num_batches_tracked, "
        "stages.0.0.residual.1.1.num_batches_tracked and 6 more), no parameter or BatchNorm statistic; it is for "
        "another architecture: pass a weights file for this --arch"
    )


def test_a_file_lacking_some_of_the_students_weights_is_refused_unless_partial(tmp_path):
    source = create_model("resnet8", 4, 3).state_dict()
    stem_only = {k: v for k, v in source.items() if k.startswith("stem.")}
    assert refusal(tmp_path / "stem.pt", stem_only) == (
        f"--init {tmp_path / 'stem.pt'}: the file has no values for 40 of the students' 47 weights "
        "(stages.0.0.residual.0.0.weight, stages.0.0.residual.0.1.weight, stages.0.0.residual.0.1.bias and 37 "
        "more), which would start at random; pass a weights file for this --arch, or --init-partial to load only "
        "what matches"
    )
    bn_statistics_left_out = {k: v for k, v in source.items() if "running_" not in k}  # named_parameters() only
    assert "the file has no values for 18 of the students' 47 weights" in refusal(
        tmp_path / "params.pt", bn_statistics_left_out
    )
    students = Students("resnet8", 1, 4, 3)
    record = initialise(students, tmp_path / "stem.pt", partial=True)
    assert (record["loaded"], record["of"], record["missing"]) == (5, 47, 42)
    assert torch.equal(students.member_state(0)["stem.0.weight"], source["stem.0.weight"])


def test_a_file_of_a_deeper_network_is_refused_unless_partial(tmp_path):
    """resnet20 has all of resnet8's names at the same shapes: its file loaded "56 of 56" into resnet8 silently."""
    torch.manual_seed(5)
    deeper = create_model("resnet20", 4, 3).state_dict()
    message = refusal(tmp_path / "resnet20.pt", deeper)
    assert message.startswith(f"--init {tmp_path / 'resnet20.pt'}: 60 of the file's weights are not in the students (")
    assert message.endswith(
        "and 57 more): it is for a larger or other architecture; pass a weights file for this --arch, or "
        "--init-partial to load only what matches"
    )
    students = Students("resnet8", 1, 4, 3)
    record = initialise(students, tmp_path / "resnet20.pt", partial=True)
    assert (record["loaded"], record["of"], record["unexpected"]) == (47, 47, 60)
    assert torch.equal(students.member_state(0)["classifier.weight"], deeper["classifier.weight"])


def test_a_file_without_its_classifier_or_its_counters_loads_the_rest_as_published(tmp_path):
    """A backbone-only file leaves the classifier fresh (as for another class count); torchvision's and timm's
    published files often leave out num_batches_tracked. Neither is a partial match."""
    torch.manual_seed(6)
    source = create_model("resnet8", 4, 3).state_dict()
    backbone = {k: v for k, v in source.items() if not k.startswith("classifier.") and "num_batches" not in k}
    torch.save(backbone, tmp_path / "backbone.pt")
    students = Students("resnet8", 1, 4, 3)
    record = initialise(students, tmp_path / "backbone.pt")
    assert (record["loaded"], record["of"], record["missing_first"]) == (
        45,
        47,
        ["classifier.weight", "classifier.bias"],
    )
    assert all(torch.equal(students.member_state(0)[k], v) for k, v in backbone.items())


def test_init_partial_reaches_the_config_and_needs_init(tmp_path):
    from okdpipe.config import DistillConfig

    assert DistillConfig(init="stem.pt", init_partial=True).init_partial
    alone = okdpipe("distill", "--dataset", "synthetic", "--out", tmp_path / "run", "--dry-run", "--init-partial")
    assert alone.returncode == 2 and "Traceback" not in alone.stderr
    assert alone.stderr.splitlines() == [
        "error: bad config: Value error, init_partial is set but init is not; pass the weights file with --init PATH"
    ]
