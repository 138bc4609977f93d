"""Training throughput of N same-architecture students: reference-style loop vs okdpipe's loop vs fused.

    python benchmarks/train_throughput.py --arch resnet32 --students 1 2 3 4 --batch-size 128 --steps 50 \
        --device cuda --input 32x32x3 --channels-last --compile

Paths, each with DML's loss for N >= 2 (vanilla for N = 1):
- reference: as the papers' code does it -- one model and one optimizer per student, a Python loop of separate
  forward, loss, backward and optimizer step; fp32, contiguous; batches from a CPU DataLoader (per-sample
  collate, normalised on the CPU, copied to the device every step).
- loop:  okdpipe's `Students` through the real trainer (`build_session` + `train_step`): one summed loss, one
  backward, one optimizer; batches augmented on the device; --precision/--channels-last/--compile apply.
- fused: the same trainer step on `FusedStudents` (one grouped network).
Images/s counts dataset images (every student sees each); MFU = 2*3*MACs (forward + backward) per image per
student against a measured matmul peak of the device in the step's precision. On CPU it also times every
registered method's step (resnet8, a few steps) against N vanilla students. Prints JSON lines, then Markdown.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from okdpipe.config import DistillConfig
from okdpipe.distill.fused import FusedStudents
from okdpipe.distill.losses import kd
from okdpipe.distill.methods import METHODS, StepContext
from okdpipe.distill.models import count_macs, create_model
from okdpipe.distill.trainer import Session, build_optimizer, build_session, train_step
from okdpipe.run import RunDir

PATHS = ("reference", "loop", "fused")
METHOD_STUDENTS = 3  # FFSD needs 3, OKDPH takes at most 4
DML_TEMPERATURE = 3.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet32")
    parser.add_argument("--students", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path (after --warmup steps)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed blocks of --steps per path; the fastest counts (shared machines are noisy)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--input", default="32x32x3", help="HxWxC of the (synthetic) images; H = W")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="loop/fused paths: auto = bf16 autocast on cuda, fp32 on cpu",
    )
    parser.add_argument("--channels-last", action="store_true", help="loop/fused paths")
    parser.add_argument("--compile", action="store_true", help="torch.compile the loop/fused students")
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="loop/fused paths: deterministic algorithms, no cudnn.benchmark, as fit() sets them",
    )
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="process: CPU time of this process (use with --threads 1 on a shared CPU)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--method-steps", type=int, default=3, help="CPU only: timed steps per method; 0 = skip")
    return parser.parse_args()


def parse_input(text: str) -> tuple[int, int]:
    """'32x32x3' -> (size 32, channels 3); the synthetic dataset is square."""
    height, width, channels = (int(part) for part in text.lower().split("x"))
    if height != width:
        raise SystemExit(f"--input {text}: the synthetic images are square; use HxHxC")
    return height, channels


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


@dataclass
class Timer:
    """Runs `warmup` untimed steps, then `repeats` blocks of `steps`; the fastest block counts (shared machines
    are noisy). clock "process" counts this process's CPU time: with --threads 1 on a CPU that other people
    share, it measures the work done rather than the waiting."""

    device: torch.device
    warmup: int
    steps: int
    repeats: int = 1
    clock: Callable[[], float] = time.perf_counter

    @property
    def batches(self) -> int:
        return self.warmup + self.steps * self.repeats

    def seconds(self, step: Callable[[], None]) -> float:
        """Seconds per step; the device is synchronised only around each timed block, never inside a step."""
        for _ in range(self.warmup):
            step()
        blocks = []
        for _ in range(self.repeats):
            synchronize(self.device)
            started = self.clock()
            for _ in range(self.steps):
                step()
            synchronize(self.device)
            blocks.append((self.clock() - started) / self.steps)
        return min(blocks)


def path_timer(args: argparse.Namespace) -> Timer:
    return Timer(torch.device(args.device), args.warmup, args.steps, args.repeats, CLOCKS[args.clock])


def distill_config(args: argparse.Namespace, method: str, students: int, arch: str, steps: int) -> DistillConfig:
    """One epoch of synthetic data exactly long enough for `steps` batches."""
    size, channels = parse_input(args.input)
    options = dict(
        num_classes=args.classes, size=size, channels=channels, n_train=args.batch_size * steps, n_test=args.batch_size
    )
    return DistillConfig(
        method=method,
        arch=arch,
        students=students,
        dataset="synthetic",
        data_options=options,
        val_split=0.0,
        epochs=1,
        batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        schedule="constant",
        lr=0.05,
        device=args.device,
        precision=args.precision,
        channels_last=args.channels_last,
        compile=args.compile,
    )


def use_fused(session: Session) -> None:
    """Swap the session's students for the same students fused, with a fresh method and optimizer."""
    fused = FusedStudents.from_students(session.students)
    method = type(session.method)(fused, session.method.hp, session.method.num_classes).to(session.device)
    session.students, session.method = fused, method
    session.optimizer = build_optimizer(session.cfg, [{"params": list(fused.parameters())}, *method.param_groups()])
    session.forward = torch.compile(fused) if session.cfg.compile else fused


