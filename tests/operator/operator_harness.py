"""What the operator tests share: the emulator's client, the real operator run in this event loop,
polling with a deadline, and object builders."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import kmock
from fakes.cluster import CortexCluster

from cortex.core.resources import API_VERSION
from cortex.operator.config import OperatorConfig

NS = "default"
PLACEMENTS = f"{API_VERSION}/modelplacements"
NEURONS = f"{API_VERSION}/neurons"
T = TypeVar("T")

# Tight timings keep the module fast; the behaviour is the same at the defaults.
FAST = OperatorConfig(
    namespaces=(NS,),
    probe_interval=0.25,
    standalone=True,
    unreachable_after=2,
    retry_backoff=30.0,
    api_timeout=5.0,  # kmock drops idle kept-alive connections: a request sent on one hangs
)


async def until(check: Callable[[], T | None], what: str, timeout: float = 15.0) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def probed_twice_more(kube: Kube, name: str = "n1") -> None:
    """Wait until the neuron's status.lastProbe has moved on twice: whole seconds, so at least
    two seconds of the operator's probes and reconciles later (a state held that long)."""
    seen = {kube.status(NEURONS, name)["lastProbe"]}

    def probed_again() -> bool:
        seen.add(kube.status(NEURONS, name)["lastProbe"])
        return len(seen) >= 3

    await until(probed_again, "more probes of the neuron")


async def until_async(check: Callable[[], Awaitable[bool]], what: str, timeout: float) -> None:
    """`until` for a check that has to await (an HTTP call)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


@dataclass
class Kube:
    """The emulator and a client of its HTTP API (writes go through schema validation)."""

    cluster: CortexCluster
    url: str
    http: aiohttp.ClientSession

    async def create(self, resource: str, body: dict[str, Any]) -> dict[str, Any]:
        meta = body.setdefault("metadata", {})
        meta.setdefault("namespace", NS)  # resourceVersion and uid: the emulator's, as a server's
        async with self.http.post(f"{_path(resource)}", json=body) as response:
            answer: dict[str, Any] = await response.json()
            if response.status >= 400:
                raise AssertionError(f"create refused: {answer.get('message')}")
            return answer

    async def patch(self, resource: str, name: str, patch: dict[str, Any]) -> None:
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self.http.patch(f"{_path(resource)}/{name}", json=patch, headers=headers) as r:
            assert r.status < 400, await r.text()

    async def delete(self, resource: str, name: str) -> None:
        async with self.http.delete(f"{_path(resource)}/{name}") as response:
            assert response.status < 400, await response.text()

    def get(self, resource: str, name: str) -> dict[str, Any] | None:
        key = (kmock.resource(resource), NS, name)
        if key not in self.cluster.objects or self.cluster.objects[key].deleted:
            return None
        raw: dict[str, Any] = self.cluster.objects[key].raw
        return raw

    def status(self, resource: str, name: str) -> dict[str, Any]:
        return (self.get(resource, name) or {}).get("status") or {}

    def events(self, name: str) -> list[dict[str, Any]]:
        """Events about the object `name`, oldest first."""
        found = []
        for (resource, _, _), obj in self.cluster.objects.items():
            if resource.plural == "events" and not obj.deleted:
                event = obj.raw
                if event.get("involvedObject", {}).get("name") == name:
                    found.append(event)
        return found

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        conditions = self.status(PLACEMENTS, name).get("conditions", [])
        return next((c for c in conditions if c["type"] == kind), {})


def _path(resource: str) -> str:
    group_version, plural = resource.rsplit("/", 1)
    base = f"/api/{group_version}" if group_version == "v1" else f"/apis/{group_version}"
    return f"{base}/namespaces/{NS}/{plural}"


async def first_of(ready: Awaitable[Any], task: asyncio.Task[None]) -> None:
    """Wait for the operator to be ready; raise its error if it died first."""
    waiter = asyncio.ensure_future(ready)
    done, _ = await asyncio.wait({waiter, task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()
        raise AssertionError("the operator stopped before it was ready")
    if waiter not in done:
        raise AssertionError("the operator was not ready within 30 s")


Operator = Callable[..., contextlib.AbstractAsyncContextManager[None]]


def placement(name: str, model: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "ModelPlacement",
        "metadata": {"name": name},
        "spec": {"model": model, **spec},
    }


def neuron(name: str, endpoint: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "Neuron",
        "metadata": {"name": name},
        "spec": {"endpoint": endpoint, **spec},
    }
