"""Shutdown's grace running out while streams are open (docs/architecture.md, "Graceful
shutdown"): each stream ends with its dialect's `shutting_down` error, and is recorded so."""

from __future__ import annotations

import asyncio
import json

import pytest
from fakes.neuron import FakeNeuron, GiB
from gateway_cluster import chat_body, cluster, eventually, spec

MODEL = "chat-a"


@pytest.mark.parametrize("surface", ["openai", "anthropic"])
async def test_a_stream_open_when_the_grace_runs_out_ends_with_shutting_down(
    surface: str,
) -> None:
    n1 = FakeNeuron("n1", loaded={MODEL: GiB}, reply="one two three four")
    n1.faults.hold = asyncio.Event()  # the neuron holds each stream after its first chunk
    path, body = "/v1/chat/completions", chat_body(MODEL, stream=True)
    if surface == "anthropic":
        path, body = "/v1/messages", {**body, "max_tokens": 20}
    async with cluster(n1, catalogue=[spec(MODEL)], gateway={"shutdown_grace": 0.2}) as c:
        async with c.http.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            async for line in lines:
                if "one" in line:
                    break  # the first token is out; the neuron holds the rest
            c.gateway.drain.begin()  # what SIGTERM does
            rest = [line async for line in lines]
        data = [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
        if surface == "openai":
            assert data[-1]["error"]["code"] == "shutting_down"
            assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
        else:
            assert "event: error" in rest
            assert data[-1]["type"] == "error" and data[-1]["error"]["type"] == "api_error"
            assert "shutting down" in data[-1]["error"]["message"]
        cut = c.gateway.metrics.errors.labels(MODEL, "n1", surface, "shutting_down")
        await eventually(lambda: cut._value.get() == 1)
