"""The server a client command reaches (--endpoint): its URL checked before any request, and
which cortex server answers there, each mistake in one line that says what happened."""

from __future__ import annotations

import re
from typing import Literal

import httpx
from pydantic import BaseModel, ValidationError

from cortex.core.admin import unreachable
from cortex.core.errors import CortexError
from cortex.core.fleet import FleetView, NeuronStatus

Server = Literal["gateway", "neuron"]
_HOST = re.compile(r"[\w.:-]+")  # a name, IPv4 or IPv6 address (httpx drops the brackets)


def checked(url: str) -> str:
    """`url` without a trailing slash, or a CortexError naming what is wrong with it."""
    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except httpx.InvalidURL as exc:
        raise CortexError(f"invalid URL {url!r}: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        hint = "" if "://" in url else f" (http://{url}?)"
        raise CortexError(f"invalid URL {url!r}: it needs http:// or https://{hint}")
    if not parsed.host:
        raise CortexError(f"invalid URL {url!r}: no host")
    if not _HOST.fullmatch(parsed.host):
        raise CortexError(f"invalid URL {url!r}: {parsed.host!r} is no host name")
    if port is not None and not 0 < port < 65536:
        raise CortexError(f"invalid URL {url!r}: port {port} is out of range")
    return url.rstrip("/")


async def identify(endpoint: str, api_key: str | None, wanted: str = "gateway or neuron") -> Server:
    """Which cortex server answers at `endpoint`: a gateway serves /fleet (or guards it with keys),
    a neuron /status. Anything else is a CortexError saying what it answered; `wanted` names what
    the command needs (`gateway` for one that needs a gateway)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=endpoint, timeout=5, headers=headers) as http:
        fleet = await _get(http, endpoint, "/fleet")
        if fleet.status_code in (401, 403):
            return "gateway"  # only a gateway guards /fleet with keys
        if fleet.status_code == 200 and _is(FleetView, fleet.content):
            return "gateway"
        status = await _get(http, endpoint, "/status")
    if status.status_code == 200 and _is(NeuronStatus, status.content):
        return "neuron"
    answer = fleet if wanted == "gateway" else status
    if answer.status_code == 200:
        raise CortexError(f"{endpoint} is not a cortex {wanted}")
    raise CortexError(
        f"{endpoint} answered {answer.status_code} for {answer.url.path}: is it a cortex {wanted}?"
    )


async def _get(http: httpx.AsyncClient, endpoint: str, path: str) -> httpx.Response:
    try:
        return await http.get(path)
    except httpx.TransportError as exc:
        raise unreachable(endpoint, exc) from None


def _is(shape: type[BaseModel], body: bytes) -> bool:
    try:
        shape.model_validate_json(body)
    except ValidationError:
        return False
    return True
