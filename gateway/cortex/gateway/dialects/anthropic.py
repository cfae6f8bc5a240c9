"""The Anthropic dialect: /v1/messages and /v1/messages/count_tokens, served by the neuron's chat
and /tokenize APIs (translate/anthropic.py does the translation)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from cortex.core.errors import CortexError
from cortex.core.protocol.errors import anthropic_error, anthropic_status
from cortex.core.protocol.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
)
from cortex.gateway.dialects.affinity import conversation_key
from cortex.gateway.dialects.chat_surface import ChatBacked, TranslatedStream
from cortex.gateway.dialects.dialect import (
    ClientRequest,
    NeuronCall,
    ReplyStream,
    Surface,
    Tokenize,
    translated,
    validate,
)
from cortex.gateway.translate.anthropic import (
    KEEPALIVE,
    StreamTranslator,
    encode_sse,
    from_chat_response,
    to_chat_request,
)
from cortex.gateway.wire.anthropic import (
    AnthropicEvent,
    CountTokensRequest,
    CountTokensResponse,
    MessagesRequest,
)


class MessagesStream(TranslatedStream[AnthropicEvent]):
    """The neuron's chat stream as Anthropic's events."""

    def __init__(self, req: MessagesRequest) -> None:
        self._events = StreamTranslator(req, f"msg_{uuid.uuid4().hex[:24]}")
        super().__init__(self._events, encode_sse, KEEPALIVE)

    def fail(self, err: CortexError) -> list[bytes]:
        said = anthropic_error(err)["error"]
        return self.frames(self._events.error(said["message"], said["type"]))


class Messages(ChatBacked[MessagesRequest]):
    """A /v1/messages request and the chat request that serves it."""

    def translate(self, completion: ChatCompletion) -> BaseModel:
        return from_chat_response(completion, self.req)

    def reply_stream(self) -> ReplyStream:
        return MessagesStream(self.req)


@dataclass
class CountTokens:
    """A /v1/messages/count_tokens request: the neuron's /tokenize, through the model's own
    tokenizer and chat template. It reserves nothing and generates nothing."""

    req: CountTokensRequest
    chat: ChatCompletionRequest
    budgeted: None = None
    stream: bool = False
    model: str = field(init=False)
    affinity: str = field(init=False)

    def __post_init__(self) -> None:
        self.model, self.affinity = self.req.model, conversation_key(self.chat.messages)

    def neuron_call(self, model: str) -> NeuronCall:
        # The prompt /v1/messages would render: the tools it shows, a prefill left open.
        return Tokenize(
            TokenizeRequest(
                model=model,
                messages=self.chat.messages,
                tools=self.chat.offered_tools(),
                continue_final_message=self.chat.continue_final_message,
            )
        )

    def answer(self, reply: dict[str, Any]) -> tuple[dict[str, Any], Usage | None]:
        count = TokenizeResponse.model_validate(reply).count
        return CountTokensResponse(input_tokens=count).model_dump(), None

    def reply_stream(self) -> ReplyStream:
        raise NotImplementedError("count_tokens never streams")

    def client_error(self, err: CortexError) -> CortexError:
        return err  # Anthropic's envelope names no field


class AnthropicDialect:
    surface: Surface = "anthropic"

    def error_body(self, err: CortexError) -> dict[str, Any]:
        return anthropic_error(err)

    def error_status(self, err: CortexError) -> int:
        return anthropic_status(err)


class MessagesDialect(AnthropicDialect):
    """/v1/messages."""

    def parse(self, data: dict[str, Any]) -> ClientRequest:
        req = validate(data, MessagesRequest)
        return Messages(req, translated(to_chat_request, req), data)


class CountTokensDialect(AnthropicDialect):
    """/v1/messages/count_tokens."""

    def parse(self, data: dict[str, Any]) -> ClientRequest:
        req = validate(data, CountTokensRequest)
        return CountTokens(req, translated(to_chat_request, req))


MESSAGES = MessagesDialect()
COUNT_TOKENS = CountTokensDialect()
