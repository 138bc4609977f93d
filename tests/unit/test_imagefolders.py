"""Image folders as people have them: every image mode, mixed sizes and the resize policy, broken files refused or
skipped, stray files ignored, unbalanced classes split stratified, list files, and the decode cache."""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datafixtures import tagged_images, write_class_folders, write_image_folder
from PIL import Image

from okdpipe.datasets import decoding, folders, imagecache, load_dataset
from okdpipe.errors import OkdpipeError

CLASSES = ["cat", "dog", "emu"]


def save(path: Path, image: Image.Image, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def only_image(root: Path, channels: int = 3, **options) -> np.ndarray:
    """The first training image (HWC uint8) of a folder of class a (one image) and class b."""
    bundle = load_dataset("imagefolder", root, val_split=0, channels=channels, **options)
    return bundle.train.read(0)


# --- modes and sizes ---------------------------------------------------------------------------------------------

SIXTEEN_BIT = np.array([[0x1234, 0xFFFF], [0x00FF, 0x8000]], dtype=np.uint16)


@pytest.mark.parametrize(
    "make, suffix, gray, rgb",
    [
        (lambda: Image.new("L", (2, 2), 77), ".png", 77, [77, 77, 77]),
        (lambda: Image.new("LA", (2, 2), (50, 0)), ".png", 50, [50, 50, 50]),  # alpha dropped, not blended
        (lambda: Image.new("RGBA", (2, 2), (90, 90, 90, 0)), ".png", 90, [90, 90, 90]),
        (lambda: Image.new("RGB", (2, 2), (200, 200, 200)), ".bmp", 200, [200, 200, 200]),
        # CMYK (0, 0, 0, 51): (255 - c) * (255 - k) / 255 = 204 on every channel.
        (lambda: Image.new("CMYK", (2, 2), (0, 0, 0, 51)), ".tif", 204, [204, 204, 204]),
        # 16-bit: the top 8 bits (0x1234 -> 0x12 = 18), where a plain convert would clip to 255.
        (lambda: Image.fromarray(SIXTEEN_BIT), ".png", 0x12, [0x12, 0x12, 0x12]),
    ],
)
def test_every_mode_becomes_the_dataset_channels(tmp_path, make, suffix, gray, rgb):
    save(tmp_path / "train" / "a" / f"x{suffix}", make())
    save(tmp_path / "train" / "b" / "y.png", Image.new("L", (2, 2)))
    assert only_image(tmp_path, 1, image_size=2)[0, 0].tolist() == [gray]
    assert only_image(tmp_path, 3, image_size=2)[0, 0].tolist() == rgb


def test_palette_and_sixteen_bit_values(tmp_path):
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    save(tmp_path / "train" / "a" / "p.gif", palette)
    save(tmp_path / "train" / "b" / "wide.png", Image.fromarray(SIXTEEN_BIT))
    bundle = load_dataset("imagefolder", tmp_path, val_split=0, image_size=2)
    assert bundle.train.read(0)[1, 1].tolist() == [10, 20, 30]
    assert bundle.train.read(1)[..., 0].tolist() == (SIXTEEN_BIT >> 8).tolist()


def bars(width: int, height: int, edge: int) -> Image.Image:
    """Gray `edge`-pixel bars of value 10 on the left and right of a 200 centre."""
    pixels = np.full((height, width), 200, np.uint8)
    pixels[:, :edge] = pixels[:, width - edge :] = 10
    return Image.fromarray(pixels)


def test_resize_policies(tmp_path):
    """48x32 with 8-pixel bars: shorter-side keeps the scale (32 px high) and cuts the centre 32 columns out,
    exactly the 200s; stretch squeezes the bars in."""
    save(tmp_path / "train" / "a" / "bars.png", bars(48, 32, 8))
    save(tmp_path / "train" / "b" / "y.png", Image.new("L", (32, 32)))
    cropped = only_image(tmp_path, 1, resize="shorter-side")
    assert cropped.shape == (32, 32, 1) and (cropped == 200).all()
    stretched = only_image(tmp_path, 1, resize="stretch")
    assert stretched[:, 0, 0].tolist() == [10] * 32 and stretched[:, 16, 0].tolist() == [200] * 32


def test_exif_rotation_is_applied(tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 (rotate 90 clockwise) trains upright."""
    stored = np.zeros((2, 4), np.uint8)
    stored[0, 0] = 255  # top-left as stored -> top-right once rotated clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    save(tmp_path / "train" / "a" / "phone.png", Image.fromarray(stored), exif=exif)
    save(tmp_path / "train" / "b" / "y.png", Image.new("L", (2, 4)))
    upright = only_image(tmp_path, 1, image_size=4)  # 4x2 upright, stretched to 4x4
    assert upright.shape == (4, 4, 1) and upright[0, -1, 0] > 0 and upright[0, 0, 0] == 0


# --- broken, hidden and stray files ------------------------------------------------------------------------------


def write_bad_files(root: Path) -> list[Path]:
    good = io.BytesIO()  # noise, so that every byte cut off loses pixels
    Image.fromarray(tagged_images(1, (32, 32, 3), 1, seed=7)[0][0]).save(good, "PNG")
    bad = [root / "train" / "cat" / "truncated.png", root / "train" / "dog" / "empty.jpg"]
    bad += [root / "train" / "emu" / "text.png", root / "test" / "emu" / "half.png"]
    bad[0].write_bytes(good.getvalue()[:60])
    bad[1].write_bytes(b"")
    bad[2].write_text("not an image")
    bad[3].write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    return bad


def test_an_image_serve_would_refuse_as_too_large_is_a_bad_image_in_training(tmp_path):
    """A 5000 x 5000 PNG (here one whose header says so: checked before decoding) trained, then /classify
    answered 400 to the same file: both now hold one limit."""
    import struct
    import zlib

    from okdpipe.datasets.decoding import BadImage, ImageDecoder

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    png = bytearray(buffer.getvalue())
    png[16:24] = struct.pack(">II", 5000, 5000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))  # IHDR's CRC covers type + data
    with pytest.raises(BadImage, match=r"image of 5000x5000 pixels is over the 16,777,216-pixel limit"):
        ImageDecoder((4, 4), 1).pixels(bytes(png))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4), "'F' images (floating-point or 32-bit) have no 8-bit"),
        (np.full((4, 4), 70_000, np.int32), "a 32-bit integer image with values beyond 16 bits"),
    ],
    ids=["float TIFF", "32-bit TIFF"],
)
def test_an_image_with_no_8_bit_reading_is_a_bad_image_not_a_flat_one(values, message):
    """A float TIFF in [0, 1] decoded to all 0 and a 32-bit one to all 255, silently (and /classify agreed)."""
    from okdpipe.datasets.decoding import BadImage, ImageDecoder

    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="TIFF")
    with pytest.raises(BadImage, match=re.escape(message)):
        ImageDecoder((4, 4), 1).pixels(buffer.getvalue())


@pytest.mark.parametrize(
    ("values", "image_format", "mode"),
    [
        (np.arange(16, dtype=np.uint16).reshape(4, 4) * 16, "PNG", "I;16"),
        (np.arange(16, dtype=np.int32).reshape(4, 4) * 16, "TIFF", "I"),
    ],
    ids=["16-bit PNG", "32-bit TIFF"],
)
def test_a_wide_image_of_8_bit_values_is_a_bad_image_not_a_black_one(values, image_format, mode):
    """Values 0..240 kept their top 8 bits: every pixel 0, a flat black image, silently (and /classify agreed)."""
    from okdpipe.datasets.decoding import BadImage, ImageDecoder

    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format=image_format)
    with pytest.raises(BadImage) as error:
        ImageDecoder((4, 4), 1).pixels(buffer.getvalue())
    assert str(error.value) == (
        f"cannot decode image (a {mode!r} image whose values all lie below 256 would read as black at 8 bits (its top "
        "8 bits); save it 8 bit, or scale its values to the 16-bit range)"
    )
    buffer = io.BytesIO()
    Image.fromarray(values * 256).save(buffer, format=image_format)  # the same picture in the 16-bit range
    assert ImageDecoder((4, 4), 1).pixels(buffer.getvalue())[..., 0].tolist() == values.reshape(4, 4).tolist()


@pytest.mark.parametrize("image_format", ["EPS", "ICO", "TGA"])
def test_a_format_outside_the_read_list_is_a_bad_image_whatever_its_suffix(tmp_path, image_format):
    """Pillow opens EPS by running Ghostscript on the file's bytes; serve's /classify refuses these formats, so
    training must not learn from them either. They are bad images, named with the formats that are read."""
    from okdpipe.datasets.decoding import BadImage, ImageDecoder

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format=image_format)
    with pytest.raises(BadImage, match=r"not one of the formats read: PNG, JPEG, BMP, GIF, TIFF, WEBP, PPM"):
        ImageDecoder((4, 4), 3).pixels(buffer.getvalue())


def test_unreadable_files_are_listed_and_refused(tmp_path):
    write_image_folder(tmp_path, {"train": 9, "test": 3}, CLASSES)
    bad = write_bad_files(tmp_path)
    with pytest.raises(OkdpipeError) as error:
        load_dataset("imagefolder", tmp_path, val_split=0)
    message = str(error.value)
    assert message.startswith(f"4 unreadable image file(s) under {tmp_path}: ") and "\n" not in message
    assert all(str(path) in message for path in bad[:3]) and str(bad[3]) not in message
    assert "and 1 more" in message and "--skip-bad-images" in message


def test_unreadable_files_are_skipped_when_asked(tmp_path, capsys):
    written = write_image_folder(tmp_path, {"train": 9, "test": 3}, CLASSES)
    write_bad_files(tmp_path)
    bundle = load_dataset("imagefolder", tmp_path, val_split=0, skip_bad_images=True)
    assert (len(bundle.train), len(bundle.test)) == (9, 3)
    images, labels = written["train"]
    order = np.argsort(labels, kind="stable")  # class by class, the bad files left out
    assert torch.equal(bundle.train.images, torch.from_numpy(images[order]).permute(0, 3, 1, 2))
    assert "skipping 4 unreadable image file(s)" in capsys.readouterr().err


def test_a_class_left_empty_by_skipping_is_an_error(tmp_path):
    write_image_folder(tmp_path, {"train": 4}, ["a", "b"])
    for path in (tmp_path / "train" / "b").iterdir():
        path.write_bytes(b"broken")
    with pytest.raises(OkdpipeError, match="class\\(es\\) b have no readable training images"):
        load_dataset("imagefolder", tmp_path, val_split=0, skip_bad_images=True)


def test_hidden_and_stray_files_are_ignored_nested_images_count(tmp_path):
    write_image_folder(tmp_path, {"train": 6}, CLASSES)
    cat = tmp_path / "train" / "cat"
    for name in (".DS_Store", "._00000.png", "notes.txt", "labels.csv", "Thumbs.db"):
        (cat / name).write_bytes(b"\0\5\26\7 not an image")
    save(cat / ".ipynb_checkpoints" / "copy.png", Image.new("RGB", (32, 32)))
    save(tmp_path / "train" / "__MACOSX" / "cat" / "x.png", Image.new("RGB", (32, 32)))
    save(tmp_path / "train" / ".trash" / "x.png", Image.new("RGB", (32, 32)))
    save(cat / "2019" / "summer.JPG", Image.new("RGB", (32, 32), (9, 9, 9)))
    bundle = load_dataset("imagefolder", tmp_path, val_split=0)
    assert bundle.spec.labels == tuple(CLASSES) and len(bundle.train) == 7
    assert bundle.train.read(2)[0, 0].tolist() == [9, 9, 9]  # cat/00000.png, cat/00003.png, cat/2019/summer.JPG


def plant_special_files(class_dir: Path) -> list[Path]:
    """Three things named like images that are not regular files: a FIFO nobody writes (read() would block
    forever), a link to a device that never ends, and a folder called like a photo (holding a real image)."""
    os.mkfifo(class_dir / "fifo.png")
    (class_dir / "zero.png").symlink_to("/dev/zero")
    save(class_dir / "album.jpg" / "inside.png", Image.new("RGB", (32, 32)))
    return [class_dir / "album.jpg", class_dir / "fifo.png", class_dir / "zero.png"]


@pytest.mark.timeout(60)
def test_pipes_devices_and_folders_named_like_images_are_bad_images_not_hangs(tmp_path, capsys):
    write_image_folder(tmp_path, {"train": 6}, CLASSES)
    special = plant_special_files(tmp_path / "train" / "cat")
    with pytest.raises(OkdpipeError) as error:
        load_dataset("imagefolder", tmp_path, val_split=0)
    assert str(error.value).startswith(
        f"2 unreadable image file(s) under {tmp_path}: {special[0]} (not a regular file but a folder); "
        f"{special[1]} (not a regular file but a pipe (FIFO)); "
    )
    assert f"skipping 1 linked image file(s) inside class folders (links are not followed): {special[2]};" in (
        capsys.readouterr().err
    )  # the link to /dev/zero is never opened (a list file naming a device is tested below)
    bundle = load_dataset("imagefolder", tmp_path, val_split=0, skip_bad_images=True, decode_workers=1)
    assert len(bundle.train) == 6  # the image inside album.jpg/ is not walked into either
    assert "skipping 2 unreadable image file(s)" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_a_list_file_naming_a_pipe_or_a_device_lists_them_as_bad(tmp_path):
    save(tmp_path / "a.png", Image.new("RGB", (8, 8)))
    save(tmp_path / "b.png", Image.new("RGB", (8, 8)))
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "train.csv").write_text("a.png,x\nb.png,w\nfifo.png,x\n/dev/zero,w\n")
    with pytest.raises(OkdpipeError, match=r"^2 unreadable image file\(s\) .*fifo.png \(not a regular file but a pipe "
                       r"\(FIFO\)\); /dev/zero \(not a regular file but a device\)"):  # fmt: skip
        load_dataset("imagefolder", tmp_path, val_split=0)


def test_a_linked_folder_inside_a_class_folder_is_named_in_a_warning_not_followed(tmp_path, capsys):
    write_image_folder(tmp_path, {"train": 6}, CLASSES)
    save(tmp_path / "elsewhere" / "x.png", Image.new("RGB", (32, 32)))
    (tmp_path / "train" / "cat" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    bundle = load_dataset("imagefolder", tmp_path, val_split=0)
    assert len(bundle.train) == 6
    assert (
        "warning: skipping 1 linked folder(s) inside class folders (links are not followed): "
        f"{tmp_path / 'train' / 'cat' / 'more'}; replace a link with a real folder to train on its images"
    ) in capsys.readouterr().err


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_class_folder_that_is_a_link_is_refused_in_one_line(tmp_path, split):
    """A link to a sibling became a duplicate class of the same images, silently."""
    write_image_folder(tmp_path, {"train": 6, "val": 3}, ["cat", "dog"], size=8)
    (tmp_path / split / "cat").rename(tmp_path / split / "kitty")
    (tmp_path / split / "cat").symlink_to("kitty", target_is_directory=True)
    with pytest.raises(OkdpipeError) as error:
        load_dataset("imagefolder", tmp_path, image_size=8)
    assert str(error.value) == (
        f"{tmp_path / split / 'cat'}: the class folder is a link (to kitty); links are not followed, so replace it "
        "with a real folder or remove it"
    )


def test_a_linked_image_file_is_named_in_a_warning_not_followed(tmp_path, capsys):
    """A link into another class taught the same image under two labels."""
    write_image_folder(tmp_path, {"train": 6}, ["cat", "dog"], size=8)
    cat_image = sorted((tmp_path / "train" / "cat").iterdir())[0]
    (tmp_path / "train" / "dog" / "alias.png").symlink_to(cat_image)
    bundle = load_dataset("imagefolder", tmp_path, val_split=0, image_size=8)
    assert len(bundle.train) == 6
    assert capsys.readouterr().err.strip() == (
        "warning: skipping 1 linked image file(s) inside class folders (links are not followed): "
        f"{tmp_path / 'train' / 'dog' / 'alias.png'}; put the file itself there to train on it"
    )


BYTES_NAME = os.fsdecode(b"caf\xe9")  # Latin-1 bytes, not UTF-8: Python keeps the byte as a lone surrogate


def refusal_of_bytes_name(root: Path) -> str:
    with pytest.raises(OkdpipeError) as error:
        load_dataset("imagefolder", root, val_split=0, cache=False)
    return str(error.value)


@pytest.mark.parametrize(
    "bad_path, named",
    [(f"train/cat/{BYTES_NAME}.png", "train/cat/caf\\xe9.png"), (f"train/{BYTES_NAME}/a.png", "train/caf\\xe9")],
    ids=["file", "class folder"],
)
def test_a_name_that_is_not_utf8_is_one_line_naming_it(tmp_path, bad_path, named):
    """Its surrogate gave a UnicodeEncodeError from the decode cache's key, with the cache off too."""
    for path in (bad_path, "train/cat/b.png", "train/dog/c.png"):
        save(tmp_path / path, Image.new("RGB", (8, 8)))
    assert refusal_of_bytes_name(tmp_path) == (
        f"{tmp_path}/{named}: the name is not valid UTF-8; rename it (okdpipe records every image by name)"
    )


def test_a_list_file_in_a_folder_whose_name_is_not_utf8_is_one_line(tmp_path):
    root = tmp_path / BYTES_NAME
    for name in ("a.png", "b.png"):
        save(root / name, Image.new("RGB", (8, 8)))
    (root / "train.csv").write_text("a.png,cat\nb.png,dog\n")
    assert refusal_of_bytes_name(root) == (
        f"{tmp_path}/caf\\xe9/a.png: the name is not valid UTF-8; rename it (okdpipe records every image by name)"
    )


@pytest.mark.parametrize(
    "names, problem",
    [
        (("caf\u00e9", "cafe\u0301"), "labels 'cafe\\u0301' and 'caf\\xe9' name one class (the same after Unicode"),
        (("cat", "tab\there"), "label 'tab\\there' must be printable text"),
        (("cat", " "), "label ' ' must be printable text"),
    ],
)
def test_class_names_a_card_cannot_carry_fail_when_the_folder_is_read(tmp_path, monkeypatch, names, problem):
    for name in names:
        save(tmp_path / "train" / name / "a.png", Image.new("RGB", (8, 8)))
    monkeypatch.setattr(folders, "decode_files", lambda *args: pytest.fail("decoded before the labels were checked"))
    with pytest.raises(OkdpipeError) as error:
        load_dataset("imagefolder", tmp_path, val_split=0)
    assert str(error.value).startswith(f"{tmp_path / 'train'}: {problem}")
    assert str(error.value).endswith("; rename the class folders")


def test_list_file_labels_follow_the_same_rules(tmp_path):
    save(tmp_path / "a.png", Image.new("RGB", (8, 8)))
    save(tmp_path / "b.png", Image.new("RGB", (8, 8)))
    (tmp_path / "train.csv").write_text("a.png,caf\u00e9\nb.png,cafe\u0301\n", encoding="utf-8")
    with pytest.raises(
        OkdpipeError, match=r"train.csv: labels 'cafe\\u0301' and 'caf\\xe9' name one class .*; fix the labels$"
    ):
        load_dataset("imagefolder", tmp_path, val_split=0)


@pytest.mark.parametrize("split, without", [("val", "--val-split of train/ is then held out instead"),
                                             ("test", "there are then no test metrics")])  # fmt: skip
def test_a_split_left_empty_by_skipping_says_what_happened(tmp_path, split, without):
    write_image_folder(tmp_path, {"train": 6, split: 3}, CLASSES)
    for path in (tmp_path / split).rglob("*.png"):
        path.write_bytes(b"broken")
    with pytest.raises(OkdpipeError) as error:
        load_dataset("imagefolder", tmp_path, skip_bad_images=True)
    assert str(error.value) == (
        f"{tmp_path / split}: no readable {split} image (all 3 were unreadable and skipped by --skip-bad-images); "
        f"replace them, or remove {split} ({without})"
    )


# --- splits ------------------------------------------------------------------------------------------------------


def test_unbalanced_classes_give_every_class_a_validation_image(tmp_path):
    write_class_folders(tmp_path / "train", *tagged_images(20, (8, 8, 3), 1, seed=0), ["big"])
    write_class_folders(tmp_path / "train", *tagged_images(2, (8, 8, 3), 1, seed=1), ["rare"])
    bundle = load_dataset("imagefolder", tmp_path, val_split=0.1, image_size=8)
    assert torch.bincount(bundle.val.labels).tolist() == [2, 1]  # round(0.1 * 2) = 0, raised to 1
    assert torch.bincount(bundle.train.labels).tolist() == [18, 1]


def test_a_class_of_one_image_cannot_be_split(tmp_path):
    write_class_folders(tmp_path / "train", *tagged_images(5, (8, 8, 3), 1, seed=0), ["big"])
    write_class_folders(tmp_path / "train", *tagged_images(1, (8, 8, 3), 1, seed=1), ["lonely"])
    with pytest.raises(OkdpipeError, match="class 'lonely' has 1 training image\\(s\\).*provide a val/ split"):
        load_dataset("imagefolder", tmp_path, val_split=0.1, image_size=8)
    assert len(load_dataset("imagefolder", tmp_path, val_split=0, image_size=8).train) == 6


def test_a_single_class_is_an_error(tmp_path):
    write_image_folder(tmp_path, {"train": 3}, ["cat"], size=8)
    with pytest.raises(OkdpipeError, match="train: only one class \\(cat\\); a classifier needs at least two"):
        load_dataset("imagefolder", tmp_path, val_split=0)


def test_no_val_and_no_test(tmp_path):
    write_image_folder(tmp_path, {"train": 30}, CLASSES, size=8)
    bundle = load_dataset("imagefolder", tmp_path, val_split=0.2, image_size=8)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (24, 6, 0)
    assert bundle.test.images.shape == (0, 3, 8, 8)


# --- list files ----------------------------------------------------------------------------------------------------


def test_list_file_instead_of_class_folders(tmp_path):
    images, _ = tagged_images(4, (8, 8, 3), 1, seed=3)
    for index, image in enumerate(images):
        save(tmp_path / "pics" / f"p, {index}.png", Image.fromarray(image))
    (tmp_path / "train.csv").write_text(
        '\ufeffpath,label\n"pics/p, 0.png",10\n"pics/p, 1.png",2\n\n# a comment\n"pics/p, 2.png",10\n'
    )
    (tmp_path / "test.csv").write_text(f'"{tmp_path}/pics/p, 3.png",2\n')
    bundle = load_dataset("imagefolder", tmp_path, val_split=0, image_size=8)
    assert bundle.spec.labels == ("2", "10")  # numeric labels sort as numbers
    (tmp_path / "test.csv").unlink()
    for odd in ("\u00b2", "--1"):  # int() refuses these: they sort as text, with no traceback
        (tmp_path / "train.csv").write_text(f'"pics/p, 0.png",{odd}\n"pics/p, 1.png",2\n')
        assert load_dataset("imagefolder", tmp_path, val_split=0, image_size=8).spec.labels == tuple(sorted([odd, "2"]))
    assert bundle.train.labels.tolist() == [1, 0, 1] and bundle.test.labels.tolist() == [0]
    assert torch.equal(bundle.train.images[1], torch.from_numpy(images[1]).permute(2, 0, 1))
    assert torch.equal(bundle.test.images[0], torch.from_numpy(images[3]).permute(2, 0, 1))


@pytest.mark.parametrize(
    "train, test, problem",
    [
        ("a.png,x,extra\n", None, "train.csv line 1: expected `path,label`"),
        ("a.png,\n", None, "train.csv line 1: expected `path,label`"),
        ("path,label\n", None, "train.csv: lists no images"),
        ("a.png,x\nb.png,w\n", "a.png,y\n", "test.csv: label(s) 'y' are not classes of the training split"),
        ("a.png,x\nb.png,w\n# c\n./a.png,x\n", None, "train.csv lines 1 and 4 both list './a.png' (the same file)"),
        ("a.png,x\nb.png,w\nb.png,x\n", None, "train.csv lines 2 and 3 both list 'b.png' (the same file)"),
        ("a.png,x\nsub/../b.png,w\nb.png,x\n", None, "train.csv lines 2 and 3 both list 'b.png' (the same file)"),
        ("a.png,x\nb.png,w\nlinked.png,x\n", None, "train.csv lines 2 and 3 both list 'linked.png' (the same"),
        ("a\0.png,x\nb.png,w\n", None, "train.csv line 1: the path holds a NUL character"),
    ],
)
def test_list_file_problems_are_one_line(tmp_path, train, test, problem):
    save(tmp_path / "a.png", Image.new("RGB", (8, 8)))
    save(tmp_path / "b.png", Image.new("RGB", (8, 8)))
    (tmp_path / "sub").mkdir()
    (tmp_path / "linked.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "train.csv").write_text(train)
    if test:
        (tmp_path / "test.csv").write_text(test)
    with pytest.raises(OkdpipeError, match=re.escape(problem)):
        load_dataset("imagefolder", tmp_path, val_split=0)


def test_list_file_lines_end_at_newlines_only(tmp_path):
    """splitlines() cut a name holding U+2028 (or \\x1c, \\x85...) into two lines; \\r\\n still ends a line."""
    images, _ = tagged_images(3, (8, 8, 3), 1, seed=4)
    for name, image in zip(("a\u2028b.png", "c\x1cd.png", "e.png"), images):
        save(tmp_path / name, Image.fromarray(image))
    (tmp_path / "train.csv").write_bytes("a\u2028b.png,x\r\nc\x1cd.png,y\r\ne.png,x\r\n".encode())
    bundle = load_dataset("imagefolder", tmp_path, val_split=0, image_size=8)
    assert bundle.train.labels.tolist() == [0, 1, 0]
    assert torch.equal(bundle.train.images[0], torch.from_numpy(images[0]).permute(2, 0, 1))


def test_a_quoted_path_running_over_a_line_break_is_one_line(tmp_path):
    """csv read the quoted field on over the next line, listing a name that holds a newline."""
    save(tmp_path / "a\nb.png", Image.new("RGB", (8, 8)))
    save(tmp_path / "c.png", Image.new("RGB", (8, 8)))
    assert list_file_refusal(tmp_path, 'c.png,y\n"a\nb.png",x\n') == (
        f"{tmp_path / 'train.csv'} line 2: a quoted path is not closed on its line (a name holding a line break "
        "cannot be listed); rename the file, one `path,label` per line"
    )
    assert list_file_refusal(tmp_path, 'c.png,y\n"a"b.png,x\n') == (
        f"{tmp_path / 'train.csv'} line 2: not a CSV `path,label` line (',' expected after '\"'); quote a path "
        'holding commas or quotes as "a, b.png" (a quote inside doubled: "say ""hi"".png")'
    )


def list_file_refusal(root: Path, text: str) -> str:
    (root / "train.csv").write_text(text)
    with pytest.raises(OkdpipeError) as error:
        load_dataset("imagefolder", root, val_split=0, image_size=8)
    return str(error.value)


def test_missing_listed_file_is_a_bad_image_and_folder_plus_list_is_ambiguous(tmp_path):
    save(tmp_path / "a.png", Image.new("RGB", (8, 8)))
    save(tmp_path / "b.png", Image.new("RGB", (8, 8)))
    (tmp_path / "train.csv").write_text("a.png,x\ngone.png,x\nb.png,w\n")
    with pytest.raises(OkdpipeError, match="gone.png \\(cannot read \\(No such file or directory\\)\\)"):
        load_dataset("imagefolder", tmp_path, val_split=0)
    assert len(load_dataset("imagefolder", tmp_path, val_split=0, skip_bad_images=True).train) == 2
    (tmp_path / "train").mkdir()
    with pytest.raises(OkdpipeError, match="train and train.csv both describe one split"):
        load_dataset("imagefolder", tmp_path, val_split=0)


def test_a_file_in_two_splits_is_an_error(tmp_path):
    write_image_folder(tmp_path, {"train": 6}, CLASSES, size=8)
    (tmp_path / "val.csv").write_text("train/dog/00001.png,dog\n")
    with pytest.raises(OkdpipeError, match=re.escape("1 file(s) of the val split are also in another split: ")):
        load_dataset("imagefolder", tmp_path, image_size=8)


@pytest.mark.parametrize(
    "options, problem",
    [
        ({"image_size": "big"}, "image_size must be a positive number of pixels, got 'big'"),
        ({"channels": 4}, "channels must be 1 or 3, got 4"),
        ({"resize": "crop"}, "resize must be one of stretch, shorter-side, got 'crop'"),
        ({"skip_bad_images": "yes"}, "skip_bad_images must be true or false"),
        ({"decode_workers": 0}, "decode_workers must be a positive integer"),
    ],
)
def test_bad_options_are_one_line(tmp_path, options, problem):
    write_image_folder(tmp_path, {"train": 3}, CLASSES, size=8)
    with pytest.raises(OkdpipeError, match=f"imagefolder option {problem}"):
        load_dataset("imagefolder", tmp_path, val_split=0, **options)


# --- decoding in processes, and the decode cache -------------------------------------------------------------------


def test_worker_processes_decode_what_one_process_does(tmp_path, monkeypatch, capsys):
    written = write_image_folder(tmp_path, {"train": 150}, CLASSES, size=12)
    monkeypatch.setattr(decoding, "PLAIN_PROGRESS_EVERY_S", 0.0)  # a progress line per chunk (stderr is no tty)
    pooled = load_dataset("imagefolder", tmp_path, val_split=0, image_size=12, decode_workers=2, cache=False)
    lines = capsys.readouterr().err.splitlines()
    assert lines[:2] == ["decoding train: 64/150 images", "decoding train: 128/150 images"]
    assert lines[2].startswith("decoding train: 150 images in ") and len(lines) == 3
    images, labels = written["train"]
    order = np.argsort(labels, kind="stable")
    assert torch.equal(pooled.train.images, torch.from_numpy(images[order]).permute(0, 3, 1, 2))
    single = load_dataset("imagefolder", tmp_path, val_split=0, image_size=12, decode_workers=1, cache=False)
    assert torch.equal(single.train.images, pooled.train.images)


def count_decoding(monkeypatch) -> list[int]:
    """The number of files each decode_files call decoded."""
    calls, decode = [], folders.decode_files
    monkeypatch.setattr(folders, "decode_files", lambda paths, *rest: calls.append(len(paths)) or decode(paths, *rest))
    return calls


def forbid_decoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(folders, "decode_files", refuse)


def cache_files() -> list[Path]:
    return sorted(imagecache.cache_dir().glob("*.npz"))


def test_decode_cache_is_reused_and_keyed_by_listing_and_policy(tmp_path, monkeypatch):
    monkeypatch.setenv("OKDPIPE_CACHE", str(tmp_path / "cache"))
    write_image_folder(tmp_path / "data", {"train": 6, "test": 3}, CLASSES, size=10)
    first = load_dataset("imagefolder", tmp_path / "data", val_split=0, image_size=8)
    assert len(cache_files()) == 2  # train and test
    with monkeypatch.context() as patch:
        forbid_decoding(patch)
        again = load_dataset("imagefolder", tmp_path / "data", val_split=0, image_size=8)
    assert torch.equal(again.train.images, first.train.images) and torch.equal(again.test.labels, first.test.labels)
    cropped = load_dataset("imagefolder", tmp_path / "data", val_split=0, image_size=8, resize="shorter-side")
    assert len(cache_files()) == 4 and cropped.spec.resize == "shorter-side"  # a file per policy
    victim = tmp_path / "data" / "train" / "dog" / "00001.png"
    Image.new("RGB", (10, 10), (7, 7, 7)).save(victim)
    os.utime(victim, ns=(1, 1))  # a changed file: new size and mtime
    changed = load_dataset("imagefolder", tmp_path / "data", val_split=0, image_size=8)
    assert changed.train.read(2)[0, 0].tolist() == [7, 7, 7] and len(cache_files()) == 4  # rebuilt in place


def test_a_file_rewritten_at_the_same_size_and_mtime_is_decoded_again(tmp_path, monkeypatch):
    """`touch -r`, `rsync -t` or a coarse clock put the modification time back; the size can match too (an image
    of the same dimensions as an uncompressed format). The cache key's inode and change time still differ."""
    monkeypatch.setenv("OKDPIPE_CACHE", str(tmp_path / "cache"))
    write_image_folder(tmp_path / "data", {"train": 6}, CLASSES, size=8)
    victim = tmp_path / "data" / "train" / "dog" / "00001.bmp"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(victim)  # BMP: the same size in bytes whatever the pixels
    before = victim.stat()
    load_dataset("imagefolder", tmp_path / "data", val_split=0.5, image_size=8)
    Image.new("RGB", (8, 8), (7, 7, 7)).save(victim)
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (victim.stat().st_size, victim.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    again = load_dataset("imagefolder", tmp_path / "data", val_split=0, image_size=8)
    dog = CLASSES.index("dog")
    pixels = again.train.images[again.train.labels == dog]
    assert any(image[:, 0, 0].tolist() == [7, 7, 7] for image in pixels)
    assert not any(image[:, 0, 0].tolist() == [1, 2, 3] for image in pixels)


def one_image_short(cached: Path) -> bytes:
    """A well-formed archive for the right key that holds one image fewer than its listing."""
    with np.load(cached) as archive:
        parts = {name: archive[name] for name in archive.files}
    buffer = io.BytesIO()
    np.savez(buffer, **{**parts, "images": parts["images"][:-1]})
    return buffer.getvalue()


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "garbage", "one image short"])
def test_a_damaged_cache_file_is_rebuilt_not_trusted(tmp_path, monkeypatch, capsys, damage):
    monkeypatch.setenv("OKDPIPE_CACHE", str(tmp_path / "cache"))
    write_image_folder(tmp_path / "data", {"train": 6}, CLASSES, size=8)
    first = load_dataset("imagefolder", tmp_path / "data", val_split=0, image_size=8)
    (cached,) = cache_files()
    raw = bytearray(cached.read_bytes())
    if damage == "flip a byte":
        raw[len(raw) // 3] ^= 0x40  # inside the images array
    damaged = {"truncate": bytes(raw[: len(raw) // 2]), "garbage": b"junk", "one image short": one_image_short(cached)}
    cached.write_bytes(damaged.get(damage, bytes(raw)))
    capsys.readouterr()
    with monkeypatch.context() as patch:
        calls = count_decoding(patch)
        again = load_dataset("imagefolder", tmp_path / "data", val_split=0, image_size=8)
    assert torch.equal(again.train.images, first.train.images) and calls == [6]
    assert f"decode cache {cached} is damaged" in capsys.readouterr().err
    with monkeypatch.context() as patch:  # and the rebuilt file is good again
        forbid_decoding(patch)
        assert torch.equal(
            load_dataset("imagefolder", tmp_path / "data", val_split=0, image_size=8).train.images, first.train.images
        )


def test_the_cache_remembers_bad_files(tmp_path, monkeypatch):
    monkeypatch.setenv("OKDPIPE_CACHE", str(tmp_path / "cache"))
    write_image_folder(tmp_path / "data", {"train": 6}, CLASSES, size=8)
    (tmp_path / "data" / "train" / "cat" / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(OkdpipeError, match="1 unreadable image file"):
        load_dataset("imagefolder", tmp_path / "data", val_split=0, image_size=8)
    forbid_decoding(monkeypatch)
    with pytest.raises(OkdpipeError, match="bad.png"):
        load_dataset("imagefolder", tmp_path / "data", val_split=0, image_size=8)
    assert (
        len(load_dataset("imagefolder", tmp_path / "data", val_split=0, image_size=8, skip_bad_images=True).train) == 6
    )


def test_a_split_missing_a_training_class_is_one_line_with_the_fix(tmp_path):
    write_image_folder(tmp_path, {"train": 6, "val": 3}, ["a", "b", "c"], size=8)
    shutil.rmtree(tmp_path / "val" / "b")
    with pytest.raises(OkdpipeError) as error:
        load_dataset("imagefolder", tmp_path, image_size=8)
    assert str(error.value) == (
        f"{tmp_path / 'val'}: class folders differ from the training set's (missing ['b'], extra []); give every "
        "split one folder per training class, each with at least one image"
    )


FOLDER_KIND = "a folder of class folders"
LIST_KIND = "a `path,label` list file"


def plant_dangling(path: Path) -> None:
    path.symlink_to(path.parent / "nowhere")


def plant_loop(path: Path) -> None:
    path.symlink_to(path.name)  # a link to itself


def plant_file(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    path.write_text("not a split\n")


@pytest.mark.parametrize(
    ("name", "plant", "what", "kind"),
    [
        ("test", plant_dangling, "is a link to nothing (its target is missing, or it loops)", FOLDER_KIND),
        ("test", plant_loop, "is a link to nothing (its target is missing, or it loops)", FOLDER_KIND),
        ("val", plant_file, "is a file", FOLDER_KIND),
        ("valid", plant_file, "is a file", FOLDER_KIND),
        ("test", plant_file, "is a file", FOLDER_KIND),
        ("train", plant_file, "is a file", FOLDER_KIND),
        ("val.csv", Path.mkdir, "is a folder", LIST_KIND),
        ("train.csv", plant_dangling, "is a link to nothing (its target is missing, or it loops)", LIST_KIND),
        ("test.csv", os.mkfifo, "is a device, pipe or socket", LIST_KIND),
    ],
    ids=[
        "dangling test",
        "test loop",
        "val file",
        "valid file",
        "test file",
        "train file",
        "val.csv folder",
        "dangling train.csv",
        "test.csv pipe",
    ],
)
def test_a_split_name_that_is_not_a_usable_folder_or_list_is_one_line_not_ignored(tmp_path, name, plant, what, kind):
    """Each of these was taken as "no such split": training went on without a test or val split, silently."""
    write_image_folder(tmp_path, {"train": 6}, ["cat", "dog"], size=8)
    plant(tmp_path / name)
    with pytest.raises(OkdpipeError) as error:
        load_dataset("imagefolder", tmp_path, image_size=8)
    assert str(error.value) == f"{tmp_path / name}: {what}, not {kind}; make it {kind}, or remove it"


def test_a_split_folder_that_cannot_be_read_is_one_line(tmp_path, monkeypatch):
    """An unreadable test/ (root reads any folder, so the refusal of the listing is simulated) was taken as none."""
    write_image_folder(tmp_path, {"train": 6, "test": 2}, ["cat", "dog"], size=8)
    listdir = os.listdir

    def refuse_test(path):
        if Path(path) == tmp_path / "test":
            raise PermissionError(13, "Permission denied")
        return listdir(path)

    monkeypatch.setattr(os, "listdir", refuse_test)
    with pytest.raises(OkdpipeError) as error:
        load_dataset("imagefolder", tmp_path, image_size=8)
    assert str(error.value) == (
        f"{tmp_path / 'test'}: cannot be read (Permission denied); give okdpipe read access, or remove it"
    )
