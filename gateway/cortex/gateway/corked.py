"""uvicorn's httptools protocol with its writes corked: what one event-loop turn writes to a
connection goes out in one send. uvicorn writes a response's head and its body separately, two
sends and two wake-ups of the client for one answer; on a VM's loopback a send costs more than the
gateway's whole routing did (docs/benchmarks.md, P1). Order and content are unchanged; a write
waits at most until the end of the loop turn it was made in.

The protocol also caps a request's head (its line and headers), which uvicorn and httptools keep
whole in memory however long it is, before any route sees the request (docs/security.md).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger(__name__)

# A request head past this is 431: real clients send a few KiB (nginx takes 32 KiB at most).
MAX_HEAD_BYTES = 64 * 1024
# How long what a refused client still sends is read and dropped before the connection closes:
# closed at once, its unread bytes would reset the connection, and the 431 with it.
LINGER = 2.0
_TOO_LARGE = b"request header fields too large"


class CorkedTransport:
    """Wraps a transport: writes are kept until the loop turn ends, then sent joined."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(p) for p in self._pending)

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()  # what was written before close still goes out, as on a plain transport
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        # Everything else (reading, flow control, extra info, set_protocol) is the transport's.
        return getattr(self._transport, name)


class CorkedHttpToolsProtocol(HttpToolsProtocol):
    """What `uvicorn.Config(http=...)` takes: httptools parsing, corked writes, a capped head."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._in_head = False  # between a request's first byte and the end of its headers
        self._head_began = False  # ...and its first byte came in the data being read
        self._head_bytes = 0
        self._refused = False
        corked = CorkedTransport(cast(asyncio.Transport, transport), self.loop)
        super().connection_made(corked)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the rest of a refused head: dropped unread
        self._head_began = False
        super().data_received(data)
        # The read a head began in is not counted (part of it may be the request before):
        # the head held is at most one read (256 KiB) over the cap.
        if not self._in_head or self._head_began:
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            log.warning("request head over %d bytes from %s: refused", MAX_HEAD_BYTES, self.client)
            self._send_431()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_began, self._head_bytes = True, True, 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def _send_431(self) -> None:
        head = [STATUS_LINE[431]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\n" % len(_TOO_LARGE),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + _TOO_LARGE)
        self._refused = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER, self.transport.close)
