"""Fleet control on Kubernetes (docs/fleet-control.md): the admin API writes the ModelPlacement and
Neuron objects on kmock's emulator, and a load ends when the operator (played by the test) lists a
Ready replica."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fakes.neuron import FakeNeuron, GiB
from gateway_cluster import eventually
from kube_gateway import Kube, emulator, kube_gateway, placement

from cortex.core.resources import NEURONS, PLACEMENTS

MODEL = "tiny-chat"
pytestmark = pytest.mark.asyncio(loop_scope="module")  # the emulator runs on the fixture's loop


@pytest.fixture
async def kube() -> Kube:  # type: ignore[misc]
    async with emulator() as kube:
        yield kube


async def test_cordon_pin_and_load_write_the_objects(kube: Kube) -> None:
    await kube.create(PLACEMENTS, placement("chat", MODEL, min_replicas=0))
    async with kube_gateway(kube, FakeNeuron("n1", loaded={MODEL: GiB})) as g:
        await g.add_neuron("n1")
        await eventually(lambda: "n1" in g.gateway.fleet.neurons)

        assert (await g.http.post("/admin/neurons/n1/cordon")).status_code == 200
        assert (await kube.get(NEURONS, "n1"))["spec"]["cordoned"] is True
        assert (await g.http.post("/admin/neurons/n9/cordon")).status_code == 404
        await g.http.post("/admin/neurons/n1/uncordon")
        assert (await kube.get(NEURONS, "n1"))["spec"]["cordoned"] is False

        pinned = await g.http.post(f"/admin/models/{MODEL}/pin", json={"neuron": "n1"})
        assert pinned.status_code == 200
        assert (await kube.get(PLACEMENTS, "chat"))["spec"]["pinned"] is True
        await g.http.post(f"/admin/models/{MODEL}/unpin", json={"neuron": "n1"})
        assert (await kube.get(PLACEMENTS, "chat"))["spec"]["pinned"] is False

        async def operator() -> None:  # sees the asked-for replica, loads it, reports it Ready
            async def asked() -> bool:
                spec = (await kube.get(PLACEMENTS, "chat"))["spec"]
                return bool(spec["replicas"]["min"] == 1)

            deadline = time.monotonic() + 30
            while not await asked():
                assert time.monotonic() < deadline, "the load never asked for a replica"
                await asyncio.sleep(0.05)
            await kube.set_replicas("chat", ("n1", g.endpoint("n1"), "loading"))
            await eventually(lambda: g.gateway.replicas.availability(MODEL)[0] == "loading")
            await kube.set_replicas("chat", ("n1", g.endpoint("n1"), "ready"))

        playing = asyncio.create_task(operator())
        response = await g.http.post(f"/admin/models/{MODEL}/load")
        await playing
        lines = [json.loads(line) for line in response.text.splitlines()]
        assert lines[-1] == {"model": MODEL, "neuron": "n1", "state": "ready", "progress": 1.0}
        assert {"model": MODEL, "neuron": "n1", "state": "loading", "progress": 0.0} in lines

        unload = await g.http.post(f"/admin/models/{MODEL}/unload")
        assert unload.status_code == 501 and "ModelPlacement" in unload.json()["error"]["message"]
        listed = (await g.http.get("/admin/models")).json()
        assert listed["mode"] == "kubernetes" and listed["models"][0]["id"] == MODEL
