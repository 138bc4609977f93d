"""Data-parallel training over N processes: the process group, the launcher, and the few collectives `fit` needs.

Two ways in, one code path. `okdpipe distill --nproc-per-node N` starts N processes with
torch.multiprocessing (spawn) after setting the environment torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR=127.0.0.1, MASTER_PORT=a free loopback port); `torchrun --nproc-per-node N -m okdpipe.cli distill
...` sets that environment itself. Either way every process calls `fit`, which joins the group from the
environment: gloo on CPU, nccl on CUDA with one GPU per process (`cuda:{LOCAL_RANK}`).

Why a manual gradient all-reduce instead of DistributedDataParallel: methods run extra forwards through the
students outside their main forward (PCL's temporal mean, OKDPH's functional_call hybrid), keep parameters
that get no gradient in some configurations, and own extra optimisers (FFSD); DDP's reducer hooks assume one
forward per backward and a fixed set of used parameters, and it would wrap only the Students module.
Averaging the gradient of every parameter in the optimisers' param groups after `backward()` (flattened into
buckets, one all-reduce each) is method-agnostic, and it is what DDP computes: the mean over ranks of each
rank's batch-mean gradient is the gradient of the global batch's mean loss (equal shards).

BatchNorm uses per-rank batch statistics, as plain DDP does (SyncBatchNorm is CUDA-only in torch), so N
processes match one process with the same global batch within tolerance, not bit for bit. Running statistics
(and every other floating-point buffer, e.g. a mean teacher's) are averaged across ranks at the end of each
epoch, before evaluation and the checkpoint: a running average is linear in the batch statistics, so averaging
once per epoch equals averaging after every step, and the running mean is then exactly that of the global
batches. Parameters need no such step: every rank applies the same averaged gradient (and the same
after_step update: EMA, fusion) to identical weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import signal
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from okdpipe.cli_support import unwind_on_signals
from okdpipe.errors import OkdpipeError

LOOPBACK = "127.0.0.1"
BUCKET_BYTES = 32 * 2**20  # gradients are all-reduced in flat buckets of at most this size (DDP uses 25 MiB)
COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # other ranks wait this long while rank 0 evaluates or checkpoints
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
SPAWNED_BY_LAUNCH = "OKDPIPE_LAUNCHED_WORKER"  # set in workers `launch` starts: their launcher holds the run lock
STOP_GRACE_S = 10.0  # how long interrupted workers get to unwind (one stuck in a collective is then killed)


@dataclass(frozen=True)
class Group:
    """This process's place in the run; every collective is a no-op for a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, metrics, the manifest and the console output."""
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """One GPU per process: `cuda:{local_rank}`."""
        return torch.device("cuda", self.local_rank) if requested.type == "cuda" else requested

    def average_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Replace every present gradient by its mean over ranks. Which parameters have a gradient is the same
        on every rank (same code path, same seeded draws), so the flat buckets line up."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.world_size == 1 or not grads:
            return
        for bucket in buckets(grads):
            self.average_in_place(bucket)

    def average_buffers(self, *modules: nn.Module) -> None:
        """Average floating-point buffers (BatchNorm running statistics, EMA copies) over ranks."""
        floats = [b for m in modules for b in m.buffers() if b.is_floating_point()]
        if self.world_size == 1 or not floats:
            return
        for bucket in buckets(floats):
            self.average_in_place(bucket)

    def average_in_place(self, tensors: list[torch.Tensor]) -> None:
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        dist.all_reduce(flat)  # SUM: gloo has no AVG
        flat /= self.world_size
        for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            tensor.detach().copy_(part.view_as(tensor))

    def mean_of(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-rank scalars (loss terms) -> their mean over ranks, the global batch's value for batch means."""
        if self.world_size == 1 or not values:
            return values
        keys = sorted(values)
        stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys])
        dist.all_reduce(stacked)
        return dict(zip(keys, stacked / self.world_size))

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (results computed on rank 0 only, e.g. evaluation)."""
        if self.world_size == 1:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def copy_from_main(self, *modules: nn.Module) -> None:
        """Start every rank from rank 0's parameters and buffers (as DDP does at construction)."""
        if self.world_size == 1:
            return
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def buckets(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Consecutive runs of same-dtype, same-device tensors of at most BUCKET_BYTES (one tensor may exceed it)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        kind_changed = bucket and (tensor.dtype, tensor.device) != (bucket[0].dtype, bucket[0].device)
        if bucket and (kind_changed or size + nbytes > BUCKET_BYTES):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += nbytes
    if bucket:
        yield bucket


def launched_world_size() -> int | None:
    """The world size of an already running group or of torchrun's environment; None when neither."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


def holds_run_lock() -> bool:
    """True in the one process that locks the run directory: a plain process, the process that launches
    --nproc-per-node workers, or rank 0 under torchrun; not a worker `launch` started (its launcher holds it)."""
    return is_main_process() and os.environ.get(SPAWNED_BY_LAUNCH) != "1"


def needs_launch(nproc_per_node: int) -> bool:
    """True in the process the user started with --nproc-per-node N > 1: it must start the N workers."""
    return nproc_per_node > 1 and launched_world_size() is None


def is_main_process() -> bool:
    """Rank 0, or a plain single process: the one that talks to the user."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def joined(device: torch.device) -> Iterator[Group]:
    """This process's Group: joins (and afterwards leaves) the process group torchrun's environment describes;
    reuses one that is already running (and leaves it running); a plain Group when there is no group."""
    if dist.is_available() and dist.is_initialized():
        yield Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
        return
    rank, world_size, local_rank = (int(os.environ.get(key, default)) for key, default in zip(ENV_KEYS, (0, 1, 0)))
    if world_size == 1:
        yield Group()
        return
    group = Group(rank, world_size, local_rank)
    start_group(group, device)
    try:
        yield group
    finally:
        dist.destroy_process_group()


def start_group(group: Group, device: torch.device) -> None:
    if device.type == "cuda":
        if torch.cuda.device_count() <= group.local_rank:
            raise OkdpipeError(
                f"process {group.local_rank} needs cuda:{group.local_rank} but only "
                f"{torch.cuda.device_count()} GPUs are visible; lower --nproc-per-node"
            )
        torch.cuda.set_device(group.local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        # N processes on the same cores: split the cores instead of oversubscribing them N times
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // group.world_size))
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method="env://",
        rank=group.rank,
        world_size=group.world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )


def free_port() -> int:
    """A port nobody listens on now, on loopback only (rank 0 listens on it for the rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def launch(target: Callable[..., Any], world_size: int, *args: Any, **kwargs: Any) -> Any:
    """Run `target(*args, **kwargs)` in `world_size` fresh processes on this machine with torchrun's
    environment; returns rank 0's result. An OkdpipeError in any process is raised here as the same one line;
    any other failure keeps its traceback."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    context = mp.get_context("spawn")
    outbox = context.SimpleQueue()
    spawned = mp.start_processes(
        worker,
        (world_size, free_port(), outbox, target, args, kwargs),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    messages: dict[str, Any] = {}
    # torch logs "Terminating process N via signal SIGTERM" for each peer of a failed worker: noise above the
    # one `error:` line that says why (the worker's own error); stopping the peers is this function's job
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    try:
        while not spawned.join(timeout=0.2):
            drain(outbox, messages)  # keep reading so a large result never blocks the writer on a full pipe
    except ProcessException:
        drain(outbox, messages)
        if "error" in messages:
            raise OkdpipeError(messages["error"]) from None
        raise
    except BaseException:  # Ctrl-C, SIGTERM, SIGHUP: the workers stop too before this process unwinds
        stop_workers(spawned.processes)
        raise
    drain(outbox, messages)
    return pickle.loads(messages["result"])


def stop_workers(processes: list, grace_s: float = STOP_GRACE_S) -> None:
    """Send each live worker SIGTERM (it unwinds as this process does: temp files removed, nothing half-written),
    give them `grace_s` seconds together, then kill what is left. Without this they train on, unseen, after
    the command has said it was interrupted."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def drain(outbox, messages: dict[str, Any]) -> None:
    with contextlib.suppress(queue.Empty, EOFError):
        while not outbox.empty():
            kind, value = outbox.get()
            messages.setdefault(kind, value)  # the first error is the cause; later ones are its echoes


def worker(local_rank: int, world_size: int, port: int, outbox, target, args, kwargs) -> None:
    """One spawned process: torchrun's environment, then `target`; the result or a user error goes to `outbox`."""
    os.environ.update(
        MASTER_ADDR=LOOPBACK,
        MASTER_PORT=str(port),
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        **{SPAWNED_BY_LAUNCH: "1"},
    )
    unwind_on_signals((signal.SIGTERM, signal.SIGHUP, signal.SIGINT))  # stop_workers' SIGTERM, or the terminal's
    try:
        result = target(*args, **kwargs)
    except OkdpipeError as exc:
        outbox.put(("error", str(exc)))
        raise SystemExit(1) from None
    if local_rank == 0:
        # plain pickle sends tensors by value; the queue's own pickler would share memory with a process that exits
        outbox.put(("result", pickle.dumps(result)))


def picklable(function: Callable, fallback: Callable) -> Callable:
    """`function` if it can travel to a spawned process, else `fallback` (lambdas and closures cannot)."""
    try:
        pickle.dumps(function)
    except (pickle.PicklingError, AttributeError, TypeError):
        return fallback
    return function
