"""Dynamic micro-batching: concurrent requests share one onnxruntime call.

A collector task takes the first waiting request, then keeps adding requests until the batch holds
`max_batch` images or `max_delay_s` has passed since that first request, and runs the batch in a single
worker thread. While that call runs, new requests queue up, so under load the next batch fills at once and
the delay is only paid when the server is idle. The delay is spent only when the previous batch held more
than one image, i.e. when there is concurrency to gain from: a lone client never waits for company that is
not coming. A request never gets split across batches: one that does not fit waits for the next. Admission
is bounded by `max_queue` images waiting (not yet handed to the model): beyond it `submit` raises QueueFull
at once instead of letting memory grow.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


class QueueFull(Exception):
    """More images are waiting than --max-queue allows; the client should retry later (HTTP 503)."""


@dataclass
class _Pending:
    images: np.ndarray
    future: asyncio.Future


@dataclass(frozen=True)
class BatchStats:
    """Observed by the metrics after every model call."""

    size: int
    seconds: float


class MicroBatcher:
    """Gathers [b_i, C, H, W] requests into one [sum b_i, C, H, W] model call; results keep request order."""

    def __init__(
        self,
        run_batch: Callable[[np.ndarray], np.ndarray],
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        on_batch: Callable[[BatchStats], None] = lambda stats: None,
    ):
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._carry: _Pending | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="okdpipe-infer")
        self._collector: asyncio.Task | None = None
        self._last_batch_size = 1
        self.waiting_images = 0

    def start(self) -> None:
        self._collector = asyncio.get_running_loop().create_task(self._collect_forever())

    async def stop(self) -> None:
        """Called after the HTTP server has drained, so nothing is waiting; cancel the idle collector."""
        if self._collector is not None:
            self._collector.cancel()
            await asyncio.gather(self._collector, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """Logits for `images`, computed in whatever batch they join; raises QueueFull when over capacity."""
        if self.waiting_images + len(images) > self.max_queue:
            raise QueueFull(f"{self.waiting_images} images are waiting (limit {self.max_queue})")
        future = asyncio.get_running_loop().create_future()
        self.waiting_images += len(images)
        self._queue.put_nowait(_Pending(images, future))
        return await future

    async def _collect_forever(self) -> None:
        while True:
            batch = await self._gather_batch()
            await self._run_and_deliver(batch)

    async def _gather_batch(self) -> list[_Pending]:
        batch = [await self._next(timeout=None)]
        size = len(batch[0].images)
        deadline = time.monotonic() + (self.max_delay_s if self._last_batch_size > 1 else 0.0)
        while size < self.max_batch:
            item = await self._next(timeout=deadline - time.monotonic())
            if item is None:
                break
            if size + len(item.images) > self.max_batch:
                self._carry = item
                break
            batch.append(item)
            size += len(item.images)
        return batch

    async def _next(self, timeout: float | None) -> _Pending | None:
        """The carried-over request first, else the queue; None when `timeout` passes with nothing waiting."""
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if timeout is None:
            return await self._queue.get()
        if not self._queue.empty():
            return self._queue.get_nowait()
        if timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _run_and_deliver(self, batch: list[_Pending]) -> None:
        images = batch[0].images if len(batch) == 1 else np.concatenate([item.images for item in batch])
        self.waiting_images -= len(images)
        self._last_batch_size = len(images)
        started = time.perf_counter()
        try:
            logits = await asyncio.get_running_loop().run_in_executor(self._executor, self._run_batch, images)
        except Exception as error:  # a model failure answers every caller in the batch, never kills the loop
            for item in batch:
                _settle(item.future, error=error)
            return
        self._on_batch(BatchStats(len(images), time.perf_counter() - started))
        offsets = np.cumsum([0] + [len(item.images) for item in batch])
        for item, start, stop in zip(batch, offsets[:-1], offsets[1:]):
            _settle(item.future, result=logits[start:stop])


def _settle(future: asyncio.Future, result: np.ndarray | None = None, error: Exception | None = None) -> None:
    """A caller that disconnected has a cancelled future: skip it rather than raise InvalidStateError."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
