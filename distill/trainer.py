"""`fit()`: the one training loop every method runs through.

It owns the device, precision, schedule, evaluation, checkpoints, resume, metrics and progress; a method only
turns outputs into losses (and may update state after each step). Resume is exact on CPU: every source of
randomness in epoch e (data order, augmentation, a method's draws) is a function of (seed, e), and a
checkpoint is written at the end of every epoch, so a run killed at any point continues from the last finished
epoch and reaches the same weights as an uninterrupted run.

Data parallel (`nproc_per_node` > 1, or under torchrun): every process runs this same loop on its share of each
global batch (`batch_size` stays the global batch), gradients and logged losses are averaged across processes,
rank 0 alone evaluates (the numbers are exactly a single process's on the same weights) and writes the run
directory. See distill/distributed.py for why gradients are averaged by hand and what BatchNorm does.

Nothing non-finite is recorded: a NaN/inf loss (tracked on the device every step, read at each log point) or
weight (checked at each epoch's end) stops the run with a one-line GateFailed naming the epoch and step, before
the epoch's metrics or checkpoint are written, so the last good checkpoint stays as it was. The process writing
the run directory holds its lock (RunDir.locked) for the whole run.

Rank 0 also hands each metrics line to the experiment trackers chosen with `loggers` (distill/trackers.py:
TensorBoard, MLflow) after writing it to metrics.jsonl, which stays the record.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from okdpipe.cli_support import interruption
from okdpipe.config import (
    OPTIMIZER_KEYS,
    DistillConfig,
    arch_names,
    dump_yaml,
    student_archs,
    validate_params,
    with_method_defaults,
)
from okdpipe.contracts.data import DataSource
from okdpipe.datasets import DATASETS, make_loader
from okdpipe.datasets.load import check_options
from okdpipe.datasets.views import view_policy
from okdpipe.distill import distributed
from okdpipe.distill.checkpoint import LAST, PENDING, has_checkpoint, load_checkpoint, save_checkpoint
from okdpipe.distill.diagnose import chance_warning
from okdpipe.distill.distributed import Group
from okdpipe.distill.evaluate import calibration_sample, evaluate_run, recalibrate_bn
from okdpipe.distill.foreign_parts import of_stage
from okdpipe.distill.fused import FusedStudents
from okdpipe.distill.init_weights import initialise, summary_line
from okdpipe.distill.methods import METHODS, Method, StepContext
from okdpipe.distill.methods.base import Hparams
from okdpipe.distill.models import backbone_recipe, check_arch
from okdpipe.distill.models.base import registered_builder
from okdpipe.distill.models.contract import check_students
from okdpipe.distill.models.external import is_external
from okdpipe.distill.students import Students
from okdpipe.distill.trackers import Trackers, open_trackers, require
from okdpipe.errors import GateFailed, OkdpipeError, PluginFailed
from okdpipe.files import atomic_write_text, check_can_create_folder, loads_finite, recorded_path
from okdpipe.foreign import Foreign, ForeignBreach, blamed
from okdpipe.modelfile import non_finite_tensors
from okdpipe.plugins import loaded_spec
from okdpipe.run import RunDir, environment, now_iso

LOG_EVERY_STEPS = 50
BN_CALIBRATION_BATCHES = 20  # batches of training images used to recompute BN statistics of averaged models
# settings that cannot change the weights
# plugins: where the names come from, not how they train (a run recorded before its plug-ins were resolved to
# absolute paths and recorded when found as entry points resumes as before)
RESUME_MAY_CHANGE = ("device", "workers", "eval_batch_size", "loggers", "mlflow_uri", "plugins")


def resume_view(config: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint. data_dir and init are compared as absolute paths:
    runs record them so, and earlier runs recorded them as typed, relative to the folder they were started from."""
    kept = {key: value for key, value in config.items() if key not in RESUME_MAY_CHANGE}
    for key in ("data_dir", "init"):
        if isinstance(kept.get(key), str):
            kept[key] = recorded_path(kept[key])
    return kept


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise OkdpipeError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on GPU (BatchNorm stays fp32 under autocast); plain fp32 on CPU unless asked."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def lr_factor(step: int, cfg: DistillConfig, steps_per_epoch: int) -> float:
    """Linear warm-up, then cosine to 0, step decay at `milestones` (fractions of the run), or constant."""
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
    if cfg.schedule == "step":
        return cfg.lr_decay ** sum(step >= m * total for m in cfg.milestones)
    return 1.0


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def build_optimizer(cfg: DistillConfig, groups: list[dict]) -> torch.optim.Optimizer:
    for group in groups:
        group.setdefault("lr", cfg.lr)
        group["base_lr"] = group["lr"]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.optimizer == "nesterov"
    )


