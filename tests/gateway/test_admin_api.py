"""Fleet control through the gateway's admin API (docs/fleet-control.md), against fake neurons:
list, load with streamed progress, unload, pin, cordon, the errors, and the admin key."""

from __future__ import annotations

import asyncio
import json

import httpx
from fakes.neuron import FakeNeuron, GiB
from gateway_cluster import cluster, eventually, spec

from cortex.core.admin import GatewayAdmin, LoadProgress

CATALOGUE = [spec("chat-a", idle_ttl=600), spec("chat-b")]


def two_neurons() -> tuple[FakeNeuron, FakeNeuron]:
    return FakeNeuron("n1", loaded={"chat-a": GiB}), FakeNeuron("n2")


async def test_list_shows_every_model_with_replicas_and_expiry() -> None:
    async with cluster(*two_neurons(), catalogue=CATALOGUE) as c:
        body = (await c.http.get("/admin/models")).json()
        models = {m["id"]: m for m in body["models"]}
        assert set(models) == {"chat-a", "chat-b"}
        assert models["chat-b"]["state"] == "available" and models["chat-b"]["replicas"] == []
        (replica,) = models["chat-a"]["replicas"]
        assert replica["neuron"] == "n1" and replica["state"] == "ready"
        assert models["chat-a"]["idle_ttl"] == 600
        assert replica["expires_at"] > replica["last_used"]
        assert [n["name"] for n in body["neurons"]] == ["n1", "n2"]


