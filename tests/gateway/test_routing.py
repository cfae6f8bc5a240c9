"""Routing across replicas (docs/architecture.md): least-loaded, prefix affinity, failover before the first byte,
mid-stream death, client disconnect, unhealthy neurons."""

from __future__ import annotations

import asyncio
import json

import anthropic
import httpx
import openai
import pytest
from fakes.neuron import FakeNeuron, GiB
from gateway_cluster import FAST, chat_body, cluster, eventually, spec

from cortex.core.errors import error_from_code
from cortex.gateway import registry
from cortex.gateway.assembly import Tuning
from cortex.gateway.poller import Poller
from cortex.gateway.proxy.dispatch import retryable

MODEL = "chat-a"
CATALOGUE = [spec(MODEL)]


def pair(**kwargs: object) -> tuple[FakeNeuron, FakeNeuron]:
    return (
        FakeNeuron("n1", loaded={MODEL: 2 * GiB}, **kwargs),  # type: ignore[arg-type]
        FakeNeuron("n2", loaded={MODEL: 2 * GiB}, **kwargs),  # type: ignore[arg-type]
    )


async def test_chat_through_openai_sdk_streamed_and_not() -> None:
    async with cluster(FakeNeuron("n1", loaded={MODEL: GiB}), catalogue=CATALOGUE) as c:
        client = c.openai()
        answer = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello there"}]
        )
        assert answer.choices[0].message.content == "Hello from n1."
        assert answer.usage is not None and answer.usage.completion_tokens == 3
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], stream=True
        )
        pieces = [chunk async for chunk in stream]
        text = "".join(p.choices[0].delta.content or "" for p in pieces if p.choices)
        assert text == "Hello from n1."
        # cortex asked the neuron for usage on its own account; this client did not ask for it.
        assert all(p.usage is None for p in pieces)
        asked = c.neurons["n1"].requests[-1][1]["stream_options"]
        assert asked == {"include_usage": True, "continuous_usage_stats": True}


async def test_stream_usage_kept_when_the_client_asks() -> None:
    async with cluster(FakeNeuron("n1", loaded={MODEL: GiB}), catalogue=CATALOGUE) as c:
        stream = await c.openai().chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        usages = [chunk.usage async for chunk in stream if chunk.usage is not None]
        assert len(usages) == 1 and usages[0].completion_tokens == 3


async def test_openai_stream_is_relayed_event_by_event() -> None:
    """The first token reaches the client while the neuron still holds the rest back."""
    n1 = FakeNeuron("n1", loaded={MODEL: GiB})
    n1.faults.hold = asyncio.Event()
    async with cluster(n1, catalogue=CATALOGUE) as c:
        body = chat_body(MODEL, stream=True)
        async with c.http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.aiter_lines()
            seen = []
            while not any('"Hello"' in line for line in seen):
                seen.append(await asyncio.wait_for(anext(lines), 5))
            assert n1.completed_streams == 0  # the neuron has not finished: nothing was buffered
            n1.faults.hold.set()
            rest = [line async for line in lines]
        assert "data: [DONE]" in rest


async def test_least_loaded_replica_gets_the_request() -> None:
    n1, n2 = pair()
    gate = asyncio.Event()
    n1.faults.hold = n2.faults.hold = gate
    tuning = Tuning(keepalive_interval=0.2, affinity_slack=0)
    async with cluster(n1, n2, catalogue=CATALOGUE, tuning=tuning) as c:
        held = []
        for i in range(4):  # distinct conversations, each held open by its neuron
            held.append(asyncio.create_task(_chat(c.http, f"conversation {i}")))
            await eventually(lambda i=i: n1.in_flight() + n2.in_flight() == i + 1)
        assert (n1.in_flight(), n2.in_flight()) == (2, 2)
        gate.set()
        await asyncio.gather(*held)


async def _chat(http: httpx.AsyncClient, text: str) -> dict[str, object]:
    response = await http.post("/v1/chat/completions", json=chat_body(MODEL, text))
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def test_busier_replica_is_avoided() -> None:
    n1, n2 = pair()
    gate = asyncio.Event()
    n1.faults.hold = gate
    tuning = Tuning(keepalive_interval=0.2, affinity_slack=0)
    async with cluster(n1, n2, catalogue=CATALOGUE, tuning=tuning) as c:
        c.gateway.fleet.begin("n1", MODEL)  # n1 carries one request more than n2
        c.gateway.fleet.begin("n1", MODEL)
        for i in range(4):
            answer = await _chat(c.http, f"question {i}")
            assert answer["choices"][0]["message"]["content"] == "Hello from n2."  # type: ignore[index]


