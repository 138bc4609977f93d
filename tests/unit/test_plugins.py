"""Plug-ins (okdpipe/plugins.py): loading by module name, by .py file, by installed entry point and through the
environment; what a model file records about the plug-in that built its architecture, and the one-line errors
when a plug-in is missing, broken or not loaded."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from okdpipe import plugins
from okdpipe.errors import OkdpipeError

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"
PLUGIN_SOURCE = textwrap.dedent(
    '''
    """A plug-in as a single file: one backbone."""
    from torch import nn

    from okdpipe.distill.models import MODELS, Backbone


    @MODELS.register("filecnn")
    def filecnn(num_classes: int, in_channels: int = 3) -> Backbone:
        """conv-BN-ReLU stem (8), one conv stage (8), Linear."""
        stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        stage = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        return Backbone(stem, [stage], nn.Linear(8, num_classes), [8])
    '''
)


@pytest.fixture(scope="module")
def plugin_file(write_plugin) -> Path:
    return write_plugin("okdpipe_test_file_plugin", PLUGIN_SOURCE)


@pytest.fixture()
def clean_environment(monkeypatch):
    """Loading a plug-in writes OKDPIPE_PLUGINS (every plug-in named so far) for child processes; restore it and
    the list of names after each test, so plug-ins other test files loaded are not in it."""
    monkeypatch.delenv(plugins.ENVIRONMENT, raising=False)
    monkeypatch.setattr(plugins, "_named", [])


def python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A fresh interpreter (no plug-in imported yet), without any inherited OKDPIPE_PLUGINS unless given."""
    base = {k: v for k, v in os.environ.items() if k != plugins.ENVIRONMENT}
    executable = PYTHON if PYTHON.exists() else Path(sys.executable)
    return subprocess.run(
        [str(executable), "-c", code], capture_output=True, text=True, timeout=120, env={**base, **(env or {})}
    )


def test_a_file_plugin_registers_its_backbone_and_the_model_records_it(plugin_file, clean_environment):
    from okdpipe.distill.models import MODELS, create_model

    [loaded] = plugins.load_plugins([str(plugin_file)])
    assert loaded.module == "okdpipe_test_file_plugin" and loaded.spec == str(plugin_file.resolve())
    assert plugins.load_plugins([str(plugin_file)]) == [loaded]  # idempotent: imported once
    assert MODELS.get("filecnn").__module__ == "okdpipe_test_file_plugin"
    model = create_model("filecnn", num_classes=3, in_channels=1)
    assert model.arch_source == {"plugin": str(plugin_file.resolve()), "module": "okdpipe_test_file_plugin",
                                 "package": "", "version": ""}  # fmt: skip
    assert os.environ[plugins.ENVIRONMENT] == str(plugin_file.resolve())  # inherited by child processes


def test_model_file_records_the_plugin_and_loading_without_it_names_it(plugin_file, tmp_path, clean_environment):
    from okdpipe.distill.models import create_model, load_model_file
    from okdpipe.modelfile import ModelInfo, save_model_file

    plugins.load_plugins([str(plugin_file)])
    model = create_model("filecnn", num_classes=2, in_channels=1)
    info = ModelInfo("filecnn", 2, 1, (8, 8), (0.5,), (0.25,), ("a", "b"), "toy")
    save_model_file(model, info, tmp_path / "model.pt")
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    assert payload["arch_source"]["plugin"] == str(plugin_file.resolve())
    reloaded, read = load_model_file(tmp_path / "model.pt")  # the plug-in is loaded here: it works
    assert read.arch_source == payload["arch_source"]
    # The same file where the plug-in is missing: one line naming it and how to load it.
    ghost = ModelInfo("ghostnet_plugin_only", 2, 1, (8, 8), (0.5,), (0.25,), ("a", "b"), "toy",
                      arch_source={"plugin": "ghost_models", "module": "ghost_models", "package": "ghost-pkg",
                                   "version": "1.0"})  # fmt: skip
    save_model_file(model, ghost, tmp_path / "ghost.pt")
    with pytest.raises(OkdpipeError) as error:
        load_model_file(tmp_path / "ghost.pt")
    assert str(error.value) == (
        f"{tmp_path / 'ghost.pt'}: architecture 'ghostnet_plugin_only' comes from plug-in 'ghost_models', which "
        "is not loaded; pass --plugin ghost_models or install ghost-pkg"
    )


