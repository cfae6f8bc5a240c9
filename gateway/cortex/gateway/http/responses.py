"""The OpenAI Responses route: /v1/responses."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from cortex.gateway.dialects.responses import RESPONSES
from cortex.gateway.http.access import authenticate, proxied

router = APIRouter(dependencies=[Depends(authenticate)])


@router.post("/v1/responses")
async def responses(request: Request) -> Response:
    return await proxied(request, RESPONSES)
