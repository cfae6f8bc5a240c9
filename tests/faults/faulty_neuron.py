"""A neuron that breaks after its polls look fine: `python faulty_neuron.py --mode hang|garbage`.

It answers a neuron's lifecycle reads as the benchmark stub does (one ready model, named after the
mode) and breaks only inference: `hang` sends the response headers (and, for a stream, one
chunk) and then nothing, forever; `garbage` answers 200 with bytes that are no JSON and no SSE.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2]))  # bench/, run from anywhere

from starlette.types import Receive, Send

from bench.stub_backend import StubBackend, _read_body, chat_stream

GARBAGE = b'\x00\xff<html>502 upstream confused</html>{"choices": [tru'
JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream")]


class FaultyNeuron(StubBackend):
    def __init__(self, mode: str) -> None:
        super().__init__(model=mode)
        self.mode = mode

    async def _chat(self, receive: Receive, send: Send) -> None:
        stream = bool(json.loads(await _read_body(receive) or b"{}").get("stream"))
        await send(
            {"type": "http.response.start", "status": 200, "headers": SSE if stream else JSON}
        )
        if self.mode == "garbage":
            body = b"data: " + GARBAGE + b"\n\n" if stream else GARBAGE
            await send({"type": "http.response.body", "body": body})
            return
        if stream:
            first = chat_stream(self.model, include_usage=False)[0]
            await send({"type": "http.response.body", "body": first, "more_body": True})
        await asyncio.Event().wait()  # hangs after the headers, never closing the connection


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=("hang", "garbage"), required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # Its hung answers never end by themselves: on SIGTERM, cancel them rather than wait for them
    # (uvicorn waits forever by default, and the fixture's stop would take its 15 s SIGKILL path).
    uvicorn.run(
        FaultyNeuron(args.mode),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()