def trainer_step_seconds(cfg: DistillConfig, fused: bool, timer: Timer, deterministic: bool = False) -> float:
    """Seconds per `train_step` of the real trainer, batches from its own loader."""
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    with tempfile.TemporaryDirectory() as root:
        session = build_session(cfg, RunDir(root))
        if fused:
            use_fused(session)
        session.students.train()
        batches = session.train_loader.epoch(0)
        generator = torch.Generator().manual_seed(0)
        spe = len(session.train_loader)
        counter = iter(range(spe))

        def step() -> None:
            index = next(counter)
            train_step(session, next(batches), StepContext(index / spe, index, 1, spe, generator))

        return timer.seconds(step)


def reference_loss(logits: list[torch.Tensor], labels: torch.Tensor, i: int) -> torch.Tensor:
    """DML's L_i as the papers' code computes it (CE + mean KD from the detached peers); CE alone for N = 1."""
    loss = F.cross_entropy(logits[i], labels)
    peers = [kd(logits[i], z.detach(), DML_TEMPERATURE) for j, z in enumerate(logits) if j != i]
    return loss + torch.stack(peers).mean() if peers else loss


def reference_step_seconds(args: argparse.Namespace, students: int) -> float:
    """Per student: forward, loss, backward, optimizer step, in a Python loop; fp32; CPU DataLoader batches."""
    size, channels = parse_input(args.input)
    device, timer = torch.device(args.device), path_timer(args)
    count = args.batch_size * timer.batches
    images = torch.randint(0, 256, (count, channels, size, size), dtype=torch.uint8)
    labels = torch.randint(0, args.classes, (count,))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels), batch_size=args.batch_size, shuffle=True, drop_last=True
    )
    models = [create_model(args.arch, args.classes, channels).to(device).train() for _ in range(students)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) for m in models]
    batches = iter(loader)

    def step() -> None:
        pixels, target = next(batches)
        x = ((pixels.float() / 255 - 0.5) / 0.25).to(device)
        target = target.to(device)
        logits = [model(x) for model in models]
        for i, optimizer in enumerate(optimizers):
            optimizer.zero_grad(set_to_none=True)
            reference_loss(logits, target, i).backward()
            optimizer.step()

    return timer.seconds(step)


