"""Bounded admission per model: a fixed number of running sequences and a bounded, timed queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from cortex.core.errors import NeuronUnavailable, Overloaded


class Admission:
    """At most `max_running` holders; up to `max_queue` waiters, each for at most `queue_timeout`."""

    def __init__(self, max_running: int, max_queue: int, queue_timeout: float) -> None:
        self.max_running = max_running
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.running = 0
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a running slot for the body; raises Overloaded (queue full) or NeuronUnavailable."""
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self.running < self.max_running and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise Overloaded(
                f"model busy: {self.running} running, {self.queued} queued", retry_after=1.0
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout)
        except TimeoutError:
            if waiter.done():  # the slot was handed over just as the wait ran out: keep it
                return
            raise NeuronUnavailable(
                f"waited {self.queue_timeout:.0f}s for a slot", retry_after=self.queue_timeout / 2
            ) from None
        except asyncio.CancelledError:
            if waiter.done():  # handed a slot, but the requester left: pass it on
                self._release()
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _release(self) -> None:
        # Hand the slot straight to the oldest waiter, so running never drops below the backlog.
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1
