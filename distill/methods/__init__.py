"""Distillation methods, one file each, registered by name in METHODS."""

import importlib
import pkgutil

from okdpipe.distill.methods.base import METHODS, Candidate, Hparams, Method, StepContext

# Importing a method's module registers it; every module in this package is a method (or `base`).
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Candidate", "Hparams", "Method", "StepContext"]
