"""OpenAI wire models (chat, completions, embeddings). Plain pydantic; unknown fields are kept."""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

# The data of a stream's last SSE event (`data: [DONE]`).
DONE = "[DONE]"


def sse_data(payload: dict[str, Any]) -> bytes:
    """A stream chunk as an SSE data event, in compact JSON: how a neuron writes its chunks, and
    how the gateway writes one again when it takes out what the client did not ask for."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class _Open(BaseModel):
    """Unknown fields are kept; request booleans are StrictBool, so `"stream": "yes"` is refused."""

    model_config = ConfigDict(extra="allow")


# ---- requests -------------------------------------------------------------------------------

# OpenAI's `stream` is "boolean or null, default false": a client that sends null asks for no
# stream (a string or a number is still refused).
Stream = Annotated[StrictBool, BeforeValidator(lambda given: False if given is None else given)]


class FunctionCall(_Open):
    name: str
    arguments: str = "{}"


class ToolCall(_Open):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """Content as plain text: text parts joined, other parts (images) dropped."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")


class FunctionDef(_Open):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Open):
    type: Literal["function"] = "function"
    function: FunctionDef


ToolChoiceMode = Literal["none", "auto", "required"]


def forced_tool(choice: str | dict[str, Any] | None) -> str | None:
    """The tool a `{"type": "function", "function": {"name": ...}}` choice forces; None for the
    string choices. Any other object is refused (a validator's error, so a 400)."""
    if not isinstance(choice, dict):
        return None
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise PydanticCustomError(
            "tool_choice",
            "tool_choice must be 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}}',
        )
    return name


def check_tool_choice(name: str | None, tools: list[str], *, required: bool = False) -> None:
    """A forced tool must be one of the request's tools (a validator's error, so a 400)."""
    if name is not None and name not in tools:
        offered = ", ".join(tools) or "none"
        raise PydanticCustomError(
            "tool_choice",
            "tool_choice names the tool '{name}', which is not among the tools ({offered})",
            {"name": name, "offered": offered},
        )
    if required and not tools:
        raise PydanticCustomError(
            "tool_choice", "tool_choice requires a tool call, but no tools are given"
        )


def refuse_logprobs(asked: Any) -> Any:
    """Logprobs a surface does not return are refused (a validator's error, so a 400) rather
    than answered with none: a client that reads them must not take a missing field for a
    model's certainty."""
    if asked:
        raise PydanticCustomError("unsupported", "logprobs are not returned on this API")
    return asked


class StreamOptions(_Open):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = Field(
        default=False, description="vLLM's extension: usage so far on every chunk"
    )


# The most choices (`n`) one request may ask for: each is a sequence of its own in the engine.
MAX_CHOICES = 16


