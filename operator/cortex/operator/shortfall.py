"""What a neuron's refusal for room teaches the operator (docs/kubernetes.md, "The operator").

A neuron that refuses a load for want of memory says what the model needs (`error.memory`, its
own estimate from the weights' files). A placement without spec.resources.memory is planned with
an unknown size: worst fit sends it to the roomiest neuron and evicts nothing for it. Once a
refusal has said the size, the placement is planned with it: where it fits, or by evicting a
cold replica, or reported too big for every neuron. As the gateway does (its Placer), a refusal
that says more than the plan gave the load is planned again at once, at most MAX_PLANS times in a
row; one that says nothing new is an ordinary failed load, backed off. Pure: no I/O, no clocks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cortex.core.placement.model import NeuronView
from cortex.core.resources import ModelPlacement

# Loads refused for room, in a row, planned again at once with the size each refusal said.
MAX_PLANS = 3

SpecKey = tuple[str, str | None, int | None, int]  # model, source, resources.memory, devices


def spec_key(placement: ModelPlacement) -> SpecKey:
    """The parts of a spec a learnt size is learnt for: an edit of any of them drops it."""
    spec = placement.spec
    return (spec.model, spec.source, spec.resources.memory_bytes, spec.resources.devices)


@dataclass(frozen=True)
class LearntSize:
    """Bytes a neuron's refusal for room said a placement's model needs, for the spec it was
    asked under (`spec`): a new source or new resources may need another size."""

    memory: int
    spec: SpecKey


def learn(before: LearntSize | None, placement: ModelPlacement, needed: int) -> LearntSize | None:
    """The placement's size after a refusal saying it needs `needed` bytes; None when that is no
    more than was known (nothing learnt). Estimates differ by neuron (a dtype per device): the
    largest is kept, a lower bound of what the model takes on any of them."""
    key = spec_key(placement)
    known = before.memory if before is not None and before.spec == key else 0
    known = max(known, placement.spec.resources.memory_bytes or 0)
    return LearntSize(needed, key) if needed > known else None


def learnt_sizes(
    sizes: Mapping[str, LearntSize], placements: Iterable[ModelPlacement]
) -> dict[str, LearntSize]:
    """The learnt sizes that still hold: of placements that are there, for their spec as it is."""
    keys = {p.metadata.name: spec_key(p) for p in placements}
    return {name: size for name, size in sizes.items() if keys.get(name) == size.spec}


def replica_memory(placement: ModelPlacement, learnt: LearntSize | None) -> int | None:
    """Bytes one replica is planned with: the larger of spec.resources.memory and the learnt size.
    The neuron refuses a load below its own estimate whatever the spec says (a load names no
    size), so planning with a smaller one would only be refused again; a larger spec reserves
    headroom. None: unknown (the neuron's refusal will say)."""
    sizes = [placement.spec.resources.memory_bytes]
    if learnt is not None and learnt.spec == spec_key(placement):
        sizes.append(learnt.memory)
    return max((size for size in sizes if size is not None), default=None)


def largest_home(views: Iterable[NeuronView], placement: ModelPlacement) -> int:
    """The most memory one neuron the placement may use holds (healthy, uncordoned, its selector
    matched); 0 when there is none."""
    selector = placement.spec.neuron_selector.match_labels
    return max(
        (
            view.memory_total
            for view in views
            if view.healthy
            and not view.cordoned
            and all(view.labels.get(key) == value for key, value in selector.items())
        ),
        default=0,
    )
