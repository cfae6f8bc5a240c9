"""Pure placement planner: fleet snapshot + catalogue + demand + policy + now -> actions.

Shared by the gateway's local placer, the operator and the simulator. It never does I/O, never reads
clocks and never sleeps: time is the `now` argument.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cortex.core.catalogue import ModelSpec
from cortex.core.fleet import ModelState


@dataclass(frozen=True)
class ReplicaView:
    """A model resident (or arriving, leaving) on a neuron, as the planner sees it."""

    model: str
    state: ModelState
    memory: int
    in_flight: int = 0
    last_used: float | None = None
    loaded_at: float | None = None


@dataclass(frozen=True)
class NeuronView:
    """One neuron of the fleet snapshot; memory in bytes."""

    name: str
    memory_total: int
    memory_free: int
    replicas: tuple[ReplicaView, ...] = ()
    healthy: bool = True
    cordoned: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Demand:
    """A model some client is waiting for."""

    model: str
    waiting: int = 1


@dataclass(frozen=True)
class Policy:
    """Eviction strategy and defragmentation cadence ([eviction] of cortex.toml)."""

    strategy: Literal["lru", "priority"] = "lru"
    defrag_after_cycles: int = 0


@dataclass(frozen=True)
class Load:
    """Load `model` on `neuron`."""

    model: str
    neuron: str


@dataclass(frozen=True)
class Unload:
    """Unload `model` from `neuron`, and why."""

    model: str
    neuron: str
    reason: Literal["evict", "idle", "defrag"]


Action = Load | Unload


@dataclass(frozen=True)
class Plan:
    """Actions to apply in order (unloads before the loads they make room for)."""

    actions: tuple[Action, ...]
    unplaceable: Mapping[str, str]  # model -> human reason


def plan(
    fleet: Sequence[NeuronView],
    catalogue: Mapping[str, ModelSpec],
    demand: Sequence[Demand],
    policy: Policy,
    now: float,
    *,
    min_replicas: Mapping[str, int] | None = None,
    cycle: int = 0,
    selectors: Mapping[str, Mapping[str, str]] | None = None,
    estimates: Mapping[str, int] | None = None,
) -> Plan:
    """Decide what to load and unload so demanded, pinned and minimum replicas are placed."""
    raise NotImplementedError
