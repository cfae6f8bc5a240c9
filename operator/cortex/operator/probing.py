"""The probe loop: each Neuron probed once a probe interval, and its status written from the answer.

It is one task of the operator process, not a kopf timer. kopf holds every object a timer runs for
with its finalizer until the timer has stopped, so a Neuron deleted after the operator had gone (a
`helm uninstall` removes both at once) stayed Terminating, and so did deleting the CRDs. Nothing
has to happen when a Neuron goes, so Neurons carry no finalizer (kopf drops an older operator's
at the Neuron's next event).

kopf pauses a standby peer's handlers, not this task, so the task asks the peering objects itself
whether this process is the active peer, by kopf's rule: no other live peer at or above its
priority."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Mapping
from typing import Any

from cortex.core.resources import Neuron
from cortex.operator import kube
from cortex.operator.controller import Controller, body_of
from cortex.operator.neurons import neuron_status

log = logging.getLogger(__name__)
Index = Mapping[str, Any]  # kopf index: namespace -> store of parsed Neurons
Key = tuple[str, str]  # (namespace, name)


class Prober:
    """Probes the Neurons a kopf index holds, each at most once a probe interval."""

    def __init__(self, controller: Controller, neurons: Index) -> None:
        self.controller = controller
        self.neurons = neurons
        self.wake = asyncio.Event()  # set when a new Neuron appears: it is probed at once
        self._asked: dict[Key, float] = {}  # when each probe in flight or last done began
        self._running: dict[Key, asyncio.Task[None]] = {}

    def notice(self, namespace: str, name: str) -> None:
        """A Neuron event: a Neuron never probed is probed now rather than at the next tick."""
        if (namespace, name) not in self._asked:
            self.wake.set()

    async def run(self) -> None:
        interval = self.controller.config.probe_interval
        loop = asyncio.get_running_loop()
        try:
            while True:
                self.wake.clear()
                if await self.active():
                    self._probe_due(loop.time(), interval)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), interval)
        finally:
            for task in self._running.values():
                task.cancel()
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    def _probe_due(self, now: float, interval: float) -> None:
        """Start a probe of each Neuron not probed for an interval and not being probed now."""
        self._running = {key: task for key, task in self._running.items() if not task.done()}
        indexed: set[Key] = set()
        for namespace, store in list(self.neurons.items()):
            for neuron in list(store):
                key = (namespace, neuron.metadata.name)
                indexed.add(key)
                if key in self._running or now - self._asked.get(key, -interval) < interval:
                    continue
                self._asked[key] = now
                self._running[key] = asyncio.create_task(self._probe(namespace, neuron))
        self._asked = {key: at for key, at in self._asked.items() if key in indexed}

    async def _probe(self, namespace: str, neuron: Neuron) -> None:
        """Probe one neuron and write what it said into its Neuron's status."""
        controller = self.controller
        try:
            probe = await controller.probe(namespace, neuron)
            config = controller.config
            status = neuron_status(neuron, probe, config.unreachable_after, controller.clock())
            before = neuron.status.phase if neuron.status else "Pending"
            name = neuron.metadata.name
            wire = status.wire()
            if not await kube.patch_neuron_status(controller.settings, namespace, name, wire):
                return  # deleted meanwhile
            if status.phase != before and status.phase == "Unreachable":
                message = probe.error if probe and probe.error else ""
                await self._event(neuron, "Warning", "Unreachable", message)
            elif status.phase != before and before == "Unreachable":
                await self._event(neuron, "Normal", "Reachable", "answering again")
        except Exception:  # one neuron's failure must not end the loop
            log.exception("probing neuron %s/%s", namespace, neuron.metadata.name)

    async def _event(self, neuron: Neuron, type: str, reason: str, message: str) -> None:
        await kube.post_event(self.controller.settings, body_of(neuron), type, reason, message)

    async def active(self) -> bool:
        """Whether this process is the peer kopf lets act (always, without peering)."""
        config = self.controller.config
        if config.peering is None:
            return True
        scopes: tuple[str | None, ...] = config.namespaces or (None,)
        for namespace in scopes:
            peers = await kube.peering_status(self.controller.settings, config.peering, namespace)
            if peers is None or not leads(peers, self.controller.identity, config.priority or 0):
                return False
        return True


def leads(peers: Mapping[str, Any], identity: str, priority: int) -> bool:
    """kopf's rule for a peering object's status: a peer acts unless another live peer has a
    priority at or above its own (at the same priority every one of them pauses)."""
    now = datetime.datetime.now(datetime.UTC)
    for other, info in peers.items():
        if other == identity or not isinstance(info, Mapping):
            continue
        try:
            seen = datetime.datetime.fromisoformat(str(info.get("lastseen")))
            alive = seen + datetime.timedelta(seconds=int(info.get("lifetime", 60))) > now
            if alive and int(info.get("priority", 0)) >= priority:
                return False
        except (TypeError, ValueError):
            continue  # not a peer kopf could parse either
    return True
