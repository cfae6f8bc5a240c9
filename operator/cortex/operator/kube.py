"""The operator's own calls to the Kubernetes API beyond what kopf does for a handler: creating and
correcting the Neuron objects that stand for neuron pods, writing a Neuron's status and Events from
the probe loop (probing.py), and reading the peering object it asks whether this peer is active.

They go through kopf's authenticated client, so they use whatever login kopf made (service
account, kubeconfig, or a test's `@kopf.on.login`) and its retries; that client is not part of
kopf's public API, which is why every use of it is in this module."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf
from kopf._cogs.clients import api, errors, events
from kopf._cogs.structs import bodies, references
from kopf._core.engines import peering

from cortex.core.resources import API_VERSION, NEURONS

EVENTS = references.Resource(group="", version="v1", plural="events", namespaced=True)

log = logging.getLogger(__name__)


def _url(namespace: str, name: str | None = None) -> str:
    url = f"/apis/{API_VERSION}/namespaces/{namespace}/{NEURONS}"
    return f"{url}/{name}" if name else url


async def create_neuron(
    settings: kopf.OperatorSettings, namespace: str, body: dict[str, Any]
) -> bool:
    """Create a Neuron; False when one of that name exists already (another event won)."""
    try:
        await api.post(_url(namespace), payload=body, settings=settings, logger=log)
    except errors.APIConflictError:
        return False
    return True


async def patch_neuron(
    settings: kopf.OperatorSettings, namespace: str, name: str, patch: dict[str, Any]
) -> None:
    """Merge-patch a Neuron's spec or metadata."""
    await _merge_patch(settings, _url(namespace, name), patch)


async def _merge_patch(settings: kopf.OperatorSettings, url: str, payload: dict[str, Any]) -> None:
    await api.patch(
        url,
        payload=payload,
        headers={"Content-Type": "application/merge-patch+json"},
        settings=settings,
        logger=log,
    )


def peer_identity(name: str) -> peering.Identity:
    """`name` as the identity kopf records this process under in the peering objects."""
    return peering.Identity(name)


async def patch_neuron_status(
    settings: kopf.OperatorSettings, namespace: str, name: str, status: dict[str, Any]
) -> bool:
    """Merge-patch a Neuron's status; False when the Neuron is gone."""
    try:
        await _merge_patch(settings, f"{_url(namespace, name)}/status", {"status": status})
    except errors.APINotFoundError:
        return False
    return True


async def post_event(
    settings: kopf.OperatorSettings, about: kopf.Body, type: str, reason: str, message: str
) -> None:
    """A Kubernetes Event about an object, as kopf posts one for a handler."""
    await events.post_event(
        ref=bodies.build_object_reference(about),
        type=type,
        reason=reason,
        message=message,
        resource=EVENTS,
        settings=settings,
        logger=log,
    )


@dataclass(frozen=True)
class PeerEntry:
    """One peer a kopf peering object lists, read as kopf reads it."""

    identity: str
    priority: int
    alive: bool


async def peers(
    settings: kopf.OperatorSettings, name: str, namespace: str | None
) -> list[PeerEntry] | None:
    """The peers a kopf peering object lists, parsed by kopf's own Peer (a missing lastseen is
    now, a naive one UTC); None when there is no such object."""
    if namespace is None:
        url = f"/apis/kopf.dev/v1/clusterkopfpeerings/{name}"
    else:
        url = f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings/{name}"
    try:
        body = await api.get(url, settings=settings, logger=log)
    except errors.APINotFoundError:
        return None
    return parse_peers(body.get("status") or {})


def parse_peers(status: Mapping[str, Any]) -> list[PeerEntry]:
    found = []
    for identity, info in status.items():
        try:
            peer = peering.Peer(identity=peering.Identity(identity), **info)
            found.append(PeerEntry(identity, int(peer.priority), not peer.is_dead))
        except (TypeError, ValueError):
            continue  # not a peer entry kopf writes
    return found
