"""GET /v1/models: one catalogue merged from the gateway's config and every neuron."""

from __future__ import annotations

import openai
import pytest
from fakes.neuron import FakeNeuron, GiB
from gateway_cluster import chat_body, cluster, spec


async def test_models_merge_config_and_every_neuron() -> None:
    n1 = FakeNeuron("n1", loaded={"chat-a": GiB}, available={"local-only": GiB})
    n2 = FakeNeuron("n2", loaded={"chat-a": GiB}, available={"n2-model": GiB})
    catalogue = [spec("chat-a", aliases=["a"], context=2048), spec("catalogued")]
    async with cluster(n1, n2, catalogue=catalogue) as c:
        cards = {m["id"]: m for m in (await c.http.get("/v1/models")).json()["data"]}
        assert set(cards) == {"chat-a", "local-only", "n2-model", "catalogued"}
        chat_a = cards["chat-a"]
        assert chat_a["object"] == "model" and chat_a["owned_by"] == "cortex"
        assert chat_a["state"] == "loaded" and sorted(chat_a["locations"]) == ["n1", "n2"]
        assert chat_a["aliases"] == ["a"] and chat_a["context_length"] == 2048
        assert (
            cards["local-only"]["state"] == "available" and cards["local-only"]["locations"] == []
        )
        assert cards["catalogued"]["state"] == "available"
        sdk = c.openai()
        listed = [m.id async for m in sdk.models.list()]
        assert sorted(listed) == sorted(cards)
        by_alias = await sdk.models.retrieve("a")
        assert by_alias.id == "chat-a"
        with pytest.raises(openai.NotFoundError):
            await sdk.models.retrieve("nope")


async def test_context_length_comes_from_the_replica_when_the_catalogue_has_none() -> None:
    async with cluster(FakeNeuron("n1", loaded={"chat-a": GiB}), catalogue=[spec("chat-a")]) as c:
        card = (await c.http.get("/v1/models/chat-a")).json()
        assert card["context_length"] == 4096


async def test_alias_in_a_request_reaches_the_neuron_as_the_model_id() -> None:
    n1 = FakeNeuron("n1", loaded={"chat-a": GiB})
    async with cluster(n1, catalogue=[spec("chat-a", aliases=["a"])]) as c:
        assert (await c.http.post("/v1/chat/completions", json=chat_body("a"))).is_success
        assert n1.requests[-1][1]["model"] == "chat-a"


async def test_neuron_local_model_loads_only_where_it_is_listed() -> None:
    n1 = FakeNeuron("n1", memory=4 * GiB, available={"local-only": GiB})
    n2 = FakeNeuron("n2", memory=64 * GiB)  # far more room, but cannot see the weights
    async with cluster(n1, n2) as c:
        response = await c.http.post("/v1/chat/completions", json=chat_body("local-only"))
        assert response.status_code == 200, response.text
        assert [load.model for load in n1.loads] == ["local-only"] and n2.loads == []
