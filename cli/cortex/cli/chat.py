"""`cortex chat MODEL`: a terminal chat through the gateway, like `ollama run`: answers stream in,
the conversation is kept, `/bye` (or end of input) quits. A failed answer costs one line and its
question, never the conversation; Ctrl-C stops an answer, and at the prompt quits."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import httpx

from cortex.core.admin import raise_for, unreachable
from cortex.core.errors import CortexError

BYE = "/bye"
HELP = (
    "Type a message; /bye, end of input (Ctrl-D) or Ctrl-C quits, /clear forgets the "
    "conversation, Ctrl-C during an answer stops it."
)
Message = dict[str, str]


def chat(
    endpoint: str,
    model: str,
    api_key: str | None,
    system: str | None,
    temperature: float | None = None,
) -> int:
    """Read messages from stdin until /bye or EOF, streaming each answer to stdout. Without a
    `temperature`, the model's own sampling defaults apply."""
    history: list[Message] = [{"role": "system", "content": system}] if system else []
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
            except (EOFError, KeyboardInterrupt):
                if interactive:
                    print()  # the shell's prompt starts on a line of its own
                break
            if text == BYE:
                break
            if text == "/clear":
                del history[1 if system else 0 :]
                continue
            if not text:
                continue
            question = {"role": "user", "content": text}
            answer = _answer(http, endpoint, model, [*history, question], temperature)
            if answer is not None:  # else the question goes, and the user can ask it again
                history += [question, {"role": "assistant", "content": answer}]
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


def _answer(
    http: httpx.Client,
    endpoint: str,
    model: str,
    messages: list[Message],
    temperature: float | None,
) -> str | None:
    """The answer, printed as it streams in; None when it failed (said in one line on stderr)
    or was stopped with Ctrl-C."""
    pieces: list[str] = []
    try:
        for piece in _stream(http, endpoint, model, messages, temperature):
            print(piece, end="", flush=True)
            pieces.append(piece)
    except (CortexError, KeyboardInterrupt) as exc:
        if pieces:
            print(flush=True)  # end the cut answer's line
        if isinstance(exc, CortexError):
            print(f"cortex: {exc}", file=sys.stderr, flush=True)
        return None
    print(flush=True)
    return "".join(pieces)


def _stream(
    http: httpx.Client,
    endpoint: str,
    model: str,
    messages: list[Message],
    temperature: float | None,
) -> Iterator[str]:
    """The answer's text pieces, from the gateway's OpenAI chat stream."""
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
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
                yield from _pieces(endpoint, data)
    except httpx.TransportError as exc:
        raise unreachable(endpoint, exc) from None


def _pieces(endpoint: str, data: str) -> Iterator[str]:
    try:
        event = json.loads(data)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        raise CortexError(f"{endpoint} streamed no OpenAI chunk: {data[:80]!r}")
    if event.get("error"):
        raise CortexError(str(event["error"].get("message", "the stream failed")))
    for choice in event.get("choices") or []:
        yield (choice.get("delta") or {}).get("content") or ""
