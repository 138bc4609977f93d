"""The GPU figures of issue 18 in one time-boxed command: training throughput and full-size method comparison.

    python benchmarks/gpu_suite.py --out results/gpu-suite --data-dir /usr/share/datasets/fashion-mnist
    python benchmarks/gpu_suite.py --out /tmp/smoke --smoke      # every step at toy size on CPU (CI runs it)

GPU time comes in short loans, so every step runs in a child process of its own with a time box (a step over
its box is killed, with its whole process group, and recorded as "timed out"; the others still run), and every
finished row is appended to DIR/rows/STEP.jsonl as soon as it exists, so a kill leaves what finished.
DIR/results.json and DIR/summary.md are rewritten from those rows after every step (and by `--summary-only`).

Steps (the measuring code is train_throughput.py's and compare_methods.py's, reused, not copied):
- peak: a large matmul's FLOP/s, the MFU denominator (bf16 on CUDA, fp32 on CPU).
- reference: the papers' loop style (one model and optimiser per student, per-student forward/backward, fp32,
  batches from a CPU DataLoader): DML with 1-4 students, and OKDPH's official-code step with 4.
- loop, fused (eager, compile, cudagraphs): okdpipe's `train_step` on `Students` or `FusedStudents`, bf16 and
  channels-last on CUDA; "compile" is `torch.compile` of the students, "cudagraphs" the same in mode
  "reduce-overhead" (CUDA graphs; skipped on CPU). Configurations run most important first: 4 students + the
  OKDPH hybrid, then DML with 4, 3, 2 and vanilla with 1 (a box that runs out keeps the ones before).
- compare: vanilla, DML, PCL and OKDPH through the real `okdpipe distill` + `okdpipe select` on the full
  Fashion-MNIST training split (54,000 images after the 10% validation hold-out), ResNet-20, seeds 0-2,
  seed-major (every method's seed 0 first), several runs at once on the one GPU; the shipped model's test top-1.

Dataset images/s counts each image once however many students see it; MFU = 6 * MACs per image * networks *
images/s / peak, where networks = students (+1 for OKDPH's hybrid, which also runs forward and backward).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: its sibling benchmark modules

FASHION_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# (method, students), most important first: the goal is stated for 4 x ResNet-32 + the OKDPH hybrid.
CONFIGS = (("okdph", 4), ("dml", 4), ("dml", 3), ("dml", 2), ("vanilla", 1))
COMPARE_METHODS = ("vanilla", "dml", "pcl", "okdph")


@dataclasses.dataclass(frozen=True)
class Size:
    """What one run of the suite measures: the GPU figures, or the same code at toy size for CI."""

    arch: str
    batch_size: int
    input: str
    classes: int
    warmup: int
    compiled_warmup: int  # CUDA graphs record and compile on their first calls
    steps: int
    repeats: int
    compile_backend: str  # "inductor" on the GPU; smoke uses "eager" (dynamo only: seconds, not minutes)
    compare_arch: str
    compare_epochs: int
    compare_seeds: tuple[int, ...]
    compare_batch: int
    compare_parallel: int


GPU = Size("resnet32", 128, "32x32x3", 100, 5, 15, 30, 3, "inductor", "resnet20", 3, (0, 1, 2), 128, 4)
SMOKE = Size("resnet8", 8, "8x8x3", 10, 1, 1, 1, 1, "eager", "resnet8", 1, (0,), 16, 2)

# Step name -> share of --budget-s; compare also gets whatever earlier steps left unused.
SHARES = {
    "peak": 0.03,
    "reference": 0.07,
    "loop-eager": 0.05,
    "fused-eager": 0.05,
    "loop-compile": 0.09,
    "fused-compile": 0.09,
    "loop-cudagraphs": 0.09,
    "fused-cudagraphs": 0.09,
    "compare": 0.44,
}
MIN_BOX_S = 30.0  # a child's imports alone take seconds (more on a busy CI machine)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (results.json, summary.md, rows/)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU: checks the code, not the speed")
    parser.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of all steps together")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("/usr/share/datasets/fashion-mnist"),
        help="Fashion-MNIST IDX .gz files (smoke uses synthetic images of that shape)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--only", help="comma-separated steps to run (default: all); finished rows of the others stay in the summary"
    )
    parser.add_argument("--compare-epochs", type=int, help="override the comparison's epochs per run")
    parser.add_argument("--summary-only", action="store_true", help="only rewrite results.json and summary.md")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this (child) process
    return parser.parse_args(argv)


def size_of(args: argparse.Namespace) -> Size:
    size = SMOKE if args.smoke else GPU
    if args.compare_epochs:
        size = dataclasses.replace(size, compare_epochs=args.compare_epochs)
    return size


def device_of(args: argparse.Namespace) -> str:
    """cuda for the real run, cpu for smoke; an explicit --device wins."""
    if args.device != "auto":
        return args.device
    return "cpu" if args.smoke else "cuda"


def has_fashion_mnist(data_dir: Path) -> bool:
    return all((data_dir / name).is_file() for name in FASHION_FILES)


def fail(message: str) -> None:
    """One line naming the problem and the fix, exit code 2 (as the okdpipe CLI does)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def preflight(args: argparse.Namespace) -> None:
    """Refuse, before any GPU time is spent, what would make a step fail for certain."""
    import torch

    try:
        for module in ("okdpipe.cli", "okdpipe.distill.trainer"):  # the steps import okdpipe and run its CLI
            importlib.import_module(module)
    except ImportError as error:
        fail(
            f"okdpipe is not importable ({error}); from the repository root run "
            "pip install --no-deps --no-build-isolation -e ."
        )
    if device_of(args) == "cuda" and not torch.cuda.is_available():
        fail("no CUDA device is visible; run on the GPU machine, or pass --smoke (or --device cpu) for a CPU check")
    if not args.smoke and not has_fashion_mnist(args.data_dir):
        fail(
            f"--data-dir {args.data_dir}: the Fashion-MNIST IDX files ({', '.join(FASHION_FILES)}) are not all "
            "there; carry them along and pass their folder"
        )
    unknown = set((args.only or "").split(",")) - set(SHARES) - {""}
    if unknown:
        fail(f"--only: unknown steps {', '.join(sorted(unknown))}; the steps are {', '.join(SHARES)}")


