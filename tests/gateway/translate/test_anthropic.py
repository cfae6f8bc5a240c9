"""Anthropic <-> OpenAI chat translation, checked against the official `anthropic` SDK's own parsing."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter, ValidationError

from cortex.core.errors import InvalidRequest
from cortex.core.protocol.openai import ChatCompletion, ChatCompletionChunk
from cortex.gateway.dialects.anthropic import MessagesStream
from cortex.gateway.dialects.responses import ResponsesStream
from cortex.gateway.translate.anthropic import (
    StreamTranslator,
    encode_sse,
    from_chat_response,
    ping,
    to_chat_request,
)
from cortex.gateway.translate.responses import to_chat_request as responses_chat_request
from cortex.gateway.wire.anthropic import CountTokensRequest, MessagesRequest
from cortex.gateway.wire.responses import ResponsesRequest

from .chunks import (
    Handler,
    call_delta,
    chat_completion,
    chunk,
    mock_http,
    replay,
    run_stream,
    usage,
)

SCHEMA = "http://json-schema.org/draft-07/schema#"


def _tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict:
    return {
        "name": name,
        "description": description,
        "input_schema": {
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": False,
            "$schema": SCHEMA,
        },
    }


def claude_code_request() -> dict[str, Any]:
    """A request shaped like Claude Code's: cached system blocks, many tools, thinking, history."""
    string = {"type": "string"}
    tools = [
        _tool("Task", "Launch a new agent", {"description": string, "prompt": string}, ["prompt"]),
        _tool(
            "Bash",
            "Run a shell command",
            {"command": string, "timeout": {"type": "number"}},
            ["command"],
        ),
        _tool("Glob", "Find files by pattern", {"pattern": string, "path": string}, ["pattern"]),
        _tool("Grep", "Search file contents", {"pattern": string, "path": string}, ["pattern"]),
        _tool(
            "Read",
            "Read a file",
            {"file_path": string, "offset": {"type": "number"}},
            ["file_path"],
        ),
        _tool(
            "Edit",
            "Replace text in a file",
            {"file_path": string, "old_string": string, "new_string": string},
            ["file_path", "old_string", "new_string"],
        ),
        _tool(
            "Write",
            "Write a file",
            {"file_path": string, "content": string},
            ["file_path", "content"],
        ),
        _tool(
            "TodoWrite",
            "Update the todo list",
            {"todos": {"type": "array", "items": {"type": "object"}}},
            ["todos"],
        ),
        _tool("WebFetch", "Fetch a URL", {"url": {"type": "string", "format": "uri"}}, ["url"]),
    ]
    tools[-1]["cache_control"] = {"type": "ephemeral"}
    tools.append({"type": "web_search_20250305", "name": "web_search", "max_uses": 5})
    return {
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 32000,
        "temperature": 1,
        "stream": True,
        "metadata": {"user_id": "user_3f2a_account__session_9c1e"},
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "system": [
            {
                "type": "text",
                "text": "You are Claude Code, Anthropic's official CLI for Claude.",
                "cache_control": {"type": "ephemeral"},
            },
            {
                "type": "text",
                "text": "You are an interactive CLI tool that helps users with software tasks.",
                "cache_control": {"type": "ephemeral"},
            },
        ],
        "tools": tools,
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "text",
                        "text": "<system-reminder>Today is 2026-01-01.</system-reminder>",
                    },
                    {"type": "text", "text": "Why does test_parse fail?"},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Read the test first.", "signature": "sig=="},
                    {"type": "text", "text": "Let me read the test."},
                    {
                        "type": "tool_use",
                        "id": "toolu_01A",
                        "name": "Read",
                        "input": {"file_path": "/repo/test_parse.py"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_01A",
                        "content": [{"type": "text", "text": "1\tdef test_parse(): ..."}],
                        "cache_control": {"type": "ephemeral"},
                    }
                ],
            },
        ],
    }


# ---- helpers ----------------------------------------------------------------------------------


