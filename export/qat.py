"""Distillation-aware quantization-aware training: `okdpipe export --quantize int8 --qat-epochs N`.

The selected student is fine-tuned as its fake-quantized twin (export/fakequant.py: the CPU's static QDQ scheme,
BatchNorm folded, activation scales calibrated and frozen) and shipped as QDQ ONNX (export/qdq.py). The loss is

    L = (1 - alpha) CE(z_s, y) + alpha T^2 KL(p_t || softmax(z_s / T)),   p_t = mean_i softmax(z_i / T)

(Hinton et al. 2015, with the run's peers i as the teacher: the ensemble online distillation left behind, rebuilt
from the run's checkpoint). `--qat-teacher labels` drops the second term (CE only), the control that measures
what the teacher adds. Defaults: alpha 0.9 and T 4 (Hinton's and the OKD papers' usual values), SGD with
momentum 0.9, no weight decay (a few epochs of fine-tuning, not regularised training), lr 1e-3 (a fine-tune
starting from a converged network: a hundredth of the training lr) on a per-step cosine to 0.

Data: the model file's training split (augmented as in training) for the steps and the first --calib-size images
for calibration; its validation split for each epoch's figure. The test split is never read.

Resumable: after each epoch the network, the optimizer and the history go to OUT/.qat-<key>/last.pt (atomic
write), where <key> hashes the model file and every option the result depends on. A re-run of the same export
continues after the last finished epoch and reaches bit-identical weights (on CPU, the loader is a pure function of
(seed, epoch), the teacher is in eval mode and nothing else draws random numbers). The folder is removed when the
export is published, and left for a re-run when it fails or is interrupted.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from okdpipe.contracts.versioned import FileFormat
from okdpipe.distill.losses import kd
from okdpipe.errors import OkdpipeError
from okdpipe.export import fakequant, onnx_export, qdq, quantize
from okdpipe.files import file_sha256
from okdpipe.modelfile import atomic_torch_save, load_tensors

WORK_PREFIX = ".qat-"
CHECKPOINT_FILE = "last.pt"
CHECKPOINT = FileFormat("okdpipe-qat-checkpoint", 1, "QAT checkpoint", "delete it; the export starts QAT again")
MOMENTUM = 0.9
# ORT's integer kernels requantize each layer's int32 accumulator with fixed-point arithmetic and round once, where
# the fake-quantized network multiplies in float: the two land on neighbouring grid points for a few values, and a
# one-step change in one layer moves the logits by a few output steps (output scale = logit range / 255, about
# 0.8% of the logit scale). 5% of the logit scale (about six output steps) passes that, while a wrong scale, weight
# or op moves logits by tens of percent.
QAT_TOLERANCE = 5e-2

Teacher = Callable[[torch.Tensor], torch.Tensor]  # normalised inputs [B, C, H, W] -> teacher logits [B, K]


@dataclass
class QatResult:
    network: torch.nn.Module  # calibrated, fine-tuned, fake-quantized: the parity reference
    record: dict  # the card's `quantization` section


def quantization_aware_int8(ctx, onnx_path: Path) -> QatResult:
    """Fine-tune `ctx.model` with fake quantization, write it as QDQ ONNX to `onnx_path`; see module docstring."""
    config, settings = ctx.config, quantize.int8_settings(quantize.cpu_features())
    teacher = None if config.qat_teacher == "labels" else ensemble_teacher(ctx.peers, config.qat_temperature)
    work = ctx.out_dir / f"{WORK_PREFIX}{work_key(ctx, settings)}"
    remove_other_work(ctx.out_dir, work)
    network = fakequant.prepare(ctx.model, settings)
    history = fine_tune(network, ctx, teacher, work)
    opset = qdq.export_qdq(network, (ctx.info.in_channels, *ctx.info.input_size), onnx_path, config.opset)
    return QatResult(network.eval(), qat_record(ctx, settings, history, opset))


def qat_record(ctx, settings: dict, history: list[dict], opset: int) -> dict:
    config = ctx.config
    distilled = config.qat_teacher == "ensemble"
    return {
        "method": "qat",
        "format": "QDQ",
        **settings,
        "scheme": {
            "weights": "int8 per-channel symmetric, scale max|w|/qmax",
            "weight_qmax": fakequant.weight_qmax(settings),
            "bias": "int32 on the grid input_scale * weight_scale",
            "activations": "uint8 asymmetric per-tensor, EMA min/max calibrated, then frozen",
            "batchnorm": "folded into the preceding conv (eval statistics)",
        },
        "calibration": {"method": "ema-minmax", "samples": min(config.calib_size, len(ctx.train)), "split": "train"},
        "per_channel": True,
        "fp32_nodes": [],
        "epochs": config.qat_epochs,
        "teacher": config.qat_teacher,
        "teacher_students": ctx.peers.count if distilled else 0,  # 1: the FP32 student itself (a one-student run)
        "loss": "(1-alpha) CE + alpha T^2 KL(teacher || student)" if distilled else "CE",
        "lr": config.qat_lr,
        "optimizer": f"SGD momentum {MOMENTUM}, cosine to 0 per step",
        "batch_size": config.qat_batch_size,
        "seed": config.qat_seed,
        "alpha": config.qat_alpha if distilled else 0.0,
        "temperature": config.qat_temperature if distilled else None,
        "history": history,
        "opset": opset,
    }


def load_peers(info, model_path):
    """The run's students in eval mode, rebuilt from its checkpoint (checked before export touches OUT); a run
    that cannot give them is one line that also names the teacher-free fine-tune."""
    from okdpipe.distill.finished import load_run

    run_dir = teacher_run(info, model_path)
    try:
        return load_run(run_dir, device="cpu").students.eval()
    except OkdpipeError as error:
        raise type(error)(f"{error}; or use --qat-teacher labels (fine-tune on the labels alone)") from None


def ensemble_teacher(students, temperature: float) -> Teacher:
    """The run's peers as one teacher: T log(mean_i softmax(z_i / T)), whose softmax at T is the averaged peer
    distribution (what `distill.losses.kd` takes as teacher logits)."""

    @torch.no_grad()
    def teacher(inputs: torch.Tensor) -> torch.Tensor:
        return peer_teacher_logits(students(inputs.unsqueeze(0)).logits, temperature)

    return teacher


def peer_teacher_logits(peer_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """[N, B, K] peer logits -> T log(mean_i softmax(z_i / T)) [B, K], the averaged peer distribution as logits."""
    probabilities = torch.softmax(peer_logits.float() / temperature, dim=-1).mean(0)
    return temperature * torch.log(probabilities.clamp_min(1e-12))


def teacher_run(info, model_path) -> Path:
    """The run directory the model file came from; checked before export touches OUT."""
    run_dir = info.provenance.get("run_dir")
    if not run_dir or not Path(run_dir).is_dir():
        where = f"its run {run_dir} is gone" if run_dir else "it names no training run"
        raise OkdpipeError(
            f"{model_path}: --qat-teacher ensemble needs the run's peers, but {where}; "
            "use --qat-teacher labels (fine-tune on the labels alone)"
        )
    return Path(run_dir)


def qat_loss(logits, labels, teacher_logits, alpha: float, temperature: float) -> torch.Tensor:
    """(1 - alpha) CE + alpha T^2 KL (module docstring); CE alone without a teacher."""
    ce = F.cross_entropy(logits, labels)
    if teacher_logits is None:
        return ce
    return (1 - alpha) * ce + alpha * kd(logits, teacher_logits, temperature)


def fine_tune(network, ctx, teacher: Teacher | None, work: Path) -> list[dict]:
    """Calibrate (or resume), then train `qat_epochs` epochs, checkpointing each; returns the per-epoch history."""
    config = ctx.config
    optimizer = torch.optim.SGD(network.parameters(), lr=config.qat_lr, momentum=MOMENTUM)
    history = resume(work, network, optimizer)
    if history is None:
        fakequant.calibrate(network, calibration_batches(ctx))
        history = []
    loader = training_loader(ctx)
    for epoch in range(len(history), config.qat_epochs):
        loss = train_epoch(network, optimizer, loader, epoch, teacher, config)
        history.append({"epoch": epoch + 1, "train_loss": loss, "val_top1": val_top1(network, ctx, epoch)})
        save_checkpoint(work, network, optimizer, history)
    return history


def train_epoch(network, optimizer, loader, epoch: int, teacher: Teacher | None, config) -> float:
    """One pass over the loader's epoch; returns the mean loss."""
    from okdpipe.progress import progress

    network.train()
    total, steps, per_epoch = 0.0, 0, len(loader)
    with progress(per_epoch, f"QAT epoch {epoch + 1}/{config.qat_epochs}", unit="steps") as advance:
        for step, batch in enumerate(loader.epoch(epoch)):
            inputs = batch.views[0]
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(config.qat_lr, epoch * per_epoch + step, config.qat_epochs * per_epoch)
            teacher_logits = None if teacher is None else teacher(inputs)
            loss = qat_loss(network(inputs), batch.labels, teacher_logits, config.qat_alpha, config.qat_temperature)
            check_finite_loss(loss, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
            advance(1)
    return total / max(steps, 1)


def cosine_lr(base: float, step: int, total: int) -> float:
    return base * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))


