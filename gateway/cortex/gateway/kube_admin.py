"""Fleet control on Kubernetes (docs/fleet-control.md): the operator places, so the admin API writes
what the operator reads, the ModelPlacement's `spec.pinned` and `spec.replicas` and the Neuron's
`spec.cordoned`, and a load waits for the Ready replica the operator then lists."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from cortex.core.admin import AdminDone, LoadProgress
from cortex.core.errors import FleetConflict, NeuronNotFound, NeuronUnavailable
from cortex.core.kube_api import KubeApiError
from cortex.core.resources import ModelPlacement
from cortex.gateway.kube_fleet import NEURON_RESOURCE, PLACEMENT_RESOURCE, KubeFleet

log = logging.getLogger(__name__)


def _placements(kube: KubeFleet, model: str) -> list[ModelPlacement]:
    placements = kube.placements_of(model)
    if not placements:
        raise FleetConflict(f"no ModelPlacement serves {model!r} in namespace {kube.namespace}")
    return placements


async def _patch(kube: KubeFleet, resource: Any, name: str, patch: dict[str, Any]) -> None:
    try:
        await kube.api.merge_patch(resource, kube.namespace, name, patch)
    except KubeApiError as err:
        raise NeuronUnavailable(f"the Kubernetes API refused the change of {name}: {err}") from err


async def cordon(kube: KubeFleet, neuron: str, *, cordoned: bool) -> AdminDone:
    """Write the Neuron's spec.cordoned; the operator places nothing new there."""
    if neuron not in kube.neurons:
        raise NeuronNotFound(f"no Neuron named {neuron!r} in namespace {kube.namespace}")
    await _patch(kube, NEURON_RESOURCE, neuron, {"spec": {"cordoned": cordoned}})
    log.info("%s Neuron %s (by hand)", "cordoned" if cordoned else "uncordoned", neuron)
    return AdminDone(action="cordon" if cordoned else "uncordon", neurons=[neuron])


async def pin(kube: KubeFleet, model: str, *, pinned: bool) -> AdminDone:
    """Write spec.pinned of the model's placements: the operator keeps a replica, where it
    chooses (a placement's pin names no neuron)."""
    names = [p.metadata.name for p in _placements(kube, model)]
    for name in names:
        await _patch(kube, PLACEMENT_RESOURCE, name, {"spec": {"pinned": pinned}})
    log.info("%s %s (ModelPlacement %s, by hand)", "pinned" if pinned else "unpinned", model, names)
    return AdminDone(action="pin" if pinned else "unpin", model=model, neurons=[])


async def load(kube: KubeFleet, model: str, timeout: float) -> AsyncIterator[bytes]:
    """Ask for at least one replica (spec.replicas.min), then report until the operator lists a
    Ready one, or the load timeout passes."""
    placements = _placements(kube, model)
    if not any(p.spec.floor for p in placements):
        first = placements[0]
        replicas = {"min": 1, "max": max(first.spec.replicas.max, 1)}
        await _patch(
            kube, PLACEMENT_RESOURCE, first.metadata.name, {"spec": {"replicas": replicas}}
        )
    return _wait_ready(kube, model, time.monotonic() + timeout)


async def _wait_ready(kube: KubeFleet, model: str, deadline: float) -> AsyncIterator[bytes]:
    while True:
        change = kube.next_change()  # taken before looking: no change slips by
        if kube.ready(model):
            break
        if time.monotonic() > deadline:
            error = f"no Ready replica of {model!r} by the load timeout"
            yield _line(LoadProgress(model=model, state="failed", error=error))
            return
        state, where = kube.availability(model)
        neuron = where[0] if state == "loading" and where else None
        yield _line(LoadProgress(model=model, neuron=neuron, state="loading"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(change.wait(), 0.5)  # a new picture, or the next line
    ready = kube.ready(model)[0]
    yield _line(LoadProgress(model=model, neuron=ready, state="ready", progress=1.0))


def _line(progress: LoadProgress) -> bytes:
    return progress.model_dump_json(exclude_none=True).encode() + b"\n"
