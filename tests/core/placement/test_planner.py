"""The pure placement planner: placement, eviction strategies, pins, minimums, idle, defrag."""

from __future__ import annotations

import random

from cortex.core.catalogue import ModelSpec
from cortex.core.fleet import ModelState
from cortex.core.placement.eviction import cheapest_victims, choose_victims
from cortex.core.placement.model import Demand, Load, NeuronView, Policy, ReplicaView, Unload
from cortex.core.placement.planner import apply_plan, plan

GIB = 2**30
NOW = 10_000.0


def spec(model: str, gib: float | None = 1, **fields: object) -> ModelSpec:
    memory = None if gib is None else int(gib * GIB)
    return ModelSpec(id=model, source=f"file:/models/{model}.gguf", memory=memory, **fields)


def cat(*specs: ModelSpec) -> dict[str, ModelSpec]:
    return {s.id: s for s in specs}


def rep(
    model: str,
    gib: float = 1,
    state: ModelState = ModelState.READY,
    in_flight: int = 0,
    last_used: float | None = 0.0,
) -> ReplicaView:
    return ReplicaView(model, state, int(gib * GIB), in_flight=in_flight, last_used=last_used)


def neuron(name: str, total_gib: float, *replicas: ReplicaView, **fields: object) -> NeuronView:
    total = int(total_gib * GIB)
    free = total - sum(r.memory for r in replicas)
    return NeuronView(name, total, free, tuple(replicas), **fields)  # type: ignore[arg-type]


def want(*models: str) -> list[Demand]:
    return [Demand(m) for m in models]


LRU, PRIORITY = Policy("lru"), Policy("priority")


# -- placement


def test_demand_loads_where_most_memory_is_left() -> None:
    fleet = [neuron("small", 4), neuron("big", 16, rep("x", 10)), neuron("tiny", 2)]
    catalogue = cat(spec("m", 3), spec("x", 10))
    result = plan(fleet, catalogue, want("m"), LRU, NOW)
    assert result.actions == (Load("m", "big", 3 * GIB),)
    assert result.unplaceable == {}


def test_a_ready_or_loading_replica_satisfies_demand() -> None:
    catalogue = cat(spec("a"), spec("b"))
    fleet = [neuron("n", 8, rep("a"), rep("b", state=ModelState.LOADING))]
    assert plan(fleet, catalogue, want("a", "b"), LRU, NOW).actions == ()


def test_a_replica_on_an_unhealthy_neuron_does_not_count() -> None:
    fleet = [neuron("down", 8, rep("m"), healthy=False), neuron("up", 8)]
    assert plan(fleet, cat(spec("m")), want("m"), LRU, NOW).actions == (Load("m", "up", GIB),)


def test_selector_restricts_the_neurons() -> None:
    fleet = [neuron("a", 8), neuron("b", 8, labels={"gpu": "h100"})]
    result = plan(fleet, cat(spec("m")), want("m"), LRU, NOW, selectors={"m": {"gpu": "h100"}})
    assert result.actions == (Load("m", "b", GIB),)


def test_no_usable_neuron_is_explained() -> None:
    fleet = [neuron("a", 8, cordoned=True), neuron("b", 8, healthy=False)]
    result = plan(fleet, cat(spec("m")), want("m"), LRU, NOW)
    assert result.actions == ()
    assert result.unplaceable == {"m": "no healthy, uncordoned neuron"}
    selected = plan(
        [neuron("a", 8)], cat(spec("m")), want("m"), LRU, NOW, selectors={"m": {"z": "1"}}
    )
    assert selected.unplaceable == {"m": "no healthy, uncordoned neuron matches the selector z=1"}


def test_unknown_model_and_model_too_large() -> None:
    result = plan([neuron("a", 8)], cat(spec("huge", 20)), want("ghost", "huge"), LRU, NOW)
    assert result.actions == ()
    assert result.unplaceable["ghost"] == "not in the catalogue"
    assert "more than any neuron it may use holds (8.0 GiB)" in result.unplaceable["huge"]


