"""A gateway on Kubernetes for tests: kmock's emulator with the project's CRDs over HTTP
(tests/fakes/cluster.py), fake neurons under real uvicorn servers, and the gateway in `--kubernetes`
mode watching the emulator. The test plays the operator: it writes ModelPlacement status."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import kmock
from fakes.cluster import CortexCluster
from fakes.neuron import FakeNeuron, Running, running
from gateway_cluster import FAST, eventually

from cortex.core.catalogue import ModelSpec
from cortex.core.config import GatewayConfig
from cortex.core.kube_api import KubeLogin
from cortex.core.resources import API_VERSION, DEMAND_ANNOTATION, NEURONS, PLACEMENTS
from cortex.gateway.app import create_app
from cortex.gateway.assembly import Gateway, Tuning

NS = "default"
# Long enough that a test never sees the demand renewed: one patch per wait.
KUBE_FAST = replace(FAST, demand_interval=60.0, spend_interval=0.05)
_uids = itertools.count(1)


@dataclass
class Kube:
    """The emulator, and a client of its HTTP API (writes go through the CRDs' schemas)."""

    cluster: CortexCluster
    url: str
    http: httpx.AsyncClient

    async def create(self, plural: str, body: dict[str, Any]) -> None:
        meta = body.setdefault("metadata", {})
        meta.setdefault("namespace", NS)
        meta.setdefault("resourceVersion", "1")
        meta.setdefault("uid", f"uid-{next(_uids)}")
        response = await self.http.post(_path(plural), json=body)
        assert response.status_code < 400, response.text

    async def patch(self, plural: str, name: str, patch: dict[str, Any]) -> None:
        headers = {"Content-Type": "application/merge-patch+json"}
        response = await self.http.patch(f"{_path(plural)}/{name}", json=patch, headers=headers)
        assert response.status_code < 400, response.text

    async def get(self, plural: str, name: str) -> dict[str, Any]:
        response = await self.http.get(f"{_path(plural)}/{name}")
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()
        return found

    async def delete(self, plural: str, name: str) -> None:
        response = await self.http.delete(f"{_path(plural)}/{name}")
        assert response.status_code < 400, response.text

    async def set_replicas(self, name: str, *replicas: tuple[str, str, str]) -> None:
        """Write a placement's status as the operator does: (neuron, endpoint, state) each."""
        listed = [
            {"neuron": n, "endpoint": e, "state": s, "since": "2026-12-01T21:00:00Z"}
            for n, e, s in replicas
        ]
        ready = sum(1 for _, _, s in replicas if s == "ready")
        phase = "Ready" if ready else "Loading" if replicas else "Idle"
        status = {"phase": phase, "replicas": listed, "readyReplicas": ready}
        await self.patch(PLACEMENTS, name, {"status": status})

    def demand_patches(self) -> list[dict[str, Any]]:
        """The bodies of every patch that wrote the demand annotation."""
        return [
            request.data
            for request in list(self.cluster)
            if str(request.method).upper().endswith("PATCH")
            and request.resource is not None
            and request.resource.plural == PLACEMENTS
            and DEMAND_ANNOTATION in str(request.data)
        ]


def _path(plural: str) -> str:
    return f"/apis/{API_VERSION}/namespaces/{NS}/{plural}"


@asynccontextmanager
async def emulator() -> AsyncIterator[Kube]:
    async with CortexCluster() as cluster, kmock.Server(cluster) as server:
        # Stopping waits this long for open watches (aiohttp's default: 60 s) before cutting them.
        server.server.runner._shutdown_timeout = 0.5
        cluster.register(namespaces=(NS,))
        url = str(server.url).rstrip("/")
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            yield Kube(cluster, url, http)


def placement(
    name: str, model: str, *, aliases: Sequence[str] = (), min_replicas: int = 1
) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "ModelPlacement",
        "metadata": {"name": name},
        "spec": {
            "model": model,
            "source": f"file:/models/{model}",
            "aliases": list(aliases),
            "replicas": {"min": min_replicas, "max": max(min_replicas, 1)},
        },
    }


def neuron_object(name: str, endpoint: str, phase: str = "Ready") -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "Neuron",
        "metadata": {"name": name},
        "spec": {"endpoint": endpoint},
        "status": {"phase": phase, "endpoint": endpoint},
    }


@dataclass
class KubeGateway:
    kube: Kube
    served: dict[str, Running]
    gateway: Gateway
    http: httpx.AsyncClient
    neurons: dict[str, FakeNeuron] = field(default_factory=dict)

    def endpoint(self, neuron: str) -> str:
        return self.served[neuron].url

    async def add_neuron(self, name: str, phase: str = "Ready") -> None:
        await self.kube.create(NEURONS, neuron_object(name, self.endpoint(name), phase))


@asynccontextmanager
async def kube_gateway(
    kube: Kube,
    *neurons: FakeNeuron,
    catalogue: Sequence[ModelSpec] = (),
    tuning: Tuning = KUBE_FAST,
    wait_ready: bool = True,
    **sections: dict[str, Any],
) -> AsyncIterator[KubeGateway]:
    """Fake neurons served, then a gateway watching `kube`, ready (/readyz) before it is yielded
    unless told not to wait."""
    async with AsyncExitStack() as stack:
        served = {n.name: await stack.enter_async_context(running(n.app)) for n in neurons}
        gateway_section = {"unhealthy_after": 2, "load_timeout": 60} | sections.pop("gateway", {})
        config = GatewayConfig.model_validate({"gateway": gateway_section, **sections})
        login = KubeLogin(server=kube.url, namespace=NS, token="test-token")
        app = create_app(config, catalogue, tuning=tuning, kubernetes=login)
        live = await stack.enter_async_context(running(app, lifespan="on"))
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=live.url, timeout=30))
        gateway: Gateway = app.state.gateway
        if wait_ready:
            await eventually(gateway.source.routable)
        yield KubeGateway(kube, served, gateway, http, {n.name: n for n in neurons})
