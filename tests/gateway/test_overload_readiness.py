"""Overload is not an outage, and readiness follows the fleet at once (docs/architecture.md):
a busy neuron stays healthy and its clients get 429 + Retry-After saying "busy"; a connection
failure marks a neuron suspect at once; every 503 carries Retry-After and names the neuron, never
its address; a neuron shutting down is retried elsewhere."""

from __future__ import annotations

import asyncio

import anthropic
import httpx
import pytest
from fakes.neuron import FakeNeuron, GiB
from gateway_cluster import chat_body, cluster, eventually, spec

from cortex.core.client import NeuronClient
from cortex.core.errors import (
    AnswerTimeout,
    BudgetExceeded,
    CortexError,
    NeuronUnavailable,
    NeuronUnreachable,
    Overloaded,
    QueueTimeout,
    ShuttingDown,
    TooManyInFlight,
)
from cortex.core.protocol.errors import anthropic_error, anthropic_status, error_headers

MODEL = "chat-a"
CATALOGUE = [spec(MODEL)]
SLOW_POLLS = {"gateway": {"poll_interval": 30, "unhealthy_after": 3}}


async def test_past_the_neurons_admission_limits_the_gateway_answers_busy() -> None:
    # The neuron admits 1 running + 1 queued per model, and a principal with nothing queued
    # one more: a fourth request at once is the gateway's own 429, never sent to the neuron,
    # and the neuron stays healthy.
    n1 = FakeNeuron("n1", loaded={MODEL: GiB})
    n1.max_running, n1.max_queue = 1, 1
    n1.faults.hold = asyncio.Event()
    async with cluster(n1, catalogue=CATALOGUE) as c:
        await eventually(lambda: c.gateway.fleet["n1"].status.max_queue == 1)  # type: ignore[union-attr]
        held = [
            asyncio.create_task(c.http.post("/v1/chat/completions", json=chat_body(MODEL)))
            for _ in range(3)
        ]
        await eventually(lambda: n1.in_flight() == 3)
        refused = await c.http.post("/v1/chat/completions", json=chat_body(MODEL))
        assert refused.status_code == 429
        assert refused.headers["retry-after"]
        assert "busy" in refused.json()["error"]["message"]
        assert len(n1.requests) == 3
        assert c.gateway.fleet.healthy("n1")
        n1.faults.hold.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200, 200]


async def test_one_key_filling_the_queue_leaves_the_neuron_to_admit_another() -> None:
    # Alice holds the neuron's one running slot and its one queued place; the neuron's
    # admission would still queue Bob, who has nothing waiting, so the gateway must send him.
    n1 = FakeNeuron("n1", loaded={MODEL: GiB})
    n1.max_running, n1.max_queue = 1, 1
    n1.faults.hold = asyncio.Event()
    keys = [{"key": "sk-alice", "name": "alice"}, {"key": "sk-bob", "name": "bob"}]
    async with cluster(n1, catalogue=CATALOGUE, auth={"enabled": True, "keys": keys}) as c:
        await eventually(lambda: c.gateway.fleet["n1"].status.max_queue == 1)  # type: ignore[union-attr]
        alice, bob = ({"Authorization": f"Bearer sk-{who}"} for who in ("alice", "bob"))
        held = [
            asyncio.create_task(
                c.http.post("/v1/chat/completions", json=chat_body(MODEL), headers=alice)
            )
            for _ in range(2)
        ]
        await eventually(lambda: n1.in_flight() == 2)
        bobs = asyncio.create_task(
            c.http.post("/v1/chat/completions", json=chat_body(MODEL), headers=bob)
        )
        await eventually(lambda: n1.principals.count("bob") == 1 or bobs.done())
        assert not bobs.done(), "the gateway refused Bob though the neuron would queue him"
        n1.faults.hold.set()
        assert [r.status_code for r in await asyncio.gather(*held, bobs)] == [200, 200, 200]


async def test_counting_tokens_is_never_refused_as_busy() -> None:
    # The neuron's /tokenize takes no admission slot: a saturated model still counts tokens
    # (Claude Code asks before every turn), and the count takes no place among the requests.
    n1 = FakeNeuron("n1", loaded={MODEL: GiB})
    n1.max_running, n1.max_queue = 1, 1
    n1.faults.hold = asyncio.Event()
    async with cluster(n1, catalogue=CATALOGUE) as c:
        await eventually(lambda: c.gateway.fleet["n1"].status.max_queue == 1)  # type: ignore[union-attr]
        held = [
            asyncio.create_task(c.http.post("/v1/chat/completions", json=chat_body(MODEL)))
            for _ in range(3)
        ]
        await eventually(lambda: n1.in_flight() == 3)
        assert c.gateway.fleet.full("n1", MODEL)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "how many"}]}
        counted = await c.http.post("/v1/messages/count_tokens", json=body)
        assert counted.status_code == 200, counted.text
        assert counted.json()["input_tokens"] > 0
        assert c.gateway.fleet["n1"].in_flight[MODEL] == 3
        n1.faults.hold.set()
        await asyncio.gather(*held)