async def test_conversation_sticks_to_one_replica_while_load_allows() -> None:
    n1, n2 = pair()
    async with cluster(n1, n2, catalogue=CATALOGUE, tuning=FAST) as c:
        history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"}]
        first = await c.http.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": history}
        )
        home = first.json()["choices"][0]["message"]["content"]
        for turn in range(2, 6):
            history += [
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": f"q{turn}"},
            ]
            answer = await c.http.post(
                "/v1/chat/completions", json={"model": MODEL, "messages": history}
            )
            assert answer.json()["choices"][0]["message"]["content"] == home
        # Beyond the slack, the conversation's replica is passed over for the idle one.
        name = "n1" if home == "Hello from n1." else "n2"
        for _ in range(FAST.affinity_slack + 1):
            c.gateway.fleet.begin(name, MODEL)
        moved = await c.http.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": history}
        )
        assert moved.json()["choices"][0]["message"]["content"] != home


# "cut" drops a stream after its headers (a plain answer cannot be cut: the fake crashes instead).
@pytest.mark.parametrize(("mode", "stream"), [("503", False), ("503", True), ("cut", True)])
async def test_failure_before_first_byte_is_retried_elsewhere(mode: str, stream: bool) -> None:
    n1, n2 = pair()
    n1.faults.fail_requests = 3
    n1.faults.fail_mode = mode  # type: ignore[assignment]
    async with cluster(n1, n2, catalogue=CATALOGUE) as c:
        client = c.openai()
        for i in range(10):  # distinct conversations: n1 is picked first for some of them
            messages = [{"role": "user", "content": f"question {i}"}]
            if stream:
                chunks = await client.chat.completions.create(
                    model=MODEL, messages=messages, stream=True
                )
                text = "".join(
                    [c.choices[0].delta.content or "" async for c in chunks if c.choices]
                )
            else:
                answer = await client.chat.completions.create(model=MODEL, messages=messages)
                text = answer.choices[0].message.content or ""
            assert text in ("Hello from n1.", "Hello from n2.")
        assert n1.faults.fail_requests < 3  # n1 did fail, and its requests were served by n2


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_that_failed_itself_is_not_retried(stream: bool) -> None:
    """A 500 says the generation broke: it would break on every replica, so it is not carried."""
    n1, n2 = pair()
    for neuron in (n1, n2):
        neuron.faults.fail_requests = 1
        neuron.faults.fail_mode = "500"
    async with cluster(n1, n2, catalogue=CATALOGUE) as c:
        response = await c.http.post("/v1/chat/completions", json=chat_body(MODEL, stream=stream))
        assert response.status_code == 500
        assert sorted(n.faults.fail_requests for n in (n1, n2)) == [0, 1]  # one neuron tried
        assert c.gateway.fleet.healthy("n1") and c.gateway.fleet.healthy("n2")


@pytest.mark.parametrize("stream", [False, True])
async def test_a_queue_timeout_is_not_retried_on_another_replica(stream: bool) -> None:
    """The request already waited a neuron's whole queue timeout: another try would double the
    wait (a stream past its admission patience, so a 200 and then an error event)."""
    n1, n2 = pair()
    for neuron in (n1, n2):
        neuron.faults.queue_timeout = 0.3
    async with cluster(n1, n2, catalogue=CATALOGUE) as c:
        response = await c.http.post("/v1/chat/completions", json=chat_body(MODEL, stream=stream))
        assert response.status_code == 429
        assert response.json()["error"]["code"] == "queue_timeout"
        assert len(n1.requests) + len(n2.requests) == 1
        assert c.gateway.fleet.healthy("n1") and c.gateway.fleet.healthy("n2")


def test_a_generation_its_neuron_cancelled_is_retried_elsewhere() -> None:
    """How a neuron ends the requests a forced unload dropped: the replica's doing, not theirs."""
    err = error_from_code("generation_cancelled", "generation cancelled: model unloaded", 503)
    assert retryable(err)


