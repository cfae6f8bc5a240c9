"""A wake-up for whoever waits for the fleet to change: an event set, and replaced by a fresh
one, at every beat. The registry beats it when a replica goes idle or a poll brings news, the
placer's reservation book when a load or unload begins or ends (docs/architecture.md, "The
placement kernel")."""

from __future__ import annotations

import asyncio


class Pulse:
    """Each `beat` wakes every waiter of the event `next` returned before it."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def beat(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def next(self) -> asyncio.Event:
        """The event the next beat sets: taken before looking, waited on after, no beat is lost."""
        return self._event
