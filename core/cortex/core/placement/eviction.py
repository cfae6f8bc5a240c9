"""Eviction scoring: which resident replicas give way first, and the fewest that free enough memory."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from cortex.core.catalogue import ModelSpec
from cortex.core.placement.model import ReplicaView, Strategy

EvictionKey = tuple[float, ...]
# Seconds a replica counts as idle at least: one touched this instant still has a finite score.
MIN_IDLE = 1.0


def last_touched(replica: ReplicaView) -> float:
    """When the replica was last useful: its last request, else its load; never-used sorts first."""
    if replica.last_used is not None:
        return replica.last_used
    if replica.loaded_at is not None:
        return replica.loaded_at
    return float("-inf")


def eviction_key(
    replica: ReplicaView,
    catalogue: Mapping[str, ModelSpec],
    strategy: Strategy,
    *,
    now: float = 0.0,
    load_seconds: float | None = None,
) -> EvictionKey:
    """Lower keys are evicted first: `lru` by recency alone, `priority` by priority, then recency,
    `cost` by `reload_value` (load seconds per byte times request rate), then recency."""
    if strategy == "priority":
        spec = catalogue.get(replica.model)
        return (float(spec.priority if spec else 0), last_touched(replica))
    if strategy == "cost":
        return (reload_value(replica, now, load_seconds), last_touched(replica))
    return (last_touched(replica),)


def reload_value(replica: ReplicaView, now: float, load_seconds: float | None) -> float:
    """What keeping the replica is worth: its reload cost per byte it holds, times how often it
    is asked for (load seconds saved per byte per second).

    GreedyDual-Size-Frequency without its stored clock: the request rate is the replica's decayed
    `usage`, else the inverse of its idle time (size-adjusted LRU). Unknown cost counts one second
    per GiB (then: LFU or LRU weighted by size).
    """
    size = max(replica.memory, 1)
    cost = load_seconds if load_seconds is not None else size / 2**30
    return cost / size * request_rate(replica, now)


def request_rate(replica: ReplicaView, now: float) -> float:
    """Requests per second the replica can expect: from its usage, else from its idle time."""
    if replica.usage is not None:
        return replica.usage.rate(now)
    idle = max(now - last_touched(replica), MIN_IDLE)
    return 0.0 if math.isinf(idle) else 1.0 / idle  # never used: nothing says it will be


def choose_victims(
    ordered: Sequence[ReplicaView], shortfall: int
) -> tuple[ReplicaView, ...] | None:
    """Fewest replicas, taken coldest first from `ordered`, freeing at least `shortfall` bytes.

    The shortest coldest-first prefix that frees enough is taken, then the hottest members it does
    not need are spared (a large cold victim can make smaller ones before it unnecessary).
    None when even all of them are not enough.
    """
    if shortfall <= 0:
        return ()
    freed = 0
    taken: list[ReplicaView] = []
    for replica in ordered:
        taken.append(replica)
        freed += replica.memory
        if freed >= shortfall:
            break
    else:
        return None
    spared: set[int] = set()
    for index in range(len(taken) - 2, -1, -1):
        if freed - taken[index].memory >= shortfall:
            spared.add(index)
            freed -= taken[index].memory
    return tuple(r for i, r in enumerate(taken) if i not in spared)
