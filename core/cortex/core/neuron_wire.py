"""The transport of NeuronClient's inference calls: a pool of kept-alive HTTP/1.1 connections
parsed by httptools (http_connection.py). aiohttp's client, before it, took 3.5x the CPU per call
of this bare protocol, and the call is most of a gateway's work per request (docs/benchmarks.md,
P1); httpx's took twice aiohttp's time.

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
from urllib.parse import urlsplit

import httpx

from cortex.core.errors import (
    AnswerTimeout,
    CortexError,
    NeuronUnavailable,
    NeuronUnreachable,
    Overloaded,
)
from cortex.core.http_connection import BadAnswer, ConnectionClosed, HttpConnection, ReadTimeout
from cortex.core.request_context import REQUEST_ID_HEADER, request_id

# A neuron (uvicorn) closes a connection idle for 5 s. Ours are dropped sooner, so that a request
# never goes out on one the neuron is closing that very moment (a reset, seen under bursts).
KEEPALIVE_S = 4.0


@dataclass(frozen=True)
class WireAnswer:
    """A whole answer: its status, headers (names in lower case) and body bytes, as sent."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class WireStream:
    """An answer whose headers are in; `chunks()` yields its body as it arrives."""

    def __init__(self, neuron: str, connection: HttpConnection) -> None:
        self.neuron = neuron
        self.status = connection.status
        self.headers: Mapping[str, str] = connection.headers
        self._connection = connection

    async def read(self) -> bytes:
        try:
            return await self._connection.body()
        except (OSError, ValueError) as exc:
            raise wire_error(self.neuron, exc) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they come; a transport failure raises its domain error."""
        try:
            async for chunk in self._connection.chunks():
                yield chunk
        except (OSError, ValueError) as exc:
            raise wire_error(self.neuron, exc) from exc


class ConnectTimeout(TimeoutError):
    """No connection to the neuron within the connect timeout."""


def wire_error(neuron: str, exc: BaseException) -> CortexError:
    """What a transport failure says of the neuron, as httpx's did (core/client.py): a refused,
    reset or cut connection is NeuronUnreachable, a read timeout AnswerTimeout (not retried: the
    neuron may be generating still), anything else unavailable."""
    kind = type(exc).__name__
    if isinstance(exc, ConnectTimeout | ConnectionClosed):
        return NeuronUnreachable(f"neuron {neuron} unreachable ({kind})", retry_after=1.0)
    if isinstance(exc, ReadTimeout):
        return AnswerTimeout(
            f"neuron {neuron} took the request and answered nothing in the read timeout "
            "([gateway] request_timeout)"
        )
    if isinstance(exc, TimeoutError | BadAnswer):
        return NeuronUnavailable(f"neuron {neuron} failed ({kind})", retry_after=1.0)
    if isinstance(exc, OSError):  # refused, reset, no route, a TLS failure
        return NeuronUnreachable(f"neuron {neuron} unreachable ({kind})", retry_after=1.0)
    return NeuronUnavailable(f"neuron {neuron} failed ({kind})", retry_after=1.0)


def encode(body: dict[str, Any]) -> bytes:
    """A request body as httpx's `json=` wrote it (compact, UTF-8, no NaN)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