def test_size_comes_from_estimates_and_unknown_size_goes_to_most_free_memory() -> None:
    fleet = [neuron("a", 8, rep("x", 7)), neuron("b", 8, rep("y", 3))]
    catalogue = cat(spec("e", None), spec("u", None), spec("x", 7), spec("y", 3))
    result = plan(fleet, catalogue, want("e"), LRU, NOW, estimates={"e": 4 * GIB})
    assert result.actions == (Load("e", "b", 4 * GIB),)
    assert plan(fleet, catalogue, want("u"), LRU, NOW).actions == (Load("u", "b", 0),)


def test_most_waiting_demand_is_placed_first() -> None:
    catalogue = cat(spec("a", 6), spec("b", 6))
    result = plan([neuron("n", 8)], catalogue, [Demand("a", 1), Demand("b", 5)], LRU, NOW)
    assert result.actions == (Load("b", "n", 6 * GIB),)
    assert "a" in result.unplaceable


def test_a_neuron_where_the_load_failed_is_the_last_resort() -> None:
    failed = rep("m", state=ModelState.FAILED)
    fleet = [neuron("a", 8, failed), neuron("b", 4)]
    assert plan(fleet, cat(spec("m")), want("m"), LRU, NOW).actions == (Load("m", "b", GIB),)
    alone = plan([neuron("a", 8, failed)], cat(spec("m")), want("m"), LRU, NOW)
    assert alone.actions == (Load("m", "a", GIB),)


# -- eviction


def test_lru_evicts_the_least_recently_used() -> None:
    fleet = [neuron("n", 4, rep("old", 2, last_used=1), rep("new", 2, last_used=9))]
    catalogue = cat(spec("old", 2), spec("new", 2), spec("m", 2))
    result = plan(fleet, catalogue, want("m"), LRU, NOW)
    assert result.actions == (Unload("old", "n", "evict"), Load("m", "n", 2 * GIB))


def test_lru_and_priority_choose_different_victims() -> None:
    fleet = [neuron("n", 4, rep("vip", 2, last_used=1), rep("cheap", 2, last_used=9))]
    catalogue = cat(spec("vip", 2, priority=10), spec("cheap", 2, priority=0), spec("m", 2))
    assert plan(fleet, catalogue, want("m"), LRU, NOW).actions[0] == Unload("vip", "n", "evict")
    assert plan(fleet, catalogue, want("m"), PRIORITY, NOW).actions[0] == Unload(
        "cheap", "n", "evict"
    )


def test_priority_breaks_ties_by_recency() -> None:
    fleet = [neuron("n", 4, rep("a", 2, last_used=9), rep("b", 2, last_used=1))]
    catalogue = cat(spec("a", 2, priority=1), spec("b", 2, priority=1), spec("m", 2))
    assert plan(fleet, catalogue, want("m"), PRIORITY, NOW).actions[0] == Unload("b", "n", "evict")


def test_fewest_victims_spares_the_unneeded_ones() -> None:
    small1, small2, big = rep("s1", 1), rep("s2", 1), rep("big", 4)
    assert choose_victims([small1, small2, big], 4 * GIB) == (big,)
    assert choose_victims([small1, small2, big], 5 * GIB) == (small1, big)
    assert choose_victims([small1, small2], 5 * GIB) is None
    assert choose_victims([small1], 0) == ()


def test_cheapest_victim_set_beats_taking_the_cheapest_bytes_one_by_one() -> None:
    big, s1, s2 = rep("big", 8), rep("s1", 1), rep("s2", 1)
    worth = {"big": 2.0, "s1": 0.5, "s2": 0.5}.__getitem__

    def by_worth(r: ReplicaView) -> float:
        return worth(r.model)

    # Cheapest per byte first, one by one, takes big (0.25/GiB) and loses 2.0; the set s1 + s2
    # frees the 2 GiB needed and loses 1.0.
    by_density = sorted([big, s1, s2], key=lambda r: by_worth(r) / r.memory)
    assert choose_victims(by_density, 2 * GIB) == (big,)
    assert set(cheapest_victims([big, s1, s2], 2 * GIB, by_worth)) == {s1, s2}
    # When the big one is the cheaper set, it goes alone.
    cheap_big = {"big": 0.6, "s1": 0.5, "s2": 0.5}.__getitem__
    assert cheapest_victims([big, s1, s2], 2 * GIB, lambda r: cheap_big(r.model)) == (big,)
    # Equal worth: fewer replicas.
    assert cheapest_victims([s1, s2, rep("s3", 2)], 2 * GIB, lambda r: 0.0) == (rep("s3", 2),)
    assert cheapest_victims([s1, s2], 3 * GIB, by_worth) is None
    assert cheapest_victims([s1], 0, by_worth) == ()


