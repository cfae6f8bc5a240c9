"""Bounded admission per model: a fixed number of running sequences and a bounded, timed queue,
shared fairly between principals (the gateway's API key names, or client addresses)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from cortex.core.errors import Overloaded, QueueTimeout

ANYONE = "anonymous"


@dataclass(eq=False)
class _Waiter:
    principal: str
    future: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Admission:
    """At most `max_running` holders; up to `max_queue` waiters, each for at most `queue_timeout`.

    Fairness: a principal holds at most `max_per_principal` running slots, a freed slot goes to
    the waiting principal that holds fewest, and a principal with nothing waiting is queued even
    when the queue is full of others' requests (up to twice `max_queue` in all), so one client
    with hundreds of requests cannot starve another with one.
    """

    def __init__(
        self,
        max_running: int,
        max_queue: int,
        queue_timeout: float,
        max_per_principal: int | None = None,
    ) -> None:
        self.max_running = max_running
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.max_per_principal = max_per_principal or max_running
        self.running = 0
        self.holding: Counter[str] = Counter()
        self._waiters: list[_Waiter] = []

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self, principal: str = ANYONE) -> AsyncIterator[None]:
        """Hold a running slot for the body; raises Overloaded (queue full) or QueueTimeout."""
        await self._acquire(principal)
        try:
            yield
        finally:
            self._release(principal)

    def _may_run(self, principal: str) -> bool:
        return self.running < self.max_running and self.holding[principal] < self.max_per_principal

    def _take(self, principal: str) -> None:
        self.running += 1
        self.holding[principal] += 1

    async def _acquire(self, principal: str) -> None:
        # Free slots are handed to eligible waiters at once, so a free slot means none waits for it.
        if self._may_run(principal):
            self._take(principal)
            return
        self._check_room(principal)
        waiter = _Waiter(principal)
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.queue_timeout)
        except TimeoutError:
            if waiter.future.done():  # the slot was handed over just as the wait ran out: keep it
                return
            raise QueueTimeout(
                f"model busy: waited {self.queue_timeout:.0f}s for a slot "
                f"({self.running} running, {self.queued} queued)",
                retry_after=max(1.0, self.queue_timeout / 4),
            ) from None
        except asyncio.CancelledError:
            if waiter.future.done():  # handed a slot, but the requester left: pass it on
                self._release(principal)
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _check_room(self, principal: str) -> None:
        waiting = sum(1 for w in self._waiters if w.principal == principal)
        full = len(self._waiters) >= self.max_queue
        if full and (waiting > 0 or len(self._waiters) >= 2 * self.max_queue):
            raise Overloaded(
                f"model busy: {self.running} running, {self.queued} queued", retry_after=1.0
            )

    def _release(self, principal: str) -> None:
        self.running -= 1
        self.holding[principal] -= 1
        if self.holding[principal] <= 0:
            del self.holding[principal]
        self._hand_over()

    def _hand_over(self) -> None:
        """Give free slots to waiters: the principal holding fewest first, oldest first among
        equals, skipping principals at their share."""
        while self.running < self.max_running:
            eligible = [
                (self.holding[w.principal], i, w)
                for i, w in enumerate(self._waiters)
                if not w.future.done() and self.holding[w.principal] < self.max_per_principal
            ]
            if not eligible:
                return
            _, _, waiter = min(eligible, key=lambda item: item[:2])
            self._waiters.remove(waiter)
            self._take(waiter.principal)
            waiter.future.set_result(None)