# ---------------------------------------------------------------------------------------------- rows on disk


def rows_path(out: Path, step: str) -> Path:
    return out / "rows" / f"{step}.jsonl"


def append_row(out: Path, step: str, row: dict) -> None:
    """One finished figure, on disk at once (a kill of the step keeps it)."""
    path = rows_path(out, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as file:
        file.write(json.dumps(row) + "\n")
    print(json.dumps({"step": step, **row}), flush=True)


def attempt(out: Path, step: str, what: str, measure: Callable[[], dict]) -> bool:
    """One measurement; a failure becomes an error row and the step's other configurations still run."""
    try:
        row = measure()
    except Exception as error:  # noqa: BLE001 -- one configuration's failure (OOM, a compile error) is a figure too
        traceback.print_exc()
        append_row(out, step, {"kind": "error", "what": what, "error": f"{type(error).__name__}: {error}"[:500]})
        return False
    append_row(out, step, row)
    return True


def end_step(step: str, outcomes: list[bool]) -> None:
    """A step with failed configurations exits non-zero, so its status says so (its rows are kept)."""
    if not all(outcomes):
        raise SystemExit(f"{step}: {outcomes.count(False)} of {len(outcomes)} configurations failed (error rows)")


def read_rows(out: Path, step: str) -> list[dict]:
    path = rows_path(out, step)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# ---------------------------------------------------------------------------------------------- throughput


def throughput_args(size: Size, device: str, compile_: bool = False):
    """The namespace train_throughput.py's functions read."""
    return argparse.Namespace(
        arch=size.arch,
        batch_size=size.batch_size,
        input=size.input,
        classes=size.classes,
        warmup=size.warmup,
        steps=size.steps,
        repeats=size.repeats,
        device=device,
        precision="auto",
        channels_last=device == "cuda",
        compile=compile_,
        clock="wall",
        deterministic=False,
    )


def run_peak(args: argparse.Namespace, size: Size) -> None:
    import torch
    import train_throughput as tt

    device = device_of(args)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    flops = tt.matmul_peak_flops(throughput_args(size, device), dtype)
    append_row(args.out, "peak", {"kind": "peak", "dtype": str(dtype).removeprefix("torch."), "tflops": flops / 1e12})


def reference_okdph_seconds(targs: argparse.Namespace, students: int) -> float:
    """OKDPH as its official code steps (papers' loop style, code mode): per batch, a separate hybrid model gets
    the students' uniform weight average copied in, every network runs forward, each student's loss
    (omega CE + beta KD from the detached ensemble) and the hybrid's (1 - omega) CE are backpropagated one by one
    and each optimiser steps; fp32, batches from a CPU DataLoader, as train_throughput's reference path."""
    import torch
    import torch.nn.functional as F
    import train_throughput as tt

    from okdpipe.distill.losses import kd
    from okdpipe.distill.models import create_model

    size, channels = tt.parse_input(targs.input)
    device, timer = torch.device(targs.device), tt.path_timer(targs)
    models = [create_model(targs.arch, targs.classes, channels).to(device).train() for _ in range(students + 1)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) for m in models]
    pixels = torch.randint(0, 256, (targs.batch_size * timer.batches, channels, size, size), dtype=torch.uint8)
    labels = torch.randint(0, targs.classes, (len(pixels),))
    batches = iter(
        torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(pixels, labels), batch_size=targs.batch_size, shuffle=True, drop_last=True
        )
    )

    def step() -> None:
        images, target = next(batches)
        x, target = ((images.float() / 255 - 0.5) / 0.25).to(device), target.to(device)
        with torch.no_grad():
            states = [m.state_dict() for m in models[:-1]]
            models[-1].load_state_dict(
                {k: sum(s[k] for s in states) / students if v.is_floating_point() else v for k, v in states[0].items()}
            )
        logits = [model(x) for model in models]
        ensemble = (sum(logits) / len(logits)).detach()
        losses = [0.8 * F.cross_entropy(z, target) + 0.8 * kd(z, ensemble, 4.0) for z in logits[:-1]]
        for optimizer, loss in zip(optimizers, [*losses, 0.2 * F.cross_entropy(logits[-1], target)]):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return timer.seconds(step)


