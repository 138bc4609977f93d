"""CIFAR-10 and CIFAR-100 from the official python-pickle directories; never downloads."""

from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from okdpipe.datasets.spec import DATASETS, AugmentConfig, DatasetSpec
from okdpipe.datasets.splits import RawDataset, TensorSplit, check_labels, require_dir
from okdpipe.errors import OkdpipeError

CIFAR_AUGMENT = AugmentConfig(crop_padding=4, hflip=True)  # the standard recipe (He et al. 2016)
PIXELS_PER_IMAGE = 3 * 32 * 32

# Only what NumPy arrays need: the official files are pickles, and a pickle may otherwise run arbitrary code.
SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes into protocol-2 pickles (files re-saved from Python 3)
}


class ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its splits and which pickle keys hold labels and label names."""

    directory: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int


CIFAR10 = CifarLayout(
    "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test_batch",
    "batches.meta",
    b"labels",
    b"label_names",
    10,
)
CIFAR100 = CifarLayout("cifar-100-python", ("train",), "test", "meta", b"fine_labels", b"fine_label_names", 100)


def unpickle(path: Path, digest: hashlib._Hash) -> dict:
    """A dict from an official pickle (Python 2 era, hence encoding="bytes"); any damage -> one line naming it."""
    try:
        raw = path.read_bytes()
        content = ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except FileNotFoundError as error:
        raise OkdpipeError(f"{path}: missing; the official directory needs all its files") from error
    except Exception as error:  # pickle raises many types for damaged input
        raise OkdpipeError(f"{path}: corrupt or truncated pickle ({type(error).__name__}); re-download it") from error
    if not isinstance(content, dict):
        raise OkdpipeError(f"{path}: expected a dict in the pickle, found {type(content).__name__}")
    digest.update(raw)
    return content


def entry(content: dict, key: bytes, path: Path):  # noqa: ANN201 - whatever the pickle holds
    if key not in content:
        raise OkdpipeError(f"{path}: no {key.decode()!r} entry; not a {path.parent.name} file")
    return content[key]


def read_batch(path: Path, layout: CifarLayout, digest: hashlib._Hash) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 3, 32, 32] (the files store rows of 3072 = R plane, G plane, B plane) and labels."""
    content = unpickle(path, digest)
    data = np.asarray(entry(content, b"data", path))
    labels = np.asarray(entry(content, layout.label_key, path), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS_PER_IMAGE or len(data) != len(labels):
        raise OkdpipeError(
            f"{path}: data is {data.dtype} {data.shape} with {len(labels)} labels, expected uint8 [N, 3072]; corrupt"
        )
    check_labels(labels, layout.num_classes, path)
    return data.reshape(-1, 3, 32, 32), labels


def read_split(directory: Path, names: tuple[str, ...], layout: CifarLayout, digest: hashlib._Hash) -> TensorSplit:
    parts = [read_batch(directory / name, layout, digest) for name in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return TensorSplit(torch.from_numpy(images), torch.from_numpy(labels))


def read_label_names(directory: Path, layout: CifarLayout, digest: hashlib._Hash) -> tuple[str, ...]:
    path = directory / layout.meta_file
    names = tuple(n.decode() for n in entry(unpickle(path, digest), layout.names_key, path))
    if len(names) != layout.num_classes:
        raise OkdpipeError(f"{path}: {len(names)} label names, expected {layout.num_classes}; corrupt")
    return names


def locate(data_dir: Path | None, layout: CifarLayout) -> Path:
    """`data_dir` itself when it is the official directory, else `data_dir/<official name>`."""
    if data_dir is None:
        raise OkdpipeError(f"pass --data-dir DIR containing {layout.directory}/ (the official python version)")
    require_dir(data_dir)
    for candidate in (data_dir, data_dir / layout.directory):
        if (candidate / layout.test_file).is_file():
            return candidate
    raise OkdpipeError(
        f"{layout.directory} not found in {data_dir}: expected {layout.test_file} in {data_dir} "
        f"or {data_dir / layout.directory}; unpack the official python version there"
    )


def load_cifar(data_dir: Path | None, layout: CifarLayout, spec_fields: dict) -> RawDataset:
    """Fingerprint: sha256 over the raw bytes of meta, then train, then test pickles (the order read)."""
    directory = locate(data_dir, layout)
    digest = hashlib.sha256()
    names = read_label_names(directory, layout, digest)
    train = read_split(directory, layout.train_files, layout, digest)
    test = read_split(directory, (layout.test_file,), layout, digest)
    spec = DatasetSpec(
        num_classes=layout.num_classes,
        labels=names,
        in_channels=3,
        input_size=(32, 32),
        augment=CIFAR_AUGMENT,
        **spec_fields,
    )
    return RawDataset(spec, train, test, digest.hexdigest(), str(directory))


@DATASETS.register("cifar10")
def load_cifar10(data_dir: Path | None = None) -> RawDataset:
    """CIFAR-10 (Krizhevsky 2009): 50000 train / 10000 test, 32x32 RGB, 10 classes."""
    # Per-channel statistics of the 50000 training images (true pixel std, not the often-copied 0.2023...).
    stats = {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)}
    return load_cifar(data_dir, CIFAR10, {"name": "cifar10", **stats})


@DATASETS.register("cifar100")
def load_cifar100(data_dir: Path | None = None) -> RawDataset:
    """CIFAR-100 with its 100 fine labels: 50000 train / 10000 test, 32x32 RGB."""
    stats = {"mean": (0.5071, 0.4865, 0.4409), "std": (0.2673, 0.2564, 0.2762)}
    return load_cifar(data_dir, CIFAR100, {"name": "cifar100", **stats})
