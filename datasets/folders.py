"""Datasets stored as class folders of image files: CINIC-10 (decoded into memory) and any `imagefolder`."""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from okdpipe.datasets.spec import DATASETS, AugmentConfig, DatasetSpec
from okdpipe.datasets.splits import FileSplit, RawDataset, Split, TensorSplit, require_dir
from okdpipe.errors import OkdpipeError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# One-channel images: the average of ImageNet's three channel statistics.
IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD = (0.449,), (0.226,)
CINIC_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class ImageDecoder:
    """File -> HWC uint8 at `size` (H, W) with `channels` (1 or 3); picklable so DataLoader workers can use it.

    Grayscale becomes RGB by repeating the channel, RGBA/P/CMYK become RGB (alpha dropped), 16-bit images keep
    their top 8 bits. With resize=False an image of another size is an error (fixed-size datasets like CINIC-10).
    """

    size: tuple[int, int]
    channels: int = 3
    resize: bool = True

    def __call__(self, path: Path) -> np.ndarray:
        return self.decode(path.read_bytes(), path)

    def decode(self, raw: bytes, path: Path) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(raw)) as image:
                image = self.to_mode(image)
                if image.size != (self.size[1], self.size[0]):
                    image = self.fit(image, path)
                pixels = np.array(image, dtype=np.uint8)  # a writable copy for torch.from_numpy
        except OkdpipeError:
            raise
        except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
            raise OkdpipeError(f"{path}: cannot decode image ({error}); replace or delete the file") from error
        return pixels[:, :, None] if pixels.ndim == 2 else pixels

    def to_mode(self, image: Image.Image) -> Image.Image:
        if image.mode in SIXTEEN_BIT_MODES:
            image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
        return image.convert("RGB" if self.channels == 3 else "L")

    def fit(self, image: Image.Image, path: Path) -> Image.Image:
        if not self.resize:
            height, width = self.size
            raise OkdpipeError(f"{path}: image is {image.height}x{image.width}, expected {height}x{width}")
        return image.resize((self.size[1], self.size[0]), Image.BILINEAR)