def throughput_row(size: Size, path: str, mode: str, method: str, students: int, seconds: float) -> dict:
    """One measured configuration; MFU is added by the summary, against the peak step's figure."""
    import torch
    import train_throughput as tt

    from okdpipe.distill.models import create_model

    side, channels = tt.parse_input(size.input)
    macs = tt.count_macs(create_model(size.arch, size.classes, channels), torch.zeros(1, channels, side, side))
    return {
        "kind": "throughput",
        "path": path,
        "mode": mode,
        "method": method,
        "students": students,
        "networks": students + (method == "okdph"),
        "arch": size.arch,
        "batch_size": size.batch_size,
        "input": size.input,
        "precision": "fp32" if path == "reference" or not torch.cuda.is_available() else "bf16",
        "step_ms": 1000 * seconds,
        "images_per_s": size.batch_size / seconds,
        "macs_per_image": macs,
    }


def run_reference(args: argparse.Namespace, size: Size) -> None:
    import train_throughput as tt

    targs = throughput_args(size, device_of(args))

    def measure(method: str, students: int) -> dict:
        timed = reference_okdph_seconds if method == "okdph" else tt.reference_step_seconds
        return throughput_row(size, "reference", "eager", method, students, timed(targs, students))

    end_step("reference", [attempt(args.out, "reference", f"{m} x {n}", partial(measure, m, n)) for m, n in CONFIGS])


def compile_with(mode: str, size: Size) -> Callable[[], None]:
    """Make every `torch.compile(students)` of this (child) process use `mode`'s settings: the trainer's config
    has one compile switch, and the suite needs CUDA graphs ("reduce-overhead") and, in smoke, dynamo without
    inductor. Returns the undo."""
    import torch

    original = torch.compile
    options = {"backend": size.compile_backend}
    if mode == "cudagraphs":
        options["mode"] = "reduce-overhead"
    torch.compile = partial(original, **options)
    return lambda: setattr(torch, "compile", original)