def test_a_missing_or_broken_plugin_is_one_line_naming_it(tmp_path, clean_environment):
    with pytest.raises(OkdpipeError, match=r"^plug-in 'okdpipe_no_such_plugin' not found: install"):
        plugins.load_plugins(["okdpipe_no_such_plugin"])
    with pytest.raises(OkdpipeError, match=r"^plug-in file .*absent\.py: no such \.py file; pass"):
        plugins.load_plugins([str(tmp_path / "absent.py")])
    (tmp_path / "plug.py").mkdir()
    with pytest.raises(OkdpipeError, match=r"^plug-in file .*plug\.py: is a folder, not a \.py file; pass"):
        plugins.load_plugins([str(tmp_path / "plug.py")])
    exits = tmp_path / "okdpipe_test_exiting_plugin.py"
    exits.write_text("import sys\nsys.exit(0)\n")  # the run went on to exit 0, having done nothing
    with pytest.raises(OkdpipeError, match=r"failed to load \(SystemExit: 0\)"):
        plugins.load_plugins([str(exits)])
    broken = tmp_path / "okdpipe_test_broken_plugin.py"
    broken.write_text("raise RuntimeError('the registration went wrong')\n")
    with pytest.raises(OkdpipeError) as error:
        plugins.load_plugins([str(broken)])
    assert str(error.value) == (
        f"plug-in '{broken}' failed to load (RuntimeError: the registration went wrong); fix or update the plug-in"
    )
    needs = tmp_path / "okdpipe_test_needy_plugin.py"
    needs.write_text("import okdpipe_missing_dependency\n")
    with pytest.raises(OkdpipeError, match="No module named 'okdpipe_missing_dependency'"):
        plugins.load_plugins([str(needs)])
    assert "okdpipe_test_broken_plugin" not in sys.modules  # a failed import leaves nothing half-registered


def test_config_plugins_key_is_loaded_when_the_config_is_validated(plugin_file, clean_environment):
    from okdpipe.config import DistillConfig
    from okdpipe.distill.models import MODELS
    from okdpipe.pipeline import PipelineConfig

    cfg = DistillConfig(plugins=[str(plugin_file)], arch="filecnn")
    assert "filecnn" in MODELS and cfg.plugins == [str(plugin_file)]
    with pytest.raises(OkdpipeError, match="okdpipe_no_such_plugin"):
        DistillConfig(plugins=["okdpipe_no_such_plugin"])
    pipeline = PipelineConfig.model_validate({"plugins": [str(plugin_file)], "distill": {"arch": "filecnn"}})
    assert pipeline.distill.plugins == [str(plugin_file)]  # the run records the pipeline's plug-ins


def test_installed_example_plugin_is_found_through_its_entry_point():
    entries = {e.name: e.value for e in importlib.metadata.entry_points(group=plugins.ENTRY_POINT_GROUP)}
    assert entries.get("example") == "okdpipe_example", "run `make setup` (installs examples/plugin)"
    code = (
        "from okdpipe.distill.models import MODELS, create_model\n"
        "from okdpipe.datasets import DATASETS\n"
        "from okdpipe.distill.methods import METHODS\n"
        "assert 'example_cnn' not in MODELS\n"  # nothing is imported before a name is asked for
        "print(MODELS.get('example_cnn').__module__, DATASETS.get('fmnist-footwear').__module__,"
        " METHODS.get('ensemble-kd').__module__)\n"
        "print(create_model('example_cnn', 3, 1).arch_source)\n"
    )
    result = python(code)
    assert result.returncode == 0, result.stderr
    modules, source = result.stdout.splitlines()
    assert modules == "okdpipe_example.backbones okdpipe_example.datasets okdpipe_example.methods"
    version = importlib.metadata.version("okdpipe-example-plugin")
    assert source == str(
        {
            "plugin": "okdpipe_example",
            "module": "okdpipe_example",
            "package": "okdpipe-example-plugin",
            "version": version,
        }  # fmt: skip
    )


def test_child_processes_load_the_plugins_the_environment_names(plugin_file):
    code = "from okdpipe.distill.models import MODELS\nprint(MODELS.get('filecnn').__module__)"
    assert python(code, {plugins.ENVIRONMENT: str(plugin_file)}).stdout.strip() == "okdpipe_test_file_plugin"
    without = python(code)
    assert without.returncode != 0 and "unknown backbone 'filecnn'" in without.stderr


def test_example_backbone_keeps_the_backbone_contract_and_its_stated_size():
    from okdpipe.distill.models import MODELS, create_model

    model = create_model("example_cnn", num_classes=10, in_channels=1).eval()
    count = sum(p.numel() for p in model.parameters())
    # stem 1*16*9 + BN 32; stages 16*16*9 + 32, 16*32*9 + 64, 32*64*9 + 128; Linear 64*10 + 10
    assert count == 176 + 2336 + 4672 + 18560 + 650 == 26_394
    assert f"{count:,} parameters" in MODELS.get("example_cnn").__doc__
    x = torch.randn(2, 1, 28, 28)
    fmap, stages = model.forward_features(x, return_stages=True)
    assert [m.shape[1:] for m in stages] == [(16, 28, 28), (32, 14, 14), (64, 7, 7)]
    assert torch.equal(model(x), model.forward_head(fmap))


