"""Every registered backbone against the Backbone contract; parametrised over MODELS.names()."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from okdpipe.distill.models import MODELS, Backbone, backbone_recipe, create_model, recipe
from okdpipe.errors import OkdpipeError

# Exact trainable-parameter counts for num_classes=100, in_channels=3 (each builder's docstring states its own).
PARAMETERS_100_CLASSES = {
    "resnet8": 83_892,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet110_bottleneck": 1_170_868,
    "wrn16_2": 703_284,
    "wrn40_2": 2_255_156,
    "vgg16": 14_770_212,
    "densenet40_12": 1_060_132,
    "mobilenetv2": 2_351_972,
    "resnet18": 11_227_812,
    "resnet34": 21_335_972,
}

# Side of the final feature map for a 32x32 and a 28x28 input: pins every architecture's strides.
FINAL_MAP_SIDE = {
    "resnet8": (8, 7),
    "resnet20": (8, 7),
    "resnet32": (8, 7),
    "resnet56": (8, 7),
    "resnet110": (8, 7),
    "resnet110_bottleneck": (8, 7),
    "wrn16_2": (8, 7),
    "wrn40_2": (8, 7),
    "vgg16": (1, 1),
    "densenet40_12": (8, 7),
    "mobilenetv2": (4, 4),
    "resnet18": (1, None),
    "resnet34": (1, None),
}

IMAGENET_LAYOUT = {"resnet18", "resnet34"}  # 28x28 is below what they are meant for; skipped for speed
NUM_CLASSES = 100
NAMES = MODELS.names()


@functools.cache
def built(name: str, in_channels: int) -> Backbone:
    """One eval-mode instance per (name, channels), built at seed 0; tests must not modify it."""
    torch.manual_seed(0)
    return create_model(name, NUM_CLASSES, in_channels).eval()


def sample(in_channels: int, side: int) -> torch.Tensor:
    return torch.randn(2, in_channels, side, side, generator=torch.Generator().manual_seed(1))


def inputs_for(name: str) -> list[tuple[int, int]]:
    sizes = [(1, 28), (3, 32)]
    return sizes[1:] if name in IMAGENET_LAYOUT else sizes


def test_every_backbone_has_an_expected_parameter_count_and_map_size():
    assert sorted(PARAMETERS_100_CLASSES) == NAMES
    assert sorted(FINAL_MAP_SIDE) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_is_exact_and_documented(name):
    count = sum(p.numel() for p in built(name, 3).parameters())
    assert count == PARAMETERS_100_CLASSES[name]
    assert f"{count:,} parameters" in MODELS.get(name).__doc__


@pytest.mark.parametrize("name", NAMES)
def test_forward_gives_logits_and_composes_from_features_and_head(name):
    for in_channels, side in inputs_for(name):
        model, x = built(name, in_channels), sample(in_channels, side)
        with torch.no_grad():
            logits = model(x)
            fmap = model.forward_features(x)
            assert logits.shape == (2, NUM_CLASSES)
            assert torch.equal(logits, model.forward_head(fmap))
        expected_side = FINAL_MAP_SIDE[name][0 if side == 32 else 1]
        assert fmap.shape == (2, model.num_features, expected_side, expected_side)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_return_stages_gives_one_map_per_stage_with_the_stated_channels(name):
    model = built(name, 3)
    with torch.no_grad():
        fmap, stage_maps = model.forward_features(sample(3, 32), return_stages=True)
    assert len(stage_maps) == len(model.stages) == len(model.stage_channels)
    assert [m.shape[1] for m in stage_maps] == model.stage_channels
    assert stage_maps[-1] is fmap
    assert model.num_features == model.stage_channels[-1] == model.classifier.in_features
    assert model.pool(fmap).shape == (2, model.num_features)


@pytest.mark.parametrize("name", NAMES)
def test_parameters_and_buffers_live_only_in_stem_stages_classifier(name):
    model = built(name, 3)
    assert [child for child, _ in model.named_children()] == ["stem", "stages", "classifier"]
    assert isinstance(model.classifier, nn.Linear)
    prefixes = {key.split(".")[0] for key in model.state_dict()}
    assert prefixes == {"stem", "stages", "classifier"}
    stage_indices = {int(key.split(".")[1]) for key in model.state_dict() if key.startswith("stages.")}
    assert stage_indices == set(range(len(model.stages)))


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_gives_identical_weights_and_another_seed_does_not(name):
    reference = built(name, 3).state_dict()
    torch.manual_seed(0)
    again = create_model(name, NUM_CLASSES).state_dict()
    torch.manual_seed(1)
    other = create_model(name, NUM_CLASSES).state_dict()
    assert list(again) == list(reference)
    assert all(torch.equal(again[key], reference[key]) for key in reference)
    stem_conv = next(key for key in reference if key.startswith("stem.") and reference[key].dim() == 4)
    assert not torch.equal(other[stem_conv], reference[stem_conv])


@pytest.mark.parametrize("name", NAMES)
def test_trunk_plus_branch_reproduces_the_network_and_extracts_back(name):
    """The multi-branch container's use: trunk = stem + stages[:-1]; branch = copy of stages[-1] + classifier."""
    model, x = built(name, 3), sample(3, 32)
    trunk = nn.Sequential(model.stem, *model.stages[:-1])
    branch_stage, branch_head = copy.deepcopy(model.stages[-1]), copy.deepcopy(model.classifier)
    last = len(model.stages) - 1
    state = {k: v for k, v in model.state_dict().items() if not k.startswith((f"stages.{last}.", "classifier."))}
    state.update({f"stages.{last}.{k}": v for k, v in branch_stage.state_dict().items()})
    state.update({f"classifier.{k}": v for k, v in branch_head.state_dict().items()})
    torch.manual_seed(1)
    extracted = create_model(model.arch, NUM_CLASSES, 3, **model.arch_kwargs).eval()
    extracted.load_state_dict(state)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(branch_head(model.pool(branch_stage(trunk(x)))), expected)
        assert torch.equal(extracted(x), expected)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(OkdpipeError, match="unknown backbone 'resnet99'") as info:
        create_model("resnet99", 10)
    assert all(name in str(info.value) for name in NAMES)
    assert "\n" not in str(info.value)


