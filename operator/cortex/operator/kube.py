"""The operator's own writes to the Kubernetes API beyond what kopf patches for a handler: creating
and correcting the Neuron objects that stand for neuron pods.

They go through kopf's authenticated client, so they use whatever login kopf made (service
account, kubeconfig, or a test's `@kopf.on.login`) and its retries; that client is not part of
kopf's public API, which is why every use of it is in this module."""

from __future__ import annotations

import logging
from typing import Any

import kopf
from kopf._cogs.clients import api, errors

from cortex.core.resources import API_VERSION, NEURONS

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
    await api.patch(
        _url(namespace, name),
        payload=patch,
        headers={"Content-Type": "application/merge-patch+json"},
        settings=settings,
        logger=log,
    )
