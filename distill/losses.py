"""Loss terms shared by the online-distillation methods: pure functions of tensors.

Notation follows shared/docs/methods.md: KD(z_s <- z_t) = T^2 * KL(softmax(z_t/T) || softmax(z_s/T)),
batch-mean, with the teacher detached unless the caller says otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float, detach_teacher: bool = True) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch (Hinton et al. 2015).

    The T^2 factor keeps the gradient's magnitude independent of T.
    """
    if detach_teacher:
        teacher = teacher.detach()
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return temperature**2 * kl


def ramp(epoch: float, length: float) -> float:
    """Sigmoid-shaped ramp-up exp(-5 (1 - min(e, L)/L)^2) (Laine & Aila 2017), as ONE/PCL/MBDE weight KD.

    `epoch` may be fractional (per-step ramps); `length` is in epochs. length <= 0 means no ramp (weight 1).
    """
    if length <= 0:
        return 1.0
    progress = min(epoch, length) / length
    return math.exp(-5.0 * (1.0 - progress) ** 2)


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """A(F) = channel-mean of F^2, flattened per sample: [B, C, H, W] -> [B, H*W] (Zagoruyko & Komodakis 2017)."""
    return feature.float().pow(2).mean(dim=1).flatten(1)


def normalized_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean((a/||a|| - b/||b||)^2) with per-sample L2 norms over the flattened maps (FFSD's AttnMSE)."""
    a = F.normalize(a.flatten(1).float(), dim=1)
    b = F.normalize(b.flatten(1).float(), dim=1)
    return (a - b).pow(2).mean()
