"""The probe loop: each Neuron probed once a probe interval, and its status written from the answer.

It is one task of the operator process, not a kopf timer. kopf holds every object a timer runs for
with its finalizer until the timer has stopped, so a Neuron deleted after the operator had gone (a
`helm uninstall` removes both at once) stayed Terminating, and so did deleting the CRDs. Nothing
has to happen when a Neuron goes, so Neurons carry no finalizer (kopf drops an older operator's
at the Neuron's next event).

kopf pauses a standby peer's handlers, not this task, so the task asks the peering objects itself
whether this process is the active peer, by kopf's rule: no other live peer at or above its
priority. kopf judges from the peering object's events, so a peering object deleted under a
running operator leaves it as it was: so it leaves this task.

A probe writes only onto the Neuron it was asked for: a Neuron's deletion cancels its probe in
flight (`forget`), so one made again under the same name (its pod replaced) is not given the old
one's answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from cortex.core.resources import Neuron
from cortex.operator import kube
from cortex.operator.controller import Controller, body_of
from cortex.operator.kube import PeerEntry
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
        self._leading = False  # the last answer of active(), kept while the peering is unknown

    def notice(self, namespace: str, name: str) -> None:
        """A Neuron event: a Neuron never probed is probed now rather than at the next tick."""
        if (namespace, name) not in self._asked:
            self.wake.set()

    def forget(self, namespace: str, name: str) -> None:
        """A Neuron deleted: its probe in flight is dropped, and one made again under its name
        is probed at once."""
        key = (namespace, name)
        self._asked.pop(key, None)
        task = self._running.pop(key, None)
        if task is not None:
            task.cancel()

    async def run(self) -> None:
        interval = self.controller.config.probe_interval
        loop = asyncio.get_running_loop()
        try:
            while True:
                self.wake.clear()
                try:
                    if await self.active():
                        self._probe_due(loop.time(), interval)
                except Exception:  # the API server away for a while: try again next tick
                    log.exception("probing the Neurons")
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
        """Whether this process is the peer kopf lets act: always when standalone; without
        --peering, unless kopf's `default` peering object exists and says otherwise."""
        config = self.controller.config
        if config.standalone:
            return True
        name = config.peering or "default"
        leading = True
        for namespace in config.namespaces or (None,):
            found = await kube.peers(self.controller.settings, name, namespace)
            if found is None and config.peering is None:
                continue  # no default peering: kopf acts alone
            if found is None:
                return self._leading  # kopf goes on as it was, until the object is back
            leading = leading and leads(found, self.controller.identity, config.priority or 0)
        self._leading = leading
        return leading


def leads(peers: Iterable[PeerEntry], identity: str, priority: int) -> bool:
    """kopf's rule: a peer acts unless another live peer has a priority at or above its own (at
    the same priority every one of them pauses)."""
    return not any(
        peer.alive and peer.identity != identity and peer.priority >= priority for peer in peers
    )