@dataclass
class Session:
    """Everything one run's loop works on."""

    cfg: DistillConfig
    run: RunDir
    device: torch.device
    students: Students
    method: Method
    optimizer: torch.optim.Optimizer
    extra_optimizers: list[torch.optim.Optimizer]
    train_loader: Any
    val_loader: Any
    test_loader: Any
    calib_loader: Any
    bundle: Any
    autocast: Any
    history: list[dict]
    forward: Any = None
    group: Group = field(default_factory=Group)
    trackers: Trackers = field(default_factory=Trackers)
    warned_at_chance: bool = False
    foreign: list[Foreign] = field(default_factory=list)  # what plug-ins or libraries provide (okdpipe/foreign.py)
    where: str = ""  # where the run is, for the line that blames a plug-in failing there

    def trained_parameters(self) -> list[torch.Tensor]:
        """Every parameter some optimiser steps: the ones whose gradients data parallelism averages."""
        optimizers = [self.optimizer, *self.extra_optimizers]
        return [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]


def check_config(cfg: DistillConfig) -> tuple[type[Method], Hparams, list[str]]:
    """Every check that needs neither data nor a run directory: method, its parameters, student count, backbones
    and whether the method can mix them, dataset name and the names of its options. `--dry-run`, the pipeline
    and fit run it first, so a bad config is refused before anything is read or written. Returns the method, its
    parameters, one arch per student."""
    method_cls = METHODS.get(cfg.method)
    count = cfg.students or method_cls.default_students
    archs = student_archs(cfg, count)
    for arch in dict.fromkeys(archs):
        check_arch(arch)
    method_cls.check_archs(cfg.method, archs)  # before the count: adding students would not help a refused mix
    if count < method_cls.min_students:
        raise OkdpipeError(f"--method {cfg.method} needs at least {method_cls.min_students} students, got {count}")
    hp = validate_params(method_cls.Params, cfg.method_params, cfg.method)
    if cfg.fused and not method_cls.fusable:
        raise OkdpipeError(f"--fused: method {cfg.method} needs per-student modules; train it without --fused")
    check_options(cfg.dataset, DATASETS.get(cfg.dataset), cfg.data_options)
    return method_cls, hp, archs


def check_training(cfg: DistillConfig) -> None:
    """check_config, and what only matters to a run about to train (not to select or export rebuilding a finished
    run elsewhere): the device, the process count and a warm-up that ends within the run."""
    check_config(cfg)
    if cfg.warmup_epochs > cfg.epochs:
        raise OkdpipeError(
            f"warmup_epochs {cfg.warmup_epochs:g} is longer than the run ({cfg.epochs} epochs): the learning rate "
            f"would never reach --lr; lower warmup_epochs or raise --epochs"
        )
    check_processes(cfg.nproc_per_node, resolve_device(cfg.device))


def check_processes(count: int, device: torch.device) -> None:
    """One GPU per process on CUDA, at least one core per process on CPU: more processes than that never start
    training (the process group waits for workers the machine cannot run), so they are refused up front."""
    if count <= 1 or distributed.launched_world_size() is not None:  # torchrun chose the world: its call
        return
    if device.type == "cuda" and count > torch.cuda.device_count():
        raise OkdpipeError(
            f"--nproc-per-node {count}: only {torch.cuda.device_count()} CUDA devices are visible (one per process); "
            f"pass at most {torch.cuda.device_count()}"
        )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if device.type == "cpu" and count > cores:
        raise OkdpipeError(
            f"--nproc-per-node {count}: this machine gives okdpipe {cores} CPU cores (one per process); "
            f"pass at most {cores}"
        )


def preflight(cfg: DistillConfig, run: RunDir, resume: bool) -> DistillConfig:
    """Every check fit makes before its first step, writing nothing: the config, device and process count, the
    run folder (writable, free, or resumable with the same settings), the data, a batch that fits the training
    split and memory, and the --init weights loaded into the students. `okdpipe distill --dry-run` runs it, so a
    dry run refuses what the real run refuses, with the same line. Returns the config as fit would train it."""
    cfg = checked_config(cfg)
    check_out(run)
    check_start(run, resume)
    s = build_session(cfg, run, Group(world_size=cfg.nproc_per_node))
    if resume:
        restore(s)
    elif cfg.init:
        initialise(s.students, cfg.init, s.method, cfg.init_partial)
    return cfg


def build_models(cfg: DistillConfig, spec, device: torch.device) -> tuple[Students, Method]:
    """The students and the method of `cfg`, initialised from its seed (select rebuilds them the same way)."""
    method_cls, hp, archs = check_config(cfg)
    count = len(archs)
    container = FusedStudents if cfg.fused else Students
    torch.manual_seed(cfg.seed)
    students = container(
        archs, count, spec.num_classes, spec.in_channels, layout=method_cls.layout, same_init=method_cls.same_init
    ).to(device)
    method = method_cls(students, hp, spec.num_classes).to(device)
    if cfg.channels_last:
        students.to(memory_format=torch.channels_last)
        students.channels_last = True
    return students, method


