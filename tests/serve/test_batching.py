"""BatchQueue: requests that queue behind a busy model merge into its next batch."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from raysky.serve.batching import BatchQueue


class SlowModel:
    """Records each batch it is given and the thread it ran on; fails on a poisoned item."""

    def __init__(self, seconds: float = 0.1):
        self.seconds = seconds
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.seconds)
        if -1 in items:
            raise ValueError("poisoned batch")
        return [item * 10 for item in items]


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="model") as pool:
        yield pool


def test_requests_queued_behind_a_busy_model_run_as_one_batch(executor):
    model = SlowModel()

    async def scenario():
        queue = BatchQueue(model, executor, max_batch_size=8)
        first = queue.submit([0])
        await asyncio.sleep(0.03)  # the model is now busy with [0]
        # Ten requests in three separate arrivals, as three Serve batches would bring them.
        later = queue.submit([1, 2, 3]) + queue.submit([4]) + queue.submit([5, 6, 7, 8, 9, 10])
        return await asyncio.gather(*first, *later)

    results = asyncio.run(scenario())
    assert results == [i * 10 for i in range(11)]
    assert model.batches == [[0], [1, 2, 3, 4, 5, 6, 7, 8], [9, 10]]
    assert model.threads == {"model_0"}


def test_an_idle_model_starts_at_once(executor):
    model = SlowModel(seconds=0.0)

    async def scenario():
        queue = BatchQueue(model, executor)
        (future,) = queue.submit([7])
        value = await future
        return value, len(queue)

    value, left = asyncio.run(scenario())
    assert value == 70 and left == 0 and model.batches == [[7]]


def test_cancelled_requests_are_not_scored(executor):
    model = SlowModel()

    async def scenario():
        queue = BatchQueue(model, executor)
        busy = queue.submit([0])
        await asyncio.sleep(0.03)
        waiting = queue.submit([1, 2, 3])
        waiting[1].cancel()  # its client went away while the model was busy
        return await asyncio.gather(*busy, waiting[0], waiting[2])

    assert asyncio.run(scenario()) == [0, 10, 30]
    assert model.batches == [[0], [1, 3]]


def test_a_bad_item_fails_alone_and_its_batch_mates_are_retried_one_by_one(executor):
    model = SlowModel(seconds=0.0)

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
        BatchQueue(SlowModel(), executor, max_batch_size=0)
