"""The OpenAI surface: models, chat completions, completions, embeddings."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from cortex.core.errors import ModelNotFound
from cortex.core.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    Usage,
)
from cortex.gateway.anthropic_models import model_info, model_page, wants_anthropic
from cortex.gateway.call import Call
from cortex.gateway.payload import parse, read_json
from cortex.gateway.relay import OPENAI_KEEPALIVE, openai_error_event, relay_openai
from cortex.gateway.router import conversation_key, prompt_key
from cortex.gateway.wiring import Gateway, authenticate, gateway_of

router = APIRouter(dependencies=[Depends(authenticate)])


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """The models the caller's key may use (its allowlist, by id or alias); in Anthropic's
    shape, with each model's limits, for a client that sends `anthropic-version`."""
    gateway = gateway_of(request)
    principal = request.state.principal
    specs = [s for s in gateway.catalogue.specs() if gateway.auth.allows(principal, s)]
    if wants_anthropic(request.headers):
        query = request.query_params
        # Messages clients can only use chat models: embeddings are left out of their list.
        infos = [model_info(s, gateway.model_card(s)) for s in specs if s.kind == "chat"]
        page = model_page(
            infos,
            limit=query.get("limit"),
            after_id=query.get("after_id"),
            before_id=query.get("before_id"),
        )
        return page.model_dump()
    # Dumped card by card: ModelList's declared item type would drop the cortex fields.
    return {"object": "list", "data": [gateway.model_card(s).model_dump() for s in specs]}


# `:path`: ids such as sentence-transformers/all-MiniLM-L6-v2 contain slashes.
@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    """A model outside the key's allowlist is answered as if it did not exist."""
    gateway = gateway_of(request)
    spec = gateway.catalogue.resolve(model_id)
    if not gateway.auth.allows(request.state.principal, spec):
        raise ModelNotFound(f"model {model_id!r} does not exist", param="model")
    if wants_anthropic(request.headers):
        return model_info(spec, gateway.model_card(spec)).model_dump()
    return gateway.model_card(spec).model_dump()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    gateway = gateway_of(request)
    data = await read_json(request, gateway.config.gateway.max_body_bytes)
    chat = parse(data, ChatCompletionRequest)
    call = gateway.begin(request, "openai", chat.model, conversation_key(chat.messages), body=data)
    return await _forward(gateway, call, "/v1/chat/completions", data, chat)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    gateway = gateway_of(request)
    data = await read_json(request, gateway.config.gateway.max_body_bytes)
    completion = parse(data, CompletionRequest)
    prompt = completion.prompt if isinstance(completion.prompt, str) else None
    affinity = prompt_key(prompt) if prompt else None
    call = gateway.begin(request, "openai", completion.model, affinity, body=data)
    return await _forward(gateway, call, "/v1/completions", data, completion)


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> Response:
    gateway = gateway_of(request)
    data = await read_json(request, gateway.config.gateway.max_body_bytes)
    embedding = parse(data, EmbeddingRequest)
    call = gateway.begin(request, "openai", embedding.model, body=data)
    answer = await gateway.dispatcher.post(call, "/v1/embeddings", {**data, "model": call.model})
    gateway.accounting.finish(call, usage=usage_of(answer))
    return JSONResponse(answer)


async def _forward(
    gateway: Gateway,
    call: Call,
    path: str,
    data: dict[str, Any],
    req: ChatCompletionRequest | CompletionRequest,
) -> Response:
    body = {**data, "model": call.model}
    if not req.stream:
        answer = await gateway.dispatcher.post(call, path, body)
        gateway.accounting.finish(call, usage=usage_of(answer))
        return JSONResponse(answer)
    # Usage is always asked for upstream (token metrics and budgets need it); relay_openai drops
    # the usage chunk again for clients that did not ask.
    options = {**(data.get("stream_options") or {}), "include_usage": True}
    wants_usage = bool(req.stream_options and req.stream_options.include_usage)
    return await gateway.stream(
        call,
        path,
        {**body, "stream_options": options},
        lambda upstream: relay_openai(
            upstream, call, gateway.accounting, include_usage=wants_usage
        ),
        keepalive=lambda: OPENAI_KEEPALIVE,
        on_error=lambda err: [openai_error_event(err)],
    )


def usage_of(answer: dict[str, Any]) -> Usage | None:
    """Token usage of a neuron's answer (embeddings report prompt tokens only)."""
    usage = answer.get("usage")
    if not isinstance(usage, dict) or "prompt_tokens" not in usage:
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )
