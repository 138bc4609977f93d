"""`okdpipe distill --nproc-per-node 2` on CPU (gloo, loopback): one process's result within tolerance, identical
ranks (students and method state), rank 0 alone writing, and exact resume under two processes."""

import json
import subprocess
import sys

import pytest
import torch

from okdpipe.config import DistillConfig
from okdpipe.datasets import load_dataset
from okdpipe.distill import distributed
from okdpipe.distill.checkpoint import load_checkpoint
from okdpipe.distill.trainer import build_models, fit, train
from okdpipe.run import RunDir

# synthetic with 256 images: 192 for training after the 25% validation split -> 6 global batches of 32 per epoch
TINY = dict(
    method="vanilla",
    arch="resnet8",
    students=2,
    dataset="synthetic",
    epochs=2,
    batch_size=32,
    lr=0.05,
    val_split=0.25,
    seed=1,
    data_options={"n_train": 256},
)
STEPS_PER_EPOCH = 6
# |w_1proc - w_2proc| / |w_1proc - w_init| over all student parameters (L2): measured 0.32 (max abs difference
# 0.024). The gap is BatchNorm's alone: each rank normalises its 16 images with their own statistics instead of
# the 32 of one process, and 12 SGD steps from a fresh init amplify that; with BatchNorm frozen the two agree
# to 1e-6 (tests/unit/test_distributed.py). Without the gradient all-reduce the ratio is 0.67, so 0.45 fails it.
RELATIVE_TOLERANCE = 0.45


def cli_args(config: DistillConfig) -> list[str]:
    flags = [
        "method",
        "arch",
        "students",
        "dataset",
        "epochs",
        "batch_size",
        "lr",
        "val_split",
        "seed",
        "nproc_per_node",
    ]
    sets = [f"--set=data_options.{key}={value}" for key, value in config.data_options.items()]
    return [arg for key in flags for arg in (f"--{key.replace('_', '-')}", str(getattr(config, key)))] + sets


def train_and_save_each_rank(cfg: DistillConfig, root: str, dumps: str, resume: bool = False) -> None:
    """One worker: the real loop, then this rank's students and method state to DUMPS/rank<r>.pt."""
    with distributed.joined(torch.device("cpu")) as group:
        s, _ = train(cfg, RunDir(root), group, resume, None, print)
        torch.save(
            {"students": s.students.state_dict(), "method": s.method.state_dict()}, f"{dumps}/rank{group.rank}.pt"
        )


def assert_ranks_identical(dumps) -> None:
    first, second = (torch.load(dumps / f"rank{r}.pt", weights_only=True) for r in range(2))
    for part in ("students", "method"):
        assert first[part].keys() == second[part].keys()
        assert all(torch.equal(first[part][k], second[part][k]) for k in first[part]), part


def parameters(state: dict) -> dict:
    return {k: v for k, v in state.items() if v.is_floating_point() and "running" not in k}


def distance(a: dict, b: dict) -> float:
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5


def initial_parameters(cfg: DistillConfig) -> dict:
    spec = load_dataset(cfg.dataset, None, val_split=cfg.val_split, seed=cfg.seed, **cfg.data_options).spec
    return parameters(build_models(cfg, spec, torch.device("cpu"))[0].state_dict())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    cfg = DistillConfig(**TINY)
    fit(cfg, RunDir(root / "one"), echo=lambda _: None)
    command = [
        sys.executable,
        "-m",
        "okdpipe.cli",
        "distill",
        *cli_args(cfg.model_copy(update={"nproc_per_node": 2})),
        "--out",
        str(root / "two"),
    ]
    console = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert console.returncode == 0, console.stderr
    return root, console.stdout


@pytest.mark.slow
def test_two_processes_match_one_within_tolerance_and_rank_zero_writes(runs):
    root, console = runs
    one, two = (parameters(load_checkpoint(RunDir(root / name))["students"]) for name in ("one", "two"))
    ratio = distance(one, two) / distance(one, initial_parameters(DistillConfig(**TINY)))
    assert 0 < ratio < RELATIVE_TOLERANCE, ratio
    assert console.count("epoch 1/2 ") == 1 and "on 2 processes" in console
    lines = [json.loads(line) for line in (root / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines if line["kind"] == "epoch"] == [1, 2]
    assert [line["step"] for line in lines if line["kind"] == "step"] == [6, 12]  # one writer, not two
    manifest = json.loads((root / "two" / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["config"]["nproc_per_node"] == 2


@pytest.mark.slow
def test_resume_under_two_processes_reaches_the_straight_run_with_identical_ranks(runs, tmp_path):
    root, _ = runs
    cfg = DistillConfig(**TINY, nproc_per_node=2)
    killed = RunDir(tmp_path / "killed")
    assert fit(cfg, killed, stop_after_steps=STEPS_PER_EPOCH + 3) == {"stopped": True}
    assert load_checkpoint(killed)["epoch"] == 1
    distributed.launch(train_and_save_each_rank, 2, cfg, str(killed.root), str(tmp_path), True)
    assert_ranks_identical(tmp_path)
    straight, resumed = (load_checkpoint(run)["students"] for run in (RunDir(root / "two"), killed))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.slow
def test_method_state_updated_after_each_step_stays_identical_across_ranks(tmp_path):
    """PCL's temporal mean (an EMA of the students, after_step) on two ranks: bitwise the same."""
    cfg = DistillConfig(**{**TINY, "method": "pcl", "students": None, "epochs": 1, "nproc_per_node": 2})
    distributed.launch(train_and_save_each_rank, 2, cfg, str(tmp_path / "run"), str(tmp_path))
    assert_ranks_identical(tmp_path)
    assert any("mean_teacher" in k for k in torch.load(tmp_path / "rank0.pt", weights_only=True)["method"])


@pytest.mark.slow
def test_sigterm_stops_every_worker_and_leaves_a_resumable_interrupted_run(tmp_path):
    """SIGTERM to `distill --nproc-per-node 2`: the workers stop too (before, they trained on, unseen, for as long
    as the command took to exit), the exit is 143 with one line, and the run says 'interrupted' and keeps a
    checkpoint to resume from."""
    import signal
    import time

    cfg = DistillConfig(**{**TINY, "epochs": 200, "nproc_per_node": 2})
    out = tmp_path / "run"
    command = [sys.executable, "-m", "okdpipe", "distill", *cli_args(cfg), "--out", str(out)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "last.pt").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert (process.returncode, stderr.splitlines()[-1]) == (143, "error: interrupted (SIGTERM)")
    time.sleep(1)  # give a worker that outlived its parent a moment to show itself
    session = subprocess.run(["ps", "-o", "stat=,cmd=", "-s", str(process.pid)], capture_output=True, text=True)
    alive = [line for line in session.stdout.splitlines() if not line.strip().startswith("Z")]  # Z: already dead
    assert alive == []  # no worker of the command's session is left
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and 1 <= len(manifest["epochs"]) < 200
    assert load_checkpoint(RunDir(out))  # the last whole epoch's checkpoint verifies: `--resume` continues there
