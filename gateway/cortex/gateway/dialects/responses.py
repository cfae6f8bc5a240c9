"""The OpenAI Responses dialect: /v1/responses, served by the neuron's chat API
(translate/responses.py does the translation)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel

from cortex.core.errors import CortexError
from cortex.core.protocol.errors import openai_error
from cortex.core.protocol.openai import ChatCompletion, ChatCompletionRequest
from cortex.gateway.dialects.chat_surface import ChatBacked, TranslatedStream
from cortex.gateway.dialects.dialect import (
    ClientRequest,
    ReplyStream,
    Surface,
    translated,
    validate,
)
from cortex.gateway.dialects.openai import KEEPALIVE
from cortex.gateway.translate.responses import (
    ResponsesStreamTranslator,
    client_error,
    encode_sse,
    from_chat_response,
    to_chat_request,
)
from cortex.gateway.wire.responses import ResponsesEvent, ResponsesRequest


class ResponsesStream(TranslatedStream[ResponsesEvent]):
    """The neuron's chat stream as Responses events."""

    def __init__(self, req: ResponsesRequest, chat: ChatCompletionRequest) -> None:
        response_id = f"resp_{uuid.uuid4().hex[:24]}"
        self._req, self._chat = req, chat
        self._events = ResponsesStreamTranslator(req, response_id, int(time.time()))
        super().__init__(self._events, encode_sse, KEEPALIVE)

    def fail(self, err: CortexError) -> list[bytes]:
        # response.created first when the stream fails before it began (a failed cold load).
        err = client_error(err, self._req, self._chat)
        failed = self._events.error(err.message, err.code, err.status)
        return self.frames([*self._events.start(), *failed])


class Responses(ChatBacked[ResponsesRequest]):
    """A /v1/responses request and the chat request that serves it."""

    def translate(self, completion: ChatCompletion) -> BaseModel:
        return from_chat_response(completion, self.req)

    def reply_stream(self) -> ReplyStream:
        return ResponsesStream(self.req, self.chat)

    def client_error(self, err: CortexError) -> CortexError:
        return client_error(err, self.req, self.chat)


class ResponsesDialect:
    """/v1/responses (OpenAI's error envelope)."""

    surface: Surface = "responses"

    def parse(self, data: dict[str, Any]) -> ClientRequest:
        req = validate(data, ResponsesRequest)
        return Responses(req, translated(to_chat_request, req), data)

    def error_body(self, err: CortexError) -> dict[str, Any]:
        return openai_error(err)

    def error_status(self, err: CortexError) -> int:
        return err.status


RESPONSES = ResponsesDialect()
