import math

import pytest

from okdpipe.config import DistillConfig
from okdpipe.distill.trainer import lr_factor


def test_cosine_with_warmup_exact_values():
    cfg = DistillConfig(epochs=10, warmup_epochs=1, schedule="cosine")
    spe = 10  # 100 steps, 10 of warm-up
    assert lr_factor(0, cfg, spe) == pytest.approx(0.1)
    assert lr_factor(9, cfg, spe) == pytest.approx(1.0)
    assert lr_factor(10, cfg, spe) == pytest.approx(1.0)
    assert lr_factor(55, cfg, spe) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_factor(100, cfg, spe) == pytest.approx(0.0)


def test_step_schedule_decays_at_milestones():
    cfg = DistillConfig(epochs=300, schedule="step", milestones=[0.5, 0.75], lr_decay=0.1)
    assert lr_factor(149, cfg, 1) == 1.0
    assert lr_factor(150, cfg, 1) == pytest.approx(0.1)
    assert lr_factor(225, cfg, 1) == pytest.approx(0.01)
