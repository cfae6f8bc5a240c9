"""What the surfaces that a neuron's chat completion serves (Anthropic Messages, OpenAI Responses)
share: the request paired with its chat request, and the stream made of translated events. Each
dialect supplies its translation."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel

from cortex.core.errors import CortexError
from cortex.core.protocol.openai import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Usage,
)
from cortex.gateway.dialects.affinity import conversation_key
from cortex.gateway.dialects.dialect import Chat, NeuronCall, ReplyStream, chat_completion
from cortex.gateway.translate.chat_stream import ChatStreamTranslator

E = TypeVar("E")


class TranslatedStream(Generic[E]):
    """The neuron's chat stream as another surface's events; the dialect adds how it fails."""

    def __init__(
        self, translator: ChatStreamTranslator[E], encode: Callable[[E], bytes], keepalive: bytes
    ) -> None:
        self._translator, self._encode, self._keepalive = translator, encode, keepalive

    def keepalive(self) -> bytes:
        return self._keepalive

    def feed(self, event: bytes, payload: dict[str, Any] | None) -> list[bytes]:
        if payload is None:
            # The neuron's keep-alive (a comment): it generates what it does not stream yet, so
            # the client hears the dialect's own (Anthropic's ping once begun), not silence.
            return self.frames(self._translator.idle()) or [self._keepalive]
        return self.frames(self._translator.feed(ChatCompletionChunk.model_validate(payload)))

    def finish(self) -> list[bytes]:
        return self.frames(self._translator.finish())

    def usage(self) -> Usage:
        return self._translator.usage()

    def frames(self, events: list[E]) -> list[bytes]:
        return [self._encode(e) for e in events]


class SurfaceRequest(Protocol):
    """A client request of a translated surface, as its wire model reads it."""

    @property
    def model(self) -> str: ...

    @property
    def stream(self) -> bool: ...


R = TypeVar("R", bound=SurfaceRequest)


@dataclass
class ChatBacked(Generic[R]):
    """A request of a translated surface and the chat request that serves it."""

    req: R
    chat: ChatCompletionRequest
    budgeted: Mapping[str, Any]
    model: str = field(init=False)
    affinity: str = field(init=False)
    stream: bool = field(init=False)

    def __post_init__(self) -> None:
        self.model, self.stream = self.req.model, self.req.stream
        self.affinity = conversation_key(self.chat.messages)
        # One choice, the chat request's: an `n` in this API's body asks for nothing, and the
        # budget's reserve would count it (budget.completion_reserve).
        self.budgeted = {**self.budgeted, "n": self.chat.n}

    def neuron_call(self, model: str) -> NeuronCall:
        return Chat({**self.chat.model_dump(exclude_none=True), "model": model})

    def answer(self, reply: dict[str, Any]) -> tuple[dict[str, Any], Usage | None]:
        completion = chat_completion(reply)
        return self.translate(completion).model_dump(), completion.usage

    def translate(self, completion: ChatCompletion) -> BaseModel:
        """The surface's answer from the neuron's chat completion."""
        raise NotImplementedError

    def reply_stream(self) -> ReplyStream:
        raise NotImplementedError

    def client_error(self, err: CortexError) -> CortexError:
        return err  # Anthropic's envelope names no field
