"""A ModelPlacement's status from one reconcile's snapshot and plan (reconcile.py): its replicas
as the probes show them, its phase, and its Scheduled, Loaded and UpToDate conditions. Pure, like
reconcile.py: no I/O, time is `now`."""

from __future__ import annotations

from typing import Literal, cast

from cortex.core.resources import (
    ModelPlacement,
    ModelPlacementStatus,
    PlacementPhase,
    PlacementReplica,
    ReplicaState,
    rfc3339,
)
from cortex.operator.conditions import set_condition
from cortex.operator.reconcile import (
    LIVE,
    Fleet,
    FleetPlan,
    LoadFailure,
    Unloaded,
    alias_refusal,
    replaced_model,
    wanted,
)
from cortex.operator.rollout import Stale


def placement_status(
    placement: ModelPlacement, fleet: Fleet, planned: FleetPlan, now: float
) -> ModelPlacementStatus:
    """The placement's status: its replicas as the probes show them, phase and conditions."""
    previous = placement.status or ModelPlacementStatus()
    owner = fleet.owner(placement.spec.model)
    if owner is not None and owner != placement.metadata.name:
        return _refused(placement, previous, owner, now)
    replicas = _replicas(placement, fleet, previous, now)
    ready = sum(r.state == "ready" for r in replicas)
    loading = sum(r.state == "loading" for r in replicas)
    name = placement.metadata.name
    want = wanted(placement, now)
    failure = fleet.failures.get(name)
    # Past its backoff a failure only counts while the placement still wants a replica; a
    # refusal for room that said the model's size is no broken model: it is planned with it.
    failing = (
        failure is not None
        and not failure.room
        and (name in planned.blocked or (ready == 0 and want > 0))
    )
    room = failure if failure is not None and failure.room and ready < want else None
    generation = placement.metadata.generation
    old = replaced_model(placement)
    placed = old if old is not None and old not in fleet.owners and _held(fleet, old) else None
    conditions = list(previous.conditions)
    for verdict in (
        _scheduled(placement, fleet, planned, replicas, want, placed),
        _loaded(ready, loading, want, failure if failing else room, fleet.unloaded.get(name), now),
    ):
        conditions = set_condition(conditions, *verdict, now, generation)
    stale = [s for s in planned.stale if s.model == placement.spec.model]
    if stale or previous.condition("UpToDate") is not None:
        conditions = set_condition(conditions, *_up_to_date(stale, failing), now, generation)
    return ModelPlacementStatus(
        phase=_phase(want, ready, loading, failing),
        model=placed or placement.spec.model,
        replicas=replicas,
        ready_replicas=ready,
        conditions=conditions,
        observed_generation=generation,
    )


Verdict = tuple[str, Literal["True", "False"], str, str]  # condition type, status, reason, message


def _refused(
    placement: ModelPlacement, previous: ModelPlacementStatus, owner: str, now: float
) -> ModelPlacementStatus:
    """A second placement of a model places nothing: the replicas are its owner's."""
    why = f"model {placement.spec.model} is placed by ModelPlacement {owner}"
    generation = placement.metadata.generation
    conditions = list(previous.conditions)
    for kind in ("Scheduled", "Loaded"):
        conditions = set_condition(conditions, kind, "False", "Duplicate", why, now, generation)
    return ModelPlacementStatus(
        phase="Refused", conditions=conditions, observed_generation=generation
    )


def _scheduled(
    placement: ModelPlacement,
    fleet: Fleet,
    planned: FleetPlan,
    replicas: list[PlacementReplica],
    want: int,
    replacing: str | None,
) -> Verdict:
    model = placement.spec.model
    if replacing is not None:
        why = f"spec.model changed from {replacing}: unloading {replacing} before placing {model}"
        return ("Scheduled", "False", "ModelChanged", why)
    if model in fleet.aliases:
        return ("Scheduled", "False", "Unschedulable", alias_refusal(model, fleet.aliases[model]))
    if model in planned.plan.unplaceable:
        return ("Scheduled", "False", "Unschedulable", planned.plan.unplaceable[model])
    where = ", ".join(r.neuron for r in replicas if r.state != "failed")
    if where:
        return ("Scheduled", "True", "Scheduled", f"placed on {where}")
    idle = "nothing to place: min is 0 and no client is waiting"
    return ("Scheduled", "True", "Scheduled", idle if want == 0 else "placing")


