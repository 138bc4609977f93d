"""okdpipe.datasets loaders: every on-disk format, the val/subset logic, and every error naming its file."""

from __future__ import annotations

import gzip
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from datafixtures import (
    FASHION_FILES,
    idx_bytes,
    tagged_images,
    write_cifar10,
    write_cifar100,
    write_class_folders,
    write_fashion,
    write_idx,
    write_image_folder,
    write_pickle,
)
from PIL import Image

from okdpipe.datasets import DATASETS, FileSplit, TensorSplit, fashion_mnist, load_dataset
from okdpipe.datasets.decoding import ImageDecoder
from okdpipe.datasets.splits import stratified_holdout
from okdpipe.errors import OkdpipeError

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_registry_has_every_dataset():
    """okdpipe's own loaders; an installed plug-in (examples/plugin in CI) may add more, from its own module."""
    own = [name for name in DATASETS.names() if DATASETS.get(name).__module__.startswith("okdpipe.")]
    assert own == ["cifar10", "cifar100", "cinic10", "fashion-mnist", "imagefolder", "synthetic"]


# --- Fashion-MNIST ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_reads_idx_files(tmp_path, compress):
    arrays = write_fashion(tmp_path, compress=compress)
    bundle = load_dataset("fashion-mnist", tmp_path, val_split=0)
    train_x, train_y, test_x, test_y = arrays.values()
    assert bundle.train.images.shape == (40, 1, 28, 28) and bundle.train.images.dtype == torch.uint8
    assert bundle.train.labels.dtype == torch.int64 and len(bundle.val) == 0
    assert torch.equal(bundle.train.images[:, 0], torch.from_numpy(train_x))
    assert torch.equal(bundle.test.labels, torch.from_numpy(test_y).long())
    assert bundle.spec.labels[0] == "T-shirt/top" and bundle.spec.labels[9] == "Ankle boot"
    assert (bundle.spec.in_channels, bundle.spec.input_size) == (1, (28, 28))
    expected = hashlib.sha256(b"".join(idx_bytes(a) for a in (train_x, train_y, test_x, test_y))).hexdigest()
    assert bundle.fingerprint == expected and bundle.source == str(tmp_path)


def test_fashion_found_in_subdir_and_env(tmp_path, monkeypatch):
    write_fashion(tmp_path / "fashion-mnist")
    assert len(load_dataset("fashion-mnist", tmp_path, val_split=0).train) == 40
    monkeypatch.setenv("OKDPIPE_DATA", str(tmp_path))
    assert load_dataset("fashion-mnist").source == str(tmp_path / "fashion-mnist")


def test_fashion_not_found_lists_searched_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("OKDPIPE_DATA", str(tmp_path))
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(OkdpipeError) as error:
        load_dataset("fashion-mnist")
    message = str(error.value)
    assert str(tmp_path / "fashion-mnist") in message and str(tmp_path / "nowhere") in message
    assert "apt-get install dataset-fashion-mnist" in message and "\n" not in message


def corrupt_truncated(path: Path) -> None:
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-5]))


def corrupt_magic(path: Path) -> None:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[2] = 0x0D  # float type code
    path.write_bytes(gzip.compress(bytes(raw)))


def corrupt_gzip(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:30])


@pytest.mark.parametrize(
    "damage, problem", [(corrupt_truncated, "truncated"), (corrupt_magic, "magic"), (corrupt_gzip, "cannot read")]
)
def test_fashion_damaged_file_named(tmp_path, damage, problem):
    write_fashion(tmp_path)
    target = tmp_path / "train-images-idx3-ubyte.gz"
    damage(target)
    with pytest.raises(OkdpipeError, match=problem) as error:
        load_dataset("fashion-mnist", tmp_path)
    assert str(target) in str(error.value)


def test_fashion_wrong_shape_and_bad_labels_named(tmp_path):
    write_fashion(tmp_path)
    write_idx(tmp_path / FASHION_FILES[2], np.zeros((20, 27, 28), np.uint8))
    with pytest.raises(OkdpipeError, match="28x28") as error:
        load_dataset("fashion-mnist", tmp_path)
    assert "t10k-images-idx3-ubyte.gz" in str(error.value)
    write_fashion(tmp_path)
    write_idx(tmp_path / FASHION_FILES[1], np.full(40, 10, np.uint8))
    with pytest.raises(OkdpipeError, match="labels out of range.*train-labels|train-labels.*labels out of range"):
        load_dataset("fashion-mnist", tmp_path)


