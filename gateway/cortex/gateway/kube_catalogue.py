"""The catalogue on Kubernetes: /v1/models is the set of ModelPlacements and their aliases. What a
placement does not say (kind, context limit, dtype) comes from the known catalogue (the default
models and cortex.toml's [[models]]) when it has an entry of the same id."""

from __future__ import annotations

from collections.abc import Sequence

from cortex.core.catalogue import ModelSpec, resolve_alias, unknown_model
from cortex.core.errors import ModelNotFound
from cortex.core.resources import ModelPlacement
from cortex.gateway.catalogue import FleetModelCard, ModelAvailability, model_card
from cortex.gateway.kube_fleet import KubeFleet


def placement_spec(placement: ModelPlacement, known: ModelSpec | None) -> ModelSpec:
    """The model a placement serves; its own fields win over the known entry's."""
    spec = placement.spec
    base = known.model_dump() if known is not None else {"id": spec.model, "source": ""}
    memory = spec.resources.memory_bytes
    return ModelSpec.model_validate(
        base
        | {
            "id": spec.model,
            "source": spec.source or base["source"],
            "aliases": list(spec.aliases),
            "memory": memory if memory is not None else base.get("memory"),
            "min_devices": spec.resources.devices,
            "priority": spec.priority,
            "idle_ttl": spec.idle_seconds,
            "pinned_on": [],  # pins are the operator's business on Kubernetes
        }
    )


class PlacementCatalogue:
    """The models the watched ModelPlacements name (a `Catalogue`)."""

    def __init__(self, kube: KubeFleet, known: Sequence[ModelSpec]) -> None:
        self.kube = kube
        self.use(known)

    def use(self, known: Sequence[ModelSpec]) -> None:
        """What is known of models beyond their placements (at start, and on a reload)."""
        self.known = {spec.id: spec for spec in known}

    def specs(self) -> list[ModelSpec]:
        """One spec per model (several placements of one model pool their aliases)."""
        by_id: dict[str, ModelSpec] = {}
        for _, placement in sorted(self.kube.placements.items()):
            spec = placement_spec(placement, self.known.get(placement.spec.model))
            first = by_id.get(spec.id)
            if first is None:
                by_id[spec.id] = spec
            else:
                first.aliases += [a for a in spec.aliases if a not in first.aliases]
        return list(by_id.values())

    def resolve(self, name: str) -> ModelSpec:
        spec = resolve_alias(self.specs(), name)
        if spec is None:
            raise ModelNotFound(unknown_model(self.specs(), name), param="model")
        return spec

    def card(
        self, spec: ModelSpec, availability: tuple[ModelAvailability, list[str]]
    ) -> FleetModelCard:
        return model_card(spec, availability, spec.context)
