"""NeuronClient's inference calls over their own transport (core/cortex/core/neuron_wire.py),
against a real server: what is sent, answers kept byte for byte, streams that end or are left,
and transport failures as the domain errors that name the neuron."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes.neuron import running
from starlette.types import Receive, Scope, Send

from cortex.core.client import NeuronClient
from cortex.core.errors import AnswerTimeout, NeuronUnavailable, NeuronUnreachable
from cortex.core.request_context import request_id
from cortex.gateway.proxy.dispatch import retryable

# Spaced and escaped as no re-encoding would write it: a relayed answer must keep these bytes.
ANSWER = (
    b'{"id": "chatcmpl-1",  "choices": [], "note": "caf\\u00e9",\n "usage": {"prompt_tokens": 1}}'
)
EVENTS = [b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n', b"data: [DONE]\n\n"]


class Neuron:
    """A bare ASGI stand-in: records each request and the connection it came on; `/hang`
    answers its headers and then nothing; a stream waits at `gate` after its first event."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.peers: list[tuple[str, int]] = []
        self.gate = asyncio.Event()
        self.left = asyncio.Event()  # a streamed request's client went away

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.requests.append({"path": scope["path"], "headers": headers, "body": body})
        self.peers.append(tuple(scope["client"]))
        if json.loads(body).get("stream"):
            await self._stream(receive, send, wait=scope["path"] != "/v1/completions")
            return
        start = {"type": "http.response.start", "status": 200}
        await send({**start, "headers": [(b"content-type", b"application/json")]})
        if scope["path"] == "/hang":
            await asyncio.sleep(30)
        await send({"type": "http.response.body", "body": ANSWER})

    async def _stream(self, receive: Receive, send: Send, *, wait: bool) -> None:
        start = {"type": "http.response.start", "status": 200}
        await send({**start, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": EVENTS[0], "more_body": True})
        if wait:
            waiting = asyncio.create_task(self.gate.wait())
            leaving = asyncio.create_task(receive())
            done, _ = await asyncio.wait({waiting, leaving}, return_when=asyncio.FIRST_COMPLETED)
            if leaving in done and leaving.result()["type"] == "http.disconnect":
                self.left.set()
                return
        await send({"type": "http.response.body", "body": EVENTS[1]})


async def test_a_plain_answer_keeps_the_neurons_bytes_and_says_who_asked() -> None:
    neuron = Neuron()
    async with running(neuron) as served:
        client = NeuronClient(served.url, name="n1", admin_token="t0ken")
        try:
            token = request_id.set("req-42")
            try:
                answer = await client.chat({"model": "m", "note": "é"}, principal="alice")
            finally:
                request_id.reset(token)
        finally:
            await client.aclose()
    assert answer.raw == ANSWER
    assert answer.body["note"] == "café" and answer.body["usage"] == {"prompt_tokens": 1}
    sent = neuron.requests[0]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"] == '{"model":"m","note":"é"}'.encode()  # compact UTF-8, as httpx sent it
    headers = sent["headers"]
    assert headers["x-request-id"] == "req-42" and headers["x-cortex-principal"] == "alice"
    assert headers["authorization"] == "Bearer t0ken"
    assert headers["user-agent"].startswith("cortex-gateway/")
    assert headers["content-type"] == "application/json"


async def test_a_stream_read_to_its_end_leaves_its_connection_for_the_next_call() -> None:
    neuron = Neuron()
    neuron.gate.set()
    async with running(neuron) as served:
        client = NeuronClient(served.url, name="n1")
        try:
            for _ in range(3):
                async with client.stream_chat({"model": "m", "stream": True}) as stream:
                    received = b"".join([chunk async for chunk in stream.chunks()])
                assert received == b"".join(EVENTS)
            await client.chat({"model": "m"})
        finally:
            await client.aclose()
    assert len(set(neuron.peers)) == 1  # one kept-alive connection served all four


async def test_a_stream_left_before_its_end_closes_the_neurons_connection() -> None:
    neuron = Neuron()
    async with running(neuron) as served:
        client = NeuronClient(served.url, name="n1")
        try:
            async with client.stream_chat({"model": "m", "stream": True}) as stream:
                chunks = stream.chunks()
                assert await anext(chunks) == EVENTS[0]
            await asyncio.wait_for(neuron.left.wait(), 5)  # the neuron learns its client left
            await client.chat({"model": "m"})  # and the client goes on, on a new connection
        finally:
            await client.aclose()
    assert len(set(neuron.peers)) == 2


async def test_a_refused_connection_is_unreachable_and_names_the_neuron_only() -> None:
    client = NeuronClient("http://127.0.0.1:9", name="n9")  # the discard port: refused
    try:
        with pytest.raises(NeuronUnreachable) as refused:
            await client.chat({"model": "m"})
        with pytest.raises(NeuronUnreachable):
            async with client.stream_chat({"model": "m", "stream": True}):
                pass
    finally:
        await client.aclose()
    assert "n9" in refused.value.message and "127.0.0.1" not in refused.value.message
    assert refused.value.retry_after


async def test_a_neuron_silent_past_the_read_timeout_is_a_timeout_not_retried() -> None:
    """It took the request and may be generating still: another replica would take as long,
    so the gateway does not run it again there (504, never retried)."""
    neuron = Neuron()
    async with running(neuron) as served:
        timeout = httpx.Timeout(5.0, read=0.3)
        client = NeuronClient(served.url, name="n1", timeout=timeout)
        try:
            started = time.monotonic()
            with pytest.raises(AnswerTimeout) as silent:
                await client._post("/hang", {"model": "m"}, None)
        finally:
            await client.aclose()
    assert time.monotonic() - started < 5
    assert not isinstance(silent.value, NeuronUnavailable)  # slow is not gone
    assert "timeout" in silent.value.message.lower() and "n1" in silent.value.message
    assert silent.value.status == 504 and not retryable(silent.value)


async def test_a_kept_alive_connection_the_neuron_closes_is_retried_on_a_new_one() -> None:
    # The first connection answers once, then closes when its second request comes (as a neuron
    # closing an idle connection just as it is reused); every other connection answers.
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = len(connections)
        connections.append(0)
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            connections[number] += 1
            if number == 0 and connections[number] == 2:
                writer.close()
                return
            answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
            writer.write(answer + str(len(ANSWER)).encode() + b"\r\n\r\n" + ANSWER)
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = NeuronClient(f"http://127.0.0.1:{port}", name="n1")
    try:
        assert (await client.chat({"model": "m"})).raw == ANSWER
        assert (await client.chat({"model": "m"})).raw == ANSWER
    finally:
        await client.aclose()
        server.close()
    assert connections == [2, 1]


async def test_a_new_connection_the_neuron_closes_before_answering_is_not_retried() -> None:
    # The neuron read the request and may have acted on it (then died): sending it again could
    # run it twice, so the call fails and names the neuron.
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = NeuronClient(f"http://127.0.0.1:{port}", name="n1")
    try:
        with pytest.raises(NeuronUnreachable) as closed:
            await client.chat({"model": "m"})
    finally:
        await client.aclose()
        server.close()
    assert len(received) == 1
    assert "n1" in closed.value.message


async def test_an_answer_read_to_its_close_and_a_tls_neuron(tmp_path: Path) -> None:
    """HTTPS with the caller's TLS context; an answer framed by neither length nor chunks ends
    where the neuron closes the connection (HTTP/1.1 allows it; uvicorn never does it)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n" + ANSWER)
        await writer.drain()
        writer.close()

    serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    serving.load_cert_chain(cert, key)
    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=serving)
    port = server.sockets[0].getsockname()[1]
    trusting = ssl.create_default_context(cafile=str(cert))
    client = NeuronClient(f"https://127.0.0.1:{port}", name="n1", tls=trusting)
    stranger = NeuronClient(f"https://127.0.0.1:{port}", name="n1")  # the system's CAs only
    try:
        assert (await client.chat({"model": "m"})).raw == ANSWER
        with pytest.raises(NeuronUnreachable):
            await stranger.chat({"model": "m"})
    finally:
        await client.aclose()
        await stranger.aclose()
        server.close()
