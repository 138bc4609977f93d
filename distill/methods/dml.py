"""DML -- Deep Mutual Learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018), Eq. 10 generalised to N peers.

N independent peers (layout `peers`, different initialisations), each trained on

    L_i = CE(z_i, y) + 1/(N-1) * sum_{j != i} KD(z_i <- z_j)

where the other peers' logits z_j are detached inside the KD: each peer updates only its own weights from its
own loss (the paper alternates the peers' updates; one summed backward with detached teachers gives every peer
exactly the gradient of its own L_i, computed on the same batch). The paper uses T = 1; the comparison papers
(ONE, OKDDip, PCL, OKDPH tables) re-run DML with T = 3 on the 300-epoch recipe -- set `dml.temperature=3` to
reproduce those numbers. Ships: the best peer by validation accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from okdpipe.distill.losses import kd
from okdpipe.distill.methods.base import METHODS, Hparams, Method


class DMLParams(Hparams):
    temperature: float = Field(1.0, gt=0, le=20, description="KD temperature T (paper: 1; comparison re-runs: 3)")


def mutual_kd(student: torch.Tensor, teachers: torch.Tensor, skip: int, temperature: float) -> torch.Tensor:
    """1/(N-1) * sum_{l != skip} KD(student <- teachers[l]): the mean over the other peers' detached logits.

    student: [B, K]; teachers: [N, B, K]. Shared with PCL, whose peer-mean-teacher term has the same form."""
    others = [kd(student, teacher, temperature) for l, teacher in enumerate(teachers) if l != skip]
    return torch.stack(others).mean()


def peer_terms(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """Every peer's CE and mutual-KD term; L_i = terms["ce/s<i>"] + terms["kd/s<i>"] (logits: [N, B, K])."""
    terms = {}
    for i, z in enumerate(logits):
        terms[f"ce/s{i}"] = F.cross_entropy(z, labels)
        terms[f"kd/s{i}"] = mutual_kd(z, logits, i, temperature)
    return terms


@METHODS.register("dml")
class DML(Method):
    """Sum over peers of L_i (see the module docstring); the teachers are detached, so peers stay independent."""

    fusable = True
    mixed_archs = True  # peers meet only through their logits (KD on [B, K]), whatever their architectures

    Params = DMLParams
    layout = "peers"
    default_students = 2
    min_students = 2
    ships = "best-student"

    def step(self, views, labels, out, ctx):
        terms = peer_terms(out.logits, labels, self.hp.temperature)
        return {"loss": sum(terms.values()), **{k: v.detach() for k, v in terms.items()}}
