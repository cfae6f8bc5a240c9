"""The inference routes' short road to the proxy (gateway/cortex/gateway/http/inference.py): a
bug before the proxy takes the call is still a 500 in the surface's envelope, counted, and the
request id still comes back; other methods still reach FastAPI's 405."""

from __future__ import annotations

from typing import Any

import pytest
from fakes.neuron import FakeNeuron, GiB
from gateway_cluster import cluster, spec

from cortex.gateway.dialects.anthropic import MessagesDialect
from cortex.gateway.dialects.openai import ChatDialect

MODEL = "chat-a"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def broken(self: object, data: dict[str, Any]) -> object:
    raise RuntimeError("a bug in a dialect")


async def test_a_bug_before_the_proxy_is_a_500_in_the_routes_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ChatDialect, "parse", broken)
    monkeypatch.setattr(MessagesDialect, "parse", broken)
    async with cluster(FakeNeuron("n1", loaded={MODEL: GiB}), catalogue=[spec(MODEL)]) as c:
        openai = await c.http.post(
            "/v1/chat/completions", json=CHAT, headers={"x-request-id": "r1"}
        )
        anthropic = await c.http.post("/v1/messages", json={**CHAT, "max_tokens": 8})
        assert openai.status_code == 500 and anthropic.status_code == 500
        assert openai.json()["error"]["message"] == "internal error: RuntimeError"
        assert openai.headers["x-request-id"] == "r1"
        assert anthropic.json()["type"] == "error"
        assert anthropic.json()["error"]["type"] == "api_error"
        scrape = (await c.http.get(f"{c.metrics_url}/metrics")).text
        counted = [
            line
            for line in scrape.splitlines()
            if line.startswith("cortex_request_errors_total") and 'neuron="none"' in line
        ]
        assert len(counted) == 2 and all(line.endswith(" 1.0") for line in counted), counted
        # The gateway goes on serving.
        assert (await c.http.get("/v1/models")).status_code == 200
        wrong = await c.http.get("/v1/chat/completions")
        assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
