"""Tiny datasets written in each official on-disk format, for tests (import: `from datafixtures import ...`).

Every image is distinct: pixel (0, 0) of channel 0 holds its index within the split (mod 256), so tests can
tell which images landed where.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def tagged_images(count: int, shape: tuple[int, ...], num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images [count, *shape] with index tags, and balanced labels cycling through the classes."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, *shape), dtype=np.uint8)
    images.reshape(count, -1)[:, 0] = np.arange(count) % 256
    return images, (np.arange(count) % num_classes).astype(np.uint8)


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: two zero bytes, 0x08 (unsigned byte), ndim, big-endian int32 sizes, then the data."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    raw = idx_bytes(array)
    target = path.with_name(path.name + ".gz") if compress else path
    target.write_bytes(gzip.compress(raw) if compress else raw)
    return target


def write_fashion(root: Path, n_train: int = 40, n_test: int = 20, compress: bool = True) -> dict[str, np.ndarray]:
    """The four Fashion-MNIST IDX files (28x28, 10 classes) in `root`; returns the arrays written."""
    root.mkdir(parents=True, exist_ok=True)
    train_x, train_y = tagged_images(n_train, (28, 28), 10, seed=1)
    test_x, test_y = tagged_images(n_test, (28, 28), 10, seed=2)
    arrays = dict(zip(FASHION_FILES, (train_x, train_y, test_x, test_y)))
    for name, array in arrays.items():
        write_idx(root / name, array, compress)
    return arrays


def write_pickle(path: Path, content: dict) -> None:
    path.write_bytes(pickle.dumps(content, protocol=2))  # the official files are Python 2 pickles


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 20) -> Path:
    """cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta under `root`."""
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    for i in range(1, 6):
        images, labels = tagged_images(per_batch, (3072,), 10, seed=i)
        write_pickle(directory / f"data_batch_{i}", {b"data": images, b"labels": labels.tolist()})
    images, labels = tagged_images(n_test, (3072,), 10, seed=9)
    write_pickle(directory / "test_batch", {b"data": images, b"labels": labels.tolist()})
    write_pickle(directory / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return directory


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100) -> Path:
    """cifar-100-python/ with train, test (fine and coarse labels) and meta under `root`."""
    directory = root / "cifar-100-python"
    directory.mkdir(parents=True)
    for name, count, seed in (("train", n_train, 1), ("test", n_test, 2)):
        images, labels = tagged_images(count, (3072,), 100, seed)
        write_pickle(
            directory / name,
            {b"data": images, b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist()},
        )
    write_pickle(
        directory / "meta",
        {
            b"fine_label_names": [f"f{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"k{i}".encode() for i in range(20)],
        },
    )
    return directory


def write_class_folders(split_dir: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    """PNG files split_dir/<class>/<index>.png from uint8 HWC (or HW) images."""
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = split_dir / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image).save(
            folder / f"{index:05d}.png"
        )


def write_image_folder(root: Path, splits: dict[str, int], classes: list[str], size: int = 32) -> dict[str, tuple]:
    """root/<split>/<class>/*.png with `splits[name]` RGB images each; returns {split: (images, labels)}."""
    written = {}
    for seed, (name, count) in enumerate(splits.items()):
        images, labels = tagged_images(count, (size, size, 3), len(classes), seed)
        write_class_folders(root / name, images, labels, classes)
        written[name] = (images, labels)
    return written


# --- image folders as people have them, from Fashion-MNIST's real images -----------------------------------------

REAL_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
QUIRKY_CLASSES = {"trouser": 1, "bag": 8, "sneaker": 7}  # folder name -> Fashion-MNIST label


def real_fashion_images(per_label: dict[int, int]) -> dict[int, np.ndarray]:
    """The first `count` real 28x28 test images of each Fashion-MNIST label, uint8 [count, 28, 28]."""
    with gzip.open(REAL_FASHION_DIR / "t10k-images-idx3-ubyte.gz") as images_file:
        images = np.frombuffer(images_file.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(REAL_FASHION_DIR / "t10k-labels-idx1-ubyte.gz") as labels_file:
        labels = np.frombuffer(labels_file.read(), np.uint8, offset=8)
    return {label: images[labels == label][:count] for label, count in per_label.items()}


def quirky_image(gray: np.ndarray, variant: int) -> tuple[Image.Image, str, dict]:
    """One real image in the variant-th of a cycle of modes, sizes and formats people's folders hold."""
    image = Image.fromarray(gray)
    wide = np.repeat(gray, 2, axis=1)  # 28 x 56: a non-square image
    cycle = [
        (image, ".png", {}),
        (image.convert("RGB").resize((40, 40)), ".jpg", {"quality": 90}),
        (image.convert("RGBA"), ".png", {}),
        (image.convert("P"), ".gif", {}),
        (Image.fromarray(gray.astype(np.uint16) * 257), ".png", {}),  # 16-bit
        (Image.fromarray(wide).convert("LA"), ".png", {}),
        (image.convert("CMYK"), ".jpg", {"quality": 95}),
        (image.resize((20, 20)), ".PNG", {}),  # upper-case suffix, smaller than the model input
    ]
    return cycle[variant % len(cycle)]


def write_quirky_fashion_folder(root: Path, per_class: dict[str, int]) -> dict[str, Path]:
    """root/train/<class>/... from real Fashion-MNIST images with every quirk: no val/ or test/ (validation held
    out of train), modes L/RGB/RGBA/P/I;16/LA/CMYK, sizes 20-56 px, PNG/JPEG/GIF, a nested folder, one truncated
    PNG, hidden files, a stray text file, and classes as unbalanced as `per_class` says.
    Returns the notable paths: "truncated", "png" and "jpeg" (good images to send to a server)."""
    images = real_fashion_images({QUIRKY_CLASSES[name]: count for name, count in per_class.items()})
    notable = {}
    for name, count in per_class.items():
        folder = root / "train" / name
        for index, gray in enumerate(images[QUIRKY_CLASSES[name]][:count]):
            image, suffix, options = quirky_image(gray, index)
            target = folder / ("nested" if index % 5 == 4 else "") / f"{name}-{index:03d}{suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target, **options)
            notable.setdefault("png" if suffix == ".png" else "jpeg" if suffix == ".jpg" else "other", target)
    first = next(iter(per_class))
    truncated = root / "train" / first / "truncated.png"
    full = io.BytesIO()
    Image.fromarray(images[QUIRKY_CLASSES[first]][0]).save(full, "PNG")
    truncated.write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (root / "train" / first / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train" / first / "._photo.png").write_bytes(b"\0\5\26\7 resource fork")  # macOS zip leftovers
    (root / "train" / first / "notes.txt").write_text("shot on a phone\n")
    (root / "train" / ".cache").mkdir()
    return {**notable, "truncated": truncated}
