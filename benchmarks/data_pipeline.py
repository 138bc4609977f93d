"""Images/s of the two loader paths on the same images with crop + flip + cutout; prints one JSON line.

    python benchmarks/data_pipeline.py --dataset fashion-mnist --batch-size 128 --views 1 --iters 50

The tensor path augments whole batches on --device; the albumentations path runs the same uint8 images through
AugmentedViews (per-sample CPU augmentation, --workers DataLoader workers), then normalises on --device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from okdpipe.datasets import AugmentConfig, load_dataset, make_loader


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--views", type=int, default=1)
    parser.add_argument("--iters", type=int, default=50, help="batches timed per path (after one warm-up batch)")
    parser.add_argument("--cutout", type=int, default=8, help="cutout side in pixels")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the albumentations path")
    return parser.parse_args()


def images_per_second(loader, iters: int, device: torch.device) -> float:
    """Batches of epoch 0 after a warm-up one; synchronises so GPU work is counted."""
    batches = loader.epoch(0)
    next(batches)
    start, seen = time.perf_counter(), 0
    for _, batch in zip(range(iters), batches):
        seen += batch.views.shape[0] * batch.views.shape[1]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    bundle = load_dataset(args.dataset, args.data_dir, val_split=0)
    config = AugmentConfig(crop_padding=bundle.spec.augment.crop_padding, hflip=True, cutout=args.cutout)
    # Enough images for iters + 1 batches, so neither path wraps around.
    count = min(len(bundle.train), (args.iters + 1) * args.batch_size)
    split = bundle.train.subset(torch.arange(count))
    device = torch.device(args.device)
    rates = {}
    for backend in ("tensor", "albumentations"):
        loader = make_loader(
            split,
            bundle.spec,
            batch_size=args.batch_size,
            train=True,
            device=device,
            views=args.views,
            augment=config,
            backend=backend,
            num_workers=args.workers,
        )
        rates[backend] = images_per_second(loader, args.iters, device)
    print(
        json.dumps(
            {
                "dataset": args.dataset,
                "device": str(device),
                "batch_size": args.batch_size,
                "views": args.views,
                "augment": dataclasses.asdict(config),
                "workers": args.workers,
                "tensor_images_per_s": round(rates["tensor"]),
                "albumentations_images_per_s": round(rates["albumentations"]),
                "speedup": round(rates["tensor"] / rates["albumentations"], 2),
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
