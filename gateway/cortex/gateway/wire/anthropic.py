"""Anthropic Messages API wire models (requests, responses, stream events). Unknown fields are kept.

Shapes follow https://docs.anthropic.com/en/api/messages and the official `anthropic` SDK's types.
Request content blocks of types cortex does not model (documents, server tool results, ...) are
accepted as `OtherBlock` so that clients such as Claude Code are never refused for them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    Tag,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from cortex.core.protocol.openai import check_tool_choice


class _Open(BaseModel):
    """Unknown fields are kept; request booleans are StrictBool, so `"stream": "yes"` is refused."""

    model_config = ConfigDict(extra="allow")


# ---- request content blocks -----------------------------------------------------------------


class CacheControl(_Open):
    type: str = "ephemeral"
    ttl: str | None = None


class TextBlock(_Open):
    type: Literal["text"] = "text"
    text: str
    cache_control: CacheControl | None = None


class ImageSource(_Open):
    """`base64` (media_type + data) or `url`; other source kinds (file ids) are kept but unused."""

    type: str
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class ImageBlock(_Open):
    type: Literal["image"] = "image"
    source: ImageSource
    cache_control: CacheControl | None = None


class ToolUseBlock(_Open):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)
    cache_control: CacheControl | None = None


class OtherBlock(_Open):
    """Any block type cortex does not translate (document, server_tool_use, ...): tolerated."""

    type: str


def _result_part_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in ("text", "image") else "other"


ToolResultPart = Annotated[
    Annotated[TextBlock, Tag("text")]
    | Annotated[ImageBlock, Tag("image")]
    | Annotated[OtherBlock, Tag("other")],
    Discriminator(_result_part_tag),
]


class ToolResultBlock(_Open):
    type: Literal["tool_result"] = "tool_result"
    tool_use_id: str
    content: str | list[ToolResultPart] | None = None
    is_error: StrictBool | None = None
    cache_control: CacheControl | None = None

    def text(self) -> str:
        """The result as text: text parts joined by newlines, images and other parts dropped."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content if isinstance(p, TextBlock))


class ThinkingBlock(_Open):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Open):
    type: Literal["redacted_thinking"] = "redacted_thinking"
    data: str


_BLOCK_TAGS = ("text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking")


def _block_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in _BLOCK_TAGS else "other"


ContentBlock = Annotated[
    Annotated[TextBlock, Tag("text")]
    | Annotated[ImageBlock, Tag("image")]
    | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ToolResultBlock, Tag("tool_result")]
    | Annotated[ThinkingBlock, Tag("thinking")]
    | Annotated[RedactedThinkingBlock, Tag("redacted_thinking")]
    | Annotated[OtherBlock, Tag("other")],
    Discriminator(_block_tag),
]


# ---- requests -------------------------------------------------------------------------------


class InputMessage(_Open):
    """`system`: an instruction in the middle of the conversation, as Claude Code sends them
    (its `mid-conversation-system` beta)."""

    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]


class ToolDefinition(_Open):
    """A client tool (`input_schema` set); Anthropic server tools (typed, no schema) are kept too."""

    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None
    cache_control: CacheControl | None = None


class ToolChoice(_Open):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: StrictBool | None = None


class Metadata(_Open):
    user_id: str | None = None


class ThinkingConfig(_Open):
    """Accepted and ignored: the models cortex serves have no separate thinking budget."""

    type: str
    budget_tokens: int | None = None


class OutputConfig(_Open):
    """Structured outputs: `format` is {"type": "json_schema", "schema": {...}}; `effort` and
    other fields are kept and ignored."""

    format: dict[str, Any] | None = None


class Conversation(_Open):
    """What a messages request and a count_tokens request share: the prompt side."""

    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(
        cls, choice: ToolChoice | None, info: ValidationInfo
    ) -> ToolChoice | None:
        """A forced tool must be a client tool of the request (server tools cannot be served)."""
        if choice is not None and choice.type == "tool":
            tools = info.data.get("tools") or []
            names = [t.name for t in tools if t.input_schema is not None]
            check_tool_choice(choice.name or "", names)
        return choice