async def test_a_busy_neuron_stays_healthy_and_ready() -> None:
    n1 = FakeNeuron("n1", loaded={MODEL: GiB})
    n1.faults.busy = True
    async with cluster(n1, catalogue=CATALOGUE) as c:
        for _ in range(5):
            response = await c.http.post("/v1/chat/completions", json=chat_body(MODEL))
            assert response.status_code == 429 and response.headers["retry-after"]
        assert c.gateway.fleet["n1"].failures == 0
        assert (await c.http.get("/readyz")).status_code == 200


async def test_waiting_for_a_pooled_connection_is_busy_not_a_neuron_failure() -> None:
    n1 = FakeNeuron("n1", loaded={MODEL: GiB})
    n1.faults.hold = asyncio.Event()
    async with cluster(n1, catalogue=CATALOGUE) as c:
        pool = httpx.Limits(max_connections=1)
        timeout = httpx.Timeout(5.0, pool=0.2)
        url = c.served["n1"].url
        client = NeuronClient(url, name="n1", limits=pool, timeout=timeout)
        try:
            first = asyncio.create_task(client.chat(chat_body(MODEL)))
            await eventually(lambda: n1.in_flight() == 1)
            try:
                await client.chat(chat_body(MODEL))
            except Overloaded as err:
                assert "busy" in err.message and err.retry_after
            else:
                raise AssertionError("a pool wait must be Overloaded")
            n1.faults.hold.set()
            await first
        finally:
            await client.aclose()


async def test_a_connection_failure_marks_the_neuron_suspect_and_readyz_follows() -> None:
    n1 = FakeNeuron("n1", loaded={MODEL: GiB})
    async with cluster(n1, catalogue=CATALOGUE, **SLOW_POLLS) as c:
        url = c.served["n1"].url
        await c.served["n1"].stop()
        response = await c.http.post("/v1/chat/completions", json=chat_body(MODEL))
        assert response.status_code == 503
        assert response.headers["retry-after"]
        message = response.json()["error"]["message"]
        assert "n1" in message and url.removeprefix("http://") not in message
        assert "127.0.0.1" not in message
        # No poll came in between (30 s apart): the request's own failure made it suspect.
        assert not c.gateway.fleet.healthy("n1")
        ready = await c.http.get("/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"]


async def test_a_failed_poll_that_cannot_connect_suspects_the_neuron_at_once() -> None:
    n1 = FakeNeuron("n1", loaded={MODEL: GiB})
    async with cluster(n1, catalogue=CATALOGUE, **SLOW_POLLS) as c:
        await c.served["n1"].stop()
        await c.gateway.fleet.refresh("n1")
        assert not c.gateway.fleet.healthy("n1")
        assert "127.0.0.1" not in (c.gateway.fleet["n1"].last_error or "")


async def test_the_client_names_the_neuron_never_its_address() -> None:
    client = NeuronClient("http://127.0.0.1:9", name="n9")  # the discard port: refused
    try:
        await client.status()
    except NeuronUnreachable as err:
        assert "n9" in err.message and "127.0.0.1" not in err.message and err.retry_after
    else:
        raise AssertionError("a refused connection must be NeuronUnreachable")
    finally:
        await client.aclose()


async def test_shutting_down_is_retried_on_another_replica() -> None:
    n1 = FakeNeuron("n1", loaded={MODEL: 2 * GiB})
    n2 = FakeNeuron("n2", loaded={MODEL: 2 * GiB})
    n1.faults.shutting_down = True
    async with cluster(n1, n2, catalogue=CATALOGUE, **SLOW_POLLS) as c:
        for stream in (False, True):
            for i in range(3):
                body = chat_body(MODEL, f"question {i} {stream}", stream=stream)
                response = await c.http.post("/v1/chat/completions", json=body)
                assert response.status_code == 200
        # Refused once, then skipped until a poll says it answers again.
        assert len(n1.requests) == 1 and len(n2.requests) == 6


async def test_a_poll_begun_before_a_failure_does_not_clear_it() -> None:
    # The neuron's /status still answers while it refuses work; only a poll sent after the
    # refusal may say it answers again.
    n1 = FakeNeuron("n1", loaded={MODEL: GiB})
    async with cluster(n1, catalogue=CATALOGUE, **SLOW_POLLS) as c:
        fleet, calls = c.gateway.fleet, n1.status_calls
        n1.faults.status_gate = gate = asyncio.Event()
        begun = asyncio.create_task(fleet.refresh("n1"))
        await eventually(lambda: n1.status_calls > calls)
        fleet.mark_suspect("n1", "neuron n1 is shutting down")
        gate.set()
        await begun
        assert not fleet.healthy("n1")
        await fleet.refresh("n1")
        assert fleet.healthy("n1")


