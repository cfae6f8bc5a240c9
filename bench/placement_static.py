"""P4's online reference: the best static set of models for known, independent popularities.

With independent requests and known popularities, an online policy can do little better than
keep a fixed set of models resident and serve every other model from a small area it keeps free
for them (for equal sizes, keeping the most popular is the optimal online policy). Here the set is
a multiple knapsack: popularity over the fleet's neurons, one neuron keeping room for the largest
model left out. It is chosen from the true popularities (per phase of a shifting trace), then
replayed on the trace, so its cold loads sit between Belady's and any online policy's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Nodes the packing search may visit per candidate: exact for the bench's 20 models and three
# neurons it is usually exact; beyond it, the best packing found so far.
SEARCH_NODES = 20_000


@dataclass(frozen=True)
class StaticSet:
    """Which neuron holds each kept model, and the neuron that keeps `room` bytes for the rest."""

    homes: Mapping[str, int]
    spare: int
    room: int
    kept_popularity: float


def best_static_set(
    sizes: Mapping[str, int], popularity: Mapping[str, float], neurons: Sequence[int]
) -> StaticSet:
    """The kept set with the most popularity that packs, with room left for any model outside it."""
    best: StaticSet | None = None
    for spare, capacity in enumerate(neurons):
        for room in sorted({size for size in sizes.values() if size <= capacity}):
            # A model larger than the spare room must be kept: it has nowhere else to go.
            forced = [m for m, size in sizes.items() if size > room]
            bins = [c - room if i == spare else c for i, c in enumerate(neurons)]
            found = _pack(sizes, popularity, bins, forced)
            if found is None:
                continue
            homes, kept = found
            if best is None or kept > best.kept_popularity:
                best = StaticSet(homes, spare, room, kept)
    if best is None:
        raise ValueError("no kept set leaves room for the models outside it")
    return best


def _pack(
    sizes: Mapping[str, int],
    popularity: Mapping[str, float],
    bins: list[int],
    forced: list[str],
) -> tuple[dict[str, int], float] | None:
    """Branch and bound: each model to a neuron or out, densest first; forced ones never out."""
    order = sorted(sizes, key=lambda m: (-popularity.get(m, 0.0) / sizes[m], m))
    must = set(forced)
    best: tuple[float, dict[str, int]] | None = None
    nodes = 0

    def bound(index: int, room: int) -> float:
        """Fractional knapsack over the total room left: no packing of the rest does better."""
        extra = 0.0
        for model in order[index:]:
            if room <= 0:
                break
            take = min(sizes[model], room)
            extra += popularity.get(model, 0.0) * take / sizes[model]
            room -= take
        return extra

    def search(index: int, free: list[int], kept: float, homes: dict[str, int]) -> None:
        nonlocal best, nodes
        nodes += 1
        if index == len(order):
            if best is None or kept > best[0]:
                best = (kept, dict(homes))
            return
        if nodes > SEARCH_NODES:
            return
        if best is not None and kept + bound(index, sum(free)) <= best[0]:
            return
        model = order[index]
        tried: set[int] = set()
        for b in sorted(range(len(free)), key=lambda b: free[b]):  # best fit first
            if free[b] >= sizes[model] and free[b] not in tried:
                tried.add(free[b])  # two neurons with the same room are the same choice
                free[b] -= sizes[model]
                homes[model] = b
                search(index + 1, free, kept + popularity.get(model, 0.0), homes)
                del homes[model]
                free[b] += sizes[model]
        if model not in must:
            search(index + 1, free, kept, homes)

    search(0, list(bins), 0.0, {})
    return None if best is None else (best[1], best[0])


def replay_static(
    trace: Sequence[str],
    sizes: Mapping[str, int],
    neurons: Sequence[int],
    phases: Sequence[tuple[int, StaticSet]],
) -> list[str | None]:
    """Per request, the model it loaded cold (None: a hit), keeping each phase's set: a kept model loads on its neuron, any other in
    the spare room, each evicting only models outside the phase's set (least recently used)."""
    resident: list[dict[str, int]] = [{} for _ in neurons]  # model -> last use, per neuron
    free = list(neurons)
    loads: list[str | None] = []
    phase = -1
    for index, model in enumerate(trace):
        while phase + 1 < len(phases) and phases[phase + 1][0] <= index:
            phase += 1
        static = phases[phase][1]
        where = next((b for b, held in enumerate(resident) if model in held), None)
        loads.append(model if where is None else None)
        if where is None:
            where = static.homes.get(model, static.spare)
            outside = sorted(
                (used, m) for m, used in resident[where].items() if m not in static.homes
            )
            while free[where] < sizes[model]:
                if not outside:
                    # The new phase's kept models sit elsewhere: move one of them off its neuron.
                    victim = min(resident[where], key=resident[where].__getitem__)
                else:
                    victim = outside.pop(0)[1]
                del resident[where][victim]
                free[where] += sizes[victim]
            free[where] -= sizes[model]
        resident[where][model] = index
    return loads
