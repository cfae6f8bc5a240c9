"""One kept-alive HTTP/1.1 client connection, parsed by httptools (C): the lean transport under
NeuronClient's inference calls (neuron_wire.py). A request at a time; the answer's head and body
are read as they arrive, each wait bounded by the read timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httptools


class ConnectionClosed(ConnectionError):
    """The server closed (or reset) the connection before the answer's end."""


class ReadTimeout(TimeoutError):
    """Nothing came from the server for the whole read timeout."""


class BadAnswer(ValueError):
    """What the server sent is not HTTP."""


class HttpConnection(asyncio.Protocol):
    """asyncio protocol and client of one connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float | None) -> None:
        self.loop = loop
        self.read_timeout = read_timeout
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._begin()

    def _begin(self) -> None:
        """Forget the last answer: a request is going out."""
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head_done = False
        self.complete = False
        self.keep_alive = False  # as the answer's head says
        self.answered = False  # any byte of the answer came
        self._body: list[bytes] = []
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    # The client side.

    def send(self, request: bytes) -> None:
        self._begin()
        assert self.transport is not None
        self.transport.write(request)

    async def head(self) -> None:
        """Until the answer's status and headers are in."""
        while not self.head_done:
            await self._wait()

    async def body(self) -> bytes:
        """The rest of the answer's body, once it has all come."""
        while not self.complete:
            await self._wait()
        body, self._body = b"".join(self._body), []
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it comes: what arrived together, together."""
        while True:
            if self._body:
                chunk, self._body = b"".join(self._body), []
                yield chunk
            elif self.complete:
                return
            else:
                await self._wait()

    def reusable(self) -> bool:
        """Read to its end, kept alive by the server, and still open."""
        return self.complete and self.keep_alive and not self.lost

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()
        self.lost = True

    async def _wait(self) -> None:
        """Until more of the answer comes (or it fails); the read timeout runs meanwhile."""
        if self._error is not None:
            raise self._error
        waiter = self._waiter = self.loop.create_future()
        timer = None
        if self.read_timeout is not None:
            timer = self.loop.call_later(self.read_timeout, self._fail, ReadTimeout())
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        if self._error is not None:
            raise self._error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    # The protocol side.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.answered = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BadAnswer(str(exc) or type(exc).__name__))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.complete:
            return
        if exc is None and self.head_done and self._read_to_close():
            self.complete = True  # an answer with neither length nor chunks ends with its close
            self._wake()
            return
        self._fail(ConnectionClosed(str(exc) if exc else "connection closed"))

    def _read_to_close(self) -> bool:
        chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        return "content-length" not in self.headers and not chunked

    # httptools' callbacks.

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if self.status < 200:  # an interim answer (100 Continue): the real one follows
            self.headers = {}
            return
        self.head_done = True
        self.keep_alive = self._parser.should_keep_alive()
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        if self.status >= 200:
            self.complete = True
            self._wake()