def completion(
    content: str | None,
    tool_calls: list[tuple[str, str, str]] = (),
    finish: str = "stop",
    cached: int = 0,
    **extra: Any,
) -> ChatCompletion:
    return chat_completion(content, tool_calls, finish, usage(11, 5, cached), **extra)


def simple_request(**fields: Any) -> MessagesRequest:
    body = {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    return MessagesRequest.model_validate(body | fields)


def sdk_client(handler: Handler) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key="k", base_url="http://cortex.test", http_client=mock_http(handler)
    )


def sse_client(events: list[Any]) -> anthropic.Anthropic:
    return sdk_client(replay(encode_sse(e) for e in events))


def stream_final(events: list[Any]) -> Any:
    """Feed encoded events to the SDK's MessageStream and return its accumulated message."""
    client = sse_client(events)
    with client.messages.stream(
        model="m", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as s:
        return s.get_final_message()


def translate_stream(
    req: MessagesRequest, chunks: list[ChatCompletionChunk], **kw: Any
) -> list[Any]:
    return run_stream(StreamTranslator(req, "msg_test", **kw), chunks)


def shape(events: list[Any]) -> list[str]:
    """Event types, with the block kind or delta kind where there is one."""
    out = []
    for e in events:
        if e.type == "content_block_start":
            out.append(f"start:{e.index}:{e.content_block.type}")
        elif e.type == "content_block_delta":
            out.append(f"delta:{e.index}:{e.delta.type}")
        elif e.type == "content_block_stop":
            out.append(f"stop:{e.index}")
        else:
            out.append(e.type)
    return out


# ---- requests ---------------------------------------------------------------------------------


def test_claude_code_request_becomes_a_chat_request() -> None:
    req = MessagesRequest.model_validate(claude_code_request())
    chat = to_chat_request(req)

    assert [m.role for m in chat.messages] == ["system", "user", "assistant", "tool"]
    system, user, assistant, tool = chat.messages
    assert system.content == (
        "You are Claude Code, Anthropic's official CLI for Claude.\n\n"
        "You are an interactive CLI tool that helps users with software tasks."
    )
    assert user.content == (
        "<system-reminder>Today is 2026-01-01.</system-reminder>\n\nWhy does test_parse fail?"
    )
    # The thinking block is dropped; text and the tool call stay together in one assistant turn.
    assert assistant.content == "Let me read the test."
    assert assistant.tool_calls is not None
    assert [(c.id, c.function.name) for c in assistant.tool_calls] == [("toolu_01A", "Read")]
    assert json.loads(assistant.tool_calls[0].function.arguments) == {
        "file_path": "/repo/test_parse.py"
    }
    assert (tool.tool_call_id, tool.content) == ("toolu_01A", "1\tdef test_parse(): ...")
    # Nine client tools; the server-side web_search tool has no schema and cannot run here.
    assert chat.tools is not None
    assert [t.function.name for t in chat.tools][:3] == ["Task", "Bash", "Glob"]
    assert len(chat.tools) == 9
    assert chat.tools[4].function.parameters == req.tools[4].input_schema  # type: ignore[index]
    assert chat.tool_choice is None
    assert (chat.max_tokens, chat.temperature, chat.stream) == (32000, 1, True)
    assert chat.stream_options is not None and chat.stream_options.include_usage
    assert chat.user == "user_3f2a_account__session_9c1e"
    assert chat.stop is None


def test_mid_conversation_system_messages_keep_their_place() -> None:
    """Claude Code 2.1 sends `system` messages between turns (its mid-conversation-system beta)."""
    req = simple_request(
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "system", "content": [{"type": "text", "text": "Agents: Explore, Plan."}]},
            {"role": "system", "content": "Be brief."},
        ]
    )
    roles = [(m.role, m.content) for m in to_chat_request(req).messages]
    assert roles == [("user", "hi"), ("system", "Agents: Explore, Plan."), ("system", "Be brief.")]