class InferenceWire:
    """One neuron's pool of kept-alive connections for inference calls (made on first use, in
    the running event loop; the most recently used is reused first)."""

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
        self.endpoint, self.name = endpoint, name
        url = urlsplit(endpoint)
        self._https = url.scheme == "https"
        self._host = url.hostname or "localhost"
        self._port = url.port or (443 if self._https else 80)
        self._prefix = url.path.rstrip("/")  # a neuron served under a path (bench/scale_fleet.py)
        self._tls = tls
        # What every request says of itself: written once, sent with each.
        fixed = {"host": url.netloc, **headers, "content-type": "application/json"}
        self._fixed = "".join(f"{k}: {_checked(v)}\r\n" for k, v in fixed.items()).encode()
        self._connect_timeout = timeout.connect
        self._read_timeout = timeout.read
        self._keepalive = min(limits.keepalive_expiry or KEEPALIVE_S, KEEPALIVE_S)
        self._idle: list[HttpConnection] = []
        # The pool's bound and its wait are ours, so that a wait for one of our own connections
        # can be told apart (Overloaded) from a neuron slow to accept one (unreachable).
        bound = limits.max_connections
        self._gate = asyncio.Semaphore(bound) if bound is not None else None
        self._pool_wait = timeout.pool

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _request(self, path: str, body: bytes, headers: Mapping[str, str] | None) -> bytes:
        lines = [f"POST {self._prefix}{path} HTTP/1.1\r\n".encode(), self._fixed]
        sent = dict(headers or {})
        rid = request_id.get()  # the client request's id, so both logs carry the same one
        if rid:
            sent.setdefault(REQUEST_ID_HEADER, rid)
        sent["content-length"] = str(len(body))
        lines.append("".join(f"{k}: {_checked(v)}\r\n" for k, v in sent.items()).encode())
        lines += (b"\r\n", body)
        return b"".join(lines)

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
        request = self._request(path, encode(body), headers)
        async with self._turn():
            connection = await self._send(request)
            try:
                yield WireStream(self.name, connection)
            finally:
                if connection.reusable():  # read to its end: kept for the next call
                    connection.idle_since = connection.loop.time()
                    self._idle.append(connection)
                else:
                    connection.close()

    async def _send(self, request: bytes) -> HttpConnection:
        """The connection whose answer's head is in. A kept-alive connection closed before any
        answer is tried once more: the neuron may have closed it as we took it, and the next
        connection is a new one. A refused connection is not: the neuron is not there."""
        for tries_left in (1, 0):
            kept = self._kept()
            connection = kept or await self._connect()
            try:
                connection.send(request)
                await connection.head()
                return connection
            except ConnectionClosed as exc:
                connection.close()
                if tries_left and kept is not None and not connection.answered:
                    continue
                raise wire_error(self.name, exc) from exc
            except (OSError, ValueError) as exc:
                connection.close()
                raise wire_error(self.name, exc) from exc
            except BaseException:
                connection.close()
                raise
        raise AssertionError("unreachable")

    def _kept(self) -> HttpConnection | None:
        """The most recent idle connection still open and young enough; older ones are closed."""
        while self._idle:
            connection = self._idle.pop()
            fresh = connection.loop.time() - connection.idle_since < self._keepalive
            if fresh and not connection.lost:
                return connection
            connection.close()
        return None

    async def _connect(self) -> HttpConnection:
        loop = asyncio.get_running_loop()
        tls = None
        if self._https:
            tls = self._tls if self._tls is not None else _default_tls()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: HttpConnection(loop, self._read_timeout),
                    self._host,
                    self._port,
                    ssl=tls,
                )
        except TimeoutError:
            raise wire_error(self.name, ConnectTimeout()) from None
        except OSError as exc:
            raise wire_error(self.name, exc) from exc
        return connection

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """A place in the pool's bound (Overloaded when none comes free in the pool timeout)."""
        gate = self._gate
        if gate is None:
            yield
            return
        try:
            if gate.locked():  # a free place is taken at once, with no timer to set up
                async with asyncio.timeout(self._pool_wait):
                    await gate.acquire()
            else:
                await gate.acquire()
        except TimeoutError:
            raise Overloaded(
                f"neuron {self.name} is busy: no connection to it came free", retry_after=1.0
            ) from None
        try:
            yield
        finally:
            gate.release()


def _checked(value: str) -> str:
    """A header value as sent: a line break in it would start a header of the caller's."""
    if "\r" in value or "\n" in value:
        raise ValueError("a header value cannot hold a line break")
    return value


_TLS: list[ssl.SSLContext] = []


def _default_tls() -> ssl.SSLContext:
    """The system's CA bundle, read once per process (tens of ms of CPU)."""
    if not _TLS:
        _TLS.append(ssl.create_default_context())
    return _TLS[0]
