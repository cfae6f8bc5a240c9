"""The OpenAI Responses surface (SPEC G1): /v1/responses, served by the neuron's chat API."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from cortex.core.errors import CortexError, NeuronUnavailable
from cortex.core.protocol.openai import ChatCompletion
from cortex.core.protocol.responses import ResponsesRequest
from cortex.gateway.payload import parse, read_json
from cortex.gateway.relay import OPENAI_KEEPALIVE, relay_translated
from cortex.gateway.router import conversation_key
from cortex.gateway.translate.responses import (
    ResponsesStreamTranslator,
    encode_sse,
    from_chat_response,
    to_chat_request,
)
from cortex.gateway.wiring import authenticate, gateway_of

router = APIRouter(dependencies=[Depends(authenticate)])

CHAT_PATH = "/v1/chat/completions"


@router.post("/v1/responses")
async def responses(request: Request) -> Response:
    gateway = gateway_of(request)
    data = await read_json(request, gateway.config.gateway.max_body_bytes)
    req = parse(data, ResponsesRequest)
    chat = to_chat_request(req)
    call = gateway.begin(request, "responses", req.model, conversation_key(chat.messages))
    body = {**chat.model_dump(exclude_none=True), "model": call.model}
    if not req.stream:
        answer = await gateway.dispatcher.post(call, CHAT_PATH, body)
        try:
            completion = ChatCompletion.model_validate(answer)
        except ValidationError as exc:
            raise NeuronUnavailable(f"neuron answered an unreadable completion: {exc}") from None
        gateway.accounting.finish(call, usage=completion.usage)
        return JSONResponse(from_chat_response(completion, req).model_dump())
    translator = ResponsesStreamTranslator(req, f"resp_{uuid.uuid4().hex[:24]}", int(time.time()))

    def failed(err: CortexError) -> Iterable[bytes]:
        # response.created first when the stream fails before it began (a failed cold load).
        events = [*translator.start(), *translator.error(err.message, err.code)]
        return [encode_sse(event) for event in events]

    return await gateway.stream(
        call,
        CHAT_PATH,
        body,
        lambda upstream: relay_translated(
            upstream, call, gateway.accounting, translator, encode_sse, failed
        ),
        keepalive=lambda: OPENAI_KEEPALIVE,
        on_error=failed,
    )
