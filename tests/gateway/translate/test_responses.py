"""Responses API <-> OpenAI chat translation, checked against the official `openai` SDK's parsing."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from cortex.core.errors import ContextLengthExceeded, InvalidRequest
from cortex.core.protocol.openai import ChatCompletion, ChatCompletionChunk
from cortex.gateway.translate.responses import (
    ResponsesStreamTranslator,
    client_error,
    encode_sse,
    from_chat_response,
    to_chat_request,
)
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


def codex_request() -> dict[str, Any]:
    """A request shaped like the Codex CLI's: instructions, developer context, tools, no storage."""
    shell_params = {
        "type": "object",
        "properties": {"command": {"type": "array", "items": {"type": "string"}}},
        "required": ["command"],
        "additionalProperties": False,
    }
    return {
        "model": "gpt-5-codex",
        "instructions": "You are Codex, a coding agent.",
        "input": [
            {
                "type": "message",
                "role": "developer",
                "content": [
                    {"type": "input_text", "text": "<permissions>workspace-write</permissions>"}
                ],
            },
            {
                "type": "message",
                "role": "user",
                "content": [
                    {
                        "type": "input_text",
                        "text": "<environment_context>cwd=/repo</environment_context>",
                    },
                    {"type": "input_text", "text": "run the tests"},
                ],
            },
            {"type": "reasoning", "summary": [], "encrypted_content": "gAAAA"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Running them.", "annotations": []}],
            },
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "shell",
                "arguments": '{"command":["pytest","-q"]}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": "3 passed"},
        ],
        "tools": [
            {
                "type": "function",
                "name": "shell",
                "description": "Run a command",
                "strict": False,
                "parameters": shell_params,
            },
            {"type": "web_search"},
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "session-1",
    }


# ---- helpers ----------------------------------------------------------------------------------


def completion(
    content: str | None, tool_calls: list[tuple[str, str, str]] = (), finish: str = "stop"
) -> ChatCompletion:
    return chat_completion(content, tool_calls, finish, usage(20, 6, cached=4))


def simple_request(**fields: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "hi"} | fields)


def sdk_client(handler: Handler) -> openai.OpenAI:
    return openai.OpenAI(
        api_key="k", base_url="http://cortex.test/v1", http_client=mock_http(handler)
    )


def sse_client(events: list[Any]) -> openai.OpenAI:
    return sdk_client(replay(encode_sse(e) for e in events))


def stream_final(events: list[Any]) -> Any:
    """Feed encoded events to the SDK's ResponseStream and return its final response."""
    with sse_client(events).responses.stream(model="m", input="hi") as stream:
        return stream.get_final_response()


def sdk_events(events: list[Any]) -> list[Any]:
    """The events as the SDK yields them from responses.create(stream=True)."""
    return list(sse_client(events).responses.create(model="m", input="hi", stream=True))


def translate_stream(
    req: ResponsesRequest, chunks: list[ChatCompletionChunk], **kw: Any
) -> list[Any]:
    return run_stream(ResponsesStreamTranslator(req, "resp_test", created_at=100, **kw), chunks)


# ---- requests ---------------------------------------------------------------------------------


def test_string_input_with_instructions() -> None:
    chat = to_chat_request(
        simple_request(
            instructions="Be terse.", max_output_tokens=50, temperature=0.3, top_p=0.5, user="u"
        )
    )
    assert [(m.role, m.content) for m in chat.messages] == [("system", "Be terse."), ("user", "hi")]
    assert (chat.max_tokens, chat.temperature, chat.top_p, chat.user) == (50, 0.3, 0.5, "u")
    assert chat.stream is False and chat.stream_options is None and chat.tools is None


def test_codex_request_becomes_a_chat_request() -> None:
    chat = to_chat_request(ResponsesRequest.model_validate(codex_request()))
    roles = [m.role for m in chat.messages]
    assert roles == ["system", "system", "user", "assistant", "tool"]
    assert chat.messages[1].content == "<permissions>workspace-write</permissions>"
    assert (
        chat.messages[2].content
        == "<environment_context>cwd=/repo</environment_context>\n\nrun the tests"
    )
    assistant = chat.messages[3]
    assert assistant.content == "Running them."
    assert [(c.id, c.function.name, c.function.arguments) for c in assistant.tool_calls or []] == [
        ("call_1", "shell", '{"command":["pytest","-q"]}')
    ]
    assert (chat.messages[4].tool_call_id, chat.messages[4].content) == ("call_1", "3 passed")
    assert chat.tools is not None and [t.function.name for t in chat.tools] == ["shell"]
    assert chat.tool_choice == "auto" and chat.parallel_tool_calls is False
    assert chat.stream and chat.stream_options is not None and chat.stream_options.include_usage


def test_requests_the_sdk_sends_are_accepted() -> None:
    sent: list[dict[str, Any]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        sent.append(body)
        answer = from_chat_response(completion("ok"), ResponsesRequest.model_validate(body))
        return httpx2.Response(200, json=answer.model_dump())

    reply = sdk_client(handler).responses.create(
        model="m",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "describe"},
                    {
                        "type": "input_image",
                        "image_url": "data:image/png;base64,iVBO",
                        "detail": "low",
                    },
                ],
            },
        ],
        tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True}],
        tool_choice={"type": "function", "name": "f"},
        text={
            "format": {
                "type": "json_schema",
                "name": "out",
                "schema": {"type": "object"},
                "strict": True,
            }
        },
        metadata={"k": "v"},
    )
    assert reply.output_text == "ok" and reply.metadata == {"k": "v"}
    assert reply.tool_choice.type == "function"  # type: ignore[union-attr]

    chat = to_chat_request(ResponsesRequest.model_validate(sent[0]))
    assert chat.messages[0].content == [
        {"type": "text", "text": "describe"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO", "detail": "low"}},
    ]
    assert chat.tool_choice == {"type": "function", "function": {"name": "f"}}
    assert chat.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True},
    }


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", "auto"),
        ("none", "none"),
        ("required", "required"),
        ({"type": "function", "name": "f"}, {"type": "function", "function": {"name": "f"}}),
    ],
)
def test_tool_choice_is_mapped(choice: Any, expected: Any) -> None:
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    assert to_chat_request(simple_request(tools=tools, tool_choice=choice)).tool_choice == expected


def test_allowed_tools_offers_its_subset_with_its_mode() -> None:
    tools = [
        {"type": "function", "name": name, "parameters": {"type": "object"}}
        for name in ("f", "g", "h")
    ]
    allowed = {"type": "allowed_tools", "mode": "required", "tools": [
        {"type": "function", "name": "f"}, {"type": "function", "name": "h"},
    ]}  # fmt: skip
    chat = to_chat_request(simple_request(tools=tools, tool_choice=allowed))
    assert [t.function.name for t in chat.tools or []] == ["f", "h"]
    assert chat.tool_choice == "required"


@pytest.mark.parametrize(
    ("tools", "choice", "named"),
    [
        ([{"type": "function", "name": "f"}], "bogus", "not one of auto, none, required"),
        ([{"type": "web_search"}], "required", "needs at least one function tool"),
        ([{"type": "function", "name": "f"}, {"type": "web_search"}], {"type": "web_search"},
         "force a function tool only"),
        ([{"type": "custom", "name": "apply_patch"}], None, "'custom' are not supported"),
        ([{"type": "local_shell"}], None, "'local_shell' are not supported"),
    ],
)  # fmt: skip
def test_tools_and_choices_cortex_cannot_honour_are_refused(
    tools: list[dict[str, Any]], choice: Any, named: str
) -> None:
    with pytest.raises(InvalidRequest, match=named):
        to_chat_request(simple_request(tools=tools, tool_choice=choice))


def test_hosted_tools_are_dropped_and_auto_without_functions_is_nothing() -> None:
    chat = to_chat_request(simple_request(tools=[{"type": "web_search"}], tool_choice="auto"))
    assert chat.tools is None and chat.tool_choice is None


def test_json_object_format_and_plain_text_format() -> None:
    assert to_chat_request(
        simple_request(text={"format": {"type": "json_object"}})
    ).response_format == {"type": "json_object"}
    assert (
        to_chat_request(simple_request(text={"format": {"type": "text"}})).response_format is None
    )


def test_function_calls_without_preceding_text_and_list_outputs() -> None:
    req = simple_request(
        input=[
            {"role": "user", "content": "two things"},
            {"type": "function_call", "call_id": "a", "name": "f", "arguments": ""},
            {"type": "function_call", "call_id": "b", "name": "g", "arguments": '{"x":1}'},
            {
                "type": "function_call_output",
                "call_id": "a",
                "output": [{"type": "input_text", "text": "A"}],
            },
            {"type": "function_call_output", "call_id": "b", "output": "B"},
        ]
    )
    messages = to_chat_request(req).messages
    assert [m.role for m in messages] == ["user", "assistant", "tool", "tool"]
    assert messages[1].content is None
    assert [(c.id, c.function.arguments) for c in messages[1].tool_calls or []] == [
        ("a", "{}"),
        ("b", '{"x":1}'),
    ]
    assert [(m.tool_call_id, m.content) for m in messages[2:]] == [("a", "A"), ("b", "B")]


@pytest.mark.parametrize(
    "stored",
    [
        {"previous_response_id": "resp_old"},
        {"conversation": "conv_123"},
        {"conversation": {"id": "conv_123"}},
        {"prompt": {"id": "pmpt_1", "version": "2"}},
        {"background": True},
    ],
)
def test_what_refers_to_stored_state_is_refused(stored: dict[str, Any]) -> None:
    [field] = stored
    with pytest.raises(InvalidRequest, match=f"{field} is not supported") as caught:
        to_chat_request(simple_request(**stored))
    assert caught.value.param == field