async def test_load_streams_progress_then_ready_on_the_chosen_neuron() -> None:
    n1, n2 = two_neurons()
    n2.faults.load_gate = asyncio.Event()
    async with cluster(n1, n2, catalogue=CATALOGUE) as c:
        lines: list[dict[str, object]] = []
        async with c.http.stream(
            "POST", "/admin/models/chat-b/load", json={"neuron": "n2"}
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("application/x-ndjson")
            async for line in response.aiter_lines():
                lines.append(json.loads(line))
                if lines[-1]["progress"] == 0.5:  # the neuron's progress came through
                    n2.faults.load_gate.set()
        moving = {"model": "chat-b", "neuron": "n2", "state": "loading", "progress": 0.5}
        assert moving in lines
        assert lines[-1] == {"model": "chat-b", "neuron": "n2", "state": "ready", "progress": 1.0}
        assert [load.model for load in n2.loads] == ["chat-b"] and n1.loads == []


async def test_load_without_a_neuron_goes_where_the_planner_says() -> None:
    async with cluster(*two_neurons(), catalogue=CATALOGUE) as c:
        admin = GatewayAdmin(c.url)
        lines = [line async for line in admin.load("chat-b")]
        await admin.aclose()
        assert lines[-1] == LoadProgress(
            model="chat-b", neuron="n2", state="ready", progress=1.0
        )  # worst fit: the emptier neuron


async def test_failed_load_ends_with_an_error_line() -> None:
    n1, n2 = two_neurons()
    n2.faults.load_error = "weights corrupt"
    async with cluster(n1, n2, catalogue=CATALOGUE) as c:
        response = await c.http.post("/admin/models/chat-b/load", json={"neuron": "n2"})
        last = json.loads(response.text.splitlines()[-1])
        assert last["state"] == "failed" and "weights corrupt" in last["error"]


async def test_unload_pin_and_cordon() -> None:
    n1, n2 = two_neurons()
    async with cluster(n1, n2, catalogue=CATALOGUE) as c:
        unloaded = await c.http.post("/admin/models/chat-a/unload", json={})
        assert unloaded.json() == {"action": "unload", "model": "chat-a", "neurons": ["n1"]}
        assert n1.unloads == ["chat-a"]
        again = await c.http.post("/admin/models/chat-a/unload")
        assert again.status_code == 409 and "not loaded" in again.json()["error"]["message"]

        pinned = await c.http.post("/admin/models/chat-b/pin", json={"neuron": "n1"})
        assert pinned.json()["neurons"] == ["n1"]
        await eventually(lambda: c.gateway.placer.ready("chat-b") == ["n1"])  # the lifecycle
        refused = await c.http.post("/admin/models/chat-b/unload", json={"neuron": "n1"})
        assert refused.status_code == 409 and "unpin" in refused.json()["error"]["message"]
        await c.http.post("/admin/models/chat-b/unpin", json={"neuron": "n1"})
        assert (await c.http.post("/admin/models/chat-b/unload")).status_code == 200

        assert (await c.http.post("/admin/neurons/n2/cordon")).status_code == 200
        listed = (await c.http.get("/admin/models")).json()["neurons"]
        assert {n["name"]: n["cordoned"] for n in listed} == {"n1": False, "n2": True}
        cordoned = await c.http.post("/admin/models/chat-a/load", json={"neuron": "n2"})
        assert cordoned.status_code == 409 and "cordoned" in cordoned.json()["error"]["message"]
        lines = (await c.http.post("/admin/models/chat-a/load")).text.splitlines()
        assert json.loads(lines[-1])["neuron"] == "n1"  # the planner skips the cordoned one
        await c.http.post("/admin/neurons/n2/uncordon")
        assert not c.gateway.fleet["n2"].cordoned


async def test_unknown_names_are_404_with_a_guess() -> None:
    async with cluster(*two_neurons(), catalogue=CATALOGUE) as c:
        model = await c.http.post("/admin/models/chat-bb/load")
        assert model.status_code == 404
        assert "did you mean chat-b" in model.json()["error"]["message"]
        neuron = await c.http.post("/admin/neurons/n3/cordon")
        assert neuron.status_code == 404 and neuron.json()["error"]["code"] == "neuron_not_found"
        pin = await c.http.post("/admin/models/chat-a/pin", json={"neuron": "nx1"})
        assert pin.status_code == 404


AUTH = {
    "enabled": True,
    "keys": [{"name": "user", "key": "sk-user"}, {"name": "root", "key": "sk-root", "admin": True}],
}


async def test_the_admin_key_guards_every_route() -> None:
    async with cluster(*two_neurons(), catalogue=CATALOGUE, auth=AUTH) as c:
        routes = [
            ("GET", "/admin/models"),
            ("POST", "/admin/models/chat-b/load"),
            ("POST", "/admin/models/chat-a/unload"),
            ("POST", "/admin/neurons/n2/cordon"),
        ]
        for method, path in routes:
            assert (await c.http.request(method, path)).status_code == 401
            user = {"Authorization": "Bearer sk-user"}
            forbidden = await c.http.request(method, path, headers=user)
            assert forbidden.status_code == 403
            error = forbidden.json()["error"]
            assert (error["type"], error["code"]) == ("permission_error", "admin_key_required")
        root = httpx.Headers({"Authorization": "Bearer sk-root"})
        assert (await c.http.get("/admin/models", headers=root)).status_code == 200
        admin = GatewayAdmin(c.url, api_key="sk-root")
        assert (await admin.cordon("n2")).neurons == ["n2"]
        await admin.aclose()


async def test_a_model_id_with_a_slash_is_one_name() -> None:
    async with cluster(*two_neurons(), catalogue=[spec("org/chat-c")]) as c:
        response = await c.http.post("/admin/models/org/chat-c/load", json={"neuron": "n2"})
        assert json.loads(response.text.splitlines()[-1])["state"] == "ready"
        assert [load.model for load in c.neurons["n2"].loads] == ["org/chat-c"]


async def test_a_load_on_a_neuron_without_room_is_409() -> None:
    # A load by hand evicts nothing: on a full neuron the neuron would only refuse it.
    n1 = FakeNeuron("n1", memory=3 * GiB, loaded={"chat-a": 2 * GiB})
    async with cluster(n1, catalogue=CATALOGUE) as c:
        response = await c.http.post("/admin/models/chat-b/load", json={"neuron": "n1"})
        assert response.status_code == 409, response.text
        error = response.json()["error"]
        assert error["code"] == "fleet_conflict" and "1024 MiB free" in error["message"]
        assert n1.loads == [] and "chat-b" not in n1.models


async def test_unloading_a_model_with_only_a_failed_load_is_409() -> None:
    n1, n2 = two_neurons()
    n2.faults.load_error = "weights corrupt"
    n2.available["chat-b"] = GiB  # catalogued there: the failed load stays listed, as failed
    async with cluster(n1, n2, catalogue=CATALOGUE) as c:
        await c.http.post("/admin/models/chat-b/load", json={"neuron": "n2"})
        await eventually(lambda: c.gateway.fleet["n2"].model("chat-b") is not None)
        for body in ({}, {"neuron": "n2"}):
            response = await c.http.post("/admin/models/chat-b/unload", json=body)
            assert response.status_code == 409, response.text
            assert response.json()["error"]["code"] == "fleet_conflict"
        assert n2.unloads == []
