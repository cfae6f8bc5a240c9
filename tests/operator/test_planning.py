"""Planning once per change (operator/cortex/operator/planning.py), as plain functions: a burst of
placement events that changes nothing the planner reads gets one plan, and any real change,
an idle timeout or a backoff's end gets a new one."""

from __future__ import annotations

import random

import pytest
from test_reconcile import GIB, NOW, answer, fleet, mp, nr, probe

import cortex.operator.planning as planning
from cortex.core.fleet import ModelState
from cortex.core.placement.model import Load, Unload
from cortex.core.resources import PlacementDemand, rfc3339
from cortex.operator.placement_status import placement_status
from cortex.operator.planning import plan_once
from cortex.operator.reconcile import Fleet, FleetPlan, LoadFailure, PendingLoad

NEURONS, PLACEMENTS = 4, 40


def ready_fleet() -> Fleet:
    """PLACEMENTS placements, each Ready on one of NEURONS neurons: nothing left to do."""
    held: dict[str, dict[str, tuple[ModelState, int]]] = {f"n{i}": {} for i in range(NEURONS)}
    for i in range(PLACEMENTS):
        held[f"n{i % NEURONS}"][f"m{i:02d}"] = (ModelState.READY, GIB // 8)
    probes = {name: probe(answer(name, **models)) for name, models in held.items()}
    placements = [mp(f"m{i:02d}", f"m{i:02d}") for i in range(PLACEMENTS)]
    return fleet([nr(name) for name in held], probes, placements)


class Counted:
    """`plan_fleet` as planning.py calls it, counting the plans it computes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.plans = 0
        real = planning.plan_fleet

        def counted(state: Fleet, now: float) -> FleetPlan:
            self.plans += 1
            return real(state, now)

        monkeypatch.setattr(planning, "plan_fleet", counted)


def test_a_burst_of_placement_events_plans_the_namespace_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counted = Counted(monkeypatch)
    state = ready_fleet()
    first, kept = plan_once(None, state, NOW)
    rng = random.Random(9)
    for event in range(300):
        # What the handlers see: each event's placement re-parsed with the status the operator
        # patched on it, listed last as its handler lists it, a moment later.
        name = f"m{rng.randrange(PLACEMENTS):02d}"
        placement = next(p for p in state.placements if p.metadata.name == name)
        patched = placement_status(placement, state, first, NOW + event / 10)
        fresh = mp(name, name, status=patched.wire())
        others = [p for p in state.placements if p.metadata.name != name]
        seen = Fleet(state.neurons, state.probes, (*others, fresh), state.pending)
        planned, kept = plan_once(kept, seen, NOW + event / 10)
        assert planned is first
    assert counted.plans == 1


def test_each_change_the_planner_reads_plans_again(monkeypatch: pytest.MonkeyPatch) -> None:
    counted = Counted(monkeypatch)
    state = ready_fleet()
    _, kept = plan_once(None, state, NOW)
    assert kept is not None and counted.plans == 1
    new_placement = Fleet(state.neurons, state.probes, (*state.placements, mp("extra", "extra")))
    planned, after = plan_once(kept, new_placement, NOW)
    assert planned.plan.actions == (Load("extra", "n0", 0),)  # the least full neuron
    assert after is None  # a plan with actions is carried out, never kept
    pending = {("extra", "n0"): PendingLoad("extra", "n0", 0, NOW)}
    loading = Fleet(new_placement.neurons, new_placement.probes, new_placement.placements, pending)
    planned, kept = plan_once(None, loading, NOW)
    assert planned.plan.actions == () and kept is not None
    spec_change = mp("m01", "m01", priority=2)
    respec = [spec_change if p.metadata.name == "m01" else p for p in loading.placements]
    lost = dict(loading.probes, n3=probe(loading.probes["n3"].status, failures=2))
    demanded = mp("m02", "m02", annotations=PlacementDemand(at=rfc3339(NOW)).annotation())
    redemand = [demanded if p.metadata.name == "m02" else p for p in loading.placements]
    before = counted.plans
    for changed in (
        Fleet(loading.neurons, loading.probes, tuple(respec), pending),
        Fleet(loading.neurons, lost, loading.placements, pending),
        Fleet(
            (*loading.neurons[:3], nr("n3", cordoned=True)),
            loading.probes,
            loading.placements,
            pending,
        ),
        Fleet(loading.neurons, loading.probes, tuple(redemand), pending),
        Fleet(loading.neurons, loading.probes, loading.placements),  # the load landed
    ):
        plan_once(kept, changed, NOW)
    assert counted.plans == before + 5


def test_a_kept_plan_ends_when_an_idle_timeout_passes() -> None:
    probes = {"a": probe(answer("a", lazy=(ModelState.READY, GIB)))}  # loaded at NOW - 10
    lazy = mp("lazy", "lazy", replicas={"min": 0, "max": 1}, idleTimeout="60s")
    state = fleet([nr("a")], probes, [lazy])
    planned, kept = plan_once(None, state, NOW)
    assert planned.plan.actions == () and kept is not None and kept.until == NOW + 50
    assert plan_once(kept, state, NOW + 49)[0] is planned
    later, _ = plan_once(kept, state, NOW + 51)
    assert later.plan.actions == (Unload("lazy", "a", "idle"),)


def test_a_kept_plan_ends_when_a_backoff_ends() -> None:
    failure = LoadFailure("a", "weights are corrupt", 1, NOW - 1, NOW + 20, 3)
    state = fleet(
        [nr("a")], {"a": probe(answer("a"))}, [mp("bad", "bad")], failures={"bad": failure}
    )
    planned, kept = plan_once(None, state, NOW)
    assert planned.plan.actions == () and kept is not None and kept.until == NOW + 20
    assert plan_once(kept, state, NOW + 19)[0] is planned
    assert plan_once(kept, state, NOW + 21)[0].plan.actions == (Load("bad", "a", 0),)
