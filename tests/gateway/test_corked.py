"""Corked writes: a response's head and body leave in one send, and a stream's chunks still leave
one by one, as they are written (the gateway's server protocol, cortex.gateway.corked)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn

from cortex.gateway.corked import CorkedHttpToolsProtocol, CorkedTransport


class Sends:
    """The transport under the cork: records each send."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


async def test_writes_of_one_turn_are_one_send() -> None:
    sends = Sends()
    corked = CorkedTransport(sends, asyncio.get_running_loop())  # type: ignore[arg-type]
    corked.write(b"HTTP/1.1 200 OK\r\n\r\n")
    corked.writelines([b"hel", b"lo"])
    assert sends.sent == [] and corked.get_write_buffer_size() == 24
    await asyncio.sleep(0)  # the turn ends
    assert sends.sent == [b"HTTP/1.1 200 OK\r\n\r\nhello"]
    corked.write(b"bye")
    corked.close()  # what was written before close goes out first
    assert sends.sent[-1] == b"bye" and sends.closed


@contextlib.asynccontextmanager
async def corked_server(app: Any) -> AsyncIterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=CorkedHttpToolsProtocol, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[assignment,method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    deadline = asyncio.get_running_loop().time() + 10
    while not server.started:
        assert not task.done() and asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task
        sock.close()


async def read_until(reader: asyncio.StreamReader, marker: bytes) -> bytes:
    return await asyncio.wait_for(reader.readuntil(marker), timeout=10)


async def test_a_stream_still_leaves_chunk_by_chunk() -> None:
    """The second chunk is only written once the client has read the first: were chunks held
    past their turn, the client would wait forever."""
    first_read = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"one;", "more_body": True})
        await first_read.wait()
        await send({"type": "http.response.body", "body": b"two;", "more_body": False})

    async with corked_server(app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        head = await read_until(reader, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head
        assert (await read_until(reader, b"one;")).endswith(b"one;")
        first_read.set()
        assert (await read_until(reader, b"two;")).endswith(b"two;")
        assert (await read_until(reader, b"0\r\n\r\n")).endswith(b"0\r\n\r\n")
        # Kept alive: a second request on the same connection is answered too.
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        first_read.clear()
        assert (await read_until(reader, b"one;")).endswith(b"one;")
        first_read.set()
        rest = await asyncio.wait_for(reader.read(), timeout=10)  # the server closes
        assert rest.endswith(b"two;\r\n0\r\n\r\n")
        writer.close()


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\n" + b"".join(b"x-pad-%d: %s\r\n" % (i, b"a" * 2**20) for i in range(8)),
        b"GET / HTTP/1.1\r\nx-one: " + b"a" * 8 * 2**20 + b"\r\n",  # one header, 8 MiB
        b"GET /" + b"a" * 8 * 2**20 + b" HTTP/1.1\r\n",  # a path of 8 MiB
    ],
    ids=["many-headers", "one-header", "long-path"],
)
async def test_a_request_head_past_the_cap_is_431_before_it_is_all_read(head: bytes) -> None:
    """uvicorn and httptools would keep any head whole in memory; a caller with no key could
    send the gateway megabytes of it (docs/security.md, "Request sizes")."""
    async with corked_server(_ok) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=10)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
        writer.close()
        # A head of the usual size, and a body of any size within a route's own cap, still pass.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b"b" * 2**20
        usual = b"POST / HTTP/1.1\r\nhost: x\r\nx-pad: %s\r\n" % (b"a" * 30_000)
        writer.write(usual + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
        answer = await asyncio.wait_for(reader.read(), timeout=10)
        assert answer.startswith(b"HTTP/1.1 200 ") and b"\r\nok\r\n" in answer
        writer.close()
