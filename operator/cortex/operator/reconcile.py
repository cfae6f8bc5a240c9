"""Reconcile decisions for one namespace: the fleet snapshot in, the planner's actions out (and
each ModelPlacement's status from them, placement_status.py). Pure: no I/O, no clocks (time is
`now`), same input, same answer.

The snapshot is the neurons' own /status answers (probes), never the operator's memory of what it
did, so a restarted operator plans from what is really loaded. Three things only this process
knows are laid over it: loads it has asked for that no probe shows yet (`pending`), placements
whose last load failed and are waiting out their backoff (`failures`), and the sizes neurons
refusing a load for room said models need (`sizes`, shortfall.py)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from cortex.core.catalogue import ModelSpec
from cortex.core.fleet import LoadedModel, ModelState
from cortex.core.placement.model import (
    Action,
    Demand,
    Load,
    NeuronView,
    Plan,
    Policy,
    Unload,
)
from cortex.core.placement.planner import plan
from cortex.core.placement.snapshot import NeuronReport, Reservations, snapshot
from cortex.core.resources import (
    ModelPlacement,
    Neuron,
    PlacementDemand,
    parse_rfc3339,
)
from cortex.operator.neurons import Probe
from cortex.operator.rollout import Stale, rollout_steps, spare_replicas, stale_replicas
from cortex.operator.shortfall import MAX_PLANS, LearntSize, replica_memory

# Higher priority wins: lower-priority replicas give way first, then the least recently used.
POLICY = Policy(strategy="priority")
# A deleted placement's replicas still serving requests hold its deletion this long (seconds);
# then they are unloaded anyway, so a client that keeps a replica busy cannot hold it forever.
DELETION_GRACE = 300.0
# Gateways renew a demand every 5 s while clients wait for the model (docs/kubernetes.md, "The
# demand annotation"); one not renewed for this long (seconds) has nobody waiting and is ignored.
# Twelve renewals: the gateways' clocks and the operator's may disagree by a few seconds.
DEMAND_TTL = 60.0
LIVE = frozenset({ModelState.READY, ModelState.LOADING})


@dataclass(frozen=True)
class PendingLoad:
    """A load this operator asked a neuron for and no probe shows yet."""

    model: str
    neuron: str
    memory: int
    since: float


@dataclass(frozen=True)
class LoadFailure:
    """The last failed load of a placement; no new load is tried before `retry_at`. It holds for
    the spec it was asked under (`generation`): an edited spec is tried at once."""

    neuron: str
    reason: str
    attempts: int
    at: float
    retry_at: float
    generation: int | None  # the placement's metadata.generation when the load was asked
    # Refused for room with a size the plan did not know (shortfall.py): planned again at once
    # with that size, and it may evict for it, unlike a broken model's failure.
    room: bool = False


def load_failure(
    before: LoadFailure | None,
    neuron: str,
    reason: str,
    generation: int | None,
    now: float,
    backoff: Callable[[int], float],
    *,
    learnt: bool = False,
) -> LoadFailure:
    """What a failed load records: its attempt in a row under this spec, and when the next may
    come. A refusal for room that said more than the plan gave the load (`learnt`) is planned
    again at once, up to MAX_PLANS in a row; any other failure waits `backoff(attempts)` and
    evicts nothing."""
    again = before is not None and before.generation == generation
    attempts = before.attempts + 1 if before is not None and again else 1
    room = learnt and attempts <= MAX_PLANS
    wait = 0.0 if room else backoff(attempts)
    return LoadFailure(neuron, reason, attempts, now, now + wait, generation, room)


@dataclass(frozen=True)
class Unloaded:
    """The last time the operator unloaded a placement's replica, and why."""

    neuron: str
    reason: Literal["Evicted", "Idle"]
    message: str
    at: float


@dataclass(frozen=True)
class Fleet:
    """One namespace as the operator sees it at one moment."""

    neurons: tuple[Neuron, ...]
    probes: Mapping[str, Probe]  # by Neuron name
    placements: tuple[ModelPlacement, ...]  # not being deleted
    pending: Mapping[tuple[str, str], PendingLoad] = field(default_factory=dict)  # (model, neuron)
    failures: Mapping[str, LoadFailure] = field(default_factory=dict)  # by placement name
    unloaded: Mapping[str, Unloaded] = field(default_factory=dict)  # by placement name
    sizes: Mapping[str, LearntSize] = field(default_factory=dict)  # by placement name
    # spec.model -> the id a neuron loaded it as: an alias, refused rather than loaded again
    aliases: Mapping[str, str] = field(default_factory=dict)
    unreachable_after: int = 2

    def reachable(self, neuron: Neuron) -> Probe | None:
        """The neuron's last probe while it answers; None too for a Neuron without endpoint."""
        if not neuron.spec.endpoint:
            return None
        probe = self.probes.get(neuron.metadata.name)
        return probe if probe is not None and probe.reachable(self.unreachable_after) else None

    def owner(self, model: str) -> str | None:
        """The name of the placement that places `model`, without sorting them all."""
        first = min(
            (p for p in self.placements if p.spec.model == model), key=seniority, default=None
        )
        return first.metadata.name if first is not None else None

    @cached_property
    def owners(self) -> dict[str, ModelPlacement]:
        """model -> the placement that places it (the oldest when two name one model); computed
        once per snapshot."""
        owners: dict[str, ModelPlacement] = {}
        for placement in sorted(self.placements, key=seniority):
            owners.setdefault(placement.spec.model, placement)
        return owners


