"""make_loader: epoch determinism, per-view independence, and the tensor and albumentations paths agreeing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datafixtures import write_class_folders

from okdpipe.datasets import AugmentConfig, DatasetSpec, FileSplit, TensorSplit, load_dataset, make_loader
from okdpipe.datasets.augment import cutout_keep_mask
from okdpipe.datasets.decoding import ImageDecoder

SIZE = 12
BACKENDS = ["tensor", "albumentations"]
# mean 0, std 1: normalised views are pixel / 255, so the uint8 pixels can be recovered exactly.
UNIT_SPEC = DatasetSpec("coded", 2, ("a", "b"), 1, (SIZE, SIZE), (0.0,), (1.0,))


def coded_split(count: int) -> TensorSplit:
    """Every image codes each pixel's position: value 1 + row * SIZE + col (0 is left for padding and holes)."""
    grid = 1 + torch.arange(SIZE * SIZE, dtype=torch.uint8).view(1, 1, SIZE, SIZE)
    return TensorSplit(grid.repeat(count, 1, 1, 1), torch.arange(count) % 2)


def pixels_of(views: torch.Tensor) -> torch.Tensor:
    return (views * 255).round().to(torch.int64)


def decode_view(pixels: torch.Tensor) -> tuple[int, int, bool, tuple[int, int]]:
    """(dy, dx, flipped, hole extent) of one coded [SIZE, SIZE] view: where each output pixel was read from, and
    the (rows, cols) spanned by zeros whose source lies inside the image (the cutout hole; zeros elsewhere are
    crop padding)."""
    rows, cols = torch.nonzero(pixels > 0, as_tuple=True)
    source = pixels[rows, cols] - 1
    dy = int((source // SIZE - rows)[0])
    flipped = bool(torch.unique(source % SIZE + cols).numel() == 1) and cols.unique().numel() > 1
    dx = int((source % SIZE + cols)[0] - (SIZE - 1)) if flipped else int((source % SIZE - cols)[0])
    src_rows = torch.arange(SIZE) + dy
    src_cols = (SIZE - 1 - torch.arange(SIZE) + dx) if flipped else torch.arange(SIZE) + dx
    inside = ((src_rows >= 0) & (src_rows < SIZE))[:, None] & ((src_cols >= 0) & (src_cols < SIZE))[None, :]
    hole_rows, hole_cols = torch.nonzero(inside & (pixels == 0), as_tuple=True)
    extent = (
        (int(hole_rows.max() - hole_rows.min() + 1), int(hole_cols.max() - hole_cols.min() + 1))
        if len(hole_rows)
        else (0, 0)
    )
    return dy, dx, flipped, extent


def all_views(loader, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader.epoch(epoch))
    return torch.cat([b.views for b in batches], dim=1), torch.cat([b.labels for b in batches])


def decoded_views(config: AugmentConfig, backend: str, count: int = 300) -> list[tuple]:
    loader = make_loader(
        coded_split(count), UNIT_SPEC, batch_size=100, train=True, device="cpu", augment=config, backend=backend
    )
    return [decode_view(v[0]) for v in pixels_of(all_views(loader)[0][0])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_crop_and_flip_sizes(backend):
    decoded = decoded_views(AugmentConfig(crop_padding=2, hflip=True), backend)
    assert {d[0] for d in decoded} == {d[1] for d in decoded} == {-2, -1, 0, 1, 2}  # bounded by the padding
    assert 0.4 < np.mean([d[2] for d in decoded]) < 0.6
    assert {d[3] for d in decoded} == {(0, 0)}  # no hole without cutout


@pytest.mark.parametrize("backend", BACKENDS)
def test_cutout_sizes(backend):
    extents = [d[3] for d in decoded_views(AugmentConfig(cutout=4), backend)]
    assert all(2 <= h <= 4 and 2 <= w <= 4 for h, w in extents)  # a 4x4 square, clipped to >= 2 at the border
    # A centre uniform over the image keeps the whole square with p = ((12 - 4 + 1) / 12)^2 = 0.5625.
    assert abs(np.mean([e == (4, 4) for e in extents]) - 0.5625) < 0.1
    combined = decoded_views(AugmentConfig(crop_padding=2, hflip=True, cutout=4), backend, count=100)
    assert all(h <= 4 and w <= 4 for *_, (h, w) in combined)


def test_cutout_mask_is_exact_square_clipped():
    keep = cutout_keep_mask(torch.tensor([[5, 6], [0, 0], [11, 11]]), 4, (SIZE, SIZE))
    assert (~keep[0]).sum() == 16 and not keep[0, 3:7, 4:8].any()
    assert (~keep[1]).sum() == 4 and not keep[1, :2, :2].any()  # rows/cols -2..1 clipped to 0..1
    assert (~keep[2]).sum() == 9 and not keep[2, 9:, 9:].any()
    odd = cutout_keep_mask(torch.tensor([[6, 6]]), 5, (SIZE, SIZE))
    assert (~odd[0]).sum() == 25 and not odd[0, 4:9, 4:9].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_epoch_is_pure_function_of_seed_and_epoch(backend):
    bundle = load_dataset("synthetic", val_split=0)
    make = lambda: make_loader(
        bundle.train,
        bundle.spec,
        batch_size=16,
        train=True,
        device="cpu",
        views=2,  # noqa: E731
        augment=AugmentConfig(2, True, 4),
        backend=backend,
    )
    views, labels = all_views(make(), 3)
    again_views, again_labels = all_views(make(), 3)
    assert torch.equal(views, again_views) and torch.equal(labels, again_labels)
    other_views, other_labels = all_views(make(), 4)
    assert not torch.equal(labels, other_labels) and not torch.equal(views, other_views)


def test_workers_do_not_change_albumentations_draws():
    bundle = load_dataset("synthetic", val_split=0)
    make = lambda workers: make_loader(
        bundle.train,
        bundle.spec,
        batch_size=16,
        train=True,
        device="cpu",  # noqa: E731
        augment=AugmentConfig(2, True, 4),
        backend="albumentations",
        num_workers=workers,
    )
    assert torch.equal(all_views(make(0), 1)[0], all_views(make(2), 1)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_view_draws_independently(backend):
    loader = make_loader(
        coded_split(200),
        UNIT_SPEC,
        batch_size=50,
        train=True,
        device="cpu",
        views=3,
        augment=AugmentConfig(crop_padding=2, hflip=True),
        backend=backend,
    )
    views, _ = all_views(loader)
    params = [[decode_view(v)[:3] for v in pixels_of(views[k, :, 0])] for k in range(3)]
    flips = np.array([[p[2] for p in view] for view in params])
    assert 0.35 < np.mean(flips[0] == flips[1]) < 0.65 and 0.35 < np.mean(flips[1] == flips[2]) < 0.65
    assert np.mean([a != b for a, b in zip(params[0], params[1])]) > 0.8


def test_eval_loader_is_ordered_plain_and_keeps_partial_batch():
    bundle = load_dataset("synthetic", val_split=0)
    loader = make_loader(bundle.test, bundle.spec, batch_size=10, train=False, device="cpu")
    assert len(loader) == 4 and loader.num_samples == 32
    views, labels = all_views(loader, epoch=7)
    mean = torch.tensor(bundle.spec.mean).view(3, 1, 1)
    std = torch.tensor(bundle.spec.std).view(3, 1, 1)
    assert views.shape == (1, 32, 3, 16, 16) and views.dtype == torch.float32
    assert torch.allclose(views[0], (bundle.test.images.float() / 255 - mean) / std)
    assert torch.equal(labels, bundle.test.labels)


def test_train_loader_drops_last_unless_nothing_is_left():
    bundle = load_dataset("synthetic", val_split=0)
    assert len(make_loader(bundle.train, bundle.spec, batch_size=10, train=True, device="cpu")) == 6
    assert len(make_loader(bundle.train, bundle.spec, batch_size=10, train=True, device="cpu", drop_last=False)) == 7
    tiny = make_loader(bundle.train, bundle.spec, batch_size=100, train=True, device="cpu")
    assert len(tiny) == 1 and next(iter(tiny.epoch(0))).views.shape[1] == 64


def test_shuffle_order_pinned_at_seed_zero():
    bundle = load_dataset("synthetic", val_split=0)
    loader = make_loader(bundle.train, bundle.spec, batch_size=8, train=True, device="cpu")
    labels = next(iter(loader.epoch(0))).labels
    seeded = torch.randperm(64, generator=torch.Generator().manual_seed(_epoch_seed(0, 0)))[:8] % 4
    assert torch.equal(labels, seeded)


def _epoch_seed(seed: int, epoch: int) -> int:
    from okdpipe.datasets.rng import STREAM_EPOCH, derive_seed

    return derive_seed(seed, epoch, STREAM_EPOCH)


def test_both_paths_identical_without_augmentation(tmp_path):
    bundle = load_dataset("synthetic", val_split=0, n_train=24, channels=3)
    tensor = make_loader(bundle.train, bundle.spec, batch_size=8, train=True, device="cpu", augment=AugmentConfig())
    albu = make_loader(
        bundle.train,
        bundle.spec,
        batch_size=8,
        train=True,
        device="cpu",
        augment=AugmentConfig(),
        backend="albumentations",
    )
    assert torch.equal(all_views(tensor, 2)[0], all_views(albu, 2)[0])
    # The same images written as PNG class folders and read back through imagefolder's decoder.
    images = bundle.train.images.permute(0, 2, 3, 1).numpy()
    write_class_folders(tmp_path / "train", images, bundle.train.labels.numpy(), list(bundle.spec.labels))
    folder = load_dataset("imagefolder", tmp_path, val_split=0, image_size=16)
    order = torch.argsort(bundle.train.labels, stable=True)
    from_files = make_loader(folder.train, bundle.spec, batch_size=8, train=False, device="cpu")
    in_memory = make_loader(bundle.train.subset(order), bundle.spec, batch_size=8, train=False, device="cpu")
    assert torch.equal(all_views(from_files)[0], all_views(in_memory)[0])


def test_unknown_backend_and_tensor_backend_on_files(tmp_path):
    from okdpipe.errors import OkdpipeError

    bundle = load_dataset("synthetic", val_split=0)
    with pytest.raises(OkdpipeError, match="unknown loader backend 'dali'"):
        make_loader(bundle.train, bundle.spec, batch_size=8, train=True, device="cpu", backend="dali")
    write_class_folders(tmp_path / "train", np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1]), ["a", "b"])
    files = FileSplit(sorted((tmp_path / "train").rglob("*.png")), torch.tensor([0, 1]), ImageDecoder((8, 8)))
    with pytest.raises(OkdpipeError, match="needs an in-memory split"):
        make_loader(files, bundle.spec, batch_size=8, train=True, device="cpu", backend="tensor")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to compare with the CPU")
def test_tensor_path_same_on_cpu_and_cuda():
    bundle = load_dataset("synthetic", val_split=0)
    config = AugmentConfig(2, True, 4)
    cpu = make_loader(bundle.train, bundle.spec, batch_size=16, train=True, device="cpu", views=2, augment=config)
    gpu = make_loader(bundle.train, bundle.spec, batch_size=16, train=True, device="cuda", views=2, augment=config)
    for a, b in zip(cpu.epoch(5), gpu.epoch(5)):
        assert b.views.device.type == "cuda"
        assert torch.allclose(a.views, b.views.cpu(), atol=1e-6) and torch.equal(a.labels, b.labels.cpu())
