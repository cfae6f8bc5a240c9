"""The placer's reservations (docs/architecture.md, "The placement kernel"): the actions it has
chosen and not finished, held as one value, and a way to wait until they change."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from cortex.core.placement.model import Action
from cortex.core.placement.snapshot import Reservations


class ReservationBook:
    """The placer's current `Reservations`; each change wakes whoever waits in `until`."""

    def __init__(self) -> None:
        self.current = Reservations()
        # Set, and replaced by a fresh one, at every change (`changed`).
        self._changed = asyncio.Event()

    def hold(self, actions: Sequence[Action]) -> None:
        """These actions are under way: a load holds its memory, an unload's replica is leaving."""
        self.current = self.current.reserve(actions)
        self.changed()

    def release(self, neuron: str, model: str) -> None:
        """Forget a reservation whose action finished, failed or was abandoned."""
        self.current = self.current.release(neuron, model)
        self.changed()

    def changed(self) -> None:
        """Wake every `until`: a reservation, or something it reads beside them, changed."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def until(self, done: Callable[[], bool]) -> None:
        """Wait until `done()` holds, asking again at each change."""
        while not done():
            await self._changed.wait()