def build_session(cfg: DistillConfig, run: RunDir, group: Group = Group()) -> Session:
    """The session of this process; under data parallelism the training loader yields its share of each batch."""
    device = group.device(resolve_device(cfg.device))
    METHODS.get(cfg.method)  # an unknown method fails before the data is read
    bundle = DataSource.of_run(cfg).load()
    spec = bundle.spec
    students, method = build_models(cfg, spec, device)
    check_students(
        students,
        (spec.in_channels, *spec.input_size),
        features=method.needs_features,
        stages=method.needs_stages,
        eval_batch=min(cfg.eval_batch_size, max(len(bundle.val), len(bundle.test))),  # validation's largest batch
    )
    optimizer = build_optimizer(cfg, [{"params": list(students.parameters())}, *method.param_groups()])
    views = method.num_views(students.count)
    policy = view_policy("same" if cfg.view_augment == "same" else method.augment_policy, views)
    calibration = calibration_sample(
        bundle.train, BN_CALIBRATION_BATCHES * cfg.eval_batch_size, spec.num_classes, cfg.seed
    )
    loader = lambda split, train, v: make_loader(  # noqa: E731
        split,
        spec,
        batch_size=cfg.batch_size if train else cfg.eval_batch_size,
        train=train,
        device=device,
        seed=cfg.seed,
        views=v,
        num_workers=cfg.workers,
        policy=policy if train else None,
        shard=(group.rank, group.world_size) if train else (0, 1),
    )  # rank 0 evaluates whole splits
    session = Session(
        cfg,
        run,
        device,
        students,
        method,
        optimizer,
        method.extra_optimizers(),
        loader(bundle.train, True, views),
        loader(bundle.val, False, 1),
        loader(bundle.test, False, 1),
        loader(calibration.split, False, 1),
        bundle,
        autocast_for(device, cfg.precision),
        [],
        group=group,
    )
    session.forward = torch.compile(students) if cfg.compile else students
    session.foreign = of_stage(cfg.method, cfg.dataset, arch_names(cfg.arch))
    images, processes = len(bundle.train), group.world_size
    if images < cfg.batch_size and images % processes:  # an epoch is then one batch, shared out by the processes
        raise OkdpipeError(
            f"the training split ({images} images) is smaller than --batch-size {cfg.batch_size}, so an epoch is "
            f"one batch of {images}, which {processes} processes cannot share evenly; lower --batch-size"
        )
    check_memory(session)
    return session


def check_memory(s: Session) -> None:
    """Refuse a batch that cannot fit before training starts: an out-of-memory kill gives no message (and on
    CPU can take the machine with it). Training keeps every layer's output for the backward pass, so a step
    needs about (sum of the layer outputs of one image) x batch; measured within 25% on ResNet-8/20."""
    per_image, largest = activation_floats(s)
    width = 4 if s.autocast is contextlib.nullcontext else 2  # bytes per activation (fp32, or bf16 autocast)
    batch = s.cfg.batch_size // (s.group.world_size if s.device.type == "cuda" else 1)  # CPU ranks share RAM
    eval_batch = min(s.cfg.eval_batch_size, max(len(s.bundle.val), len(s.bundle.test)))
    need = max(per_image * batch, 2 * largest * eval_batch) * width
    free = available_bytes(s.device)
    if free is not None and need > free:
        raise OkdpipeError(
            f"--batch-size {s.cfg.batch_size} (--eval-batch-size {s.cfg.eval_batch_size}): a step "
            f"needs about {need / 2**30:.1f} GiB for activations, more than the "
            f"{free / 2**30:.1f} GiB available on {s.device}; lower the batch size"
        )