async def test_unreachable_neuron_is_failed_over_then_marked_unhealthy() -> None:
    n1, n2 = pair()
    async with cluster(n1, n2, catalogue=CATALOGUE) as c:
        await c.served["n1"].stop()
        for i in range(4):
            answer = await _chat(c.http, f"q{i}")
            assert answer["choices"][0]["message"]["content"] == "Hello from n2."  # type: ignore[index]
        await eventually(lambda: not c.gateway.fleet.healthy("n1"))
        health = (await c.http.get("/health")).json()
        assert health["status"] == "impaired"
        assert health["neurons"]["n1"]["healthy"] is False


async def test_a_neuron_that_never_answers_a_poll_holds_no_other_poll_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host that dies without closing its connections leaves a poll waiting for its read
    timeout (minutes): the poll gives up after POLL_TIMEOUT, the neuron is unhealthy, and the
    polls of the others (and reconcile) go on."""
    monkeypatch.setattr(registry, "POLL_TIMEOUT", 0.2)
    n1, n2 = pair()
    async with cluster(n1, n2, catalogue=CATALOGUE) as c:
        n1.faults.status_gate = asyncio.Event()  # never set: n1's /status never answers
        poller = c.gateway.source
        assert isinstance(poller, Poller)
        cycles = poller.cycle
        await eventually(lambda: not c.gateway.fleet.healthy("n1"))
        await eventually(lambda: poller.cycle >= cycles + 3)
        assert c.gateway.fleet.healthy("n2")
        assert "no answer to a poll" in (c.gateway.fleet.neurons["n1"].last_error or "")
        answer = await _chat(c.http, "still there?")
        assert answer["choices"][0]["message"]["content"] == "Hello from n2."  # type: ignore[index]


async def test_all_replicas_failing_is_a_503_with_retry_after() -> None:
    n1, n2 = pair()
    for neuron in (n1, n2):
        neuron.faults.fail_requests = 5
    async with cluster(n1, n2, catalogue=CATALOGUE) as c:
        with pytest.raises(openai.InternalServerError) as caught:
            await c.openai().chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}]
            )
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"]


async def test_busy_replicas_answer_429_with_retry_after() -> None:
    n1 = FakeNeuron("n1", loaded={MODEL: GiB})
    n1.faults.busy = True
    async with cluster(n1, catalogue=CATALOGUE) as c:
        response = await c.http.post("/v1/chat/completions", json=chat_body(MODEL))
        assert response.status_code == 429
        assert response.headers["retry-after"] == "2"
        assert response.json()["error"]["code"] == "overloaded"


@pytest.mark.parametrize("with_event", [False, True])
async def test_death_mid_stream_ends_openai_stream_with_error_event(with_event: bool) -> None:
    n1 = FakeNeuron("n1", loaded={MODEL: GiB})
    n1.faults.die_after = 1
    n1.faults.die_with_error_event = with_event
    async with cluster(n1, catalogue=CATALOGUE) as c:
        async with c.http.stream(
            "POST", "/v1/chat/completions", json=chat_body(MODEL, stream=True)
        ) as response:
            assert response.status_code == 200
            lines = [line async for line in response.aiter_lines()]
        data = [json.loads(x[5:]) for x in lines if x.startswith("data: {")]
        code = "device_unhealthy" if with_event else "neuron_unavailable"
        assert data[-1]["error"]["code"] == code
        assert data[0]["choices"][0]["delta"]["role"] == "assistant"
        assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
        # The SDK raises instead of hanging.
        stream = await c.openai().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True
        )
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass


@pytest.mark.parametrize("with_event", [False, True])
async def test_death_mid_stream_ends_anthropic_stream_with_error_event(with_event: bool) -> None:
    n1 = FakeNeuron("n1", loaded={MODEL: GiB})
    n1.faults.die_after = 1
    n1.faults.die_with_error_event = with_event
    async with cluster(n1, catalogue=CATALOGUE) as c:
        stream = await c.anthropic().messages.create(
            model=MODEL,
            max_tokens=20,
            messages=[{"role": "user", "content": "x"}],
            stream=True,
        )
        seen = []
        with pytest.raises(anthropic.APIStatusError) as caught:
            async for event in stream:
                seen.append(event.type)
        assert seen[0] == "message_start" and "content_block_delta" in seen
        assert "api_error" in str(caught.value)  # a neuron failing is no overload


async def test_client_disconnect_closes_the_upstream_stream() -> None:
    n1 = FakeNeuron("n1", loaded={MODEL: GiB})
    n1.faults.hold = asyncio.Event()
    async with cluster(n1, catalogue=CATALOGUE) as c:
        async with c.http.stream(
            "POST", "/v1/chat/completions", json=chat_body(MODEL, stream=True)
        ) as response:
            async for line in response.aiter_lines():
                if '"Hello"' in line:
                    break  # leave mid-stream
        await eventually(lambda: n1.disconnects == 1)
        assert n1.in_flight() == 0
        await eventually(lambda: c.gateway.fleet["n1"].in_flight[MODEL] == 0)
        # Recorded as the client's leaving (nginx's 499), as before the stream began; not an ok.
        metrics = c.gateway.metrics
        left = metrics.errors.labels(MODEL, "n1", "openai", "client_closed_request")
        await eventually(lambda: left._value.get() == 1)
        assert metrics.requests.labels(MODEL, "n1", "openai")._value.get() == 1


async def test_a_stream_whose_client_leaves_while_it_waits_for_admission_lets_go() -> None:
    """Before the answer begins nothing read the client's disconnect: an abandoned request kept
    its place in the neuron's queue (up to the admission wait, then a whole prefill)."""
    n1 = FakeNeuron("n1", loaded={MODEL: GiB})
    n1.faults.queue_timeout = 120.0  # the neuron keeps the request queued for two minutes
    async with cluster(n1, catalogue=CATALOGUE) as c:
        async with httpx.AsyncClient(base_url=c.url) as client:

            async def ask() -> None:
                body = chat_body(MODEL, stream=True)
                async with client.stream("POST", "/v1/chat/completions", json=body) as answer:
                    await answer.aread()

            request = asyncio.create_task(ask())
            await eventually(lambda: c.gateway.fleet["n1"].in_flight[MODEL] == 1)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
        await eventually(lambda: c.gateway.fleet["n1"].in_flight[MODEL] == 0, timeout=10)
        errors = c.gateway.metrics.errors.labels(MODEL, "n1", "openai", "client_closed_request")
        assert errors._value.get() == 1


