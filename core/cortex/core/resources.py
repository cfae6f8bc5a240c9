"""The Kubernetes resources cortex defines (Neuron, ModelPlacement): spec and status models that
mirror crds/*.yaml, and the demand annotation the gateway writes. See docs/kubernetes.md.

Quantities and durations keep the text the user wrote (round trip); `memory_bytes` and
`idle_seconds` give their values."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from cortex.core.catalogue import parse_bytes, parse_seconds

GROUP = "cortex.helexa.ai"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
NEURONS = "neurons"
PLACEMENTS = "modelplacements"
DEMAND_ANNOTATION = f"{GROUP}/demand"
HOSTNAME_LABEL = "kubernetes.io/hostname"

NeuronPhase = Literal["Pending", "Ready", "Unreachable", "Cordoned"]
PlacementPhase = Literal["Pending", "Loading", "Ready", "Degraded", "Idle", "Failed", "Refused"]
ReplicaState = Literal["loading", "ready", "unloading", "failed"]
ConditionStatus = Literal["True", "False", "Unknown"]


def rfc3339(at: float) -> str:
    """Unix seconds -> '2026-12-01T21:00:00Z' (what Kubernetes writes for timestamps)."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> float:
    """'2026-12-01T21:00:00Z' (or with an offset, or fractional seconds) -> unix seconds."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class _Model(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields kept (newer CRD versions)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    def wire(self) -> dict[str, Any]:
        """The JSON a patch carries: camelCase, unset fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ObjectMeta(_Model):
    """The part of metadata cortex reads."""

    name: str
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    creation_timestamp: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    deletion_timestamp: str | None = None


class Condition(_Model):
    """A metav1.Condition."""

    type: str
    status: ConditionStatus
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = Field(default=None, ge=0)


# -- Neuron


class NeuronSpec(_Model):
    endpoint: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/.*)?$")
    cordoned: bool = False
    labels: dict[str, str] = Field(default_factory=dict)


class NeuronDevice(_Model):
    id: str
    name: str = ""
    memory_total: int = Field(default=0, ge=0)
    memory_free: int = Field(default=0, ge=0)
    healthy: bool = True


class NeuronModel(_Model):
    """A model resident on a neuron, as its Neuron object reports it."""

    model: str
    state: ReplicaState
    memory: int = Field(default=0, ge=0)
    in_flight: int = Field(default=0, ge=0)
    last_used: str | None = None
    devices: list[str] = Field(default_factory=list)
    error: str | None = None


class NeuronResourceStatus(_Model):
    """Status of a Neuron object (the neuron's own GET /status is fleet.NeuronStatus)."""

    phase: NeuronPhase = "Pending"
    endpoint: str | None = None
    memory_free: str | None = None
    devices: list[NeuronDevice] = Field(default_factory=list)
    models: list[NeuronModel] = Field(default_factory=list)
    # What `kubectl get nr` shows of the lists above (a printer column takes one value only);
    # empty, not absent, when the list is, so that a merge patch clears them.
    device_summary: str | None = None
    model_summary: str | None = None
    last_probe: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None


class Neuron(_Model):
    api_version: str = API_VERSION
    kind: Literal["Neuron"] = "Neuron"
    metadata: ObjectMeta
    spec: NeuronSpec = Field(default_factory=NeuronSpec)
    status: NeuronResourceStatus | None = None

    @property
    def labels(self) -> dict[str, str]:
        """What a neuronSelector matches: spec.labels merged over metadata.labels."""
        return {**self.metadata.labels, **self.spec.labels}


# -- ModelPlacement


class ReplicaRange(_Model):
    min: int = Field(default=1, ge=0)
    max: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaRange:
        if self.min > self.max:
            raise ValueError("replicas.min must not exceed replicas.max")
        return self


class PlacementResources(_Model):
    memory: int | str | None = None
    devices: int = Field(default=1, ge=1)

    @field_validator("memory")
    @classmethod
    def _quantity(cls, value: int | str | None) -> int | str | None:
        if value is not None:
            parse_bytes(value)
        return value

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory is None else int(parse_bytes(self.memory))  # type: ignore[call-overload]


class NeuronSelector(_Model):
    match_labels: dict[str, str] = Field(default_factory=dict)


class ModelPlacementSpec(_Model):
    model: str = Field(min_length=1)
    source: str | None = Field(default=None, pattern=r"^(pkg|file|hf):.+$")
    aliases: list[str] = Field(default_factory=list)
    replicas: ReplicaRange = Field(default_factory=ReplicaRange)
    pinned: bool = False
    priority: int = 0
    idle_timeout: str | None = None
    resources: PlacementResources = Field(default_factory=PlacementResources)
    neuron_selector: NeuronSelector = Field(default_factory=NeuronSelector)

    @field_validator("idle_timeout")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_seconds(value)
        return value

    @property
    def idle_seconds(self) -> float | None:
        return None if self.idle_timeout is None else float(parse_seconds(self.idle_timeout))  # type: ignore[arg-type]

    @property
    def floor(self) -> int:
        """Replicas always kept: the minimum, and at least one for a pinned placement."""
        return max(self.replicas.min, 1 if self.pinned else 0)


class PlacementReplica(_Model):
    neuron: str
    endpoint: str | None = None
    state: ReplicaState
    since: str | None = None


class ModelPlacementStatus(_Model):
    phase: PlacementPhase = "Pending"
    model: str | None = None  # the model placed: the old one while a changed spec.model waits
    replicas: list[PlacementReplica] = Field(default_factory=list)
    ready_replicas: int = Field(default=0, ge=0)
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None

    def condition(self, kind: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == kind), None)


class ModelPlacement(_Model):
    api_version: str = API_VERSION
    kind: Literal["ModelPlacement"] = "ModelPlacement"
    metadata: ObjectMeta
    spec: ModelPlacementSpec
    status: ModelPlacementStatus | None = None


# -- demand (gateway -> operator)


class PlacementDemand(_Model):
    """The cortex.helexa.ai/demand annotation: clients are waiting for a model with no ready replica."""

    at: str
    waiting: int = Field(default=1, ge=0)

    @field_validator("at")
    @classmethod
    def _moment(cls, value: str) -> str:
        parse_rfc3339(value)
        return value

    @property
    def at_seconds(self) -> float:
        return parse_rfc3339(self.at)

    def annotation(self) -> dict[str, str]:
        """The annotation to patch onto a ModelPlacement."""
        return {DEMAND_ANNOTATION: json.dumps({"at": self.at, "waiting": self.waiting})}

    @classmethod
    def from_annotations(cls, annotations: dict[str, str]) -> PlacementDemand | None:
        """The demand a placement carries; None when absent or unreadable (never an error)."""
        raw = annotations.get(DEMAND_ANNOTATION)
        if not raw:
            return None
        try:
            return cls.model_validate_json(raw)
        except ValueError:
            return None