@torch.no_grad()
def activation_floats(s: Session) -> tuple[int, int]:
    """(sum, largest) of the output sizes of every leaf module of the students, for one image (every student's
    activations: each sees its own view or the shared one)."""
    sizes: list[int] = []
    record = lambda module, inputs, output: sizes.append(output.numel() if torch.is_tensor(output) else 0)  # noqa: E731
    leaves = [m for m in s.students.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(record) for m in leaves]
    was_training = s.students.training
    try:
        s.students.eval()
        count = s.method.num_views(s.students.count)
        views = torch.zeros(count, 1, s.bundle.spec.in_channels, *s.bundle.spec.input_size, device=s.device)
        s.students(views, features=s.method.needs_features, stages=s.method.needs_stages)
    finally:
        s.students.train(was_training)
        for hook in hooks:
            hook.remove()
    return sum(sizes), max(sizes, default=0)


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory a new allocation can use: free GPU memory, or on CPU the least of MemAvailable and the cgroup's
    (container's) remaining limit. None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    limits = [read_int("/proc/meminfo", "MemAvailable:", 1024)]
    limit, used = read_int("/sys/fs/cgroup/memory.max"), read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        limits.append(limit - used)
    known = [value for value in limits if value is not None]
    return min(known) if known else None


def read_int(path: str, label: str = "", unit: int = 1) -> Optional[int]:
    """The integer after `label` in a small /proc or /sys file ("max" and absent files are None)."""
    try:
        with open(path) as handle:
            text = handle.read()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(label):
            value = line[len(label) :].split()
            return int(value[0]) * unit if value and value[0].isdigit() else None
    return None


def train_epoch(s: Session, epoch: int, stop_after_steps: Optional[int]) -> Optional[dict]:
    """One epoch; returns its summary, or None when stopped early (tests simulate a kill this way)."""
    cfg, spe = s.cfg, len(s.train_loader)
    generator = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch))
    torch.manual_seed(epoch_seed(cfg.seed, epoch))
    s.students.train()
    s.method.train()
    sums: dict[str, torch.Tensor] = {}
    first_bad = torch.tensor(-1, device=s.device)  # step of the first non-finite loss, kept without a sync
    seen, started = 0, time.perf_counter()
    s.where = step_where(s, epoch * spe)
    with progress_bar(spe, f"epoch {epoch + 1}/{cfg.epochs}", s.group.is_main) as advance:
        for i, batch in enumerate(s.train_loader.epoch(epoch)):
            step = epoch * spe + i
            if stop_after_steps is not None and step >= stop_after_steps:
                return None
            ctx = StepContext(epoch + i / spe, step, cfg.epochs, spe, generator)
            losses = train_step(s, batch, ctx)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(losses["loss"].detach()), step, first_bad)
            for key, value in losses.items():
                sums[key] = sums.get(key, 0) + value.detach().float()
            seen += batch.labels.numel() * s.group.world_size  # equal shards: the global batch
            if (i + 1) % LOG_EVERY_STEPS == 0 or i + 1 == spe:
                stop_if_diverged(s, int(first_bad), "the loss")
                log_step(s, advance, s.group.mean_of(losses), epoch, i, seen / (time.perf_counter() - started))
            s.where = step_where(s, step + 1)  # reading the next batch is part of the next step
    seconds = time.perf_counter() - started
    return {
        "epoch": epoch + 1,
        "train": {k: float(v) / spe for k, v in s.group.mean_of(sums).items()},
        "seconds": seconds,
        "images_per_s": seen / seconds,
    }


def stop_if_diverged(s: Session, step: int, what: str) -> None:
    """A non-finite loss or weight ends the run before anything of its epoch is recorded (exit 1)."""
    if step < 0:
        return
    message = (
        f"training diverged: {what} became NaN or infinite {step_where(s, step)}; {kept_checkpoint(s)}; lower --lr "
        f"(now {s.cfg.lr:g}) or set --set grad_clip=1.0"
    )
    if s.group.is_main:
        s.run.update_manifest(status="diverged", error=message)
    raise GateFailed(message)


def step_where(s: Session, step: int) -> str:
    """Step `step` (0-based, counted over the run) as the messages name it."""
    spe = len(s.train_loader)
    return f"at epoch {step // spe + 1}, step {step + 1} (of {s.cfg.epochs * spe})"


def kept_checkpoint(s: Session) -> str:
    """What a run that stops now leaves to --resume from."""
    if not s.history:
        return "no epoch had finished, so there is no checkpoint"
    return f"the last good checkpoint (epoch {len(s.history)}) is kept"


@contextlib.contextmanager
def failure_recorded(s: Session):
    """A plug-in failing mid-run is recorded in the manifest (status failed) before the command reports it."""
    try:
        yield
    except PluginFailed as exc:
        if s.group.is_main and s.run.manifest_path.is_file():
            s.run.update_manifest(status="failed", error=str(exc))
        raise


def stop_if_non_finite(s: Session, epoch: int, record: dict[str, Any], split: str) -> None:
    """Weights can stay finite while the logits overflow (a huge --lr), or PreciseBN can make BN statistics
    infinite: a non-finite figure (a loss, or an accuracy of a NaN model) is divergence, never a metric to record."""
    bad = first_non_finite(record) or first_nonfinite_tensor([s.students, s.method])
    if bad is not None:
        stop_if_diverged(s, (epoch + 1) * len(s.train_loader) - 1, f"the {split} figure or weight {bad}")


