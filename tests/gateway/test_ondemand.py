"""On-demand loading (docs/architecture.md): single-flight, bounded wait with 503 + Retry-After, keep-alives while
a streaming client waits, a load abandoned when every waiter has gone."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest
from fakes.neuron import FakeNeuron, GiB
from gateway_cluster import chat_body, cluster, eventually, spec
from prometheus_client.parser import text_string_to_metric_families

from cortex.core.client import NeuronClient
from cortex.core.fleet import LoadRequest
from cortex.gateway.placer import LOAD_READ_TIMEOUT

MODEL = "cold"
CATALOGUE = [spec(MODEL)]


def cold_neuron() -> FakeNeuron:
    neuron = FakeNeuron("n1", available={MODEL: 2 * GiB})
    neuron.faults.load_gate = asyncio.Event()
    return neuron


async def test_hundred_concurrent_requests_make_one_load() -> None:
    n1 = cold_neuron()
    async with cluster(n1, catalogue=CATALOGUE) as c:
        client = c.openai()
        requests = [
            asyncio.create_task(
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"q{i}"}]
                )
            )
            for i in range(100)
        ]
        # The load is an HTTP call of its own: it may reach the neuron after the last waiter queued.
        await eventually(
            lambda: c.gateway.ondemand.waiting_all().get(MODEL, 0) == 100 and bool(n1.loads)
        )
        assert len(n1.loads) == 1
        assert n1.loads[0].model == MODEL and n1.loads[0].source is None  # n1 lists it
        n1.faults.load_gate.set()  # type: ignore[union-attr]
        answers = await asyncio.gather(*requests)
        assert all(a.choices[0].message.content == "Hello from n1." for a in answers)
        assert len(n1.loads) == 1
        # The measured load time is kept per (neuron, model) for the `cost` eviction strategy.
        assert list(c.gateway.placer.load_seconds) == [("n1", MODEL)]
        # And the requests per model, decayed by the hour: 100 within seconds count ~100.
        assert round(c.gateway.fleet.usage[MODEL].count) == 100
        exposition = (await c.http.get(f"{c.metrics_url}/metrics")).text
        cold = _sample(exposition, "cortex_cold_starts_total", model=MODEL)
        assert cold == 1.0


async def test_the_model_more_clients_wait_for_is_placed_first() -> None:
    # Room for one of two cold models: the one with more waiting clients wins, not the first name.
    n1 = FakeNeuron("n1", memory=3 * GiB, available={"a-few": 2 * GiB, "b-many": 2 * GiB})
    async with cluster(n1, catalogue=[spec("a-few"), spec("b-many")]) as c:
        ondemand = c.gateway.ondemand

        def ask(model: str) -> asyncio.Task[httpx.Response]:
            return asyncio.create_task(c.http.post("/v1/chat/completions", json=chat_body(model)))

        # Held as a placement that is planning holds it: demand for both models piles up behind.
        async with c.gateway.placer._lock:
            few = ask("a-few")
            await eventually(lambda: ondemand.waiting_all().get("a-few", 0) == 1)
            many = [ask("b-many") for _ in range(3)]
            await eventually(lambda: ondemand.waiting_all().get("b-many", 0) == 3)
        # a-few's placement plans first and finds b-many's three clients ahead of its one: it
        # waits for them to be served, then takes b-many's room.
        assert [r.status_code for r in await asyncio.gather(*many)] == [200, 200, 200]
        assert (await few).status_code == 200
        assert [load.model for load in n1.loads] == ["b-many", "a-few"]


def _sample(exposition: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


async def test_catalogue_source_is_sent_for_models_the_neuron_does_not_list() -> None:
    n1 = FakeNeuron("n1")  # lists nothing: the gateway's catalogue says where the weights are
    async with cluster(n1, catalogue=CATALOGUE) as c:
        response = await c.http.post("/v1/chat/completions", json=chat_body(MODEL))
        assert response.status_code == 200, response.text
        assert n1.loads[0].source == f"file:/models/{MODEL}"
        models = (await c.http.get("/v1/models")).json()["data"]
        assert {m["id"]: m["state"] for m in models}[MODEL] == "loaded"


async def test_a_load_may_outlast_the_read_timeout_of_inference_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The neuron answers a load only once the model is ready (a first conversion: minutes):
    the load call waits LOAD_READ_TIMEOUT, not [gateway] request_timeout."""
    asked: list[float | None] = []
    real_load = NeuronClient.load

    async def load(
        self: NeuronClient, request: LoadRequest, *, timeout: float | None = None
    ) -> Any:
        asked.append(timeout)
        return await real_load(self, request, timeout=timeout)

    monkeypatch.setattr(NeuronClient, "load", load)
    n1 = FakeNeuron("n1", available={MODEL: 2 * GiB})
    async with cluster(n1, catalogue=CATALOGUE, gateway={"request_timeout": 5}) as c:
        response = await c.http.post("/v1/chat/completions", json=chat_body(MODEL))
        assert response.status_code == 200, response.text
    assert asked == [LOAD_READ_TIMEOUT] and LOAD_READ_TIMEOUT > 5


