"""Wire models of the fleet's state: what a neuron's /status and /models return, and what a
gateway's GET /fleet returns (the fleet page and `cortex status` read it)."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field, SerializeAsAny, StrictBool

from cortex.core.catalogue import ModelSpec
from cortex.core.protocol.openai import ModelCard


class ModelState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


class DeviceStatus(BaseModel):
    """One compute device of a neuron, as its worker sees it."""

    id: str = Field(description="worker name: cpu-0, cuda-dev-0, ...")
    index: int
    kind: Literal["cpu", "cuda"]
    name: str
    memory_total: int = Field(description="bytes")
    memory_free: int = Field(description="bytes")
    memory_used: int = Field(description="bytes")
    healthy: bool = True
    error: str | None = None


class LoadedModel(BaseModel):
    """A model resident (or arriving, leaving, failed) on a neuron."""

    id: str
    source: str
    kind: Literal["chat", "embedding"] = "chat"
    state: ModelState
    devices: list[str] = Field(default_factory=list)
    memory_bytes: int = 0
    context_length: int | None = None
    in_flight: int = 0
    queued: int = 0
    last_used: float | None = Field(default=None, description="unix seconds of the last request")
    loaded_at: float | None = None
    progress: float = Field(default=0.0, ge=0.0, le=1.0, description="load progress 0..1")
    error: str | None = None


class NeuronStatus(BaseModel):
    """GET /status of a neuron."""

    node: str
    version: str
    healthy: bool = True
    devices: list[DeviceStatus] = Field(default_factory=list)
    models: list[LoadedModel] = Field(default_factory=list)
    in_flight: int = 0
    queued: int = 0
    # Admission limits of each model here; a gateway sends no model more requests than these.
    max_running: int | None = Field(default=None, description="running sequences, per model")
    max_queue: int | None = Field(default=None, description="requests waiting, per model")
    lifecycle_open: bool = Field(
        default=False,
        description="load/unload need no admin token and the neuron listens beyond loopback",
    )


class ModelListing(BaseModel):
    """GET /models of a neuron: what is loaded and what it could load from local sources."""

    loaded: list[LoadedModel] = Field(default_factory=list)
    available: list[ModelSpec] = Field(default_factory=list)


class LoadRequest(BaseModel):
    """POST /models/load."""

    model: str
    source: str | None = None
    devices: list[str] | None = None
    dtype: str | None = None
    wait: StrictBool = True


class UnloadRequest(BaseModel):
    """POST /models/unload."""

    model: str
    force: StrictBool = False


# ---- a gateway's GET /fleet -----------------------------------------------------------------

FleetHealth = Literal["ok", "impaired", "degraded"]


class FleetReplica(BaseModel):
    """A model on one neuron, as the gateway sees it."""

    id: str
    state: ModelState
    devices: list[str] = Field(default_factory=list)
    memory_bytes: int = 0
    queued: int = 0
    progress: float = Field(default=0.0, ge=0.0, le=1.0)
    in_flight: int = Field(default=0, description="the neuron's count or the gateway's, the larger")
    last_used: float | None = None


class FleetNeuron(BaseModel):
    """One neuron of the gateway's fleet: its health, devices and replicas."""

    name: str
    endpoint: str
    healthy: bool
    error: str | None = Field(default=None, description="why its last poll failed")
    last_seen: float | None = Field(default=None, description="unix seconds of its last answer")
    devices: list[DeviceStatus] = Field(default_factory=list)
    replicas: list[FleetReplica] = Field(default_factory=list)


class FleetView(BaseModel):
    """GET /fleet of a gateway (an admin route): its health, every neuron, the merged catalogue."""

    status: FleetHealth
    neurons: list[FleetNeuron] = Field(default_factory=list)
    # The gateway's /v1/models cards: its own fields (state, locations, aliases...) ride along.
    models: list[SerializeAsAny[ModelCard]] = Field(default_factory=list)
