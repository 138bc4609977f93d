"""Peers of different architectures (`--arch resnet8,mobilenetv2`): the config's forms, member i built with arch i,
the refusals of the methods that cannot mix them, exact resume, select without a soup and a MODEL.pt of the shipped
student's own architecture, export parity, and --init from a model file into the students of its architecture."""

import pytest
import torch

from okdpipe.config import DistillConfig, build_config, student_archs
from okdpipe.datasets import load_dataset
from okdpipe.distill.checkpoint import load_checkpoint
from okdpipe.distill.init_weights import initialise
from okdpipe.distill.models import load_model_file
from okdpipe.distill.select import select
from okdpipe.distill.students import Students
from okdpipe.distill.trainer import build_models, fit
from okdpipe.errors import OkdpipeError
from okdpipe.export.config import ExportConfig
from okdpipe.export.exporter import export_model
from okdpipe.run import RunDir

# Parameter counts for 10 classes and 1 input channel, counted once from the definitions (pinned, not recomputed):
# ResNet-8 (3 stages of one basic block, 16/32/64 wide) and MobileNetV2 (width 1.0, 1280-wide head).
PARAMS = {"resnet8": 77_754, "mobilenetv2": 2_236_106}
STEM_AND_HEAD = {"resnet8": (16, 64), "mobilenetv2": (32, 1280)}  # 3x3 stem conv's outputs, classifier's inputs


def params_for(arch: str, classes: int, channels: int) -> int:
    """PARAMS with another input-channel count (3x3 stem conv, no bias) and class count (classifier with bias)."""
    stem, head = STEM_AND_HEAD[arch]
    return PARAMS[arch] + (channels - 1) * stem * 9 - (10 - classes) * (head + 1)


# synthetic (4 classes, 3x16x16): 64 training images, 48 after the 25% validation split -> 3 steps of 16 per epoch
PAIR = dict(
    method="dml",
    arch="resnet8,mobilenetv2",
    dataset="synthetic",
    epochs=2,
    batch_size=16,
    lr=0.05,
    eval_batch_size=64,
    val_split=0.25,
)


def quiet(_):
    pass


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "pair"
    fit(DistillConfig(**PAIR), RunDir(root), echo=quiet)
    return root


@pytest.mark.parametrize(
    "file_values, flags, sets",
    [
        ({"arch": ["resnet8", "mobilenetv2"]}, {}, []),
        ({}, {"arch": "resnet8, mobilenetv2"}, []),
        ({"arch": "resnet20"}, {}, ["arch=[resnet8,mobilenetv2]"]),
        ({}, {"arch": "resnet8,mobilenetv2", "students": 2}, []),
    ],
)
def test_one_name_per_student_in_every_form_sets_the_count(file_values, flags, sets):
    cfg = build_config(file_values, flags, sets)
    assert (cfg.arch, cfg.students) == ("resnet8,mobilenetv2", 2)
    assert student_archs(cfg, 2) == ["resnet8", "mobilenetv2"]


def test_one_name_is_every_students():
    cfg = build_config({}, {"arch": "resnet8", "students": 3}, [])
    assert (cfg.arch, student_archs(cfg, 3)) == ("resnet8", ["resnet8", "resnet8", "resnet8"])
    assert build_config({}, {"arch": "resnet8"}, []).students is None  # the method's default count stays


@pytest.mark.parametrize(
    "values, fragment",
    [
        (
            {"arch": "resnet8,mobilenetv2", "students": 3},
            "arch names 2 architectures (resnet8, mobilenetv2) but students",
        ),
        ({"arch": "resnet8,,mobilenetv2"}, "has an empty name"),
        ({"arch": ["resnet8", 3]}, "a backbone name or a list of names"),
        ({"arch": []}, "arch is an empty list; name a backbone"),
        ({"arch": ""}, "arch '' has an empty name"),
        ({"arch": " "}, "arch ' ' has an empty name"),
    ],
)
def test_bad_arch_lists_are_one_line(values, fragment):
    with pytest.raises(OkdpipeError, match="^bad config: ") as error:
        build_config(values, {}, [])
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_member_i_is_built_with_arch_i_and_extracts_as_it():
    students = Students(["resnet8", "mobilenetv2"], 2, num_classes=10, in_channels=1)
    counts = [sum(p.numel() for p in member.parameters()) for member in students.members]
    assert counts == [PARAMS["resnet8"], PARAMS["mobilenetv2"]]
    extracted = students.extract(1)
    assert extracted.arch == "mobilenetv2" and sum(p.numel() for p in extracted.parameters()) == PARAMS["mobilenetv2"]
    assert students(torch.zeros(1, 5, 1, 28, 28)).logits.shape == (2, 5, 10)