async def test_unhealthy_neuron_is_skipped() -> None:
    n1, n2 = pair()
    n1.faults.unhealthy = True
    async with cluster(n1, n2, catalogue=CATALOGUE) as c:
        await eventually(lambda: not c.gateway.fleet.healthy("n1"))
        for i in range(3):
            answer = await _chat(c.http, f"q{i}")
            assert answer["choices"][0]["message"]["content"] == "Hello from n2."  # type: ignore[index]


async def test_health_states() -> None:
    n1, n2 = pair()
    async with cluster(n1, n2, catalogue=CATALOGUE) as c:
        assert (await c.http.get("/health")).json()["status"] == "ok"
        assert (await c.http.get("/livez")).status_code == 200
        assert (await c.http.get("/readyz")).status_code == 200
        n1.faults.unhealthy = True
        await eventually(lambda: not c.gateway.fleet.healthy("n1"))
        assert (await c.http.get("/health")).json()["status"] == "impaired"
        n2.faults.unhealthy = True
        await eventually(lambda: not c.gateway.fleet.healthy("n2"))
        degraded = await c.http.get("/health")
        assert degraded.status_code == 503 and degraded.json()["status"] == "degraded"
        assert (await c.http.get("/readyz")).status_code == 503
        assert (await c.http.get("/livez")).status_code == 200


async def test_client_disconnect_on_a_plain_answer_reaches_the_neuron() -> None:
    n1 = FakeNeuron("n1", loaded={MODEL: GiB})
    n1.faults.hold = asyncio.Event()
    async with cluster(n1, catalogue=CATALOGUE) as c:
        async with httpx.AsyncClient(base_url=c.url) as client:
            request = asyncio.create_task(
                client.post("/v1/chat/completions", json=chat_body(MODEL))
            )
            await eventually(lambda: n1.in_flight() == 1)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
        await eventually(lambda: n1.disconnects == 1)
        await eventually(lambda: c.gateway.fleet["n1"].in_flight[MODEL] == 0)
