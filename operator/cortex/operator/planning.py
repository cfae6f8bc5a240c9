"""Planning a namespace once per change, not once per event.

Every placement event and every placement timer asks for the namespace's plan, and most of them
change nothing the planner reads: the operator's own status patches come back as events, and a
fleet at rest ticks a timer per placement. `plan_once` keeps the last plan that had nothing left
to do, with the inputs it answered (`plan_key`) and the moment time alone could change it
(`horizon`: the next idle timeout or end of a backoff). While both still hold it is the plan, for
the price of one comparison. A plan with actions is never kept: carrying it out changes the
fleet, so the next reconcile plans again. Pure, like reconcile.py: time is `now`."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from cortex.core.placement.eviction import last_touched
from cortex.core.resources import DEMAND_ANNOTATION
from cortex.operator.reconcile import (
    Fleet,
    FleetPlan,
    active_demand,
    backing_off,
    plan_fleet,
    replaced_model,
)

PlanKey = tuple[object, ...]


@dataclass(frozen=True)
class KeptPlan:
    """A plan with nothing to do, and the inputs and time span it holds for."""

    key: PlanKey
    planned: FleetPlan
    until: float  # from this moment time alone may change the plan (inf: never)


def plan_key(fleet: Fleet, now: float) -> PlanKey:
    """Everything `plan_fleet` reads from the snapshot, as one value to compare. A placement's
    status is left out but for its demand: the operator writes it, and its own patches coming
    back as events must not call for a new plan. The parts are the objects themselves, mostly
    the very ones of the last call, so comparing two keys is mostly identity checks."""
    after = fleet.unreachable_after
    return (
        {n.metadata.name: (n.spec, n.metadata.labels) for n in fleet.neurons},
        {name: (p.status, p.reachable(after)) for name, p in fleet.probes.items()},
        {
            p.metadata.name: (
                p.spec,
                DEMAND_ANNOTATION in p.metadata.annotations and active_demand(p, now),
                replaced_model(p),
            )
            for p in fleet.placements
        },
        frozenset(fleet.pending.items()),
        backing_off(fleet, now),
        # A placement with a failed load evicts nothing, unless it failed for room (shortfall.py).
        frozenset((name, failure.room) for name, failure in fleet.failures.items()),
        frozenset(fleet.sizes.items()),  # sizes neurons refusing a load for room said
        frozenset(fleet.aliases.items()),
    )


def horizon(fleet: Fleet, planned: FleetPlan, now: float) -> float:
    """The first moment after `now` at which time alone changes the plan: a replica's idle
    timeout passing, or a failed placement's backoff ending."""
    ends = [failure.retry_at for failure in fleet.failures.values()]
    idle = {
        model: seconds
        for model, placement in fleet.owners.items()
        if (seconds := placement.spec.idle_seconds) is not None
    }
    for view in planned.views:
        if view.healthy:
            ends += [last_touched(r) + idle[r.model] for r in view.replicas if r.model in idle]
    return min((end for end in ends if end > now), default=math.inf)


def reuse(kept: KeptPlan | None, fleet: Fleet, now: float) -> KeptPlan | None:
    """The kept plan, if it still answers the fleet at `now`; it then keeps this call's key, equal
    but made of the objects just read (re-parsed after a status patch), so that the next call
    compares those by identity instead of field by field."""
    key = plan_key(fleet, now)
    if kept is None or not _holds(kept, key, now):
        return None
    return replace(kept, key=key)


def plan_once(kept: KeptPlan | None, fleet: Fleet, now: float) -> tuple[FleetPlan, KeptPlan | None]:
    """The namespace's plan at `now`, and what to keep for the next call: the kept plan while
    its inputs are unchanged and its horizon not reached, else a new one."""
    key = plan_key(fleet, now)
    if kept is not None and _holds(kept, key, now):
        return kept.planned, replace(kept, key=key)
    planned = plan_fleet(fleet, now)
    if planned.steps:
        return planned, None
    return planned, KeptPlan(key, planned, horizon(fleet, planned, now))


def _holds(kept: KeptPlan, key: PlanKey, now: float) -> bool:
    return now < kept.until and kept.key == key
