"""The gateway on Kubernetes (docs/kubernetes.md, "The gateway on Kubernetes"): its fleet comes
from the ModelPlacements and Neurons it watches on kmock's emulator, it routes to the Ready replicas
placement status lists, and asks the operator for a cold model with the demand annotation."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from fakes.neuron import FakeNeuron, GiB
from gateway_cluster import chat_body, eventually
from kube_gateway import KUBE_FAST, Kube, emulator, kube_gateway, placement

from cortex.core.client import NeuronClient
from cortex.core.fleet import LoadRequest
from cortex.core.resources import PLACEMENTS, PlacementDemand

MODEL = "tiny-chat"
pytestmark = pytest.mark.asyncio(loop_scope="module")  # the emulator runs on the fixture's loop


@pytest.fixture
async def kube() -> Kube:  # type: ignore[misc]
    async with emulator() as kube:
        yield kube


def serving(name: str) -> FakeNeuron:
    return FakeNeuron(name, loaded={MODEL: 2 * GiB})


async def answers(c: httpx.AsyncClient, model: str, count: int) -> list[str]:
    """Who answered each of `count` requests, one after another."""
    said = []
    for i in range(count):
        response = await c.post("/v1/chat/completions", json=chat_body(model, f"q{i}"))
        assert response.status_code == 200, response.text
        said.append(response.json()["choices"][0]["message"]["content"])
    return said


async def test_routes_to_the_ready_replica_placement_status_lists(kube: Kube) -> None:
    n1, n2 = serving("n1"), serving("n2")
    await kube.create(PLACEMENTS, placement("chat", MODEL))
    async with kube_gateway(kube, n1, n2) as g:
        await g.add_neuron("n1")
        await g.add_neuron("n2")
        await kube.set_replicas("chat", ("n1", g.endpoint("n1"), "ready"))
        await eventually(lambda: g.gateway.replicas.ready(MODEL) == ["n1"])
        # n2 serves the model too, but no placement says so: the operator's word is the fleet.
        assert set(await answers(g.http, MODEL, 4)) == {"Hello from n1."}
        assert not n2.requests


async def test_stops_routing_to_a_replica_the_moment_status_drops_it(kube: Kube) -> None:
    n1, n2 = serving("n1"), serving("n2")
    await kube.create(PLACEMENTS, placement("chat", MODEL))
    # No affinity slack: a second request goes to the idle replica, so both get one.
    async with kube_gateway(kube, n1, n2, tuning=replace(KUBE_FAST, affinity_slack=0)) as g:
        both = (("n1", g.endpoint("n1"), "ready"), ("n2", g.endpoint("n2"), "ready"))
        await kube.set_replicas("chat", *both)
        await eventually(lambda: sorted(g.gateway.replicas.ready(MODEL)) == ["n1", "n2"])
        n1.faults.hold, n2.faults.hold = asyncio.Event(), asyncio.Event()
        held = [
            asyncio.create_task(g.http.post("/v1/chat/completions", json=chat_body(MODEL)))
            for _ in range(2)
        ]
        await eventually(lambda: n1.in_flight() == 1 and n2.in_flight() == 1)
        # Status drops n1 (the operator moves it away): no new request goes there.
        await kube.set_replicas("chat", both[1])
        await eventually(lambda: g.gateway.replicas.ready(MODEL) == ["n2"])
        n2.faults.hold.set()
        before = len(n1.requests)
        assert set(await answers(g.http, MODEL, 6)) == {"Hello from n2."}
        assert len(n1.requests) == before
        # What was already running on n1 finishes there.
        n1.faults.hold.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]


async def test_a_neuron_that_is_not_ready_gets_no_requests(kube: Kube) -> None:
    """A draining neuron (phase Pending: it answers unhealthy) still listed ready by a placement
    status not yet rewritten gets nothing."""
    n1, n2 = serving("n1"), serving("n2")
    await kube.create(PLACEMENTS, placement("chat", MODEL))
    async with kube_gateway(kube, n1, n2, tuning=replace(KUBE_FAST, affinity_slack=0)) as g:
        await g.add_neuron("n1")
        await g.add_neuron("n2", phase="Pending")
        both = (("n1", g.endpoint("n1"), "ready"), ("n2", g.endpoint("n2"), "ready"))
        await kube.set_replicas("chat", *both)
        await eventually(lambda: g.gateway.replicas.ready(MODEL) == ["n1"])
        assert set(await answers(g.http, MODEL, 4)) == {"Hello from n1."}
        assert not n2.requests


async def test_a_cold_model_makes_one_demand_patch_for_fifty_waiting_requests(kube: Kube) -> None:
    n1 = FakeNeuron("n1", available={MODEL: 2 * GiB})
    await kube.create(PLACEMENTS, placement("chat", MODEL, min_replicas=0))
    async with kube_gateway(kube, n1) as g:
        await g.add_neuron("n1")
        started = time.time()
        requests = [
            asyncio.create_task(g.http.post("/v1/chat/completions", json=chat_body(MODEL, f"q{i}")))
            for i in range(50)
        ]
        await eventually(lambda: g.gateway.demand.waiting(MODEL) == 50)
        await eventually(lambda: len(kube.demand_patches()) == 1)
        stored = await kube.get(PLACEMENTS, "chat")
        demand = PlacementDemand.from_annotations(stored["metadata"]["annotations"])
        assert demand is not None and demand.waiting >= 1
        assert started - 1 <= demand.at_seconds <= time.time()
        assert not n1.loads  # the gateway never loads on Kubernetes: the operator places
        # The operator's part: load a replica, then say so in status.
        operator = NeuronClient(g.endpoint("n1"))
        await operator.load(LoadRequest(model=MODEL))
        await operator.aclose()
        await kube.set_replicas("chat", ("n1", g.endpoint("n1"), "ready"))
        done = await asyncio.gather(*requests)
        assert [r.status_code for r in done] == [200] * 50
        assert {r.json()["choices"][0]["message"]["content"] for r in done} == {"Hello from n1."}
        assert len(kube.demand_patches()) == 1
        assert len(n1.loads) == 1  # the operator's


async def test_no_ready_replica_by_the_load_timeout_is_503_with_retry_after(kube: Kube) -> None:
    await kube.create(PLACEMENTS, placement("chat", MODEL, min_replicas=0))
    async with kube_gateway(kube, gateway={"load_timeout": 0.5}) as g:
        response = await g.http.post("/v1/chat/completions", json=chat_body(MODEL))
        assert response.status_code == 503
        assert response.headers["retry-after"] == str(int(KUBE_FAST.retry_after))
        assert response.json()["error"]["code"] == "neuron_unavailable"
        assert len(kube.demand_patches()) == 1


async def test_models_are_the_placements_and_their_aliases_as_they_change(kube: Kube) -> None:
    n1 = serving("n1")
    await kube.create(PLACEMENTS, placement("chat", MODEL, aliases=["tiny", "small-chat"]))
    await kube.create(PLACEMENTS, placement("embed", "tiny-embed", min_replicas=0))
    async with kube_gateway(kube, n1) as g:
        await kube.set_replicas("chat", ("n1", g.endpoint("n1"), "ready"))
        await eventually(lambda: bool(g.gateway.replicas.ready(MODEL)))
        listed = (await g.http.get("/v1/models")).json()["data"]
        cards = {card["id"]: card for card in listed}
        assert set(cards) == {MODEL, "tiny-embed"}  # the default catalogue is not the fleet
        assert cards[MODEL]["aliases"] == ["tiny", "small-chat"]
        assert (cards[MODEL]["state"], cards[MODEL]["locations"]) == ("loaded", ["n1"])
        assert cards["tiny-embed"]["state"] == "available"
        assert await answers(g.http, "tiny", 1) == ["Hello from n1."]
        # Seen without a restart: a new placement, a deleted one.
        await kube.create(PLACEMENTS, placement("late", "late-model", aliases=["later"]))
        await kube.delete(PLACEMENTS, "embed")

        async def ids() -> set[str]:
            return {card["id"] for card in (await g.http.get("/v1/models")).json()["data"]}

        await eventually(
            lambda: {s.id for s in g.gateway.catalogue.specs()} == {MODEL, "late-model"}
        )
        assert await ids() == {MODEL, "late-model"}
        missing = await g.http.post("/v1/chat/completions", json=chat_body("tiny-embed"))
        assert missing.status_code == 404


async def test_a_placement_being_deleted_is_no_longer_routed_or_listed(kube: Kube) -> None:
    """Its finalizer waits for idle replicas: traffic sent to them would hold it forever."""
    n1 = serving("n1")
    held = placement("chat", MODEL)
    held["metadata"]["finalizers"] = ["cortex.helexa.ai/finalizer"]  # as the operator's
    await kube.create(PLACEMENTS, held)
    async with kube_gateway(kube, n1) as g:
        await kube.set_replicas("chat", ("n1", g.endpoint("n1"), "ready"))
        await eventually(lambda: g.gateway.replicas.ready(MODEL) == ["n1"])
        await kube.delete(PLACEMENTS, "chat")
        await eventually(lambda: not g.gateway.replicas.ready(MODEL))
        assert (await kube.get(PLACEMENTS, "chat"))["metadata"]["deletionTimestamp"]
        assert (await g.http.get("/v1/models")).json()["data"] == []
        refused = await g.http.post("/v1/chat/completions", json=chat_body(MODEL))
        assert refused.status_code == 404
        assert not n1.requests


async def test_api_keys_from_a_mounted_secret_file_authenticate(kube: Kube, tmp_path: Path) -> None:
    secret = tmp_path / "api-keys"
    secret.mkdir()
    (secret / "team-a").write_text("sk-team-a-from-secret\n")  # Secret files often end in \n
    auth = {
        "enabled": True,
        "keys": [{"name": "team-a", "key_file": str(secret / "team-a"), "models": [MODEL]}],
    }
    n1 = serving("n1")
    await kube.create(PLACEMENTS, placement("chat", MODEL))
    async with kube_gateway(kube, n1, auth=auth) as g:
        await kube.set_replicas("chat", ("n1", g.endpoint("n1"), "ready"))
        await eventually(lambda: bool(g.gateway.replicas.ready(MODEL)))
        body = chat_body(MODEL)
        good = {"Authorization": "Bearer sk-team-a-from-secret"}
        assert (
            await g.http.post("/v1/chat/completions", json=body, headers=good)
        ).status_code == 200
        wrong = {"x-api-key": "sk-someone-else"}
        assert (
            await g.http.post("/v1/chat/completions", json=body, headers=wrong)
        ).status_code == 401
        assert (await g.http.post("/v1/chat/completions", json=body)).status_code == 401
        # The Secret rotated (the kubelet rewrites the file in place): a reload (SIGHUP) reads it.
        (secret / "team-a").write_text("sk-team-a-rotated\n")
        assert await g.gateway.reload(g.gateway.config) == []
        rotated = {"Authorization": "Bearer sk-team-a-rotated"}
        for headers, code in ((rotated, 200), (good, 401)):
            answer = await g.http.post("/v1/chat/completions", json=body, headers=headers)
            assert answer.status_code == code


async def test_ready_once_the_watches_are_up_even_with_nothing_loaded(kube: Kube) -> None:
    await kube.create(PLACEMENTS, placement("chat", MODEL, min_replicas=0))
    async with kube_gateway(kube) as g:
        ready = await g.http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        # No neuron at all: /health is degraded, yet clients must reach the gateway to ask.
        assert (await g.http.get("/health")).json()["status"] == "degraded"
        assert (await g.http.get("/livez")).status_code == 200


async def test_not_ready_while_the_api_server_cannot_be_reached() -> None:
    async with emulator() as kube:
        url = kube.url
    # The emulator is gone: the gateway still starts and lives, but is not ready.
    async with kube_gateway(Kube(kube.cluster, url, kube.http), wait_ready=False) as g:
        assert (await g.http.get("/livez")).status_code == 200
        assert (await g.http.get("/readyz")).status_code == 503


async def test_an_api_server_outage_keeps_the_gateway_ready_on_what_it_last_saw() -> None:
    """The kubelet must not pull every gateway from the Service when the API server goes away:
    the replicas still serve, so /readyz stays 200 and /health says the picture is stale."""
    n1 = serving("n1")
    async with AsyncExitStack() as api_server:
        kube = await api_server.enter_async_context(emulator())
        await kube.create(PLACEMENTS, placement("chat", MODEL))
        async with kube_gateway(kube, n1) as g:
            await g.add_neuron("n1")
            await kube.set_replicas("chat", ("n1", g.endpoint("n1"), "ready"))
            await eventually(lambda: g.gateway.replicas.ready(MODEL) == ["n1"])
            assert (await g.http.get("/health")).json()["fleet_view"] == "current"
            await api_server.aclose()
            await eventually(lambda: not g.gateway.source.current())
            ready = await g.http.get("/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "impaired"
            health = (await g.http.get("/health")).json()
            assert (health["status"], health["fleet_view"]) == ("impaired", "stale")
            assert await answers(g.http, MODEL, 1) == ["Hello from n1."]


async def test_gateway_replicas_side_by_side_count_their_own_in_flight(kube: Kube) -> None:
    n1 = serving("n1")
    n1.faults.hold = asyncio.Event()
    await kube.create(PLACEMENTS, placement("chat", MODEL))
    async with kube_gateway(kube, n1) as a, kube_gateway(kube) as b:
        await a.add_neuron("n1")  # b serves no neuron itself: it learns n1 from the CRDs
        await kube.set_replicas("chat", ("n1", a.endpoint("n1"), "ready"))
        for g in (a, b):
            await eventually(lambda g=g: g.gateway.replicas.ready(MODEL) == ["n1"])  # type: ignore[misc]
        held = [
            asyncio.create_task(g.http.post("/v1/chat/completions", json=chat_body(MODEL)))
            for g in (a, a, b)
        ]
        await eventually(lambda: n1.in_flight() == 3)
        assert a.gateway.fleet["n1"].in_flight[MODEL] == 2
        assert b.gateway.fleet["n1"].in_flight[MODEL] == 1
        n1.faults.hold.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200, 200]
        assert len(kube.demand_patches()) == 0