class MessagesRequest(Conversation):
    """POST /v1/messages."""

    max_tokens: int = Field(ge=0)
    stop_sequences: list[str] | None = None
    stream: StrictBool = False
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    metadata: Metadata | None = None
    output_config: OutputConfig | None = None
    # The structured-outputs beta's name for `output_config.format` (Pydantic AI's NativeOutput).
    output_format: dict[str, Any] | None = None

    @field_validator("max_tokens")
    @classmethod
    def _generates(cls, max_tokens: int) -> int:
        """0 asks Anthropic to fill its prompt cache and generate nothing; cortex's prefix cache
        is filled by a request that generates, so 0 is refused by name, not as a wrong type."""
        if max_tokens == 0:
            raise PydanticCustomError(
                "unsupported",
                "max_tokens 0 (filling the prompt cache without generating) is not supported: "
                "ask for at least 1 token",
            )
        return max_tokens


class CountTokensRequest(Conversation):
    """POST /v1/messages/count_tokens."""


class CountTokensResponse(_Open):
    input_tokens: int


# ---- responses ------------------------------------------------------------------------------

StopReason = Literal[
    "end_turn",
    "max_tokens",
    "stop_sequence",
    "tool_use",
    "refusal",
    "model_context_window_exceeded",
]


class TextOutput(_Open):
    type: Literal["text"] = "text"
    text: str


class ToolUseOutput(_Open):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


OutputBlock = Annotated[TextOutput | ToolUseOutput, Field(discriminator="type")]


class Usage(_Open):
    """input_tokens excludes cached prompt tokens, which are reported as cache reads (as Anthropic)."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class MessagesResponse(_Open):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[OutputBlock]
    model: str
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: Usage


# ---- stream events (SSE `event:` name == `type`) --------------------------------------------


class MessageStartEvent(_Open):
    type: Literal["message_start"] = "message_start"
    message: MessagesResponse


class ContentBlockStartEvent(_Open):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: OutputBlock


class TextDelta(_Open):
    type: Literal["text_delta"] = "text_delta"
    text: str


class InputJsonDelta(_Open):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class ContentBlockDeltaEvent(_Open):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: Annotated[TextDelta | InputJsonDelta, Field(discriminator="type")]


class ContentBlockStopEvent(_Open):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class MessageDelta(_Open):
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None


class MessageDeltaUsage(_Open):
    """Cumulative totals; input_tokens repeats message_start's (or corrects it when it was unknown)."""

    output_tokens: int
    input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class MessageDeltaEvent(_Open):
    type: Literal["message_delta"] = "message_delta"
    delta: MessageDelta
    usage: MessageDeltaUsage


class MessageStopEvent(_Open):
    type: Literal["message_stop"] = "message_stop"


class PingEvent(_Open):
    type: Literal["ping"] = "ping"


class ErrorDetail(_Open):
    type: str = "api_error"
    message: str


class ErrorEvent(_Open):
    type: Literal["error"] = "error"
    error: ErrorDetail


AnthropicEvent = (
    MessageStartEvent
    | ContentBlockStartEvent
    | ContentBlockDeltaEvent
    | ContentBlockStopEvent
    | MessageDeltaEvent
    | MessageStopEvent
    | PingEvent
    | ErrorEvent
)


# ---- models (GET /v1/models with an `anthropic-version` header) -----------------------------


class ModelInfo(_Open):
    """An entry of Anthropic's model list, with the model's limits (as the API reports them:
    `max_input_tokens` is the context window, `max_tokens` the most one answer may hold)."""

    type: Literal["model"] = "model"
    id: str
    display_name: str
    created_at: str  # RFC 3339; the epoch when unknown, as the API does
    max_input_tokens: int | None = None
    max_tokens: int | None = None


class ModelPage(_Open):
    data: list[ModelInfo]
    has_more: bool
    first_id: str | None
    last_id: str | None
