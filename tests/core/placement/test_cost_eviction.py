"""The `cost` eviction strategy: the victim set whose counted requests miss least (pure)."""

from __future__ import annotations

import math

import pytest

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
from cortex.core.placement.planner import apply_plan, plan

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


def test_cost_counts_the_cold_loads_an_eviction_causes_not_their_seconds() -> None:
    # 10 GiB neuron: big (8 GiB, 11 s to load, idle 20 s) and small (1 GiB, 4 s, idle 10 s).
    fleet = [NeuronView("n1", 10 * GIB, 1 * GIB, (rep("big", 8, 80), rep("small", 1, 90)))]
    models = catalogue(big=8, small=1, new=2)
    seconds = {("n1", "big"): 11.0, ("n1", "small"): 4.0}
    # big is asked for half as often (1/20 s against 1/10 s): evicting it misses least, though
    # each of its misses costs more load time (0.55 s/s against small's 0.4 s/s).
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
    # cost: warm misses once per 5 s idle (0.2/s); c1 + c2 once per 90 s and 80 s (0.024/s).
    result = plan(fleet, models, [Demand("new")], COST, NOW, load_seconds=seconds)
    assert result.actions == (
        Unload("c1", "n2", "evict"),
        Unload("c2", "n2", "evict"),
        Load("new", "n2", 3 * GIB),
    )


def test_equal_misses_go_where_reloading_is_cheaper_measured_elsewhere_standing_in() -> None:
    # Two full neurons, one replica each, asked for equally (both idle 20 s): the miss rates tie,
    # so the load seconds decide. b was never loaded on n2: its time on n3 stands in.
    fleet = [
        NeuronView("n1", 2 * GIB, 0, (rep("a", 2, 80),)),
        NeuronView("n2", 2 * GIB, 0, (rep("b", 2, 80),)),
    ]
    models = catalogue(a=2, b=2, new=2)
    fast_b = {("n1", "a"): 10.0, ("n3", "b"): 2.0}
    result = plan(fleet, models, [Demand("new")], COST, NOW, load_seconds=fast_b)
    assert result.actions == (Unload("b", "n2", "evict"), Load("new", "n2", 2 * GIB))
    slow_b = {("n1", "a"): 10.0, ("n3", "b"): 20.0}
    result = plan(fleet, models, [Demand("new")], COST, NOW, load_seconds=slow_b)
    assert result.actions == (Unload("a", "n1", "evict"), Load("new", "n1", 2 * GIB))


def split_free_memory() -> tuple[list[NeuronView], dict[str, ModelSpec]]:
    """2 GiB free on each of two neurons, each holding a popular model; a 4 GiB one is asked for."""
    fleet = [
        NeuronView("n1", 8 * GIB, 2 * GIB, (rep("chat", 2, 95), rep("code", 4, 90))),
        NeuronView("n2", 6 * GIB, 2 * GIB, (rep("embed", 4, 98),)),
    ]
    return fleet, catalogue(chat=2, code=4, embed=4, big=4)


def test_cost_joins_split_free_memory_by_moving_a_replica_instead_of_evicting() -> None:
    fleet, models = split_free_memory()
    # lru (defrag off) evicts a popular model (code, the coldest) to fit big; cost moves chat into n2's free 2 GiB
    # (a load, counted as one by bench/placement) and evicts nothing.
    assert plan(fleet, models, [Demand("big")], LRU, NOW).actions == (
        Unload("code", "n1", "evict"),
        Load("big", "n1", 4 * GIB),
    )
    result = plan(fleet, models, [Demand("big")], COST, NOW)
    assert result.actions == (
        Load("chat", "n2", 2 * GIB),
        Unload("chat", "n1", "defrag"),
        Load("big", "n1", 4 * GIB),
    )
    after = apply_plan(fleet, result, NOW)
    assert plan(after, models, [Demand("big")], COST, NOW).actions == ()


def test_cost_evicts_when_the_free_memory_together_cannot_hold_the_model() -> None:
    fleet, models = split_free_memory()
    models["big"] = catalogue(big=5)["big"]  # 5 GiB: more than the 4 GiB free in all
    result = plan(fleet, models, [Demand("big")], COST, NOW)
    assert not any(isinstance(a, Unload) and a.reason == "defrag" for a in result.actions)
    assert Load("big", "n1", 5 * GIB) in result.actions


def test_usage_decays_by_half_each_half_life() -> None:
    usage = Usage().add(0.0).add(0.0)
    assert usage.decayed(USAGE_HALF_LIFE) == 1.0
    assert usage.add(USAGE_HALF_LIFE).decayed(USAGE_HALF_LIFE) == 2.0
    assert usage.rate(0.0) > usage.rate(2 * USAGE_HALF_LIFE) > 0.0


def test_a_burst_in_the_last_minutes_counts_at_its_own_rate() -> None:
    # 20 requests 10 s ago: per hour that is 0.004/s, over the last five minutes 0.045/s.
    burst = _usage(20, NOW - 10)
    assert burst.rate(NOW) == pytest.approx(
        max(burst.decayed(NOW) * math.log(2) / USAGE_HALF_LIFE, 0.045), rel=0.02
    )
    assert burst.rate(NOW) > 10 * burst.decayed(NOW) * math.log(2) / USAGE_HALF_LIFE
    # An hour on, the five-minute count has decayed away: the hourly rate is what is left.
    later = NOW + USAGE_HALF_LIFE
    assert burst.rate(later) == pytest.approx(burst.decayed(later) * math.log(2) / USAGE_HALF_LIFE)


def test_a_newly_popular_model_outranks_one_popular_an_hour_ago() -> None:
    # "was" served 200 requests an hour ago (100 left in the hourly count); "now" 20, just now.
    was = ReplicaView("was", ModelState.READY, GIB, last_used=70, usage=_usage(200, NOW - 3600))
    now = ReplicaView("now", ModelState.READY, GIB, last_used=90, usage=_usage(20, NOW - 10))
    fleet = [NeuronView("n1", 2 * GIB, 0, (was, now))]
    models = catalogue(was=1, now=1, new=1)
    seconds = {("n1", "was"): 4.0, ("n1", "now"): 4.0}
    result = plan(fleet, models, [Demand("new")], COST, NOW, load_seconds=seconds)
    assert Unload("was", "n1", "evict") in result.actions


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
