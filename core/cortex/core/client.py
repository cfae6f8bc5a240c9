"""NeuronClient: the one road to a neuron, used by the gateway, the operator and the CLI."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from cortex.core.errors import (
    CortexError,
    NeuronUnavailable,
    NeuronUnreachable,
    Overloaded,
    error_from_code,
)
from cortex.core.fleet import LoadedModel, LoadRequest, ModelListing, NeuronStatus, UnloadRequest
from cortex.core.request_context import INTERNAL_AGENT, REQUEST_ID_HEADER, request_id

# Reads while streaming can legitimately pause for a long prefill; connects must fail fast.
DEFAULT_TIMEOUT = httpx.Timeout(connect=3.0, read=600.0, write=30.0, pool=30.0)
# Failures that say the neuron is not there (refused, reset, cut before answering).
_CONNECTION_FAILURES = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)


@dataclass(frozen=True)
class NeuronAnswer:
    """A neuron's JSON answer and the headers it came with."""

    body: dict[str, Any]
    headers: Mapping[str, str]


def transport_error(neuron: str, exc: httpx.TransportError) -> CortexError:
    """What a transport failure says of the neuron, in words fit for a client: its name and the
    failure's kind, never its address. Waiting for one of our own connections is no fault of it."""
    kind = type(exc).__name__
    if isinstance(exc, httpx.PoolTimeout):
        return Overloaded(
            f"neuron {neuron} is busy: no connection to it came free", retry_after=1.0
        )
    if isinstance(exc, _CONNECTION_FAILURES):
        return NeuronUnreachable(f"neuron {neuron} unreachable ({kind})", retry_after=1.0)
    return NeuronUnavailable(f"neuron {neuron} failed ({kind})", retry_after=1.0)


def _raise_for(response: httpx.Response, body: bytes) -> None:
    """Turn a neuron's OpenAI-shaped error answer back into the domain error it came from."""
    try:
        error = json.loads(body).get("error") or {}
        message, code, param = str(error.get("message", "")), error.get("code"), error.get("param")
    except (ValueError, AttributeError):
        message, code, param = body.decode(errors="replace")[:500], None, None
    retry = response.headers.get("retry-after")
    raise error_from_code(
        code,
        message or f"neuron answered {response.status_code}",
        response.status_code,
        retry_after=float(retry) if retry and retry.replace(".", "", 1).isdigit() else None,
        param=param if isinstance(param, str) else None,
    )


async def _pass_request_id(request: httpx.Request) -> None:
    """The client request's id goes on to the neuron, so both logs carry the same id."""
    rid = request_id.get()
    if rid and REQUEST_ID_HEADER not in request.headers:
        request.headers[REQUEST_ID_HEADER] = rid


class NeuronClient:
    """Async HTTP client for one neuron's lifecycle and inference APIs."""

    def __init__(
        self,
        endpoint: str,
        *,
        admin_token: str | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        name: str | None = None,
        limits: httpx.Limits | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """`tls`: a TLS context to share. Without one each client builds its own, reading the
        CA bundle (tens of ms of CPU): a caller of hundreds of neurons passes one to all."""
        self.endpoint = endpoint.rstrip("/")
        # What errors call the neuron: clients of a gateway must not learn internal addresses.
        self.name = name or self.endpoint
        headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
        headers["User-Agent"] = f"{INTERNAL_AGENT}1"  # kept out of access logs
        self._http = httpx.AsyncClient(
            base_url=self.endpoint,
            headers=headers,
            timeout=timeout,
            transport=transport,
            limits=limits or httpx.Limits(max_connections=100, max_keepalive_connections=20),
            verify=tls if tls is not None else True,
            event_hooks={"request": [_pass_request_id]},
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise transport_error(self.name, exc) from exc
        if response.status_code >= 400:
            _raise_for(response, response.content)
        return response

    async def health(self) -> bool:
        try:
            return (await self._request("GET", "/health")).status_code == 200
        except CortexError:
            return False

    async def status(self) -> NeuronStatus:
        return NeuronStatus.model_validate_json((await self._request("GET", "/status")).content)

    async def models(self) -> ModelListing:
        return ModelListing.model_validate_json((await self._request("GET", "/models")).content)

    async def load(self, request: LoadRequest) -> LoadedModel:
        """Load a model; with request.wait (default) returns once it is ready."""
        body = request.model_dump(exclude_none=True)
        response = await self._request("POST", "/models/load", json=body)
        return LoadedModel.model_validate_json(response.content)

    async def unload(self, model: str, *, force: bool = False) -> None:
        body = UnloadRequest(model=model, force=force).model_dump()
        await self._request("POST", "/models/unload", json=body)

    async def metrics(self) -> str:
        return (await self._request("GET", "/metrics")).text

    async def post(
        self, path: str, body: dict[str, Any], *, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """A non-streaming inference call (e.g. /v1/chat/completions); returns the JSON body."""
        return (await self.post_answer(path, body, headers=headers)).body

    async def post_answer(
        self, path: str, body: dict[str, Any], *, headers: dict[str, str] | None = None
    ) -> NeuronAnswer:
        """`post`, keeping the response's headers too (what the neuron reports beside the body,
        such as a clamped max_tokens)."""
        answer = await self._request("POST", path, json=body, headers=headers)
        try:
            result = answer.json()
        except ValueError:  # a broken neuron (or something else on its port): not a gateway bug
            result = None
        if not isinstance(result, dict):
            raise NeuronUnavailable(f"neuron {self.name} answered {path} with no JSON object")
        return NeuronAnswer(result, answer.headers)

    @asynccontextmanager
    async def stream(
        self, path: str, body: dict[str, Any], *, headers: dict[str, str] | None = None
    ) -> AsyncIterator[httpx.Response]:
        """A streaming inference call. Errors before the first byte raise; the caller reads after."""
        request = self._http.build_request("POST", path, json=body, headers=headers)
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise transport_error(self.name, exc) from exc
        try:
            if response.status_code >= 400:
                _raise_for(response, await response.aread())
            yield response
        finally:
            await response.aclose()
