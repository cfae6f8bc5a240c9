"""OpenAI Responses <-> OpenAI chat: pure translation of requests, responses and stream events.

Decisions a client can observe:
- `truncation: "auto"` drops nothing: an input that fits is answered as auto would answer it
  (`truncation` echoed), one that does not is a 400 naming `truncation`.
- cortex stores no responses: what refers to stored state (`previous_response_id`,
  `conversation`, `prompt`, `background`, `item_reference` items) is refused (send the whole
  conversation); `store` is accepted and answered as false.
- Hosted tools (web search, ...) are dropped; client-run tools that are not functions (custom,
  local_shell, ...) and a `tool_choice` that forces anything but a function are a 400;
  `allowed_tools` offers its subset with its mode.
- `instructions` and `developer` messages become system messages (chat templates know no
  developer role); reasoning items, hosted tools and other item kinds are dropped. Images become
  `image_url` parts, which a neuron refuses (400) for a text-only model; content parts cortex
  cannot send (files, audio) are a 400, never dropped in silence.
- Function calls stream as one arguments delta once complete (see toolcalls); a length finish
  answers `incomplete` with `max_output_tokens`, as OpenAI does.
"""

from __future__ import annotations

import copy
import re
import time
from typing import Any, Literal

from cortex.core.errors import ContextLengthExceeded, CortexError, InvalidRequest
from cortex.core.protocol.openai import (
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
from cortex.gateway.translate.toolcalls import PendingToolCall, normalize_arguments
from cortex.gateway.wire.responses import (
    ContentPart,
    ContentPartEvent,
    ErrorEvent,
    FunctionCallArgumentsDeltaEvent,
    FunctionCallArgumentsDoneEvent,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    IncompleteDetails,
    InputItem,
    InputTokensDetails,
    ItemStatus,
    LifecycleEvent,
    MessageItem,
    OtherItem,
    OutputFunctionCall,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    OutputTextDeltaEvent,
    OutputTextDoneEvent,
    ResponseError,
    ResponseObject,
    ResponsesEvent,
    ResponsesRequest,
    ResponseStatus,
    ResponseUsage,
)

_TEXT_PARTS = ("input_text", "output_text", "text")
# Tools the client runs that are not functions: a model behind cortex has no way to call them.
_CLIENT_TOOLS = ("custom", "local_shell", "shell", "apply_patch", "computer_use_preview")

# ---- request --------------------------------------------------------------------------------


def to_chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """A Responses request as the OpenAI chat request a neuron serves."""
    _refuse_stored_state(req)
    messages = [ChatMessage(role="system", content=req.instructions)] if req.instructions else []
    if isinstance(req.input, str):
        messages.append(ChatMessage(role="user", content=req.input))
    else:
        for item in req.input:
            _add_item(messages, item)
    if not messages:
        raise InvalidRequest("input contains nothing cortex can send to a model", param="input")
    tools, tool_choice = _tools(req)
    return ChatCompletionRequest(
        model=req.model,
        messages=messages,
        tools=tools or None,
        tool_choice=tool_choice,
        parallel_tool_calls=req.parallel_tool_calls if tools else None,
        max_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stream=req.stream,
        # usage on every chunk: a stream cut short is still charged its prompt
        stream_options=(
            StreamOptions(include_usage=True, continuous_usage_stats=True) if req.stream else None
        ),
        user=req.user,
        response_format=_response_format(req.text),
    )


def _refuse_stored_state(req: ResponsesRequest) -> None:
    """What would need responses, conversations or prompts stored on the server: a 400 naming
    it, never an answer that silently lacks the history or instructions it refers to."""
    stored = {
        "previous_response_id": req.previous_response_id,
        "conversation": req.conversation,
        "prompt": req.prompt,
        "background": req.background,
    }
    for field, value in stored.items():
        if value:
            raise InvalidRequest(
                f"{field} is not supported: cortex keeps no responses, conversations or "
                "prompts; send the whole conversation as input",
                param=field,
            )


def _add_item(messages: list[ChatMessage], item: InputItem) -> None:
    if isinstance(item, OtherItem) and item.type == "item_reference":
        raise InvalidRequest(
            "item_reference input items are not supported: cortex keeps no responses; send "
            "the item itself",
            param="input",
        )
    if isinstance(item, MessageItem):
        messages.extend(_message(item))
    elif isinstance(item, FunctionCallItem):
        call = ToolCall(
            id=item.call_id,
            function=FunctionCall(name=item.name, arguments=normalize_arguments(item.arguments)),
        )
        last = messages[-1] if messages else None
        # Calls of one turn follow the assistant's text (if any): one assistant message.
        if last is not None and last.role == "assistant":
            last.tool_calls = [*(last.tool_calls or []), call]
        else:
            messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
    elif isinstance(item, FunctionCallOutputItem):
        output = item.output if isinstance(item.output, str) else _text(item.output, "\n")
        messages.append(ChatMessage(role="tool", tool_call_id=item.call_id, content=output))


def _message(item: MessageItem) -> list[ChatMessage]:
    role = "system" if item.role == "developer" else item.role
    if isinstance(item.content, str):
        return [ChatMessage(role=role, content=item.content)]
    if role != "user" or not any(p.type == "input_image" for p in item.content):
        # Plain strings suit every chat template; several text parts read as paragraphs.
        return [
            ChatMessage(role=role, content=_text(item.content, "\n\n" if role == "user" else ""))
        ]
    parts: list[dict[str, Any]] = []
    for part in item.content:
        if part.type in _TEXT_PARTS and part.text is not None:
            parts.append({"type": "text", "text": part.text})
        elif part.type == "input_image":
            if not part.image_url:
                raise InvalidRequest(
                    "input_image needs an image_url (file ids are not supported)", param="input"
                )
            image: dict[str, Any] = {"url": part.image_url}
            if part.detail:
                image["detail"] = part.detail
            parts.append({"type": "image_url", "image_url": image})
        elif part.type == "refusal" and part.refusal:
            parts.append({"type": "text", "text": part.refusal})
        else:
            _text([part], "")  # refuses what cannot be sent (files, audio), as without images
    return [ChatMessage(role="user", content=parts)]


def _text(parts: list[ContentPart], separator: str) -> str:
    """Text and refusal parts joined; any other part (images, files, audio) is a 400."""
    texts = []
    for part in parts:
        if part.type in _TEXT_PARTS:
            texts.append(part.text)
        elif part.type == "refusal":
            texts.append(part.refusal)
        elif part.type == "input_image":
            raise InvalidRequest(
                "images are only accepted in user messages, and only for models that read them",
                param="input",
            )
        else:
            raise InvalidRequest(
                f"content parts of type {part.type!r} are not supported: send text", param="input"
            )
    return separator.join(t for t in texts if t)


def _tools(req: ResponsesRequest) -> tuple[list[Tool], ToolChoiceMode | dict[str, Any] | None]:
    """The function tools as chat tools, and the tool choice for them. Hosted tools (web search,
    file search, ...) are dropped, since a model behind cortex cannot run them; tools the client
    runs that are not functions (custom, local_shell, ...) and a choice cortex cannot honour are
    a 400."""
    functions = []
    for tool in req.tools or []:
        if isinstance(tool, FunctionTool):
            functions.append(tool)
        elif tool.type in _CLIENT_TOOLS:
            raise InvalidRequest(
                f"tools of type {tool.type!r} are not supported: offer it as a function tool",
                param="tools",
            )
    choice = req.tool_choice
    mode: ToolChoiceMode | dict[str, Any] | None = None
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = {t.get("name") for t in choice.get("tools") or [] if isinstance(t, dict)}
        functions = [t for t in functions if t.name in allowed]
        choice = choice.get("mode") or "auto"
    if isinstance(choice, str):
        modes: dict[str, ToolChoiceMode] = {"auto": "auto", "none": "none", "required": "required"}
        if choice not in modes:
            raise InvalidRequest(
                f"tool_choice {choice!r} is not one of auto, none, required",
                param="tool_choice",
            )
        if choice == "required" and not functions:
            raise InvalidRequest(
                "tool_choice 'required' needs at least one function tool", param="tool_choice"
            )
        mode = modes[choice] if functions else None
    elif isinstance(choice, dict):
        if choice.get("type") != "function" or not choice.get("name"):
            raise InvalidRequest(
                f"tool_choice of type {choice.get('type')!r} is not supported: cortex can "
                "force a function tool only",
                param="tool_choice",
            )
        mode = {"type": "function", "function": {"name": choice["name"]}}
    tools = [
        Tool(function=FunctionDef(name=t.name, description=t.description, parameters=t.parameters))
        for t in functions
    ]
    return tools, mode


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format") or {}
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        keys = ("name", "schema", "strict", "description")
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in keys if k in fmt}}
    return None


