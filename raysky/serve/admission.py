"""Bounding the memory an ingress replica spends on decoded uploads at once.

Decoding an upload takes about 10 bytes per pixel for 8-bit colour and twice that with alpha
or a palette (:data:`raysky.data.images.DECODE_BYTES_PER_PIXEL`, read from the header before
decoding), and the RGB array, mask and heatmap stay for as long as the request is queued or
scored. With 64-megapixel uploads allowed, a few dozen requests in flight would need tens of
GB, so each ingress replica admits uploads against a memory budget: an upload waits, in
arrival order, until the budget has room for its decode, and gets a 503 if it cannot be
admitted in time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class BudgetTimeout(Exception):
    """No room in the budget within the wait; the caller answers 503."""


class MemoryBudget:
    """A first-come, first-served budget of bytes in flight, for one event loop.

    An image costing more than the whole budget is admitted once nothing else is in flight, so
    a budget smaller than the largest allowed image slows such images down but never refuses
    them for size alone.
    """

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"the memory budget must be positive, got {limit}")
        self.limit = limit
        self.in_use = 0
        self._waiting: deque[tuple[int, asyncio.Future]] = deque()

    def _cost(self, nbytes: int) -> int:
        return max(1, min(int(nbytes), self.limit))

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int, timeout_s: float) -> AsyncIterator[None]:
        """Hold ``nbytes`` of the budget for the body of the ``async with``.

        Raises :class:`BudgetTimeout` when the bytes are not granted within ``timeout_s``.
        """
        cost = self._cost(nbytes)
        await self._acquire(cost, timeout_s)
        try:
            yield
        finally:
            self._release(cost)

    async def _acquire(self, cost: int, timeout_s: float) -> None:
        if not self._waiting and self.in_use + cost <= self.limit:
            self.in_use += cost
            return
        granted = asyncio.get_running_loop().create_future()
        entry = (cost, granted)
        self._waiting.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(granted), timeout_s)
        except BaseException as exc:
            if granted.done() and not granted.cancelled():
                self._release(cost)  # granted just as we gave up: hand it on
            else:
                granted.cancel()
                with contextlib.suppress(ValueError):
                    self._waiting.remove(entry)
                self._grant()  # a big request at the head may have been blocking smaller ones
            if isinstance(exc, asyncio.TimeoutError):
                raise BudgetTimeout(f"no room for {cost} bytes within {timeout_s:g} s") from None
            raise

    def _release(self, cost: int) -> None:
        self.in_use -= cost
        self._grant()

    def _grant(self) -> None:
        while self._waiting:
            cost, granted = self._waiting[0]
            if granted.done():
                self._waiting.popleft()
                continue
            if self.in_use + cost > self.limit:
                return
            self._waiting.popleft()
            self.in_use += cost
            granted.set_result(None)
