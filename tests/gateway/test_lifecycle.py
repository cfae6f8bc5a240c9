"""Lifecycle (docs/architecture.md) through the gateway: eviction under lru and priority, pins, in-flight
protection, idle unload, defragmentation, and the neuron admin token."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from fakes.neuron import FakeNeuron, GiB
from gateway_cluster import chat_body, cluster, eventually, spec
from prometheus_client.parser import text_string_to_metric_families


def crowded(**loaded_last_used: float) -> FakeNeuron:
    """A 4 GiB neuron full with 2 GiB models last used the given seconds ago."""
    neuron = FakeNeuron("n1", memory=4 * GiB, loaded={m: 2 * GiB for m in loaded_last_used})
    for model, ago in loaded_last_used.items():
        neuron.models[model].last_used = time.time() - ago
    return neuron


@pytest.mark.parametrize(("strategy", "victim"), [("lru", "old"), ("priority", "recent")])
async def test_eviction_victim_depends_on_strategy(strategy: str, victim: str) -> None:
    n1 = crowded(old=100, recent=10)
    catalogue = [spec("old", priority=10), spec("recent", priority=0), spec("cold")]
    async with cluster(n1, catalogue=catalogue, eviction={"strategy": strategy}) as c:
        response = await c.http.post("/v1/chat/completions", json=chat_body("cold"))
        assert response.status_code == 200, response.text
        assert n1.unloads == [victim]
        assert set(n1.models) == {"cold", *({"old", "recent"} - {victim})}
        exposition = (await c.http.get(f"{c.metrics_url}/metrics")).text
        evictions = {
            s.labels["model"]: s.value
            for f in text_string_to_metric_families(exposition)
            for s in f.samples
            if s.name == "cortex_evictions_total" and s.labels["reason"] == "evict"
        }
        assert evictions == {victim: 1.0}


async def test_pinned_model_is_never_evicted() -> None:
    n1 = crowded(pinned=1000, other=1)  # the pin is by far the least recently used
    catalogue = [
        spec("pinned", pinned_on=["n1"]),
        spec("other"),
        spec("cold"),
        spec("big", memory=3 * GiB),
    ]
    async with cluster(n1, catalogue=catalogue) as c:
        response = await c.http.post("/v1/chat/completions", json=chat_body("cold"))
        assert response.status_code == 200
        assert n1.unloads == ["other"]
        # 3 GiB fit only if the pin gave way too, and it will not.
        refused = await c.http.post("/v1/chat/completions", json=chat_body("big"))
        assert refused.status_code == 503
        assert "pinned" in refused.json()["error"]["message"]
        assert refused.headers["retry-after"]
        assert "pinned" in n1.models


async def test_pinned_model_is_loaded_without_any_request() -> None:
    n1 = FakeNeuron("n1")
    async with cluster(n1, catalogue=[spec("pinned", pinned_on=["n1"])]) as c:
        await eventually(lambda: c.gateway.placer.ready("pinned") == ["n1"])
        assert [load.model for load in n1.loads] == ["pinned"]


async def test_model_with_requests_in_flight_is_never_evicted() -> None:
    n1 = crowded(busy=1000, idle=1)  # "busy" is the least recently used, but serving
    gate = n1.faults.hold = asyncio.Event()
    catalogue = [spec("busy"), spec("idle"), spec("cold")]
    async with cluster(n1, catalogue=catalogue) as c:
        held = asyncio.create_task(c.http.post("/v1/chat/completions", json=chat_body("busy")))
        await eventually(lambda: n1.models["busy"].in_flight == 1)
        n1.faults.hold = None  # only the first request is held
        response = await c.http.post("/v1/chat/completions", json=chat_body("cold"))
        assert response.status_code == 200
        assert n1.unloads == ["idle"]
        gate.set()
        assert (await held).status_code == 200


async def test_idle_models_are_unloaded_after_their_ttl() -> None:
    n1 = crowded(stale=120, fresh=5)
    catalogue = [spec("stale", idle_ttl="60s"), spec("fresh", idle_ttl="60s")]
    async with cluster(n1, catalogue=catalogue) as c:
        await eventually(lambda: n1.unloads == ["stale"])
        assert set(n1.models) == {"fresh"}
        counted = 'cortex_evictions_total{model="stale",neuron="n1",reason="idle"} 1.0'
        deadline = time.monotonic() + 5  # counted once the neuron's answer is back
        while counted not in (await c.http.get(f"{c.metrics_url}/metrics")).text:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)


async def test_defragmentation_moves_a_replica_instead_of_evicting() -> None:
    n1 = FakeNeuron("n1", memory=4 * GiB, loaded={"x": 2 * GiB})
    n2 = FakeNeuron("n2", memory=4 * GiB, loaded={"y": 2 * GiB})
    catalogue = [spec("x"), spec("y"), spec("big", memory=3 * GiB)]
    eviction = {"defrag_after_cycles": 1}
    async with cluster(n1, n2, catalogue=catalogue, eviction=eviction) as c:
        response = await c.http.post("/v1/chat/completions", json=chat_body("big"))
        assert response.status_code == 200, response.text
        # One of x and y moved next to the other; nothing was evicted from the fleet.
        everywhere = set(n1.models) | set(n2.models)
        assert everywhere == {"x", "y", "big"}
        assert len(n1.unloads + n2.unloads) == 1


@pytest.mark.parametrize("given", ["value", "file"])
async def test_admin_token_is_sent_on_load_and_unload(given: str, tmp_path: Path) -> None:
    """From `neuron_admin_token`, or from `neuron_admin_token_file` (the chart's gateway: a
    mounted Secret, whose file may end in a newline)."""
    n1 = crowded(old=100)
    n1.admin_token = "s3cret"
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    auth = {"neuron_admin_token": "s3cret"} if given == "value" else {}
    if given == "file":
        auth = {"neuron_admin_token_file": str(token)}
    async with cluster(
        n1,
        catalogue=[spec("old"), spec("a"), spec("b", memory=3 * GiB)],
        auth=auth,
    ) as c:
        assert (await c.http.post("/v1/chat/completions", json=chat_body("a"))).status_code == 200
        assert (await c.http.post("/v1/chat/completions", json=chat_body("b"))).status_code == 200
        assert n1.unloads and n1.admin_headers
        assert set(n1.admin_headers) == {"Bearer s3cret"}