def test_fashion_count_mismatch_and_missing_dir(tmp_path):
    write_fashion(tmp_path)
    write_idx(tmp_path / FASHION_FILES[3], np.zeros(19, np.uint8))
    with pytest.raises(OkdpipeError, match="t10k-labels-idx1-ubyte.gz: 19 labels for 20 images"):
        load_dataset("fashion-mnist", tmp_path)
    with pytest.raises(OkdpipeError, match="no such data directory") as error:
        load_dataset("fashion-mnist", tmp_path / "absent")
    assert str(tmp_path / "absent") in str(error.value)


@pytest.mark.skipif(
    not REAL_FASHION.is_dir(),
    reason="real Fashion-MNIST not installed at /usr/share/datasets/fashion-mnist "
    "(apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_matches_spec():
    bundle = load_dataset("fashion-mnist", REAL_FASHION, val_split=0)
    assert (len(bundle.train), len(bundle.test)) == (60000, 10000)
    assert torch.equal(torch.bincount(bundle.train.labels), torch.full((10,), 6000))
    pixels = bundle.train.images.double() / 255
    assert round(pixels.mean().item(), 3) == round(bundle.spec.mean[0], 3)
    assert round(pixels.std().item(), 3) == round(bundle.spec.std[0], 3)


# --- CIFAR -------------------------------------------------------------------------------------------------------


def test_cifar10_reads_official_pickles(tmp_path):
    directory = write_cifar10(tmp_path)
    for data_dir in (tmp_path, directory):  # the official dir itself, or its parent
        bundle = load_dataset("cifar10", data_dir, val_split=0)
        assert bundle.train.images.shape == (100, 3, 32, 32) and bundle.test.images.shape == (20, 3, 32, 32)
    first = pickle.loads((directory / "data_batch_1").read_bytes(), encoding="bytes")
    # Each row is the R plane, then G, then B, each row-major.
    assert torch.equal(bundle.train.images[0].flatten(), torch.from_numpy(first[b"data"][0]))
    assert bundle.train.labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert bundle.spec.labels == tuple(f"c{i}" for i in range(10)) and bundle.spec.augment.crop_padding == 4


def test_cifar100_uses_fine_labels(tmp_path):
    write_cifar100(tmp_path)
    bundle = load_dataset("cifar100", tmp_path, val_split=0)
    assert bundle.spec.num_classes == 100 and bundle.spec.labels[99] == "f99"
    assert bundle.train.labels.max().item() == 99 and len(bundle.test) == 100


def cifar_damages(directory: Path) -> dict[str, tuple[Path, str]]:
    batch = directory / "data_batch_3"
    return {
        "garbage": (batch, "corrupt or truncated pickle"),
        "truncated": (batch, "corrupt or truncated pickle"),
        "size": (batch, "expected uint8"),
        "labels": (batch, "labels out of range"),
        "missing": (directory / "test_batch", "not found"),
        "code": (batch, "corrupt or truncated pickle"),
    }


def damage_cifar(kind: str, path: Path) -> None:
    if kind == "garbage":
        path.write_bytes(b"not a pickle at all")
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    elif kind == "size":
        write_pickle(path, {b"data": np.zeros((20, 3000), np.uint8), b"labels": [0] * 20})
    elif kind == "labels":
        write_pickle(path, {b"data": np.zeros((20, 3072), np.uint8), b"labels": [10] * 20})
    elif kind == "missing":
        path.unlink()
    else:  # a pickle that would run code must be refused, not executed
        path.write_bytes(pickle.dumps(eval, protocol=2))


@pytest.mark.parametrize("kind", ["garbage", "truncated", "size", "labels", "missing", "code"])
def test_cifar_damage_named(tmp_path, kind):
    directory = write_cifar10(tmp_path)
    path, problem = cifar_damages(directory)[kind]
    damage_cifar(kind, path)
    with pytest.raises(OkdpipeError, match=problem) as error:
        load_dataset("cifar10", tmp_path)
    assert path.name in str(error.value) and "\n" not in str(error.value)


def test_cifar_needs_data_dir(tmp_path):
    with pytest.raises(OkdpipeError, match="cifar-100-python"):
        load_dataset("cifar100")
    with pytest.raises(OkdpipeError, match="no such data directory"):
        load_dataset("cifar100", tmp_path / "absent")


# --- CINIC-10 and image folders ----------------------------------------------------------------------------------

CLASSES = ["cat", "dog", "emu"]


def test_cinic10_uses_its_valid_split(tmp_path):
    written = write_image_folder(tmp_path, {"train": 9, "valid": 6, "test": 3}, CLASSES)
    bundle = load_dataset("cinic10", tmp_path, val_split=0.5)  # val_split ignored: CINIC ships `valid`
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (9, 6, 3)
    assert bundle.spec.labels == tuple(CLASSES) and bundle.train.images.shape == (9, 3, 32, 32)
    images, labels = written["valid"]
    order = np.argsort(labels, kind="stable")  # folders list images class by class
    assert torch.equal(bundle.val.images, torch.from_numpy(images[order]).permute(0, 3, 1, 2))
    assert bundle.val.labels.tolist() == labels[order].tolist()


def test_cinic10_wrong_size_named(tmp_path):
    write_image_folder(tmp_path, {"train": 3, "valid": 3, "test": 3}, CLASSES)
    bad = tmp_path / "test" / "dog" / "00001.png"
    Image.new("RGB", (31, 32)).save(bad)
    with pytest.raises(OkdpipeError, match="expected 32x32") as error:
        load_dataset("cinic10", tmp_path)
    assert str(bad) in str(error.value)


def test_imagefolder_holds_out_val_when_absent(tmp_path):
    write_image_folder(tmp_path, {"train": 30, "test": 6}, CLASSES, size=20)
    bundle = load_dataset("imagefolder", tmp_path, val_split=0.2, image_size=16)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (24, 6, 6)
    assert torch.equal(torch.bincount(bundle.val.labels), torch.tensor([2, 2, 2]))
    images, labels = next(bundle.test.iter_batches(4))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert bundle.spec.mean == (0.485, 0.456, 0.406) and bundle.spec.input_size == (16, 16)


def test_imagefolder_val_folder_and_no_test(tmp_path):
    write_image_folder(tmp_path, {"train": 6, "valid": 3}, CLASSES)
    bundle = load_dataset("imagefolder", tmp_path)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (6, 3, 0)
    assert list(bundle.test.iter_batches(4)) == []


def test_imagefolder_converts_modes_and_channels(tmp_path):
    write_image_folder(tmp_path, {"train": 3}, CLASSES)
    Image.new("RGBA", (32, 32), (10, 20, 30, 0)).save(tmp_path / "train" / "cat" / "rgba.png")
    Image.new("L", (32, 32), 77).save(tmp_path / "train" / "dog" / "gray.png")
    Image.new("P", (32, 32), 3).save(tmp_path / "train" / "emu" / "palette.png")
    bundle = load_dataset("imagefolder", tmp_path, val_split=0)
    # Class by class, sorted by name: cat/00000 cat/rgba dog/00001 dog/gray emu/00002 emu/palette.
    assert bundle.train.read(1)[0, 0].tolist() == [10, 20, 30]
    assert bundle.train.read(3)[0, 0].tolist() == [77, 77, 77]
    gray = load_dataset("imagefolder", tmp_path, val_split=0, channels=1)
    assert gray.spec.in_channels == 1 and gray.train.read(3).shape == (32, 32, 1)
    assert gray.train.read(3)[0, 0].tolist() == [77]


def make_folder_problem(root: Path, kind: str) -> Path:
    write_image_folder(root, {"train": 6, "test": 3}, CLASSES)
    if kind == "empty class":
        (root / "train" / "fox").mkdir()
        return root / "train" / "fox"
    if kind == "unreadable":
        (root / "train" / "cat" / "bad.png").write_bytes(b"\x89PNG garbage")
        return root / "train" / "cat" / "bad.png"
    if kind == "class mismatch":
        (root / "test" / "emu").rename(root / "test" / "yak")
        return root / "test"
    for child in (root / "train").iterdir():  # "no classes"
        for f in child.iterdir():
            f.unlink()
        child.rmdir()
    return root / "train"


@pytest.mark.parametrize(
    "kind, problem",
    [
        ("empty class", "no images"),
        ("unreadable", "1 unreadable image file"),
        ("class mismatch", "missing \\['emu'\\]"),
        ("no classes", "no class folders"),
    ],
)
def test_imagefolder_problems_named(tmp_path, kind, problem):
    culprit = make_folder_problem(tmp_path, kind)
    with pytest.raises(OkdpipeError, match=problem) as error:
        load_dataset("imagefolder", tmp_path)
    assert str(culprit) in str(error.value)


def test_decode_error_names_file(tmp_path):
    write_image_folder(tmp_path, {"train": 3}, CLASSES)
    victim = tmp_path / "train" / "dog" / "00001.png"
    victim.write_bytes(victim.read_bytes()[:60])  # header intact, pixel data gone
    split = FileSplit([victim], torch.zeros(1), ImageDecoder((32, 32)))
    with pytest.raises(OkdpipeError, match="cannot decode image") as error:
        split.read(0)
    assert str(victim) in str(error.value)


def test_imagefolder_fingerprint_follows_files(tmp_path):
    write_image_folder(tmp_path, {"train": 6}, CLASSES)
    first = load_dataset("imagefolder", tmp_path).fingerprint
    assert load_dataset("imagefolder", tmp_path).fingerprint == first
    write_class_folders(tmp_path / "train", *tagged_images(1, (32, 32, 3), 1, seed=5), ["cat"])
    assert load_dataset("imagefolder", tmp_path).fingerprint != first


# --- synthetic, val split, subset, options -----------------------------------------------------------------------


def test_synthetic_is_deterministic_and_balanced():
    a, b = load_dataset("synthetic", val_split=0), load_dataset("synthetic", val_split=0)
    assert a.fingerprint == b.fingerprint and torch.equal(a.train.images, b.train.images)
    assert load_dataset("synthetic", data_seed=1).fingerprint != a.fingerprint
    assert a.train.images.shape == (64, 3, 16, 16) and len(a.test) == 32
    assert torch.equal(torch.bincount(a.train.labels), torch.full((4,), 16))
    small = load_dataset("synthetic", num_classes=3, size=8, channels=1, n_train=9, n_test=0, val_split=0)
    assert small.train.images.shape == (9, 1, 8, 8) and len(small.test) == 0 and small.spec.num_classes == 3


def indexed_split(labels: list[int]) -> TensorSplit:
    """Images whose first pixel is their index, so a split's members can be identified."""
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1)
    return TensorSplit(images, torch.tensor(labels))