def seniority(placement: ModelPlacement) -> tuple[float, bool, str]:
    """Of two placements of one model the first created places it, so a later one never takes
    it over. creationTimestamp has whole seconds: in a tie the one already placing it (a status
    that is not Refused) stays, then the first by name."""
    created = placement.metadata.creation_timestamp
    status = placement.status
    newcomer = status is None or status.phase == "Refused"
    return (parse_rfc3339(created) if created else 0.0, newcomer, placement.metadata.name)


@dataclass(frozen=True)
class FleetPlan:
    """What to do now, and why some placements cannot have what they ask."""

    plan: Plan
    views: tuple[NeuronView, ...]
    blocked: frozenset[str]  # placements backing off after a failed load
    excess: tuple[Unload, ...] = ()  # replicas above a placement's replicas.max
    replaced: tuple[Unload, ...] = ()  # replicas of a model a placement's spec.model left
    stale: tuple[Stale, ...] = ()  # replicas an edited spec no longer describes (rollout.py)
    rolling: tuple[Action, ...] = ()  # the rollouts' unloads, and replacements made in place

    @property
    def steps(self) -> tuple[Action, ...]:
        """Every action, in the order they are carried out: what a changed spec.model left goes
        first, the planner's loads before the stale replicas they replace, the excess last."""
        return (*self.replaced, *self.plan.actions, *self.rolling, *self.excess)


def outdated_failures(
    failures: Mapping[str, LoadFailure], placements: Iterable[ModelPlacement]
) -> list[str]:
    """Placements whose spec changed since their failed load was asked (a new generation): the
    failure was the old spec's, so the new one is tried at once, its attempts counted afresh. A
    status or metadata write leaves the generation, and so the failure, as it is."""
    generations = {p.metadata.name: p.metadata.generation for p in placements}
    return sorted(
        name
        for name, failure in failures.items()
        if name in generations and generations[name] != failure.generation
    )


def unprobed(fleet: Fleet) -> list[str]:
    """Neurons with an endpoint that have not been probed yet. Planning waits for them: a replica
    they hold is invisible until then, and planning without it would load a duplicate."""
    return sorted(
        n.metadata.name
        for n in fleet.neurons
        if n.spec.endpoint and n.metadata.name not in fleet.probes
    )


def unanswered(fleet: Fleet) -> list[str]:
    """Neurons with an endpoint that have not answered yet and are not unreachable: what they
    hold is unknown, so a deletion waits for them rather than leave a replica behind."""
    waiting = []
    for neuron in fleet.neurons:
        probe = fleet.probes.get(neuron.metadata.name)
        if neuron.spec.endpoint and (
            probe is None or (probe.status is None and probe.failures < fleet.unreachable_after)
        ):
            waiting.append(neuron.metadata.name)
    return sorted(waiting)


def unload_forced(placement: ModelPlacement, now: float) -> bool:
    """A deleted placement's replicas are unloaded even when busy once DELETION_GRACE is over."""
    deleted = placement.metadata.deletion_timestamp
    return deleted is not None and now - parse_rfc3339(deleted) >= DELETION_GRACE


def successor(placement: ModelPlacement, placements: Iterable[ModelPlacement]) -> str | None:
    """Another placement of the same model, not being deleted: a deleted placement leaves its
    replicas to it (a refused duplicate, or a rename as delete and create)."""
    return min(
        (
            p.metadata.name
            for p in placements
            if p.spec.model == placement.spec.model
            and p.metadata.name != placement.metadata.name
            and not p.metadata.deletion_timestamp
        ),
        default=None,
    )


