"""`cortex chat MODEL`: a terminal chat through the gateway, like `ollama run`: answers stream in,
the conversation is kept, `/bye` (or end of input) quits."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import httpx

from cortex.core.admin import raise_for, unreachable
from cortex.core.errors import CortexError

BYE = "/bye"
HELP = "Type a message; /bye or end of input (Ctrl-D) quits, /clear forgets the conversation."


def chat(
    endpoint: str,
    model: str,
    api_key: str | None,
    system: str | None,
    temperature: float | None = None,
) -> int:
    """Read messages from stdin until /bye or EOF, streaming each answer to stdout. Without a
    `temperature`, the model's own sampling defaults apply."""
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(connect=3.0, read=600.0, write=30.0, pool=30.0)
    with httpx.Client(base_url=endpoint, headers=headers, timeout=timeout) as http:
        check_gateway(http, endpoint)
        if interactive:
            print(HELP)
        while True:
            try:
                text = input(">>> " if interactive else "").strip()
            except EOFError:
                break
            if text == BYE:
                break
            if text == "/clear":
                del history[1 if system else 0 :]
                continue
            if not text:
                continue
            history.append({"role": "user", "content": text})
            answer = "".join(_echo(_stream(http, model, history, temperature)))
            print(flush=True)
            history.append({"role": "assistant", "content": answer})
    return 0


def check_gateway(http: httpx.Client, endpoint: str) -> None:
    """Before the first question: the endpoint answers, and answers as an OpenAI API does."""
    try:
        response = http.get("/v1/models")
    except httpx.TransportError as exc:
        raise unreachable(endpoint, exc) from None
    if response.status_code >= 400:
        raise_for(response, response.content)
    try:
        listed = isinstance(response.json().get("data"), list)
    except (ValueError, AttributeError):
        listed = False
    if not listed:
        raise CortexError(f"{endpoint} is not a cortex gateway: /v1/models is no model list")


def _echo(pieces: Iterator[str]) -> Iterator[str]:
    for piece in pieces:
        print(piece, end="", flush=True)
        yield piece


def _stream(
    http: httpx.Client, model: str, history: list[dict[str, str]], temperature: float | None
) -> Iterator[str]:
    """The answer's text pieces, from the gateway's OpenAI chat stream."""
    body: dict[str, Any] = {"model": model, "messages": history, "stream": True}
    if temperature is not None:
        body["temperature"] = temperature
    try:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code >= 400:
                raise_for(response, response.read())
            for line in response.iter_lines():
                data = line.removeprefix("data:").strip()
                if not line.startswith("data:") or data == "[DONE]":
                    continue
                event = json.loads(data)
                if event.get("error"):
                    raise CortexError(str(event["error"].get("message", "the stream failed")))
                for choice in event.get("choices") or []:
                    yield (choice.get("delta") or {}).get("content") or ""
    except httpx.TransportError as exc:
        raise unreachable(str(http.base_url).rstrip("/"), exc) from None
