"""The background loop: poll the fleet, then apply the planner's plan."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from cortex.gateway.placer import Placer
from cortex.gateway.registry import Fleet

log = logging.getLogger(__name__)


class Poller:
    """Every `interval` seconds: one poll of every neuron, then one reconcile cycle. The static
    fleet's `FleetSource` (replicas.py)."""

    def __init__(self, fleet: Fleet, placer: Placer, *, interval: float) -> None:
        self.fleet, self.placer = fleet, placer
        self.interval = interval
        self.cycle = 0
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """The first poll before serving (routing needs it), then the background loop."""
        await self.tick()
        self.start()

    def routable(self) -> bool:
        """A healthy neuron and a known model: what /health calls not degraded."""
        healthy = any(self.fleet.healthy(name) for name in self.fleet.neurons)
        return healthy and bool(self.placer.catalogue.specs())

    def current(self) -> bool:
        """Always: each poll's failures show as unhealthy neurons, not as a stale picture."""
        return True

    async def tick(self) -> None:
        await self.fleet.poll()
        self.placer.reconcile(self.cycle)
        self.cycle += 1

    async def run(self) -> None:
        """The loop after `open`'s first poll: a second one at once would only race the first
        requests' news of the neurons."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except Exception:  # a bug in one cycle must not stop polling, which routing needs
                log.exception("poll cycle %d failed", self.cycle)
                self.cycle += 1

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
