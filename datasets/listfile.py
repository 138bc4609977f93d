"""A list file: `path,label` per line (CSV), the alternative to class folders for an image folder's split.

    path,label                 <- optional header
    photos/0001.jpg,cat        <- relative to the list file's folder (or absolute)
    "photos/a, b.jpg",dog      <- CSV quoting for commas in names

Lines end at a newline (\\n or \\r\\n) only, so a name may hold any other character (U+2028 too); a quoted path must
close on its own line. Blank lines and lines starting with `#` are skipped; a file listed twice is an error naming
both lines. A listed file that is missing or cannot be decoded counts as a bad image (listed, then refused or
skipped with --skip-bad-images), like a broken file in a class folder.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from okdpipe.errors import OkdpipeError
from okdpipe.files import read_user_file

HEADER = ["path", "label"]
MAX_LIST_BYTES = 1 << 30  # ten million rows of long paths


INTEGER = re.compile(r"-?[0-9]+")  # a numeric label: 0-9 only (not '²', not '--1'), so int() reads every one


def read_list(list_file: Path) -> tuple[list[Path], list[str]]:
    """The listed paths (resolved against the list file's folder) and their label names, in file order."""
    raw = read_user_file(list_file, "list file", MAX_LIST_BYTES)
    try:
        text = raw.decode("utf-8-sig")  # a BOM, as spreadsheet programs write, is not data
    except UnicodeDecodeError as error:
        raise OkdpipeError(
            f"{list_file}: the list file is not UTF-8 ({error.reason} at byte {error.start}); "
            "pass a UTF-8 `path,label` CSV"
        ) from None
    paths, labels = [], []
    first_line: dict[str, int] = {}  # each listed file (its real path) -> the line that first listed it
    for number, line in enumerate(text.split("\n"), start=1):
        row = parse_row(line, number, list_file)  # csv itself ends a line at \r, so \r\n needs nothing more
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        cells = [cell.strip() for cell in row]
        if number == 1 and [cell.lower() for cell in cells] == HEADER:
            continue
        if len(cells) != 2 or not all(cells):
            raise OkdpipeError(
                f"{list_file} line {number}: expected `path,label`, got {row!r}; one image and its class per line"
            )
        if "\0" in cells[0]:
            raise OkdpipeError(f"{list_file} line {number}: the path holds a NUL character; no file is named so")
        path = list_file.parent / cells[0]
        refuse_duplicate(first_line.setdefault(os.path.realpath(path), number), number, cells[0], list_file)
        paths.append(path)
        labels.append(cells[1])
    if not paths:
        raise OkdpipeError(f"{list_file}: lists no images; write one `path,label` line per image")
    return paths, labels


def parse_row(line: str, number: int, list_file: Path) -> list[str]:
    """One line's CSV cells. Lines end at \\n (or \\r\\n) only: str.splitlines() also split at U+2028 and the other
    Unicode line breaks, which can be part of a file name, and csv let a quoted path run on over the next line."""
    try:
        return next(csv.reader([line], strict=True), [])
    except csv.Error as error:
        if "unexpected end of data" in str(error):
            raise OkdpipeError(
                f"{list_file} line {number}: a quoted path is not closed on its line (a name holding a line break "
                "cannot be listed); rename the file, one `path,label` per line"
            ) from None
        raise OkdpipeError(
            f"{list_file} line {number}: not a CSV `path,label` line ({error}); quote a path holding commas or "
            'quotes as "a, b.png" (a quote inside doubled: "say ""hi"".png")'
        ) from None


def refuse_duplicate(first: int, number: int, listed: str, list_file: Path) -> None:
    """An image listed twice would count twice (and, under two labels, teach both): refuse it, naming both lines."""
    if first != number:
        raise OkdpipeError(
            f"{list_file} lines {first} and {number} both list {listed!r} (the same file); keep one line per image"
        )


def class_order(names: list[str]) -> tuple[str, ...]:
    """The distinct label names sorted: numerically when every one is an integer (2 before 10), else as text."""
    distinct = set(names)
    if all(INTEGER.fullmatch(name) for name in distinct):
        return tuple(sorted(distinct, key=lambda name: (int(name), name)))
    return tuple(sorted(distinct))


def label_indices(names: list[str], classes: tuple[str, ...], list_file: Path) -> list[int]:
    """Each name's class index; a name the training split does not have is an error naming it."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise OkdpipeError(
            f"{list_file}: label(s) {', '.join(map(repr, unknown[:5]))} are not classes of the training split "
            f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}); fix the labels"
        )
    return [index[name] for name in names]
