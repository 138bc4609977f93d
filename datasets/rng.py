"""Seeds derived from named parts, so every random draw is a pure function of (seed, epoch, ...)."""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integer parts by NumPy's SeedSequence.

    Plain sums like `seed + epoch` collide ((0, 1) == (1, 0)); SeedSequence hashes the whole tuple.
    """
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def cpu_generator(*parts: int) -> torch.Generator:
    """A CPU torch.Generator: draws made on the CPU are identical whichever device consumes them."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(*parts))


# Stream tags keep the draws of different purposes independent of each other for the same seed.
STREAM_HOLDOUT = 1
STREAM_SUBSET = 2
STREAM_EPOCH = 3
STREAM_SAMPLE = 4
STREAM_SYNTHETIC = 5
STREAM_WORKERS = 6
