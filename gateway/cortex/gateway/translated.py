"""The translated surfaces' road to a neuron (Anthropic Messages, OpenAI Responses): their requests
go to its chat API, and come back as one completion or as a chat stream in the client's dialect."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from fastapi.responses import Response
from pydantic import ValidationError

from cortex.core.errors import CortexError, NeuronUnavailable
from cortex.core.protocol.openai import ChatCompletion
from cortex.gateway.call import Call
from cortex.gateway.relay import EventTranslator, relay_translated
from cortex.gateway.wiring import Gateway

CHAT_PATH = "/v1/chat/completions"


async def chat_completion(gateway: Gateway, call: Call, body: dict[str, Any]) -> ChatCompletion:
    """The neuron's whole chat answer, its usage accounted to the call."""
    answer = await gateway.dispatcher.post(call, CHAT_PATH, body)
    try:
        completion = ChatCompletion.model_validate(answer)
    except ValidationError as exc:
        raise NeuronUnavailable(f"neuron answered an unreadable chat completion: {exc}") from None
    gateway.accounting.finish(call, usage=completion.usage)
    return completion


async def chat_stream(
    gateway: Gateway,
    call: Call,
    body: dict[str, Any],
    translator: EventTranslator,
    encode: Callable[[Any], bytes],
    *,
    keepalive: Callable[[], bytes],
    on_error: Callable[[CortexError], Iterable[bytes]],
) -> Response:
    """The neuron's chat stream through `translator`; a failure ends it with `on_error`'s frames."""
    return await gateway.stream(
        call,
        CHAT_PATH,
        body,
        lambda upstream: relay_translated(
            upstream, call, gateway.accounting, translator, encode, on_error
        ),
        keepalive=keepalive,
        on_error=on_error,
    )
