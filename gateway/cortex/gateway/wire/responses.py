"""OpenAI Responses API wire models (requests, response object, stream events). Unknown fields kept.

Shapes follow the official `openai` SDK's `types.responses`. Input items and tools of kinds cortex
does not serve (reasoning, hosted tools, ...) are accepted as `OtherItem` / `OtherTool`.
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

from cortex.core.protocol.openai import Stream, check_tool_choice, refuse_logprobs


class _Open(BaseModel):
    """Unknown fields are kept; request booleans are StrictBool, so `"stream": "yes"` is refused."""

    model_config = ConfigDict(extra="allow")


# ---- request --------------------------------------------------------------------------------


class ContentPart(_Open):
    """input_text / output_text / refusal carry text; input_image carries image_url."""

    type: str
    text: str | None = None
    refusal: str | None = None
    image_url: str | None = None
    detail: str | None = None


class MessageItem(_Open):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class FunctionCallItem(_Open):
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str = ""


class FunctionCallOutputItem(_Open):
    type: Literal["function_call_output"] = "function_call_output"
    call_id: str
    output: str | list[ContentPart]


class OtherItem(_Open):
    """Reasoning, item references, hosted-tool calls: tolerated, not translated."""

    type: str


_ITEM_TAGS = ("message", "function_call", "function_call_output")


def _item_tag(value: Any) -> str:
    # EasyInputMessage may omit `type`; a role is what marks it as a message then.
    if isinstance(value, dict):
        kind = value.get("type") or ("message" if "role" in value else None)
    else:
        kind = getattr(value, "type", None)
    return kind if kind in _ITEM_TAGS else "other"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[OtherItem, Tag("other")],
    Discriminator(_item_tag),
]


class FunctionTool(_Open):
    type: Literal["function"] = "function"
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class OtherTool(_Open):
    """Hosted tools (web_search, file_search, ...): cortex cannot run them, so they are dropped."""

    type: str


def _tool_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "function" if kind == "function" else "other"


ResponsesTool = Annotated[
    Annotated[FunctionTool, Tag("function")] | Annotated[OtherTool, Tag("other")],
    Discriminator(_tool_tag),
]


class ResponsesRequest(_Open):
    """POST /v1/responses. cortex stores nothing: fields that refer to stored state are refused."""

    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: Stream = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    store: StrictBool | None = None
    # "auto": drop input items to fit the context. cortex drops none: an input that does not fit
    # is refused naming this field (translate/responses.py, client_error).
    truncation: Literal["auto", "disabled"] | None = None
    # State kept on OpenAI's servers, which cortex does not keep: refused when set.
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    background: StrictBool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    include: list[str] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _no_logprobs(cls, asked: int | None) -> int | None:
        return refuse_logprobs(asked)

    @field_validator("include")
    @classmethod
    def _no_logprobs_included(cls, include: list[str] | None) -> list[str] | None:
        refuse_logprobs("message.output_text.logprobs" in (include or []))
        return include

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(
        cls, choice: str | dict[str, Any] | None, info: ValidationInfo
    ) -> str | dict[str, Any] | None:
        """`{"type": "function", "name": ...}` must name one of the request's function tools."""
        if isinstance(choice, dict) and choice.get("type") == "function":
            tools = info.data.get("tools") or []
            names = [t.name for t in tools if isinstance(t, FunctionTool)]
            check_tool_choice(str(choice.get("name") or ""), names)
        return choice


# ---- response object ------------------------------------------------------------------------


class OutputText(_Open):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list)
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(_Open):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class OutputFunctionCall(_Open):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = Annotated[OutputMessage | OutputFunctionCall, Field(discriminator="type")]


class InputTokensDetails(_Open):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(_Open):
    reasoning_tokens: int = 0


class ResponseUsage(_Open):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseError(_Open):
    code: str = "server_error"
    message: str


class IncompleteDetails(_Open):
    reason: Literal["max_output_tokens", "content_filter"]


ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


class ResponseObject(_Open):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    parallel_tool_calls: bool = True
    temperature: float | None = None
    top_p: float | None = None
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    previous_response_id: str | None = None
    store: bool = False
    truncation: Literal["auto", "disabled"] = "disabled"
    user: str | None = None
    usage: ResponseUsage | None = None

    def output_text(self) -> str:
        """All output_text parts joined, as the SDK's `Response.output_text` does."""
        return "".join(
            part.text
            for item in self.output
            if isinstance(item, OutputMessage)
            for part in item.content
        )


# ---- stream events (SSE `event:` name == `type`; every event carries sequence_number) --------


class _Event(_Open):
    sequence_number: int


class LifecycleEvent(_Event):
    type: Literal[
        "response.created",
        "response.in_progress",
        "response.completed",
        "response.incomplete",
        "response.failed",
    ]
    response: ResponseObject


class OutputItemEvent(_Event):
    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int
    item: OutputItem


class ContentPartEvent(_Event):
    type: Literal["response.content_part.added", "response.content_part.done"]
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class OutputTextDeltaEvent(_Event):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


class OutputTextDoneEvent(_Event):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


class FunctionCallArgumentsDeltaEvent(_Event):
    type: Literal["response.function_call_arguments.delta"] = (
        "response.function_call_arguments.delta"
    )
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDoneEvent(_Event):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    code: str | None = None
    message: str
    param: str | None = None


ResponsesEvent = (
    LifecycleEvent
    | OutputItemEvent
    | ContentPartEvent
    | OutputTextDeltaEvent
    | OutputTextDoneEvent
    | FunctionCallArgumentsDeltaEvent
    | FunctionCallArgumentsDoneEvent
    | ErrorEvent
)
