"""One augmented training batch of 128 (random crop with padding, flip, cutout): the in-memory tensor path
against the per-sample albumentations path (image folders), on the same images."""

from __future__ import annotations

import itertools

import pytest

BATCH_SIZE = 128
CUTOUT = 8  # pixels, as for Fashion-MNIST runs


def endless_batches(loader):
    """Epoch after epoch, so a benchmark can draw as many batches as it wants."""
    return itertools.chain.from_iterable(loader.epoch(epoch) for epoch in itertools.count())


@pytest.mark.parametrize("backend", ["tensor", "albumentations"])
def test_augmented_batch(benchmark, fmnist_shaped, backend):
    from okdpipe.datasets import AugmentConfig, make_loader

    augment = AugmentConfig(crop_padding=fmnist_shaped.spec.augment.crop_padding, hflip=True, cutout=CUTOUT)
    loader = make_loader(
        fmnist_shaped.train,
        fmnist_shaped.spec,
        batch_size=BATCH_SIZE,
        train=True,
        device="cpu",
        augment=augment,
        backend=backend,
    )
    batches = endless_batches(loader)
    benchmark.extra_info.update(images=BATCH_SIZE, backend=backend)
    batch = benchmark(next, batches)
    assert tuple(batch.views.shape) == (1, BATCH_SIZE, 1, 28, 28) and batch.labels.shape == (BATCH_SIZE,)