def _up_to_date(stale: list[Stale], failing: bool) -> Verdict:
    """Whether every replica matches the spec; while one does not, the rollout and what it waits
    for (docs/kubernetes.md, "Editing a placement")."""
    if not stale:
        return ("UpToDate", "True", "RolledOut", "every replica matches the spec")
    whys = "; ".join(f"{s.neuron}: {s.why}" for s in stale)
    waiting = "its load failed, the old replicas serve meanwhile" if failing else "in progress"
    why = f"replacing {len(stale)} replica(s) ({whys}): {waiting}"
    return ("UpToDate", "False", "Replacing", why)


def _loaded(
    ready: int,
    loading: int,
    want: int,
    failure: LoadFailure | None,
    unloaded: Unloaded | None,
    now: float,
) -> Verdict:
    if failure is not None and failure.room and not loading:
        why = f"{failure.neuron} refused it for room: {failure.reason}; planned again with its size"
        return ("Loaded", "False", "NoRoom", why)
    if failure is not None and not failure.room:
        retry = max(failure.retry_at - now, 0)
        why = (
            f"{failure.neuron}: {failure.reason} (attempt {failure.attempts}, next in {retry:.0f}s)"
        )
        return ("Loaded", "False", "LoadFailed", why)
    if ready and ready >= want:
        return ("Loaded", "True", "Loaded", f"{ready} replica(s) ready")
    if loading:
        return ("Loaded", "False", "Loading", f"{ready} of {want} ready, {loading} loading")
    if want == 0 and unloaded is not None and not ready:
        return ("Loaded", "False", unloaded.reason, unloaded.message)
    if want == 0:
        return ("Loaded", "False", "Idle", "no replica loaded; min is 0, one loads on demand")
    return (
        "Loaded",
        "False",
        "Loading",
        f"{ready} of {want} ready; waiting for a neuron with room",
    )


def _replicas(
    placement: ModelPlacement, fleet: Fleet, previous: ModelPlacementStatus, now: float
) -> list[PlacementReplica]:
    """One entry per reachable, healthy neuron holding (or loading) the model; `since` kept while
    the state stays. Replicas on unreachable or unhealthy (draining) neurons are left out."""
    model = placement.spec.model
    before = {(r.neuron, r.state): r.since for r in previous.replicas}
    replicas = []
    for neuron in sorted(fleet.neurons, key=lambda n: n.metadata.name):
        name = neuron.metadata.name
        probe = fleet.reachable(neuron)
        if probe is None or probe.status is None or not probe.status.healthy:
            continue
        state: ReplicaState | None = next(
            (cast(ReplicaState, m.state.value) for m in probe.status.models if m.id == model), None
        )
        if state is None and (model, name) in fleet.pending:
            state = "loading"
        if state is None:
            continue
        since = before.get((name, state)) or rfc3339(now)
        replicas.append(
            PlacementReplica(neuron=name, endpoint=probe.endpoint, state=state, since=since)
        )
    return replicas


def _held(fleet: Fleet, model: str) -> bool:
    """Some reachable, healthy neuron reports the model ready or loading."""
    for neuron in fleet.neurons:
        probe = fleet.reachable(neuron)
        answer = probe.status if probe is not None else None
        if (
            answer is not None
            and answer.healthy
            and any(m.id == model and m.state in LIVE for m in answer.models)
        ):
            return True
    return False


def _phase(want: int, ready: int, loading: int, failing: bool) -> PlacementPhase:
    if ready and ready >= want:
        return "Ready"
    if failing and not ready:
        return "Failed"
    if want == 0 and not loading:
        return "Idle"
    if loading:
        return "Loading"
    return "Degraded" if ready else "Pending"
