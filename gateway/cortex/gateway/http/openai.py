"""The OpenAI routes: models, chat completions, completions, embeddings."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from cortex.core.errors import ModelNotFound
from cortex.gateway.anthropic_models import model_info, model_page, wants_anthropic
from cortex.gateway.auth import unseen
from cortex.gateway.dialects.openai import CHAT, COMPLETIONS, EMBEDDINGS
from cortex.gateway.http.access import authenticate, gateway_of, proxied

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
    principal, specs = request.state.principal, gateway.catalogue.specs()
    try:
        spec = gateway.catalogue.resolve(model_id)
    except ModelNotFound:
        raise unseen(principal, specs, model_id) from None
    if not gateway.auth.allows(principal, spec):
        raise unseen(principal, specs, model_id)
    if wants_anthropic(request.headers):
        return model_info(spec, gateway.model_card(spec)).model_dump()
    return gateway.model_card(spec).model_dump()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await proxied(request, CHAT)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await proxied(request, COMPLETIONS)


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> Response:
    return await proxied(request, EMBEDDINGS)
