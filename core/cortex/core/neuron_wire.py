"""The transport of NeuronClient's inference calls: aiohttp, whose C parser and lean pool answer
in under half the time of httpx's (docs/benchmarks.md, "P1 gateway overhead").

Only NeuronClient uses it. Its failures come out as domain errors that name the neuron, never
its address; a neuron's error answer is left to the caller, which knows the API's error shape.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx

from cortex.core.errors import CortexError, NeuronUnavailable, NeuronUnreachable, Overloaded
from cortex.core.request_context import REQUEST_ID_HEADER, request_id

# A neuron (uvicorn) closes a connection idle for 5 s. Ours are dropped sooner, so that a request
# never goes out on one the neuron is closing that very moment (a reset, seen under bursts).
KEEPALIVE_S = 4.0


@dataclass(frozen=True)
class WireAnswer:
    """A whole answer: its status, headers and body bytes, as the neuron sent them."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class WireStream:
    """An answer whose headers are in; `chunks()` yields its body as it arrives."""

    def __init__(self, neuron: str, response: aiohttp.ClientResponse) -> None:
        self.neuron = neuron
        self.status = response.status
        self.headers: Mapping[str, str] = response.headers
        self._response = response

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise wire_error(self.neuron, exc) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they come; a transport failure raises its domain error."""
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise wire_error(self.neuron, exc) from exc


def wire_error(neuron: str, exc: BaseException) -> CortexError:
    """What a transport failure says of the neuron, as httpx's did (core/client.py): a refused,
    reset or cut connection is NeuronUnreachable, a read timeout or anything else unavailable."""
    kind = type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return NeuronUnreachable(f"neuron {neuron} unreachable ({kind})", retry_after=1.0)
    if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        return NeuronUnavailable(f"neuron {neuron} failed ({kind})", retry_after=1.0)
    if isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
        return NeuronUnreachable(f"neuron {neuron} unreachable ({kind})", retry_after=1.0)
    return NeuronUnavailable(f"neuron {neuron} failed ({kind})", retry_after=1.0)


def encode(body: dict[str, Any]) -> bytes:
    """A request body as httpx's `json=` wrote it (compact, UTF-8, no NaN)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


class InferenceWire:
    """One neuron's pool of kept-alive connections for inference calls. The session is made on
    first use: aiohttp binds it to the running event loop."""

    def __init__(
        self,
        endpoint: str,
        *,
        name: str,
        headers: Mapping[str, str],
        timeout: httpx.Timeout,
        limits: httpx.Limits,
        tls: ssl.SSLContext | None,
    ) -> None:
        self.endpoint, self.name, self._headers = endpoint, name, dict(headers)
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeout.connect, sock_read=timeout.read
        )
        self._keepalive = min(limits.keepalive_expiry or KEEPALIVE_S, KEEPALIVE_S)
        self._tls: ssl.SSLContext | bool = tls if tls is not None else True
        # The pool's bound and its wait are ours, so that a wait for one of our own connections
        # can be told apart (Overloaded) from a neuron slow to accept one (unreachable).
        bound = limits.max_connections
        self._gate = asyncio.Semaphore(bound) if bound is not None else None
        self._pool_wait = timeout.pool
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=0, keepalive_timeout=self._keepalive, ssl=self._tls
            )
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, headers=self._headers
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _request_headers(self, headers: Mapping[str, str] | None) -> dict[str, str]:
        sent = {"content-type": "application/json", **(headers or {})}
        rid = request_id.get()  # the client request's id, so both logs carry the same one
        if rid:
            sent.setdefault(REQUEST_ID_HEADER, rid)
        return sent

    async def post(
        self, path: str, body: dict[str, Any], headers: Mapping[str, str] | None
    ) -> WireAnswer:
        """POST a JSON body and read the whole answer, whatever its status."""
        async with self.stream(path, body, headers) as stream:
            return WireAnswer(stream.status, stream.headers, await stream.read())

    @asynccontextmanager
    async def stream(
        self, path: str, body: dict[str, Any], headers: Mapping[str, str] | None
    ) -> AsyncIterator[WireStream]:
        """POST a JSON body; the answer once its headers are in. Leaving before its end closes
        the connection, which is how a neuron learns that its client has gone."""
        async with self._connection():
            response = await self._send(path, encode(body), self._request_headers(headers))
            try:
                yield WireStream(self.name, response)
            finally:
                if response.content.at_eof():
                    response.release()  # read to its end: the connection is kept alive
                else:
                    response.close()

    async def _send(
        self, path: str, data: bytes, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        """The answer's headers. A kept-alive connection found closed (reset, or cut before any
        answer) is tried once more: the neuron may have closed it as we took it, and the next
        connection is a new one. A refused connection is not: the neuron is not there."""
        for tries_left in (1, 0):
            try:
                return await self._http().post(self.endpoint + path, data=data, headers=headers)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if tries_left and not isinstance(exc, aiohttp.ClientConnectorError):
                    continue
                raise wire_error(self.name, exc) from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise wire_error(self.name, exc) from exc
        raise AssertionError("unreachable")

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[None]:
        if self._gate is None:
            yield
            return
        try:
            async with asyncio.timeout(self._pool_wait):
                await self._gate.acquire()
        except TimeoutError:
            raise Overloaded(
                f"neuron {self.name} is busy: no connection to it came free", retry_after=1.0
            ) from None
        try:
            yield
        finally:
            self._gate.release()
