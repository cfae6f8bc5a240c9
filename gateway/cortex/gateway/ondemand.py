"""On-demand loading: one placement per cold model, however many requests wait for it."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass

from cortex.core.errors import NeuronUnavailable
from cortex.gateway.placer import Placer

log = logging.getLogger(__name__)


@dataclass
class _Flight:
    """One placement in progress and the requests waiting on it."""

    task: asyncio.Task[str]
    waiters: int = 0
    # A waiter was told to come back later (503 + Retry-After): the load must go on for it.
    promised: bool = False
    # Cancelled because its last waiter left; a request arriving now starts a fresh one.
    abandoned: bool = False


class OnDemand:
    """Single-flight loads per model with a bounded wait; a load nobody waits for is cancelled."""

    def __init__(self, placer: Placer, *, timeout: float, retry_after: float = 5.0) -> None:
        self.placer = placer
        self.timeout = timeout
        self.retry_after = retry_after
        self._flights: dict[str, _Flight] = {}
        # Clients in `ensure` per model. Counted until each has its replica, not only while its
        # placement runs: between a load's end and their requests' start, a placement waiting
        # for room must not take the replica they came for as idle.
        self._waiting: Counter[str] = Counter()

    def waiting_all(self) -> dict[str, int]:
        """Clients waiting per cold model: the placer's demand, most waited-for placed first."""
        return {model: count for model, count in self._waiting.items() if count > 0}

    async def ensure(self, model: str, timeout: float | None = None) -> str:
        """Wait until `model` has a ready replica and return its neuron; at most `timeout` seconds
        (the configured load timeout by default), then NeuronUnavailable with Retry-After."""
        flight = self._flights.get(model)
        if flight is None or flight.abandoned:
            placing = self.placer.place(model, self.waiting_all, patience=self.timeout)
            flight = _Flight(asyncio.create_task(placing))
            self._flights[model] = flight
            flight.task.add_done_callback(lambda task: self._landed(model, task))
        flight.waiters += 1
        self._waiting[model] += 1
        try:
            wait = self.timeout if timeout is None else timeout
            return await asyncio.wait_for(asyncio.shield(flight.task), max(wait, 0.0))
        except TimeoutError:
            room = self.placer.awaiting_room.get(model)
            if room is not None:  # nothing is loading yet: nothing to come back for
                self._leave(model, flight)
                raise NeuronUnavailable(room, retry_after=self.retry_after) from None
            flight.promised = True
            raise NeuronUnavailable(
                f"model {model!r} is still loading; retry shortly", retry_after=self.retry_after
            ) from None
        except asyncio.CancelledError:
            self._leave(model, flight)
            raise
        finally:
            flight.waiters -= 1
            self._waiting[model] -= 1
            if self._waiting[model] <= 0:
                del self._waiting[model]

    @staticmethod
    def _leave(model: str, flight: _Flight) -> None:
        """The last waiter leaving a placement nobody was promised cancels it."""
        if flight.waiters == 1 and not flight.promised and not flight.task.done():
            log.info("every request waiting for %s left: cancelling its load", model)
            flight.abandoned = True
            flight.task.cancel()

    def _landed(self, model: str, task: asyncio.Task[str]) -> None:
        if self._flights.get(model, None) is not None and self._flights[model].task is task:
            del self._flights[model]
        if not task.cancelled():
            task.exception()  # retrieved: each waiter re-raises it, and none may be left
