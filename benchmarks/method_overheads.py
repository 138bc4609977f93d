"""What two of issue 14's method changes cost per training step, as ratios measured in one run.

    python benchmarks/method_overheads.py [--batch-size 128] [--repeats 30] [--threads 2]

1. OKDPH's per-view augmentations (`view_augment: method`: flip+rotate, flip+cutout, RandAugment(2, 9) for the
   hybrid's view) against every view a fresh draw of the dataset's own crop+flip (`view_augment: same`), on the
   device-side batched path, for 3 students + the hybrid (4 views); and both against the forward + backward of
   the 4 ResNet-8 networks on the same batch, so the cost reads as a share of a step.
2. PCL's mean-teacher update: one fused `torch._foreach_lerp_` over every parameter and buffer of 3 ResNet-8
   peers against the per-tensor loop it replaced.

Inputs are synthetic uint8 images of Fashion-MNIST's shape (28x28x1) and CIFAR's (32x32x3). Prints one JSON line
per measurement, then a Markdown table (median of --repeats timed calls after warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from okdpipe.datasets.augment import augment_batch, draw_augment
from okdpipe.datasets.spec import AugmentConfig
from okdpipe.datasets.views import augment_policy, draw_policy, view_policy
from okdpipe.distill.methods.pcl import lerp_towards
from okdpipe.distill.models import create_model

VIEWS = 4  # OKDPH's 3 students + the hybrid
SHAPES = {"fashion-mnist 28x28x1": (1, 28), "cifar 32x32x3": (3, 32)}


def median_ms(call: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        times.append((time.perf_counter() - began) * 1000.0)
    return statistics.median(times)


def augmentation(batch_size: int, repeats: int) -> list[dict]:
    rows = []
    config = AugmentConfig(crop_padding=4, hflip=True)
    policy = view_policy("okdph", VIEWS)
    for label, (channels, size) in SHAPES.items():
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (batch_size, channels, size, size), dtype=torch.uint8, generator=generator)
        mean, std = torch.full((channels,), 0.5), torch.full((channels,), 0.25)
        draws = draw_augment(generator, VIEWS, batch_size, config, (size, size)).window(0, batch_size)
        extra = draw_policy(generator, policy, batch_size)
        same_ms = median_ms(lambda: augment_batch(images, draws, config, mean, std), repeats)
        method_ms = median_ms(lambda: augment_policy(images, draws, extra, config, policy, mean, std), repeats)
        step_ms = median_ms(students_step(channels, size, augment_batch(images, draws, config, mean, std)), repeats)
        rows.append(
            {
                "measure": "okdph views",
                "input": label,
                "same_ms": same_ms,
                "method_ms": method_ms,
                "method_over_same": method_ms / same_ms,
                "students_fwd_bwd_ms": step_ms,
                "method_share_of_step": method_ms / (method_ms + step_ms),
                "same_share_of_step": same_ms / (same_ms + step_ms),
            }
        )
    return rows


def students_step(channels: int, size: int, views: torch.Tensor) -> Callable[[], None]:
    """Forward + backward of VIEWS ResNet-8 networks, network v on view v (cross-entropy on random labels)."""
    torch.manual_seed(0)
    models = [create_model("resnet8", 10, channels) for _ in range(VIEWS)]
    labels = torch.randint(0, 10, (views.shape[1],))

    def step() -> None:
        loss = sum(torch.nn.functional.cross_entropy(m(v), labels) for m, v in zip(models, views))
        loss.backward()

    return step


def mean_teacher(repeats: int) -> list[dict]:
    torch.manual_seed(0)
    peers = [create_model("resnet8", 10, 3) for _ in range(3)]
    teachers = [create_model("resnet8", 10, 3) for _ in range(3)]
    sources = [t for p in peers for t in p.state_dict().values() if t.dtype.is_floating_point]
    targets = [t for m in teachers for t in m.state_dict().values() if t.dtype.is_floating_point]

    def loop() -> None:
        with torch.no_grad():
            for target, source in zip(targets, sources):
                target.lerp_(source, 0.001)

    fused_ms = median_ms(lambda: lerp_towards(targets, sources, 0.999), repeats * 10)
    loop_ms = median_ms(loop, repeats * 10)
    return [
        {
            "measure": "pcl mean-teacher update",
            "input": f"3 x resnet8, {len(targets)} tensors",
            "loop_ms": loop_ms,
            "foreach_ms": fused_ms,
            "loop_over_foreach": loop_ms / fused_ms,
        }
    ]


def markdown(rows: list[dict]) -> str:
    lines = [
        "| measure | input | baseline ms | new ms | ratio | share of a 4-network fwd+bwd step |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["measure"] == "okdph views":
            share = f"{r['same_share_of_step']:.1%} -> {r['method_share_of_step']:.1%}"
            lines.append(
                f"| OKDPH views: same -> method | {r['input']} | {r['same_ms']:.2f} | {r['method_ms']:.2f} | "
                f"{r['method_over_same']:.2f}x | {share} |"
            )
        else:
            lines.append(
                f"| PCL mean teacher: loop -> foreach | {r['input']} | {r['loop_ms']:.3f} | {r['foreach_ms']:.3f} | "
                f"{r['loop_over_foreach']:.1f}x faster | |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = augmentation(args.batch_size, args.repeats) + mean_teacher(args.repeats)
    for row in rows:
        print(json.dumps(row))
    print(markdown(rows))


if __name__ == "__main__":
    main()