def test_output_config_format_becomes_a_json_schema_response_format() -> None:
    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}
    format_ = {"type": "json_schema", "schema": schema}
    chat = to_chat_request(simple_request(output_config={"effort": "high", "format": format_}))
    assert chat.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema},
    }
    assert to_chat_request(simple_request(output_config={"effort": "high"})).response_format is None
    with pytest.raises(InvalidRequest):
        to_chat_request(simple_request(output_config={"format": {"type": "json_schema"}}))


def test_the_beta_output_format_is_output_config_format() -> None:
    """The structured-outputs beta sends the format top level (Pydantic AI's NativeOutput)."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    format_ = {"type": "json_schema", "schema": schema}
    chat = to_chat_request(simple_request(output_format=format_))
    assert chat.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema},
    }
    with pytest.raises(InvalidRequest) as both:
        to_chat_request(simple_request(output_format=format_, output_config={"format": format_}))
    assert both.value.param == "output_format"
    with pytest.raises(InvalidRequest):
        to_chat_request(simple_request(output_format={"type": "json_schema"}))


def test_sampling_fields_and_stop_sequences_are_copied() -> None:
    chat = to_chat_request(
        simple_request(temperature=0.2, top_p=0.9, top_k=40, stop_sequences=["\n\nHuman:", "END"])
    )
    assert (chat.temperature, chat.top_p, chat.top_k) == (0.2, 0.9, 40)
    assert chat.stop == ["\n\nHuman:", "END"]
    assert chat.stream is False and chat.stream_options is None and chat.user is None


def test_a_last_assistant_message_is_a_prefill_the_reply_continues() -> None:
    counting = [
        {"role": "user", "content": "Count to 10."},
        {"role": "assistant", "content": [{"type": "text", "text": "1, 2, 3,"}]},
    ]
    chat = to_chat_request(simple_request(messages=counting))
    assert chat.continue_final_message is True and chat.messages[-1].content == "1, 2, 3,"
    assert "continue_final_message" in chat.model_dump(exclude_none=True)
    # A last user message, or an assistant's tool call: nothing to continue, nothing sent.
    assert "continue_final_message" not in to_chat_request(simple_request()).model_dump(
        exclude_none=True
    )
    called = [
        counting[0],
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}],
        },
    ]
    assert to_chat_request(simple_request(messages=called)).continue_final_message is None


@pytest.mark.parametrize("content", [[], [{"type": "some_future_block"}]])
def test_a_last_user_turn_left_with_nothing_is_refused_not_taken_for_a_prefill(
    content: list[dict[str, Any]],
) -> None:
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": content},
    ]
    with pytest.raises(InvalidRequest, match="non-empty content"):
        to_chat_request(simple_request(messages=turns))


USER_AGAIN = {"role": "user", "content": "and now?"}


@pytest.mark.parametrize(
    "turns",
    [
        [{"role": "user", "content": ""}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}, USER_AGAIN],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": []}, USER_AGAIN],
    ],
)
def test_a_message_with_no_content_is_refused_in_anthropics_words(
    turns: list[dict[str, Any]],
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        to_chat_request(simple_request(messages=turns))
    n = next(i for i, turn in enumerate(turns) if not turn["content"])
    assert refused.value.message == (
        f"messages.{n}: all messages must have non-empty content except for the optional "
        "final assistant message"
    )


@pytest.mark.parametrize("ending", [" ", "\n", "\t", "  "])
def test_a_prefill_ending_in_whitespace_is_refused_in_anthropics_words(ending: str) -> None:
    for content in (f"Sure{ending}", [{"type": "text", "text": f"Sure{ending}"}]):
        turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}]
        with pytest.raises(InvalidRequest) as refused:
            to_chat_request(simple_request(messages=turns))
        assert refused.value.message == (
            "messages: final assistant content cannot end with trailing whitespace"
        )


def test_an_empty_final_assistant_message_is_no_prefill_and_no_refusal() -> None:
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    assert to_chat_request(simple_request(messages=turns)).continue_final_message is None


def test_search_results_reach_the_model_as_text() -> None:
    result = {
        "type": "search_result",
        "source": "https://docs.test/paris",
        "title": "Paris",
        "content": [{"type": "text", "text": "Paris is the capital of France."}],
        "citations": {"enabled": True},
    }
    asked = {"type": "text", "text": "What is the capital of France?"}
    chat = to_chat_request(simple_request(messages=[{"role": "user", "content": [result, asked]}]))
    assert chat.messages[-1].content == (
        "Search result: Paris (https://docs.test/paris)\nParis is the capital of France."
        "\n\nWhat is the capital of France?"
    )
    called = [
        {"role": "user", "content": "Search for Paris."},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "search", "input": {}}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [result]}],
        },
    ]
    tool = to_chat_request(simple_request(messages=called)).messages[-1]
    assert (
        tool.role == "tool" and tool.content is not None and "Paris is the capital" in tool.content
    )


def test_requests_the_sdk_sends_are_accepted() -> None:
    """Whatever the official SDK puts on the wire validates and translates."""
    sent: list[dict[str, Any]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        sent.append(json.loads(request.content))
        return httpx2.Response(
            200, json=from_chat_response(completion("ok"), simple_request()).model_dump()
        )

    client = sdk_client(handler)
    reply = client.messages.create(
        model="m",
        max_tokens=100,
        system=[{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"},
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://x.test/cat.jpg"}},
                    {"type": "text", "text": "what is this?"},
                ],
            }
        ],
        tools=[{"name": "lookup", "input_schema": {"type": "object", "properties": {}}}],
        tool_choice={"type": "tool", "name": "lookup", "disable_parallel_tool_use": True},
        stop_sequences=["STOP"],
        metadata={"user_id": "u1"},
        extra_body={"top_k": 5},  # this SDK version no longer has a top_k argument
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"},
    )
    assert reply.content[0].type == "text" and reply.content[0].text == "ok"

    chat = to_chat_request(MessagesRequest.model_validate(sent[0]))
    assert chat.messages[0].content == "be brief"
    assert chat.messages[1].content == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
        {"type": "image_url", "image_url": {"url": "https://x.test/cat.jpg"}},
        {"type": "text", "text": "what is this?"},
    ]
    assert chat.tool_choice == {"type": "function", "function": {"name": "lookup"}}
    assert chat.parallel_tool_calls is False
    assert (chat.stop, chat.user, chat.top_k) == (["STOP"], "u1", 5)


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "lookup"}, {"type": "function", "function": {"name": "lookup"}}),
    ],
)
def test_tool_choice_is_mapped(choice: dict[str, Any], expected: Any) -> None:
    tools = [{"name": "lookup", "input_schema": {"type": "object"}}]
    chat = to_chat_request(simple_request(tools=tools, tool_choice=choice))
    assert chat.tool_choice == expected
    assert chat.parallel_tool_calls is None


def test_tool_choice_must_name_one_of_the_client_tools() -> None:
    tools = [
        {"name": "lookup", "input_schema": {"type": "object"}},
        {"name": "web_search", "type": "web_search_20250305"},  # a server tool: not served
    ]
    for choice in (
        {"type": "tool"},
        {"type": "tool", "name": "nope"},
        {"type": "tool", "name": "web_search"},
    ):
        with pytest.raises(ValidationError, match="not among the tools"):
            simple_request(tools=tools, tool_choice=choice)


def test_tool_results_become_tool_messages_in_order() -> None:
    req = simple_request(
        messages=[
            {"role": "user", "content": "list files and the date"},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "t1", "name": "ls", "input": {}},
                    {"type": "tool_use", "id": "t2", "name": "date", "input": {"tz": "UTC"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "a.py\nb.py"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "t2",
                        "content": "no clock",
                        "is_error": True,
                    },
                    {"type": "text", "text": "now summarise"},
                ],
            },
        ]
    )
    messages = to_chat_request(req).messages
    assert [m.role for m in messages] == ["user", "assistant", "tool", "tool", "user"]
    assert messages[1].content is None
    assert [(c.id, c.function.arguments) for c in messages[1].tool_calls or []] == [
        ("t1", "{}"),
        ("t2", '{"tz": "UTC"}'),
    ]
    assert [(m.tool_call_id, m.content) for m in messages[2:4]] == [
        ("t1", "a.py\nb.py"),
        ("t2", "Error: no clock"),
    ]
    assert messages[4].content == "now summarise"


def test_tool_use_round_trip() -> None:
    """A tool_use the gateway answered comes back in history as the same call, then its result."""
    req = simple_request(tools=[{"name": "weather", "input_schema": {"type": "object"}}])
    answer = from_chat_response(completion(None, [("call_9", "weather", '{"city":"Oslo"}')]), req)
    assert answer.stop_reason == "tool_use"
    follow_up = simple_request(
        messages=[
            {"role": "user", "content": "weather in Oslo?"},
            {"role": "assistant", "content": [b.model_dump() for b in answer.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "call_9", "content": "rain"}],
            },
        ]
    )
    messages = to_chat_request(follow_up).messages
    call = (messages[1].tool_calls or [])[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "call_9",
        "weather",
        {"city": "Oslo"},
    )
    assert (messages[2].role, messages[2].tool_call_id, messages[2].content) == (
        "tool",
        "call_9",
        "rain",
    )


def test_unknown_blocks_and_fields_are_tolerated_and_dropped() -> None:
    req = simple_request(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "some_future_block", "data": "x"},
                    {"type": "text", "text": "hi", "citations": None},
                ],
            },
            {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "zz"}]},
            {"role": "user", "content": "again"},
        ],
        service_tier="auto",
    )
    assert [(m.role, m.content) for m in to_chat_request(req).messages] == [
        ("user", "hi"),
        ("user", "again"),
    ]


@pytest.mark.parametrize(
    "block",
    [
        {"type": "document", "source": {"type": "text", "data": "x"}},
        {"type": "image", "source": {"type": "file", "file_id": "f"}},
        {
            "type": "tool_result",
            "tool_use_id": "t1",
            "content": [{"type": "image", "source": {"type": "url", "url": "https://x.test/a"}}],
        },
    ],
)
def test_user_content_that_cannot_be_sent_is_refused_not_dropped(block: dict[str, Any]) -> None:
    req = simple_request(messages=[{"role": "user", "content": [block]}])
    with pytest.raises(InvalidRequest):
        to_chat_request(req)


def test_count_tokens_request_translates_without_sampling_fields() -> None:
    body = claude_code_request()
    for key in ("max_tokens", "stream", "temperature", "metadata"):
        body.pop(key)
    chat = to_chat_request(CountTokensRequest.model_validate(body))
    assert len(chat.messages) == 4 and chat.tools is not None and len(chat.tools) == 9
    assert chat.max_tokens is None and chat.stream is False


def test_bad_requests_are_refused_by_validation() -> None:
    with pytest.raises(ValueError):
        MessagesRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        )
    with pytest.raises(ValueError):
        simple_request(messages=[])
    with pytest.raises(ValueError):
        simple_request(messages=[{"role": "tool", "content": "x"}])


# ---- non-streamed responses -------------------------------------------------------------------


def test_text_and_tool_use_response() -> None:
    req = simple_request()
    resp = completion(
        "Checking.",
        [("call_1", "Read", '{"file_path": "/a"}'), ("call_2", "Bash", "{not json")],
        finish="tool_calls",
    )
    message = from_chat_response(resp, req)
    sdk = Message.model_validate(message.model_dump())  # the SDK's own model accepts it
    assert sdk.id == "msg_abc" and sdk.model == "m" and sdk.role == "assistant"
    assert [b.type for b in sdk.content] == ["text", "tool_use", "tool_use"]
    assert sdk.content[1].input == {"file_path": "/a"}  # type: ignore[union-attr]
    # Invalid JSON is kept for the client's tool validation to report back to the model.
    assert sdk.content[2].input == {"_raw": "{not json"}  # type: ignore[union-attr]
    assert sdk.stop_reason == "tool_use" and sdk.stop_sequence is None
    assert (sdk.usage.input_tokens, sdk.usage.output_tokens) == (11, 5)


@pytest.mark.parametrize(
    ("finish", "extra", "expected"),
    [
        ("stop", {}, ("end_turn", None)),
        ("length", {}, ("max_tokens", None)),
        # the neuron's word that the context window filled (a max_tokens clamped to it)
        ("length", {"context_window_exceeded": True}, ("model_context_window_exceeded", None)),
        ("content_filter", {}, ("refusal", None)),
        ("stop", {"stop_reason": "END"}, ("stop_sequence", "END")),
        ("stop", {"matched_stop": "\n\nHuman:"}, ("stop_sequence", "\n\nHuman:")),
        ("stop", {"stop_reason": 2}, ("end_turn", None)),  # an EOS token id, not a stop string
        ("stop", {"stop_reason": "OTHER"}, ("end_turn", None)),  # not one the client asked for
    ],
)
def test_stop_reason_and_stop_sequence(finish: str, extra: dict[str, Any], expected: tuple) -> None:
    req = simple_request(stop_sequences=["END", "\n\nHuman:"])
    message = from_chat_response(completion("text", finish=finish, **extra), req)
    assert (message.stop_reason, message.stop_sequence) == expected


def test_empty_output_and_cached_usage() -> None:
    resp = completion(None, cached=8)
    message = from_chat_response(resp, simple_request(), message_id="msg_given")
    assert message.id == "msg_given" and message.content == [] and message.stop_reason == "end_turn"
    # As Anthropic counts: input_tokens excludes what was read from the cache.
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (3, 8)


def test_sdk_parses_a_non_streamed_answer() -> None:
    answer = from_chat_response(completion("Hello!"), simple_request())
    client = sdk_client(lambda _: httpx2.Response(200, json=answer.model_dump()))
    reply = client.messages.create(
        model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.content[0].text == "Hello!"  # type: ignore[union-attr]
    assert reply.stop_reason == "end_turn" and reply.usage.output_tokens == 5


# ---- streams ----------------------------------------------------------------------------------


def test_text_stream_has_anthropic_order_and_sdk_accumulates_it() -> None:
    events = translate_stream(
        simple_request(stream=True),
        [chunk("Hel"), chunk("lo"), chunk(finish="stop"), chunk(usage=usage(9, 2))],
        prompt_tokens=9,
    )
    assert shape(events) == [
        "message_start",
        "start:0:text",
        "delta:0:text_delta",
        "delta:0:text_delta",
        "stop:0",
        "message_delta",
        "message_stop",
    ]
    assert events[0].message.usage.input_tokens == 9
    final = stream_final([*events[:2], ping(), *events[2:]])
    assert final.content[0].text == "Hello"
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (9, 2)


def test_every_event_validates_against_the_sdk_union() -> None:
    events = translate_stream(
        simple_request(stream=True),
        [
            chunk("a"),
            chunk(tool_calls=[call_delta(0, "{}", "f", "call_1")]),
            chunk(finish="tool_calls"),
        ],
    )
    adapter = TypeAdapter(RawMessageStreamEvent)
    for event in events:
        assert adapter.validate_python(event.model_dump()).type == event.type


def test_first_chunk_usage_gives_message_start_its_input_tokens() -> None:
    """With continuous usage stats the neuron's first chunk carries the prompt's token count."""
    translator = StreamTranslator(simple_request(stream=True), "msg_test")
    events = translator.feed(chunk("Hi", usage=usage(12, 1)))
    events += translator.feed(chunk(finish="stop", usage=usage(12, 1))) + translator.finish()
    assert events[0].type == "message_start" and events[0].message.usage.input_tokens == 12
    assert stream_final(events).usage.input_tokens == 12


def test_message_start_and_message_delta_agree_on_cached_prompt_tokens() -> None:
    """As the API counts them: input_tokens excludes the cache reads, in both events."""
    translator = StreamTranslator(simple_request(stream=True), "msg_test")
    events = translator.feed(chunk("", usage=usage(342, 0, cached=5)))
    events += translator.feed(chunk("Hi", usage=usage(342, 1, cached=5)))
    events += translator.feed(chunk(finish="stop", usage=usage(342, 1, cached=5)))
    events += translator.finish()
    start, delta = events[0], events[-2]
    assert start.type == "message_start" and delta.type == "message_delta"
    assert start.message.usage.input_tokens == delta.usage.input_tokens == 337
    assert start.message.usage.cache_read_input_tokens == delta.usage.cache_read_input_tokens == 5
    final = stream_final(events).usage
    assert (final.input_tokens, final.cache_read_input_tokens) == (337, 5)


def test_interleaved_tool_calls_stream_as_sequential_tool_use_blocks() -> None:
    """Upstream interleaves two calls' argument deltas; Anthropic gets one block at a time."""
    chunks = [
        chunk("Let me look."),
        chunk(tool_calls=[call_delta(0, "", "Read", "call_a")]),
        chunk(tool_calls=[call_delta(1, '{"pattern"', "Grep", "call_b")]),
        chunk(tool_calls=[call_delta(0, '{"file_path": ')]),
        chunk(tool_calls=[call_delta(1, ': "TODO"}')]),
        chunk(tool_calls=[call_delta(0, '"/a.py"}')]),
        chunk(finish="tool_calls"),
        chunk(usage=usage(30, 12)),
    ]
    events = translate_stream(simple_request(stream=True), chunks)
    assert shape(events) == [
        "message_start",
        "start:0:text",
        "delta:0:text_delta",
        "stop:0",
        "start:1:tool_use",
        "delta:1:input_json_delta",
        "stop:1",
        "start:2:tool_use",
        "delta:2:input_json_delta",
        "stop:2",
        "message_delta",
        "message_stop",
    ]
    final = stream_final(events)
    assert [(b.type, getattr(b, "id", None)) for b in final.content] == [
        ("text", None),
        ("tool_use", "call_a"),
        ("tool_use", "call_b"),
    ]
    assert final.content[1].input == {"file_path": "/a.py"}
    assert final.content[2].input == {"pattern": "TODO"}
    assert final.stop_reason == "tool_use"
    # prompt_tokens was unknown at message_start: the final usage corrects it.
    assert (final.usage.input_tokens, final.usage.output_tokens) == (30, 12)


