"""Reading a gateway's stream in any of the three dialects, and what its failure looks like."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


@dataclass(frozen=True)
class Event:
    name: str | None  # the `event:` line (Anthropic, Responses); None for OpenAI's bare data
    data: str


def parse(text: str) -> list[Event]:
    """SSE text as events; comments (keep-alives) are dropped."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = block.split("\n")
        name = next((line[6:].strip() for line in lines if line.startswith("event:")), None)
        data = "\n".join(line[5:].lstrip() for line in lines if line.startswith("data:"))
        if data:
            events.append(Event(name, data))
    return events


@dataclass(frozen=True)
class Dialect:
    name: str
    path: str
    max_tokens_field: str

    def body(
        self, model: str, max_tokens: int, stream: bool, prompt: str = MESSAGES[0]["content"]
    ) -> dict[str, Any]:
        """A request in this dialect; the gateway's prefix affinity routes by `prompt`."""
        body: dict[str, Any] = {"model": model, self.max_tokens_field: max_tokens}
        if self.name == "responses":
            body["input"] = prompt
        else:
            body["messages"] = [{"role": "user", "content": prompt}]
        if stream:
            # Greedy: the tests need the stream to outlast a kill, and sampled text from random
            # weights meets EOS now and then (ignore_eos would not survive the translations).
            body["stream"] = True
            body["temperature"] = 0
        return body

    def failed(self, events: list[Event]) -> str:
        """The error message a stream ended with; AssertionError unless it ended in this
        dialect's error event(s)."""
        assert events, "the stream carried no event at all"
        if self.name == "openai":
            assert events[-1].data == "[DONE]", events[-3:]
            error = json.loads(events[-2].data)["error"]
        elif self.name == "anthropic":
            assert events[-1].name == "error", events[-3:]
            payload = json.loads(events[-1].data)
            assert payload["type"] == "error"
            error = payload["error"]
            assert error["type"]
        else:
            assert [e.name for e in events[-2:]] == ["error", "response.failed"], events[-3:]
            failed = json.loads(events[-1].data)["response"]
            assert failed["status"] == "failed"
            error = failed["error"]
        assert error["message"]
        return str(error["message"])

    def error_of(self, body: dict[str, Any]) -> dict[str, Any]:
        """The error object of a non-stream error answer in this dialect's envelope."""
        if self.name == "anthropic":
            assert body["type"] == "error", body
        error: dict[str, Any] = body["error"]
        assert error["message"] and error["type"], body
        return error


DIALECTS = (
    Dialect("openai", "/v1/chat/completions", "max_tokens"),
    Dialect("anthropic", "/v1/messages", "max_tokens"),
    Dialect("responses", "/v1/responses", "max_output_tokens"),
)
