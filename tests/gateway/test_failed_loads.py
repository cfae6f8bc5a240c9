"""Failed loads: an ad-hoc one is no model at all; a catalogued one says why, and a request for it
gets that reason, not "no healthy neuron" from a healthy fleet."""

from __future__ import annotations

from fakes.neuron import FakeModel, FakeNeuron, GiB
from gateway_cluster import chat_body, cluster, spec

from cortex.core.fleet import ModelState

OOM = "needs 9000 MiB; cpu-0 has 800 MiB free"


def neuron() -> FakeNeuron:
    n1 = FakeNeuron("n1", loaded={"chat-a": GiB}, available={"broken": GiB})
    # What a neuron reported before it stopped listing failed ad-hoc loads (or an older neuron).
    n1.models["adhoc"] = FakeModel(
        "adhoc", 0, state=ModelState.FAILED, error="source 'file:/x': no model there"
    )
    n1.faults.load_error = OOM
    return n1


async def test_an_ad_hoc_failed_load_is_not_a_model() -> None:
    async with cluster(neuron(), catalogue=[spec("chat-a"), spec("broken")]) as c:
        listed = {m["id"] for m in (await c.http.get("/v1/models")).json()["data"]}
        assert "adhoc" not in listed and {"chat-a", "broken"} <= listed
        asked = await c.http.post("/v1/chat/completions", json=chat_body("adhoc"))
        assert asked.status_code == 404 and asked.json()["error"]["code"] == "model_not_found"
        scraped = (await c.http.get(f"{c.metrics_url}/metrics")).text
        assert 'model="adhoc"' not in scraped


async def test_a_failed_load_shows_on_the_card_before_any_poll() -> None:
    # No poll after the gateway's first: the failure comes from the load's own answer. (With
    # the gateway waiting for a poll, a card read right after a failed load said nothing.)
    quiet = {"poll_interval": 3600}
    async with cluster(neuron(), catalogue=[spec("broken")], gateway=quiet) as c:
        asked = await c.http.post("/v1/chat/completions", json=chat_body("broken"))
        assert OOM in asked.json()["error"]["message"]
        cards = {m["id"]: m for m in (await c.http.get("/v1/models")).json()["data"]}
        assert cards["broken"]["last_error"] == f"n1: {OOM}"


async def test_a_failed_catalogue_model_names_the_real_cause() -> None:
    async with cluster(neuron(), catalogue=[spec("chat-a"), spec("broken")]) as c:
        first = await c.http.post("/v1/chat/completions", json=chat_body("broken"))
        again = await c.http.post("/v1/chat/completions", json=chat_body("broken"))
        for answer in (first, again):
            error = answer.json()["error"]
            assert OOM in error["message"] and "no healthy neuron" not in error["message"]
            assert answer.status_code != 503, error
        cards = {m["id"]: m for m in (await c.http.get("/v1/models")).json()["data"]}
        assert cards["broken"]["state"] == "available"
        assert cards["broken"]["last_error"] == f"n1: {OOM}"
        assert cards["chat-a"]["last_error"] is None
        scraped = (await c.http.get(f"{c.metrics_url}/metrics")).text
        assert 'cortex_replica_memory_bytes{model="broken"' not in scraped