def test_a_crowded_neuron_gets_a_victim_set_no_worse_than_greedy() -> None:
    # Past the search's node budget the answer is the best found, never worse than the greedy one.
    rng = random.Random(4)
    crowd = [rep(f"r{i:02d}", rng.choice((1, 2, 3))) for i in range(60)]
    worths = {r.model: rng.random() for r in crowd}

    def worth(r: ReplicaView) -> float:
        return worths[r.model]

    victims = cheapest_victims(crowd, 20 * GIB, worth)
    assert victims is not None and sum(r.memory for r in victims) >= 20 * GIB
    greedy = choose_victims(sorted(crowd, key=lambda r: worth(r) / r.memory), 20 * GIB)
    assert greedy is not None
    assert sum(map(worth, victims)) <= sum(map(worth, greedy))


def test_evicts_the_fewest_replicas_then_the_coldest_neuron() -> None:
    fleet = [
        neuron("a", 4, rep("hot", 4, last_used=90)),
        neuron("b", 4, rep("c1", 2, last_used=5), rep("c2", 2, last_used=6)),
        neuron("c", 4, rep("warm", 4, last_used=50)),
    ]
    catalogue = cat(spec("hot", 4), spec("c1", 2), spec("c2", 2), spec("warm", 4), spec("m", 3))
    result = plan(fleet, catalogue, want("m"), LRU, NOW)
    assert result.actions == (Unload("warm", "c", "evict"), Load("m", "c", 3 * GIB))


def test_pinned_in_flight_and_loading_replicas_are_never_evicted() -> None:
    fleet = [
        neuron(
            "n",
            6,
            rep("pinned", 2),
            rep("busy", 2, in_flight=1),
            rep("arriving", 2, state=ModelState.LOADING),
        )
    ]
    catalogue = cat(
        spec("pinned", 2, pinned_on=["n"]), spec("busy", 2), spec("arriving", 2), spec("m", 2)
    )
    result = plan(fleet, catalogue, want("m"), LRU, NOW)
    assert result.actions == ()
    # Blocked, not impossible: once the busy and arriving replicas settle, either one makes room.
    assert result.blocked == {"m"} and "in flight" in result.unplaceable["m"]


def test_a_model_kept_out_by_pins_and_minimums_is_not_blocked_but_unplaceable() -> None:
    fleet = [neuron("n", 4, rep("pinned", 2), rep("kept", 2, in_flight=1))]
    catalogue = cat(spec("pinned", 2, pinned_on=["n"]), spec("kept", 2), spec("m", 2))
    result = plan(fleet, catalogue, want("m"), LRU, NOW, min_replicas={"kept": 1})
    assert result.actions == () and result.blocked == frozenset()
    assert "no neuron it may use can free that much" in result.unplaceable["m"]


def test_a_pin_elsewhere_does_not_protect() -> None:
    fleet = [neuron("n", 2, rep("p", 2)), neuron("home", 2, rep("p", 2))]
    catalogue = cat(spec("p", 2, pinned_on=["home"]), spec("m", 2))
    result = plan(fleet, catalogue, want("m"), LRU, NOW)
    assert result.actions == (Unload("p", "n", "evict"), Load("m", "n", 2 * GIB))


def test_a_demanded_model_is_not_evicted_for_another_demanded_model() -> None:
    fleet = [neuron("n", 4, rep("a", 4, last_used=0))]
    catalogue = cat(spec("a", 4), spec("b", 4))
    result = plan(fleet, catalogue, want("a", "b"), LRU, NOW)
    assert result.actions == ()
    assert "b" in result.unplaceable
    assert plan(fleet, catalogue, want("b"), LRU, NOW).actions[0] == Unload("a", "n", "evict")


# -- pins and minimums


def test_pinned_model_is_loaded_on_its_neuron_evicting_as_needed() -> None:
    fleet = [neuron("roomy", 16), neuron("home", 4, rep("x", 3, last_used=1))]
    catalogue = cat(spec("p", 2, pinned_on=["home"]), spec("x", 3))
    result = plan(fleet, catalogue, [], LRU, NOW)
    assert result.actions == (Unload("x", "home", "evict"), Load("p", "home", 2 * GIB))


