"""BatchQueue: requests that queue behind a busy model merge into its next batch."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from raysky.serve.batching import BatchQueue


class RecordingModel:
    """Records each batch it is given and the thread it ran on; fails on a poisoned item.

    A ``held`` model tells the test's event loop when a batch starts (the event
    :meth:`watch_start` returns) and then runs it only once the test sets ``release``. So "the
    model is busy with [0]" is a fact the test awaits, not a guess at how long a sleep lasts on
    a loaded machine.
    """

    def __init__(self, held: bool = False):
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.release = threading.Event()
        if not held:
            self.release.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started: asyncio.Event | None = None

    def watch_start(self) -> asyncio.Event:
        """An event on the running loop, set as soon as the model starts a batch."""
        self._loop, self._started = asyncio.get_running_loop(), asyncio.Event()
        return self._started

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        if self._started is not None:
            # The model runs on the executor's thread; asyncio.Event is not thread-safe.
            self._loop.call_soon_threadsafe(self._started.set)
        # Bounded, so a test that fails before releasing the model cannot hang the executor.
        if not self.release.wait(timeout=300):
            raise TimeoutError("the test never released the held model")
        if -1 in items:
            raise ValueError("poisoned batch")
        return [item * 10 for item in items]


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="model") as pool:
        yield pool


def test_requests_queued_behind_a_busy_model_run_as_one_batch(executor):
    model = RecordingModel(held=True)

    async def scenario():
        queue = BatchQueue(model, executor, max_batch_size=8)
        started = model.watch_start()
        first = queue.submit([0])
        try:
            await started.wait()  # the model is now busy with [0], and stays so until released
            # Ten requests in three separate arrivals, as three Serve batches would bring them.
            later = queue.submit([1, 2, 3]) + queue.submit([4]) + queue.submit([5, 6, 7, 8, 9, 10])
        finally:
            model.release.set()
        return await asyncio.gather(*first, *later)

    results = asyncio.run(scenario())
    assert results == [i * 10 for i in range(11)]
    assert model.batches == [[0], [1, 2, 3, 4, 5, 6, 7, 8], [9, 10]]
    assert model.threads == {"model_0"}


def test_an_idle_model_starts_at_once(executor):
    model = RecordingModel()

    async def scenario():
        queue = BatchQueue(model, executor)
        (future,) = queue.submit([7])
        value = await future
        return value, len(queue)

    value, left = asyncio.run(scenario())
    assert value == 70 and left == 0 and model.batches == [[7]]


def test_cancelled_requests_are_not_scored(executor):
    model = RecordingModel(held=True)

    async def scenario():
        queue = BatchQueue(model, executor)
        started = model.watch_start()
        busy = queue.submit([0])
        try:
            await started.wait()  # the model is busy with [0]
            waiting = queue.submit([1, 2, 3])
            waiting[1].cancel()  # its client went away while the model was busy
        finally:
            model.release.set()
        return await asyncio.gather(*busy, waiting[0], waiting[2])

    assert asyncio.run(scenario()) == [0, 10, 30]
    assert model.batches == [[0], [1, 3]]


def test_a_bad_item_fails_alone_and_its_batch_mates_are_retried_one_by_one(executor):
    model = RecordingModel()

    async def scenario():
        queue = BatchQueue(model, executor, max_batch_size=3)
        futures = queue.submit([1, -1, 2, 3, 4])
        return await asyncio.gather(*futures, return_exceptions=True)

    first, poisoned, second, third, fourth = asyncio.run(scenario())
    assert isinstance(poisoned, ValueError)
    assert (first, second, third, fourth) == (10, 20, 30, 40)
    # The poisoned batch, then each of its items alone; the next batch is untouched.
    assert model.batches == [[1, -1, 2], [1], [-1], [2], [3, 4]]


def test_a_batch_function_returning_the_wrong_count_is_an_error(executor):
    async def scenario():
        queue = BatchQueue(lambda items: items[:1], executor)
        return await asyncio.gather(*queue.submit([1, 2]), return_exceptions=True)

    errors = asyncio.run(scenario())
    assert all(isinstance(e, RuntimeError) and "2 items" in str(e) for e in errors)


def test_max_batch_size_must_be_positive(executor):
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchQueue(RecordingModel(), executor, max_batch_size=0)