async def test_load_wait_is_bounded_then_503_with_retry_after() -> None:
    n1 = cold_neuron()
    async with cluster(n1, catalogue=CATALOGUE, gateway={"load_timeout": 0.3}) as c:
        with pytest.raises(openai.InternalServerError) as caught:
            await c.openai().chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "q"}]
            )
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"] == "3"
        assert "still loading" in str(caught.value)
        # The client was told to come back: the load goes on, and the retry finds it ready.
        card = (await c.http.get(f"/v1/models/{MODEL}")).json()
        assert card["state"] == "loading" and card["locations"] == ["n1"]
        n1.faults.load_gate.set()  # type: ignore[union-attr]
        await eventually(lambda: c.gateway.placer.ready(MODEL) == ["n1"])
        response = await c.http.post("/v1/chat/completions", json=chat_body(MODEL))
        assert response.status_code == 200
        assert len(n1.loads) == 1


async def test_streaming_client_gets_keepalives_while_the_model_loads() -> None:
    n1 = cold_neuron()
    async with cluster(n1, catalogue=CATALOGUE) as c:
        body = chat_body(MODEL, stream=True)
        async with c.http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            assert await anext(lines) == ": keep-alive"
            n1.faults.load_gate.set()  # type: ignore[union-attr]
            rest = [line async for line in lines]
        assert any('"Hello"' in line for line in rest) and rest[-2] == "data: [DONE]"


async def test_anthropic_stream_begins_with_message_start_after_comment_keepalives() -> None:
    """The API's first event is message_start: while the model loads, the keep-alives are SSE
    comments, never a `ping` event before it."""
    n1 = cold_neuron()
    async with cluster(n1, catalogue=CATALOGUE) as c:
        body = {**chat_body(MODEL, stream=True), "max_tokens": 16}
        async with c.http.stream("POST", "/v1/messages", json=body) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            assert await anext(lines) == ": keep-alive"
            n1.faults.load_gate.set()  # type: ignore[union-attr]
            events = [line[7:] async for line in lines if line.startswith("event: ")]
        assert events[0] == "message_start" and "ping" not in events
        assert events[-2:] == ["message_delta", "message_stop"]


async def test_streaming_client_waiting_past_the_timeout_gets_an_error_event() -> None:
    n1 = cold_neuron()
    async with cluster(n1, catalogue=CATALOGUE, gateway={"load_timeout": 0.5}) as c:
        body = chat_body(MODEL, stream=True)
        async with c.http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = [line async for line in response.aiter_lines()]
        assert lines[0] == ": keep-alive"
        assert '"code": "neuron_unavailable"' in lines[-4] and lines[-2] == "data: [DONE]"