# ---- errors ---------------------------------------------------------------------------------

# Fields of the chat request a neuron names in its errors, by their Responses names.
_CHAT_FIELDS = (
    ("response_format.json_schema", "text.format"),
    ("response_format", "text.format"),
    ("max_completion_tokens", "max_output_tokens"),
    ("max_tokens", "max_output_tokens"),
)


def client_error(
    err: CortexError, req: ResponsesRequest, chat: ChatCompletionRequest
) -> CortexError:
    """The neuron's error about `chat` in the field names of `req`, the request it came from:
    its `param`, and the message where it quotes it."""
    if err.param is None:
        return err
    if (
        req.truncation == "auto"
        and err.code == ContextLengthExceeded.code
        and err.param == "messages"
    ):
        # What auto would have dropped items for: say that cortex does not, never just "too long".
        said = copy.copy(err)
        said.param = "truncation"
        said.message = (
            "truncation 'auto' is not supported: cortex drops no input items, and this input "
            f"does not fit the model's context. {err.message}"
        )
        return said
    param = client_param(err.param, req, chat)
    if param == err.param:
        return err
    said = copy.copy(err)
    said.param = param
    quoted = re.compile(rf"(?<![\w.]){re.escape(err.param)}(?!\w|\.\w)")
    said.message = quoted.sub(param, err.message)
    return said


