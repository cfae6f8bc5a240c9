"""The fleet on Kubernetes (docs/kubernetes.md, "The gateway on Kubernetes"): where replicas are,
read from the watched ModelPlacements and Neurons. The operator places and probes; this gateway
routes to the Ready replicas a placement's status lists, and counts its own in-flight requests.

The fleet's registry (`Fleet`) keeps one handle per neuron, reached at the endpoint the replicas
(else the Neuron) name; a Neuron's status stands in for the polls of a static fleet, so health,
metrics and the fleet page read it the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any, TypeVar

from pydantic import ValidationError

from cortex.core.config import NeuronEntry
from cortex.core.fleet import DeviceStatus, LoadedModel, ModelState, NeuronStatus
from cortex.core.kube_api import KubeApi, Reflector, Resource
from cortex.core.resources import (
    GROUP,
    NEURONS,
    PLACEMENTS,
    VERSION,
    ModelPlacement,
    Neuron,
    PlacementReplica,
    parse_rfc3339,
)
from cortex.gateway.catalogue import ModelAvailability
from cortex.gateway.registry import Fleet, NeuronHandle

log = logging.getLogger(__name__)

PLACEMENT_RESOURCE = Resource(GROUP, VERSION, PLACEMENTS)
NEURON_RESOURCE = Resource(GROUP, VERSION, NEURONS)
M = TypeVar("M", ModelPlacement, Neuron)


class KubeFleet:
    """ModelPlacements and Neurons of one namespace, watched; a `Replicas` and `FleetSource`."""

    def __init__(
        self, api: KubeApi, namespace: str, fleet: Fleet, *, first_list_wait: float = 5.0
    ) -> None:
        self.api, self.namespace, self.fleet = api, namespace, fleet
        self.first_list_wait = first_list_wait
        self._watches = [
            Reflector(api, PLACEMENT_RESOURCE, namespace, self._changed),
            Reflector(api, NEURON_RESOURCE, namespace, self._changed),
        ]
        self._tasks: list[asyncio.Task[None]] = []
        self.placements: dict[str, ModelPlacement] = {}
        self.neurons: dict[str, Neuron] = {}
        self._probes: dict[str, str | None] = {}
        self._change = asyncio.Event()

    # -- FleetSource

    async def open(self) -> None:
        """Start both watches and wait for their first lists, though not for long: an API server
        that does not answer must not keep /livez down (/readyz says when the watches are up)."""
        self._tasks = [asyncio.create_task(watch.run()) for watch in self._watches]
        tried = asyncio.gather(*(watch.tried.wait() for watch in self._watches))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tried, self.first_list_wait)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.api.aclose()

    def routable(self) -> bool:
        """Both CRDs have been listed: a min-0 fleet is routable before any replica exists, since
        a request is what asks the operator for one. An API server outage after that does not
        stop routing: the fleet last seen stays, and the replicas serve without the API server."""
        return all(watch.listed.is_set() for watch in self._watches)

    def current(self) -> bool:
        """Both watches are connected: the fleet routed on is up to date."""
        return all(watch.connected for watch in self._watches)

    # -- Replicas

    def placements_of(self, model: str) -> list[ModelPlacement]:
        return [p for _, p in sorted(self.placements.items()) if p.spec.model == model]

    def ready(self, model: str) -> list[str]:
        """Neurons whose replica of `model` a placement's status lists as ready, healthy here."""
        names: list[str] = []
        for replica in self._replicas(model, "ready"):
            usable = replica.neuron in self.fleet.neurons and self.fleet.healthy(replica.neuron)
            if usable and replica.neuron not in names:
                names.append(replica.neuron)
        return names

    def availability(self, model: str) -> tuple[ModelAvailability, list[str]]:
        ready = self.ready(model)
        if ready:
            return "loaded", ready
        loading = sorted({replica.neuron for replica in self._replicas(model, "loading")})
        if loading:
            return "loading", loading
        return "available", []

    def _replicas(self, model: str, state: str) -> Iterable[PlacementReplica]:
        for placement in self.placements_of(model):
            for replica in placement.status.replicas if placement.status else []:
                if replica.state == state:
                    yield replica

    # -- changes

    def next_change(self) -> asyncio.Event:
        """Set at the next change of the watched objects (take it before looking, then wait)."""
        return self._change

    def _changed(self) -> None:
        # A placement being deleted is no longer served: the operator's finalizer is unloading
        # its replicas, and new requests would keep them busy and the deletion waiting.
        self.placements = {
            name: placement
            for name, placement in _parsed(self._watches[0].objects, ModelPlacement).items()
            if not placement.metadata.deletion_timestamp
        }
        self.neurons = _parsed(self._watches[1].objects, Neuron)
        self._sync_handles()
        self._change.set()
        self._change = asyncio.Event()

    def _endpoints(self) -> dict[str, str]:
        """Where each neuron is reached: a replica's endpoint, else its Neuron's."""
        found: dict[str, str] = {}
        for name, neuron in self.neurons.items():
            endpoint = (neuron.status.endpoint if neuron.status else None) or neuron.spec.endpoint
            if endpoint:
                found[name] = endpoint
        for placement in self.placements.values():
            for replica in placement.status.replicas if placement.status else []:
                if replica.endpoint:
                    found[replica.neuron] = replica.endpoint
        return found

    def _sync_handles(self) -> None:
        endpoints = self._endpoints()
        for name, endpoint in endpoints.items():
            neuron = self.neurons.get(name)
            try:
                entry = NeuronEntry(
                    name=name, endpoint=endpoint, labels=neuron.labels if neuron else {}
                )
            except ValidationError:
                log.warning("neuron %s: endpoint %r is not an http(s) URL", name, endpoint)
                continue
            # A neuron back before its old handle drained gets a new one, as a new address does.
            handle = self.fleet.members().get(name)
            if handle is None or handle.entry.endpoint != endpoint:
                handle = self.fleet.replace(entry)
            handle.entry = entry
            handle.status = _status_of(name, neuron)
            handle.cordoned = bool(neuron and neuron.spec.cordoned)
            self._note_probe(handle, neuron)
        for name in list(self.fleet.neurons):
            if name not in endpoints:
                self.fleet.retire(name)

    def _note_probe(self, handle: NeuronHandle, neuron: Neuron | None) -> None:
        """A newer successful probe by the operator clears this gateway's failure count, as a
        successful poll does in a static fleet."""
        probe = neuron.status.last_probe if neuron and neuron.status else None
        if probe != self._probes.get(handle.name) and handle.status and handle.status.healthy:
            handle.failures, handle.last_error = 0, None
            handle.last_seen = parse_rfc3339(probe) if probe else handle.last_seen
        self._probes[handle.name] = probe