def test_pin_on_a_missing_or_down_neuron_waits_quietly() -> None:
    catalogue = cat(spec("p", 2, pinned_on=["gone", "down"]))
    result = plan([neuron("down", 8, healthy=False)], catalogue, [], LRU, NOW)
    assert result == plan([], catalogue, [], LRU, NOW)
    assert result.actions == () and result.unplaceable == {}


def test_min_replicas_on_distinct_neurons_and_never_evicted_below() -> None:
    catalogue = cat(spec("m", 2), spec("x", 2))
    fleet = [neuron("a", 4, rep("m", 2)), neuron("b", 2), neuron("c", 2)]
    result = plan(fleet, catalogue, [], LRU, NOW, min_replicas={"m": 2})
    assert result.actions == (Load("m", "b", 2 * GIB),)
    # Every neuron holds one replica of m: x cannot evict any of them while min is 3.
    full = [neuron(n, 2, rep("m", 2)) for n in "abc"]
    kept = plan(full, catalogue, want("x"), LRU, NOW, min_replicas={"m": 3})
    assert kept.actions == () and "x" in kept.unplaceable
    spare = plan(full, catalogue, want("x"), LRU, NOW, min_replicas={"m": 2})
    assert spare.actions == (Unload("m", "a", "evict"), Load("x", "a", 2 * GIB))


def test_min_replicas_reports_a_shortfall() -> None:
    result = plan([neuron("a", 4)], cat(spec("m", 2)), [], LRU, NOW, min_replicas={"m": 2})
    assert result.actions == (Load("m", "a", 2 * GIB),)
    assert result.unplaceable == {
        "m": "1 of 2 replicas placed: already on every neuron that may hold it"
    }


# -- idle


def test_idle_replicas_past_their_ttl_are_unloaded() -> None:
    catalogue = cat(
        spec("stale", idle_ttl=60),
        spec("fresh", idle_ttl=60),
        spec("busy", idle_ttl=60),
        spec("forever"),
        spec("pinned", idle_ttl=60, pinned_on=["n"]),
        spec("kept", idle_ttl=60),
    )
    fleet = [
        neuron(
            "n",
            8,
            rep("stale", last_used=NOW - 61),
            rep("fresh", last_used=NOW - 59),
            rep("busy", last_used=NOW - 600, in_flight=2),
            rep("forever", last_used=0),
            rep("pinned", last_used=0),
            rep("kept", last_used=0),
        )
    ]
    result = plan(fleet, catalogue, [], LRU, NOW, min_replicas={"kept": 1})
    assert result.actions == (Unload("stale", "n", "idle"),)


def test_idle_falls_back_to_load_time_and_spares_demanded_models() -> None:
    catalogue = cat(spec("a", idle_ttl=60), spec("b", idle_ttl=60))
    never_used = ReplicaView("a", ModelState.READY, GIB, loaded_at=NOW - 100)
    fleet = [neuron("n", 8, never_used, rep("b", last_used=0))]
    assert plan(fleet, catalogue, want("b"), LRU, NOW).actions == (Unload("a", "n", "idle"),)


# -- defrag


def fragmented() -> tuple[list[NeuronView], dict[str, ModelSpec]]:
    fleet = [
        neuron("n1", 8, rep("a", 2, last_used=50), rep("b", 2, last_used=40)),
        neuron("n2", 8, rep("c", 4, last_used=60)),
    ]
    return fleet, cat(spec("a", 2), spec("b", 2), spec("c", 4), spec("x", 6))


def test_defrag_moves_the_smallest_idle_replica_instead_of_evicting() -> None:
    fleet, catalogue = fragmented()
    result = plan(fleet, catalogue, want("x"), Policy("lru", defrag_after_cycles=3), NOW, cycle=6)
    assert result.actions == (
        Load("a", "n2", 2 * GIB),
        Unload("a", "n1", "defrag"),
        Load("x", "n1", 6 * GIB),
    )


def test_defrag_only_on_its_cycle_otherwise_evicts() -> None:
    fleet, catalogue = fragmented()
    result = plan(fleet, catalogue, want("x"), Policy("lru", defrag_after_cycles=3), NOW, cycle=7)
    assert result.actions == (Unload("b", "n1", "evict"), Load("x", "n1", 6 * GIB))


