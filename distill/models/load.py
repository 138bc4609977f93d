"""Building the network a model file (MODEL.pt, `okdpipe.modelfile`) describes: the file format lives in the
core, the architectures here."""

from __future__ import annotations

import os

from okdpipe.distill.models.base import create_model
from okdpipe.errors import OkdpipeError
from okdpipe.modelfile import ModelInfo, read_model_file


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
    try:
        return create_model(info.arch, num_classes=info.num_classes, in_channels=info.in_channels, **info.arch_kwargs)
    except TypeError as exc:
        raise OkdpipeError(f"{where}: arch_kwargs {info.arch_kwargs} do not fit {info.arch!r} ({exc})") from None
