"""Datasets stored as image files: CINIC-10 (class folders of 32x32 PNGs) and `imagefolder`, folders as people
have them (any image mode and size, nested class folders, stray files, broken files, no val/ or test/, or a
`path,label` list file instead of class folders). Both are decoded once into memory for the tensor path."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from okdpipe.console import say
from okdpipe.contracts.card import RESIZE_POLICIES
from okdpipe.datasets.decoding import ImageDecoder, decode_files, default_workers, read_image
from okdpipe.datasets.imagecache import Decoded, ImageCache, listing_key
from okdpipe.datasets.listfile import class_order, label_indices, read_list
from okdpipe.datasets.load import check_labels
from okdpipe.datasets.spec import DATASETS, AugmentConfig, DatasetSpec
from okdpipe.datasets.splits import RawDataset, TensorSplit, require_dir
from okdpipe.errors import OkdpipeError
from okdpipe.files import missing_or_kind

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
IGNORED_FOLDERS = {"__MACOSX"}  # macOS zip archives' resource forks: `._name.jpg` files that are not images
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# One-channel images: the average of ImageNet's three channel statistics.
IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD = (0.449,), (0.226,)
CINIC_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BAD_FILES_SHOWN = 3  # an error or notice about unreadable files names this many of them, then counts the rest


def is_hidden(name: str) -> bool:
    """Dot files and folders (.DS_Store, ._photo.jpg, .ipynb_checkpoints/) and macOS archive leftovers."""
    return name.startswith(".") or name in IGNORED_FOLDERS


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES and not is_hidden(name)


def list_images(class_dir: Path) -> list[Path]:
    """Image files anywhere under one class folder (sorted; hidden and non-image files ignored); none -> error.

    Anything named like an image is listed, whatever it is (a pipe, a device, a folder `photo.jpg/`), so that
    decoding reports it as a bad image. A linked folder is not followed (its images could be another class's, or
    a split's, or loop): it is named in a warning instead of being left out silently."""
    files, links, linked_files = [], [], []
    for folder, subfolders, names in os.walk(class_dir):
        links += [Path(folder, n) for n in subfolders if Path(folder, n).is_symlink() and not is_hidden(n)]
        inside = [n for n in subfolders if not is_hidden(n) and not Path(folder, n).is_symlink()]
        images = [Path(folder, n) for n in [*names, *inside] if is_image_name(n)]
        files += [path for path in images if not path.is_symlink()]
        linked_files += [path for path in images if path.is_symlink()]
        subfolders[:] = [n for n in inside if not is_image_name(n)]
    warn_linked(links, "folder", "replace a link with a real folder to train on its images")
    warn_linked(sorted(linked_files), "image file", "put the file itself there to train on it")
    if not files:
        raise OkdpipeError(f"{class_dir}: class folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    require_utf8_paths(files)
    return sorted(files)


def require_utf8_paths(paths: list[Path]) -> None:
    """Every path valid UTF-8. Python keeps the bytes of a name that is not as lone surrogates, which no UTF-8
    text can hold: the decode cache's key, the data fingerprint, the manifest and every message name the files,
    so such a name is refused up front, shown with its bad bytes escaped."""
    for path in paths:
        try:
            str(path).encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(path).decode("utf-8", "backslashreplace")
            raise OkdpipeError(
                f"{shown}: the name is not valid UTF-8; rename it (okdpipe records every image by name)"
            ) from None


def warn_linked(links: list[Path], kind: str, fix: str) -> None:
    """Links inside class folders are not followed (a linked folder could hold another class's or split's images,
    or loop; a linked image could be another class's, taught under two labels): each skipped one is named."""
    if links:
        more = f" and {len(links) - BAD_FILES_SHOWN} more" if len(links) > BAD_FILES_SHOWN else ""
        listed = "; ".join(map(str, links[:BAD_FILES_SHOWN]))
        say(
            f"warning: skipping {len(links)} linked {kind}(s) inside class folders (links are not followed): "
            f"{listed}{more}; {fix}",
            err=True,
        )


def class_names(split_dir: Path) -> tuple[str, ...]:
    folders = sorted(p for p in split_dir.iterdir() if p.is_dir() and not is_hidden(p.name))
    if not folders:
        raise OkdpipeError(f"{split_dir}: no class folders; expected {split_dir}/<class>/<image files>")
    refuse_linked_class_folders(folders)
    require_utf8_paths(folders)  # a class name is a label of the model card
    return tuple(p.name for p in folders)


def refuse_linked_class_folders(folders: list[Path]) -> None:
    """A class folder that is a link (to a sibling, another split's class, anywhere) is not followed: it would make
    a second class of the same images, or bring in images the folder does not hold."""
    linked = [folder for folder in folders if folder.is_symlink()]
    if linked:
        raise OkdpipeError(
            f"{linked[0]}: the class folder is a link (to {os.readlink(linked[0])}); links are not followed, so "
            "replace it with a real folder or remove it"
        )


def scan_split(split_dir: Path, classes: tuple[str, ...]) -> tuple[list[Path], torch.Tensor]:
    """All image paths of a split in class order, and their labels; the split must have exactly `classes`."""
    found = class_names(split_dir)
    if found != classes:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise OkdpipeError(
            f"{split_dir}: class folders differ from the training set's (missing {missing}, extra {extra}); "
            "give every split one folder per training class, each with at least one image"
        )
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = list_images(split_dir / name)
        paths += files
        labels += [label] * len(files)
    return paths, torch.tensor(labels, dtype=torch.int64)


def decode_into_memory(paths: list[Path], decoder: ImageDecoder, root: Path, digest: hashlib._Hash) -> torch.Tensor:
    """Decode every file once (threads: PIL releases the GIL) into uint8 [N, C, H, W]; hash path + bytes."""
    raws = [read_image(p) for p in paths]
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
    decoder, digest = ImageDecoder((32, 32), 3, exact=True), hashlib.sha256()
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


# --- imagefolder --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listing:
    """One split's image files in order and their class indices, and where they were listed (a folder or a list
    file): what the split is decoded from, and what its decode cache is keyed by."""

    source: Path
    paths: tuple[Path, ...]
    labels: tuple[int, ...]

    def stat_lines(self, root: Path, for_cache: bool = False) -> list[str]:
        """(path, size, mtime, label) per file: cheap for large folders, and changes when any file does. The decode
        cache's key adds the inode and the change time (for_cache): a file rewritten at the same size with its
        modification time put back (`touch -r`, `rsync -t`, a coarse clock) must not be served from the cache."""
        return [f"{shown(p, root)}\t{file_stat(p, for_cache)}\t{label}" for p, label in zip(self.paths, self.labels)]


def shown(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def file_stat(path: Path, for_cache: bool = False) -> str:
    try:
        stat = path.stat()
    except OSError:
        return "missing"  # a list file naming an absent file: decoded as a bad image
    changed = f"\t{stat.st_ino}\t{stat.st_ctime_ns}" if for_cache else ""  # ctime cannot be set back by a user
    return f"{stat.st_size}\t{stat.st_mtime_ns}{changed}"


def split_source(root: Path, names: tuple[str, ...]) -> Path | None:
    """The split's class folder (`val/`) or list file (`val.csv`) under any of its `names`; two of them is an error,
    and so is anything else under such a name (see usable_split_path)."""
    found = [root / n for n in names if usable_split_path(root / n, folder=True)] + [
        root / f"{n}.csv" for n in names if usable_split_path(root / f"{n}.csv", folder=False)
    ]
    if len(found) > 1:
        raise OkdpipeError(f"{root}: {' and '.join(p.name for p in found)} both describe one split; keep one of them")
    return found[0] if found else None


def usable_split_path(path: Path, folder: bool) -> bool:
    """Whether a split's folder (or list file) is at `path`: False when nothing is there. Anything else under the
    name (a link to nothing or a loop, a file named `val`, a folder named `val.csv`, a pipe, a folder that cannot
    be read) is an error: treating the split as absent would train without it silently."""
    if not path.is_symlink() and not path.exists():
        return False
    wanted = "a folder of class folders" if folder else "a `path,label` list file"
    fix = f"make it {wanted}, or remove it"
    if not (path.is_dir() if folder else path.is_file()):
        raise OkdpipeError(f"{path}: {missing_or_kind(path, wanted)}; {fix}")
    try:
        if folder:
            os.listdir(path)
        else:
            open(path, "rb").close()
    except OSError as exc:
        raise OkdpipeError(
            f"{path}: cannot be read ({exc.strerror or exc}); give okdpipe read access, or remove it"
        ) from None
    return True


def split_listing(source: Path, classes: tuple[str, ...]) -> Listing:
    """A folder must hold exactly the training classes; a list file's labels must be among them."""
    if source.is_dir():
        paths, labels = scan_split(source, classes)
        return Listing(source, tuple(paths), tuple(labels.tolist()))
    paths, names = read_list(source)
    require_utf8_paths(paths)  # the list is UTF-8 text, but the folder it lies in may not be
    return Listing(source, tuple(paths), tuple(label_indices(names, classes, source)))


def train_listing(root: Path) -> tuple[Listing, tuple[str, ...]]:
    """The training split and the classes it defines (sorted folder names, or the list file's sorted labels)."""
    source = split_source(root, ("train",))
    if source is None:
        raise OkdpipeError(
            f"{root}: no train/ folder or train.csv; expected {root}/train/<class>/<images> "
            "(or a train.csv of `path,label` lines)"
        )
    classes = class_names(source) if source.is_dir() else class_order(read_list(source)[1])
    check_labels(classes, str(source), "rename the class folders" if source.is_dir() else "fix the labels")
    if len(classes) < 2:
        raise OkdpipeError(f"{source}: only one class ({classes[0]}); a classifier needs at least two classes")
    return split_listing(source, classes), classes


@dataclass(frozen=True)
class DecodeOptions:
    """How an image folder is decoded (the `imagefolder` loader's options beyond the geometry)."""

    workers: int
    cache: bool


def decode_listing(listing: Listing, decoder: ImageDecoder, root: Path, options: DecodeOptions) -> Decoded:
    """The listing's decoded pixels: from the decode cache when it was built for this very listing and decoder,
    else decoded in worker processes (and cached)."""
    key = listing_key(listing.stat_lines(root, for_cache=True), decoder.key)
    shape = (decoder.channels, *decoder.size)
    cache = ImageCache.of(listing.source, decoder.key) if options.cache else None
    decoded = cache.load(key, len(listing.paths), shape) if cache else None
    if decoded is None:
        label = f"decoding {shown(listing.source, root)}"
        decoded = Decoded.of(decode_files(listing.paths, decoder, options.workers, label), shape)
        if cache:
            cache.save(key, decoded)
    return decoded


def as_split(listing: Listing, decoded: Decoded) -> TensorSplit:
    labels = torch.tensor(listing.labels, dtype=torch.int64)[torch.from_numpy(decoded.kept)]
    return TensorSplit(torch.from_numpy(decoded.images), labels)


def bad_files(listings: dict[str, Listing], decoded: dict[str, Decoded]) -> list[str]:
    """'path (reason)' for every file that gave no pixels, split by split."""
    return [f"{listings[n].paths[i]} ({why})" for n in listings for i, why in decoded[n].bad]


def require_disjoint(listings: dict[str, Listing]) -> None:
    """A file in two splits (a list file naming a training image) would validate or test on training data."""
    seen: dict[str, str] = {}
    for name, listing in listings.items():
        shared = []
        for path in listing.paths:
            owner = seen.setdefault(os.path.realpath(path), name)
            if owner != name:
                shared.append(f"{path} ({owner})")
        if shared:
            listed = "; ".join(shared[:BAD_FILES_SHOWN])
            raise OkdpipeError(
                f"{len(shared)} file(s) of the {name} split are also in another split: {listed}; "
                f"a {name} image must not be trained on, remove it from one of them"
            )


def refuse_or_skip(bad: list[str], root: Path, skip: bool) -> None:
    """Every unreadable file counted and the first few named, then refused (exit 2) or skipped with a notice."""
    if not bad:
        return
    more = f" and {len(bad) - BAD_FILES_SHOWN} more" if len(bad) > BAD_FILES_SHOWN else ""
    listed = f"{'; '.join(bad[:BAD_FILES_SHOWN])}{more}"
    if not skip:
        raise OkdpipeError(
            f"{len(bad)} unreadable image file(s) under {root}: {listed}; replace or delete them, "
            "or pass --skip-bad-images to leave them out"
        )
    say(f"skipping {len(bad)} unreadable image file(s) under {root}: {listed}", err=True)


def require_every_class(train: TensorSplit, classes: tuple[str, ...], root: Path) -> None:
    """Skipping bad files can empty a class; a class the model never sees is a mistake, not a quirk."""
    counts = torch.bincount(train.labels, minlength=len(classes)).tolist()
    empty = [name for name, count in zip(classes, counts) if count == 0]
    if empty:
        raise OkdpipeError(f"{root}: class(es) {', '.join(empty)} have no readable training images; add some")


WITHOUT_SPLIT = {"val": "--val-split of train/ is then held out instead", "test": "there are then no test metrics"}


def require_readable_images(splits: dict[str, TensorSplit], listings: dict[str, Listing]) -> None:
    """A val/ or test/ whose every file was skipped as unreadable leaves an empty split: say so, rather than let
    training report "no validation images" and suggest --val-split, which a val/ folder overrides."""
    for name, without in WITHOUT_SPLIT.items():
        if name in listings and len(splits[name]) == 0:
            source = listings[name].source
            raise OkdpipeError(
                f"{source}: no readable {name} image (all {len(listings[name].paths)} were unreadable and skipped "
                f"by --skip-bad-images); replace them, or remove {source.name} ({without})"
            )


def folder_spec(classes: tuple[str, ...], channels: int, image_size: int, resize: str = "stretch") -> DatasetSpec:
    """ImageNet's mean/std (a generic natural-image prior; the folder's own statistics are not computed)."""
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
        resize=resize,
    )


def check_folder_options(image_size, channels, resize, skip_bad_images, decode_workers, cache) -> None:  # noqa: ANN001
    """Options arrive from YAML and --set: wrong types are one line naming the option, never a traceback."""
    problems = [
        (
            not is_int(image_size) or image_size < 1,
            f"image_size must be a positive number of pixels, got {image_size!r}",
        ),
        (channels not in (1, 3) or isinstance(channels, bool), f"channels must be 1 or 3, got {channels!r}"),
        (resize not in RESIZE_POLICIES, f"resize must be one of {', '.join(RESIZE_POLICIES)}, got {resize!r}"),
        (not isinstance(skip_bad_images, bool), f"skip_bad_images must be true or false, got {skip_bad_images!r}"),
        (
            decode_workers is not None and (not is_int(decode_workers) or decode_workers < 1),
            f"decode_workers must be a positive integer, got {decode_workers!r}",
        ),
        (not isinstance(cache, bool), f"cache must be true or false, got {cache!r}"),
    ]
    for bad, problem in problems:
        if bad:
            raise OkdpipeError(f"imagefolder option {problem}")


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@DATASETS.register("imagefolder")
def load_imagefolder(
    data_dir: Path | None = None,
    *,
    image_size: int = 32,
    channels: int = 3,
    resize: str = "stretch",
    skip_bad_images: bool = False,
    decode_workers: int | None = None,
    cache: bool = True,
) -> RawDataset:
    """`data_dir/train/<class>/...` (or `train.csv`), optional `val/` or `valid/` (else val_split is held out of
    train, stratified), optional `test/` (else no test metrics); each split a class folder or a list file.
    Classes are train's sorted folder names (or list labels); a val/test folder must have the same folders.

    Every image is converted to `channels` and brought to image_size x image_size by `resize` ("stretch" or
    "shorter-side": scale, then centre crop), which the model card records for `serve`. Unreadable files are
    listed and refused, or left out with skip_bad_images. Decoding runs on decode_workers processes (default:
    every CPU) and is cached on disk (`cache`). Fingerprint: sha256 over relative paths, sizes, mtimes, labels.
    """
    if data_dir is None:
        raise OkdpipeError("pass --data-dir DIR holding train/<class>/<images> (and optionally val/, test/)")
    require_dir(data_dir)
    check_folder_options(image_size, channels, resize, skip_bad_images, decode_workers, cache)
    train, classes = train_listing(data_dir)
    listings = {"train": train}
    for name, aliases in (("val", ("val", "valid")), ("test", ("test",))):
        source = split_source(data_dir, aliases)
        if source is not None:
            listings[name] = split_listing(source, classes)
    require_disjoint(listings)
    spec = folder_spec(classes, channels, image_size, resize)
    decoder = ImageDecoder(spec.input_size, channels, resize)
    options = DecodeOptions(decode_workers or default_workers(), cache)
    decoded = {name: decode_listing(listing, decoder, data_dir, options) for name, listing in listings.items()}
    refuse_or_skip(bad_files(listings, decoded), data_dir, skip_bad_images)
    splits = {name: as_split(listings[name], decoded[name]) for name in listings}
    require_every_class(splits["train"], classes, data_dir)
    require_readable_images(splits, listings)
    no_test = TensorSplit(torch.zeros((0, channels, image_size, image_size), dtype=torch.uint8), torch.zeros(0))
    test = splits.get("test", no_test)
    return RawDataset(
        spec, splits["train"], test, fingerprint(listings, data_dir), str(data_dir), val=splits.get("val")
    )


def fingerprint(listings: dict[str, Listing], root: Path) -> str:
    digest = hashlib.sha256()
    for name, listing in listings.items():
        digest.update("".join(f"{name}\t{line}\n" for line in listing.stat_lines(root)).encode())
    return digest.hexdigest()
