import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from okdpipe import files
from okdpipe.errors import OkdpipeError
from okdpipe.files import atomic_write_json, atomic_write_text, file_sha256, read_user_file


def test_atomic_write_replaces_whole_files_with_normal_permissions(tmp_path):
    path = tmp_path / "card.json"
    atomic_write_text(path, "old")
    atomic_write_json(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["card.json"]  # no temp file left behind


def test_file_sha256_known_value(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert file_sha256(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def test_a_silent_named_pipe_is_one_line_not_a_hang(fifo):
    started = time.monotonic()
    with pytest.raises(OkdpipeError, match=r"pipe: the key sent nothing for 0.3 s \(a pipe nobody writes\?\)"):
        read_user_file(fifo, "key", 4096, wait_s=0.3)
    assert time.monotonic() - started < 5


def test_a_pipe_with_a_writer_is_read_like_process_substitution(fifo):
    writer = subprocess.Popen(["sh", "-c", f"sleep 0.2; printf token > '{fifo}'"])
    try:
        assert read_user_file(fifo, "key", 4096, wait_s=10) == b"token"
    finally:
        writer.wait(timeout=10)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: Path("/dev/zero"), "/dev/zero: the key is larger than 4,096 bytes"),
        (lambda tmp: tmp, "the key is a folder; pass a file"),
        (lambda tmp: tmp / "absent", "absent: key not found"),
    ],
)
def test_unusable_user_files_are_one_line(tmp_path, make, message):
    with pytest.raises(OkdpipeError, match=re.escape(message)):
        read_user_file(make(tmp_path), "key", 4096)


def test_every_user_named_file_goes_through_the_bounded_reader(fifo, monkeypatch):
    """Config files, API keys, gate policies, baselines and image lists: none may hang on a silent pipe."""
    from okdpipe.bench.gate import GateUsageError, load_baseline, load_policy
    from okdpipe.config import read_yaml
    from okdpipe.datasets.listfile import read_list
    from okdpipe.serve.server import read_api_key

    monkeypatch.setattr(files, "PIPE_WAIT_S", 0.2)
    readers = [read_yaml, lambda p: read_api_key(p, environment={}), load_policy, load_baseline, read_list]
    for read in readers:
        with pytest.raises((OkdpipeError, GateUsageError), match="sent nothing for 0.2 s"):
            read(fifo)


@pytest.mark.parametrize("make", [os.mkfifo, lambda p: os.symlink("/dev/null", p)], ids=["fifo", "link-to-device"])
def test_an_existing_target_that_is_not_a_regular_file_is_never_replaced(tmp_path, make):
    """Renaming over /dev/null as root would delete the device; writing into a FIFO loses the output."""
    target = tmp_path / "report.json"
    make(target)
    kind = os.lstat(target).st_mode
    for write in (lambda: atomic_write_text(target, "x"), lambda: files.check_can_write_file(target, "--report")):
        with pytest.raises(OkdpipeError, match="is not a regular file .*; pass the path of a file to write"):
            write()
    assert os.lstat(target).st_mode == kind and [p.name for p in tmp_path.iterdir()] == ["report.json"]


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000])
def test_json_nested_past_the_recursion_limit_is_malformed_json(text):
    with pytest.raises(json.JSONDecodeError, match="nested too deeply"):
        files.loads_finite(text)
    assert files.loads_finite('[[1, 2], {"a": [3]}]') == [[1, 2], {"a": [3]}]


def test_load_failure_is_one_sentence_cut_at_a_word():
    from okdpipe.modelfile import load_failure

    reason = load_failure(RuntimeError("word " * 60 + "end. A second sentence.\nA second line."))
    assert reason.endswith("...") and len(reason) <= 160 and reason[:-3].endswith("word")
    assert load_failure(OSError("short reason. more")) == "short reason"


@pytest.mark.parametrize(
    "text, error, fragment",
    [
        ('{"a": ' + "9" * 5000 + "}", json.JSONDecodeError, "an integer of 5,000 digits"),
        ('{"a": 1e999}', ValueError, "non-finite number (1e999)"),
        ('{"a": -1e999}', ValueError, "non-finite number (-1e999)"),
        ('{"a": NaN}', ValueError, "non-finite number (NaN)"),
    ],
)
def test_numbers_json_allows_but_okdpipe_never_writes_are_refused(text, error, fragment):
    with pytest.raises(error) as raised:
        files.loads_finite(text)
    assert fragment in str(raised.value)
    assert files.loads_finite('{"a": 1e300, "b": 12345678901234567890}') == {"a": 1e300, "b": 12345678901234567890}


def loop(path: Path) -> None:
    os.symlink(path.with_name("other"), path)
    os.symlink(path, path.with_name("other"))


@pytest.mark.parametrize("make", [lambda p: os.symlink(p.with_name("gone"), p), loop], ids=["dangling", "loop"])
@pytest.mark.parametrize("below", ["", "run/x"], ids=["the folder", "an ancestor"])
def test_a_folder_to_write_through_a_link_to_nothing_is_named_as_that(tmp_path, make, below):
    """mkdir there says "File exists" or "Too many levels of symbolic links", naming neither the link nor the fix;
    every writer (a run's --out, export's OUT, a report's files) checks folders the same way."""
    link = tmp_path / "out"
    make(link)
    folder = link / below if below else link
    expected = f"--out {folder}: {link} is a link to nothing (its target is missing, or it loops); remove the link"
    with pytest.raises(OkdpipeError, match=re.escape(expected)):
        files.check_can_create_folder(folder, "--out")
    with pytest.raises(OkdpipeError, match=re.escape(f"{link} is a link to nothing")):
        atomic_write_text(folder / "report.md", "x")


@pytest.mark.timeout(30)  # opening a pipe's reading end would wait for a writer: fail instead of hanging
@pytest.mark.parametrize("make", ["link", "fifo"])
def test_a_lock_file_that_is_a_link_or_a_pipe_is_refused_and_left_alone(tmp_path, make):
    """The lock's holder line is written into the lock file: through a link it would clobber someone's file."""
    from okdpipe.locks import exclusive_lock

    victim, lock = tmp_path / "victim.txt", tmp_path / ".lock"
    victim.write_text("precious\n")
    os.symlink(victim, lock) if make == "link" else os.mkfifo(lock)
    fragment = "is a link, not" if make == "link" else "is not a regular file (a pipe or device), not"
    with pytest.raises(OkdpipeError, match=re.escape(f"{lock} {fragment} okdpipe's lock file; remove it")):
        with exclusive_lock(lock, "busy"):
            pass
    assert victim.read_text() == "precious\n" and (lock.is_symlink() if make == "link" else lock.is_fifo())
    lock.unlink()
    with exclusive_lock(lock, "busy"):  # the control: a regular lock file is created and holds the holder
        assert lock.read_text().startswith(f"pid {os.getpid()} on ")
