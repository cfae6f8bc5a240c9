"""Eviction scoring: which resident replicas give way first, and the fewest that free enough memory."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cortex.core.catalogue import ModelSpec
from cortex.core.placement.model import ReplicaView, Strategy

EvictionKey = tuple[float, ...]


def last_touched(replica: ReplicaView) -> float:
    """When the replica was last useful: its last request, else its load; never-used sorts first."""
    if replica.last_used is not None:
        return replica.last_used
    if replica.loaded_at is not None:
        return replica.loaded_at
    return float("-inf")


def eviction_key(
    replica: ReplicaView, catalogue: Mapping[str, ModelSpec], strategy: Strategy
) -> EvictionKey:
    """Lower keys are evicted first: `lru` by recency alone, `priority` by priority, then recency."""
    if strategy == "priority":
        spec = catalogue.get(replica.model)
        return (float(spec.priority if spec else 0), last_touched(replica))
    return (last_touched(replica),)


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
