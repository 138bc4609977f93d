"""Training step speed of backbones and memory formats, measured interleaved so that a shared machine's load
falls on every variant alike (issue 17: MobileNetV2 against ResNet-8 on CPU, NCHW against channels-last).

    python benchmarks/backbone_speed.py --variants resnet8 resnet8+cl mobilenetv2 mobilenetv2+cl \
        --input 28x28x1 --classes 10 --batch-size 128 --steps 2 --rounds 5 --threads 1 --clock process

A variant is a registered backbone name, `+cl` for channels-last. Each one gets a real trainer session
(`build_session` + `train_step`, vanilla, one student, fp32 on CPU, synthetic images of --input); then, round
after round, every variant runs --steps timed steps in turn. Per variant the fastest round counts (the least
disturbed), and the median is shown beside it. Prints JSON lines, then a Markdown table with each variant's
speed relative to the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable

import torch
from train_throughput import CLOCKS, Timer, distill_config

from okdpipe.distill.methods import StepContext
from okdpipe.distill.trainer import build_session, train_step
from okdpipe.run import RunDir


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["resnet8", "resnet8+cl", "mobilenetv2", "mobilenetv2+cl"])
    parser.add_argument("--input", default="28x28x1", help="HxWxC of the synthetic images; H = W")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    return parser.parse_args()


def variant_config(args: argparse.Namespace, variant: str):
    """The trainer config of one variant: `arch` or `arch+cl`, with enough batches for every round."""
    arch, _, memory = variant.partition("+")
    steps = args.warmup + args.steps * args.rounds
    options = argparse.Namespace(**{**vars(args), "channels_last": memory == "cl", "compile": False})
    return distill_config(options, "vanilla", 1, arch, steps)


def step_function(cfg, root: str) -> Callable[[], None]:
    """One trainer step per call, on the session's own batches, as fit() runs them."""
    session = build_session(cfg, RunDir(root))
    session.students.train()
    batches = session.train_loader.epoch(0)
    spe = len(session.train_loader)
    generator = torch.Generator().manual_seed(0)
    counter = iter(range(spe))

    def step() -> None:
        index = next(counter)
        train_step(session, next(batches), StepContext(index / spe, index, 1, spe, generator))

    return step


def interleaved_seconds(args: argparse.Namespace, steps: dict[str, Callable[[], None]]) -> dict[str, list[float]]:
    """Seconds per step of every variant in every round, the variants taking turns within each round."""
    device = torch.device(args.device)
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    timer = Timer(device, 0, args.steps, 1, CLOCKS[args.clock])
    rounds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            rounds[name].append(timer.seconds(step))
    return rounds


def rows(args: argparse.Namespace, rounds: dict[str, list[float]]) -> list[dict]:
    first = min(next(iter(rounds.values())))
    return [
        {
            "variant": name,
            "step_ms": round(1000 * min(seconds), 1),
            "median_step_ms": round(1000 * statistics.median(seconds), 1),
            "images_per_s": round(args.batch_size / min(seconds), 1),
            "vs_first": round(first / min(seconds), 3),
            "batch_size": args.batch_size,
            "input": args.input,
            "clock": args.clock,
            "threads": torch.get_num_threads(),
            "rounds": args.rounds,
        }
        for name, seconds in rounds.items()
    ]


def markdown(table: list[dict]) -> str:
    lines = [
        f"| variant | step ms (best) | median | img/s | speed vs {table[0]['variant']} |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['variant']} | {r['step_ms']:.0f} | {r['median_step_ms']:.0f} | {r['images_per_s']:,.0f} | "
        f"{r['vs_first']:.3f}x |"
        for r in table
    ]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        steps = {v: step_function(variant_config(args, v), f"{root}/{i}") for i, v in enumerate(args.variants)}
        table = rows(args, interleaved_seconds(args, steps))
    for row in table:
        print(json.dumps(row))
    print()
    print(markdown(table))


if __name__ == "__main__":
    main()
