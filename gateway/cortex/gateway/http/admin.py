"""Fleet control (docs/fleet-control.md): list, load, unload, pin and unpin models, cordon and
uncordon neurons, list the API keys with what they spent, and reset a key's spend. Behind the admin key when [auth]
is on, open when it is off, as GET /fleet is.

A static fleet is changed through this gateway's placer (the one that places on demand), so a
load by hand is reserved like a planned one. On Kubernetes the operator places: these calls write
the ModelPlacement and Neuron objects it reads (kube_admin.py); an unload, or a load on a chosen
neuron, answers 501 there."""

from __future__ import annotations

import asyncio
import difflib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from cortex.core.admin import (
    AdminDone,
    AdminKey,
    AdminKeys,
    AdminLoad,
    AdminModel,
    AdminModels,
    AdminNeuron,
    AdminPin,
    AdminReplica,
    AdminUnload,
    LoadProgress,
)
from cortex.core.catalogue import ModelSpec
from cortex.core.errors import (
    CortexError,
    FleetConflict,
    KeyNotFound,
    NeuronNotFound,
    NotSupported,
)
from cortex.core.fleet import LoadedModel, ModelState
from cortex.gateway import kube_admin
from cortex.gateway.assembly import Gateway
from cortex.gateway.http.access import authenticate_admin, gateway_of
from cortex.gateway.kube_fleet import KubeFleet
from cortex.gateway.registry import NeuronHandle

log = logging.getLogger(__name__)

router = APIRouter(prefix="/admin", dependencies=[Depends(authenticate_admin)])

PROGRESS_INTERVAL = 0.5  # seconds between a streamed load's progress lines
_detached: set[asyncio.Task[Any]] = set()  # loads whose caller left: they finish anyway


@router.get("/models")
async def models(request: Request) -> AdminModels:
    return listing(gateway_of(request))


def listing(gateway: Gateway) -> AdminModels:
    """Every catalogue model and every neuron, with what keeps each model where it is."""
    return AdminModels(
        mode="static" if gateway.kubernetes is None else "kubernetes",
        models=[_model(gateway, spec) for spec in gateway.catalogue.specs()],
        neurons=[
            AdminNeuron(name=name, healthy=gateway.fleet.healthy(name), cordoned=handle.cordoned)
            for name, handle in gateway.fleet.neurons.items()
        ],
    )


def _model(gateway: Gateway, spec: ModelSpec) -> AdminModel:
    card = gateway.model_card(spec)
    replicas = [
        _replica(handle, loaded, spec)
        for handle in gateway.fleet.neurons.values()
        if (loaded := handle.model(spec.id)) is not None
    ]
    return AdminModel(
        id=spec.id,
        kind=spec.kind,
        state=card.state,
        aliases=list(spec.aliases),
        pinned_on=list(spec.pinned_on),
        idle_ttl=spec.idle_ttl,
        replicas=replicas,
        last_error=card.last_error,
    )


def _replica(handle: NeuronHandle, loaded: LoadedModel, spec: ModelSpec) -> AdminReplica:
    """A replica and when its idle TTL takes it, as the planner reckons it (planner.py)."""
    pinned = handle.name in spec.pinned_on
    touched = max(
        (t for t in (loaded.last_used, handle.last_used.get(spec.id)) if t is not None),
        default=loaded.loaded_at,
    )
    idle = spec.idle_ttl is not None and not pinned and loaded.state == ModelState.READY
    return AdminReplica(
        neuron=handle.name,
        state=loaded.state,
        progress=loaded.progress,
        memory_bytes=loaded.memory_bytes,
        in_flight=max(loaded.in_flight, handle.in_flight[spec.id]),
        pinned=pinned,
        last_used=touched,
        expires_at=touched + spec.idle_ttl if idle and touched and spec.idle_ttl else None,
    )


# -- changes (a static fleet's)


def _static(gateway: Gateway, what: str) -> None:
    if gateway.kubernetes is not None:
        raise NotSupported(
            f"{what}: on Kubernetes the operator places models; edit the ModelPlacement "
            "(spec.replicas, spec.pinned) instead (docs/kubernetes.md)"
        )


