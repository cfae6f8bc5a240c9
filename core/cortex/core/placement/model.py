"""What the planner reads and decides: fleet views, demand, policy, and the actions of a plan."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from cortex.core.fleet import ModelState

# Which replicas give way first when a neuron is full ([eviction] strategy of cortex.toml).
Strategy = Literal["lru", "priority", "cost"]
UnloadReason = Literal["evict", "idle", "defrag"]
# Requests older than this count half (`cost` strategy): popularity over hours.
USAGE_HALF_LIFE = 3600.0
# The same requests counted again with this half-life: a model that just became popular shows it
# within minutes, not after an hour (docs/benchmarks.md, "P4 placement": the `shifting` trace).
RECENT_HALF_LIFE = 300.0


@dataclass(frozen=True)
class Usage:
    """Requests for a model as of time `at` (unix seconds): `count` decayed by USAGE_HALF_LIFE,
    `recent` by RECENT_HALF_LIFE."""

    count: float = 0.0
    at: float = 0.0
    recent: float = 0.0

    def decayed(self, now: float) -> float:
        return self.count * 0.5 ** (max(now - self.at, 0.0) / USAGE_HALF_LIFE)

    def recent_decayed(self, now: float) -> float:
        return self.recent * 0.5 ** (max(now - self.at, 0.0) / RECENT_HALF_LIFE)

    def add(self, now: float) -> Usage:
        """One more request at `now`."""
        return Usage(self.decayed(now) + 1.0, now, self.recent_decayed(now) + 1.0)

    def rate(self, now: float) -> float:
        """Requests per second: over about the last hour, or the last five minutes if higher."""
        hourly = self.decayed(now) * math.log(2) / USAGE_HALF_LIFE
        return max(hourly, self.recent_decayed(now) * math.log(2) / RECENT_HALF_LIFE)


@dataclass(frozen=True)
class ReplicaView:
    """A model resident (or arriving, leaving) on a neuron, as the planner sees it."""

    model: str
    state: ModelState
    memory: int
    in_flight: int = 0
    last_used: float | None = None
    loaded_at: float | None = None
    usage: Usage | None = None  # None: not counted by this caller


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

    strategy: Strategy = "cost"
    defrag_after_cycles: int = 0


@dataclass(frozen=True)
class Load:
    """Load `model` on `neuron`."""

    model: str
    neuron: str
    memory: int = 0  # bytes the planner reserved for it (0: size unknown)


@dataclass(frozen=True)
class Unload:
    """Unload `model` from `neuron`, and why."""

    model: str
    neuron: str
    reason: UnloadReason


Action = Load | Unload


@dataclass(frozen=True)
class Plan:
    """Actions in order: an Unload precedes the Load it makes room for; a defrag move is a Load
    elsewhere, then the Unload. `unplaceable`: models left short of replicas, and why; `blocked`:
    those of them that would fit once replicas in flight, loading, unloading or wanted by other
    waiting clients settle (worth planning again then; not too big, not kept out by pins)."""

    actions: tuple[Action, ...]
    unplaceable: Mapping[str, str]  # model -> human reason
    blocked: frozenset[str] = frozenset()
