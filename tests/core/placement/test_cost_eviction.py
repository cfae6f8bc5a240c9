"""The `cost` eviction strategy: reload seconds per byte over idle time (pure)."""

from __future__ import annotations

from cortex.core.catalogue import ModelSpec
from cortex.core.fleet import ModelState
from cortex.core.placement.eviction import eviction_key, reload_value
from cortex.core.placement.model import (
    USAGE_HALF_LIFE,
    Demand,
    Load,
    NeuronView,
    Policy,
    ReplicaView,
    Unload,
    Usage,
)
from cortex.core.placement.planner import plan

GIB = 2**30
NOW = 100.0
COST, LRU = Policy("cost"), Policy("lru")


def rep(model: str, gib: float, last_used: float | None) -> ReplicaView:
    return ReplicaView(model, ModelState.READY, int(gib * GIB), last_used=last_used)


def catalogue(**gib: float) -> dict[str, ModelSpec]:
    return {
        m: ModelSpec(id=m, source=f"file:/models/{m}.gguf", memory=int(size * GIB))
        for m, size in gib.items()
    }


def test_cheaper_bytes_and_longer_idle_are_worth_less() -> None:
    small, big = rep("small", 1, last_used=80), rep("big", 8, last_used=80)
    # Same load time: the big replica's bytes are cheaper to get back.
    assert reload_value(big, NOW, 10.0) < reload_value(small, NOW, 10.0)
    # Same size and cost: the one idle longer is worth less.
    assert reload_value(rep("old", 1, 20), NOW, 4.0) < reload_value(small, NOW, 4.0)
    # A costlier reload is worth more.
    assert reload_value(small, NOW, 2.0) < reload_value(small, NOW, 8.0)
    # Never used: worth nothing. Just used: finite (idle counts one second at least).
    assert reload_value(rep("never", 1, None), NOW, 4.0) == 0.0
    assert reload_value(rep("now", 1, NOW), NOW, 4.0) == 4.0 / GIB


def test_unknown_cost_is_lru_weighted_by_size() -> None:
    # One second per GiB: value is 1 / (GiB * idle), so recency alone decides between sizes.
    older, newer = rep("older", 8, last_used=50), rep("newer", 1, last_used=60)
    keys = [eviction_key(r, {}, "cost", now=NOW) for r in (older, newer)]
    assert keys[0] < keys[1]


def test_cost_evicts_the_big_cheap_replica_lru_would_keep() -> None:
    # 10 GiB neuron: big (8 GiB, used at 90) and small (1 GiB, used at 80); a 2 GiB model arrives.
    fleet = [NeuronView("n1", 10 * GIB, 1 * GIB, (rep("big", 8, 90), rep("small", 1, 80)))]
    models = catalogue(big=8, small=1, new=2)
    seconds = {("n1", "big"): 2.0, ("n1", "small"): 8.0}
    assert plan(fleet, models, [Demand("new")], LRU, NOW, load_seconds=seconds).actions == (
        Unload("small", "n1", "evict"),
        Load("new", "n1", 2 * GIB),
    )
    # Lost load seconds per second: big 2 s / 10 s idle = 0.2; small 8 s / 20 s = 0.4.
    assert plan(fleet, models, [Demand("new")], COST, NOW, load_seconds=seconds).actions == (
        Unload("big", "n1", "evict"),
        Load("new", "n1", 2 * GIB),
    )


def test_cost_takes_two_cold_replicas_where_fewest_victims_takes_one_warm() -> None:
    # n1: one warm 4 GiB replica; n2: two cold 2 GiB ones. A 3 GiB model arrives, nothing free.
    fleet = [
        NeuronView("n1", 4 * GIB, 0, (rep("warm", 4, 95),)),
        NeuronView("n2", 4 * GIB, 0, (rep("c1", 2, 10), rep("c2", 2, 20))),
    ]
    models = catalogue(warm=4, c1=2, c2=2, new=3)
    seconds = {("n1", "warm"): 7.0, ("n2", "c1"): 5.0, ("n2", "c2"): 5.0}
    # LRU takes the fewest victims: warm, on n1.
    assert plan(fleet, models, [Demand("new")], LRU, NOW, load_seconds=seconds).actions == (
        Unload("warm", "n1", "evict"),
        Load("new", "n1", 3 * GIB),
    )
    # cost: warm loses 7 s / 5 s idle = 1.4 s/s; c1 + c2 lose 5/90 + 5/80 = 0.12 s/s.
    result = plan(fleet, models, [Demand("new")], COST, NOW, load_seconds=seconds)
    assert result.actions == (
        Unload("c1", "n2", "evict"),
        Unload("c2", "n2", "evict"),
        Load("new", "n2", 3 * GIB),
    )


def test_a_load_measured_on_another_neuron_stands_in() -> None:
    # Only n2 has loaded small, and it was slow there: n1 keeps small and evicts big.
    fleet = [NeuronView("n1", 10 * GIB, 1 * GIB, (rep("big", 8, 90), rep("small", 1, 80)))]
    models = catalogue(big=8, small=1, new=2)
    slow_small = {("n1", "big"): 11.0, ("n2", "small"): 40.0}
    result = plan(fleet, models, [Demand("new")], COST, NOW, load_seconds=slow_small)
    assert Unload("big", "n1", "evict") in result.actions
    # Cheap elsewhere (1 s for its GiB over 20 s idle: 0.05): small goes instead.
    cheap_small = {("n1", "big"): 11.0, ("n2", "small"): 1.0}
    result = plan(fleet, models, [Demand("new")], COST, NOW, load_seconds=cheap_small)
    assert Unload("small", "n1", "evict") in result.actions


def test_usage_decays_by_half_each_half_life() -> None:
    usage = Usage().add(0.0).add(0.0)
    assert usage.decayed(USAGE_HALF_LIFE) == 1.0
    assert usage.add(USAGE_HALF_LIFE).decayed(USAGE_HALF_LIFE) == 2.0
    assert usage.rate(0.0) > usage.rate(2 * USAGE_HALF_LIFE) > 0.0


def test_counted_requests_outrank_a_recent_touch() -> None:
    # "popular" served 50 requests but not in the last 30 s; "fluke" one, just now. Same size, cost.
    popular = ReplicaView("popular", ModelState.READY, GIB, last_used=70, usage=_usage(50, 70))
    fluke = ReplicaView("fluke", ModelState.READY, GIB, last_used=99, usage=_usage(1, 99))
    fleet = [NeuronView("n1", 2 * GIB, 0, (popular, fluke))]
    models = catalogue(popular=1, fluke=1, new=1)
    seconds = {("n1", "popular"): 4.0, ("n1", "fluke"): 4.0}
    assert (
        Unload("popular", "n1", "evict") in plan(fleet, models, [Demand("new")], LRU, NOW).actions
    )
    result = plan(fleet, models, [Demand("new")], COST, NOW, load_seconds=seconds)
    assert Unload("fluke", "n1", "evict") in result.actions


def _usage(requests: int, at: float) -> Usage:
    usage = Usage()
    for _ in range(requests):
        usage = usage.add(at)
    return usage
