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
    slots: int = 1
    future: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Admission:
    """At most `max_running` holders; up to `max_queue` waiters, each for at most `queue_timeout`.

    Fairness: a principal holds at most `max_per_principal` running slots, a freed slot goes to
    the waiting principal that holds fewest, and a principal with nothing waiting is queued even
    when the queue is full of others' requests (up to twice `max_queue` in all), so one client
    with hundreds of requests cannot starve another with one.

    A request of several choices (OpenAI's `n`) holds a slot per choice, taken together; while
    it waits for enough to come free, the slots freed meanwhile wait for it, not for later ones.
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

    @property
    def most(self) -> int:
        """The most slots one request may ever hold together."""
        return min(self.max_running, self.max_per_principal)

    @asynccontextmanager
    async def slot(self, principal: str = ANYONE, slots: int = 1) -> AsyncIterator[None]:
        """Hold `slots` running slots (at most `most`) for the body; raises Overloaded (queue
        full) or QueueTimeout."""
        if not 1 <= slots <= self.most:
            raise ValueError(f"{slots} slots asked of an admission that grants 1 to {self.most}")
        await self._acquire(principal, slots)
        try:
            yield
        finally:
            self._release(principal, slots)

    def _may_run(self, principal: str, slots: int) -> bool:
        return (
            self.running + slots <= self.max_running
            and self.holding[principal] + slots <= self.max_per_principal
        )

    def _take(self, principal: str, slots: int) -> None:
        self.running += slots
        self.holding[principal] += slots

    async def _acquire(self, principal: str, slots: int) -> None:
        # Free slots are handed to eligible waiters at once (_hand_over), so an eligible waiter
        # left waits for more slots than are free: those it has are kept for it.
        if self._may_run(principal, slots) and not self._eligible():
            self._take(principal, slots)
            return
        self._check_room(principal)
        waiter = _Waiter(principal, slots)
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
            if waiter.future.done():  # handed its slots, but the requester left: pass them on
                self._release(principal, slots)
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                self._hand_over()  # slots kept for it may serve those behind it now

    def _check_room(self, principal: str) -> None:
        waiting = sum(1 for w in self._waiters if w.principal == principal)
        full = len(self._waiters) >= self.max_queue
        if full and (waiting > 0 or len(self._waiters) >= 2 * self.max_queue):
            raise Overloaded(
                f"model busy: {self.running} running, {self.queued} queued", retry_after=1.0
            )

    def _release(self, principal: str, slots: int) -> None:
        self.running -= slots
        self.holding[principal] -= slots
        if self.holding[principal] <= 0:
            del self.holding[principal]
        self._hand_over()

    def _hand_over(self) -> None:
        """Give free slots to waiters: the principal holding fewest first, oldest first among
        equals, skipping principals at their share. The one chosen is served before any other,
        so a request of several slots waiting for enough to come free is not passed over."""
        while eligible := self._eligible():
            _, _, waiter = min(eligible, key=lambda item: item[:2])
            if self.running + waiter.slots > self.max_running:
                return
            self._waiters.remove(waiter)
            self._take(waiter.principal, waiter.slots)
            waiter.future.set_result(None)

    def _eligible(self) -> list[tuple[int, int, _Waiter]]:
        """Waiters whose principal has room for their slots: (held, age order, waiter)."""
        return [
            (self.holding[w.principal], i, w)
            for i, w in enumerate(self._waiters)
            if not w.future.done() and self.holding[w.principal] + w.slots <= self.max_per_principal
        ]
