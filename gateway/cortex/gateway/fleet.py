"""The gateway's view of its neurons: polled status and listings, health, live request counts."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import httpx

from cortex.core.client import DEFAULT_TIMEOUT, NeuronClient
from cortex.core.config import NeuronEntry
from cortex.core.errors import CortexError
from cortex.core.fleet import LoadedModel, ModelListing, ModelState, NeuronStatus
from cortex.core.planner import NeuronView, ReplicaView

log = logging.getLogger(__name__)


@dataclass
class NeuronHandle:
    """One neuron: its client, what its last polls said, and what this gateway sends it now."""

    entry: NeuronEntry
    client: NeuronClient
    status: NeuronStatus | None = None
    listing: ModelListing | None = None
    failures: int = 0
    last_seen: float | None = None
    last_error: str | None = None
    cordoned: bool = False
    # Counted here, not polled: routing needs the load of this very moment.
    in_flight: Counter[str] = field(default_factory=Counter)
    last_used: dict[str, float] = field(default_factory=dict)
    # Loads this gateway started and the neuron may not report yet: model -> bytes reserved.
    pending: dict[str, int] = field(default_factory=dict)
    # Replicas a plan is unloading: no longer routed to, and not chosen again by the next plan.
    leaving: set[str] = field(default_factory=set)
    # Bumped by every local change (a load's or unload's answer): a poll that was already on
    # its way when one happened carries older news and must not overwrite it.
    generation: int = 0

    @property
    def name(self) -> str:
        return self.entry.name

    def model(self, model: str) -> LoadedModel | None:
        if self.status is None:
            return None
        return next((m for m in self.status.models if m.id == model), None)


class Fleet:
    """Registry of neurons, refreshed by polling; health after consecutive failures."""

    def __init__(
        self,
        entries: Iterable[NeuronEntry],
        *,
        unhealthy_after: int = 3,
        admin_token: str | None = None,
        request_timeout: float | None = None,
    ) -> None:
        self.unhealthy_after = unhealthy_after
        self._admin_token = admin_token
        self._timeout = DEFAULT_TIMEOUT
        if request_timeout is not None:
            # Bounds each read: a neuron silent for this long mid-answer is given up on.
            self._timeout = httpx.Timeout(
                connect=DEFAULT_TIMEOUT.connect,
                read=request_timeout,
                write=DEFAULT_TIMEOUT.write,
                pool=DEFAULT_TIMEOUT.pool,
            )
        self.neurons: dict[str, NeuronHandle] = {}
        for entry in entries:
            self.add(entry)

    def add(self, entry: NeuronEntry, client: NeuronClient | None = None) -> NeuronHandle:
        """Register a neuron (a later entry of the same name replaces the earlier one)."""
        token = entry.admin_token or self._admin_token
        client = client or NeuronClient(entry.endpoint, admin_token=token, timeout=self._timeout)
        handle = NeuronHandle(entry, client)
        self.neurons[entry.name] = handle
        return handle

    def __getitem__(self, name: str) -> NeuronHandle:
        return self.neurons[name]

    async def aclose(self) -> None:
        await asyncio.gather(*(h.client.aclose() for h in self.neurons.values()))

    # -- polling

    async def poll(self) -> None:
        """Refresh every neuron at once; one slow neuron does not delay the others' news."""
        await asyncio.gather(*(self.refresh(name) for name in list(self.neurons)))

    async def refresh(self, name: str) -> None:
        handle = self.neurons[name]
        generation = handle.generation
        try:
            status, listing = await asyncio.gather(handle.client.status(), handle.client.models())
        except (CortexError, ValueError) as exc:
            self.note_failure(name, str(exc))
            return
        handle.failures, handle.last_error, handle.last_seen = 0, None, time.time()
        if handle.generation != generation:
            return  # overtaken by a local change; the next poll brings the newer picture
        handle.status, handle.listing = status, listing
        for model in list(handle.pending):
            if handle.model(model) is not None:
                del handle.pending[model]

    def note_failure(self, name: str, error: str) -> None:
        """A failed poll or request; after `unhealthy_after` in a row the neuron is skipped."""
        handle = self.neurons[name]
        handle.failures += 1
        handle.last_error = error
        if handle.failures == self.unhealthy_after:
            log.warning("neuron %s unhealthy after %d failures: %s", name, handle.failures, error)

    def healthy(self, name: str) -> bool:
        handle = self.neurons[name]
        return (
            handle.status is not None
            and handle.status.healthy
            and handle.failures < self.unhealthy_after
        )

    # -- replicas

    def ready(self, model: str) -> list[str]:
        """Healthy neurons where the model is ready to serve (a cordon stops loads, not requests)."""
        names = []
        for name, handle in self.neurons.items():
            loaded = handle.model(model)
            serving = loaded is not None and loaded.state == ModelState.READY
            if serving and model not in handle.leaving and self.healthy(name):
                names.append(name)
        return names

    def loading(self, model: str) -> list[str]:
        """Healthy neurons where the model is arriving (polled, or a load this gateway began)."""
        names = []
        for name, handle in self.neurons.items():
            loaded = handle.model(model)
            arriving = model in handle.pending or (
                loaded is not None and loaded.state == ModelState.LOADING
            )
            if arriving and self.healthy(name):
                names.append(name)
        return names

    def begin(self, name: str, model: str) -> None:
        handle = self.neurons[name]
        handle.in_flight[model] += 1
        handle.last_used[model] = time.time()

    def end(self, name: str, model: str) -> None:
        handle = self.neurons[name]
        handle.in_flight[model] -= 1
        handle.last_used[model] = time.time()
        if handle.in_flight[model] <= 0:
            del handle.in_flight[model]

    def apply_loaded(self, name: str, loaded: LoadedModel) -> None:
        """Record a load's answer now rather than at the next poll."""
        handle = self.neurons[name]
        handle.pending.pop(loaded.id, None)
        handle.generation += 1
        if handle.status is not None:
            others = [m for m in handle.status.models if m.id != loaded.id]
            handle.status.models = [*others, loaded]

    def apply_unloaded(self, name: str, model: str) -> None:
        handle = self.neurons[name]
        handle.pending.pop(model, None)
        handle.leaving.discard(model)
        handle.generation += 1
        if handle.status is not None:
            handle.status.models = [m for m in handle.status.models if m.id != model]

    def release(self, name: str, model: str) -> None:
        """Forget a reservation whose action failed or was abandoned."""
        handle = self.neurons[name]
        handle.pending.pop(model, None)
        handle.leaving.discard(model)

    def estimates(self) -> dict[str, int]:
        """Bytes a model was seen to use anywhere: the planner's size for models without a budget."""
        seen: dict[str, int] = {}
        for handle in self.neurons.values():
            for loaded in handle.status.models if handle.status else []:
                if loaded.memory_bytes > 0:
                    seen[loaded.id] = max(seen.get(loaded.id, 0), loaded.memory_bytes)
        return seen

    # -- the planner's snapshot

    def views(self, names: Iterable[str] | None = None) -> list[NeuronView]:
        """Planner snapshot of the named neurons (all by default) that have answered a poll."""
        chosen = self.neurons if names is None else {n: self.neurons[n] for n in names}
        return [self._view(h) for h in chosen.values() if h.status is not None]

    def _view(self, handle: NeuronHandle) -> NeuronView:
        assert handle.status is not None
        replicas = [self._replica(handle, m) for m in handle.status.models]
        replicas += [
            ReplicaView(model, ModelState.LOADING, memory)
            for model, memory in handle.pending.items()
            if handle.model(model) is None
        ]
        reserved = sum(
            memory for model, memory in handle.pending.items() if handle.model(model) is None
        )
        devices = handle.status.devices
        return NeuronView(
            name=handle.name,
            memory_total=sum(d.memory_total for d in devices),
            memory_free=sum(d.memory_free for d in devices if d.healthy) - reserved,
            replicas=tuple(replicas),
            healthy=self.healthy(handle.name),
            cordoned=handle.cordoned,
            labels=dict(handle.entry.labels),
        )

    @staticmethod
    def _replica(handle: NeuronHandle, loaded: LoadedModel) -> ReplicaView:
        local_used = handle.last_used.get(loaded.id)
        used = [t for t in (loaded.last_used, local_used) if t is not None]
        leaving = loaded.id in handle.leaving and loaded.state == ModelState.READY
        return ReplicaView(
            model=loaded.id,
            state=ModelState.UNLOADING if leaving else loaded.state,
            memory=loaded.memory_bytes,
            # The poll may predate requests this gateway just sent: take the larger count.
            in_flight=max(loaded.in_flight + loaded.queued, handle.in_flight[loaded.id]),
            last_used=max(used) if used else None,
            loaded_at=loaded.loaded_at,
        )