CONTRACT_BREAKERS = textwrap.dedent(
    '''
    """Backbones that break the contract the students and export rely on, one way each."""
    import torch
    from torch import nn

    from okdpipe.distill.models import MODELS, Backbone


    def small(num_classes, in_channels, classes=None):
        stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU())
        stage = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        return Backbone(stem, [stage], nn.Linear(8, classes or num_classes), [8])


    class Tokens(Backbone):
        def pool(self, fmap):  # keeps the spatial axes: [B, C, h, w] instead of [B, C]
            return fmap.permute(0, 2, 3, 1)


    class OddForward(Backbone):
        def forward(self, x):  # what export traces, one column more than the classifier
            logits = super().forward(x)
            return torch.cat([logits, logits[:, :1]], dim=1)


    @MODELS.register("contract_extra_class")
    def extra_class(num_classes, in_channels=3):
        return small(num_classes, in_channels, classes=num_classes + 1)


    @MODELS.register("contract_tokens")
    def tokens(num_classes, in_channels=3):
        b = small(num_classes, in_channels)
        return Tokens(b.stem, b.stages, b.classifier, [8])


    @MODELS.register("contract_odd_forward")
    def odd_forward(num_classes, in_channels=3):
        b = small(num_classes, in_channels)
        return OddForward(b.stem, b.stages, b.classifier, [8])


    @MODELS.register("contract_not_a_backbone")
    def not_a_backbone(num_classes, in_channels=3):
        return nn.Linear(in_channels, num_classes)


    class LooksUp(Backbone):
        def forward_features(self, x, return_stages=False):
            raise KeyError("layer4")  # a plug-in's own bug, of a type torch never raises


    @MODELS.register("contract_forward_raises")
    def forward_raises(num_classes, in_channels=3):
        b = small(num_classes, in_channels)
        return LooksUp(b.stem, b.stages, b.classifier, [8])


    class NanInTraining(Backbone):
        def pool(self, fmap):
            return super().pool(fmap) * float("nan") if self.training else super().pool(fmap)


    class InfInEval(Backbone):
        def forward(self, x):
            return super().forward(x) if self.training else torch.full_like(super().forward(x), float("inf"))


    class BatchOfTwoOnly(Backbone):
        def forward(self, x):
            return super().forward(x)[:2]


    def small_as(backbone_class):
        """A builder of small()'s network with another Backbone subclass's behaviour."""
        def build(num_classes, in_channels=3):
            b = small(num_classes, in_channels)
            return backbone_class(b.stem, b.stages, b.classifier, [8])
        return build


    MODELS.register("contract_nan_in_training")(small_as(NanInTraining))
    MODELS.register("contract_inf_in_eval")(small_as(InfInEval))
    MODELS.register("contract_batch_of_two")(small_as(BatchOfTwoOnly))


    @MODELS.register("contract_frozen")
    def frozen(num_classes, in_channels=3):
        return small(num_classes, in_channels).requires_grad_(False)


    @MODELS.register("contract_builder_raises")
    def builder_raises(num_classes, in_channels=3):
        return Backbone(nn.Identity(), [], nn.Identity(), [8])  # no nn.Linear classifier: Backbone refuses
    '''
)


@pytest.fixture(scope="module")
def contract_plugin(write_plugin) -> Path:
    return write_plugin("okdpipe_test_contract_plugin", CONTRACT_BREAKERS)


@pytest.mark.parametrize(
    "arch, features, message",
    [
        ("contract_extra_class", False, "gives logits of shape [2, 4] for a batch of 2, expected [2, 3]"),
        ("contract_tokens", False, "gives logits of shape [2, 4, 4, 3] for a batch of 2, expected [2, 3]"),
        ("contract_odd_forward", False, "gives forward() output of shape [2, 4] for a batch of 2, expected [2, 3]"),
    ],
)
def test_a_backbone_breaking_the_contract_is_one_line_naming_the_shapes(
    contract_plugin, clean_environment, arch, features, message
):
    from okdpipe.distill.models import create_model
    from okdpipe.distill.models.contract import check_contract

    plugins.load_plugins([str(contract_plugin)])
    model = create_model(arch, num_classes=3, in_channels=1)
    with pytest.raises(OkdpipeError) as error:
        check_contract(model, arch, 3, (1, 8, 8), features=features, stages=False)
    assert str(error.value).startswith(f"backbone {arch!r} {message}")


