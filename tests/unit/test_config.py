import pytest

from okdpipe.config import DistillConfig, build_config, parse_set
from okdpipe.errors import OkdpipeError


def test_flags_override_yaml_and_set_overrides_both():
    cfg = build_config({"epochs": 5, "lr": 0.05}, {"epochs": 3, "lr": None}, ["batch_size=64"])
    assert (cfg.epochs, cfg.lr, cfg.batch_size) == (3, 0.05, 64)


def test_set_routes_method_keys_into_method_params():
    cfg = build_config({"method": "okdph"}, {}, ["okdph.gamma=0.5", "okdph.hwm_grad=false"])
    assert cfg.method_params == {"gamma": 0.5, "hwm_grad": False}


def test_parse_set_nests_dotted_keys():
    assert parse_set(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


@pytest.mark.parametrize("values, fragment", [
    ({"epoch": 3}, "epoch"),                 # typo: unknown key
    ({"lr": -1}, "lr"),
    ({"device": "tpu"}, "device"),
    ({"milestones": [1.5]}, "milestones"),
])
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