def first_non_finite(value: Any, where: str = "") -> Optional[str]:
    """The dotted path of the first NaN or infinite float in nested dicts and lists, else None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else where or "value"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, item in items:
        found = first_non_finite(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def first_nonfinite_tensor(modules) -> Optional[str]:
    """The name of the first parameter or floating-point buffer holding a NaN or inf (one sync), else None."""
    bad = non_finite_tensors(pair for m in modules for pair in [*m.named_parameters(), *m.named_buffers()])
    return bad[0] if bad else None


def log_step(s: Session, advance, losses: dict[str, torch.Tensor], epoch: int, i: int, rate: float) -> None:
    """Progress and a metrics line, from rank 0 (`losses` are already averaged over ranks)."""
    if not s.group.is_main:
        return
    advance(i + 1, f"loss {float(losses['loss'].detach()):.4f}  {rate:,.0f} img/s")
    record = {
        "kind": "step",
        "epoch": epoch + 1,
        "step": epoch * len(s.train_loader) + i + 1,
        "lr": s.optimizer.param_groups[0]["lr"],
        "images_per_s": rate,
        **{k: float(v.detach()) for k, v in losses.items()},
    }
    s.run.append_metrics(record)
    s.trackers.log_step(record)


def train_step(s: Session, batch, ctx: StepContext) -> dict[str, torch.Tensor]:
    factor = lr_factor(ctx.step, s.cfg, ctx.steps_per_epoch)
    for group in s.optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    with s.autocast():
        out = s.forward(batch.views, features=s.method.needs_features, stages=s.method.needs_stages)
        losses = s.method.step(batch.views, batch.labels, out, ctx)
    check_losses(losses)
    optimizers = [s.optimizer, *s.extra_optimizers]
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    s.group.average_gradients(s.trained_parameters())  # before clipping: clip the global batch's gradient
    if s.cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(
            [p for group in s.optimizer.param_groups for p in group["params"]], s.cfg.grad_clip
        )
    for optimizer in optimizers:
        optimizer.step()
    s.method.after_step(ctx)
    return losses


def check_losses(losses: Any) -> None:
    """What a method's step() returns is backpropagated, summed and logged: a dict of scalar tensors, its 'loss' a
    float attached to the graph. Anything else would fail deep in autograd or in the log line."""
    if not isinstance(losses, dict) or not torch.is_tensor(losses.get("loss")):
        got = f"a dict with keys {sorted(map(str, losses))}" if isinstance(losses, dict) else type(losses).__name__
        raise ForeignBreach("method", f"step() returned {got}, expected a dict holding a scalar 'loss' tensor")
    for key, value in losses.items():
        if not torch.is_tensor(value) or value.dim() != 0:
            raise ForeignBreach("method", f"step() returned {key!r} as {described(value)}, expected a scalar")
    if not losses["loss"].is_floating_point() or not losses["loss"].requires_grad:
        raise ForeignBreach("method", f"step() returned a 'loss' without a gradient ({described(losses['loss'])})")


def described(value: Any) -> str:
    if torch.is_tensor(value):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


@contextlib.contextmanager
def progress_bar(total: int, label: str, shown: bool = True):
    """A rich progress bar on a terminal; silent in logs (the epoch summary line is printed either way)."""
    if not (shown and sys.stderr.isatty()):
        yield lambda done, text: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(label, total=total, info="")
        yield lambda done, text: bar.update(task, completed=done, info=text)


def checkpoint_state(s: Session, epoch: int) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "config": s.cfg.model_dump(mode="json"),
        "students": s.students.state_dict(),
        "method": s.method.state_dict(),
        "optimizer": s.optimizer.state_dict(),
        "extra_optimizers": [o.state_dict() for o in s.extra_optimizers],
        "history": s.history,
    }


def restore(s: Session) -> int:
    """Load the last checkpoint into the session; returns the number of finished epochs."""
    state = load_checkpoint(s.run)
    saved, current = resume_view(state["config"]), resume_view(s.cfg.model_dump(mode="json"))
    changed = sorted(k for k in saved if saved[k] != current.get(k))
    if changed:
        raise OkdpipeError(
            f"--resume: the config differs from the checkpoint's in {', '.join(changed)[:200]}; "
            "resume with the same settings or start a new --out"
        )
    load_states(s, state)
    s.history = list(state["history"])
    return int(state["epoch"])


def load_states(s: Session, state: dict[str, Any]) -> None:
    """Students, method and optimisers from a checkpoint; one that does not fit them is a one-line error."""
    targets = [
        (s.students, state["students"]),
        (s.method, state["method"]),
        (s.optimizer, state["optimizer"]),
        *zip(s.extra_optimizers, state["extra_optimizers"]),
    ]
    if len(state["extra_optimizers"]) != len(s.extra_optimizers):
        raise OkdpipeError(
            f"--resume: the checkpoint holds {len(state['extra_optimizers'])} extra optimisers, "
            f"the method has {len(s.extra_optimizers)}; it is damaged or from another method"
        )
    try:
        for target, saved in targets:
            target.load_state_dict(saved)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise OkdpipeError(
            f"--resume: the checkpoint does not fit this run's models ({first_line}); it is damaged "
            "or from another version"
        ) from None


def trim_metrics(run: RunDir, finished_epochs: int) -> None:
    """Drop metric lines written after the last checkpoint (a killed epoch is replayed on resume), and any torn
    or foreign line (a kill or a full disk in the middle of a write)."""
    if not run.metrics_path.is_file():
        return
    try:
        lines = run.metrics_path.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise OkdpipeError(f"{run.metrics_path}: cannot read ({exc.strerror})") from None
    kept = [line for line in lines if metrics_epoch(line) <= finished_epochs]
    atomic_write_text(run.metrics_path, "".join(line + "\n" for line in kept))


def metrics_epoch(line: str) -> float:
    """The epoch of one metrics line; infinity (never kept) for a line that is not a metrics record."""
    try:
        record = loads_finite(line)
    except ValueError:
        return math.inf
    epoch = record.get("epoch") if isinstance(record, dict) else None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else math.inf


def fit(
    cfg: DistillConfig, run: RunDir, *, resume: bool = False, stop_after_steps: Optional[int] = None, echo=print
) -> dict[str, Any]:
    """Train `cfg` into `run`; returns the final summary (also written to the manifest).

    With nproc_per_node > 1 this process starts that many workers, each running `fit`, and returns rank 0's
    summary; under torchrun (or inside a running process group) it is one of the workers. The process that
    writes the run directory holds its lock throughout: a second run into the same directory fails at once."""
    cfg = checked_config(cfg)
    if distributed.holds_run_lock():
        check_out(run)
    created = not run.root.exists()
    with run.locked() if distributed.holds_run_lock() else contextlib.nullcontext():
        try:
            return fit_locked(cfg, run, resume, stop_after_steps, echo)
        except OkdpipeError as exc:
            if created and not isinstance(exc, GateFailed):
                forget_unstarted(run)  # a refused start (bad data...) leaves no folder behind
            raise
        except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP: keep what resumes and say it was interrupted
            if created:
                forget_unstarted(run)
            if run.manifest_path.is_file():
                run.update_manifest(status="interrupted", error=f"interrupted ({interruption(exc)})")
            raise


def forget_unstarted(run: RunDir) -> None:
    """Remove a run folder this command created when it holds no checkpoint yet: nothing in it could resume."""
    if not any(run.checkpoints.glob("*")):
        shutil.rmtree(run.root, ignore_errors=True)


def fit_locked(cfg: DistillConfig, run: RunDir, resume: bool, stop_after_steps: Optional[int], echo) -> dict[str, Any]:
    """fit() once the run directory is held."""
    check_start(run, resume)
    if distributed.needs_launch(cfg.nproc_per_node):
        return distributed.launch(
            fit,
            cfg.nproc_per_node,
            cfg,
            run,
            resume=resume,
            stop_after_steps=stop_after_steps,
            echo=distributed.picklable(echo, print),
        )
    with distributed.joined(resolve_device(cfg.device)) as group:
        return train(cfg, run, group, resume, stop_after_steps, echo if group.is_main else quiet)[1]


def check_out(run: RunDir) -> None:
    """Before anything is created: a run folder that can be made, and no FIFO or device where a run file goes."""
    check_can_create_folder(run.root, "--out")
    run.check_files(run.checkpoints / LAST)


def checked_config(cfg: DistillConfig) -> DistillConfig:
    """The config as the run trains it (its method's and backbone's defaults, the plug-ins it uses), after every
    check that needs neither data nor the run folder."""
    cfg = with_method_defaults_of(with_world_size(cfg))
    require(cfg.loggers)
    check_training(cfg)
    return with_used_plugins(cfg)


def check_before_announcing(cfg: DistillConfig, run: RunDir, resume: bool) -> None:
    """What fit refuses at once, checked before `okdpipe distill` says it is training or resuming: the config, the
    run folder, and a checkpoint there or not as --resume needs. Nothing is written, so a save stopped between its
    steps is not settled here (the run making it may still be alive; fit settles it holding the run's lock): a
    pending checkpoint counts only towards --resume, where settling may make it the checkpoint."""
    checked_config(cfg)
    check_out(run)
    last, pending = run.checkpoints / LAST, run.checkpoints / PENDING
    refuse_start(run, resume, last.is_file() or (resume and pending.is_file()))


def check_start(run: RunDir, resume: bool) -> None:
    """A new run needs a folder without a checkpoint; --resume needs one with."""
    refuse_start(run, resume, has_checkpoint(run))


def refuse_start(run: RunDir, resume: bool, found: bool) -> None:
    if found and not resume:
        raise OkdpipeError(f"{run.root} already holds a run; pass --resume to continue it or choose another --out")
    if resume and not found:
        raise OkdpipeError(
            f"--resume: {run.root} has no checkpoint to resume from (none is written before the first epoch ends); "
            "run the same command without --resume"
        )


def with_used_plugins(cfg: DistillConfig) -> DistillConfig:
    """`cfg` with every plug-in that provides its method, dataset or a backbone listed in `plugins`: one found as
    an installed entry point was never named, yet select, export and a resume elsewhere must load it too."""
    objects = [METHODS.get(cfg.method), DATASETS.get(cfg.dataset)]
    objects += [registered_builder(arch) for arch in dict.fromkeys(arch_names(cfg.arch)) if not is_external(arch)]
    used = [spec for spec in map(loaded_spec, objects) if spec]
    plugins = list(dict.fromkeys([*cfg.plugins, *used]))
    return cfg if plugins == cfg.plugins else cfg.model_copy(update={"plugins": plugins})


def with_method_defaults_of(cfg: DistillConfig) -> DistillConfig:
    """`cfg` with its method's optimiser defaults (`Method.optimizer_defaults`, e.g. FFSD's Nesterov and weight
    decay) and, beneath those, its backbone's recipe (`backbone_recipe`, e.g. MobileNetV2's lr and warm-up)
    wherever the config file, flags and --set left a key unset."""
    return with_method_defaults(cfg, method_optimizer_defaults(cfg.method), backbone_recipe(cfg.arch))


def method_optimizer_defaults(method: str) -> dict[str, Any]:
    return dict(getattr(METHODS.get(method), "optimizer_defaults", {}))


def with_world_size(cfg: DistillConfig) -> DistillConfig:
    """`cfg` with nproc_per_node = the world size a launcher (torchrun) already chose, checked against the
    batch size: every process takes an equal share of each global batch."""
    launched = distributed.launched_world_size()
    if launched is not None and cfg.nproc_per_node not in (1, launched):
        raise OkdpipeError(
            f"--nproc-per-node {cfg.nproc_per_node} disagrees with the launcher's WORLD_SIZE "
            f"{launched}; drop --nproc-per-node under torchrun"
        )
    world_size = launched or cfg.nproc_per_node
    if cfg.batch_size % world_size:
        raise OkdpipeError(
            f"--batch-size {cfg.batch_size} is not divisible by {world_size} processes; "
            f"use a multiple of {world_size} (it is the global batch, split evenly)"
        )
    return cfg if world_size == cfg.nproc_per_node else cfg.model_copy(update={"nproc_per_node": world_size})


def quiet(_: str) -> None:
    """The console of ranks other than 0."""


def train(
    cfg: DistillConfig, run: RunDir, group: Group, resume: bool, stop_after_steps: Optional[int], echo
) -> tuple[Session, dict[str, Any]]:
    """The loop of one process (of `group`); returns its session and the final summary."""
    if group.is_main:
        run.prepare()
    configure_determinism()
    s = build_session(cfg, run, group)
    if len(s.bundle.val) == 0:  # every choice (best epoch, select, export's INT8 check) is made on validation
        raise OkdpipeError(
            f"{cfg.dataset} has no validation images (--val-split 0 and no val split of its own); "
            "pass e.g. --val-split 0.1"
        )
    start = restore(s) if resume else 0
    initial = initialise(s.students, cfg.init, s.method, cfg.init_partial) if cfg.init and not resume else None
    group.copy_from_main(s.students, s.method)
    group.barrier()  # every rank has read the checkpoint and the manifest before rank 0 writes them
    if group.is_main:
        trim_metrics(run, start)
        atomic_write_text(run.config_path, dump_yaml(cfg))
        run.update_manifest(**manifest_header(s), **({"init": initial} if initial else {}))
        if initial:
            echo(summary_line(initial))
        s.trackers = open_trackers(
            run, s.cfg.model_dump(mode="json"), dump_yaml(cfg), cfg.loggers, cfg.mlflow_uri, start * len(s.train_loader)
        )
    with s.trackers, failure_recorded(s), blamed(s.foreign, lambda: s.where, lambda: f"; {kept_checkpoint(s)}"):
        for epoch in range(start, cfg.epochs):
            summary = train_epoch(s, epoch, stop_after_steps)
            if summary is None:
                return s, {"stopped": True}
            group.average_buffers(s.students, s.method)
            bad = first_nonfinite_tensor([s.students, s.method])
            if bad is not None:
                stop_if_diverged(s, (epoch + 1) * len(s.train_loader) - 1, f"the weight {bad}")
            if cfg.precise_bn:  # every rank alike: the calibration sample is not sharded
                s.where = f"in BatchNorm recalibration (precise_bn) after epoch {epoch + 1}"
                started = time.perf_counter()
                recalibrate_bn(s.students, s.calib_loader.epoch(0), BN_CALIBRATION_BATCHES, forward=on_view_0)
                summary["precise_bn_seconds"] = time.perf_counter() - started  # its cost beside the epoch's "seconds"
            s.where = f"in validation after epoch {epoch + 1}"
            summary["val"] = evaluate(s, s.val_loader)
            stop_if_non_finite(s, epoch, summary, "validation")
            s.history.append(summary)
            if group.is_main:
                record_epoch(s, summary)
            echo(epoch_line(summary, cfg.epochs))
            warn_at_chance(s, echo)
        return s, finish(s)


def on_view_0(students, batch) -> None:
    """All students on the batch's first view (the shared trunk once): how precise_bn runs the students."""
    students(batch.views[:1])


