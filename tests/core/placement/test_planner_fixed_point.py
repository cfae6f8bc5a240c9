"""Plans are fixed points: applying one leaves the next plan nothing to do. These are the
counterexamples the property test (test_planner_properties.py) found, kept as plain cases."""

from __future__ import annotations

from cortex.core.catalogue import ModelSpec
from cortex.core.fleet import ModelState
from cortex.core.placement.model import Demand, NeuronView, Policy, ReplicaView
from cortex.core.placement.planner import apply_plan, plan

NOW = 1000.0
ZONE = {"zone": "a"}


def spec(model: str, memory: int, priority: int = 0, pins: tuple[str, ...] = ()) -> ModelSpec:
    return ModelSpec(
        id=model, source=f"file:/m/{model}", memory=memory, priority=priority, pinned_on=list(pins)
    )


def assert_fixed_point(fleet, catalogue, demand, policy, minimums) -> None:
    first = plan(fleet, catalogue, demand, policy, NOW, min_replicas=minimums)
    after = apply_plan(fleet, first, NOW)
    assert plan(after, catalogue, demand, policy, NOW, min_replicas=minimums).actions == ()


def test_a_lower_priority_minimum_does_not_keep_a_higher_priority_demand_out() -> None:
    catalogue = {m: spec(m, size) for m, size in (("m0", 1), ("m1", 1), ("m2", 2))}
    catalogue["m5"] = spec("m5", 2, priority=-1)
    fleet = (NeuronView("n0", 3, 3, labels=ZONE), NeuronView("n1", 3, 3, labels=ZONE))
    demand = (Demand("m0"), Demand("m1"), Demand("m2"))
    assert_fixed_point(fleet, catalogue, demand, Policy("priority"), {"m5": 1})


def test_defrag_moves_a_load_the_same_plan_made() -> None:
    catalogue = {m: spec(m, 1) for m in ("m0", "m1")} | {"m4": spec("m4", 3)}
    fleet = (
        NeuronView("n0", 3, 3, labels=ZONE),
        NeuronView("n1", 3, 3, labels=ZONE),
        NeuronView("n2", 3, 2, labels=ZONE),
    )
    demand = (Demand("m0"), Demand("m4"))
    assert_fixed_point(fleet, catalogue, demand, Policy("lru", 1), {"m1": 1})


def test_a_pin_that_fits_after_a_later_eviction_is_placed_in_the_same_plan() -> None:
    catalogue = {"m0": spec("m0", 3), "m1": spec("m1", 6)}
    catalogue |= {"m4": spec("m4", 1, pins=("n1",)), "m5": spec("m5", 1, 1, pins=("n1",))}
    busy = ReplicaView("m0", ModelState.READY, 3, in_flight=1)
    idle = ReplicaView("m1", ModelState.READY, 6)
    fleet = (
        NeuronView("n0", 3, 3, labels=ZONE),
        NeuronView("n2", 3, 3, labels=ZONE),
        NeuronView("n1", 9, 0, replicas=(busy, idle), labels=ZONE),
    )
    assert_fixed_point(fleet, catalogue, (), Policy("priority"), {"m1": 1})