def _kube(gateway: Gateway) -> KubeFleet | None:
    """The watched CRDs on Kubernetes, else None (a static fleet)."""
    if gateway.kubernetes is None:
        return None
    assert isinstance(gateway.source, KubeFleet)
    return gateway.source


def _handle(gateway: Gateway, name: str) -> NeuronHandle:
    handle = gateway.fleet.neurons.get(name)
    if handle is None:
        hint = _guess(name, gateway.fleet.neurons)
        raise NeuronNotFound(f"no neuron named {name!r}{hint}", param="neuron")
    return handle


def _guess(name: str, names: Iterable[str]) -> str:
    """`; did you mean x?` for the closest of `names`, else nothing."""
    close = difflib.get_close_matches(name, list(names), n=1)
    return f"; did you mean {close[0]}?" if close else ""


@router.get("/keys")
async def keys(request: Request) -> AdminKeys:
    """Every API key with its limits and what it spent; never the key itself."""
    gateway = gateway_of(request)
    now = time.time()
    return AdminKeys(
        auth=gateway.auth.enabled,
        keys=[gateway.ledger.standing(p, now) for p in gateway.auth.principals()],
    )


@router.post("/keys/{name:path}/reset")
async def reset_key(name: str, request: Request) -> AdminKey:
    """Forget what the key spent, so its budget is whole again; answers where it stands now."""
    gateway = gateway_of(request)
    principals = {p.name: p for p in gateway.auth.principals()}
    principal = principals.get(name)
    if principal is None:
        hint = _guess(name, principals)
        raise KeyNotFound(f"no API key named {name!r}{hint}", param="name")
    await gateway.ledger.reset(name)
    log.info("key %r: its spend was reset through the admin API", name)
    return gateway.ledger.standing(principal, time.time())


@router.post("/models/{model:path}/load")
async def load(model: str, request: Request, body: AdminLoad | None = None) -> StreamingResponse:
    """Load on the named neuron, else where the planner says; streams NDJSON progress lines."""
    gateway = gateway_of(request)
    spec = gateway.catalogue.resolve(model)
    neuron = body.neuron if body is not None else None
    kube = _kube(gateway)
    if kube is not None:
        if neuron is not None:
            _static(gateway, "load on a chosen neuron")
        lines = await kube_admin.load(kube, spec.id, gateway.config.gateway.load_timeout)
        return StreamingResponse(lines, media_type="application/x-ndjson")
    if neuron is not None:
        handle = _handle(gateway, neuron)
        if handle.cordoned:
            raise FleetConflict(f"neuron {neuron} is cordoned: it takes no new loads")
        if neuron not in gateway.placer.catalogue.loadable_on(spec.id):
            raise FleetConflict(f"neuron {neuron} cannot load {spec.id!r}")
        gateway.placer.check_room(spec.id, neuron)
    lines = _progress(gateway, spec.id, neuron)
    return StreamingResponse(lines, media_type="application/x-ndjson")


async def _progress(gateway: Gateway, model: str, neuron: str | None) -> AsyncIterator[bytes]:
    placer = gateway.placer
    task: asyncio.Task[Any] = asyncio.create_task(
        placer.load_on(model, neuron)
        if neuron is not None
        else placer.place(model, patience=gateway.config.gateway.load_timeout)
    )
    where = neuron
    try:
        while True:
            where = neuron or next(iter(placer.loading(model)), where)
            yield _line(LoadProgress(model=model, neuron=where, state="loading",
                                     progress=_progress_on(gateway, model, where)))  # fmt: skip
            done, _ = await asyncio.wait({task}, timeout=PROGRESS_INTERVAL)
            if done:
                break
            if where is not None:  # fresher than the lifecycle's poll, for a bar that moves
                await gateway.fleet.refresh(where)
        result = task.result()
    except CortexError as err:
        yield _line(LoadProgress(model=model, neuron=where, state="failed", error=err.message))
        return
    finally:
        if not task.done():  # the caller left: the load goes on, as asked
            _detached.add(task)
            task.add_done_callback(_detached.discard)
    where = result if isinstance(result, str) else neuron
    yield _line(LoadProgress(model=model, neuron=where, state="ready", progress=1.0))


