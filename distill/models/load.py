"""Building the network a model file (MODEL.pt, `okdpipe.modelfile`) describes: the file format lives in the
core, the architectures here."""

from __future__ import annotations

import os

from okdpipe.distill.models.base import MODELS, create_model
from okdpipe.distill.models.external import is_external
from okdpipe.errors import OkdpipeError
from okdpipe.modelfile import ModelInfo, read_model_file
from okdpipe.plugins import missing_plugin_message


def load_model_file(path: str | os.PathLike):
    """Build the network a model file describes and load its verified weights; returns (model, info)."""
    state, info = read_model_file(path)
    model = build_model(info, path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise OkdpipeError(f"{path}: weights do not fit architecture {info.arch!r} ({first})") from None
    return model.eval(), info


def build_model(info: ModelInfo, where: object):
    """The architecture the file names; one built by a plug-in that is not loaded is a one-line error naming it."""
    plugin = info.arch_source.get("plugin")
    if plugin and not is_external(info.arch) and not registered(info.arch):
        raise OkdpipeError(f"{where}: {missing_plugin_message(info.arch_source, f'architecture {info.arch!r}')}")
    try:
        return create_model(info.arch, num_classes=info.num_classes, in_channels=info.in_channels, **info.arch_kwargs)
    except TypeError as exc:
        raise OkdpipeError(f"{where}: arch_kwargs {info.arch_kwargs} do not fit {info.arch!r} ({exc})") from None


def registered(arch: str) -> bool:
    """True when `arch` is registered, after loading the plug-ins that are installed or named in the environment."""
    try:
        MODELS.get(arch)
    except OkdpipeError:
        return False
    return True
