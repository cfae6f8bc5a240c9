"""Anthropic Messages <-> OpenAI chat: pure translation of requests, responses and stream events.

Decisions a client can observe:
- `thinking` is ignored, thinking blocks in history are dropped, and so are server tools (no
  `input_schema`) and blocks of history cortex cannot serve; images become OpenAI `image_url`
  parts, which a neuron refuses (400) for a text-only model. Search results (in a user message
  or a tool result) become text headed by their title and source. User content cortex cannot
  send (documents, images in tool results) is a 400, never dropped in silence. As Anthropic
  answers, in its words: a message with no content (`""` or `[]`) but a final assistant one, a
  user message left with nothing (a prefill is only ever the client's own), and a final
  assistant prefill that ends in whitespace.
- Tool arguments that are not a JSON object come back as `{"_raw": "<text>"}` (see toolcalls).
- `stop_sequence`: the neuron stops *before* the stop string, so the text cannot show which one
  ended generation. cortex reports `stop_sequence` when the upstream choice names the matched
  string (`stop_reason`, vLLM's field, or `matched_stop`, SGLang's) and it is one of the
  request's `stop_sequences`; otherwise a "stop" finish is reported as `end_turn`.
- The reported `model` is the one the client asked for.
"""

from __future__ import annotations

import json
from typing import Any

from cortex.core.errors import InvalidRequest
from cortex.core.protocol.openai import (
    CONTEXT_FULL,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    FunctionDef,
    StreamOptions,
    Tool,
    ToolCall,
    ToolChoiceMode,
)
from cortex.core.protocol.openai import Usage as ChatUsage
from cortex.gateway.translate.chat_stream import ChatStreamTranslator
from cortex.gateway.translate.toolcalls import PendingToolCall, parse_arguments
from cortex.gateway.wire.anthropic import (
    AnthropicEvent,
    ContentBlockDeltaEvent,
    ContentBlockStartEvent,
    ContentBlockStopEvent,
    Conversation,
    ErrorDetail,
    ErrorEvent,
    ImageBlock,
    InputJsonDelta,
    InputMessage,
    MessageDelta,
    MessageDeltaEvent,
    MessageDeltaUsage,
    MessagesRequest,
    MessagesResponse,
    MessageStartEvent,
    MessageStopEvent,
    OtherBlock,
    OutputBlock,
    PingEvent,
    StopReason,
    TextBlock,
    TextDelta,
    TextOutput,
    ToolChoice,
    ToolResultBlock,
    ToolUseBlock,
    ToolUseOutput,
    Usage,
)

# ---- request --------------------------------------------------------------------------------

# Anthropic's words for a message with no content.
_EMPTY = "all messages must have non-empty content except for the optional final assistant message"


def to_chat_request(req: Conversation) -> ChatCompletionRequest:
    """A messages (or count_tokens) request as the OpenAI chat request a neuron serves."""
    messages = _system_messages(req.system)
    for n, message in enumerate(req.messages):
        prefill_room = message.role == "assistant" and n == len(req.messages) - 1
        if not message.content and message.role != "system" and not prefill_room:
            raise InvalidRequest(f"messages.{n}: {_EMPTY}", param=f"messages.{n}")
        messages.extend(_chat_messages(message))
    if not messages:
        raise InvalidRequest(
            "messages contain nothing cortex can send to a model", param="messages"
        )
    tools = [
        Tool(
            function=FunctionDef(name=t.name, description=t.description, parameters=t.input_schema)
        )
        for t in req.tools or []
        if t.input_schema is not None
    ]
    sampling: dict[str, Any] = {}
    if isinstance(req, MessagesRequest):
        sampling = {
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_k": req.top_k,
            "stop": req.stop_sequences or None,
            "stream": req.stream,
            # usage on every chunk: the first one gives message_start its input_tokens
            "stream_options": (
                StreamOptions(include_usage=True, continuous_usage_stats=True)
                if req.stream
                else None
            ),
            "user": req.metadata.user_id if req.metadata else None,
            "response_format": _response_format(req),
        }
    choice = req.tool_choice
    last = messages[-1]
    # A last assistant message is a prefill: the reply continues it (Anthropic's semantics).
    prefill = req.messages[-1].role == "assistant" and last.role == "assistant"
    prefill = prefill and not last.tool_calls and bool(last.text())
    if prefill and last.text() != last.text().rstrip():
        # Anthropic refuses it too: a reply continuing after a space starts its next token oddly.
        raise InvalidRequest(
            "messages: final assistant content cannot end with trailing whitespace",
            param="messages",
        )
    mode = _tool_choice(choice) if tools and choice else None
    if prefill and not isinstance(req, MessagesRequest) and mode not in (None, "auto", "none"):
        # A count generates nothing: no grammar, so nothing against a forced call after a
        # prefill (a /v1/messages refuses that pair, and it says so there).
        mode = None
    return ChatCompletionRequest(
        model=req.model,
        messages=messages,
        continue_final_message=True if prefill else None,
        tools=tools or None,
        tool_choice=mode,
        parallel_tool_calls=False
        if tools and choice and choice.disable_parallel_tool_use
        else None,
        **sampling,
    )


