"""The planner's snapshot: what neurons last reported, plus this caller's reservations, as views.

Inputs are plain so every caller can build them: one `NeuronReport` per neuron (its last
`/status` answer as `cortex.core.fleet.NeuronStatus`, or None when it has not answered yet; the
caller's own verdict on its health and cordon; its labels; and, optionally, the requests this
caller is sending it right now), and the caller's `Reservations`: loads it has started that the
neuron may not report yet, and replicas it is unloading. The gateway builds reports from its
polls, the operator from Neuron objects' status. `snapshot()` is pure: same input, same views.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cortex.core.fleet import LoadedModel, ModelState, NeuronStatus
from cortex.core.placement.model import Action, Load, NeuronView, ReplicaView, Usage

_NOTHING_ARRIVING: Mapping[str, int] = {}


@dataclass(frozen=True)
class NeuronReport:
    """What a caller knows of one neuron; `in_flight`/`last_used`: its own requests, which a
    `/status` answer may predate (unix seconds); `usage`: its requests per model, decayed;
    `asked_at`: when the `/status` was asked for; `finished`: when the caller's last request on
    each model ended (unix seconds)."""

    name: str
    status: NeuronStatus | None
    healthy: bool = True
    cordoned: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    in_flight: Mapping[str, int] = field(default_factory=dict)
    last_used: Mapping[str, float] = field(default_factory=dict)
    usage: Mapping[str, Usage] = field(default_factory=dict)
    asked_at: float | None = None
    finished: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Reservations:
    """Actions a caller has chosen and not finished: loads arriving (bytes reserved) and replicas
    leaving, by (neuron, model). A value: every change returns a new one."""

    arriving: Mapping[tuple[str, str], int] = field(default_factory=dict)
    leaving: frozenset[tuple[str, str]] = frozenset()

    def reserve(self, actions: Iterable[Action]) -> Reservations:
        """These actions are under way: a Load holds its memory, an Unload's replica is leaving."""
        arriving, leaving = dict(self.arriving), set(self.leaving)
        for action in actions:
            if isinstance(action, Load):
                arriving[(action.neuron, action.model)] = action.memory
            else:
                leaving.add((action.neuron, action.model))
        return Reservations(arriving, frozenset(leaving))

    def release(self, neuron: str, model: str) -> Reservations:
        """The action on (neuron, model) finished, failed or was abandoned."""
        key = (neuron, model)
        if key not in self.arriving and key not in self.leaving:
            return self
        arriving = {k: v for k, v in self.arriving.items() if k != key}
        return Reservations(arriving, self.leaving - {key})

    def arriving_on(self, neuron: str) -> dict[str, int]:
        """Models arriving on `neuron`, with the bytes reserved for each."""
        return {model: memory for (name, model), memory in self.arriving.items() if name == neuron}

    def is_leaving(self, neuron: str, model: str) -> bool:
        return (neuron, model) in self.leaving


def snapshot(
    reports: Iterable[NeuronReport], reservations: Reservations | None = None
) -> list[NeuronView]:
    """Planner views of the neurons that have answered a `/status`, in the order given."""
    reserved = reservations or Reservations()
    arriving: dict[str, dict[str, int]] = {}
    for (neuron, model), memory in reserved.arriving.items():
        arriving.setdefault(neuron, {})[model] = memory
    return [
        _neuron_view(report, arriving.get(report.name, _NOTHING_ARRIVING), reserved)
        for report in reports
        if report.status is not None
    ]


def _neuron_view(
    report: NeuronReport, arriving: Mapping[str, int], reservations: Reservations
) -> NeuronView:
    """One neuron's view: reported replicas, plus reserved loads it does not report yet."""
    status = report.status
    assert status is not None
    reported = {loaded.id for loaded in status.models}
    replicas = [_replica_view(report, loaded, reservations) for loaded in status.models]
    # A load the neuron already reports holds its memory in the report: count it once.
    unseen = {model: memory for model, memory in arriving.items() if model not in reported}
    replicas += [ReplicaView(model, ModelState.LOADING, memory) for model, memory in unseen.items()]
    return NeuronView(
        name=report.name,
        memory_total=sum(d.memory_total for d in status.devices),
        memory_free=sum(d.memory_free for d in status.devices if d.healthy) - sum(unseen.values()),
        replicas=tuple(replicas),
        healthy=report.healthy and status.healthy,
        cordoned=report.cordoned,
        labels=dict(report.labels),
    )


def _replica_view(
    report: NeuronReport, loaded: LoadedModel, reservations: Reservations
) -> ReplicaView:
    """A reported replica; one this caller is unloading shows as unloading (never chosen again)."""
    local_used = report.last_used.get(loaded.id)
    used = [t for t in (loaded.last_used, local_used) if t is not None]
    leaving = reservations.is_leaving(report.name, loaded.id) and loaded.state == ModelState.READY
    polled = loaded.in_flight + loaded.queued
    finished = report.finished.get(loaded.id)
    if finished is not None and report.asked_at is not None and finished > report.asked_at:
        # Asked while a request of the caller's still ran, which has ended since: the count is
        # stale, and the caller's own count is the news (the next poll brings the others').
        polled = 0
    return ReplicaView(
        model=loaded.id,
        state=ModelState.UNLOADING if leaving else loaded.state,
        memory=loaded.memory_bytes,
        # The report may predate requests this caller just sent: take the larger count.
        in_flight=max(polled, report.in_flight.get(loaded.id, 0)),
        last_used=max(used) if used else None,
        loaded_at=loaded.loaded_at,
        usage=report.usage.get(loaded.id),
    )
