"""The live catalogue: the gateway's models.toml merged with what every neuron serves or can load."""

from __future__ import annotations

from typing import Literal, Protocol

from pydantic import Field

from cortex.core.catalogue import ModelSpec, merge_catalogues, resolve_alias, unknown_model
from cortex.core.errors import ModelNotFound
from cortex.core.fleet import ModelState
from cortex.core.protocol.openai import ModelCard
from cortex.gateway.registry import Fleet

ModelAvailability = Literal["loaded", "loading", "available"]


class FleetModelCard(ModelCard):
    """A /v1/models entry: OpenAI's card plus where the model is and what it is."""

    kind: Literal["chat", "embedding"] = "chat"
    state: ModelAvailability = "available"
    locations: list[str] = Field(default_factory=list, description="neurons holding it")
    aliases: list[str] = Field(default_factory=list)
    context_length: int | None = None
    pinned_on: list[str] = Field(default_factory=list)
    priority: int = 0
    last_error: str | None = Field(
        default=None, description="why its last load failed (`neuron: reason`), while it stays so"
    )


def model_card(
    spec: ModelSpec,
    availability: tuple[ModelAvailability, list[str]],
    context: int | None,
    last_error: str | None = None,
) -> FleetModelCard:
    """A model's /v1/models entry from its spec, where it is, its context limit, and why its
    last load failed (while it stays unloaded)."""
    state, locations = availability
    return FleetModelCard(
        id=spec.id,
        kind=spec.kind,
        state=state,
        locations=locations,
        aliases=list(spec.aliases),
        context_length=context,
        pinned_on=list(spec.pinned_on),
        priority=spec.priority,
        last_error=last_error,
    )


class Catalogue(Protocol):
    """What models there are: this gateway's config and neurons (LiveCatalogue), or the
    ModelPlacements on Kubernetes (PlacementCatalogue)."""

    def specs(self) -> list[ModelSpec]: ...

    def use(self, known: list[ModelSpec]) -> None:
        """The models the config knows, replaced (a reload)."""
        ...

    def resolve(self, name: str) -> ModelSpec:
        """The spec a client's model name (id or alias) means; ModelNotFound otherwise."""
        ...

    def card(
        self, spec: ModelSpec, availability: tuple[ModelAvailability, list[str]]
    ) -> FleetModelCard: ...


class LiveCatalogue:
    """Resolves client model names and lists models, from config plus the fleet's last polls."""

    def __init__(self, configured: list[ModelSpec], fleet: Fleet) -> None:
        self.fleet = fleet
        self.use(configured)
        # Pins set through the admin API: a model's whole pinned_on, over its catalogue entry's.
        self.pins: dict[str, list[str]] = {}

    def use(self, configured: list[ModelSpec]) -> None:
        """The configured models (at start, and on a reload)."""
        self.configured = list(configured)
        self._configured_ids = {spec.id for spec in configured}

    def specs(self) -> list[ModelSpec]:
        """Every model known: neuron listings first, so the gateway's own entries win."""
        listed: list[ModelSpec] = []
        for handle in self.fleet.neurons.values():
            if handle.listing is not None:
                listed.extend(handle.listing.available)
        known = {spec.id for spec in listed} | self._configured_ids
        for handle in self.fleet.neurons.values():
            for loaded in handle.status.models if handle.status else []:
                # A failed load of a source no catalogue names is no model anyone can use.
                if loaded.id not in known and loaded.state != ModelState.FAILED:
                    # Loaded by someone else (a CLI, a preload) from a source no catalogue names.
                    known.add(loaded.id)
                    listed.append(ModelSpec(id=loaded.id, source=loaded.source, kind=loaded.kind))
        merged = merge_catalogues(listed, self.configured)
        return [
            spec.model_copy(update={"pinned_on": self.pins[spec.id]})
            if spec.id in self.pins
            else spec
            for spec in merged
        ]

    def by_id(self) -> dict[str, ModelSpec]:
        return {spec.id: spec for spec in self.specs()}

    def resolve(self, name: str) -> ModelSpec:
        """The spec a client's model name (id or alias) means."""
        spec = resolve_alias(self.specs(), name)
        if spec is None:
            raise ModelNotFound(unknown_model(self.specs(), name), param="model")
        return spec

    def last_failure(self, model: str) -> str | None:
        """`neuron: reason` of a failed replica of the model, if a neuron reports one."""
        for name, handle in self.fleet.neurons.items():
            loaded = handle.model(model)
            if loaded is not None and loaded.state == ModelState.FAILED:
                return f"{name}: {loaded.error or 'load failed'}"
        return None

    def loadable_on(self, model: str) -> list[str]:
        """Neurons that can load the model: all for configured models, else those listing it."""
        if model in self._configured_ids:
            return list(self.fleet.neurons)
        return [
            name
            for name, handle in self.fleet.neurons.items()
            if handle.listing is not None and any(s.id == model for s in handle.listing.available)
        ]

    def load_source(self, model: str, neuron: str) -> str | None:
        """The source to send with a load; None lets a neuron that lists the model use its own."""
        handle = self.fleet.neurons.get(neuron)  # gone after a reload: its load fails anyway
        listing = handle.listing if handle is not None else None
        if listing is not None and any(s.id == model for s in listing.available):
            return None
        spec = self.by_id().get(model)
        return spec.source if spec is not None else None

    def card(
        self, spec: ModelSpec, availability: tuple[ModelAvailability, list[str]]
    ) -> FleetModelCard:
        """The model's /v1/models entry; `availability` as the placer tells it (Placer.availability)."""
        context = spec.context
        for handle in self.fleet.neurons.values():
            loaded = handle.model(spec.id)
            if context is None and loaded is not None and loaded.state == ModelState.READY:
                context = loaded.context_length
        last_error = self.last_failure(spec.id) if availability[0] == "available" else None
        return model_card(spec, availability, context, last_error)
