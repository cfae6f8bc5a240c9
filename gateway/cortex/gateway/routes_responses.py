"""The OpenAI Responses surface: /v1/responses, served by the neuron's chat API."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from cortex.core.errors import CortexError
from cortex.core.protocol.responses import ResponsesRequest
from cortex.gateway.payload import parse, read_json
from cortex.gateway.relay import OPENAI_KEEPALIVE
from cortex.gateway.router import conversation_key
from cortex.gateway.translate.responses import (
    ResponsesStreamTranslator,
    encode_sse,
    from_chat_response,
    to_chat_request,
)
from cortex.gateway.translated import chat_completion, chat_stream
from cortex.gateway.wiring import authenticate, gateway_of

router = APIRouter(dependencies=[Depends(authenticate)])


@router.post("/v1/responses")
async def responses(request: Request) -> Response:
    gateway = gateway_of(request)
    data = await read_json(request, gateway.config.gateway.max_body_bytes)
    req = parse(data, ResponsesRequest)
    chat = to_chat_request(req)
    call = gateway.begin(
        request, "responses", req.model, conversation_key(chat.messages), body=data
    )
    body = {**chat.model_dump(exclude_none=True), "model": call.model}
    if not req.stream:
        completion = await chat_completion(gateway, call, body)
        return JSONResponse(from_chat_response(completion, req).model_dump())
    translator = ResponsesStreamTranslator(req, f"resp_{uuid.uuid4().hex[:24]}", int(time.time()))

    def failed(err: CortexError) -> Iterable[bytes]:
        # response.created first when the stream fails before it began (a failed cold load).
        events = [*translator.start(), *translator.error(err.message, err.code)]
        return [encode_sse(event) for event in events]

    return await chat_stream(
        gateway,
        call,
        body,
        translator,
        encode_sse,
        keepalive=lambda: OPENAI_KEEPALIVE,
        on_error=failed,
    )
