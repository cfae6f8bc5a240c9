"""Builders both translator test modules share: upstream chat chunks and completions, and SDK
clients whose HTTP is a mock transport (no server)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import httpx2

from cortex.core.protocol.openai import ChatCompletion, ChatCompletionChunk

Handler = Callable[[httpx2.Request], httpx2.Response]


def chunk(
    content: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
    **choice_extra: Any,
) -> ChatCompletionChunk:
    """One upstream chunk; a chunk with only `usage` has no choices, as OpenAI sends it."""
    choices = []
    if content is not None or tool_calls is not None or finish is not None:
        delta = {"content": content, "tool_calls": tool_calls}
        choices = [{"index": 0, "delta": delta, "finish_reason": finish, **choice_extra}]
    body = {"id": "chatcmpl-x", "created": 1, "model": "m", "choices": choices, "usage": usage}
    return ChatCompletionChunk.model_validate(body)


def call_delta(index: int, arguments: str, name: str | None = None, id: str | None = None) -> dict:
    function: dict[str, Any] = {"arguments": arguments}
    if name is not None:
        function["name"] = name
    return {"index": index, "id": id, "type": "function" if id else None, "function": function}


def usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def chat_completion(
    content: str | None,
    tool_calls: Iterable[tuple[str, str, str]],
    finish: str,
    usage: dict[str, Any],
    **choice_extra: Any,
) -> ChatCompletion:
    """A non-streamed upstream answer; tool calls as (id, name, arguments)."""
    calls = [
        {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
        for i, n, a in tool_calls
    ]
    message = {"role": "assistant", "content": content, "tool_calls": calls or None}
    return ChatCompletion.model_validate(
        {
            "id": "chatcmpl-abc",
            "created": 7,
            "model": "smollm2-135m-instruct",
            "choices": [{"index": 0, "message": message, "finish_reason": finish, **choice_extra}],
            "usage": usage,
        }
    )


def mock_http(handler: Handler) -> httpx2.Client:
    """An HTTP client for an SDK whose every request `handler` answers."""
    return httpx2.Client(transport=httpx2.MockTransport(handler))


def replay(frames: Iterable[bytes]) -> Handler:
    """A handler answering every request with these SSE frames."""
    body = b"".join(frames)
    headers = {"content-type": "text/event-stream"}
    return lambda _: httpx2.Response(200, headers=headers, content=body)


class Translator(Protocol):
    def start(self) -> list[Any]: ...
    def feed(self, chunk: ChatCompletionChunk) -> list[Any]: ...
    def finish(self) -> list[Any]: ...


def run_stream(translator: Translator, chunks: list[ChatCompletionChunk]) -> list[Any]:
    """Every event the translator emits for these chunks, start to finish."""
    events = translator.start()
    for c in chunks:
        events += translator.feed(c)
    return events + translator.finish()
