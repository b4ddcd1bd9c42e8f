"""Dynamic batching: concurrent requests for one model are scored together.

A request puts its decoded image on the model's queue and awaits a future. One worker per model takes
the first waiting image, then keeps collecting until ``max_batch`` images or ``max_wait`` seconds after
the first, and scores the batch in one call on its own thread (the event loop keeps accepting requests).
Under light load a request waits at most ``max_wait``; under heavy load batches fill up, so throughput
grows with concurrency. A batch that fails is retried image by image, so one failure stays with its own
request.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

__all__ = ["DynamicBatcher", "PixelBudget"]


class DynamicBatcher:
    """Collects items from concurrent callers into batches for ``run_batch`` (called on a worker thread)."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[Any]], Sequence[Any]],
        max_batch: int = 16,
        max_wait: float = 0.005,
        on_batch: Callable[[int], None] | None = None,
        name: str = "model",
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.on_batch = on_batch
        self.dropped = 0  # items whose caller gave up before they were scored (never computed)
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        # One thread per model: batches of one model run one after the other (the backend uses all cores
        # inside a batch); separate models do not wait for each other.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"batch-{name}"
        )

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, item: Any) -> Any:
        """The result for one item (its exception re-raised here)."""
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _worker(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            if first[1].cancelled():  # its caller gave up (client gone) while it waited: dropped
                self.dropped += 1
                continue
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    # Take whatever is already waiting without sleeping.
                    while len(batch) < self.max_batch and not self._queue.empty():
                        batch.append(self._queue.get_nowait())
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            # Callers that gave up (client gone) are dropped before the work.
            live = [(item, fut) for item, fut in batch if not fut.cancelled()]
            self.dropped += len(batch) - len(live)
            batch = live
            if not batch:
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            items = [item for item, _ in batch]
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, items)
                outcomes: list[tuple[Any, BaseException | None]] = [(r, None) for r in results]
            except Exception:  # noqa: BLE001 - isolate the failing item by retrying one by one
                outcomes = []
                for item in items:
                    try:
                        outcomes.append(
                            ((await loop.run_in_executor(self._executor, self.run_batch, [item]))[0], None)
                        )
                    except Exception as exc:  # noqa: BLE001 - goes to that request only
                        outcomes.append((None, exc))
            for (_, future), (result, error) in zip(batch, outcomes, strict=True):
                if future.cancelled():
                    continue
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)


class PixelBudget:
    """Pixels being decoded, scored and drawn at once, server-wide: a request holds its (weighted) pixel
    count while it works and waits, first come first served, until it fits. Bounds the memory of many
    concurrent large images (each pixel costs the same memory whoever sends it)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @contextlib.asynccontextmanager
    async def hold(self, amount: int) -> AsyncIterator[None]:
        if amount > self.capacity:
            raise ValueError(f"{amount} pixels can never fit a budget of {self.capacity}")
        if self._waiters or self.used + amount > self.capacity:
            future = asyncio.get_running_loop().create_future()
            self._waiters.append((amount, future))
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._release(amount)  # granted just as its caller gave up
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove((amount, future))
                    self._wake()
                raise
        else:
            self.used += amount
        try:
            yield
        finally:
            self._release(amount)

    def _release(self, amount: int) -> None:
        self.used -= amount
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            amount, future = self._waiters[0]
            if future.cancelled():
                self._waiters.popleft()
                continue
            if self.used + amount > self.capacity:
                return
            self._waiters.popleft()
            self.used += amount
            future.set_result(None)
