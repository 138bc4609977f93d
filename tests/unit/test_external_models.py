"""timm and torchvision classifiers as students (distill/models/external.py): built for the dataset's channels and
classes, logits equal to the library's own forward, the methods that need okdpipe's stage layout refuse them in
one line, an input size they cannot take is one line, and export keeps the parity gate."""

from __future__ import annotations

import pytest
import torch

from okdpipe.distill.models import create_model
from okdpipe.errors import OkdpipeError

TIMM = "timm:mobilenetv3_small_050"
TORCHVISION = "torchvision:mobilenet_v3_small"


def library_model(arch: str, num_classes: int, in_channels: int):
    """The library's own network, built independently of okdpipe at the same seed."""
    library, _, name = arch.partition(":")
    torch.manual_seed(0)
    if library == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    from torchvision import models

    return models.get_model(name, weights=None, num_classes=num_classes)


@pytest.mark.parametrize("arch, classifier", [(TIMM, "classifier"), (TORCHVISION, "classifier.3")])
def test_logits_are_the_library_networks_and_keys_map_one_to_one(arch, classifier):
    reference = library_model(arch, 7, 3).eval()
    torch.manual_seed(0)
    model = create_model(arch, num_classes=7, in_channels=3).eval()
    assert model.classifier_path == classifier and model.classifier.out_features == 7
    library_keys = {("classifier." + k[len(classifier) + 1 :] if k.startswith(classifier + ".") else "net." + k)
                    for k in reference.state_dict()}  # fmt: skip
    assert set(model.state_dict()) == library_keys
    model.load_state_dict({k: reference.state_dict()[k.removeprefix("net.")] for k in model.state_dict()
                           if k.startswith("net.")} | {"classifier." + n: v for n, v in
                           reference.get_submodule(classifier).state_dict().items()})  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-6)
        features = model.forward_features(x)
        assert features.shape == (2, model.num_features) and torch.equal(model.forward_head(features), model(x))
    assert model.arch_source["library"] == arch.partition(":")[0]