def test_defrag_moves_a_replica_off_the_other_neuron_when_the_small_ones_are_pinned() -> None:
    fleet, catalogue = fragmented()
    catalogue["a"] = spec("a", 2, pinned_on=["n1"])
    catalogue["b"] = spec("b", 2, pinned_on=["n1"])
    result = plan(fleet, catalogue, want("x"), Policy("lru", defrag_after_cycles=1), NOW, cycle=1)
    assert result.actions == (
        Load("c", "n1", 4 * GIB),
        Unload("c", "n2", "defrag"),
        Load("x", "n2", 6 * GIB),
    )


def test_defrag_falls_back_to_eviction_when_nothing_can_move() -> None:
    fleet, catalogue = fragmented()
    catalogue["a"] = spec("a", 2, pinned_on=["n1"])
    catalogue["b"] = spec("b", 2, pinned_on=["n1"])
    fleet[1] = neuron("n2", 8, rep("c", 4), labels={"zone": "2"})
    policy = Policy("lru", defrag_after_cycles=1)
    result = plan(fleet, catalogue, want("x"), policy, NOW, cycle=1, selectors={"c": {"zone": "2"}})
    assert result.actions == (Unload("c", "n2", "evict"), Load("x", "n2", 6 * GIB))


# -- determinism and idempotence


def test_same_input_same_plan_whatever_the_order() -> None:
    fleet = [neuron(f"n{i}", 4, rep(f"r{i}", 2, last_used=5)) for i in range(6)]
    catalogue = cat(*(spec(f"r{i}", 2) for i in range(6)), *(spec(f"d{i}", 3) for i in range(4)))
    demand = want(*(f"d{i}" for i in range(4)))
    first = plan(fleet, catalogue, demand, LRU, NOW)
    shuffled = list(fleet)
    random.Random(7).shuffle(shuffled)
    assert plan(shuffled, catalogue, list(reversed(demand)), LRU, NOW) == first
    assert len(first.actions) == 8


def test_applied_plan_asks_for_nothing_more() -> None:
    fleet, catalogue = fragmented()
    catalogue["p"] = spec("p", 1, pinned_on=["n2"])
    policy = Policy("priority", defrag_after_cycles=1)
    first = plan(fleet, catalogue, want("x"), policy, NOW, min_replicas={"c": 1})
    after = apply_plan(fleet, first, NOW)
    assert first.actions and plan(after, catalogue, want("x"), policy, NOW).actions == ()
    assert {r.model for r in after[0].replicas} == {"b", "x"}
    assert after[0].memory_free == 0


# -- minimums against priority


def test_a_higher_priority_minimum_takes_a_lower_one_below_its_minimum() -> None:
    fleet = [neuron("n", 4, rep("low", 3))]
    catalogue = cat(spec("low", 3, priority=0), spec("high", 3, priority=10))
    minimums = {"low": 1, "high": 1}
    result = plan(fleet, catalogue, [], PRIORITY, NOW, min_replicas=minimums)
    assert result.actions == (Unload("low", "n", "evict"), Load("high", "n", 3 * GIB))
    assert "low" in result.unplaceable  # and it says why it stays short


def test_a_minimum_holds_against_equal_or_lower_priority_and_under_lru() -> None:
    fleet = [neuron("n", 4, rep("kept", 3))]
    for catalogue, policy in (
        (cat(spec("kept", 3, priority=10), spec("new", 3, priority=0)), PRIORITY),
        (cat(spec("kept", 3, priority=5), spec("new", 3, priority=5)), PRIORITY),
        (cat(spec("kept", 3, priority=0), spec("new", 3, priority=10)), LRU),
    ):
        result = plan(fleet, catalogue, [], policy, NOW, min_replicas={"kept": 1, "new": 1})
        assert result.actions == ()
        assert "new" in result.unplaceable


def test_minimums_are_placed_highest_priority_first() -> None:
    fleet = [neuron("n", 4)]
    catalogue = cat(spec("a-low", 3, priority=0), spec("z-high", 3, priority=10))
    result = plan(fleet, catalogue, [], PRIORITY, NOW, min_replicas={"a-low": 1, "z-high": 1})
    assert result.actions == (Load("z-high", "n", 3 * GIB),)
