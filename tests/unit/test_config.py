import time

import pytest

from okdpipe.config import DistillConfig, build_config, parse_set, parse_yaml, read_yaml, with_method_defaults
from okdpipe.distill.trainer import check_config
from okdpipe.errors import OkdpipeError


def test_flags_override_yaml_and_set_overrides_both():
    cfg = build_config({"epochs": 5, "lr": 0.05}, {"epochs": 3, "lr": None}, ["batch_size=64"])
    assert (cfg.epochs, cfg.lr, cfg.batch_size) == (3, 0.05, 64)


def test_set_routes_method_keys_into_method_params():
    cfg = build_config({"method": "okdph"}, {}, ["okdph.gamma=0.5", "okdph.hwm_grad=false"])
    assert cfg.method_params == {"gamma": 0.5, "hwm_grad": False}


def test_parse_set_nests_dotted_keys():
    assert parse_set(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"epoch": 3}, "epoch"),  # typo: unknown key
        ({"lr": -1}, "lr"),
        ({"device": "tpu"}, "device"),
        ({"milestones": [1.5]}, "milestones"),
        ({"lr": float("nan")}, "lr: Input should be a finite number"),
        ({"lr": float("inf")}, "lr: Input should be a finite number"),
        ({"momentum": float("nan")}, "momentum"),
        ({"weight_decay": float("inf")}, "weight_decay: Input should be a finite number"),
        ({"warmup_epochs": float("inf")}, "warmup_epochs: Input should be a finite number"),
        ({"grad_clip": float("nan")}, "grad_clip"),
        ({"lr_decay": float("nan")}, "lr_decay"),
        ({"milestones": [float("nan")]}, "milestones.0: Input should be a finite number"),
        ({"val_split": 2}, "val_split: Input should be less than 1"),
        ({"val_split": float("nan")}, "val_split"),
        ({"epochs": 0}, "epochs: Input should be greater than or equal to 1"),
        ({"batch_size": -1}, "batch_size: Input should be greater than or equal to 1"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
        ({"students": 0}, "students"),
        ({"train_subset": 0}, "train_subset"),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"workers": -1}, "workers"),
        ({"nproc_per_node": 0}, "nproc_per_node"),
        ({1: 2}, "1: Keys should be strings"),
        ({"method_params": [1]}, "method_params must be a mapping"),
    ],
)
def test_bad_config_is_one_clear_line(values, fragment):
    with pytest.raises(OkdpipeError) as err:
        build_config(values, {}, [])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_set_needs_key_value():
    with pytest.raises(OkdpipeError, match="KEY=VALUE"):
        build_config({}, {}, ["gamma"])


def test_set_for_another_method_is_rejected():
    with pytest.raises(OkdpipeError, match="vanilla"):
        build_config({"method": "vanilla"}, {}, ["okdph.gamma=0.5"])


def test_defaults_are_the_cpu_demo():
    cfg = DistillConfig()
    assert (cfg.method, cfg.arch, cfg.dataset, cfg.val_split) == ("vanilla", "resnet20", "fashion-mnist", 0.1)


@pytest.mark.parametrize(
    "sets, fragment",
    [
        (["lr=[1"], "--set lr: not valid YAML"),
        (["lr=0.1", "lr=0.2"], "lr is set twice"),
        (["okdph.gamma=1", "okdph.gamma.x=2"], "gamma was already set to a value, not a section"),
        (["okdph..gamma=1"], "expected KEY=VALUE"),
        (["=1"], "expected KEY=VALUE"),
        (["lr=*a"], "aliases (*name) are not allowed"),
    ],
)
def test_malformed_set_is_one_line(sets, fragment):
    with pytest.raises(OkdpipeError) as err:
        build_config({"method": "okdph"}, {}, sets)
    assert fragment in str(err.value) and "\n" not in str(err.value)


BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{x}: &{x} [{', '.join(['*' + y] * 9)}]\n" for x, y in zip("bcdefghi", "abcdefgh")
)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"\xff\xfe epochs: 1", "is not UTF-8 text"),
        (b"[1, 2]", "must be a mapping of keys to values, not a list"),
        (b"just text", "must be a mapping of keys to values, not a str"),
        (b"epochs: [", "not valid YAML"),
        (BOMB.encode(), "aliases (*name) are not allowed, line 2"),
        (b"x: " + b"[" * 5000, "nested deeper than 32 levels"),
        (b"x: " + b"[" * 33 + b"]" * 33, "nested deeper than 32 levels"),
        (b"# " + b"x" * (1 << 20), "larger than 1,048,576 bytes"),
        (b"epochs: 1\nlr: 0.1\nepochs: 5\n", "key 'epochs' is given twice (line 3); keep one"),
        (b"method_params:\n  gamma: 1\n  gamma: 2\n", "key 'gamma' is given twice (line 3)"),
        (b"epochs: " + b"9" * 4301, "an integer of 4301 digits (line 1)"),  # int() raised ValueError past 4,300
        (b"seed: -" + b"1" * 101, "an integer of 101 digits (line 1)"),
    ],
)
def test_bad_config_files_are_one_line_and_fast(tmp_path, content, fragment):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    started = time.perf_counter()
    with pytest.raises(OkdpipeError) as err:
        read_yaml(path)
    assert time.perf_counter() - started < 10.0  # unbounded, the 1.4 KB alias bomb ran for over a minute
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("fused: 'yes'\n", "fused: Input should be a valid boolean"),
        ("fused: 1\n", "fused: Input should be a valid boolean"),
        ("epochs: '3'\n", "epochs: Input should be a valid integer"),
        ("epochs: 3.0\n", "epochs: Input should be a valid integer"),
        ("dataset: 7\n", "dataset: Input should be a valid string"),
        ("method: okdph\nmethod_params: {hwm_grad: 'false'}\n", "hwm_grad: Input should be a valid boolean"),
    ],
)
def test_config_values_are_not_coerced_across_types(tmp_path, text, fragment):
    """A quoted 'false' is a string, and bool('false') would be True: a value of the wrong type is refused."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(OkdpipeError) as err:
        check_config(build_config(read_yaml(path), {}, []))
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lr: 1e-3", {"lr": 0.001}),  # YAML 1.1 (PyYAML's default) reads this as the string '1e-3'
        ("lr: 5.0e-4", {"lr": 0.0005}),
        ("lr: .5", {"lr": 0.5}),
        ("seed: 010", {"seed": 10}),  # octal 8 under YAML 1.1
        ("epochs: 1:30", {"epochs": "1:30"}),  # 90 (base 60) under YAML 1.1; a string a numeric field refuses
        ("epochs: 0x10", {"epochs": "0x10"}),
        ("fused: yes", {"fused": "yes"}),  # a boolean under YAML 1.1; only true/false are, as in YAML 1.2
        ("fused: false", {"fused": False}),
        ("x: [-2, +3e2, .inf]", {"x": [-2, 300.0, float("inf")]}),
    ],
)
def test_plain_scalars_are_read_by_yaml_1_2_rules(text, expected):
    assert parse_yaml(text, "c.yaml") == expected


def test_a_config_with_scientific_notation_and_a_leading_zero_resolves_as_written(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nseed: 010\nepochs: 1:30\n")
    with pytest.raises(OkdpipeError, match="epochs: Input should be a valid integer"):
        build_config(read_yaml(path), {}, [])
    path.write_text("lr: 1e-3\nseed: 010\n")
    cfg = build_config(read_yaml(path), {}, ["weight_decay=1e-4"])
    assert (cfg.lr, cfg.seed, cfg.weight_decay) == (0.001, 10, 0.0001)


def test_a_folder_is_not_a_config_file(tmp_path):
    with pytest.raises(OkdpipeError, match="the config file is a folder; pass a file"):
        read_yaml(tmp_path)


def test_method_defaults_fill_only_what_the_user_left_unset():
    defaults = {"optimizer": "nesterov", "weight_decay": 1e-4}
    assert with_method_defaults(build_config({}, {}, []), defaults).weight_decay == 1e-4
    assert with_method_defaults(build_config({"weight_decay": 5e-4}, {}, []), defaults).weight_decay == 5e-4
    assert with_method_defaults(build_config({}, {}, ["optimizer=adamw"]), defaults).optimizer == "adamw"
    resolved = with_method_defaults(build_config({}, {}, []), defaults)
    assert with_method_defaults(resolved, {"optimizer": "sgd"}).optimizer == "nesterov"  # idempotent once resolved
    with pytest.raises(ValueError, match="may set only"):
        with_method_defaults(resolved, {"lr": 1.0})


def test_a_backbone_recipe_sits_below_the_method_defaults_and_everything_the_user_sets():
    method = {"weight_decay": 1e-4}
    backbone = {"lr": 0.05, "warmup_epochs": 1.0, "weight_decay": 0.0, "channels_last": True}
    plain = with_method_defaults(build_config({}, {}, []), method, backbone)
    assert (plain.lr, plain.warmup_epochs, plain.weight_decay, plain.channels_last) == (0.05, 1.0, 1e-4, True)
    chosen = with_method_defaults(
        build_config({"warmup_epochs": 0}, {"lr": 0.2}, ["channels_last=false"]), {}, backbone
    )
    assert (chosen.lr, chosen.warmup_epochs, chosen.weight_decay, chosen.channels_last) == (0.2, 0.0, 0.0, False)
    assert with_method_defaults(plain, {}, {"lr": 0.3}).lr == 0.05  # idempotent once resolved
    with pytest.raises(ValueError, match="a recipe may set only"):
        with_method_defaults(build_config({}, {}, []), {}, {"epochs": 3})


def test_set_changes_one_data_option_and_keeps_the_config_files_others():
    file_values = {"dataset": "synthetic", "data_options": {"n_train": 128, "n_test": 64}}
    cfg = build_config(file_values, {}, ["data_options.n_test=32"])
    assert cfg.data_options == {"n_train": 128, "n_test": 32}
    assert file_values["data_options"] == {"n_train": 128, "n_test": 64}  # the file's values are not changed
    assert build_config({}, {}, ["data_options.n_test=32"]).data_options == {"n_test": 32}


def test_training_only_checks_do_not_refuse_rebuilding_a_finished_run():
    """A run trained on 64 cores with a long warm-up is still selectable on a laptop: select and export rebuild it
    through check_config, which leaves the device, process count and warm-up to a run about to train."""
    from okdpipe.config import DistillConfig
    from okdpipe.distill.trainer import check_training

    made_elsewhere = DistillConfig(dataset="synthetic", nproc_per_node=1024, batch_size=1024, device="cpu")
    check_config(made_elsewhere)
    with pytest.raises(OkdpipeError, match="--nproc-per-node 1024: this machine gives okdpipe"):
        check_training(made_elsewhere)
    long_warmup = DistillConfig(dataset="synthetic", epochs=2, warmup_epochs=3)
    check_config(long_warmup)
    with pytest.raises(OkdpipeError, match="warmup_epochs 3 is longer than the run"):
        check_training(long_warmup)