def warn_at_chance(s: Session, echo) -> None:
    """Once per run: validation at chance while the training loss falls (distill/diagnose.py)."""
    if s.warned_at_chance:
        return
    line = chance_warning(s.history, s.bundle.spec.num_classes, len(s.bundle.val), s.cfg)
    if line:
        echo(line)
        s.warned_at_chance = True


def record_epoch(s: Session, summary: dict[str, Any]) -> None:
    s.run.append_metrics({"kind": "epoch", **summary})
    s.trackers.log_epoch(summary, summary["epoch"] * len(s.train_loader))
    save_checkpoint(s.run, checkpoint_state(s, summary["epoch"]))
    s.run.update_manifest(epochs=s.history, status="training")


def evaluate(s: Session, loader) -> dict[str, dict[str, float]]:
    """Rank 0 measures the whole split (exactly a single process's numbers); every rank gets the result."""
    if not s.group.is_main:
        return s.group.from_main(None)
    calibrate = lambda model: recalibrate_bn(model, s.calib_loader.epoch(0), BN_CALIBRATION_BATCHES)  # noqa: E731
    return s.group.from_main(evaluate_run(s.students, s.method, loader.epoch(0), s.autocast, calibrate))


def configure_determinism() -> None:
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def finish(s: Session) -> dict[str, Any]:
    """Measure every model on the test split once, at the end; nothing is chosen with these numbers."""
    s.where = "in the final test evaluation"
    test = evaluate(s, s.test_loader)
    stop_if_non_finite(s, s.cfg.epochs - 1, {"test": test}, "test")
    if s.group.is_main:
        s.run.update_manifest(test=test, status="finished", finished=now_iso())
        s.trackers.attach(s.run)
    return {"val": s.history[-1]["val"], "test": test}