def members(split) -> set[int]:
    return set(split.images.flatten().tolist())


def test_stratified_holdout_proportions_determinism_disjoint():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    split = indexed_split(labels)
    train, val = stratified_holdout(split, 0.1, 3, seed=0)
    assert torch.bincount(val.labels).tolist() == [5, 3, 2] and len(train) == 90
    assert members(train).isdisjoint(members(val)) and members(train) | members(val) == set(range(100))
    again_train, again_val = stratified_holdout(split, 0.1, 3, seed=0)
    assert members(again_val) == members(val)
    assert members(stratified_holdout(split, 0.1, 3, seed=1)[1]) != members(val)
    assert train.images.flatten().tolist() == sorted(members(train))  # original order kept


def test_load_dataset_val_split_and_subset():
    bundle = load_dataset("synthetic", n_train=80, val_split=0.25, seed=3, train_subset=10)
    assert torch.bincount(bundle.val.labels).tolist() == [5, 5, 5, 5]
    assert torch.bincount(bundle.train.labels).tolist() == [10, 10, 10, 10]
    assert len(bundle.test) == 32  # never touched
    same = load_dataset("synthetic", n_train=80, val_split=0.25, seed=3, train_subset=10)
    assert torch.equal(same.train.images, bundle.train.images)
    empty = load_dataset("synthetic", val_split=0)
    assert len(empty.val) == 0 and len(empty.train) == 64


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"train_subset": 20}, "class 'class0' has only 14"),
        ({"val_split": 1.0}, "val_split must be in"),
        ({"train_subset": 0}, "positive per-class count"),
        ({"colour": 1}, "no option colour"),
    ],
)
def test_bad_arguments_explained(kwargs, problem):
    with pytest.raises(OkdpipeError, match=problem):
        load_dataset("synthetic", val_split=kwargs.pop("val_split", 0.1), **kwargs)


def test_unknown_dataset_lists_choices():
    with pytest.raises(OkdpipeError, match="unknown dataset 'mnist'.*fashion-mnist"):
        load_dataset("mnist")
