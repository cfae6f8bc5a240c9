"""What the gateway passes on unchanged arrives unchanged: a neuron's plain OpenAI answer reaches
the client in the neuron's own bytes (the proxy does not encode again what it only read), while
an answer a dialect translates is still the dialect's."""

from __future__ import annotations

from typing import Any

from fakes.neuron import FakeNeuron, GiB
from gateway_cluster import chat_body, cluster, spec
from starlette.types import Receive, Scope, Send

MODEL = "chat-a"
# Spaced, escaped and ordered as no JSON encoder of the gateway would write it.
ANSWER = (
    b'{"usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},\n'
    b' "id": "chatcmpl-raw", "object": "chat.completion", "created": 1, "model": "chat-a",'
    b' "choices": [{"index": 0, "message": {"role": "assistant", "content": "caf\\u00e9"},'
    b' "finish_reason": "stop"}]}'
)


def answering_raw(neuron: FakeNeuron) -> FakeNeuron:
    """The fake neuron, but its plain chat answers are ANSWER, byte for byte."""
    inner = neuron.app

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            await inner(scope, receive, send)
            return
        while (await receive()).get("more_body"):
            pass
        start = {"type": "http.response.start", "status": 200}
        await send({**start, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": ANSWER})

    neuron.app = app  # type: ignore[method-assign,assignment]
    return neuron


async def test_a_plain_openai_answer_arrives_byte_identical() -> None:
    neuron = answering_raw(FakeNeuron("n1", loaded={MODEL: GiB}))
    async with cluster(neuron, catalogue=[spec(MODEL)]) as c:
        response = await c.http.post("/v1/chat/completions", json=chat_body(MODEL))
        assert response.status_code == 200
        assert response.content == ANSWER
        assert response.headers["content-type"] == "application/json"
        assert response.headers["content-length"] == str(len(ANSWER))
        # ...and is still read: its usage is accounted.
        usage = c.gateway.metrics.completion_tokens.labels(MODEL, "n1")
        assert usage._value.get() == 2


async def test_an_answer_the_dialect_translates_is_the_dialects() -> None:
    neuron = answering_raw(FakeNeuron("n1", loaded={MODEL: GiB}))
    async with cluster(neuron, catalogue=[spec(MODEL)]) as c:
        body: dict[str, Any] = {**chat_body(MODEL), "max_tokens": 8}
        response = await c.http.post("/v1/messages", json=body)
        assert response.status_code == 200, response.text
        message = response.json()
        assert message["type"] == "message" and message["content"][0]["text"] == "café"
        assert message["usage"]["output_tokens"] == 2