def test_unknown_option_and_bad_sizes_are_user_errors():
    with pytest.raises(OkdpipeError, match=r"'resnet20' has no option\(s\) width; options it accepts: none"):
        create_model("resnet20", 10, width=2)
    with pytest.raises(OkdpipeError, match="options it accepts: drop_rate"):
        create_model("wrn16_2", 10, dropout=0.3)
    with pytest.raises(OkdpipeError, match=r"drop_rate must be in \[0, 1\), got 1.5"):
        create_model("wrn16_2", 10, drop_rate=1.5)
    with pytest.raises(OkdpipeError, match="num_classes must be a positive integer, got 0"):
        create_model("resnet20", 0)
    with pytest.raises(OkdpipeError, match="in_channels must be a positive integer, got 2.0"):
        create_model("resnet20", 10, in_channels=2.0)


def test_wrn_dropout_option_is_recorded_adds_no_parameters_and_acts_only_in_training():
    torch.manual_seed(0)
    model = create_model("wrn16_2", 10, 1, drop_rate=0.3)
    assert (model.arch, model.arch_kwargs) == ("wrn16_2", {"drop_rate": 0.3})
    assert list(model.state_dict()) == list(create_model("wrn16_2", 10, 1).state_dict())
    x = sample(1, 28)
    with torch.no_grad():
        assert not torch.equal(model.train()(x), model(x))
        assert torch.equal(model.eval()(x), model(x))


def test_vgg_survives_odd_maps_and_larger_inputs():
    """ceil-mode pools keep 28x28 non-empty; the adaptive pool in pool() makes 64x64 inputs work too."""
    model = built("vgg16", 3)
    with torch.no_grad():
        assert model.forward_features(sample(3, 64)).shape == (2, 512, 2, 2)
        assert model(sample(3, 64)).shape == (2, NUM_CLASSES)


def test_backbone_recipes_are_declared_per_backbone_and_empty_elsewhere():
    assert backbone_recipe("mobilenetv2") == {"channels_last": True, "precise_bn": True}
    assert backbone_recipe("resnet8") == {}
    assert backbone_recipe("timm:resnet10t") == {} and backbone_recipe("torchvision:resnet18") == {}
    with pytest.raises(OkdpipeError, match="unknown backbone 'resnet9'"):
        backbone_recipe("resnet9")
    with pytest.raises(ValueError, match=r"may set only .* not \['epochs'\]"):
        recipe(lr=0.1, epochs=3)


def test_peers_of_several_architectures_get_the_cautious_blend_of_their_recipes(monkeypatch):
    """One optimiser schedule for all peers: the lowest lr, the longest warm-up, other keys only where all agree."""
    recipes = {
        "a": {"lr": 0.05, "warmup_epochs": 1.0, "channels_last": True},
        "b": {"lr": 0.02, "channels_last": True, "precise_bn": True},
    }
    for name, values in recipes.items():
        monkeypatch.setitem(MODELS._items, name, recipe(**values)(lambda num_classes, in_channels=3: None))
    assert backbone_recipe("a,b") == {"lr": 0.02, "warmup_epochs": 1.0, "channels_last": True, "precise_bn": True}
    assert backbone_recipe("resnet8,mobilenetv2") == {"precise_bn": True}  # resnet8 trains NCHW
    assert backbone_recipe("mobilenetv2,mobilenetv2") == backbone_recipe("mobilenetv2")


def test_mobilenetv2_trains_channels_last_as_nchw_does():
    """Its recipe trains it channels-last for speed (trainer.build_models). Not bit-identical: oneDNN sums in
    another order, and 52 BatchNorm layers in train mode amplify rounding (even NCHW float32 gradients are about
    1% from float64's, measured), so the two layouts agree on the loss to 1e-5 and on the gradients to 5%."""
    from types import SimpleNamespace

    from okdpipe.config import DistillConfig
    from okdpipe.distill.trainer import build_models

    spec = SimpleNamespace(num_classes=10, in_channels=1)
    runs = [
        build_models(DistillConfig(arch="mobilenetv2", channels_last=cl), spec, torch.device("cpu"))[0]
        for cl in (False, True)
    ]
    images, labels = torch.randn(1, 8, 1, 16, 16), torch.arange(8)
    losses, gradients = [], []
    for students in runs:
        loss = nn.functional.cross_entropy(students(images).logits[0], labels)
        loss.backward()
        losses.append(loss.item())
        gradients.append(torch.cat([p.grad.flatten() for p in students.parameters()]))
    assert next(runs[1].parameters()).is_contiguous(memory_format=torch.channels_last)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert (gradients[1] - gradients[0]).norm() / gradients[0].norm() < 0.05
