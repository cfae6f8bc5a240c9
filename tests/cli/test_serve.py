"""The server every `cortex neuron` runs under (cortex.cli.commands.serve): the gateway's server
protocol, so a request head past 64 KiB is refused with 431 before it is all read
(docs/security.md, "Request sizes")."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from cortex.cli.commands import serve
from cortex.core.shutdown import Drain


async def _ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _ask(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()


async def test_a_neuron_refuses_a_request_head_past_the_cap() -> None:
    port, drain = _free_port(), Drain(grace=0)
    task = asyncio.create_task(serve(_ok, "127.0.0.1", port, drain))
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while not (drain.servers and drain.servers[0].started):
            assert not task.done() and asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        huge = b"GET /status HTTP/1.1\r\nx-pad: " + b"a" * 4 * 2**20 + b"\r\n\r\n"
        assert (await _ask(port, huge)).startswith(b"HTTP/1.1 431 ")
        usual = b"GET /status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        assert (await _ask(port, usual)).startswith(b"HTTP/1.1 200 ")
    finally:
        drain.begin()
        await asyncio.wait_for(task, timeout=10)