def check_finite_loss(loss: torch.Tensor, epoch: int, step: int) -> None:
    from okdpipe.errors import GateFailed

    if not bool(torch.isfinite(loss)):
        raise GateFailed(f"QAT diverged: the loss is not finite at epoch {epoch + 1}, step {step}; lower --qat-lr")


def val_top1(network, ctx, epoch: int) -> float:
    from okdpipe.scoring import score

    network.eval()
    predict = lambda batch: onnx_export.torch_logits(network, batch)  # noqa: E731
    return score(predict, ctx.val, ctx.preprocess, what=f"the fake-quantized network after QAT epoch {epoch + 1}").top1


def training_loader(ctx):
    from okdpipe.datasets.loader import make_loader

    batch = min(ctx.config.qat_batch_size, len(ctx.train))
    return make_loader(ctx.train, ctx.spec, batch_size=batch, train=True, device="cpu", seed=ctx.config.qat_seed)


def calibration_batches(ctx):
    """The first --calib-size training images, normalised as served (what static INT8 calibrates on)."""
    from okdpipe.scoring import normalised_batches

    batches = normalised_batches(ctx.train, quantize.CALIB_BATCH, ctx.preprocess, limit=ctx.config.calib_size)
    return (torch.from_numpy(inputs) for inputs, _ in batches)