def neuron_views(fleet: Fleet) -> tuple[NeuronView, ...]:
    """The planner's view of each neuron (the shared snapshot): its last probe, with loads asked
    for and not yet visible reserved. An unreachable neuron is unhealthy: its replicas no longer
    count, so the planner places them again elsewhere."""
    reports = []
    for neuron in sorted(fleet.neurons, key=lambda n: n.metadata.name):
        probe = fleet.probes.get(neuron.metadata.name)
        reports.append(
            NeuronReport(
                name=neuron.metadata.name,
                status=probe.status if probe is not None else None,
                healthy=fleet.reachable(neuron) is not None,
                cordoned=neuron.spec.cordoned,
                labels=neuron.labels,
            )
        )
    arriving = {(p.neuron, p.model): p.memory for p in fleet.pending.values()}
    return tuple(snapshot(reports, Reservations(arriving=arriving)))


def live_neurons(views: tuple[NeuronView, ...]) -> dict[str, list[str]]:
    """model -> the healthy neurons where it is ready or loading, in the views' order. One pass
    over every replica: scanning the views once per model costs placements x replicas."""
    live: dict[str, list[str]] = {}
    for view in views:
        if not view.healthy:
            continue
        for replica in view.replicas:
            if replica.state in LIVE:
                names = live.setdefault(replica.model, [])
                if not names or names[-1] != view.name:
                    names.append(view.name)
    return live


def alias_refusal(model: str, canonical: str) -> str:
    """Why a placement naming an alias is not placed: the neurons report the canonical id."""
    return f"spec.model {model} is an alias of {canonical}: use {canonical}"


def replaced_model(placement: ModelPlacement) -> str | None:
    """The model the placement placed before its spec.model changed (the CRD forbids it, a
    cluster without CEL does not), as its status records it; None when it is spec.model."""
    before = placement.status.model if placement.status is not None else None
    return before if before and before != placement.spec.model else None


def active_demand(placement: ModelPlacement, now: float) -> PlacementDemand | None:
    """The demand annotation, unless it is older than DEMAND_TTL (nobody renews it: no client
    waits any more) or than the placement's last Ready transition (that demand was served)."""
    demand = PlacementDemand.from_annotations(placement.metadata.annotations)
    if demand is None or now - demand.at_seconds > DEMAND_TTL:
        return None
    loaded = placement.status.condition("Loaded") if placement.status else None
    served = loaded is not None and loaded.status == "True"
    if (
        served
        and loaded is not None
        and parse_rfc3339(loaded.last_transition_time) > demand.at_seconds
    ):
        return None
    return demand


def plan_fleet(fleet: Fleet, now: float) -> FleetPlan:
    """Run the shared planner over the namespace's neurons and placements."""
    views = neuron_views(fleet)
    owners = fleet.owners
    blocked = backing_off(fleet, now)
    everywhere = live_neurons(views)
    held = held_replicas(fleet, owners)
    catalogue: dict[str, ModelSpec] = {}
    minimums: dict[str, int] = {}
    demand: list[Demand] = []
    replaced: list[Unload] = []
    stale: dict[str, tuple[Stale, ...]] = {}
    fresh: dict[str, int] = {}  # fresh replicas a rolling model wants ready before stale ones go
    for model, placement in owners.items():
        if model in fleet.aliases:
            continue  # its replicas are reported under another id: loading it never ends
        old = replaced_model(placement)
        if old is not None and old not in owners and old in everywhere:
            # The old model goes first, the new one is placed once it is gone: both may not fit.
            replaced += [Unload(old, name, "evict") for _, name in spare_replicas(views, old)]
            continue
        spec = placement.spec
        live = everywhere.get(model, [])
        catalogue[model] = ModelSpec(
            id=model,
            source=spec.source or "",
            aliases=spec.aliases,
            memory=replica_memory(placement, fleet.sizes.get(placement.metadata.name)),
            min_devices=spec.resources.devices,
            pinned_on=live if spec.pinned else [],
            priority=spec.priority,
            idle_ttl=spec.idle_seconds,
        )
        if found := stale_replicas(placement, held.get(model, ())):
            stale[model] = found
            fresh[model] = max(wanted(placement, now), 1)
        if placement.metadata.name in blocked:
            # Keep what it has, ask for nothing new until the backoff is over.
            minimums[model] = min(spec.floor, len(live))
            continue
        # A rolling model wants its replacements beside the stale replicas, which still count.
        minimums[model] = fresh[model] + len(found) if found else spec.floor
        demanded = active_demand(placement, now)
        if demanded is not None:
            demand.append(Demand(model, max(demanded.waiting, 1)))
    selectors = {
        model: p.spec.neuron_selector.match_labels
        for model, p in owners.items()
        if p.spec.neuron_selector.match_labels
    }
    # A placement whose last load failed evicts nothing until a load succeeds: each retry would
    # otherwise take a healthy replica's place and give it back when the load fails. Not so one
    # refused for room that said its size: it is planned with that size (shortfall.py).
    failing = {p.spec.model for p in owners.values() if is_failing(fleet, p.metadata.name)}
    # A replacement beside its stale replica goes into free memory only: with no room for both,
    # the stale one is replaced in place rather than another model evicted for a while.
    surging = {model for model, found in stale.items() if any(s.in_place for s in found)}
    planned = plan(
        views,
        catalogue,
        demand,
        POLICY,
        now,
        min_replicas=minimums,
        selectors=selectors,
        room_only=failing | surging,
    )
    excess = _excess(views, everywhere, owners, planned, stale)
    sizes = {model: catalogue[model].memory for model in stale}
    rolling = rollout_steps(views, stale, fresh, planned, sizes=sizes, failing=failing, now=now)
    found = tuple(s for model in sorted(stale) for s in stale[model])
    return FleetPlan(planned, views, blocked, excess, tuple(replaced), found, rolling)


