"""A stub OpenAI backend that also answers a neuron's polls: the fixed far end of the gateway benchmark.

A bare ASGI app (no framework, no validation, answers precomputed where possible) so that it is
never the bottleneck: P1 measures it directly first to show its ceiling. Run it alone with
`python -m bench.stub_backend --port P`; it serves until killed.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from starlette.types import Receive, Scope, Send

from cortex.core.catalogue import ModelSpec
from cortex.core.fleet import DeviceStatus, LoadedModel, ModelListing, ModelState, NeuronStatus

STUB_MODEL = "stub"
ANSWER_PIECES = ("Hello", " from", " the", " stub", ".")
PROMPT_TOKENS, COMPLETION_TOKENS = 12, len(ANSWER_PIECES)
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def neuron_status(model: str = STUB_MODEL) -> NeuronStatus:
    """One healthy cpu device with one ready model: all a gateway needs to route to the stub."""
    gib = 2**30
    loaded = LoadedModel(
        id=model,
        source="file:/stub",
        state=ModelState.READY,
        devices=["cpu-0"],
        memory_bytes=gib,
        context_length=8192,
        loaded_at=time.time(),
        progress=1.0,
    )
    device = DeviceStatus(
        id="cpu-0",
        index=0,
        kind="cpu",
        name="stub",
        memory_total=64 * gib,
        memory_free=63 * gib,
        memory_used=gib,
    )
    return NeuronStatus(node="stub", version="stub", devices=[device], models=[loaded])


def _usage() -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
    }


def chat_completion(model: str) -> bytes:
    body = {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(ANSWER_PIECES)},
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(),
    }
    return json.dumps(body).encode()


def chat_stream(model: str, include_usage: bool) -> list[bytes]:
    """The SSE events of a streamed answer: a role chunk, one chunk per piece, finish, usage, DONE."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None, usage: Any = None) -> bytes:
        choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
        body: dict[str, Any] = {
            "id": "chatcmpl-stub",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if usage:
            body["usage"] = usage
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events += [chunk({"content": piece}, None) for piece in ANSWER_PIECES]
    events.append(chunk({}, "stop"))
    if include_usage:
        events.append(chunk({}, None, _usage()))
    events.append(b"data: [DONE]\n\n")
    return events


class StubBackend:
    """The ASGI app: neuron lifecycle reads plus OpenAI chat completions, stream and not."""

    def __init__(self, model: str = STUB_MODEL) -> None:
        self.model = model
        listing = ModelListing(
            loaded=[neuron_status(model).models[0]],
            available=[ModelSpec(id=model, source="file:/stub")],
        )
        models = {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "stub"}]}
        self._gets = {
            "/health": b'{"status":"ok"}',
            "/models": listing.model_dump_json().encode(),
            "/v1/models": json.dumps(models).encode(),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/status":  # fresh timestamps each poll, as a neuron's
            await _send(send, 200, _JSON, [neuron_status(self.model).model_dump_json().encode()])
        elif method == "GET" and path in self._gets:
            await _send(send, 200, _JSON, [self._gets[path]])
        elif method == "POST" and path == "/v1/chat/completions":
            await self._chat(receive, send)
        else:
            await _send(send, 404, _JSON, [b'{"error":{"message":"not found","code":"not_found"}}'])

    async def _chat(self, receive: Receive, send: Send) -> None:
        body = json.loads(await _read_body(receive) or b"{}")
        model = str(body.get("model") or self.model)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            await _send(send, 200, _SSE, chat_stream(model, include_usage))
        else:
            await _send(send, 200, _JSON, [chat_completion(model)])


async def _read_body(receive: Receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


async def _send(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], parts: list[bytes]
) -> None:
    """One response; several parts are sent as separate body messages (SSE events, unbuffered)."""
    await send({"type": "http.response.start", "status": status, "headers": headers})
    for index, part in enumerate(parts):
        more = index < len(parts) - 1
        await send({"type": "http.response.body", "body": part, "more_body": more})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="stub OpenAI backend for the gateway benchmark")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default=STUB_MODEL)
    args = parser.parse_args()
    uvicorn.run(
        StubBackend(args.model),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