def matmul_peak_flops(args: argparse.Namespace, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul, on the same clock as the steps: the ceiling MFU is measured against.

    On CPU it is a relative yardstick only: oneDNN's 3x3 convolutions can outrun MKL's sgemm (on this project's
    AMD CPU they reach ~2x its FLOP/s), so CPU MFU may exceed 100%. On a GPU, bf16 tensor-core matmul is a real
    ceiling."""
    device = torch.device(args.device)
    side = 8192 if device.type == "cuda" else 1024
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    seconds = Timer(device, 2, 10, max(args.repeats, 3), CLOCKS[args.clock]).seconds(lambda: torch.mm(a, b))
    return 2 * side**3 / seconds


def step_precision(args: argparse.Namespace, path: str) -> torch.dtype:
    if path == "reference" or args.precision == "fp32" or (args.precision == "auto" and args.device == "cpu"):
        return torch.float32
    return torch.bfloat16


def path_seconds(args: argparse.Namespace, path: str, students: int) -> float:
    if path == "reference":
        return reference_step_seconds(args, students)
    method = "dml" if students >= 2 else "vanilla"
    timer = path_timer(args)
    cfg = distill_config(args, method, students, args.arch, timer.batches)
    return trainer_step_seconds(cfg, path == "fused", timer, args.deterministic)


def throughput_rows(args: argparse.Namespace) -> list[dict]:
    size, channels = parse_input(args.input)
    macs = count_macs(create_model(args.arch, args.classes, channels), torch.zeros(1, channels, size, size))
    peaks = {
        dtype: matmul_peak_flops(args, dtype)
        for dtype in (torch.float32, torch.bfloat16)
        if dtype == torch.float32 or args.device == "cuda"
    }
    rows = []
    for students in args.students:
        for path in args.paths:
            seconds = path_seconds(args, path, students)
            images_per_s = args.batch_size / seconds
            peak = peaks[step_precision(args, path)]
            rows.append(
                {
                    "kind": "throughput",
                    "path": path,
                    "students": students,
                    "arch": args.arch,
                    "device": args.device,
                    "batch_size": args.batch_size,
                    "input": args.input,
                    "clock": args.clock,
                    "threads": torch.get_num_threads(),
                    "compile": args.compile,
                    "channels_last": args.channels_last and path != "reference",
                    "precision": str(step_precision(args, path)).removeprefix("torch."),
                    "step_ms": round(1000 * seconds, 2),
                    "images_per_s": round(images_per_s, 1),
                    "student_images_per_s": round(students * images_per_s, 1),
                    "mfu": round(6 * macs * students * images_per_s / peak, 4),
                    "macs_per_image": macs,
                    "peak_tflops": round(peak / 1e12, 3),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def method_rows(args: argparse.Namespace) -> list[dict]:
    """Every registered method's trainer step on resnet8 with METHOD_STUDENTS students, vs vanilla's."""
    rows = []
    for name in ["vanilla", *sorted(n for n in METHODS.names() if n != "vanilla")]:
        timer = Timer(torch.device(args.device), 1, args.method_steps, args.repeats, CLOCKS[args.clock])
        cfg = distill_config(args, name, METHOD_STUDENTS, "resnet8", timer.batches)
        seconds = trainer_step_seconds(cfg, False, timer)
        rows.append(
            {
                "kind": "method",
                "method": name,
                "students": METHOD_STUDENTS,
                "arch": "resnet8",
                "step_ms": round(1000 * seconds, 2),
                "vs_vanilla": round(seconds / (rows[0]["step_ms"] / 1000), 2) if rows else 1.0,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(throughput: list[dict], methods: list[dict]) -> str:
    reference = {r["students"]: r["step_ms"] for r in throughput if r["path"] == "reference"}
    lines = [
        "| path | N | precision | step ms | dataset img/s | student img/s | MFU | speed-up vs reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in throughput:
        speedup = f"{reference[r['students']] / r['step_ms']:.2f}x" if r["students"] in reference else "-"
        lines.append(
            f"| {r['path']} | {r['students']} | {r['precision']} | {r['step_ms']:.1f} | "
            f"{r['images_per_s']:,.0f} | {r['student_images_per_s']:,.0f} | {r['mfu']:.2%} | {speedup} |"
        )
    if methods:
        lines += ["", f"| method ({METHOD_STUDENTS} x resnet8) | step ms | vs vanilla |", "|---|---|---|"]
        lines += [f"| {r['method']} | {r['step_ms']:.1f} | {r['vs_vanilla']:.2f}x |" for r in methods]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    throughput = throughput_rows(args)
    methods = method_rows(args) if args.device == "cpu" and args.method_steps > 0 else []
    print()
    print(markdown(throughput, methods))


if __name__ == "__main__":
    main()
