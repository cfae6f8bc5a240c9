"""The upstream side both stream translators share: OpenAI chat chunks read once, in order.

A translator starts its stream once, follows choice 0's text and tool-call deltas (calls wait in
a ToolCallBuffer for the finish), keeps the finish and the last usage the neuron reported, and
counts content chunks as the output-token estimate for a neuron that reports none: `usage()` is
the stream's one count, which its dialect shows the client and the proxy settles the call with.
Subclasses say only which events each step emits in their dialect.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Generic, TypeVar

from cortex.core.protocol.openai import ChatCompletionChunk, PromptTokensDetails
from cortex.core.protocol.openai import Usage as ChatUsage
from cortex.gateway.translate.toolcalls import ToolCallBuffer

E = TypeVar("E")


class ChatStreamTranslator(ABC, Generic[E]):
    """OpenAI chat chunks in, one dialect's stream events out."""

    def __init__(self, prompt_tokens: int | None = None) -> None:
        self._prompt_tokens = prompt_tokens
        self._prompt_cached = 0
        self._started = False
        self._done = False
        self._tools = ToolCallBuffer()
        self._finish_reason: str | None = None
        self._choice_extra: dict[str, Any] | None = None
        self._usage: ChatUsage | None = None
        self._output_chunks = 0  # output-token estimate when upstream never reports usage

    def start(self) -> list[E]:
        """The dialect's opening events, once."""
        if self._started:
            return []
        self._started = True
        return self._opening()

    def feed(self, chunk: ChatCompletionChunk) -> list[E]:
        """Events for one upstream chunk (often none: tool calls wait for the finish)."""
        if not self._started and chunk.usage is not None and self._prompt_tokens is None:
            # continuous usage stats: the first chunk tells the opening events the prompt's size,
            # and how much of it the prefix cache served
            self._prompt_tokens = chunk.usage.prompt_tokens
            self._prompt_cached = _cached(chunk.usage)
        events = self.start()
        if self._done:
            return events
        if chunk.usage is not None:
            self._usage = chunk.usage
        for choice in chunk.choices:
            if choice.index != 0:
                continue  # n=1 is all cortex serves
            delta = choice.delta
            if delta.content or delta.tool_calls:
                self._output_chunks += 1
            if delta.content:
                events.extend(self._text_delta(delta.content))
            for call in delta.tool_calls or []:
                self._tools.add(call)
            if choice.finish_reason is not None:
                self._finish_reason = choice.finish_reason
                self._choice_extra = choice.model_extra
                events.extend(self._close_open())
        return events

    def finish(self) -> list[E]:
        """Close what is open, then the dialect's closing events, once."""
        events = self.start()
        if self._done:
            return events
        self._done = True
        events.extend(self._close_open())
        events.extend(self._closing())
        return events

    def idle(self) -> list[E]:
        """The dialect's keep-alive events while the neuron generates what it does not stream
        yet (a tool call); none where the dialect has no such event, or before the opening."""
        return []

    def usage(self) -> ChatUsage:
        """The last usage reported, or the prompt's size and the output estimate."""
        if self._usage is not None:
            return self._usage
        prompt = self._prompt_tokens or 0
        cached = PromptTokensDetails(cached_tokens=self._prompt_cached)
        return ChatUsage(
            prompt_tokens=prompt,
            completion_tokens=self._output_chunks,
            total_tokens=prompt + self._output_chunks,
            prompt_tokens_details=cached if self._prompt_cached else None,
        )

    @abstractmethod
    def _opening(self) -> list[E]: ...

    @abstractmethod
    def _text_delta(self, text: str) -> list[E]: ...

    @abstractmethod
    def _close_open(self) -> list[E]:
        """Close the open text and emit the buffered tool calls, whole."""

    @abstractmethod
    def _closing(self) -> list[E]: ...


def _cached(usage: ChatUsage) -> int:
    details = usage.prompt_tokens_details
    return details.cached_tokens if details is not None else 0