def list_images(class_dir: Path) -> list[Path]:
    """Image files of one class folder (sorted; hidden and non-image files ignored); empty -> error naming it."""
    files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise OkdpipeError(f"{class_dir}: class folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def class_names(split_dir: Path) -> tuple[str, ...]:
    names = tuple(sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not names:
        raise OkdpipeError(f"{split_dir}: no class folders; expected {split_dir}/<class>/<image files>")
    return names


def scan_split(split_dir: Path, classes: tuple[str, ...]) -> tuple[list[Path], torch.Tensor]:
    """All image paths of a split in class order, and their labels; the split must have exactly `classes`."""
    found = class_names(split_dir)
    if found != classes:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise OkdpipeError(
            f"{split_dir}: class folders differ from the training set's (missing {missing}, extra {extra})"
        )
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = list_images(split_dir / name)
        paths += files
        labels += [label] * len(files)
    return paths, torch.tensor(labels, dtype=torch.int64)


def check_header(path: Path) -> None:
    """Open the header only, so unreadable files fail at load time with their name, not inside a worker."""
    try:
        with Image.open(path):
            pass
    except Exception as error:
        raise OkdpipeError(f"{path}: cannot read image ({error}); replace or delete the file") from error


def decode_into_memory(paths: list[Path], decoder: ImageDecoder, root: Path, digest: hashlib._Hash) -> torch.Tensor:
    """Decode every file once (threads: PIL releases the GIL) into uint8 [N, C, H, W]; hash path + bytes."""
    raws = [p.read_bytes() for p in paths]
    for path, raw in zip(paths, raws):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + raw)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        images = list(pool.map(decoder.decode, raws, paths))
    height, width = decoder.size
    stacked = np.stack(images) if images else np.zeros((0, height, width, decoder.channels), np.uint8)
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()


def memory_split(split_dir: Path, classes: tuple[str, ...], decoder: ImageDecoder, root: Path, digest) -> TensorSplit:
    paths, labels = scan_split(split_dir, classes)
    return TensorSplit(decode_into_memory(paths, decoder, root, digest), labels)


def require_subdir(root: Path, name: str, layout: str) -> Path:
    if not (root / name).is_dir():
        raise OkdpipeError(f"{root / name}: missing; expected the layout {layout}")
    return root / name


@DATASETS.register("cinic10")
def load_cinic10(data_dir: Path | None = None) -> RawDataset:
    """CINIC-10 (Darlow et al. 2018): train/valid/test of 90000 32x32 RGB PNGs each, CIFAR-10's classes.

    Its official `valid` split is the validation split (load_dataset's val_split is ignored here). Everything is
    decoded once into memory for the tensor path. Fingerprint: sha256 over each file's relative path and bytes.
    """
    if data_dir is None:
        raise OkdpipeError("pass --data-dir DIR holding CINIC-10's train/, valid/ and test/ folders")
    require_dir(data_dir)
    layout = f"{data_dir}/{{train,valid,test}}/<class>/*.png"
    decoder, digest = ImageDecoder((32, 32), 3, resize=False), hashlib.sha256()
    train_dir = require_subdir(data_dir, "train", layout)
    classes = class_names(train_dir)
    splits = [
        memory_split(require_subdir(data_dir, n, layout), classes, decoder, data_dir, digest)
        for n in ("train", "valid", "test")
    ]
    spec = DatasetSpec(
        name="cinic10",
        num_classes=len(classes),
        labels=classes,
        in_channels=3,
        input_size=(32, 32),
        # Statistics published with CINIC-10 (train + valid).
        mean=(0.47889522, 0.47227842, 0.43047404),
        std=(0.24205776, 0.23828046, 0.25874835),
        augment=AugmentConfig(crop_padding=4, hflip=True),
    )
    return RawDataset(spec, splits[0], splits[2], digest.hexdigest(), str(data_dir), val=splits[1])


def stat_fingerprint(paths: list[Path], root: Path) -> str:
    """sha256 over sorted (relative path, size, mtime_ns): cheap for large folders, changes when any file does."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def file_split(split_dir: Path, classes: tuple[str, ...], decoder: ImageDecoder, every: list[Path]) -> FileSplit:
    paths, labels = scan_split(split_dir, classes)
    for path in paths:
        check_header(path)
    every += paths
    return FileSplit(paths, labels, decoder)


def optional_dir(root: Path, *names: str) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def folder_spec(classes: tuple[str, ...], channels: int, image_size: int) -> DatasetSpec:
    """ImageNet's mean/std (a generic natural-image prior; the folder's own statistics are not computed)."""
    if channels not in (1, 3):
        raise OkdpipeError(f"channels must be 1 or 3, got {channels}")
    if image_size < 1:
        raise OkdpipeError(f"image_size must be a positive number of pixels, got {image_size}")
    rgb = channels == 3
    return DatasetSpec(
        name="imagefolder",
        num_classes=len(classes),
        labels=classes,
        in_channels=channels,
        input_size=(image_size, image_size),
        mean=IMAGENET_MEAN if rgb else IMAGENET_GRAY_MEAN,
        std=IMAGENET_STD if rgb else IMAGENET_GRAY_STD,
        # CIFAR's recipe (pad 4 of 32) scaled to the image size.
        augment=AugmentConfig(crop_padding=max(1, image_size // 8), hflip=True),
    )


@DATASETS.register("imagefolder")
def load_imagefolder(data_dir: Path | None = None, *, image_size: int = 32, channels: int = 3) -> RawDataset:
    """`data_dir/train/<class>/*`, optional `val/` or `valid/` (else val_split is held out of train), optional
    `test/` (else empty). Classes are train's sorted folder names; val/test must have the same folders.

    Images are decoded on demand (albumentations path), resized to image_size x image_size. Fingerprint:
    sha256 over sorted relative paths, sizes and mtimes, not contents.
    """
    if data_dir is None:
        raise OkdpipeError("pass --data-dir DIR holding train/<class>/<images> (and optionally val/, test/)")
    require_dir(data_dir)
    train_dir = require_subdir(data_dir, "train", f"{data_dir}/train/<class>/<images>")
    classes = class_names(train_dir)
    spec = folder_spec(classes, channels, image_size)
    decoder, every = ImageDecoder(spec.input_size, channels), []
    train = file_split(train_dir, classes, decoder, every)
    val_dir, test_dir = optional_dir(data_dir, "val", "valid"), optional_dir(data_dir, "test")
    val = file_split(val_dir, classes, decoder, every) if val_dir else None
    test: Split = file_split(test_dir, classes, decoder, every) if test_dir else FileSplit([], torch.zeros(0), decoder)
    return RawDataset(spec, train, test, stat_fingerprint(every, data_dir), str(data_dir), val=val)