def work_key(ctx, settings: dict) -> str:
    """What the fine-tuned weights depend on: the model file, the data, the scheme and every QAT option."""
    config = ctx.config
    options = {name: getattr(config, name) for name in type(config).model_fields if name.startswith("qat_")}
    described = {
        "model": file_sha256(ctx.model_path),
        "data": ctx.source.as_record(),
        "reduce_range": settings["reduce_range"],
        "calib_size": config.calib_size,
        **options,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]


def remove_other_work(out_dir: Path, keep: Path) -> None:
    """Work folders of QAT exports with other settings: their checkpoints can never be resumed by this one."""
    for stale in out_dir.glob(WORK_PREFIX + "*"):
        if stale != keep and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def remove_work(out_dir: Path) -> None:
    """After a successful export, nothing is left to resume."""
    for work in out_dir.glob(WORK_PREFIX + "*"):
        shutil.rmtree(work, ignore_errors=True)


def save_checkpoint(work: Path, network, optimizer, history: list[dict]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    state = {
        **CHECKPOINT.header(),
        "network": network.state_dict(),
        "optimizer": optimizer.state_dict(),
        "history": history,
    }
    atomic_torch_save(state, work / CHECKPOINT_FILE)


def resume(work: Path, network, optimizer) -> list[dict] | None:
    """Restore the last finished epoch from `work` (None when there is none): weights, frozen scales, optimizer."""
    path = work / CHECKPOINT_FILE
    if not path.is_file():
        return None
    state = load_tensors(path, "unreadable QAT checkpoint", "delete it (QAT then starts again)")
    CHECKPOINT.check(state, path)
    network.load_state_dict(state["network"])
    optimizer.load_state_dict(state["optimizer"])
    fakequant.freeze(network)
    return list(state["history"])