@pytest.mark.parametrize(
    "arch, message",
    [
        ("contract_nan_in_training", "gives logits holding NaN or inf on zero images for a batch of 2 in training "
         "mode, before any training step; fix the backbone's forward"),
        ("contract_inf_in_eval", "gives forward() output holding NaN or inf on zero images for a batch of 2, before "
         "any training step; fix the backbone's forward"),
        ("contract_batch_of_two", "gives forward() output of shape [2, 3] for a batch of 3, expected [3, 3] (batch, "
         "num_classes); fix the backbone so that it keeps this contract"),
        ("contract_frozen", "has no trainable parameters (none, or all with requires_grad=False); give it layers "
         "with weights to train"),
    ],
)  # fmt: skip
def test_non_finite_logits_a_batch_size_dependence_and_nothing_to_train_are_one_line(
    contract_plugin, clean_environment, arch, message
):
    """NaN or inf from the backbone was blamed on the learning rate, a frozen one failed at the first backward, and
    one that only handles batches of two failed later in training or in export's parity check."""
    from okdpipe.distill.models import create_model
    from okdpipe.distill.models.contract import check_contract

    plugins.load_plugins([str(contract_plugin)])
    model = create_model(arch, num_classes=3, in_channels=1).eval()
    with pytest.raises(OkdpipeError) as error:
        check_contract(model, arch, 3, (1, 8, 8), features=False, stages=False)
    assert str(error.value) == f"backbone {arch!r} {message}"
    assert not model.training  # the probe leaves the mode as it found it


def test_a_plugin_backbone_that_raises_in_its_builder_or_forward_is_one_line(contract_plugin, clean_environment):
    """Any exception type from plug-in code: a KeyError in forward and a builder's failure were tracebacks."""
    from okdpipe.distill.models import create_model
    from okdpipe.distill.models.contract import check_contract

    plugins.load_plugins([str(contract_plugin)])
    model = create_model("contract_forward_raises", num_classes=3, in_channels=1)
    with pytest.raises(OkdpipeError, match=r"backbone 'contract_forward_raises' fails a forward pass .*'layer4'"):
        check_contract(model, "contract_forward_raises", 3, (1, 8, 8), features=False, stages=False)
    with pytest.raises(OkdpipeError) as error:
        create_model("contract_builder_raises", num_classes=3, in_channels=1)
    message = str(error.value)
    assert message.startswith(f"backbone 'contract_builder_raises' from plug-in '{contract_plugin}'")
    assert "its builder failed for 3 classes and 1 input channels" in message and message.endswith("fix the plug-in")


def test_features_and_stage_maps_are_checked_only_where_the_method_reads_them(clean_environment):
    from okdpipe.distill.models import create_model
    from okdpipe.distill.models.contract import check_contract

    model = create_model("resnet8", num_classes=3, in_channels=1)
    check_contract(model, "resnet8", 3, (1, 8, 8), features=True, stages=True)  # okdpipe's own keep it
    model.num_features = 7  # a backbone that misstates its feature width
    check_contract(model, "resnet8", 3, (1, 8, 8), features=False, stages=False)
    with pytest.raises(OkdpipeError, match=r"gives pooled features of shape \[2, 64\] .* expected \[2, 7\]"):
        check_contract(model, "resnet8", 3, (1, 8, 8), features=True, stages=False)
    model.stage_channels = [16, 32, 65]
    with pytest.raises(
        OkdpipeError, match=r"gives stage map 2 of shape \[2, 64, 2, 2\] for a batch of 2, expected \[2, 65, H, W\]"
    ):
        check_contract(model, "resnet8", 3, (1, 8, 8), features=False, stages=True)


def test_a_plugin_file_named_like_an_imported_module_is_refused_not_run(tmp_path, clean_environment):
    """json.py would replace the json module every later import gets (or be skipped silently for it)."""
    (tmp_path / "json.py").write_text("raise SystemExit('must not run')\n")
    with pytest.raises(OkdpipeError) as error:
        plugins.load_plugins([str(tmp_path / "json.py")])
    assert (
        str(error.value)
        == f"plug-in {tmp_path / 'json.py'}: a module named 'json' is already imported; rename the file"
    )
    assert sys.modules["json"] is json