def test_a_file_beside_an_image_is_refused_not_dropped() -> None:
    content = [
        {"type": "input_text", "text": "compare"},
        {"type": "input_image", "image_url": "https://x.test/a.png"},
        {"type": "input_file", "file_id": "file-1"},
    ]
    with pytest.raises(InvalidRequest, match="'input_file' are not supported"):
        to_chat_request(simple_request(input=[{"role": "user", "content": content}]))


def test_an_item_reference_is_refused() -> None:
    refs = [{"role": "user", "content": "and then?"}, {"type": "item_reference", "id": "msg_1"}]
    with pytest.raises(InvalidRequest, match="item_reference"):
        to_chat_request(simple_request(input=refs))


def test_input_with_nothing_usable_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        to_chat_request(simple_request(input=[{"type": "reasoning", "summary": []}]))


# ---- non-streamed responses -------------------------------------------------------------------


def test_text_and_function_call_response() -> None:
    req = simple_request(
        tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    )
    resp = completion(
        "Calling f.", [("call_7", "f", '{"a": 1}'), ("call_8", "g", "")], finish="tool_calls"
    )
    obj = from_chat_response(resp, req)
    sdk = Response.model_validate(obj.model_dump())  # the SDK's own model accepts it
    assert (
        sdk.id == "resp_abc"
        and sdk.created_at == 7
        and sdk.status == "completed"
        and sdk.model == "m"
    )
    assert sdk.output_text == obj.output_text() == "Calling f."
    calls = [o for o in sdk.output if o.type == "function_call"]
    assert [(c.call_id, c.name, c.arguments) for c in calls] == [
        ("call_7", "f", '{"a": 1}'),
        ("call_8", "g", "{}"),
    ]
    assert len({o.id for o in sdk.output}) == 3  # item ids are unique
    assert sdk.usage is not None
    assert (sdk.usage.input_tokens, sdk.usage.output_tokens, sdk.usage.total_tokens) == (20, 6, 26)
    assert sdk.usage.input_tokens_details.cached_tokens == 4
    assert [t.type for t in sdk.tools] == ["function"]


def test_length_finish_is_incomplete() -> None:
    obj = from_chat_response(
        completion("trunc", finish="length"), simple_request(max_output_tokens=5)
    )
    sdk = Response.model_validate(obj.model_dump())
    assert sdk.status == "incomplete" and sdk.incomplete_details is not None
    assert sdk.incomplete_details.reason == "max_output_tokens" and sdk.max_output_tokens == 5
    # The item the finish cut is incomplete too, with the text it has (as OpenAI answers).
    assert sdk.output[0].status == "incomplete" and sdk.output_text == "trunc"


def test_empty_output() -> None:
    obj = from_chat_response(
        completion(None), simple_request(), response_id="resp_given", created_at=3
    )
    assert (obj.id, obj.created_at, obj.output, obj.status) == ("resp_given", 3, [], "completed")


# ---- streams ----------------------------------------------------------------------------------


def test_text_stream_order_and_sdk_accumulation() -> None:
    events = translate_stream(
        simple_request(stream=True),
        [chunk("Hel"), chunk("lo"), chunk(finish="stop"), chunk(usage=usage(9, 2))],
    )
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = stream_final(events)
    assert final.id == "resp_test" and final.output_text == "Hello" and final.status == "completed"
    assert final.usage is not None and (final.usage.input_tokens, final.usage.output_tokens) == (
        9,
        2,
    )


def test_every_event_validates_against_the_sdk_union() -> None:
    events = translate_stream(
        simple_request(stream=True),
        [
            chunk("a"),
            chunk(tool_calls=[call_delta(0, "{}", "f", "call_1")]),
            chunk(finish="tool_calls"),
        ],
    )
    adapter = TypeAdapter(ResponseStreamEvent)
    for event in events:
        assert adapter.validate_python(event.model_dump()).type == event.type


def test_interleaved_function_calls_stream_as_whole_items() -> None:
    chunks = [
        chunk("Looking."),
        chunk(tool_calls=[call_delta(0, '{"path":', "read", "call_a")]),
        chunk(tool_calls=[call_delta(1, '{"q": "x"', "grep", "call_b")]),
        chunk(tool_calls=[call_delta(0, ' "a.py"}')]),
        chunk(tool_calls=[call_delta(1, "}")]),
        chunk(finish="tool_calls"),
        chunk(usage=usage(30, 12)),
    ]
    events = translate_stream(simple_request(stream=True), chunks)
    tail = [e.type for e in events][8:]  # after the text message item
    assert tail == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ] * 2 + ["response.completed"]
    final = stream_final(events)
    calls = [o for o in final.output if o.type == "function_call"]
    assert [(c.call_id, c.name, json.loads(c.arguments)) for c in calls] == [
        ("call_a", "read", {"path": "a.py"}),
        ("call_b", "grep", {"q": "x"}),
    ]
    assert [o.type for o in final.output] == ["message", "function_call", "function_call"]
    assert final.usage is not None and final.usage.total_tokens == 42


