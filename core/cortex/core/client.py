"""NeuronClient: the one road to a neuron, used by the gateway, the operator and the CLI."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import ValidationError

from cortex.core.completion_limit import CompletionPolicy
from cortex.core.errors import (
    CortexError,
    NeuronUnavailable,
    NeuronUnreachable,
    Overloaded,
    Shortfall,
    error_from_code,
)
from cortex.core.fleet import LoadedModel, LoadRequest, ModelListing, NeuronStatus, UnloadRequest
from cortex.core.neuron_wire import InferenceWire, WireStream
from cortex.core.protocol.openai import TokenizeRequest, TokenizeResponse
from cortex.core.request_context import INTERNAL_AGENT, REQUEST_ID_HEADER, request_id

# The neuron's inference APIs: the one place their paths are written.
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
TOKENIZE_PATH = "/tokenize"
# Whose share of a neuron's running slots a request takes (docs/architecture.md, "Fairness").
PRINCIPAL_HEADER = "x-cortex-principal"
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
    """A neuron's JSON answer, the headers it came with, and its bytes as they came (what a
    caller passing the answer on unchanged sends, rather than encoding `body` again)."""

    body: dict[str, Any]
    headers: Mapping[str, str]
    raw: bytes | None = None


def _headers(principal: str | None, completion: CompletionPolicy | None) -> dict[str, str] | None:
    """What a neuron is told beside an inference body: whose slots it takes, and how to fit its
    max_tokens (completion_limit.py; unset: the neuron's own settings)."""
    headers = {PRINCIPAL_HEADER: principal} if principal else {}
    if completion is not None:
        headers.update(completion.headers())
    return headers or None


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


def _raise_for(status: int, headers: Mapping[str, str], body: bytes) -> None:
    """Turn a neuron's OpenAI-shaped error answer back into the domain error it came from."""
    try:
        error = json.loads(body).get("error") or {}
        message, code, param = str(error.get("message", "")), error.get("code"), error.get("param")
        memory = Shortfall.from_wire(error.get("memory"))
    except (ValueError, AttributeError):
        message, code, param, memory = body.decode(errors="replace")[:500], None, None, None
    retry = headers.get("retry-after")
    raise error_from_code(
        code,
        message or f"neuron answered {status}",
        status,
        retry_after=float(retry) if retry and retry.replace(".", "", 1).isdigit() else None,
        param=param if isinstance(param, str) else None,
        memory=memory,
    )


async def _pass_request_id(request: httpx.Request) -> None:
    """The client request's id goes on to the neuron, so both logs carry the same id."""
    rid = request_id.get()
    if rid and REQUEST_ID_HEADER not in request.headers:
        request.headers[REQUEST_ID_HEADER] = rid


class NeuronClient:
    """Async HTTP client for one neuron's lifecycle and inference APIs. The inference calls, a
    gateway's hot path, go over their own lean transport (neuron_wire.py); the lifecycle calls over httpx, where
    `transport` can put an app in the neuron's place."""

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
        CA bundle (tens of ms of CPU): a caller of hundreds of neurons passes one to all.
        `transport` serves the lifecycle calls only; `limits` and `timeout` bound both."""
        self.endpoint = endpoint.rstrip("/")
        # What errors call the neuron: clients of a gateway must not learn internal addresses.
        self.name = name or self.endpoint
        headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
        headers["User-Agent"] = f"{INTERNAL_AGENT}1"  # kept out of access logs
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        self._http = httpx.AsyncClient(
            base_url=self.endpoint,
            headers=headers,
            timeout=timeout,
            transport=transport,
            limits=limits,
            verify=tls if tls is not None else True,
            event_hooks={"request": [_pass_request_id]},
        )
        self._wire = InferenceWire(
            self.endpoint, name=self.name, headers=headers, timeout=timeout, limits=limits, tls=tls
        )

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._wire.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise transport_error(self.name, exc) from exc
        if response.status_code >= 400:
            _raise_for(response.status_code, response.headers, response.content)
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

    async def load(self, request: LoadRequest, *, timeout: float | None = None) -> LoadedModel:
        """Load a model; with request.wait (default) returns once it is ready. The neuron sends
        nothing until then, so `timeout` (seconds) replaces the read timeout for this call."""
        body = request.model_dump(exclude_none=True)
        limits = self._http.timeout
        if timeout is not None:
            limits = httpx.Timeout(
                connect=limits.connect, read=timeout, write=limits.write, pool=limits.pool
            )
        response = await self._request("POST", "/models/load", json=body, timeout=limits)
        return LoadedModel.model_validate_json(response.content)

    async def unload(self, model: str, *, force: bool = False) -> None:
        body = UnloadRequest(model=model, force=force).model_dump()
        await self._request("POST", "/models/unload", json=body)

    async def metrics(self) -> str:
        return (await self._request("GET", "/metrics")).text

    async def chat(
        self,
        body: dict[str, Any],
        *,
        principal: str | None = None,
        completion: CompletionPolicy | None = None,
    ) -> NeuronAnswer:
        """An OpenAI chat completion, whole: the neuron's JSON answer and its headers."""
        return await self._post(CHAT_PATH, body, _headers(principal, completion))

    async def complete(
        self,
        body: dict[str, Any],
        *,
        principal: str | None = None,
        completion: CompletionPolicy | None = None,
    ) -> NeuronAnswer:
        """An OpenAI (plain) completion, whole."""
        return await self._post(COMPLETIONS_PATH, body, _headers(principal, completion))

    async def embed(self, body: dict[str, Any], *, principal: str | None = None) -> NeuronAnswer:
        """OpenAI embeddings."""
        return await self._post(EMBEDDINGS_PATH, body, _headers(principal, None))

    async def tokenize(
        self, request: TokenizeRequest, *, principal: str | None = None
    ) -> TokenizeResponse:
        """A chat's (or prompt's) token count, through the model's own tokenizer and template."""
        body = request.model_dump(exclude_none=True)
        answer = await self._post(TOKENIZE_PATH, body, _headers(principal, None))
        try:
            return TokenizeResponse.model_validate(answer.body)
        except ValidationError:
            raise NeuronUnavailable(
                f"neuron {self.name} answered {TOKENIZE_PATH} without a count"
            ) from None

    def stream_chat(
        self,
        body: dict[str, Any],
        *,
        principal: str | None = None,
        completion: CompletionPolicy | None = None,
    ) -> AbstractAsyncContextManager[WireStream]:
        """A streamed chat completion: its response once the headers are in (an error answer
        raises); the caller reads its chunks, whose transport failures are domain errors."""
        return self._stream(CHAT_PATH, body, _headers(principal, completion))

    def stream_complete(
        self,
        body: dict[str, Any],
        *,
        principal: str | None = None,
        completion: CompletionPolicy | None = None,
    ) -> AbstractAsyncContextManager[WireStream]:
        """A streamed (plain) completion."""
        return self._stream(COMPLETIONS_PATH, body, _headers(principal, completion))

    async def _post(
        self, path: str, body: dict[str, Any], headers: dict[str, str] | None
    ) -> NeuronAnswer:
        answer = await self._wire.post(path, body, headers)
        if answer.status >= 400:
            _raise_for(answer.status, answer.headers, answer.body)
        try:
            result = json.loads(answer.body)
        except ValueError:  # a broken neuron (or something else on its port): not a gateway bug
            result = None
        if not isinstance(result, dict):
            raise NeuronUnavailable(f"neuron {self.name} answered {path} with no JSON object")
        return NeuronAnswer(result, answer.headers, answer.body)

    @asynccontextmanager
    async def _stream(
        self, path: str, body: dict[str, Any], headers: dict[str, str] | None
    ) -> AsyncIterator[WireStream]:
        async with self._wire.stream(path, body, headers) as stream:
            if stream.status >= 400:
                _raise_for(stream.status, stream.headers, await stream.read())
            yield stream
