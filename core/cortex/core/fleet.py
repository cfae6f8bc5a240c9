"""Wire models of the fleet's state: what a neuron's /status and /models return, and what a
gateway's GET /fleet returns (the fleet page and `cortex status` read it)."""

from __future__ import annotations

from enum import StrEnum
from typing import Final, Literal

from pydantic import BaseModel, Field, SerializeAsAny, StrictBool

from cortex.core.catalogue import ModelSpec
from cortex.core.protocol.openai import ModelCard


class ModelState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


# The one word the fleet page and `cortex status` show for a model or a replica. A replica's own
# state reads as it is; a catalogue model loaded nowhere is "not loaded", or "failed" while its
# last load's failure stands (docs/fleet-control.md).
ShownState = Literal["ready", "loading", "unloading", "failed", "not loaded"]
NOT_LOADED: Final = "not loaded"


def shown_state(state: str, last_error: str | None = None) -> ShownState:
    """A replica's ModelState, or a catalogue model's availability (loaded, loading, available),
    as the shown word."""
    if state in ("ready", "loaded"):
        return "ready"
    for word in ("loading", "unloading", "failed"):
        if state == word:
            return word
    return "failed" if last_error else NOT_LOADED


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
    in_flight: int = Field(default=0, description="requests holding an admission slot")
    queued: int = Field(default=0, description="requests waiting for an admission slot")
    batch_size: int = Field(
        default=0, description="sequences in the engine's running batch (prefilling or decoding)"
    )
    kv_waiting: int = Field(
        default=0,
        description="admitted sequences the engine holds back for KV room (preempted included)",
    )
    preemptions: int = Field(default=0, description="sequences preempted for KV room since load")
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
    error: str | None = Field(default=None, description="why it failed, when it did")


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


class ModelActivity(BaseModel):
    """One model's traffic through the gateway over the last window, from its own counters."""

    model: str
    requests_per_second: float = 0.0
    tokens_per_second: float = Field(default=0.0, description="completion tokens")
    ttft_seconds: float | None = Field(
        default=None, description="mean time to first token of the window's streams; None: none"
    )


class FleetActivity(BaseModel):
    """GET /activity of a gateway (an admin route): live rates per model, for the fleet page."""

    window_seconds: float
    models: list[ModelActivity] = Field(default_factory=list)
