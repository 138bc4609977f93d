"""A real `kill -9` in the middle of an epoch, then `--resume`: the same final weights as a straight run; while the
run lives its directory is locked, and its death leaves no lock behind."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ARGS = [
    "--method",
    "vanilla",
    "--arch",
    "resnet8",
    "--students",
    "2",
    "--dataset",
    "synthetic",
    "--epochs",
    "5",
    "--batch-size",
    "4",
    "--val-split",
    "0.25",
    "--seed",
    "3",
    "--set",
    "data_options.n_train=256",  # epochs long enough (~1 s) that the kill lands mid-run on a fast machine
]


def distill(*extra):
    return [sys.executable, "-m", "okdpipe.cli", "distill", *ARGS, *extra]


def epochs_logged(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum('"kind": "epoch"' in line for line in path.read_text().splitlines())


def students_of(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["students"]


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(distill("--out", str(straight)), check=True, capture_output=True)
    proc = subprocess.Popen(distill("--out", str(killed)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while epochs_logged(killed) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.1)  # into the third epoch
    os.kill(proc.pid, signal.SIGSTOP)  # frozen mid-epoch, holding the lock, while a second run tries
    assert proc.poll() is None and epochs_logged(killed) < 5, "the run finished before it was stopped; make it longer"
    second = subprocess.run(distill("--out", str(killed), "--resume"), capture_output=True, text=True)
    assert second.returncode == 2 and second.stderr.splitlines() == [second.stderr.strip()]
    assert second.stderr.startswith(f"error: {killed} is in use by another okdpipe run (pid {proc.pid} on ")
    os.kill(proc.pid, signal.SIGKILL)  # the lock file stays; the kernel drops the lock with the process
    proc.wait()
    result = subprocess.run(distill("--out", str(killed), "--resume"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    a, b = students_of(straight), students_of(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [
        json.loads(l)["epoch"] for l in (killed / "metrics.jsonl").read_text().splitlines() if '"kind": "epoch"' in l
    ]
    assert epochs == list(range(1, 6))