async def test_the_principal_is_forwarded_to_the_neuron() -> None:
    n1 = FakeNeuron("n1", loaded={MODEL: GiB})
    keys = {"auth": {"enabled": True, "keys": [{"key": "sk-alice", "name": "alice"}]}}
    async with cluster(n1, catalogue=CATALOGUE, **keys) as c:
        headers = {"Authorization": "Bearer sk-alice"}
        response = await c.http.post("/v1/chat/completions", json=chat_body(MODEL), headers=headers)
        assert response.status_code == 200
        assert n1.principals == ["alice"]


async def test_without_auth_the_principal_is_the_client_address() -> None:
    n1 = FakeNeuron("n1", loaded={MODEL: GiB})
    async with cluster(n1, catalogue=CATALOGUE) as c:
        response = await c.http.post("/v1/chat/completions", json=chat_body(MODEL, stream=True))
        assert response.status_code == 200
        assert n1.principals == ["127.0.0.1"]


async def test_a_stream_the_neuron_cannot_admit_gets_its_status_before_the_200() -> None:
    # The neuron's queue wait outlasts the keep-alive interval (0.2 s here); the model is ready,
    # so the gateway holds the 200 back and the refusal is a real 429.
    n1 = FakeNeuron("n1", loaded={MODEL: GiB})
    n1.faults.queue_timeout = 0.6
    async with cluster(n1, catalogue=CATALOGUE) as c:
        body = chat_body(MODEL, stream=True)
        async with c.http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 429
            assert response.headers["retry-after"] == "7"
            await response.aread()
        assert response.json()["error"]["code"] == "queue_timeout"
        assert c.gateway.fleet.healthy("n1")


def test_every_429_and_503_carries_retry_after() -> None:
    unavailable = CortexError("a proxy said so")
    unavailable.status = 503
    assert error_headers(unavailable)["Retry-After"] == "1"
    assert error_headers(Overloaded("busy"))["Retry-After"] == "1"
    assert error_headers(ShuttingDown("going", retry_after=4))["Retry-After"] == "4"
    assert error_headers(CortexError("broken")) == {}  # a 500: retrying will not help


ASK = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_overload_is_its_529_which_the_sdk_raises_as_overloaded(
    stream: bool,
) -> None:
    n1 = FakeNeuron("n1", loaded={MODEL: GiB})
    n1.faults.busy = True
    async with cluster(n1, catalogue=CATALOGUE) as c:
        with pytest.raises(anthropic.OverloadedError) as caught:
            await c.anthropic().messages.create(**ASK, stream=stream)  # type: ignore[call-overload]
        assert caught.value.status_code == 529
        assert caught.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
        assert caught.value.response.headers["retry-after"] == "2"
        # OpenAI's surface keeps OpenAI's answer to the same refusal.
        openai = await c.http.post("/v1/chat/completions", json=chat_body(MODEL))
        assert openai.status_code == 429
        assert openai.json()["error"]["type"] == "rate_limit_error"


async def test_anthropic_unavailability_is_an_api_error_not_overload() -> None:
    n1 = FakeNeuron("n1", loaded={MODEL: GiB})
    n1.faults.shutting_down = True
    async with cluster(n1, catalogue=CATALOGUE, **SLOW_POLLS) as c:
        with pytest.raises(anthropic.ServiceUnavailableError) as caught:
            await c.anthropic().messages.create(**ASK)  # type: ignore[call-overload]
        assert caught.value.status_code == 503
        assert caught.value.body["error"]["type"] == "api_error"  # type: ignore[index]
        assert caught.value.response.headers["retry-after"]


def test_anthropic_error_types_follow_anthropics_own() -> None:
    def said(err: CortexError) -> tuple[int, str]:
        return anthropic_status(err), anthropic_error(err)["error"]["type"]

    assert said(Overloaded("busy", retry_after=1)) == (529, "overloaded_error")
    assert said(QueueTimeout("waited", retry_after=1)) == (529, "overloaded_error")
    assert said(BudgetExceeded("spent")) == (429, "rate_limit_error")
    assert said(TooManyInFlight("too many")) == (429, "rate_limit_error")
    assert said(NeuronUnavailable("down")) == (503, "api_error")
    assert said(ShuttingDown("going")) == (503, "api_error")
    assert said(AnswerTimeout("silent")) == (504, "timeout_error")
    assert said(CortexError("broken")) == (500, "api_error")
