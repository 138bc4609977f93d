"""Reference formulas for the step-level method tests, written from the papers' equations
(../shared/docs/methods.md) with plain torch: they never call okdpipe's loss helpers, so a wrong ramp,
temperature, weight or detach inside a method's `step()` cannot hide behind the same wrong helper.

Import: `from paper_formulas import ...` (tests/unit is on the path, as for datafixtures).
"""

from __future__ import annotations

import math

import torch

# Every step-level test runs at epoch 5 of a 60-epoch run: the ramp is 80/300 of the run = 16 epochs, so
# w = exp(-5 (1 - 5/16)^2) ~ 0.09, far from 1 (a run of 300 epochs would hide a ramp length left in the
# papers' 300-epoch units), and at a temperature no method defaults to.
EPOCH, TOTAL_EPOCHS = 5.0, 60
RAMP_AT_EPOCH = math.exp(-5 * (1 - 5 / 16) ** 2)
TEMPERATURE = 2.5


def ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-mean_b log softmax(z_b)[y_b]."""
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -log_p[torch.arange(len(labels)), labels].mean()


def kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean_b sum_k p_t (log p_t - log p_s), p = softmax(z / T), the teacher detached (Hinton et al.)."""
    log_t = torch.log_softmax(teacher.detach() / temperature, dim=1)
    log_s = torch.log_softmax(student / temperature, dim=1)
    return temperature**2 * (log_t.exp() * (log_t - log_s)).sum(1).mean()


def batch_norm_train(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """BatchNorm with batch statistics (biased variance), per channel (dim 1), with the layer's affine."""
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(shape) + norm.bias.view(shape)


def gated_ensemble_terms(logits: torch.Tensor, gate: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """ONE Eq. 5 (and MBDE's) at EPOCH, TEMPERATURE: z_e = sum_j g_j z_j per sample (gate [B, N]);
    sum_j CE(z_j) + CE(z_e) + w * sum_j KD(z_j <- z_e)."""
    z_e = (gate.T[:, :, None] * logits).sum(0)
    terms = {"ce/ensemble": ce(z_e, labels)}
    for j, z in enumerate(logits):
        terms[f"ce/s{j}"] = ce(z, labels)
        terms[f"kd/s{j}"] = RAMP_AT_EPOCH * kd(z, z_e, TEMPERATURE)
    return terms


def assert_step(losses: dict, expected: dict, params) -> None:
    """Every term by value, and the gradient of the loss equals that of the expected terms' sum."""
    assert_terms(losses, expected)
    assert_same_gradients(losses["loss"], sum(expected.values()), params)


def assert_terms(losses: dict, expected: dict, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    """The loss dict has exactly the expected terms (plus "loss" = their sum), each equal by value."""
    assert set(losses) - {"loss"} >= set(expected), sorted(set(expected) - set(losses))
    for key, value in expected.items():
        torch.testing.assert_close(
            losses[key].float(), value.detach().float(), rtol=rtol, atol=atol, msg=lambda m, key=key: f"{key}: {m}"
        )
    total = sum(expected.values())
    torch.testing.assert_close(losses["loss"].float(), total.detach().float(), rtol=rtol, atol=atol)


def assert_same_gradients(loss: torch.Tensor, reference: torch.Tensor, params, rtol: float = 1e-3) -> None:
    """d loss / d params == d reference / d params, per tensor up to rtol of its largest entry (float32 sums in
    another order; at least 1e-5, for gradients that are zero in exact arithmetic, e.g. a bias before a BN): any
    missing or extra detach changes some gradient by far more."""
    params = [p for p in params if p.requires_grad]
    got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(reference, params, retain_graph=True, allow_unused=True)
    for g, w in zip(got, want):
        g = torch.zeros_like(w) if g is None and w is not None else g
        w = torch.zeros_like(g) if w is None and g is not None else w
        if g is not None:
            torch.testing.assert_close(g, w, rtol=rtol, atol=max(rtol * float(w.abs().max()), 1e-5))
