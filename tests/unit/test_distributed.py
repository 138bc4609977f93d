"""Data parallelism's pieces: batch shards, gradient averaging (exact when BatchNorm is frozen), the launcher
and its one-line errors, and the checks on the world size."""

import pytest
import torch
from typer.testing import CliRunner

from okdpipe.cli import app
from okdpipe.config import DistillConfig
from okdpipe.datasets import load_dataset, make_loader
from okdpipe.datasets.loader import shard_bounds
from okdpipe.distill import distributed
from okdpipe.distill.methods import StepContext
from okdpipe.distill.trainer import build_session, fit, train_step
from okdpipe.errors import OkdpipeError
from okdpipe.run import RunDir

# synthetic: 48 training images after the 25% validation split -> 6 global batches of 8
TINY = dict(
    method="vanilla", arch="resnet8", students=2, dataset="synthetic", epochs=1, batch_size=8, lr=0.05, val_split=0.25
)


def test_shard_bounds_cut_a_batch_into_consecutive_near_equal_parts():
    assert [shard_bounds((8, 16), r, 2) for r in range(2)] == [(8, 12), (12, 16)]
    assert [shard_bounds((0, 5), r, 3) for r in range(3)] == [(0, 1), (1, 3), (3, 5)]
    assert shard_bounds((3, 9), 0, 1) == (3, 9)


def test_rank_shards_put_together_are_the_single_process_batch_and_its_augmentation():
    bundle = load_dataset("synthetic", None, val_split=0.25, seed=0)
    make = lambda shard: make_loader(
        bundle.train,
        bundle.spec,
        batch_size=8,
        train=True,
        device="cpu",  # noqa: E731
        seed=5,
        views=2,
        shard=shard,
    )
    whole, parts = make((0, 1)), [make((r, 2)) for r in range(2)]
    assert len(whole) == len(parts[0]) == 6
    for epoch in (0, 3):
        for batch, *shards in zip(whole.epoch(epoch), *(p.epoch(epoch) for p in parts)):
            assert [s.labels.numel() for s in shards] == [4, 4]
            assert torch.equal(torch.cat([s.views for s in shards], dim=1), batch.views)
            assert torch.equal(torch.cat([s.labels for s in shards]), batch.labels)


def test_bad_shard_is_refused():
    bundle = load_dataset("synthetic", None, val_split=0.25, seed=0)
    with pytest.raises(OkdpipeError, match="rank"):
        make_loader(bundle.train, bundle.spec, batch_size=8, train=True, device="cpu", shard=(2, 2))


def test_buckets_keep_order_split_on_dtype_and_size(monkeypatch):
    monkeypatch.setattr(distributed, "BUCKET_BYTES", 40)
    tensors = [torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(2, dtype=torch.float64), torch.zeros(20)]
    sizes = [[t.numel() for t in bucket] for bucket in distributed.buckets(tensors)]
    assert sizes == [[4, 4], [4], [2], [20]]


def test_single_process_group_is_a_no_op():
    group = distributed.Group()
    grad = torch.tensor([1.0, 2.0])
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = grad.clone()
    group.average_gradients([param])
    assert torch.equal(param.grad, grad) and group.is_main and group.from_main(7) == 7
    assert group.device(torch.device("cuda")) == torch.device("cuda", 0)


def test_batch_size_not_divisible_by_the_processes_is_one_line(tmp_path):
    with pytest.raises(OkdpipeError, match=r"--batch-size 10 is not divisible by 4 processes"):
        fit(DistillConfig(**{**TINY, "batch_size": 10, "nproc_per_node": 4}), RunDir(tmp_path / "r"))
    result = CliRunner().invoke(
        app,
        [
            "distill",
            "--dataset",
            "synthetic",
            "--batch-size",
            "9",
            "--nproc-per-node",
            "2",
            "--out",
            str(tmp_path / "c"),
        ],
    )
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and lines[-1].startswith("error: --batch-size 9 is not divisible by 2")
    assert not (tmp_path / "c").exists()


def test_torchrun_world_size_is_recorded_and_a_contradicting_flag_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(OkdpipeError, match="disagrees with the launcher's WORLD_SIZE 2"):
        fit(DistillConfig(**{**TINY, "nproc_per_node": 4}), RunDir(tmp_path / "r"))
    from okdpipe.distill.trainer import with_world_size

    assert with_world_size(DistillConfig(**TINY)).nproc_per_node == 2


def weights_after_steps_with_frozen_batchnorm(cfg: DistillConfig, root: str, steps: int) -> dict:
    """The real train_step with BatchNorm in eval mode, so each image's gradient ignores its batch-mates:
    then N processes must reach one process's weights up to float summation order."""
    with distributed.joined(torch.device("cpu")) as group:
        s = build_session(cfg, RunDir(root), group)
        s.students.eval()
        spe, generator = len(s.train_loader), torch.Generator().manual_seed(0)
        for i, batch in zip(range(steps), s.train_loader.epoch(0)):
            train_step(s, batch, StepContext(i / spe, i, cfg.epochs, spe, generator))
        return {k: v.clone() for k, v in s.students.state_dict().items()}


@pytest.mark.slow
def test_two_processes_average_to_the_global_batch_gradient(tmp_path):
    cfg = DistillConfig(**{**TINY, "grad_clip": 1.0})  # clipping must see the averaged (global) gradient
    single = weights_after_steps_with_frozen_batchnorm(cfg, str(tmp_path / "one"), 4)
    double = distributed.launch(
        weights_after_steps_with_frozen_batchnorm,
        2,
        cfg.model_copy(update={"nproc_per_node": 2}),
        str(tmp_path / "two"),
        4,
    )
    initial = weights_after_steps_with_frozen_batchnorm(cfg, str(tmp_path / "zero"), 0)
    largest = lambda a, b: max(float((a[k] - b[k]).abs().max()) for k in a)  # noqa: E731
    assert largest(single, initial) > 1e-2  # the steps moved the weights
    assert largest(single, double) < 1e-6, largest(single, double)


def raise_on_rank_one(value: int) -> int:
    import os

    if os.environ["RANK"] == "1":
        raise OkdpipeError("rank one refuses")
    return value * int(os.environ["WORLD_SIZE"])


def test_a_worker_error_reaches_the_launcher_as_one_line():
    with pytest.raises(OkdpipeError, match="^rank one refuses$"):
        distributed.launch(raise_on_rank_one, 2, 3)