def run_trainer_path(args: argparse.Namespace, size: Size, step: str) -> None:
    """`loop-<mode>` or `fused-<mode>`: the real trainer's step on every configuration."""
    import torch
    import train_throughput as tt

    path, mode = step.split("-")
    device = device_of(args)
    targs = throughput_args(size, device, compile_=mode != "eager")
    undo = compile_with(mode, size) if mode != "eager" else (lambda: None)
    warmup = size.compiled_warmup if mode != "eager" else size.warmup

    def measure(method: str, students: int) -> dict:
        timer = tt.Timer(torch.device(device), warmup, size.steps, size.repeats)
        cfg = tt.distill_config(targs, method, students, size.arch, timer.batches)
        seconds = tt.trainer_step_seconds(cfg, path == "fused", timer)
        return throughput_row(size, path, mode, method, students, seconds)

    try:
        end_step(step, [attempt(args.out, step, f"{m} x {n}", partial(measure, m, n)) for m, n in CONFIGS])
    finally:
        undo()


# ---------------------------------------------------------------------------------------------- comparison


def compare_data(args: argparse.Namespace) -> dict:
    """Full Fashion-MNIST; smoke uses synthetic images of its shape (its 6,000 validation and 10,000 test images,
    scored several times per run, would take minutes on a CPU)."""
    if not args.smoke:
        return {"dataset": "fashion-mnist", "data_dir": str(args.data_dir.resolve()), "val_split": 0.1}
    return {
        "dataset": "synthetic",
        "val_split": 0.25,
        "data_options": {"num_classes": 10, "size": 28, "channels": 1, "n_train": 64, "n_test": 32},
    }


def compare_protocol(args: argparse.Namespace, size: Size) -> dict:
    """compare_methods.py's protocol: the runs' folders and records live under --out, named by the epoch count
    (compare_methods skips a finished run, so another --compare-epochs must not find the old ones)."""
    base = {
        "arch": size.compare_arch,
        **compare_data(args),
        "epochs": size.compare_epochs,
        "batch_size": size.compare_batch,
        "lr": 0.1,
        "schedule": "cosine",
        "warmup_epochs": 0,
        "weight_decay": 5.0e-4,
        "device": device_of(args),
    }
    tag = f"e{size.compare_epochs}"
    return {
        "out": str(args.out / f"compare-runs-{tag}"),
        "records": str(args.out / f"compare-records-{tag}"),
        "methods": list(COMPARE_METHODS),
        "seeds": list(size.compare_seeds),
        "base": base,
        "method_overrides": {"pcl": {"optimizer": "nesterov"}},
    }


def run_compare(args: argparse.Namespace, size: Size) -> None:
    """Every (method, seed) through `okdpipe distill` and `okdpipe select`, `compare_parallel` at a time."""
    import compare_methods as cm

    protocol = compare_protocol(args, size)
    out, records = Path(protocol["out"]), Path(protocol["records"])
    plan = cm.schedule(protocol, None, None)
    append_row(
        args.out, "compare", {"kind": "plan", "runs": [f"{m}-s{s}" for m, s in plan], "config": protocol["base"]}
    )

    def measure(name: str, seed: int) -> dict:
        started = time.time()
        cm.train(protocol, out, name, seed)
        record = cm.select_and_measure(out, records, name, seed)
        return {
            "kind": "run",
            "method": name,
            "seed": seed,
            "shipped": record["shipped"],
            "shipped_test_top1": record["shipped_test_top1"],
            "shipped_val_top1": record["shipped_val_top1"],
            "ensemble_test_top1": record["ensemble_test_top1"],
            "train_seconds": record["train_seconds"],
            "wall_seconds": time.time() - started,
        }

    with ThreadPoolExecutor(size.compare_parallel) as pool:
        outcomes = pool.map(
            lambda run: attempt(args.out, "compare", f"{run[0]}-s{run[1]}", partial(measure, *run)), plan
        )
        end_step("compare", list(outcomes))


STEP_RUNNERS = {"peak": run_peak, "reference": run_reference, "compare": run_compare}


def run_step(args: argparse.Namespace) -> None:
    """Child process: one step, its rows appended as they finish."""
    runner = STEP_RUNNERS.get(args.step, partial(run_trainer_path, step=args.step))
    runner(args, size_of(args))


