"""Feeding a model one batch at a time, so that requests queued behind it merge.

``@serve.batch`` closes a batch when its wait expires, whether or not the model is free, so
under load a busy replica would be handed a string of small batches, each run on its own.
:class:`BatchQueue` sits between Serve's batches and the model: it keeps one queue, and each
time the model is free it takes up to ``max_batch_size`` of whatever is waiting.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any


class BatchQueue:
    """An asyncio queue in front of a blocking batch function run on ``executor``.

    ``run_batch`` takes a list of items and returns one result per item, in order. It runs
    on ``executor``, one batch at a time, so the event loop stays free to take requests.
    If it raises for a batch of several items, each item is run again on its own, so only the
    items that fail by themselves get an exception; the queue carries on either way.
    """

    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], executor: Executor,
                 max_batch_size: int = 8):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch_size = max_batch_size
        self._queue: deque[tuple[Any, asyncio.Future]] = deque()
        self._worker: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, items: Sequence[Any]) -> list[asyncio.Future]:
        """Queue ``items`` and return one future per item for its result.

        Call it on the event loop that awaits the futures. Cancelling a future before its
        batch starts takes the item out of the model's work.
        """
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._queue.extend(zip(items, futures, strict=True))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return futures

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch = []
            while self._queue and len(batch) < self.max_batch_size:
                item, future = self._queue.popleft()
                if not future.done():  # cancelled: its client went away
                    batch.append((item, future))
            if not batch:
                continue
            try:
                await self._run(loop, batch)
            except Exception:
                # One bad item must not fail the requests it happened to be batched with.
                for entry in batch:
                    if not entry[1].done():
                        await self._run(loop, [entry])

    async def _run(self, loop: asyncio.AbstractEventLoop,
                   batch: list[tuple[Any, asyncio.Future]]) -> None:
        """Run one batch and resolve its futures. If ``run_batch`` raises for several items,
        the exception propagates for the caller to split the batch; otherwise every future
        gets its result or the error."""
        futures = [future for _, future in batch]
        try:
            results = await loop.run_in_executor(self.executor, self.run_batch,
                                                 [item for item, _ in batch])
        except Exception as exc:
            if len(batch) > 1:
                raise
            _fail(futures, exc)
            return
        if len(results) != len(batch):
            # A bug in run_batch, not a bad item: running items alone would only hide it.
            _fail(futures, RuntimeError(f"run_batch returned {len(results)} results for "
                                        f"{len(batch)} items"))
            return
        for future, result in zip(futures, results, strict=True):
            if not future.done():
                future.set_result(result)


def _fail(futures: list[asyncio.Future], exc: Exception) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(exc)
