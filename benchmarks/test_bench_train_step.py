"""One optimisation step of every registered method (ResNet-8 students, a batch of 64 Fashion-MNIST-shaped
images): forward of all students, the method's losses, backward, optimiser step(s), after_step, exactly as
`fit` runs it (distill.trainer.train_step on a build_session session)."""

from __future__ import annotations

import pytest
import torch

from okdpipe.distill.methods import METHODS

BATCH_SIZE = 64


@pytest.mark.parametrize("method", METHODS.names())
def test_train_step(benchmark, train_session, method):
    from okdpipe.distill.methods import StepContext
    from okdpipe.distill.trainer import train_step

    session = train_session(method, BATCH_SIZE)
    batch = next(iter(session.train_loader.epoch(0)))
    steps = len(session.train_loader)
    ctx = StepContext(0.5, steps // 2, 1, steps, torch.Generator().manual_seed(0))  # mid-run: ramps are active
    session.students.train()
    session.method.train()
    benchmark.extra_info.update(images=BATCH_SIZE, students=session.students.count, views=batch.views.shape[0])
    losses = benchmark(train_step, session, batch, ctx)
    assert torch.isfinite(losses["loss"]).item()
