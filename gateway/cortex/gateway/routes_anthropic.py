"""The Anthropic surface: /v1/messages and count_tokens, served by the neuron's chat API."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from cortex.core.errors import CortexError, NeuronUnavailable
from cortex.core.protocol.anthropic import CountTokensRequest, CountTokensResponse, MessagesRequest
from cortex.core.protocol.errors import anthropic_error
from cortex.gateway.payload import parse, read_json
from cortex.gateway.router import conversation_key
from cortex.gateway.translate.anthropic import (
    KEEPALIVE,
    StreamTranslator,
    encode_sse,
    from_chat_response,
    to_chat_request,
)
from cortex.gateway.translated import chat_completion, chat_stream
from cortex.gateway.wiring import authenticate, gateway_of

router = APIRouter(dependencies=[Depends(authenticate)])

TOKENIZE_PATH = "/tokenize"


@router.post("/v1/messages")
async def messages(request: Request) -> Response:
    gateway = gateway_of(request)
    data = await read_json(request, gateway.config.gateway.max_body_bytes)
    req = parse(data, MessagesRequest)
    chat = to_chat_request(req)
    call = gateway.begin(
        request, "anthropic", req.model, conversation_key(chat.messages), body=data
    )
    body = {**chat.model_dump(exclude_none=True), "model": call.model}
    if not req.stream:
        completion = await chat_completion(gateway, call, body)
        return JSONResponse(from_chat_response(completion, req).model_dump())
    translator = StreamTranslator(req, f"msg_{uuid.uuid4().hex[:24]}")

    def failed(err: CortexError) -> Iterable[bytes]:
        kind = anthropic_error(err)["error"]["type"]
        return [encode_sse(event) for event in translator.error(err.message, kind)]

    return await chat_stream(
        gateway,
        call,
        body,
        translator,
        encode_sse,
        keepalive=lambda: KEEPALIVE,
        on_error=failed,
    )


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> dict[str, Any]:
    """Counted by the model's own tokenizer and chat template, on a neuron that has the model."""
    gateway = gateway_of(request)
    data = await read_json(request, gateway.config.gateway.max_body_bytes)
    req = parse(data, CountTokensRequest)
    chat = to_chat_request(req)
    call = gateway.begin(request, "anthropic", req.model, conversation_key(chat.messages))
    body = {
        "model": call.model,
        "messages": [m.model_dump(exclude_none=True) for m in chat.messages],
        "tools": [t.model_dump(exclude_none=True) for t in chat.tools or []] or None,
    }
    answer = await gateway.dispatcher.post(call, TOKENIZE_PATH, body)
    count = answer.get("count")
    if not isinstance(count, int):
        raise NeuronUnavailable(f"neuron {call.neuron} answered /tokenize without a count")
    gateway.accounting.finish(call)
    return CountTokensResponse(input_tokens=count).model_dump()