@pytest.mark.parametrize("stream", [False, True])
async def test_load_is_abandoned_when_every_waiter_leaves(stream: bool) -> None:
    n1 = cold_neuron()
    async with cluster(n1, catalogue=CATALOGUE) as c:
        body = chat_body(MODEL, stream=stream)
        async with httpx.AsyncClient(base_url=c.url) as client:
            request = asyncio.create_task(client.post("/v1/chat/completions", json=body))
            await eventually(lambda: len(n1.loads) == 1)
            request.cancel()  # the client goes away, closing its connection
            with pytest.raises(asyncio.CancelledError):
                await request
        await eventually(lambda: n1.unloads == [MODEL])
        assert MODEL not in n1.models
        await eventually(lambda: c.gateway.ondemand.waiting_all().get(MODEL, 0) == 0)


async def test_failed_load_is_reported_to_every_waiter() -> None:
    n1 = FakeNeuron("n1", available={MODEL: 2 * GiB})
    n1.faults.load_error = "weights are corrupt"
    async with cluster(n1, catalogue=CATALOGUE) as c:
        answers = await asyncio.gather(
            *(c.http.post("/v1/chat/completions", json=chat_body(MODEL)) for _ in range(3))
        )
        assert {a.status_code for a in answers} == {500}
        assert all("weights are corrupt" in a.json()["error"]["message"] for a in answers)
        n1.faults.load_error = None  # nothing stuck: the next request loads it
        answer = await c.http.post("/v1/chat/completions", json=chat_body(MODEL))
        assert answer.status_code == 200, answer.text


async def test_model_too_big_for_any_neuron_is_409() -> None:
    n1 = FakeNeuron("n1", memory=4 * GiB)
    async with cluster(n1, catalogue=[spec("huge", memory=16 * GiB)]) as c:
        answer = await c.http.post("/v1/chat/completions", json=chat_body("huge"))
        assert answer.status_code == 409
        assert answer.json()["error"]["code"] == "capacity_exhausted"