@pytest.mark.parametrize(
    "method, arch, reason",
    [
        ("one", "resnet8,resnet20,resnet8", "its branches share one trunk"),
        ("pcl", "resnet8,resnet20,resnet8", "its branches share one trunk"),
        ("mbde", "resnet8,resnet20,resnet8", "its branches share one trunk"),
        ("okdph", "resnet8,resnet20,resnet8", "averages the students' weights"),
        ("ffsd", "resnet8,resnet20,resnet8", "concatenates the students' last feature maps"),
    ],
)
def test_methods_that_cannot_mix_architectures_say_why(method, arch, reason):
    spec = load_dataset("synthetic").spec
    with pytest.raises(OkdpipeError) as error:
        build_models(DistillConfig(method=method, arch=arch, dataset="synthetic"), spec, torch.device("cpu"))
    message = str(error.value)
    assert message.startswith(f"--method {method} cannot train peers of different architectures ({arch}): ")
    assert reason in message and "\n" not in message


def test_fused_refuses_mixed_architectures():
    spec = load_dataset("synthetic").spec
    with pytest.raises(OkdpipeError, match=r"^--fused runs peers of one architecture .* resnet8,resnet20 differ"):
        build_models(DistillConfig(**{**PAIR, "arch": "resnet8,resnet20", "fused": True}), spec, torch.device("cpu"))


def test_the_manifest_records_each_students_architecture(pair_run):
    students = RunDir(pair_run).read_manifest()["students"]
    assert students["archs"] == ["resnet8", "mobilenetv2"] and students["arch"] == "resnet8,mobilenetv2"


def test_resume_after_a_kill_reaches_the_same_weights(pair_run, tmp_path):
    killed = RunDir(tmp_path / "killed")
    assert fit(DistillConfig(**PAIR), killed, stop_after_steps=4, echo=quiet) == {"stopped": True}
    fit(DistillConfig(**PAIR), killed, resume=True, echo=quiet)
    straight, resumed = load_checkpoint(RunDir(pair_run))["students"], load_checkpoint(killed)["students"]
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_select_has_no_soup_and_ships_the_chosen_students_own_architecture(pair_run, tmp_path):
    rows, ensemble, chosen, path = select(pair_run, "student:1", tmp_path / "m.pt", bn_batches=2)
    assert [(r["candidate"], r["arch"]) for r in rows] == [("student:0", "resnet8"), ("student:1", "mobilenetv2")]
    small, large = params_for("resnet8", 4, 3), params_for("mobilenetv2", 4, 3)  # synthetic: 4 classes, RGB
    assert [r["params"] for r in rows] == [small, large] and ensemble["params"] == small + large
    model, info = load_model_file(path)
    assert (info.arch, info.provenance["candidate"]) == ("mobilenetv2", "student:1")
    trained = load_checkpoint(RunDir(pair_run))["students"]
    member = {k.removeprefix("members.1."): v for k, v in trained.items() if k.startswith("members.1.")}
    assert member.keys() == model.state_dict().keys()
    assert all(torch.equal(member[k], v) for k, v in model.state_dict().items())


def test_export_of_the_other_architecture_passes_parity(pair_run, tmp_path):
    select(pair_run, "student:1", tmp_path / "m.pt", bn_batches=2)
    (card,) = export_model(tmp_path / "m.pt", tmp_path / "out", ExportConfig())
    assert (card.name, card.precision, card.provenance["candidate"]) == ("mobilenetv2-synthetic", "fp32", "student:1")
    assert card.raw["parity"]["tolerance"] == 1e-4 and card.raw["parity"]["top1_agreement"] == 1.0


def test_init_from_a_model_file_loads_the_students_of_its_architecture(pair_run, tmp_path):
    select(pair_run, "student:1", tmp_path / "m.pt", bn_batches=2)
    shipped, _ = load_model_file(tmp_path / "m.pt")
    torch.manual_seed(7)
    students = Students(["resnet8", "mobilenetv2", "mobilenetv2"], 3, num_classes=4, in_channels=3)
    fresh = students.member_state(0)
    fresh = {k: v.clone() for k, v in fresh.items()}
    record = initialise(students, tmp_path / "m.pt")
    weights = sum(value.is_floating_point() for value in shipped.state_dict().values())  # not BatchNorm counters
    assert record["students"] == [1, 2] and record["loaded"] == record["of"] == weights
    for i in (1, 2):
        assert all(torch.equal(students.member_state(i)[k], v) for k, v in shipped.state_dict().items())
    assert all(torch.equal(students.member_state(0)[k], v) for k, v in fresh.items())


def test_init_from_a_file_that_names_no_architecture_is_refused_for_mixed_peers(tmp_path):
    students = Students(["resnet8", "mobilenetv2"], 2, num_classes=4, in_channels=3)
    torch.save(students.member_state(0), tmp_path / "plain.pt")
    with pytest.raises(OkdpipeError, match=r"students have different architectures \(resnet8,mobilenetv2\)"):
        initialise(students, tmp_path / "plain.pt")