def client_param(param: str, req: ResponsesRequest, chat: ChatCompletionRequest) -> str:
    """A chat request's field path as the Responses request's: a message is the input item it
    came from when items and messages match one to one, else `input` (or `instructions`)."""
    for chat_name, name in _CHAT_FIELDS:
        if param == chat_name or param.startswith(chat_name + "."):
            return name + param.removeprefix(chat_name)
    head, _, rest = param.partition(".")
    if head != "messages":
        return param
    index, _, inner = rest.partition(".")
    offset = 1 if req.instructions else 0
    if not index.isdigit():
        return "input"
    if int(index) < offset:
        return "instructions"
    items = req.input
    # No item makes two messages: as many messages as items means each made its own.
    if isinstance(items, str) or len(chat.messages) != len(items) + offset:
        return "input"
    item, message = items[int(index) - offset], chat.messages[int(index)]
    where = f"input.{int(index) - offset}"
    parts = item.content if isinstance(item, MessageItem) else None
    # A content part keeps its index when the message kept every part.
    kept = isinstance(parts, list) and isinstance(message.content, list)
    if inner.startswith("content.") and kept and len(message.content or []) == len(parts or []):
        return f"{where}.{inner}"
    return where


# ---- response -------------------------------------------------------------------------------


def from_chat_response(
    resp: ChatCompletion,
    req: ResponsesRequest,
    response_id: str | None = None,
    created_at: int | None = None,
) -> ResponseObject:
    """A non-streamed chat completion as a Responses `response` object."""
    response_id = response_id or responses_id(resp.id)
    output: list[OutputItem] = []
    finish_reason = None
    if resp.choices:
        choice = resp.choices[0]
        finish_reason = choice.finish_reason
        if choice.message.content:
            output.append(_output_message(response_id, 0, choice.message.content, "completed"))
        for call in choice.message.tool_calls or []:
            pending = PendingToolCall(
                index=len(output),
                id=call.id,
                name=call.function.name,
                arguments=call.function.arguments,
            )
            output.append(_output_call(response_id, len(output), pending, "completed"))
    status, incomplete = _status(finish_reason)
    if status == "incomplete" and output:
        output[-1].status = "incomplete"  # the item the finish cut, as OpenAI marks it
    return response_object(
        req,
        response_id,
        resp.created if created_at is None else created_at,
        status,
        output=output,
        usage=_usage(resp.usage),
        incomplete_details=incomplete,
    )


