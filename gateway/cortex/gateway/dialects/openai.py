"""The OpenAI dialects: chat completions, completions and embeddings, passed to the neuron as the
client sent them (with the resolved model id) and answered as the neuron answered."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from cortex.core.errors import CortexError
from cortex.core.protocol.errors import openai_error
from cortex.core.protocol.openai import (
    DONE,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    StreamOptions,
    Usage,
    sse_data,
)
from cortex.gateway.dialects.affinity import conversation_key, prompt_key
from cortex.gateway.dialects.dialect import (
    Chat,
    ClientRequest,
    Completion,
    Embedding,
    NeuronCall,
    ReplyStream,
    Surface,
    validate,
)

KEEPALIVE = b": keep-alive\n\n"
DONE_FRAME = f"data: {DONE}\n\n".encode()


def error_event(err: CortexError) -> bytes:
    """What an OpenAI client reads when a stream fails mid-way (the SDKs raise on it)."""
    return f"data: {json.dumps(openai_error(err))}\n\n".encode() + DONE_FRAME


def usage_of(answer: Mapping[str, Any]) -> Usage | None:
    """Token usage of a neuron's answer (embeddings report prompt tokens only)."""
    usage = answer.get("usage")
    if not isinstance(usage, dict) or "prompt_tokens" not in usage:
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def has_token(payload: Mapping[str, Any]) -> bool:
    """Whether a chat or completion chunk carries output (text or a tool call)."""
    for choice in payload.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls") or choice.get("text"):
            return True
    return False


class PassThrough:
    """The neuron's OpenAI stream, event by event, unchanged, except the usage that cortex asked
    for on its own account when the client did not: the usage-only chunk, and the usage so far
    on every chunk (the client reads each chunk as the neuron would have sent it without)."""

    def __init__(self, include_usage: bool, continuous_usage: bool = False) -> None:
        self._include_usage = include_usage
        self._continuous_usage = continuous_usage
        self._usage: dict[str, Any] | None = None  # the last reported, read once at the end
        self._tokens = 0  # output chunks: the estimate when the neuron reports no usage

    def keepalive(self) -> bytes:
        return KEEPALIVE

    def feed(self, event: bytes, payload: dict[str, Any] | None) -> list[bytes]:
        if payload is None:
            return [event]
        usage = payload.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        if has_token(payload):
            self._tokens += 1
        if "usage" not in payload:
            return [event]
        if not payload.get("choices"):
            return [event] if self._include_usage else []
        if self._continuous_usage or not isinstance(usage, dict):
            return [event]
        return [sse_data({k: v for k, v in payload.items() if k != "usage"})]

    def finish(self) -> list[bytes]:
        return [DONE_FRAME]

    def fail(self, err: CortexError) -> list[bytes]:
        return [error_event(err)]

    def usage(self) -> Usage:
        if self._usage is not None:
            with contextlib.suppress(ValidationError):  # unreadable: the estimate stands
                return Usage.model_validate(self._usage)
        return Usage(prompt_tokens=0, completion_tokens=self._tokens, total_tokens=self._tokens)


@dataclass
class Forwarded:
    """An OpenAI request, forwarded as the client sent it."""

    data: dict[str, Any]
    model: str
    affinity: str | None
    stream: bool
    include_usage: bool
    kind: type[Chat] | type[Completion] | type[Embedding]
    continuous_usage: bool = False

    @property
    def budgeted(self) -> Mapping[str, Any]:
        return self.data

    def neuron_call(self, model: str) -> NeuronCall:
        body = {**self.data, "model": model}
        if self.stream:
            # Usage is always asked for upstream, on every chunk: token metrics and budgets need
            # it, and a stream cut short still has its prompt's count (docs/security.md, "Token
            # budgets"). The PassThrough takes out again what the client did not ask for.
            options = {
                **(self.data.get("stream_options") or {}),
                "include_usage": True,
                "continuous_usage_stats": True,
            }
            body["stream_options"] = options
        return self.kind(body)

    def answer(self, reply: dict[str, Any]) -> tuple[dict[str, Any], Usage | None]:
        return reply, usage_of(reply)

    def reply_stream(self) -> ReplyStream:
        return PassThrough(self.include_usage, self.continuous_usage)

    def client_error(self, err: CortexError) -> CortexError:
        return err  # the neuron was asked what the client sent


def _wants_usage(options: StreamOptions | None) -> tuple[bool, bool]:
    """Whether the client asked for the usage chunk, and for the usage so far on every chunk."""
    if options is None:
        return False, False
    return options.include_usage, options.continuous_usage_stats


class OpenAIDialect:
    surface: Surface = "openai"

    def error_body(self, err: CortexError) -> dict[str, Any]:
        return openai_error(err)

    def error_status(self, err: CortexError) -> int:
        return err.status


class ChatDialect(OpenAIDialect):
    """/v1/chat/completions."""

    def parse(self, data: dict[str, Any]) -> ClientRequest:
        req = validate(data, ChatCompletionRequest)
        key = conversation_key(req.messages)
        usage, continuous = _wants_usage(req.stream_options)
        return Forwarded(data, req.model, key, bool(req.stream), usage, Chat, continuous)


class CompletionsDialect(OpenAIDialect):
    """/v1/completions."""

    def parse(self, data: dict[str, Any]) -> ClientRequest:
        req = validate(data, CompletionRequest)
        prompt = req.prompt if isinstance(req.prompt, str) else None
        key = prompt_key(prompt) if prompt else None
        usage, continuous = _wants_usage(req.stream_options)
        return Forwarded(data, req.model, key, bool(req.stream), usage, Completion, continuous)


class EmbeddingsDialect(OpenAIDialect):
    """/v1/embeddings."""

    def parse(self, data: dict[str, Any]) -> ClientRequest:
        req = validate(data, EmbeddingRequest)
        return Forwarded(data, req.model, None, False, False, Embedding)


CHAT = ChatDialect()
COMPLETIONS = CompletionsDialect()
EMBEDDINGS = EmbeddingsDialect()
