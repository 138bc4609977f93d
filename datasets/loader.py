"""make_loader: batches of normalised views for training and evaluation, reproducible per (seed, epoch)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from okdpipe.datasets.albument import AugmentedViews, collate_views
from okdpipe.datasets.augment import augment_batch, draw_augment, normalise
from okdpipe.datasets.rng import STREAM_EPOCH, STREAM_WORKERS, cpu_generator
from okdpipe.datasets.spec import NO_AUGMENT, AugmentConfig, DatasetSpec
from okdpipe.datasets.splits import Split, TensorSplit
from okdpipe.datasets.views import ViewAugment, augment_policy, draw_policy
from okdpipe.errors import OkdpipeError

BACKENDS = ("tensor", "albumentations")


@dataclass
class Batch:
    views: torch.Tensor  # float32 [V, B, C, H, W], normalised with the spec's mean/std, on the loader's device
    labels: torch.Tensor  # int64 [B] on the loader's device


class TensorBatches:
    """In-memory split moved to the device once; each batch gathered by index and augmented there in one go."""

    def __init__(
        self,
        split: TensorSplit,
        device: torch.device,
        config: AugmentConfig,
        views: int,
        spec: DatasetSpec,
        policy: tuple[ViewAugment, ...] | None = None,
    ):
        self.images, self.labels, self.policy = split.images.to(device), split.labels.to(device), policy
        self.device, self.config, self.views, self.size = device, config, views, spec.input_size
        self.mean, self.std = spec_stats(spec, device)

    def batches(self, order: torch.Tensor, bounds: list[tuple[int, int]], epoch: int, generator) -> Iterator[Batch]:
        draws = draw_augment(generator, self.views, len(order), self.config, self.size).to(self.device)
        extra = draw_policy(generator, self.policy, len(order)).to(self.device) if self.policy else None
        order = order.to(self.device)
        for start, stop in bounds:
            index, window = order[start:stop], draws.window(start, stop)
            views = (
                augment_policy(
                    self.images[index], window, extra.window(start, stop), self.config, self.policy, self.mean, self.std
                )
                if self.policy
                else augment_batch(self.images[index], window, self.config, self.mean, self.std)
            )
            yield Batch(views, self.labels[index])


class AlbumentationsBatches:
    """A torch DataLoader over AugmentedViews; normalisation (and cutout's zeroing) happens on the device."""

    def __init__(
        self,
        split: Split,
        device: torch.device,
        config: AugmentConfig,
        views: int,
        spec: DatasetSpec,
        seed: int,
        num_workers: int,
    ):
        self.dataset = AugmentedViews(split, config, views, seed, spec.input_size, spec.in_channels)
        self.device, self.seed, self.num_workers = device, seed, num_workers
        self.mean, self.std = spec_stats(spec, device)

    def batches(self, order: torch.Tensor, bounds: list[tuple[int, int]], epoch: int, generator) -> Iterator[Batch]:
        keys = [[(epoch, int(i)) for i in order[start:stop]] for start, stop in bounds]
        loader = DataLoader(
            self.dataset,
            batch_sampler=keys,
            num_workers=self.num_workers,
            collate_fn=collate_views,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=seed_worker,
            # Workers' base seed (torch, numpy, random) follows (seed, epoch) too, for any randomness outside
            # albumentations; the augmentation itself is seeded per sample.
            generator=cpu_generator(self.seed, epoch, STREAM_WORKERS),
        )
        for pixels, keep, labels in loader:
            pixels = pixels.to(self.device, non_blocking=True)
            keep = keep.to(self.device, non_blocking=True) if keep is not None else None
            yield Batch(normalise(pixels, self.mean, self.std, keep), labels.to(self.device, non_blocking=True))


def seed_worker(worker_id: int) -> None:
    np.random.seed(torch.initial_seed() % 2**32)


def spec_stats(spec: DatasetSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.tensor(spec.mean, dtype=torch.float32, device=device),
        torch.tensor(spec.std, dtype=torch.float32, device=device),
    )


class Loader:
    """Batches per epoch; `epoch(e)` is a pure function of (seed, e): shuffle order and every augmentation draw.

    With `shard=(rank, world_size)` each global batch of `batch_size` is cut into world_size consecutive parts
    and this loader yields part `rank`: the same epoch order and the same augmentation draws (indexed by
    position in that order) as one process, shared out, so N processes see exactly one process's global batch.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        source,
        shard: tuple[int, int] = (0, 1),
    ):
        self.split, self.batch_size, self.shuffle, self.seed, self.source = split, batch_size, shuffle, seed, source
        self.drop_last = drop_last
        rank, world_size = shard
        if not 0 <= rank < world_size:
            raise OkdpipeError(f"shard {rank} of {world_size}: the rank must be in [0, {world_size})")
        self.shard = shard

    @property
    def num_samples(self) -> int:
        """Images in the split (an epoch with drop_last sees len(self) * batch_size of them)."""
        return len(self.split)

    def __len__(self) -> int:
        full, rest = divmod(len(self.split), self.batch_size)
        return full if self.drop_last else full + (rest > 0)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        generator = cpu_generator(self.seed, epoch, STREAM_EPOCH)
        count = len(self.split)
        order = torch.randperm(count, generator=generator) if self.shuffle else torch.arange(count)
        bounds = [(s, min(s + self.batch_size, count)) for s in range(0, len(self) * self.batch_size, self.batch_size)]
        return self.source.batches(order, [shard_bounds(b, *self.shard) for b in bounds], epoch, generator)


def shard_bounds(bounds: tuple[int, int], rank: int, world_size: int) -> tuple[int, int]:
    """Part `rank` of [start, stop) cut into world_size consecutive parts whose sizes differ by at most one."""
    start, stop = bounds
    size = stop - start
    return start + size * rank // world_size, start + size * (rank + 1) // world_size


def make_loader(
    split: Split,
    spec: DatasetSpec,
    *,
    batch_size: int,
    train: bool,
    device: torch.device | str,
    seed: int = 0,
    views: int = 1,
    augment: AugmentConfig | None = None,
    drop_last: bool | None = None,
    num_workers: int = 0,
    backend: str | None = None,
    shard: tuple[int, int] = (0, 1),
    policy: tuple[ViewAugment, ...] | None = None,
) -> Loader:
    """train=True: shuffled, spec.augment unless `augment` is given, drop_last unless that leaves no batch.
    train=False: in order, no augmentation unless `augment` is given, partial last batch kept.

    Each of `views` views gets its own augmentation draw of the same images (for per-student views).
    backend: "tensor" (default for in-memory splits; augments batched on `device`) or "albumentations"
    (default for file splits; DataLoader with `num_workers`).
    shard: (rank, world_size), this process's part of every batch (see Loader).
    policy: one ViewAugment per view (datasets/views.py), tensor backend only; None = the dataset's own.
    """
    if batch_size < 1 or views < 1:
        raise OkdpipeError(f"batch_size and views must be >= 1, got {batch_size} and {views}")
    config = augment if augment is not None else (spec.augment if train else NO_AUGMENT)
    device = torch.device(device)
    source = batch_source(split, spec, device, config, views, seed, num_workers, backend, policy)
    keep_partial = not train if drop_last is None else not drop_last
    # A training split smaller than one batch still yields its one partial batch rather than none.
    drop = not keep_partial and len(split) >= batch_size
    return Loader(split, batch_size, shuffle=train, drop_last=drop, seed=seed, source=source, shard=shard)


def batch_source(split, spec, device, config, views, seed, num_workers, backend, policy=None):  # noqa: ANN001, ANN201
    """Pick the path: tensors on the device for in-memory splits unless told otherwise."""
    chosen = backend or ("tensor" if isinstance(split, TensorSplit) else "albumentations")
    if chosen not in BACKENDS:
        raise OkdpipeError(f"unknown loader backend {chosen!r}; choose one of: {', '.join(BACKENDS)}")
    if chosen == "albumentations":
        if policy:
            raise OkdpipeError(
                "per-view augmentation policies run on the tensor path (in-memory splits); pass --set view_augment=same"
            )
        return AlbumentationsBatches(split, device, config, views, spec, seed, num_workers)
    if not isinstance(split, TensorSplit):
        raise OkdpipeError("the tensor backend needs an in-memory split; use backend='albumentations' for files")
    return TensorBatches(split, device, config, views, spec, policy)