def responses_id(upstream_id: str) -> str:
    """`resp_...` from an upstream `chatcmpl-...` id (same suffix, so logs correlate)."""
    return "resp_" + upstream_id.removeprefix("chatcmpl-")


def response_object(
    req: ResponsesRequest,
    response_id: str,
    created_at: int,
    status: ResponseStatus,
    **fields: Any,
) -> ResponseObject:
    """The response object with the request's settings echoed, as OpenAI answers."""
    return ResponseObject(
        id=response_id,
        created_at=created_at,
        status=status,
        model=req.model,
        instructions=req.instructions,
        max_output_tokens=req.max_output_tokens,
        metadata=req.metadata or {},
        parallel_tool_calls=req.parallel_tool_calls is not False,
        temperature=req.temperature,
        top_p=req.top_p,
        tool_choice=req.tool_choice or "auto",
        tools=[t.model_dump(exclude_none=True) for t in req.tools or []],
        text=req.text or {"format": {"type": "text"}},
        truncation=req.truncation or "disabled",
        user=req.user,
        **fields,
    )


def _status(finish_reason: str | None) -> tuple[ResponseStatus, IncompleteDetails | None]:
    if finish_reason == "length":
        return "incomplete", IncompleteDetails(reason="max_output_tokens")
    if finish_reason == "content_filter":
        return "incomplete", IncompleteDetails(reason="content_filter")
    return "completed", None


def _usage(usage: ChatUsage | None) -> ResponseUsage:
    if usage is None:
        return ResponseUsage(input_tokens=0, output_tokens=0, total_tokens=0)
    details = usage.prompt_tokens_details
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(
            cached_tokens=details.cached_tokens if details else 0
        ),
        output_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
    )


def _item_suffix(response_id: str, output_index: int) -> str:
    return f"{response_id.removeprefix('resp_')}_{output_index}"


def _output_message(
    response_id: str, output_index: int, text: str, status: ItemStatus
) -> OutputMessage:
    content = [OutputText(text=text)] if status != "in_progress" else []
    return OutputMessage(
        id=f"msg_{_item_suffix(response_id, output_index)}", status=status, content=content
    )


def _output_call(
    response_id: str, output_index: int, call: PendingToolCall, status: ItemStatus
) -> OutputFunctionCall:
    suffix = _item_suffix(response_id, output_index)
    return OutputFunctionCall(
        id=f"fc_{suffix}",
        call_id=call.id or f"call_{suffix}",
        name=call.name,
        arguments=normalize_arguments(call.arguments) if status != "in_progress" else "",
        status=status,
    )


# ---- stream ---------------------------------------------------------------------------------


