"""Eviction scoring: which resident replicas give way first, and which set of them frees enough."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

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
    return reload_worth(replica, now, load_seconds) / max(replica.memory, 1)


def reload_worth(replica: ReplicaView, now: float, load_seconds: float | None) -> float:
    """Load seconds per second that evicting the replica is expected to cost: its reload time
    (unknown: one second per GiB) times its request rate. Between `cost` victim sets that miss
    equally often, the one that loses least of it goes."""
    cost = load_seconds if load_seconds is not None else replica.memory / 2**30
    return cost * request_rate(replica, now)


def request_rate(replica: ReplicaView, now: float) -> float:
    """Requests per second the replica can expect: from its usage, else from its idle time. What
    `cost` victim sets minimise (summed: the cold loads per second the eviction will cause)."""
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


# Search nodes one neuron's victim set may take: exact for the few replicas a GPU holds, the
# greedy answer (or the best found so far) for a neuron crowded past that.
VICTIM_SEARCH_NODES = 4096


def cheapest_victims(
    candidates: Sequence[ReplicaView], shortfall: int, worth: Callable[[ReplicaView], float]
) -> tuple[ReplicaView, ...] | None:
    """The replicas freeing at least `shortfall` bytes whose summed `worth` is least.

    A covering knapsack, solved as a set rather than one replica at a time: two small cold
    replicas may cost less than the one large warm one coldest-first would take, and one large
    cold replica less than several small warm ones. Ties go to fewer replicas. None when even
    all of them are not enough.
    """
    if shortfall <= 0:
        return ()
    if sum(r.memory for r in candidates) < shortfall:
        return None
    # Cheapest worth per byte first: the order of the greedy answer and of the search's bound.
    items = sorted(candidates, key=lambda r: (worth(r) / max(r.memory, 1), -r.memory, r.model))
    values = [worth(r) for r in items]
    greedy = choose_victims(items, shortfall)
    assert greedy is not None  # all of them free enough
    best_key = (sum(worth(r) for r in greedy), len(greedy))
    best: tuple[int, ...] = tuple(items.index(r) for r in greedy)
    nodes = 0

    def bound(start: int, missing: int) -> float:
        """Least worth the rest could still add: the cheapest bytes, a fraction of the last."""
        extra = 0.0
        for index in range(start, len(items)):
            take = min(items[index].memory, missing)
            extra += values[index] * take / max(items[index].memory, 1)
            missing -= take
            if missing <= 0:
                return extra
        return math.inf

    def search(start: int, missing: int, lost: float, chosen: tuple[int, ...]) -> None:
        nonlocal best, best_key, nodes
        nodes += 1
        if missing <= 0:
            if (lost, len(chosen)) < best_key:
                best, best_key = chosen, (lost, len(chosen))
            return
        if nodes > VICTIM_SEARCH_NODES or start >= len(items):
            return
        if (lost + bound(start, missing), len(chosen) + 1) >= best_key:
            return
        item = items[start]
        search(start + 1, missing - item.memory, lost + values[start], (*chosen, start))
        search(start + 1, missing, lost, chosen)

    search(0, shortfall, 0.0, ())
    return tuple(items[index] for index in best)