def _response_format(req: MessagesRequest) -> dict[str, Any] | None:
    """Anthropic's structured outputs (`output_config.format`, or the beta's top-level
    `output_format`) as OpenAI's response_format."""
    config = req.output_config.format if req.output_config else None
    if config is not None and req.output_format is not None:
        raise InvalidRequest(
            "give output_config.format or output_format, not both", param="output_format"
        )
    param = "output_format" if req.output_format is not None else "output_config"
    output = config if config is not None else req.output_format
    if not output or output.get("type") != "json_schema":
        return None
    schema = output.get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{param} of type json_schema needs a schema", param=param)
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}


def _system_messages(system: str | list[TextBlock] | None) -> list[ChatMessage]:
    # Claude Code sends several system blocks (identity, then the long prompt): one message.
    text = system if isinstance(system, str) else "\n\n".join(b.text for b in system or [])
    return [ChatMessage(role="system", content=text)] if text else []


def _tool_choice(choice: ToolChoice) -> ToolChoiceMode | dict[str, Any]:
    if choice.type == "any":
        return "required"
    if choice.type == "tool":
        if not choice.name:
            raise InvalidRequest("tool_choice of type 'tool' needs a name", param="tool_choice")
        return {"type": "function", "function": {"name": choice.name}}
    return "none" if choice.type == "none" else "auto"  # the same in both APIs


def _chat_messages(message: InputMessage) -> list[ChatMessage]:
    if isinstance(message.content, str):
        return [ChatMessage(role=message.role, content=message.content)]
    if message.role == "system":  # mid-conversation: its text, where it stands
        text = "\n\n".join(b.text for b in message.content if isinstance(b, TextBlock))
        return [ChatMessage(role="system", content=text)] if text else []
    if message.role == "assistant":
        return _assistant_message(message)
    said = _user_messages(message)
    if not said:  # as Anthropic answers; else the turn before would be taken for a prefill
        raise InvalidRequest(f"messages: {_EMPTY}", param="messages")
    return said


def _assistant_message(message: InputMessage) -> list[ChatMessage]:
    texts: list[str] = []
    calls: list[ToolCall] = []
    for block in message.content:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            arguments = json.dumps(block.input, ensure_ascii=False)
            calls.append(
                ToolCall(id=block.id, function=FunctionCall(name=block.name, arguments=arguments))
            )
    if not texts and not calls:
        return []
    content = "\n\n".join(texts) if texts else None
    return [ChatMessage(role="assistant", content=content, tool_calls=calls or None)]


# User content a model would be asked about, so never dropped in silence: refused when unsupported.
_USER_CONTENT = ("document", "audio", "video", "file", "container_upload")


def _user_messages(message: InputMessage) -> list[ChatMessage]:
    """Tool results become `tool` messages; other blocks are grouped around them, order kept."""
    out: list[ChatMessage] = []
    parts: list[dict[str, Any]] = []
    for block in message.content:
        if isinstance(block, ToolResultBlock):
            out.extend(_user_parts_message(parts))
            parts = []
            text = _result_text(block)
            out.append(
                ChatMessage(
                    role="tool",
                    tool_call_id=block.tool_use_id,
                    content=f"Error: {text}" if block.is_error else text,
                )
            )
        elif isinstance(block, TextBlock):
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, ImageBlock):
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block)}})
        elif isinstance(block, OtherBlock) and block.type == "search_result":
            parts.append({"type": "text", "text": _search_result_text(block)})
        elif isinstance(block, OtherBlock) and block.type in _USER_CONTENT:
            raise InvalidRequest(
                f"content blocks of type {block.type!r} are not supported: send text",
                param="messages",
            )
    out.extend(_user_parts_message(parts))
    return out


