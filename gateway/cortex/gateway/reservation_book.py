"""The placer's reservations (docs/architecture.md, "The placement kernel"): the actions it has
chosen and not finished, held as one value, and a way to wait until they change."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cortex.core.placement.model import Action
from cortex.core.placement.snapshot import Reservations
from cortex.gateway.pulse import Pulse


class ReservationBook:
    """The placer's current `Reservations`; each change wakes whoever waits in `until`, and
    whoever else waits on `pulse` (the fleet registry's, which beats at its changes too)."""

    def __init__(self, pulse: Pulse | None = None) -> None:
        self.current = Reservations()
        self.pulse = pulse or Pulse()

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
        self.pulse.beat()

    async def until(self, done: Callable[[], bool]) -> None:
        """Wait until `done()` holds, asking again at each change."""
        while not done():
            await self.pulse.next().wait()
