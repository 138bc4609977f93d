"""Per-view augmentation policies (datasets/views.py): OKDPH's view kinds, per-image draws, each op by value."""

import math

import pytest
import torch

from okdpipe.datasets.augment import draw_augment
from okdpipe.datasets.spec import AugmentConfig
from okdpipe.datasets.views import (
    FLIP_CUTOUT,
    FLIP_ROTATE,
    RANDAUGMENT,
    ViewAugment,
    augment_policy,
    draw_policy,
    equalize,
    posterize,
    randaugment,
    rotate,
    view_policy,
)
from okdpipe.errors import OkdpipeError


def test_okdph_policy_gives_each_model_its_own_kind_and_the_hybrid_randaugment():
    assert view_policy("okdph", 3) == (FLIP_ROTATE, FLIP_CUTOUT, RANDAUGMENT)
    assert view_policy("okdph", 5) == (FLIP_ROTATE, FLIP_CUTOUT, FLIP_ROTATE, FLIP_CUTOUT, RANDAUGMENT)
    assert (FLIP_ROTATE.rotate, FLIP_CUTOUT.cutout) == (15, 16)
    assert (RANDAUGMENT.randaugment, RANDAUGMENT.hflip) == ((2, 9), False)
    assert view_policy("same", 3) is None
    with pytest.raises(OkdpipeError, match="unknown augmentation policy"):
        view_policy("fancy", 3)


def test_rotation_is_per_image():
    images = torch.arange(32.0).view(2, 1, 4, 4)
    out = rotate(images, torch.tensor([0.0, 90.0]))
    torch.testing.assert_close(out[0], images[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], torch.rot90(images[1], 1, dims=(1, 2)), atol=1e-4, rtol=0)


def test_posterize_equalize_and_solarize_by_value():
    x = torch.tensor([0, 3, 130, 255.0]).view(1, 1, 1, 4) / 255
    torch.testing.assert_close(posterize(x, 9 / 30) * 255, torch.tensor([0, 2, 130, 254.0]).view(1, 1, 1, 4))
    y = torch.tensor([10, 10, 20, 40.0]).view(1, 1, 1, 4) / 255  # CDF 2, 3, 4: (cdf - 2) / (4 - 2)
    torch.testing.assert_close(equalize(y), torch.tensor([0, 0, 0.5, 1.0]).view(1, 1, 1, 4))
    ops = torch.tensor([[11, 0]])  # Solarize then Identity, M = 9: pixels >= 0.7 inverted
    solarized = randaugment(x, ops, torch.ones(1, 2), 2, 9 / 30)
    torch.testing.assert_close(solarized, torch.tensor([0, 3, 130, 0.0]).view(1, 1, 1, 4) / 255)


def test_views_follow_their_policy_per_image():
    policy = (ViewAugment(hflip=False), ViewAugment(hflip=False, cutout=4), RANDAUGMENT)
    config = AugmentConfig(crop_padding=0, hflip=True)
    images = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8).repeat(16, 1, 1, 1)  # 16 copies of one image
    generator = torch.Generator().manual_seed(0)
    draws = draw_augment(generator, 3, 16, config, (8, 8))
    extra = draw_policy(generator, policy, 16)
    mean, std = torch.zeros(3), torch.ones(3)
    out = augment_policy(images, draws.window(0, 16), extra.window(0, 16), config, policy, mean, std)
    assert out.shape == (3, 16, 3, 8, 8)
    torch.testing.assert_close(out[0], images.float() / 255)  # no flip, no cutout, nothing else
    holes = (out[1] == 0).all(dim=1).flatten(1).sum(1)
    assert bool((holes > 0).all()) and bool((holes <= 16).all())  # a 4x4 cutout in every image of view 1
    distinct = {tuple(x.flatten().tolist()) for x in out[2]}
    assert len(distinct) > 8  # RandAugment draws per image, not one op per batch
    assert extra.ops.shape == (3, 16, 2) and math.isclose(float(extra.angles.abs().max()), 0.0)