def test_invalid_streamed_arguments_never_reach_the_sdk_parser_as_broken_json() -> None:
    events = translate_stream(
        simple_request(stream=True),
        [chunk(tool_calls=[call_delta(0, '{"x": ', "f", "call_1")]), chunk(finish="tool_calls")],
    )
    final = stream_final(events)
    assert final.content[0].input == {"_raw": '{"x": '}


def test_stop_sequence_reported_in_stream() -> None:
    req = simple_request(stream=True, stop_sequences=["###"])
    events = translate_stream(req, [chunk("done"), chunk(finish="stop", stop_reason="###")])
    final = stream_final(events)
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "###")


def test_length_finish_in_stream() -> None:
    events = translate_stream(simple_request(stream=True), [chunk("abc"), chunk(finish="length")])
    assert stream_final(events).stop_reason == "max_tokens"


def test_a_full_context_window_in_stream() -> None:
    full = chunk(finish="length", context_window_exceeded=True)
    events = translate_stream(simple_request(stream=True), [chunk("abc"), full])
    assert stream_final(events).stop_reason == "model_context_window_exceeded"


def test_empty_stream_has_no_blocks() -> None:
    events = translate_stream(
        simple_request(stream=True), [chunk(finish="stop"), chunk(usage=usage(4, 0))]
    )
    assert shape(events) == ["message_start", "message_delta", "message_stop"]
    final = stream_final(events)
    assert (
        final.content == [] and final.stop_reason == "end_turn" and final.usage.output_tokens == 0
    )


