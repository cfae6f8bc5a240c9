"""The OpenAI Responses dialect: /v1/responses, served by the neuron's chat API
(translate/responses.py does the translation)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cortex.core.errors import CortexError
from cortex.core.protocol.errors import openai_error
from cortex.core.protocol.openai import ChatCompletionChunk, ChatCompletionRequest, Usage
from cortex.gateway.dialects.affinity import conversation_key
from cortex.gateway.dialects.dialect import (
    Chat,
    ClientRequest,
    NeuronCall,
    ReplyStream,
    Surface,
    chat_completion,
    validate,
)
from cortex.gateway.dialects.openai import KEEPALIVE
from cortex.gateway.translate.responses import (
    ResponsesStreamTranslator,
    encode_sse,
    from_chat_response,
    to_chat_request,
)
from cortex.gateway.wire.responses import ResponsesRequest


class ResponsesStream:
    """The neuron's chat stream as Responses events."""

    def __init__(self, req: ResponsesRequest) -> None:
        response_id = f"resp_{uuid.uuid4().hex[:24]}"
        self._translator = ResponsesStreamTranslator(req, response_id, int(time.time()))

    def keepalive(self) -> bytes:
        return KEEPALIVE

    def feed(self, event: bytes, payload: dict[str, Any] | None) -> list[bytes]:
        if payload is None:
            return []
        chunk = ChatCompletionChunk.model_validate(payload)
        return [encode_sse(e) for e in self._translator.feed(chunk)]

    def finish(self) -> list[bytes]:
        return [encode_sse(e) for e in self._translator.finish()]

    def fail(self, err: CortexError) -> list[bytes]:
        # response.created first when the stream fails before it began (a failed cold load).
        events = [*self._translator.start(), *self._translator.error(err.message, err.code)]
        return [encode_sse(e) for e in events]

    def usage(self) -> Usage:
        return self._translator.usage()


@dataclass
class Responses:
    """A /v1/responses request and the chat request that serves it."""

    req: ResponsesRequest
    chat: ChatCompletionRequest
    budgeted: Mapping[str, Any]
    model: str = field(init=False)
    affinity: str = field(init=False)
    stream: bool = field(init=False)

    def __post_init__(self) -> None:
        self.model, self.stream = self.req.model, self.req.stream
        self.affinity = conversation_key(self.chat.messages)

    def neuron_call(self, model: str) -> NeuronCall:
        return Chat({**self.chat.model_dump(exclude_none=True), "model": model})

    def answer(self, reply: dict[str, Any]) -> tuple[dict[str, Any], Usage | None]:
        completion = chat_completion(reply)
        return from_chat_response(completion, self.req).model_dump(), completion.usage

    def reply_stream(self) -> ReplyStream:
        return ResponsesStream(self.req)


class ResponsesDialect:
    """/v1/responses (OpenAI's error envelope)."""

    surface: Surface = "responses"

    def parse(self, data: dict[str, Any]) -> ClientRequest:
        req = validate(data, ResponsesRequest)
        return Responses(req, to_chat_request(req), data)

    def error_body(self, err: CortexError) -> dict[str, Any]:
        return openai_error(err)


RESPONSES = ResponsesDialect()
