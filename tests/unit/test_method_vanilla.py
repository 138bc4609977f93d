"""Vanilla: step() is the plain sum of every student's cross-entropy, with nothing else in the loss."""

import torch
from paper_formulas import assert_same_gradients, assert_terms, ce
from test_method_one import make_ctx, make_method

from okdpipe.distill.methods import METHODS


def test_step_by_value_is_the_sum_of_cross_entropies():
    method, students = make_method("vanilla", layout="peers", count=2)
    out = students(torch.randn(1, 6, 1, 28, 28, generator=torch.Generator().manual_seed(6)))
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    expected = {f"ce/s{i}": ce(z, labels) for i, z in enumerate(out.logits)}
    losses = method.step(None, labels, out, make_ctx(20.0))
    assert set(losses) == {"loss", "ce/s0", "ce/s1"}
    assert_terms(losses, expected)
    assert_same_gradients(losses["loss"], sum(expected.values()), list(students.parameters()))


def test_vanilla_defaults():
    cls = METHODS.get("vanilla")
    assert (cls.layout, cls.default_students, cls.per_student_views, cls.same_init) == ("peers", 1, False, False)