def _result_text(block: ToolResultBlock) -> str:
    """A tool result as text; a part a text model cannot read (an image) is a 400."""
    if not isinstance(block.content, list):
        return block.text()
    texts = []
    for part in block.content:
        if isinstance(part, TextBlock):
            texts.append(part.text)
        elif isinstance(part, OtherBlock) and part.type == "search_result":
            texts.append(_search_result_text(part))
        else:
            raise InvalidRequest(
                "tool_result content can only be text or search results here: the models "
                "cortex serves take tool results as text",
                param="messages",
            )
    return "\n".join(texts)


def _search_result_text(block: OtherBlock) -> str:
    """A search result (title, source, text blocks) as text the model reads as its source."""
    extra = block.model_extra or {}
    title, source = extra.get("title") or "", extra.get("source") or ""
    content = extra.get("content") or []
    texts = [c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text"]
    head = f"Search result: {title}" + (f" ({source})" if source else "")
    return "\n".join([head, *texts])


def _user_parts_message(parts: list[dict[str, Any]]) -> list[ChatMessage]:
    if not parts:
        return []
    if all(p["type"] == "text" for p in parts):
        # Plain strings suit every chat template; several text blocks read as paragraphs.
        return [ChatMessage(role="user", content="\n\n".join(p["text"] for p in parts))]
    return [ChatMessage(role="user", content=parts)]


def _image_url(block: ImageBlock) -> str:
    source = block.source
    if source.type == "base64" and source.data:
        return f"data:{source.media_type or 'image/png'};base64,{source.data}"
    if source.type == "url" and source.url:
        return source.url
    raise InvalidRequest(
        f"image source of type {source.type!r} is not supported: send base64 or url",
        param="messages",
    )


# ---- response -------------------------------------------------------------------------------


def from_chat_response(
    resp: ChatCompletion, req: MessagesRequest, message_id: str | None = None
) -> MessagesResponse:
    """A non-streamed chat completion as an Anthropic message."""
    content: list[OutputBlock] = []
    stop_reason: StopReason = "end_turn"
    stop_sequence = None
    if resp.choices:
        choice = resp.choices[0]
        if choice.message.content:
            content.append(TextOutput(text=choice.message.content))
        for call in choice.message.tool_calls or []:
            content.append(
                ToolUseOutput(
                    id=call.id,
                    name=call.function.name,
                    input=parse_arguments(call.function.arguments),
                )
            )
        stop_reason, stop_sequence = stop_reason_for(
            choice.finish_reason, bool(choice.message.tool_calls), choice.model_extra, req
        )
    return MessagesResponse(
        id=message_id or anthropic_message_id(resp.id),
        content=content,
        model=req.model,
        stop_reason=stop_reason,
        stop_sequence=stop_sequence,
        usage=_usage(resp.usage),
    )


def anthropic_message_id(upstream_id: str) -> str:
    """`msg_...` from an upstream `chatcmpl-...` id (same suffix, so logs correlate)."""
    return "msg_" + upstream_id.removeprefix("chatcmpl-")


def stop_reason_for(
    finish_reason: str | None,
    used_tools: bool,
    choice_extra: dict[str, Any] | None,
    req: MessagesRequest,
) -> tuple[StopReason, str | None]:
    """Anthropic's stop_reason (and matched stop sequence) for an OpenAI finish. A cut answer is
    `max_tokens` even when it holds complete tool calls, as the API reports it, or
    `model_context_window_exceeded` when the neuron says the context was full (its choice's
    `context_window_exceeded`, docs/architecture.md "Completion limits")."""
    extra = choice_extra or {}
    if finish_reason == "length":
        full = extra.get(CONTEXT_FULL) is True
        return ("model_context_window_exceeded" if full else "max_tokens"), None
    if used_tools or finish_reason == "tool_calls":
        return "tool_use", None
    if finish_reason == "content_filter":
        return "refusal", None
    for key in ("stop_reason", "matched_stop"):
        matched = extra.get(key)
        if isinstance(matched, str) and matched in (req.stop_sequences or []):
            return "stop_sequence", matched
    return "end_turn", None


def _usage(usage: ChatUsage | None) -> Usage:
    if usage is None:
        return Usage(input_tokens=0, output_tokens=0)
    details = usage.prompt_tokens_details
    cached = details.cached_tokens if details else 0
    return Usage(
        input_tokens=usage.prompt_tokens - cached,
        output_tokens=usage.completion_tokens,
        cache_read_input_tokens=cached,
    )


# ---- stream ---------------------------------------------------------------------------------


class StreamTranslator(ChatStreamTranslator[AnthropicEvent]):
    """OpenAI chat chunks in, Anthropic stream events out, in Anthropic's exact order."""

    def __init__(
        self, req: MessagesRequest, message_id: str, prompt_tokens: int | None = None
    ) -> None:
        super().__init__(prompt_tokens)
        self._req = req
        self._message_id = message_id
        self._next_index = 0
        self._text_index: int | None = None
        self._used_tools = False

    def _opening(self) -> list[AnthropicEvent]:
        """message_start, carrying the prompt's token count when it is already known: as the API
        counts it, cached tokens apart (message_delta repeats the same numbers)."""
        cached = self._prompt_cached
        usage = Usage(
            input_tokens=(self._prompt_tokens or 0) - cached,
            output_tokens=0,
            cache_read_input_tokens=cached,
        )
        message = MessagesResponse(
            id=self._message_id, content=[], model=self._req.model, usage=usage
        )
        return [MessageStartEvent(message=message)]

    def _closing(self) -> list[AnthropicEvent]:
        """message_delta (stop reason, usage) and message_stop."""
        stop_reason, stop_sequence = stop_reason_for(
            self._finish_reason, self._used_tools, self._choice_extra, self._req
        )
        usage = _usage(self.usage())
        return [
            MessageDeltaEvent(
                delta=MessageDelta(stop_reason=stop_reason, stop_sequence=stop_sequence),
                usage=MessageDeltaUsage(
                    output_tokens=usage.output_tokens,
                    input_tokens=usage.input_tokens,
                    cache_read_input_tokens=usage.cache_read_input_tokens,
                ),
            ),
            MessageStopEvent(),
        ]

    def error(self, message: str, error_type: str = "api_error") -> list[AnthropicEvent]:
        """The `error` event for a stream that dies mid-way; nothing follows it."""
        self._done = True
        return [ErrorEvent(error=ErrorDetail(type=error_type, message=message))]

    def _text_delta(self, text: str) -> list[AnthropicEvent]:
        events: list[AnthropicEvent] = []
        if self._text_index is None:
            self._text_index = self._take_index()
            events.append(
                ContentBlockStartEvent(index=self._text_index, content_block=TextOutput(text=""))
            )
        events.append(ContentBlockDeltaEvent(index=self._text_index, delta=TextDelta(text=text)))
        return events

    def _close_open(self) -> list[AnthropicEvent]:
        events: list[AnthropicEvent] = []
        if self._text_index is not None:
            events.append(ContentBlockStopEvent(index=self._text_index))
            self._text_index = None
        for call in self._tools.drain():
            events.extend(self._tool_block(call))
        return events

    def _tool_block(self, call: PendingToolCall) -> list[AnthropicEvent]:
        self._used_tools = True
        index = self._take_index()
        block = ToolUseOutput(
            id=call.id or f"toolu_{self._message_id}_{index}", name=call.name, input={}
        )
        arguments = json.dumps(parse_arguments(call.arguments), ensure_ascii=False)
        return [
            ContentBlockStartEvent(index=index, content_block=block),
            ContentBlockDeltaEvent(index=index, delta=InputJsonDelta(partial_json=arguments)),
            ContentBlockStopEvent(index=index),
        ]

    def idle(self) -> list[AnthropicEvent]:
        return [ping()] if self._started and not self._done else []

    def _take_index(self) -> int:
        index = self._next_index
        self._next_index += 1
        return index


# What a stream sends while it waits before message_start (a model loading): an SSE comment,
# which every SSE reader skips. The API's first event is always message_start, so no `ping` yet.
KEEPALIVE = b": keep-alive\n\n"


def ping() -> AnthropicEvent:
    """The keep-alive Anthropic sends once a stream has begun (after message_start)."""
    return PingEvent()


def encode_sse(event: AnthropicEvent) -> bytes:
    """One SSE frame: `event: <type>` then the JSON body."""
    return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n".encode()