async def test_a_model_loaded_before_is_planned_with_its_size_once_loaded_nowhere() -> None:
    # No budget in the catalogue: the gateway knows b's size only from seeing it ready. Once b is
    # loaded nowhere, a cold load of it must still evict a for room, not be sent on a guess to
    # a full neuron (which refuses it).
    n1 = FakeNeuron("n1", memory=GiB + GiB // 2, loaded={"b": GiB})  # room for one
    async with cluster(n1, catalogue=[spec("a", memory=None), spec("b", memory=None)]) as c:
        await eventually(lambda: c.gateway.placer.ready("b") == ["n1"])
        assert (await c.http.post("/admin/models/b/unload", json={})).status_code == 200
        assert (await c.http.post("/v1/chat/completions", json=chat_body("a"))).status_code == 200
        answer = await c.http.post("/v1/chat/completions", json=chat_body("b"))
        assert answer.status_code == 200, answer.text
        assert n1.unloads == ["b", "a"] and [load.model for load in n1.loads] == ["a", "b"]


async def test_a_poll_taken_during_a_request_that_ended_does_not_keep_its_replica_busy() -> None:
    # The poll counted a's request; it ended before b was asked for: a is idle, and evicted.
    n1 = FakeNeuron("n1", memory=3 * GiB, loaded={"a": 2 * GiB})
    n1.faults.hold = asyncio.Event()
    async with cluster(n1, catalogue=[spec("a"), spec("b")], gateway={"poll_interval": 3600}) as c:
        running = asyncio.create_task(c.http.post("/v1/chat/completions", json=chat_body("a")))
        await eventually(lambda: n1.models["a"].in_flight == 1)
        await c.gateway.fleet.refresh("n1")  # the lifecycle's poll, while a's request runs
        n1.faults.hold.set()
        assert (await running).status_code == 200
        answer = await c.http.post("/v1/chat/completions", json=chat_body("b"))
        assert answer.status_code == 200, answer.text
        assert n1.unloads == ["a"]


async def test_a_cold_model_waits_for_the_busy_replica_it_needs_to_go_idle() -> None:
    n1 = FakeNeuron("n1", memory=3 * GiB, loaded={"a": 2 * GiB})
    n1.faults.hold = asyncio.Event()
    async with cluster(n1, catalogue=[spec("a"), spec("b")]) as c:
        running = asyncio.create_task(c.http.post("/v1/chat/completions", json=chat_body("a")))
        await eventually(lambda: n1.models["a"].in_flight == 1)
        cold = asyncio.create_task(c.http.post("/v1/chat/completions", json=chat_body("b")))
        await eventually(lambda: "b" in c.gateway.placer.awaiting_room)
        assert not cold.done() and n1.unloads == []
        n1.faults.hold.set()  # a's request ends: a is idle, and b's placement takes its room
        assert (await running).status_code == 200
        answer = await cold
        assert answer.status_code == 200, answer.text
        assert n1.unloads == ["a"] and [load.model for load in n1.loads] == ["b"]


async def test_a_wait_for_room_is_bounded_by_the_load_timeout() -> None:
    n1 = FakeNeuron("n1", memory=3 * GiB, loaded={"a": 2 * GiB})
    n1.faults.hold = asyncio.Event()
    async with cluster(n1, catalogue=[spec("a"), spec("b")], gateway={"load_timeout": 0.3}) as c:
        running = asyncio.create_task(c.http.post("/v1/chat/completions", json=chat_body("a")))
        await eventually(lambda: n1.models["a"].in_flight == 1)
        answer = await c.http.post("/v1/chat/completions", json=chat_body("b"))
        assert answer.status_code == 503 and answer.headers["retry-after"] == "3"
        assert "in flight" in answer.json()["error"]["message"]
        await eventually(lambda: "b" not in c.gateway.placer.awaiting_room)  # nobody waits on
        n1.faults.hold.set()
        assert (await running).status_code == 200
        assert n1.loads == [] and n1.unloads == []


async def test_a_model_of_unknown_size_evicts_a_cold_one_once_the_neuron_says_its_size() -> None:
    # b was never seen ready and the catalogue gives no budget: its first load goes out on a
    # guess, and the full neuron refuses it, saying how much it needs. The gateway plans again
    # with that size, evicts the cold a, and the client never sees the refusal.
    n1 = FakeNeuron("n1", memory=GiB + GiB // 2, loaded={"a": GiB}, available={"b": GiB})
    async with cluster(n1, catalogue=[spec("a", memory=None), spec("b", memory=None)]) as c:
        await eventually(lambda: c.gateway.placer.ready("a") == ["n1"])
        answer = await c.http.post("/v1/chat/completions", json=chat_body("b"))
        assert answer.status_code == 200, answer.text
        assert [load.model for load in n1.loads] == ["b", "b"] and n1.unloads == ["a"]
        assert c.gateway.fleet.sizes["b"] == GiB


async def test_a_model_no_neuron_can_make_room_for_is_refused_with_its_size() -> None:
    # a is pinned: nothing can be evicted for b. After the neuron's refusal taught b's size, the
    # one plan left cannot fit it, and the client learns what b needs and what is free.
    n1 = FakeNeuron("n1", memory=GiB + GiB // 2, loaded={"a": GiB}, available={"b": GiB})
    catalogue = [spec("a", memory=None, pinned_on=["n1"]), spec("b", memory=None)]
    async with cluster(n1, catalogue=catalogue) as c:
        await eventually(lambda: c.gateway.placer.ready("a") == ["n1"])
        answer = await c.http.post("/v1/chat/completions", json=chat_body("b"))
        assert answer.status_code == 503 and answer.headers["retry-after"] == "3", answer.text
        error = answer.json()["error"]
        assert error["code"] == "neuron_unavailable"
        assert "needs 1.0 GiB" in error["message"] and "512 MiB free" in error["message"]
        assert error["memory"] == {"needed": GiB, "free": GiB // 2}
        assert [load.model for load in n1.loads] == ["b"] and n1.unloads == []  # one guess only
        anthropic = await c.http.post(
            "/v1/messages",
            json={"model": "b", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert anthropic.status_code == 503, anthropic.text
        assert anthropic.json()["error"]["type"] == "api_error"
        assert "needs 1.0 GiB" in anthropic.json()["error"]["message"]
