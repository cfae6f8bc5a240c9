"""Budgets under concurrency and across restarts: requests reserve their worst case before they
are dispatched, settle their real usage after, and the spend lives in SQLite."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes.neuron import FakeNeuron, GiB
from gateway_cluster import chat_body, cluster, eventually, spec

from cortex.core.config import GatewayConfig
from cortex.core.errors import SpendUnavailable
from cortex.gateway.assembly import Gateway
from cortex.gateway.auth import Principal
from cortex.gateway.budget import Budget, completion_reserve, prompt_estimate
from cortex.gateway.dialects.dialect import NeuronCall
from cortex.gateway.dialects.openai import CHAT
from cortex.gateway.ledger import Ledger, SqliteSpendStore
from cortex.gateway.proxy.exchange import Exchange

KEY = "sk-tight-budget"
HEADERS = {"x-api-key": KEY}
CATALOGUE = [spec("chat-a")]


def auth(path: Path | str, budget: int) -> dict[str, Any]:
    return {
        "enabled": True,
        "spend_db": str(path),
        "keys": [{"name": "tight", "key": KEY, "budget_tokens": budget}],
    }


def neuron() -> FakeNeuron:
    return FakeNeuron("n1", loaded={"chat-a": GiB})  # answers cost 1 prompt + 3 completion tokens


async def test_fifty_concurrent_requests_overspend_by_at_most_one_reservation(
    tmp_path: Path,
) -> None:
    n1 = neuron()
    n1.faults.hold = asyncio.Event()  # answers wait until every request was admitted or refused
    body = chat_body("chat-a", max_tokens=5)
    reservation = prompt_estimate(body) + completion_reserve(body, embedding=False, context=None)
    async with cluster(n1, catalogue=CATALOGUE, auth=auth(tmp_path / "spend.db", 60)) as c:
        tasks = [
            asyncio.create_task(c.http.post("/v1/chat/completions", json=body, headers=HEADERS))
            for _ in range(50)
        ]
        await eventually(lambda: len(n1.requests) + sum(t.done() for t in tasks) == 50)
        n1.faults.hold.set()
        answers: list[httpx.Response] = await asyncio.gather(*tasks)
        tight = c.gateway.auth.authenticate(HEADERS)
        spent = c.gateway.ledger.spent(tight, time.time())
        assert c.gateway.ledger.reserved("tight") == 0  # every reservation was settled
    served = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    assert served and len(served) + len(refused) == 50
    assert all(a.json()["error"]["code"] == "budget_exceeded" for a in refused)
    assert spent == 4 * len(served)
    assert spent <= 60 + reservation, (spent, reservation)


async def test_an_answer_past_the_request_timeout_is_charged_its_reservation() -> None:
    """The neuron took the call and may be generating still: what it made is not known, so the
    key pays the worst case it reserved, not nothing."""
    n1 = neuron()
    n1.faults.hold = asyncio.Event()  # the neuron works on past [gateway] request_timeout
    tuning = {"request_timeout": 1}
    budget = auth(":memory:", 10_000)
    async with cluster(n1, catalogue=CATALOGUE, auth=budget, gateway=tuning) as c:
        ledger, body = c.gateway.ledger, chat_body("chat-a", max_tokens=500)
        asked = asyncio.create_task(c.http.post("/v1/chat/completions", json=body, headers=HEADERS))
        await eventually(lambda: len(n1.requests) == 1)
        reserved = ledger.reserved("tight")
        answer = await asked
        assert answer.status_code == 504 and answer.json()["error"]["code"] == "neuron_timeout"
        tight = c.gateway.auth.authenticate(HEADERS)
        assert reserved > 500 and ledger.spent(tight, time.time()) == reserved
        assert ledger.reserved("tight") == 0
        n1.faults.hold.set()


async def test_prompts_dense_in_tokens_overspend_by_at_most_one_reservation() -> None:
    """Single digits are a token each: a quarter of the body's bytes fell short of them, so
    five such requests ran at once on a budget for two."""
    n1 = neuron()
    n1.faults.hold = asyncio.Event()
    digits = " ".join(str(i % 10) for i in range(4000))  # the fake neuron counts 4000 tokens
    body = chat_body("chat-a", digits, max_tokens=5)
    reservation = prompt_estimate(body) + 5
    async with cluster(n1, catalogue=CATALOGUE, auth=auth(":memory:", 10_000)) as c:
        tasks = [
            asyncio.create_task(c.http.post("/v1/chat/completions", json=body, headers=HEADERS))
            for _ in range(8)
        ]
        await eventually(lambda: len(n1.requests) + sum(t.done() for t in tasks) == 8)
        n1.faults.hold.set()
        await asyncio.gather(*tasks)
        spent = c.gateway.ledger.spent(c.gateway.auth.authenticate(HEADERS), time.time())
    assert 0 < spent <= 10_000 + reservation, (spent, reservation)


async def test_a_restart_keeps_the_spend(tmp_path: Path) -> None:
    path = tmp_path / "gateway.sqlite3"
    async with cluster(neuron(), catalogue=CATALOGUE, auth=auth(path, 10)) as c:
        answers = [
            await c.http.post("/v1/chat/completions", json=chat_body("chat-a"), headers=HEADERS)
            for _ in range(4)
        ]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]  # 4 + 4 + 4 > 10
    async with cluster(neuron(), catalogue=CATALOGUE, auth=auth(path, 10)) as c:
        tight = c.gateway.auth.authenticate(HEADERS)
        assert c.gateway.ledger.spent(tight, time.time()) == 12
        again = await c.http.post("/v1/chat/completions", json=chat_body("chat-a"), headers=HEADERS)
        assert again.status_code == 429 and again.headers["retry-after"] == "3600"


async def test_an_abandoned_stream_gives_its_reservation_back(tmp_path: Path) -> None:
    n1 = neuron()
    n1.faults.hold = asyncio.Event()  # the stream stops after its first chunk
    async with cluster(n1, catalogue=CATALOGUE, auth=auth(":memory:", 10_000)) as c:
        body = chat_body("chat-a", max_tokens=50, stream=True)
        async with c.http.stream(
            "POST", "/v1/chat/completions", json=body, headers=HEADERS
        ) as stream:
            async for _ in stream.aiter_bytes():
                assert c.gateway.ledger.reserved("tight") > 50
                break
        await eventually(lambda: c.gateway.ledger.reserved("tight") == 0)
        tight = c.gateway.auth.authenticate(HEADERS)
        # Its prompt (never counted to us: the reserved bound) and what it was sent, not its 50.
        assert 0 < c.gateway.ledger.spent(tight, time.time()) < prompt_estimate(body) + 50


class Cancelled:
    """A dispatcher whose call is cancelled before the neuron answers (the server stopping)."""

    async def ask(self, exchange: Exchange, call: NeuronCall) -> dict[str, Any]:
        raise asyncio.CancelledError


async def test_the_proxy_settles_a_call_cancelled_before_its_answer() -> None:
    ledger = Ledger(SqliteSpendStore(":memory:"))
    principal = Principal("k", budget=Budget(100))
    reservation = ledger.reserve(principal, 40, 0)
    exchange = Exchange("m", "openai", principal, deadline=0, reservation=reservation)
    assert ledger.reserved("k") == 40
    proxy = Gateway(GatewayConfig(), []).proxy
    proxy.dispatcher = Cancelled()  # type: ignore[assignment]
    scope = {"type": "http", "path": "/v1/chat/completions"}
    with pytest.raises(asyncio.CancelledError):
        await proxy.run(exchange, CHAT, CHAT.parse(chat_body("m")), scope, None, None)  # type: ignore[arg-type]
    assert ledger.reserved("k") == 0 and ledger.spent(principal, time.time()) == 0


def test_a_budget_with_no_spend_store_is_refused_not_run_free() -> None:
    with pytest.raises(SpendUnavailable) as refused:
        Ledger(None).reserve(Principal("k", budget=Budget(100)), 40, 0)
    assert refused.value.status == 503


PROMPT = " ".join(["word"] * 5000)  # 5000 prompt tokens, as the fake neuron counts them
CUT_STREAMS = {
    "/v1/chat/completions": chat_body("chat-a", PROMPT, stream=True, max_tokens=64),
    "/v1/completions": {"model": "chat-a", "prompt": PROMPT, "stream": True, "max_tokens": 64},
    "/v1/responses": {"model": "chat-a", "input": PROMPT, "stream": True, "max_output_tokens": 64},
    "/v1/messages": {**chat_body("chat-a", PROMPT, stream=True), "max_tokens": 64},
}


@pytest.mark.parametrize("path", list(CUT_STREAMS))
async def test_a_stream_cut_before_its_usage_came_is_charged_its_prompt(path: str) -> None:
    """This neuron reports usage only at the end: a client leaving after the first token still
    pays for the prompt the neuron read (its estimate), not for the one token it saw."""
    n1 = neuron()
    n1.faults.hold = asyncio.Event()  # the stream stops after its first chunk
    async with cluster(n1, catalogue=CATALOGUE, auth=auth(":memory:", 10**6)) as c:
        async with c.http.stream("POST", path, json=CUT_STREAMS[path], headers=HEADERS) as cut:
            seen = b""
            async for chunk in cut.aiter_bytes():
                seen += chunk
                if b"Hello" in seen:
                    break
        await eventually(lambda: c.gateway.ledger.reserved("tight") == 0)
        tight = c.gateway.auth.authenticate(HEADERS)
        assert c.gateway.ledger.spent(tight, time.time()) >= 5000


async def test_a_plain_call_whose_client_left_is_charged_its_prompt() -> None:
    n1 = neuron()
    n1.faults.hold = asyncio.Event()  # the neuron works on the answer until the client leaves
    async with cluster(n1, catalogue=CATALOGUE, auth=auth(":memory:", 10**6)) as c:
        body = chat_body("chat-a", PROMPT, max_tokens=64)
        asked = asyncio.create_task(c.http.post("/v1/chat/completions", json=body, headers=HEADERS))
        await eventually(lambda: len(n1.requests) == 1)
        asked.cancel()
        await eventually(lambda: n1.disconnects == 1 and c.gateway.ledger.reserved("tight") == 0)
        tight = c.gateway.auth.authenticate(HEADERS)
        spent = c.gateway.ledger.spent(tight, time.time())
        assert spent >= 5000
        # A call the neuron refused costs nothing.
        n1.faults.hold, n1.faults.reject = None, "no"
        refused = await c.http.post("/v1/chat/completions", json=body, headers=HEADERS)
        assert refused.status_code == 400
        assert c.gateway.ledger.spent(tight, time.time()) == spent
