"""An asyncio dynamic batcher: concurrent requests share one model call, so throughput grows with load.

Requests are queued with a *key* (what must be equal for two requests to share a model call: here the
caption mode and whether attention is wanted) and a payload. One worker task takes the oldest request,
then keeps collecting until it holds ``max_batch_size`` requests or ``max_wait_ms`` have passed since it
started — but it stops waiting at once when no other request is on its way (``pending()`` is 0: no
request is being received or decoded), so a lone request pays no wait. The batch is split by key, and
each group runs as one call of ``run_batch(key, payloads)`` in a single model thread
(``run_in_executor``), so the event loop keeps accepting and decoding requests while the model works;
whatever arrives meanwhile forms the next batch. Each request's future is resolved with its own result
(or the group's exception).

With ``workers > 1`` up to that many model calls run at once, each in its own model thread, but an
extra call starts only for a *full* batch (``max_batch_size`` requests waiting): while one call runs,
the requests arriving meanwhile gather into the next batch rather than being split into small
concurrent ones, since a big batch is usually cheaper per image than two half-size ones on the same
cores; under more load than one model call absorbs, the other workers take full batches on other cores.

The queue is bounded (``max_queue``): past it :meth:`DynamicBatcher.submit` raises :class:`QueueFull`
at once rather than letting latency grow without limit.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Sequence

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Too many requests are waiting for the model."""


class BatcherClosed(RuntimeError):
    """The batcher was shut down."""


@dataclass
class BatchInfo:
    """How a request was served: time queued, the model call's duration and the batch it shared."""

    queue_ms: float
    model_ms: float
    batch_size: int


@dataclass
class _Item:
    key: Hashable
    payload: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatcherStats:
    requests: int = 0
    batches: int = 0  # model calls
    largest_batch: int = 0
    failed_batches: int = 0

    def as_dict(self) -> dict[str, Any]:
        mean = self.requests / self.batches if self.batches else 0.0
        return {"requests": self.requests, "model_calls": self.batches, "mean_batch_size": round(mean, 3),
                "largest_batch": self.largest_batch, "failed_model_calls": self.failed_batches}


class DynamicBatcher:
    def __init__(
        self,
        run_batch: Callable[[Hashable, list[Any]], Sequence[Any]],
        *,
        max_batch_size: int = 8,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        pending: Callable[[], int] = lambda: 0,
        workers: int = 1,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.pending = pending
        self.stats = BatcherStats()
        self._items: collections.deque[_Item] = collections.deque()
        self._wakeup: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._closed = False
        self._busy = 0  # model calls running

    # -- life cycle -----------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._closed:
            raise BatcherClosed("the batcher is shut down")
        if self._task is None or self._task.done():
            if self._task is not None and self._task.done() and not self._task.cancelled() and self._task.exception():
                log.error("batcher worker had died: %r; restarting it", self._task.exception())
            self._wakeup = asyncio.Event()
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=self.workers,
                                                                       thread_name_prefix="caption-model")
            self._task = asyncio.get_running_loop().create_task(self._worker(), name="caption-batcher")

    async def close(self) -> None:
        """Stop the worker; requests still queued fail with :class:`BatcherClosed`."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
        while self._items:
            item = self._items.popleft()
            if not item.future.done():
                item.future.set_exception(BatcherClosed("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    @property
    def queued(self) -> int:
        return len(self._items)

    # -- requests -------------------------------------------------------------------------------
    async def submit(self, key: Hashable, payload: Any) -> tuple[Any, BatchInfo]:
        """Queue one request and wait for its result (``QueueFull`` at once when the queue is full)."""
        self._ensure_started()
        if len(self._items) >= self.max_queue:
            raise QueueFull(f"{len(self._items)} requests are already waiting for the model")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._items.append(_Item(key, payload, future))
        assert self._wakeup is not None
        self._wakeup.set()
        return await future

    async def _next_batch(self) -> list[_Item]:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while not self._items:
            self._wakeup.clear()
            await self._wakeup.wait()
        batch = [self._items.popleft()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch_size:
            if self._items:
                batch.append(self._items.popleft())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0 or self.pending() <= 0:
                break
            self._wakeup.clear()
            try:
                # Event.wait has no side effect when cancelled by the timeout (unlike a Queue.get).
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.workers)
        running: set[asyncio.Task] = set()
        try:
            while True:
                await slots.acquire()
                try:
                    # Another call is running: a second one only for a full batch (or once it is done).
                    while self._busy > 0 and len(self._items) < self.max_batch_size:
                        self._wakeup.clear()
                        await self._wakeup.wait()
                    batch = await self._next_batch()
                except BaseException:
                    slots.release()
                    raise
                self._busy += 1  # now, not when the task starts: the next turn of this loop must see it
                task = loop.create_task(self._dispatch(batch, slots))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            for task in list(running):
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def _dispatch(self, batch: list[_Item], slots: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        try:
            groups: dict[Hashable, list[_Item]] = {}
            for item in batch:
                if not item.future.done():  # a caller that gave up (cancelled) is skipped
                    groups.setdefault(item.key, []).append(item)
            for key, items in groups.items():
                started = time.perf_counter()
                try:
                    results = await loop.run_in_executor(self._executor, self.run_batch, key,
                                                         [i.payload for i in items])
                    if len(results) != len(items):
                        raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} requests")
                except asyncio.CancelledError:
                    for i in items:
                        if not i.future.done():
                            i.future.set_exception(BatcherClosed("the server is shutting down"))
                    raise
                except Exception as e:  # noqa: BLE001 - handed to every waiting request
                    self.stats.failed_batches += 1
                    log.exception("model call failed for a batch of %d", len(items))
                    for i in items:
                        if not i.future.done():
                            i.future.set_exception(e)
                    continue
                model_ms = (time.perf_counter() - started) * 1000.0
                self.stats.batches += 1
                self.stats.requests += len(items)
                self.stats.largest_batch = max(self.stats.largest_batch, len(items))
                for i, r in zip(items, results):
                    if not i.future.done():
                        info = BatchInfo(queue_ms=(started - i.enqueued) * 1000.0, model_ms=model_ms,
                                         batch_size=len(items))
                        i.future.set_result((r, info))
        finally:
            self._busy -= 1
            slots.release()
            self._wakeup.set()  # a worker waiting for this call to end may go on