class ResponsesStreamTranslator(ChatStreamTranslator[ResponsesEvent]):
    """OpenAI chat chunks in, Responses stream events (numbered by sequence_number) out."""

    def __init__(
        self,
        req: ResponsesRequest,
        response_id: str,
        created_at: int | None = None,
        prompt_tokens: int | None = None,
    ) -> None:
        super().__init__(prompt_tokens)
        self._req = req
        self._id = response_id
        self._created_at = int(time.time()) if created_at is None else created_at
        self._sequence = 0
        self._output: list[OutputItem] = []  # completed items, by output_index
        self._text: OutputMessage | None = None  # the message item being streamed
        self._text_so_far = ""

    def _opening(self) -> list[ResponsesEvent]:
        """response.created then response.in_progress."""
        shell = response_object(self._req, self._id, self._created_at, "in_progress")
        return [
            LifecycleEvent(type="response.created", response=shell, sequence_number=self._next()),
            LifecycleEvent(
                type="response.in_progress", response=shell, sequence_number=self._next()
            ),
        ]

    def _closing(self) -> list[ResponsesEvent]:
        """response.completed (or .incomplete after a length finish)."""
        status, incomplete = _status(self._finish_reason)
        response = response_object(
            self._req,
            self._id,
            self._created_at,
            status,
            output=list(self._output),
            usage=_usage(self.usage()),
            incomplete_details=incomplete,
        )
        kind: Literal["response.completed", "response.incomplete"] = (
            "response.completed" if status == "completed" else "response.incomplete"
        )
        return [LifecycleEvent(type=kind, response=response, sequence_number=self._next())]

    def error(
        self, message: str, code: str = "server_error", status: int = 500
    ) -> list[ResponsesEvent]:
        """An `error` event (with cortex's code) then `response.failed`, whose error code is one
        of the few OpenAI's typed clients know (a 429 is rate_limit_exceeded, a 400
        invalid_prompt, the rest server_error)."""
        self._done = True
        known = {429: "rate_limit_exceeded", 400: "invalid_prompt"}.get(status, "server_error")
        failed = response_object(
            self._req,
            self._id,
            self._created_at,
            "failed",
            output=list(self._output),
            error=ResponseError(code=known, message=message),
        )
        return [
            ErrorEvent(code=code, message=message, sequence_number=self._next()),
            LifecycleEvent(type="response.failed", response=failed, sequence_number=self._next()),
        ]

    def _text_delta(self, text: str) -> list[ResponsesEvent]:
        events: list[ResponsesEvent] = []
        index = len(self._output)  # the open message item is the next output
        if self._text is None:
            self._text = _output_message(self._id, index, "", "in_progress")
            self._text_so_far = ""
            events.append(self._item_event("response.output_item.added", index, self._text))
            part = OutputText(text="")
            events.append(
                self._part_event("response.content_part.added", part, index, self._text.id)
            )
        self._text_so_far += text
        events.append(
            OutputTextDeltaEvent(
                item_id=self._text.id,
                output_index=index,
                content_index=0,
                delta=text,
                sequence_number=self._next(),
            )
        )
        return events

    def _close_open(self) -> list[ResponsesEvent]:
        calls = self._tools.drain()
        # A finish that cut the answer (length) leaves its last item incomplete, as OpenAI does.
        cut = _status(self._finish_reason)[0] == "incomplete"
        last: ItemStatus = "incomplete" if cut else "completed"
        events: list[ResponsesEvent] = []
        if self._text is not None:
            events.extend(self._close_text(self._text, "completed" if calls else last))
        for n, call in enumerate(calls, 1):
            events.extend(self._call_events(call, last if n == len(calls) else "completed"))
        return events

    def _close_text(self, item: OutputMessage, status: ItemStatus) -> list[ResponsesEvent]:
        index, text = len(self._output), self._text_so_far
        done = _output_message(self._id, index, text, status)
        self._text = None
        self._output.append(done)
        return [
            OutputTextDoneEvent(
                item_id=item.id,
                output_index=index,
                content_index=0,
                text=text,
                sequence_number=self._next(),
            ),
            self._part_event("response.content_part.done", OutputText(text=text), index, item.id),
            self._item_event("response.output_item.done", index, done),
        ]

    def _call_events(self, call: PendingToolCall, status: ItemStatus) -> list[ResponsesEvent]:
        index = len(self._output)
        added = _output_call(self._id, index, call, "in_progress")
        done = _output_call(self._id, index, call, status)
        self._output.append(done)
        return [
            self._item_event("response.output_item.added", index, added),
            FunctionCallArgumentsDeltaEvent(
                item_id=done.id,
                output_index=index,
                delta=done.arguments,
                sequence_number=self._next(),
            ),
            FunctionCallArgumentsDoneEvent(
                item_id=done.id,
                output_index=index,
                name=done.name,
                arguments=done.arguments,
                sequence_number=self._next(),
            ),
            self._item_event("response.output_item.done", index, done),
        ]

    def _item_event(self, kind: Any, index: int, item: OutputItem) -> OutputItemEvent:
        return OutputItemEvent(
            type=kind, output_index=index, item=item, sequence_number=self._next()
        )

    def _part_event(
        self, kind: Any, part: OutputText, index: int, item_id: str
    ) -> ContentPartEvent:
        return ContentPartEvent(
            type=kind,
            item_id=item_id,
            output_index=index,
            content_index=0,
            part=part,
            sequence_number=self._next(),
        )

    def _next(self) -> int:
        number = self._sequence
        self._sequence += 1
        return number


def encode_sse(event: ResponsesEvent) -> bytes:
    """One SSE frame: `event: <type>` then the JSON body."""
    return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n".encode()
