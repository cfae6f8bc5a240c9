"""Fleet control through a gateway (docs/fleet-control.md): the admin API's wire models, and
`GatewayAdmin`, the client `cortex models` and `cortex status` use to reach it."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Literal
from urllib.parse import quote

import httpx
from pydantic import BaseModel, Field

from cortex.core.errors import CortexError, NeuronUnreachable, error_from_code
from cortex.core.fleet import FleetView, ModelState

DEFAULT_ENDPOINT = "http://127.0.0.1:31313"
ModelAvailability = Literal["loaded", "loading", "available"]


class AdminReplica(BaseModel):
    """A model on one neuron, with what keeps it there."""

    neuron: str
    state: ModelState
    progress: float = Field(default=0.0, ge=0.0, le=1.0)
    memory_bytes: int = 0
    in_flight: int = 0
    pinned: bool = False
    last_used: float | None = Field(default=None, description="unix seconds, else when loaded")
    expires_at: float | None = Field(
        default=None, description="unix seconds its idle TTL unloads it, if unused; None: never"
    )


class AdminModel(BaseModel):
    """One catalogue model, loaded or not: GET /admin/models."""

    id: str
    kind: Literal["chat", "embedding"] = "chat"
    state: ModelAvailability = "available"
    aliases: list[str] = Field(default_factory=list)
    pinned_on: list[str] = Field(default_factory=list)
    idle_ttl: float | None = Field(default=None, description="seconds unused before an unload")
    replicas: list[AdminReplica] = Field(default_factory=list)
    last_error: str | None = None


class AdminNeuron(BaseModel):
    name: str
    healthy: bool
    cordoned: bool = False


class AdminModels(BaseModel):
    """GET /admin/models: every catalogue model and every neuron."""

    mode: Literal["static", "kubernetes"] = "static"
    models: list[AdminModel] = Field(default_factory=list)
    neurons: list[AdminNeuron] = Field(default_factory=list)


class AdminKey(BaseModel):
    """One API key as GET /admin/keys shows it: what it may do, and where its limits stand."""

    name: str
    admin: bool = False
    models: list[str] = Field(default_factory=list)  # empty: every model
    budget_tokens: int | None = None
    budget_window: float | None = None  # seconds; None with a budget: a balance
    spent: int | None = None  # settled tokens in the budget's reach (None: no budget)
    reserved: int = 0  # worst cases held by its requests in flight
    remaining: int | None = None  # budget_tokens - spent - reserved, at least 0
    running: int = 0  # its requests in flight (counted with a budget or max_in_flight)
    max_in_flight: int | None = None


class AdminKeys(BaseModel):
    """GET /admin/keys: every API key, with what it spent (no secret, ever)."""

    auth: bool
    keys: list[AdminKey] = Field(default_factory=list)


class AdminLoad(BaseModel):
    """POST /admin/models/{model}/load: on `neuron`, else where the planner says."""

    neuron: str | None = None


class AdminUnload(BaseModel):
    """POST /admin/models/{model}/unload: from `neuron`, else from every neuron holding it."""

    neuron: str | None = None
    force: bool = False


class AdminPin(BaseModel):
    """POST /admin/models/{model}/pin and /unpin."""

    neuron: str


class AdminDone(BaseModel):
    """What an unload, pin, unpin, cordon or uncordon did."""

    action: str
    model: str | None = None
    neurons: list[str] = Field(default_factory=list)


LoadState = Literal["loading", "ready", "failed"]


class LoadProgress(BaseModel):
    """One NDJSON line of a load's stream; the last says ready or failed."""

    model: str
    neuron: str | None = None
    state: LoadState
    progress: float = Field(default=0.0, ge=0.0, le=1.0)
    error: str | None = None


def raise_for(response: httpx.Response, body: bytes) -> None:
    """A gateway's OpenAI error envelope back into the domain error it came from; an answer
    without one came from something else (a web server, a proxy), and the error says so."""
    try:
        error = json.loads(body)["error"]
        message, code = str(error.get("message", "")), error.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        url = response.request.url
        endpoint = str(url.copy_with(path="/", query=None, fragment=None)).rstrip("/")
        raise CortexError(
            f"{endpoint} answered {response.status_code} for {url.path}: is it a cortex gateway?"
        ) from None
    raise error_from_code(code, message or f"answered {response.status_code}", response.status_code)