def manifest_header(s: Session) -> dict[str, Any]:
    spec = s.bundle.spec
    return {
        "stage": "distill",
        "created": s.run.read_manifest().get("created", now_iso()),
        "environment": environment(),
        "device": str(s.device),
        "processes": s.group.world_size,
        "config": s.cfg.model_dump(mode="json"),
        "optimizer": {
            **{k: getattr(s.cfg, k) for k in OPTIMIZER_KEYS},
            "method_defaults": method_optimizer_defaults(s.cfg.method),
            "backbone_recipe": backbone_recipe(s.cfg.arch),
        },
        "students": {
            "count": s.students.count,
            "layout": s.students.layout,
            "arch": s.cfg.arch,
            "archs": s.students.archs,  # student i's architecture
            "method_ships": s.method.ships,
        },
        "dataset": {
            "name": spec.name,
            "source": s.bundle.source,
            "fingerprint": s.bundle.fingerprint,
            "num_classes": spec.num_classes,
            "labels": list(spec.labels),
            "in_channels": spec.in_channels,
            "input_size": list(spec.input_size),
            "mean": list(spec.mean),
            "std": list(spec.std),
            "train": len(s.bundle.train),
            "val": len(s.bundle.val),
            "test": len(s.bundle.test),
        },
    }


def epoch_line(summary: dict, epochs: int) -> str:
    val = summary["val"]
    students = [v["top1"] for k, v in val.items() if k.startswith("student:")]
    extras = "  ".join(f"{k} {v['top1']:.2%}" for k, v in val.items() if not k.startswith("student:"))
    return (
        f"epoch {summary['epoch']}/{epochs}  loss {summary['train']['loss']:.4f}  "
        f"val best student {max(students):.2%}  {extras}  ({summary['images_per_s']:,.0f} img/s)"
    )