@pytest.mark.parametrize("arch", [TIMM, TORCHVISION])
def test_one_channel_input_gets_a_first_conv_of_one_channel(arch):
    model = create_model(arch, num_classes=10, in_channels=1).eval()
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_the_rebuilt_one_channel_first_conv_keeps_the_originals_geometry(name):
    """Stride, padding, dilation, groups and bias as torchvision built it: a default-stride conv would change every
    feature map size after it."""
    from torchvision import models

    original = next(m for m in models.get_model(name, weights=None).modules() if isinstance(m, torch.nn.Conv2d))
    rebuilt = next(m for m in create_model(f"torchvision:{name}", 10, 1).modules() if isinstance(m, torch.nn.Conv2d))
    geometry = ("out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
    assert [getattr(rebuilt, a) for a in geometry] == [getattr(original, a) for a in geometry]
    assert (rebuilt.in_channels, rebuilt.bias is None) == (1, original.bias is None)
    assert original.stride != (1, 1) and original.padding != (0, 0)  # the defaults would not pass for them


@pytest.mark.parametrize(
    "arch, fragment",
    [
        ("timm:no_such_net", "timm 1.0"),
        ("torchvision:no_such_net", "not a torchvision classification model"),
        ("timm:", "name the model after the colon"),
        ("torchvision:squeezenet1_0", "no final Linear layer with 10 outputs"),
        ("resnet9000", ", wrn40_2, timm:NAME or torchvision:NAME"),
    ],
)
def test_unknown_or_unsuitable_models_are_one_line(arch, fragment):
    with pytest.raises(OkdpipeError, match=fragment):
        create_model(arch, num_classes=10, in_channels=1)


def test_a_timm_model_with_two_classifier_heads_is_one_line():
    """DeiT distilled (like LeViT and CrossViT) has a head and a distillation head; timm names both."""
    with pytest.raises(OkdpipeError) as caught:
        create_model("timm:deit_tiny_distilled_patch16_224", num_classes=10, in_channels=1)
    assert str(caught.value) == (
        "--arch timm:deit_tiny_distilled_patch16_224: it has 2 classifier heads (head, head_dist); only models "
        "that end in one Linear classifier can be students, choose a single-head model"
    )


def test_a_classifier_path_the_model_lacks_is_one_line():
    from okdpipe.distill.models.external import classifier_module

    with pytest.raises(OkdpipeError) as caught:
        classifier_module(torch.nn.Sequential(torch.nn.Linear(2, 2)), "head.fc", "timm:x")
    assert str(caught.value) == (
        "--arch timm:x: its library names 'head.fc' as the classifier but the model has no such layer; "
        "only models that end in one Linear classifier can be students"
    )


def test_shared_trunk_and_stage_methods_refuse_external_archs():
    from okdpipe.distill.methods import METHODS
    from okdpipe.distill.methods.ffsd import FFSD
    from okdpipe.distill.students import Students

    with pytest.raises(OkdpipeError, match="shared-trunk methods .* use a peers method"):
        Students(TORCHVISION, 3, 10, 1, layout="branches")
    peers = Students(TORCHVISION, 3, 10, 1, layout="peers")
    with pytest.raises(OkdpipeError, match="ffsd needs a backbone with at least 2 stages, .* has 1; ffsd reads "
                       "intermediate stage maps, which only okdpipe's own backbones expose"):  # fmt: skip
        FFSD(peers, METHODS.get("ffsd").Params(), 10)


def test_okdph_weight_averaging_runs_on_external_peers():
    from okdpipe.distill.methods import METHODS, StepContext

    cfg_method = METHODS.get("okdph")
    from okdpipe.distill.students import Students

    torch.manual_seed(0)
    students = Students(TIMM, 2, 4, 1, layout="peers", same_init=True)
    method = cfg_method(students, cfg_method.Params(), 4)
    views = torch.randn(3, 4, 1, 28, 28)
    out = students(views)
    losses = method.step(views, torch.tensor([0, 1, 2, 3]), out, StepContext(0.0, 0, 1, 1, torch.Generator()))
    assert torch.isfinite(losses["loss"])
    hybrid = method.candidates()["hybrid"].model
    first, second = students.members[0].state_dict(), students.members[1].state_dict()
    key = "classifier.weight"
    assert torch.allclose(hybrid.state_dict()[key], (first[key] + second[key]) / 2)


def test_an_input_size_the_model_cannot_take_is_one_line():
    from okdpipe.distill.students import Students

    students = Students("timm:vit_tiny_patch16_224", 1, 10, 1)
    with pytest.raises(OkdpipeError, match=r"cannot take this dataset's 1x28x28 \(CxHxW\) images"):
        students(torch.zeros(1, 2, 1, 28, 28))


@pytest.mark.slow
@pytest.mark.parametrize("arch", [TIMM, TORCHVISION])
def test_export_passes_the_parity_gate(arch, tmp_path):
    from okdpipe.export.config import ExportConfig
    from okdpipe.export.exporter import export_model
    from okdpipe.modelfile import ModelInfo, save_model_file

    torch.manual_seed(0)
    model = create_model(arch, num_classes=4, in_channels=3)
    info = ModelInfo(
        arch, 4, 3, (16, 16), (0.5,) * 3, (0.25,) * 3, ("a", "b", "c", "d"), "synthetic",
        provenance={"data": {"dataset": "synthetic", "val_split": 0.25, "seed": 0}},
    )  # fmt: skip
    save_model_file(model, info, tmp_path / "model.pt")
    [card] = export_model(tmp_path / "model.pt", tmp_path / "out", ExportConfig())
    assert card.raw["parity"]["tolerance"] == 1e-4
    # Checked here too, independently: ONNX Runtime's logits against the PyTorch model's on other inputs.
    import onnxruntime

    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    session = onnxruntime.InferenceSession(str(card.directory / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        torch_logits = model.eval()(x)
    assert (onnx_logits - torch_logits).abs().max() <= 1e-4 * max(1.0, float(torch_logits.abs().max()))


def test_an_operator_without_onnx_conversion_is_named(tmp_path):
    from okdpipe.export.onnx_export import export_onnx

    class Eigen(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eigvals(x[:, 0, :4, :4]).real

    with pytest.raises(OkdpipeError) as error:
        export_onnx(Eigen(), (1, 8, 8), tmp_path / "m.onnx", 18)
    assert str(error.value) == (
        "ONNX export failed at opset 18: operator aten.linalg_eig has no ONNX conversion; replace the layer "
        "that uses it, or try another --opset"
    )