class SamplingFields(_Open):
    """Fields chat and completions share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="vLLM's extension: keep tokens >= min_p x the best one's probability; 0 = off",
    )
    repetition_penalty: float | None = Field(
        default=None, gt=0, le=2, description="vLLM's extension: >1 discourages repeats"
    )
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        default=None, description="token id -> a bias added to its logit"
    )
    # What a torch generator takes (a negative seed is the same as its value modulo 2**64).
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    # vLLM's extensions, honoured by the engine (docs/architecture.md, "Request flow (neuron)").
    min_tokens: int | None = Field(
        default=None, ge=0, description="no end of sequence or stop token before this many tokens"
    )
    ignore_eos: StrictBool | None = Field(
        default=None, description="the end-of-sequence token does not end the output"
    )
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, description="token ids that end the output, as end of sequence does"
    )
    include_stop_str_in_output: StrictBool | None = Field(
        default=None, description="the stop string that ended the output is kept in its text"
    )
    n: int | None = Field(
        default=None,
        description=f"choices for the prompt, 1 to {MAX_CHOICES}, sampled apart (docs/"
        "architecture.md, 'Request flow (neuron)')",
    )
    stream: Stream = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _choices(cls, n: int | None) -> int | None:
        if n is not None and not 1 <= n <= MAX_CHOICES:
            raise PydanticCustomError(
                "n", "n is {n}; cortex returns 1 to {most} choices", {"n": n, "most": MAX_CHOICES}
            )
        return n

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: ToolChoiceMode | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: dict[str, Any] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # vLLM's extensions: the reply continues the last (assistant) message instead of opening a
    # turn of its own (a prefill: Anthropic's API does this for a last assistant message); or the
    # prompt ends with no generation prompt at all.
    continue_final_message: StrictBool | None = None
    add_generation_prompt: StrictBool | None = None
    # OpenAI's deprecated forerunners of tools and tool_choice: refused, since an answer in
    # tool_calls would go unread by a client that asked this way, and ignoring them is silent.
    functions: Any = None
    function_call: Any = None
    # Spoken output and OpenAI's web search: refused, since the answer would lack them in
    # silence. `prediction` is accepted: it speeds an answer up, and without it the answer is
    # the same (docs/architecture.md, "Bad input").
    modalities: list[str] | None = None
    audio: Any = None
    web_search_options: Any = None

    @field_validator("modalities")
    @classmethod
    def _text_out(cls, modalities: list[str] | None) -> list[str] | None:
        other = [m for m in modalities or [] if m != "text"]
        if other:
            raise PydanticCustomError(
                "unsupported",
                "modalities {other} are not supported: cortex answers in text only",
                {"other": ", ".join(other)},
            )
        return modalities

    @field_validator("audio", "web_search_options")
    @classmethod
    def _not_served(cls, given: Any, info: ValidationInfo) -> Any:
        if given is not None:
            why = {
                "audio": "audio output is not supported: cortex answers in text only",
                "web_search_options": "web search is not supported: cortex runs no tools; offer "
                "a function tool instead",
            }
            raise PydanticCustomError("unsupported", why[info.field_name or ""])
        return given

    @field_validator("functions", "function_call")
    @classmethod
    def _not_the_legacy_functions(cls, given: Any, info: ValidationInfo) -> Any:
        if given is not None:
            raise PydanticCustomError(
                "deprecated_functions",
                "the deprecated form of tools and tool_choice is not supported: send those",
            )
        return given

    @field_validator("continue_final_message")
    @classmethod
    def _an_assistant_message_to_continue(
        cls, go_on: bool | None, info: ValidationInfo
    ) -> bool | None:
        messages = info.data.get("messages") or []
        last = messages[-1] if messages else None
        if go_on and (
            last is None or last.role != "assistant" or last.tool_calls or not last.text()
        ):
            raise PydanticCustomError(
                "continue_final_message",
                "continue_final_message needs the last message to be an assistant's text",
            )
        format_type = (info.data.get("response_format") or {}).get("type", "text")
        forced = info.data.get("tool_choice") not in (None, "none", "auto")
        if go_on and (format_type != "text" or forced):
            # The grammar would start at the reply, not at the prefill it must go on from.
            raise PydanticCustomError(
                "continue_final_message",
                "a prefilled (last) assistant message cannot be combined with structured output "
                "or a forced tool call",
            )
        return go_on

    @field_validator("add_generation_prompt")
    @classmethod
    def _not_both(cls, prompt: bool | None, info: ValidationInfo) -> bool | None:
        if prompt and info.data.get("continue_final_message"):
            raise PydanticCustomError(
                "add_generation_prompt",
                "add_generation_prompt and continue_final_message cannot both be true",
            )
        return prompt

    def generation_prompt(self) -> bool:
        """Whether the prompt ends by opening the assistant's turn (not when continuing one)."""
        return not self.continue_final_message and self.add_generation_prompt is not False

    def offered_tools(self) -> list[dict[str, Any]] | None:
        """The tools the prompt shows the model: none with tool_choice none, only the named one
        when one is forced. A count of the prompt (/tokenize) shows the same."""
        if not self.tools or self.tool_choice == "none":
            return None
        tools = [tool.model_dump(mode="json", exclude_none=True) for tool in self.tools]
        name = forced_tool(self.tool_choice)
        if name is not None:
            tools = [t for t in tools if t["function"]["name"] == name]
        return tools

    @field_validator("logprobs")
    @classmethod
    def _logprobs_without_tools(cls, asked: bool | None, info: ValidationInfo) -> bool | None:
        if asked and info.data.get("tools"):
            raise PydanticCustomError(
                "logprobs", "logprobs are not returned for requests with tools"
            )
        return asked

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise PydanticCustomError("top_logprobs", "top_logprobs needs logprobs: true")
        return top

    def logprobs_asked(self) -> int | None:
        """Alternatives per token to report (0-20), None for no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(
        cls, choice: str | dict[str, Any] | None, info: ValidationInfo
    ) -> str | dict[str, Any] | None:
        names = [tool.function.name for tool in info.data.get("tools") or []]
        check_tool_choice(forced_tool(choice), names, required=choice == "required")
        return choice

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] = Field(description="one prompt (a string or token ids)")
    echo: StrictBool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=1, description="only best_of=1 is served")
    response_format: dict[str, Any] | None = None  # vLLM's extension: structured output
    logprobs: int | None = Field(
        default=None, ge=0, le=5, description="alternatives per token; 0: the chosen one's only"
    )

    @field_validator("logprobs")
    @classmethod
    def _no_prompt_logprobs(cls, asked: int | None, info: ValidationInfo) -> int | None:
        if asked is not None and info.data.get("echo"):
            raise PydanticCustomError(
                "logprobs", "logprobs with echo (the prompt's) are not returned by cortex"
            )
        return asked


class EmbeddingRequest(_Open):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


# ---- responses ------------------------------------------------------------------------------


class PromptTokensDetails(_Open):
    cached_tokens: int = 0


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ResponseMessage(_Open):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class TopLogprob(_Open):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ContentLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Open):
    content: list[ContentLogprob] | None = None


class CompletionLogprobs(_Open):
    """The legacy completions' shape: parallel lists, one entry per output token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int] = Field(default_factory=list)


# A choice's extra field, true when its `length` finish came from the context window being
# full rather than max_tokens (Anthropic's `model_context_window_exceeded`).
CONTEXT_FULL = "context_window_exceeded"


class ChatChoice(_Open):
    index: int = 0
    message: ResponseMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class ChatCompletion(_Open):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class DeltaFunctionCall(_Open):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Open):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class Delta(_Open):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(_Open):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Open):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(_Open):
    index: int = 0
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class Completion(_Open):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Embedding(_Open):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(_Open):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(_Open):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(_Open):
    """An entry of GET /v1/models; cortex adds its fleet fields beside OpenAI's."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "cortex"


class ModelList(_Open):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(BaseModel):
    """A neuron's POST /tokenize (cortex's own): count a chat, through the model's template, or a
    plain prompt. The gateway's count_tokens asks it."""

    model: str
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None
    # The last (assistant) message is a prefill, rendered open as the chat request renders it.
    continue_final_message: StrictBool | None = None
    prompt: str | None = None


class TokenizeResponse(BaseModel):
    """The answer to /tokenize: the count, and the model's context length."""

    model: str
    count: int
    max_model_len: int | None = None
