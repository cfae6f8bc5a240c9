"""The Anthropic routes: /v1/messages and count_tokens."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from cortex.gateway.dialects.anthropic import COUNT_TOKENS, MESSAGES
from cortex.gateway.http.access import authenticate, proxied

router = APIRouter(dependencies=[Depends(authenticate)])


@router.post("/v1/messages")
async def messages(request: Request) -> Response:
    return await proxied(request, MESSAGES)


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> Response:
    """Counted by the model's own tokenizer and chat template, on a neuron that has the model."""
    return await proxied(request, COUNT_TOKENS)