def held_replicas(
    fleet: Fleet, owners: Mapping[str, ModelPlacement]
) -> dict[str, list[tuple[Neuron, LoadedModel]]]:
    """model -> its live replicas on reachable, healthy neurons, as they report them, for the
    models whose spec names a source or a selector (the only ones a spec edit can make stale)."""
    models = {
        model
        for model, p in owners.items()
        if p.spec.source is not None or p.spec.neuron_selector.match_labels
    }
    held: dict[str, list[tuple[Neuron, LoadedModel]]] = {}
    if not models:
        return held
    for neuron in sorted(fleet.neurons, key=lambda n: n.metadata.name):
        probe = fleet.reachable(neuron)
        answer = probe.status if probe is not None else None
        if answer is None or not answer.healthy:
            continue
        for loaded in answer.models:
            if loaded.id in models and loaded.state in LIVE:
                held.setdefault(loaded.id, []).append((neuron, loaded))
    return held


def settled_failures(fleet: Fleet, planned: FleetPlan, now: float) -> list[str]:
    """Placements whose failed load no longer matters: its backoff is over and they have the
    ready replicas they want (none, for a min-0 placement nobody waits for)."""
    if not fleet.failures:
        return []
    ready = Counter(
        r.model
        for view in planned.views
        if view.healthy
        for r in view.replicas
        if r.state == ModelState.READY
    )
    return sorted(
        p.metadata.name
        for p in fleet.placements
        if p.metadata.name in fleet.failures
        and p.metadata.name not in planned.blocked
        and ready[p.spec.model] >= wanted(p, now)
    )


def wanted(placement: ModelPlacement, now: float) -> int:
    """Ready replicas the placement asks for now: its floor, or one while a client waits."""
    return max(placement.spec.floor, 1 if active_demand(placement, now) is not None else 0)


def is_failing(fleet: Fleet, name: str) -> bool:
    """The placement's last load failed, and not for room with a size learnt from it."""
    failure = fleet.failures.get(name)
    return failure is not None and not failure.room


def backing_off(fleet: Fleet, now: float) -> frozenset[str]:
    """Placements whose last load failed and whose backoff has not ended at `now`."""
    waiting = {name for name, failure in fleet.failures.items() if failure.retry_at > now}
    if not waiting:
        return frozenset()  # the usual case, without sorting every placement into `owners`
    return frozenset(p.metadata.name for p in fleet.owners.values() if p.metadata.name in waiting)


def _excess(
    views: tuple[NeuronView, ...],
    live: Mapping[str, list[str]],
    owners: Mapping[str, ModelPlacement],
    planned: Plan,
    stale: Mapping[str, tuple[Stale, ...]],
) -> tuple[Unload, ...]:
    """The planner never adds beyond a minimum or one demanded replica, but a neuron that answers
    again after its replica was placed elsewhere brings one more: above `replicas.max`, loading
    replicas go first (the neuron's unload cancels the load; a ready replica keeps serving), then
    the least recently used idle ready ones. A rollout's stale replicas are not counted: their
    replacements may stand beside them for a while, and the rollout unloads them."""
    change: dict[str, int] = {}
    for action in planned.actions:
        change[action.model] = change.get(action.model, 0) + (1 if isinstance(action, Load) else -1)
    excess: list[Unload] = []
    for model, placement in owners.items():
        rolled = {s.neuron for s in stale.get(model, ())}
        have = len(live.get(model, ())) + change.get(model, 0) - len(rolled)
        over = have - placement.spec.replicas.max
        if over <= 0:
            continue
        leaving = {a.neuron for a in planned.actions if isinstance(a, Unload) and a.model == model}
        leaving |= rolled
        spare = [(o, name) for o, name in spare_replicas(views, model) if name not in leaving]
        excess += [Unload(model, name, "evict") for _, name in spare[:over]]
    return tuple(excess)