# ---------------------------------------------------------------------------------------------- orchestration


def skip_reason(step: str, device: str) -> Optional[str]:
    if step.endswith("cudagraphs") and device != "cuda":
        return "CUDA graphs need a CUDA device"
    return None


def child_command(args: argparse.Namespace, step: str) -> list[str]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--out",
        str(args.out),
        "--data-dir",
        str(args.data_dir),
        "--device",
        device_of(args),
        "--step",
        step,
    ]
    if args.compare_epochs:
        command += ["--compare-epochs", str(args.compare_epochs)]
    return command + (["--smoke"] if args.smoke else [])


def run_child(args: argparse.Namespace, step: str, box_s: float) -> dict:
    """Run `step` in its own process group for at most `box_s`; its status for results.json."""
    started = time.perf_counter()
    log = (args.out / "logs" / f"{step}.log").open("w")
    # Smoke: one thread per process (CI machines are small and shared; oversubscribed threads crawl).
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.smoke else None
    child = subprocess.Popen(
        child_command(args, step), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )  # its own group: a kill also ends the okdpipe runs it started
    signal.signal(signal.SIGTERM, partial(end_with_child, child))  # an outer `timeout` must not orphan the group
    try:
        rc = child.wait(timeout=box_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        rc = None
    finally:
        log.close()
    seconds = round(time.perf_counter() - started, 1)
    if rc is None:
        return {"status": "timed out", "box_s": round(box_s, 1), "seconds": seconds}
    if rc != 0:
        return {"status": "failed", "rc": rc, "seconds": seconds, "error": last_line(args.out / "logs" / f"{step}.log")}
    return {"status": "ok", "box_s": round(box_s, 1), "seconds": seconds}


def end_with_child(child: subprocess.Popen, signum: int, _frame) -> None:
    """SIGTERM to the suite: end the running step's process group too, then exit."""
    os.killpg(child.pid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][-300:] if lines else "(no output)"


def boxes(budget_s: float, steps: list[str]) -> dict[str, float]:
    """Each step's share of the budget, scaled up when --only leaves some steps out."""
    total = sum(SHARES[s] for s in steps)
    return {s: max(MIN_BOX_S, budget_s * SHARES[s] / total) for s in steps}


def run_suite(args: argparse.Namespace) -> dict:
    """Every step in order, each time-boxed; the comparison, last, gets what is left of the budget."""
    device = device_of(args)
    steps = [s for s in SHARES if not args.only or s in args.only.split(",")]
    box = boxes(args.budget_s, steps)
    statuses = read_json(args.out / "results.json").get("steps", {})
    deadline = time.perf_counter() + args.budget_s
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    for step in steps:
        reason = skip_reason(step, device)
        if reason:
            statuses[step] = {"status": "skipped", "reason": reason}
        else:
            rows_path(args.out, step).unlink(missing_ok=True)  # a rerun replaces the step's rows
            allowed = box[step] if step != "compare" else max(MIN_BOX_S, deadline - time.perf_counter())
            statuses[step] = run_child(args, step, allowed)
        write_results(args, statuses)
    return statuses


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def environment(args: argparse.Namespace) -> dict:
    import torch
    import torchvision

    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:
        ort = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnxruntime": ort,
        "cuda": torch.version.cuda,
        "gpu": gpu,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "device": device_of(args),
        "smoke": args.smoke,
        "budget_s": args.budget_s,
        "data_dir": str(args.data_dir),
        "dataset": "synthetic (smoke)" if args.smoke else "fashion-mnist",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


# ---------------------------------------------------------------------------------------------- results


def with_mfu(rows: list[dict], peak: Optional[dict]) -> list[dict]:
    """MFU = 6 * MACs * networks * images/s / measured peak; None (with the reason in the summary) without one."""
    tflops = peak["tflops"] if peak else None
    return [
        {**r, "mfu": 6 * r["macs_per_image"] * r["networks"] * r["images_per_s"] / (tflops * 1e12) if tflops else None}
        for r in rows
    ]


def collect(out: Path) -> dict:
    rows = [{"step": step, **row} for step in SHARES for row in read_rows(out, step)]
    kind = lambda name: [r for r in rows if r["kind"] == name]  # noqa: E731
    peak = kind("peak")[-1] if kind("peak") else None
    return {
        "peak": peak,
        "throughput": with_mfu(kind("throughput"), peak),
        "compare_plan": next(iter(kind("plan")), None),
        "compare": kind("run"),
        "errors": kind("error"),
    }


def write_results(args: argparse.Namespace, statuses: dict) -> None:
    results = {"environment": environment(args), "steps": statuses, **collect(args.out)}
    write_atomic(args.out / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomic(args.out / "summary.md", markdown(results) + "\n")


def write_atomic(path: Path, text: str) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"# GPU suite: {env['gpu'] or 'CPU'}{' (smoke: toy sizes, not figures)' if env['smoke'] else ''}",
        "",
        f"`{env['command']}` - Python {env['python']}, torch {env['torch']}, torchvision {env['torchvision']}, "
        f"CUDA {env['cuda']}, {env['cpu_count']} CPUs, data: {env['dataset']}",
        "",
        "| step | status | seconds | note |",
        "|---|---|---:|---|",
    ]
    for step, status in results["steps"].items():
        note = status.get("reason") or status.get("error") or (f"box {status['box_s']} s" if "box_s" in status else "")
        lines.append(f"| {step} | {status['status']} | {status.get('seconds', '')} | {note} |")
    errors = [f"- {r['step']}, {r['what']}: {r['error']}" for r in results["errors"]]
    return "\n".join(
        lines
        + [
            "",
            throughput_table(results),
            "",
            compare_table(results),
            *(["", "Failed configurations:", *errors] if errors else []),
        ]
    )


def throughput_table(results: dict) -> str:
    peak = results["peak"]
    head = (
        f"Peak: {peak['tflops']:.3g} TFLOP/s ({peak['dtype']} matmul)" if peak else "Peak: not measured (MFU left out)"
    )
    reference = {(r["method"], r["students"]): r["step_ms"] for r in results["throughput"] if r["path"] == "reference"}
    lines = [
        head,
        "",
        "| path | mode | method | N | precision | step ms | dataset img/s | MFU | vs reference |",
        "|---|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in results["throughput"]:
        base = reference.get((r["method"], r["students"]))
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        speedup = f"{base / r['step_ms']:.2f}x" if base else "-"
        lines.append(
            f"| {r['path']} | {r['mode']} | {r['method']} | {r['students']} | {r['precision']} | "
            f"{r['step_ms']:.2f} | {r['images_per_s']:,.0f} | {mfu} | {speedup} |"
        )
    return "\n".join(lines)


def compare_table(results: dict) -> str:
    runs, plan = results["compare"], results["compare_plan"]
    lines = [
        "| method | seeds finished | shipped test top-1 % per seed | mean ± std | wall s per run |",
        "|---|---:|---|---|---:|",
    ]
    for method in COMPARE_METHODS:
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
        tops = [100 * r["shipped_test_top1"] for r in mine]
        spread = f"{statistics.mean(tops):.2f} ± {statistics.stdev(tops):.2f}" if len(tops) > 1 else "-"
        walls = f"{statistics.mean(r['wall_seconds'] for r in mine):.0f}" if mine else "-"
        per_seed = ", ".join(f"s{r['seed']} {top:.2f}" for r, top in zip(mine, tops))
        lines.append(f"| {method} | {len(mine)} | {per_seed} | {spread} | {walls} |")
    if plan:
        done = {f"{r['method']}-s{r['seed']}" for r in runs}
        missing = [name for name in plan["runs"] if name not in done]
        lines += [
            "",
            f"Comparison config: {json.dumps(plan['config'])}",
            f"Not finished: {', '.join(missing) if missing else 'none'}",
        ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.step:
        return run_step(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.summary_only:
        return write_results(args, read_json(args.out / "results.json").get("steps", {}))
    preflight(args)
    statuses = run_suite(args)
    print((args.out / "summary.md").read_text())
    bad = [step for step, status in statuses.items() if status["status"] not in ("ok", "skipped")]
    if bad:
        print(f"steps not finished: {', '.join(bad)} (see {args.out}/logs/)", file=sys.stderr)


if __name__ == "__main__":
    main()