def test_length_finish_streams_incomplete() -> None:
    events = sdk_events(
        translate_stream(simple_request(stream=True), [chunk("ab"), chunk(finish="length")])
    )
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.output[0].content[0].text == "ab"
    assert last.response.output[0].status == "incomplete"
    done = next(e for e in events if e.type == "response.output_item.done")
    assert done.item.status == "incomplete"


def test_empty_stream() -> None:
    events = translate_stream(simple_request(stream=True), [chunk(finish="stop")], prompt_tokens=4)
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.completed",
    ]
    final = stream_final(events)
    assert final.output == [] and final.output_text == ""
    assert final.usage is not None and final.usage.input_tokens == 4


def test_stream_without_usage_estimates_output_tokens() -> None:
    events = translate_stream(
        simple_request(stream=True), [chunk("a"), chunk("b")], prompt_tokens=5
    )
    final = stream_final(events)
    assert final.output_text == "ab"
    assert final.usage is not None and (final.usage.output_tokens, final.usage.total_tokens) == (
        2,
        7,
    )


def test_error_mid_stream() -> None:
    translator = ResponsesStreamTranslator(simple_request(stream=True), "resp_e", created_at=1)
    events = translator.start() + translator.feed(chunk("part"))
    events += translator.error("neuron n1 died mid-stream")
    assert translator.finish() == []
    seen = sdk_events(events)
    assert [e.type for e in seen][-2:] == ["error", "response.failed"]
    assert seen[-2].message == "neuron n1 died mid-stream" and seen[-2].code == "server_error"
    assert seen[-1].response.status == "failed"
    assert seen[-1].response.error.message == "neuron n1 died mid-stream"
    assert [e.sequence_number for e in events] == list(range(len(events)))


@pytest.mark.parametrize(
    ("status", "code", "known"),
    [(429, "overloaded", "rate_limit_exceeded"), (503, "neuron_unavailable", "server_error"),
     (400, "context_length_exceeded", "invalid_prompt")],
)  # fmt: skip
def test_a_failed_response_carries_an_error_code_openais_clients_know(
    status: int, code: str, known: str
) -> None:
    translator = ResponsesStreamTranslator(simple_request(stream=True), "resp_e", created_at=1)
    events = translator.start() + translator.error("no", code, status)
    error, failed = sdk_events(events)[-2:]
    assert error.code == code  # the error event says cortex's own code
    assert failed.response.error.code == known


def test_encode_sse_frame() -> None:
    event = ResponsesStreamTranslator(simple_request(), "resp_1", created_at=9).start()[0]
    frame = encode_sse(event).decode()
    head, data = frame.split("\n", 1)
    assert head == "event: response.created" and frame.endswith("\n\n")
    body = json.loads(data.removeprefix("data: "))
    assert body["sequence_number"] == 0 and body["response"]["status"] == "in_progress"
    assert body["response"]["created_at"] == 9


@pytest.mark.parametrize(
    ("neuron_param", "client_param"),
    [
        ("messages", "input"),
        ("messages.0", "instructions"),
        ("messages.2.content.1", "input.1.content.1"),
        ("messages.3", "input.2"),
        ("max_tokens", "max_output_tokens"),
        ("response_format.json_schema.schema", "text.format.schema"),
        ("tool_choice", "tool_choice"),
    ],
)
def test_the_neurons_error_names_the_responses_fields(neuron_param: str, client_param: str) -> None:
    image = {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}
    req = simple_request(
        instructions="Be brief.",
        input=[
            {"role": "user", "content": "hi"},
            {"role": "user", "content": [{"type": "input_text", "text": "this?"}, image]},
            {"type": "function_call_output", "call_id": "c1", "output": "done"},
        ],
    )
    err = InvalidRequest(f"{neuron_param}: not this", param=neuron_param)
    said = client_error(err, req, to_chat_request(req))
    assert (said.param, said.message) == (client_param, f"{client_param}: not this")
    assert type(said) is InvalidRequest and err.param == neuron_param  # the neuron's, untouched


def test_an_input_item_that_makes_no_message_leaves_the_index_out() -> None:
    req = simple_request(
        input=[{"type": "reasoning", "summary": []}, {"role": "user", "content": "hi"}]
    )
    err = ContextLengthExceeded("too long", param="messages.0")
    assert client_error(err, req, to_chat_request(req)).param == "input"