def _parsed(objects: dict[str, dict[str, Any]], model: type[M]) -> dict[str, M]:
    """The objects that parse; one that does not is skipped with a warning, not fatal."""
    parsed: dict[str, M] = {}
    for name, raw in objects.items():
        try:
            parsed[name] = model.model_validate(raw)
        except ValidationError as exc:
            log.warning("%s %s skipped: %s", model.__name__, name, exc.errors()[0].get("msg"))
    return parsed


def _status_of(name: str, neuron: Neuron | None) -> NeuronStatus:
    """A Neuron's status in the shape a neuron's own /status has (health, devices, models)."""
    status = neuron.status if neuron else None
    if status is None:
        return NeuronStatus(node=name, version="")  # not probed yet: the placements decide
    devices = [
        DeviceStatus(
            id=d.id,
            index=i,
            kind="cuda" if d.id.startswith("cuda") else "cpu",
            name=d.name,
            memory_total=d.memory_total,
            memory_free=d.memory_free,
            memory_used=max(d.memory_total - d.memory_free, 0),
            healthy=d.healthy,
        )
        for i, d in enumerate(status.devices)
    ]
    models = [
        LoadedModel(
            id=m.model,
            source="",
            state=ModelState(m.state),
            devices=m.devices,
            memory_bytes=m.memory,
            in_flight=m.in_flight,
            last_used=parse_rfc3339(m.last_used) if m.last_used else None,
            error=m.error,
        )
        for m in status.models
    ]
    return NeuronStatus(
        node=name,
        version="",
        # Pending: it answers unhealthy (draining, no healthy device), or has not answered yet.
        healthy=status.phase in ("Ready", "Cordoned"),
        devices=devices,
        models=models,
    )
