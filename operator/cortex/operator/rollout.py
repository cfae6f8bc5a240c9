"""Rolling a placement onto its edited spec (docs/kubernetes.md, "Editing a placement").

A replica its placement's spec no longer describes is stale: loaded from another source than
`spec.source` (the neuron's /status names each replica's source), or on a neuron that
`spec.neuronSelector` no longer matches. As a Deployment rolls, a replacement is loaded first,
where the spec allows and into free memory only, and the stale replica is unloaded once enough
fresh ones are ready. Where there is no room for both, a stale replica whose neuron may hold the
new one is replaced in place: unloaded, then loaded again (a gap in service, said in an Event).
Pure, like reconcile.py: the views and the planner's plan in, actions out."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from cortex.core.fleet import LoadedModel, ModelState
from cortex.core.placement.model import Action, Load, NeuronView, Plan, ReplicaView, Unload
from cortex.core.placement.planner import apply_plan
from cortex.core.resources import ModelPlacement, Neuron


@dataclass(frozen=True)
class Stale:
    """A replica its placement's spec no longer describes, and what changed."""

    model: str
    neuron: str
    why: str  # "spec.source file:/a -> file:/b", or the selector its neuron no longer matches
    in_place: bool  # its neuron may hold the replacement (only the source changed)


def stale_replicas(
    placement: ModelPlacement, held: Iterable[tuple[Neuron, LoadedModel]]
) -> tuple[Stale, ...]:
    """The placement's live replicas (`held`: on healthy neurons) its spec no longer describes.
    A placement without spec.source takes whatever source each neuron's catalogue names."""
    spec = placement.spec
    selector = spec.neuron_selector.match_labels
    found = []
    for neuron, loaded in held:
        name = neuron.metadata.name
        matches = all(neuron.labels.get(key) == value for key, value in selector.items())
        if not matches:
            wanted = ", ".join(f"{key}={value}" for key, value in sorted(selector.items()))
            why = f"its neuron no longer matches spec.neuronSelector {wanted}"
        elif spec.source is not None and loaded.source != spec.source:
            why = f"spec.source {loaded.source} -> {spec.source}"
        else:
            continue
        found.append(Stale(spec.model, name, why, in_place=matches))
    return tuple(found)


def rollout_steps(
    views: tuple[NeuronView, ...],
    stale: Mapping[str, tuple[Stale, ...]],
    wanted: Mapping[str, int],
    planned: Plan,
    *,
    sizes: Mapping[str, int | None],
    failing: Collection[str],
    now: float,
) -> tuple[Action, ...]:
    """What the rollouts do besides the planner's loads (which place the replacements that fit):
    unload the stale replicas of a model that has `wanted` fresh ones ready; else, when no
    replacement is on its way for want of room, replace one stale replica in place. A model whose
    new spec failed to load (`failing`) keeps its stale replicas serving."""
    after = apply_plan(views, planned, now)
    steps: list[Action] = []
    for model, replicas in sorted(stale.items()):
        leaving = {s.neuron for s in replicas}
        spare = {name for _, name in spare_replicas(views, model)}
        if _fresh(views, model, leaving, ready_only=True) >= wanted[model]:
            steps += [Unload(model, s.neuron, "evict") for s in replicas if s.neuron in spare]
            continue
        if _fresh(after, model, leaving, ready_only=False) >= wanted[model] or model in failing:
            continue  # the replacement is on its way; or the new spec failed, the old one serves
        movable = [s for s in replicas if s.in_place and s.neuron in spare]
        step = _in_place(after, model, movable, sizes.get(model))
        if step is not None:
            steps += step
    return tuple(steps)


def spare_replicas(
    views: tuple[NeuronView, ...], model: str
) -> list[tuple[tuple[int, float], str]]:
    """The model's replicas that may be unloaded now (loading, or ready and idle) on healthy
    neurons, in the order they go: loading ones first, then the least recently used."""
    return sorted(
        (_unload_order(r), view.name)
        for view in views
        if view.healthy
        for r in view.replicas
        if r.model == model
        and (r.state == ModelState.LOADING or (r.state == ModelState.READY and not r.in_flight))
    )


def _unload_order(replica: ReplicaView) -> tuple[int, float]:
    """Which spare replica goes first: a loading one, then the least recently used."""
    if replica.state == ModelState.LOADING:
        return (0, 0.0)
    return (1, replica.last_used if replica.last_used is not None else replica.loaded_at or 0.0)


def _fresh(
    views: Iterable[NeuronView], model: str, leaving: Collection[str], *, ready_only: bool
) -> int:
    """The model's replicas on healthy neurons that are not stale: ready, or also loading."""
    states = {ModelState.READY} if ready_only else {ModelState.READY, ModelState.LOADING}
    return sum(
        1
        for view in views
        if view.healthy and view.name not in leaving
        for r in view.replicas
        if r.model == model and r.state in states
    )


def _in_place(
    after: tuple[NeuronView, ...], model: str, movable: list[Stale], size: int | None
) -> tuple[Unload, Load] | None:
    """Unload one stale replica and load its replacement on the same neuron, where the new one
    fits in the memory the old one gives back (never more than the neuron has)."""
    views = {view.name: view for view in after}
    for stale in sorted(movable, key=lambda s: s.neuron):
        view = views[stale.neuron]
        held = next((r.memory for r in view.replicas if r.model == model), 0)
        need = size if size is not None else held
        if view.healthy and not view.cordoned and view.memory_free + held >= need:
            return (Unload(model, stale.neuron, "evict"), Load(model, stale.neuron, need))
    return None