def test_stream_without_usage_or_finish_still_closes_cleanly() -> None:
    """An upstream that ends without finish_reason or usage: blocks closed, tokens estimated."""
    events = translate_stream(
        simple_request(stream=True), [chunk("a"), chunk("b")], prompt_tokens=6
    )
    assert shape(events)[-3:] == ["stop:0", "message_delta", "message_stop"]
    final = stream_final(events)
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (6, 2)


def test_feed_before_start_and_finish_twice_are_safe() -> None:
    translator = StreamTranslator(simple_request(stream=True), "msg_1")
    first = translator.feed(chunk("x"))
    assert shape(first) == ["message_start", "start:0:text", "delta:0:text_delta"]
    assert translator.start() == []
    assert shape(translator.finish()) == ["stop:0", "message_delta", "message_stop"]
    assert translator.finish() == [] and translator.feed(chunk("late")) == []


def test_error_mid_stream_reaches_the_sdk_as_an_error() -> None:
    translator = StreamTranslator(simple_request(stream=True), "msg_1")
    events = translator.start() + translator.feed(chunk("partial"))
    events += translator.error("neuron n1 died mid-stream", "overloaded_error")
    assert translator.finish() == []  # nothing may follow the error event
    assert encode_sse(events[-1]) == (
        b'event: error\ndata: {"type":"error","error":'
        b'{"type":"overloaded_error","message":"neuron n1 died mid-stream"}}\n\n'
    )
    with pytest.raises(anthropic.APIStatusError, match="neuron n1 died mid-stream"):
        stream_final(events)