_CONNECTING = (httpx.ConnectError, httpx.ConnectTimeout)


def unreachable(endpoint: str, exc: httpx.TransportError) -> NeuronUnreachable:
    """What a transport failure says, in the words of the failure under it (`connection
    refused`, `name or service not known`), not httpx's class name."""
    where = f"cannot connect to {endpoint}" if isinstance(exc, _CONNECTING) else endpoint
    return NeuronUnreachable(f"{where}: {transport_reason(exc)}")


def transport_reason(exc: BaseException) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    cause: BaseException | None = exc
    while cause is not None:  # anyio wraps the socket's error in "All connection attempts failed"
        if isinstance(cause, OSError) and cause.strerror:
            # asyncio's refusal reads "Connect call failed (address)": its errno says more
            errno = cause.errno if isinstance(cause.errno, int) and cause.errno > 0 else None
            return _sentence(os.strerror(errno) if errno else cause.strerror)
        cause = cause.__cause__ or cause.__context__
    return _sentence(str(exc) or type(exc).__name__)


def _sentence(text: str) -> str:
    """Text to follow a colon: `Connection refused` as `connection refused`."""
    return text[:1].lower() + text[1:]


class GatewayAdmin:
    """Async client of a gateway's admin API (and GET /fleet), with an admin key if auth is on."""

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(connect=3.0, read=600.0, write=30.0, pool=30.0)
        self._http = httpx.AsyncClient(
            base_url=self.endpoint, headers=headers, timeout=timeout, transport=transport
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, body: BaseModel | None = None) -> bytes:
        try:
            response = await self._http.request(
                method, path, json=body.model_dump(exclude_none=True) if body else None
            )
        except httpx.TransportError as exc:
            raise unreachable(self.endpoint, exc) from exc
        if response.status_code >= 400:
            raise_for(response, response.content)
        return response.content

    async def fleet(self) -> FleetView:
        return FleetView.model_validate_json(await self._request("GET", "/fleet"))

    async def models(self) -> AdminModels:
        return AdminModels.model_validate_json(await self._request("GET", "/admin/models"))

    async def keys(self) -> AdminKeys:
        return AdminKeys.model_validate_json(await self._request("GET", "/admin/keys"))

    async def reset_key(self, name: str) -> AdminKey:
        """Forget what a key spent; where it stands afterwards."""
        path = f"/admin/keys/{quote(name, safe='')}/reset"
        return AdminKey.model_validate_json(await self._request("POST", path))

    async def load(self, model: str, neuron: str | None = None) -> AsyncIterator[LoadProgress]:
        """The load's progress lines as they come, the last one ready or failed."""
        body = AdminLoad(neuron=neuron).model_dump(exclude_none=True)
        request = self._http.build_request("POST", f"/admin/models/{model}/load", json=body)
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise unreachable(self.endpoint, exc) from exc
        try:
            if response.status_code >= 400:
                raise_for(response, await response.aread())
            async for line in response.aiter_lines():
                if line.strip():
                    yield LoadProgress.model_validate_json(line)
        finally:
            await response.aclose()

    async def _done(self, path: str, body: BaseModel | None = None) -> AdminDone:
        return AdminDone.model_validate_json(await self._request("POST", path, body))

    async def unload(self, model: str, neuron: str | None = None, force: bool = False) -> AdminDone:
        return await self._done(
            f"/admin/models/{model}/unload", AdminUnload(neuron=neuron, force=force)
        )

    async def pin(self, model: str, neuron: str) -> AdminDone:
        return await self._done(f"/admin/models/{model}/pin", AdminPin(neuron=neuron))

    async def unpin(self, model: str, neuron: str) -> AdminDone:
        return await self._done(f"/admin/models/{model}/unpin", AdminPin(neuron=neuron))

    async def cordon(self, neuron: str, *, on: bool = True) -> AdminDone:
        return await self._done(f"/admin/neurons/{neuron}/{'cordon' if on else 'uncordon'}")


def load_failure(line: LoadProgress) -> CortexError:
    """The error a failed load's last line stands for."""
    return CortexError(f"load of {line.model} failed: {line.error or 'no reason given'}")