def test_a_builder_that_returns_no_backbone_is_one_line(contract_plugin, clean_environment):
    from okdpipe.distill.models import create_model

    plugins.load_plugins([str(contract_plugin)])
    with pytest.raises(OkdpipeError, match=r"^backbone 'contract_not_a_backbone': what its builder returned \(Linear\) "
                       r"lacks forward_features, pool, classifier, num_features, stage_channels"):  # fmt: skip
        create_model("contract_not_a_backbone", num_classes=3, in_channels=1)


def test_training_and_its_dry_run_refuse_a_broken_peer_before_the_first_step(contract_plugin, tmp_path):
    """Mixed peers: resnet8 keeps the contract, the plug-in's peer does not; nothing is written either way."""
    from okdpipe.config import DistillConfig
    from okdpipe.distill.trainer import fit, preflight
    from okdpipe.run import RunDir

    cfg = DistillConfig(
        plugins=[str(contract_plugin)],
        method="dml",
        arch="resnet8,contract_extra_class",
        dataset="synthetic",
        epochs=1,
        batch_size=8,
    )
    expected = r"^backbone 'contract_extra_class' gives logits of shape \[2, 5\] for a batch of 2, expected \[2, 4\]"
    with pytest.raises(OkdpipeError, match=expected):
        preflight(cfg, RunDir(tmp_path / "run"), resume=False)
    with pytest.raises(OkdpipeError, match=expected):
        fit(cfg, RunDir(tmp_path / "run"), echo=lambda _: None)
    assert not (tmp_path / "run").exists()


@pytest.fixture()
def broken_installed_plugin(tmp_path) -> dict[str, str]:
    """An installed distribution (a dist-info folder on PYTHONPATH) whose okdpipe.plugins entry point raises."""
    (tmp_path / "okdpipe_test_broken_ep.py").write_text("raise ImportError('needs libfoo 2')\n")
    info = tmp_path / "okdpipe_test_broken_ep-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: okdpipe-test-broken-ep\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[okdpipe.plugins]\nbroken = okdpipe_test_broken_ep\n")
    return {"PYTHONPATH": str(tmp_path)}


def test_a_broken_installed_plugin_is_skipped_with_a_warning_and_named_when_a_name_is_missing(broken_installed_plugin):
    code = (
        "from okdpipe.distill.models import MODELS\n"
        "print(MODELS.get('example_cnn').__module__)\n"  # the working installed plug-in still loads
        "MODELS.get('broken_cnn')\n"
    )
    result = python(code, broken_installed_plugin)
    warning = (
        "warning: skipping installed plug-in 'broken = okdpipe_test_broken_ep' (entry point okdpipe.plugins): "
        "ImportError: needs libfoo 2"
    )
    assert result.stdout.strip() == "okdpipe_example.backbones"
    assert result.stderr.count(warning) == 1, result.stderr  # warned once, not per lookup
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "; installed plug-in(s) that failed to load and may provide it: "
            "'broken = okdpipe_test_broken_ep' (ImportError: needs libfoo 2): fix or uninstall them"
        )
    )


def test_a_run_records_the_installed_plugin_it_used(tmp_path):
    from okdpipe import api

    run = tmp_path / "run"
    api.fit(api.DistillConfig(method="vanilla", arch="example_cnn", dataset="synthetic", epochs=1, students=1), run)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["plugins"] == ["okdpipe_example"]
    assert "- okdpipe_example" in (run / "config.yaml").read_text()


def test_relative_plugin_files_and_data_dirs_are_recorded_as_absolute_paths(plugin_file, tmp_path, monkeypatch):
    """select, export and bench read the run's record from another folder: a path relative to the folder
    distill ran in would name another file there."""
    from okdpipe.config import DistillConfig

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    relative = os.path.relpath(plugin_file)
    cfg = DistillConfig(plugins=[relative], arch="filecnn", data_dir="../images")
    assert cfg.plugins == [str(plugin_file.resolve())]
    assert cfg.data_dir == str(tmp_path / "images")


@pytest.mark.parametrize("name", ["a,b", "timm:evil", "two words", "", "-dash", "naïve\u00a0"])
def test_a_name_no_flag_could_select_is_refused_when_registered(tmp_path, clean_environment, name):
    """`a,b` splits into two names and `timm:evil` goes to timm: a plug-in registering either could never be
    selected. Loading it is one line naming the name."""
    plugin = tmp_path / f"okdpipe_test_badname_{abs(hash(name))}.py"
    plugin.write_text(f"from okdpipe.distill.models import MODELS\nMODELS.register({name!r})(lambda **_: None)\n")
    with pytest.raises(OkdpipeError) as error:
        plugins.load_plugins([str(plugin)])
    assert f"backbone name {name!r} cannot be selected" in str(error.value) and "\n" not in str(error.value)