def _progress_on(gateway: Gateway, model: str, neuron: str | None) -> float:
    handle = gateway.fleet.neurons.get(neuron) if neuron is not None else None
    loaded = handle.model(model) if handle is not None else None
    return loaded.progress if loaded is not None and loaded.state == ModelState.LOADING else 0.0


def _line(progress: LoadProgress) -> bytes:
    return progress.model_dump_json(exclude_none=True).encode() + b"\n"


@router.post("/models/{model:path}/unload")
async def unload(model: str, request: Request, body: AdminUnload | None = None) -> AdminDone:
    """Unload from the named neuron, else from every neuron holding it."""
    gateway = gateway_of(request)
    _static(gateway, "unload")
    spec = gateway.catalogue.resolve(model)
    body = body or AdminUnload()
    if body.neuron is not None:
        _handle(gateway, body.neuron)
        names = [body.neuron]
    else:
        names = [n for n, h in gateway.fleet.neurons.items() if _holds(h, spec.id)]
    for name in names:
        if name in spec.pinned_on:
            raise FleetConflict(f"{spec.id!r} is pinned on {name}: unpin it first")
        if not _holds(gateway.fleet[name], spec.id):
            raise FleetConflict(f"{spec.id!r} is not loaded on {name}")
    if not names:
        raise FleetConflict(f"{spec.id!r} is not loaded anywhere")
    for name in names:
        await gateway.placer.unload_from(spec.id, name, force=body.force)
    return AdminDone(action="unload", model=spec.id, neurons=names)


def _holds(handle: NeuronHandle, model: str) -> bool:
    """The neuron has the model loaded, loading or unloading; a failed load's record is not a
    replica (a later load there that succeeds replaces it)."""
    loaded = handle.model(model)
    return loaded is not None and loaded.state != ModelState.FAILED


@router.post("/models/{model:path}/pin")
async def pin(model: str, body: AdminPin, request: Request) -> AdminDone:
    """Keep the model loaded on the neuron: the lifecycle loads it there and never unloads it."""
    return await _pin(gateway_of(request), model, body.neuron, pinned=True)


@router.post("/models/{model:path}/unpin")
async def unpin(model: str, body: AdminPin, request: Request) -> AdminDone:
    return await _pin(gateway_of(request), model, body.neuron, pinned=False)


async def _pin(gateway: Gateway, model: str, neuron: str, *, pinned: bool) -> AdminDone:
    spec = gateway.catalogue.resolve(model)
    kube = _kube(gateway)
    if kube is not None:
        return await kube_admin.pin(kube, spec.id, pinned=pinned)
    _handle(gateway, neuron)
    where = set(spec.pinned_on) | {neuron} if pinned else set(spec.pinned_on) - {neuron}
    gateway.placer.catalogue.pins[spec.id] = sorted(where)
    log.info("%s %s on %s (by hand)", "pinned" if pinned else "unpinned", spec.id, neuron)
    return AdminDone(action="pin" if pinned else "unpin", model=spec.id, neurons=sorted(where))


@router.post("/neurons/{neuron}/cordon")
async def cordon(neuron: str, request: Request) -> AdminDone:
    """No new loads on the neuron; what runs there keeps serving."""
    return await _cordon(gateway_of(request), neuron, cordoned=True)


@router.post("/neurons/{neuron}/uncordon")
async def uncordon(neuron: str, request: Request) -> AdminDone:
    return await _cordon(gateway_of(request), neuron, cordoned=False)


async def _cordon(gateway: Gateway, neuron: str, *, cordoned: bool) -> AdminDone:
    kube = _kube(gateway)
    if kube is not None:
        return await kube_admin.cordon(kube, neuron, cordoned=cordoned)
    _handle(gateway, neuron).cordoned = cordoned
    log.info("%s %s (by hand)", "cordoned" if cordoned else "uncordoned", neuron)
    return AdminDone(action="cordon" if cordoned else "uncordon", neurons=[neuron])