def test_encode_sse_frames() -> None:
    assert encode_sse(ping()) == b'event: ping\ndata: {"type":"ping"}\n\n'
    start = StreamTranslator(simple_request(), "msg_1", prompt_tokens=3).start()[0]
    frame = encode_sse(start).decode()
    head, data = frame.split("\n", 1)
    assert head == "event: message_start" and frame.endswith("\n\n")
    body = json.loads(data.removeprefix("data: "))
    assert body["message"]["stop_reason"] is None and body["message"]["usage"]["input_tokens"] == 3


def test_the_neurons_keep_alive_is_a_comment_before_message_start_and_a_ping_after() -> None:
    """While the neuron holds a long tool call back (it streams it whole), its keep-alive
    comments reach an Anthropic client as Anthropic's own `ping` once the message has begun;
    before message_start only a comment may come (the SDK refuses any other first event)."""
    stream = MessagesStream(simple_request(stream=True))
    comment = b": keep-alive\n\n"
    frames = [*stream.feed(comment, None)]
    assert frames == [comment]
    frames += stream.feed(b"", chunk("Let me write it.").model_dump())
    kept = stream.feed(comment, None)
    assert kept == [encode_sse(ping())]
    call = {
        "index": 0,
        "id": "t1",
        "type": "function",
        "function": {"name": "Write", "arguments": "{}"},
    }
    frames += kept + stream.feed(b"", chunk(tool_calls=[call], finish="tool_calls").model_dump())
    frames += stream.finish()
    client = sdk_client(replay(frames))
    with client.messages.stream(
        model="m", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert stream.feed(comment, None) == [comment]  # after the end: nothing Anthropic-shaped


def test_a_responses_stream_passes_the_keep_alive_as_a_comment() -> None:
    req = ResponsesRequest(model="m", input="hi", stream=True)
    stream = ResponsesStream(req, responses_chat_request(req))
    stream.feed(b"", chunk("hi").model_dump())
    assert stream.feed(b": keep-alive\n\n", None) == [b": keep-alive\n\n"]
