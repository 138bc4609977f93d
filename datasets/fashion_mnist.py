"""Fashion-MNIST from its four IDX files (gzip or plain), parsed with NumPy; no download."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from okdpipe.datasets.spec import DATASETS, AugmentConfig, DatasetSpec
from okdpipe.datasets.splits import RawDataset, TensorSplit, check_labels, require_dir
from okdpipe.errors import OkdpipeError

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist package
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_UBYTE = 0x08

SPEC = DatasetSpec(
    name="fashion-mnist",
    num_classes=10,
    labels=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    in_channels=1,
    input_size=(28, 28),
    # Computed once over the 60000 training images scaled to [0, 1] (float64): 0.28604060, 0.35302424.
    mean=(0.2860,),
    std=(0.3530,),
    augment=AugmentConfig(crop_padding=2, hflip=True),
)


def parse_idx(raw: bytes, ndim: int, path: Path) -> np.ndarray:
    """An IDX array: 2 zero bytes, type code 0x08 (ubyte), ndim, ndim big-endian int32 sizes, then the data."""
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:2] != b"\0\0" or raw[2] != IDX_UBYTE or raw[3] != ndim:
        raise OkdpipeError(f"{path}: not a {ndim}-D unsigned-byte IDX file (bad magic number); re-download it")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "has trailing bytes"
        raise OkdpipeError(f"{path}: {problem} ({len(raw)} bytes, header says {expected}); re-download it")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_file_bytes(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise OkdpipeError(f"{path}: cannot read ({error}); re-download it") from error


def candidate_dirs(data_dir: Path | None) -> list[Path]:
    """An explicit data_dir is the only place looked at (itself or its fashion-mnist/); else env, then system."""
    if data_dir is not None:
        return [data_dir, data_dir / "fashion-mnist"]
    env_root = os.environ.get("OKDPIPE_DATA")
    return ([Path(env_root) / "fashion-mnist"] if env_root else []) + [SYSTEM_DIR]


def find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def locate(data_dir: Path | None) -> dict[str, Path]:
    """The first directory holding all four files (each .gz or uncompressed)."""
    if data_dir is not None:
        require_dir(data_dir)
    searched = candidate_dirs(data_dir)
    for directory in searched:
        found = {key: find_file(directory, stem) for key, stem in FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    raise OkdpipeError(
        f"Fashion-MNIST not found in {', '.join(map(str, searched))}: install it with "
        "`apt-get install dataset-fashion-mnist` or pass --data-dir DIR with the four IDX files"
    )


def load_pair(images_path: Path, labels_path: Path, digest: hashlib._Hash) -> TensorSplit:
    """One split; the raw (decompressed) bytes join `digest` so the fingerprint covers exactly what was parsed."""
    images_raw, labels_raw = read_file_bytes(images_path), read_file_bytes(labels_path)
    digest.update(images_raw)
    digest.update(labels_raw)
    images, labels = parse_idx(images_raw, 3, images_path), parse_idx(labels_raw, 1, labels_path)
    if images.shape[1:] != SPEC.input_size:
        raise OkdpipeError(f"{images_path}: images are {images.shape[1:]}, Fashion-MNIST is 28x28; wrong file")
    if len(images) != len(labels):
        raise OkdpipeError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path.name}")
    check_labels(labels, SPEC.num_classes, labels_path)
    return TensorSplit(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(data_dir: Path | None = None) -> RawDataset:
    """Zalando's Fashion-MNIST: 60000 train / 10000 test, 28x28 grayscale, 10 classes.

    Fingerprint: sha256 over the decompressed bytes of train images, train labels, test images, test labels.
    """
    paths = locate(data_dir)
    digest = hashlib.sha256()
    train = load_pair(paths["train_images"], paths["train_labels"], digest)
    test = load_pair(paths["test_images"], paths["test_labels"], digest)
    return RawDataset(SPEC, train, test, digest.hexdigest(), str(paths["train_images"].parent))
