"""The neuron HTTP API over a fake runtime: every route, error shape, and the SSE framing."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import httpx2
import openai
import pytest
from fake_runtime import FakeRuntime, FakeServed, overloaded
from fastapi import FastAPI
from live_server import serve
from prometheus_client.parser import text_string_to_metric_families

from cortex.core.client import NeuronClient
from cortex.core.completion_limit import CLAMPED_HEADER, OUTPUT_CAP_HEADER, STRICT_HEADER
from cortex.core.config import NeuronConfig
from cortex.core.errors import ModelBusy, ModelNotFound, Unauthorized
from cortex.core.fleet import LoadRequest, ModelState
from cortex.neuron.server import create_app

TOOL_OUTPUT = [
    "Let me check.",
    "\n<tool_",
    'call>\n{"name": "get_weather", ',
    '"arguments": {"city": "Paris"}}\n</tool_call>',
]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
USER = [{"role": "user", "content": "hi"}]


def _config(**neuron: Any) -> NeuronConfig:
    return NeuronConfig.model_validate({"neuron": {"name": "fake", **neuron}})


@pytest.fixture
def runtime() -> FakeRuntime:
    runtime = FakeRuntime(_config(max_tokens_limit=1000, max_body_bytes=20_000))
    runtime.add(FakeServed("tiny-chat"))
    runtime.add(FakeServed("tiny-embed", kind="embedding", context_length=64))
    return runtime


@pytest.fixture
def app(runtime: FakeRuntime) -> FastAPI:
    return create_app(runtime)  # type: ignore[arg-type]


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://neuron") as client:
        yield client


@pytest.fixture
async def sdk(app: FastAPI) -> AsyncIterator[openai.AsyncOpenAI]:
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport) as client:
        yield openai.AsyncOpenAI(
            api_key="x", base_url="http://neuron/v1", http_client=client, max_retries=0
        )


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return dict(error)


def _events(response: httpx.Response) -> list[Any]:
    """The data payloads of an SSE body, checking the framing: `data: ...` then a blank line."""
    assert response.headers["content-type"].startswith("text/event-stream")
    body = response.text
    assert body.endswith("\n\n")
    events = []
    for block in body.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# ---- lifecycle -------------------------------------------------------------------------------


async def test_health_follows_device_health(http: httpx.AsyncClient, runtime: FakeRuntime) -> None:
    assert (await http.get("/health")).json() == {"status": "ok"}
    runtime.healthy = False
    response = await http.get("/health")
    assert response.status_code == 503 and response.json() == {"status": "unhealthy"}


async def test_lifecycle_through_the_neuron_client(app: FastAPI, runtime: FakeRuntime) -> None:
    client = NeuronClient("http://neuron", transport=httpx.ASGITransport(app=app))
    try:
        status = await client.status()
        assert status.node == "fake" and status.devices[0].memory_total == 8000
        assert {m.id for m in status.models} == {"tiny-chat", "tiny-embed"}
        listing = await client.models()
        assert {s.id for s in listing.available} == {"tiny-chat", "tiny-embed"}
        await client.unload("tiny-chat")
        assert "tiny-chat" not in runtime.models
        loaded = await client.load(LoadRequest(model="tiny"))
        assert loaded.id == "tiny-chat" and loaded.state is ModelState.READY
        with pytest.raises(ModelNotFound):
            await client.load(LoadRequest(model="nope"))
        runtime.models["tiny-chat"].running = 1
        with pytest.raises(ModelBusy):
            await client.unload("tiny-chat")
        await client.unload("tiny-chat", force=True)
        with pytest.raises(ModelNotFound):
            await client.unload("tiny-chat")
        assert "cortex_neuron_in_flight" in await client.metrics()
    finally:
        await client.aclose()


async def test_load_without_waiting_answers_202(http: httpx.AsyncClient) -> None:
    response = await http.post("/models/load", json={"model": "tiny-embed", "wait": False})
    assert response.status_code == 202
    assert response.json()["state"] == "loading" and response.json()["progress"] == 0.1
    ready = await http.post("/models/load", json={"model": "tiny-embed"})
    assert ready.status_code == 200 and ready.json()["state"] == "ready"


async def test_failed_load_and_bad_load_bodies(http: httpx.AsyncClient) -> None:
    bad = await http.post("/models/load", json={"model": "x", "source": "file:/broken"})
    _error(bad, 422, "model_load_failed")
    error = _error(await http.post("/models/load", json={"source": "x"}), 400, "invalid_request")
    assert error["param"] == "model"
    _error(await http.post("/models/unload", json={}), 400, "invalid_request")


async def test_admin_token_guards_lifecycle_changes(runtime: FakeRuntime) -> None:
    runtime.config.neuron.admin_token = "s3cret"
    app = create_app(runtime)  # type: ignore[arg-type]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://neuron"
    ) as http:
        body = {"model": "tiny-chat"}
        _error(await http.post("/models/load", json=body), 401, "invalid_api_key")
        wrong = {"Authorization": "Bearer nope"}
        _error(await http.post("/models/unload", json=body, headers=wrong), 401, "invalid_api_key")
        assert (await http.get("/status")).status_code == 200  # reads stay open
        right = {"Authorization": "Bearer s3cret"}
        assert (await http.post("/models/unload", json=body, headers=right)).status_code == 200
    client = NeuronClient(
        "http://neuron", admin_token="wrong", transport=httpx.ASGITransport(app=app)
    )
    with pytest.raises(Unauthorized):
        await client.load(LoadRequest(model="tiny-chat"))
    await client.aclose()


# ---- chat ------------------------------------------------------------------------------------


async def test_chat_non_stream_through_the_sdk(
    sdk: openai.AsyncOpenAI, runtime: FakeRuntime
) -> None:
    answer = await sdk.chat.completions.create(model="tiny-chat", messages=USER)  # type: ignore[arg-type]
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.choices[0].message.content == "Hello there!"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "stop"
    prompt = len(runtime.models["tiny-chat"].render_chat(USER, None))
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt, 3)
    assert answer.usage.total_tokens == prompt + 3


async def test_chat_stream_framing(http: httpx.AsyncClient) -> None:
    body = {"model": "tiny-chat", "messages": USER, "stream": True}
    body["stream_options"] = {"include_usage": True}
    events = _events(await http.post("/v1/chat/completions", json=body))
    first, *deltas, finish, usage, done = events
    assert done == "[DONE]"
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [d["choices"][0]["delta"]["content"] for d in deltas] == ["Hello", " there", "!"]
    assert all(d["choices"][0]["finish_reason"] is None for d in deltas)
    assert finish["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    assert len({e["id"] for e in events[:-1]}) == 1


async def test_chat_stream_without_usage_option_has_no_usage_chunk(
    http: httpx.AsyncClient,
) -> None:
    body = {"model": "tiny-chat", "messages": USER, "stream": True}
    events = _events(await http.post("/v1/chat/completions", json=body))
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in e for e in events[:-1])


async def test_chat_stream_through_the_sdk(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="tiny-chat",
        messages=USER,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello there!"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


async def test_sampling_fields_reach_the_engine(
    sdk: openai.AsyncOpenAI, runtime: FakeRuntime
) -> None:
    await sdk.chat.completions.create(
        model="tiny-chat",
        messages=USER,  # type: ignore[arg-type]
        max_tokens=50,
        max_completion_tokens=20,
        temperature=0.3,
        top_p=0.9,
        seed=7,
        stop=["x", "y"],
        extra_body={"top_k": 5, "min_p": 0.05},
    )
    params = runtime.models["tiny-chat"].last_params
    assert params is not None
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.seed) == (
        20,
        0.3,
        0.9,
        5,
        7,
    )
    assert params.min_p == 0.05
    assert params.stop == ("x", "y")


async def test_max_tokens_ends_with_length(sdk: openai.AsyncOpenAI) -> None:
    answer = await sdk.chat.completions.create(model="tiny-chat", messages=USER, max_tokens=2)  # type: ignore[arg-type]
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].message.content == "Hello there"
    assert answer.usage is not None and answer.usage.completion_tokens == 2


async def test_cached_tokens_are_reported(sdk: openai.AsyncOpenAI, runtime: FakeRuntime) -> None:
    runtime.models["tiny-chat"].cached_tokens = 9
    answer = await sdk.chat.completions.create(model="tiny-chat", messages=USER)  # type: ignore[arg-type]
    assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens == 9


async def test_messages_reach_the_template_as_plain_openai_dicts(
    http: httpx.AsyncClient, runtime: FakeRuntime
) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        {"role": "developer", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "wea"}, {"type": "text", "text": "ther"}],
        },
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    body = {"model": "tiny-chat", "messages": messages, "tools": [WEATHER_TOOL]}
    assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
    served = runtime.models["tiny-chat"]
    assert served.last_messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    assert served.last_tools == [WEATHER_TOOL]


# ---- tools -----------------------------------------------------------------------------------


async def test_tool_call_non_stream(sdk: openai.AsyncOpenAI, runtime: FakeRuntime) -> None:
    runtime.models["tiny-chat"].script = TOOL_OUTPUT
    answer = await sdk.chat.completions.create(
        model="tiny-chat",
        messages=USER,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]


async def test_tool_call_stream(sdk: openai.AsyncOpenAI, runtime: FakeRuntime) -> None:
    runtime.models["tiny-chat"].script = TOOL_OUTPUT
    stream = await sdk.chat.completions.create(
        model="tiny-chat",
        messages=USER,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        stream=True,
    )
    chunks = [chunk async for chunk in stream]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == "Let me check."
    assert "<tool" not in content
    calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].index == 0
    assert calls[0].function is not None and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments or "") == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# A forced call that the token limit cut in a second (array-less, hence ungrammatical here but
# equally cut) block, inside its arguments.
CUT_CALLS = [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lo',
]


async def test_a_forced_call_cut_by_the_limit_keeps_what_it_generated(
    sdk: openai.AsyncOpenAI, runtime: FakeRuntime
) -> None:
    """As OpenAI answers a call cut by length: the call, its name and the arguments text so far,
    finish `length`; complete calls before it stay (docs/architecture.md, "Structured outputs")."""
    runtime.models["tiny-chat"].script = CUT_CALLS
    runtime.models["tiny-chat"].finish = "length"
    kwargs: Any = {"model": "tiny-chat", "messages": USER, "tools": [WEATHER_TOOL]}
    answer = await sdk.chat.completions.create(**kwargs, tool_choice="required")
    choice = answer.choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]  # type: ignore[union-attr]
    assert calls == [("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Lo')]
    stream = await sdk.chat.completions.create(**kwargs, tool_choice="required", stream=True)
    chunks = [chunk async for chunk in stream]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert [(t.index, t.function.arguments) for t in streamed] == [  # type: ignore[union-attr]
        (0, '{"city": "Paris"}'),
        (1, '{"city": "Lo'),
    ]
    assert chunks[-1].choices[0].finish_reason == "length"
    # Not forced: the same cut output keeps its text, as the model wrote it.
    free = await sdk.chat.completions.create(**kwargs)
    assert free.choices[0].finish_reason == "length"
    assert "<tool_call>" in (free.choices[0].message.content or "")


@pytest.mark.parametrize(
    ("output", "arguments"),
    [
        ("<tool_call>", ""),  # cut before the name: the one forced tool it can be
        ('<tool_call>\n{"name": "get_w', ""),
        ('<tool_call>\n{"name": "get_weather", "argu', ""),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"ci', '{"ci'),
    ],
)
async def test_a_named_call_cut_anywhere_is_still_that_call(
    sdk: openai.AsyncOpenAI, runtime: FakeRuntime, output: str, arguments: str
) -> None:
    runtime.models["tiny-chat"].script = [output]
    runtime.models["tiny-chat"].finish = "length"
    named = {"type": "function", "function": {"name": "get_weather"}}
    other = {"type": "function", "function": {"name": "get_time"}}
    answer = await sdk.chat.completions.create(
        model="tiny-chat",
        messages=USER,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL, other],  # type: ignore[list-item]
        tool_choice=named,  # type: ignore[arg-type]
    )
    [call] = answer.choices[0].message.tool_calls or []
    assert (call.function.name, call.function.arguments) == ("get_weather", arguments)  # type: ignore[union-attr]
    assert answer.choices[0].finish_reason == "length"


async def test_an_assistant_refusal_part_in_history_is_its_text(
    sdk: openai.AsyncOpenAI, runtime: FakeRuntime
) -> None:
    """A refusal part is valid in an assistant message (the SDK's types): the model reads it as
    what it said, as the Responses translation does."""
    refused = {"type": "refusal", "refusal": "I cannot help with that."}
    history: Any = [*USER, {"role": "assistant", "content": [refused]}, *USER]
    answer = await sdk.chat.completions.create(model="tiny-chat", messages=history)
    assert answer.choices[0].message.content
    assert (runtime.models["tiny-chat"].last_messages or [])[1][
        "content"
    ] == "I cannot help with that."


async def test_a_length_finish_that_fills_the_context_says_so(
    http: httpx.AsyncClient, runtime: FakeRuntime
) -> None:
    """The choice's `context_window_exceeded` tells a full context from max_tokens, so the
    gateway can answer Anthropic's `model_context_window_exceeded` (docs/architecture.md)."""
    model = runtime.models["tiny-chat"]
    model.finish = "length"
    body = {"model": "tiny-chat", "messages": USER, "max_tokens": 300}
    first = (await http.post("/v1/chat/completions", json=body)).json()
    assert "context_window_exceeded" not in first["choices"][0]
    model.context_length = first["usage"]["total_tokens"]  # the same answer now fills it
    for stream in (False, True):
        answer = await http.post("/v1/chat/completions", json={**body, "stream": stream})
        assert answer.headers["x-cortex-max-tokens-clamped"].startswith("300->")
        assert '"context_window_exceeded":true' in answer.text.replace(" ", "")


async def test_tool_choice_none_neither_renders_nor_parses(
    http: httpx.AsyncClient, runtime: FakeRuntime
) -> None:
    runtime.models["tiny-chat"].script = TOOL_OUTPUT
    body = {"model": "tiny-chat", "messages": USER, "tools": [WEATHER_TOOL], "tool_choice": "none"}
    answer = (await http.post("/v1/chat/completions", json=body)).json()
    assert runtime.models["tiny-chat"].last_tools is None
    assert answer["choices"][0]["message"]["content"] == "".join(TOOL_OUTPUT)
    assert answer["choices"][0]["finish_reason"] == "stop"


async def test_text_without_tools_is_never_parsed(
    http: httpx.AsyncClient, runtime: FakeRuntime
) -> None:
    runtime.models["tiny-chat"].script = TOOL_OUTPUT
    body = {"model": "tiny-chat", "messages": USER}
    answer = (await http.post("/v1/chat/completions", json=body)).json()
    assert answer["choices"][0]["message"]["content"] == "".join(TOOL_OUTPUT)
    assert answer["choices"][0]["message"]["tool_calls"] is None


# ---- completions -----------------------------------------------------------------------------


async def test_completions_non_stream_and_echo(sdk: openai.AsyncOpenAI) -> None:
    answer = await sdk.completions.create(model="tiny-chat", prompt="Say:")
    assert answer.object == "text_completion" and answer.choices[0].text == "Hello there!"
    assert answer.usage is not None and answer.usage.prompt_tokens == 4
    echoed = await sdk.completions.create(model="tiny-chat", prompt="Say:", echo=True)
    assert echoed.choices[0].text == "Say:Hello there!"
    ids = await sdk.completions.create(model="tiny-chat", prompt=[1, 2, 3])
    assert ids.usage is not None and ids.usage.prompt_tokens == 3


async def test_completions_stream(http: httpx.AsyncClient) -> None:
    body = {"model": "tiny-chat", "prompt": "Say:", "stream": True, "max_tokens": 2}
    body["stream_options"] = {"include_usage": True}
    events = _events(await http.post("/v1/completions", json=body))
    *texts, finish, usage, done = events
    assert done == "[DONE]"
    assert [t["choices"][0]["text"] for t in texts] == ["Hello", " there"]
    assert all(t["object"] == "text_completion" for t in events[:-1])
    assert finish["choices"][0]["finish_reason"] == "length"
    assert usage["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


async def test_completions_bad_prompts(http: httpx.AsyncClient) -> None:
    for body, param in (
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": [1, 0x110000]}, "prompt"),  # one past the (character) vocabulary
        ({"prompt": [1_000_000_000]}, "prompt"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": [1, 2], "echo": True}, "echo"),
    ):
        response = await http.post("/v1/completions", json={"model": "tiny-chat", **body})
        assert _error(response, 400, "invalid_request")["param"] == param


# ---- embeddings ------------------------------------------------------------------------------


async def test_embeddings_float_and_base64(sdk: openai.AsyncOpenAI) -> None:
    texts = ["banana bread", "bread banana", "xyz"]
    floats = await sdk.embeddings.create(model="tiny-embed", input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2] and len(floats.data[0].embedding) == 26
    assert floats.usage.prompt_tokens == sum(len(t) + 2 for t in texts)
    decoded = await sdk.embeddings.create(model="tiny-embed", input=texts)  # SDK asks base64
    for a, b in zip(floats.data, decoded.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
    single = await sdk.embeddings.create(model="tiny-embed", input="xyz", encoding_format="float")
    assert single.data[0].embedding == pytest.approx(floats.data[2].embedding)


async def test_embedding_errors(http: httpx.AsyncClient) -> None:
    for body, param in (
        ({"input": []}, "input"),
        ({"input": ["ok", ""]}, "input"),
        ({"input": [[1, 2]]}, "input"),
        ({"input": "x", "dimensions": 3}, "dimensions"),
        ({"input": "x", "model": "tiny-chat"}, "model"),
    ):
        response = await http.post("/v1/embeddings", json={"model": "tiny-embed", **body})
        assert _error(response, 400, "invalid_request")["param"] == param
    chat = {"model": "tiny-embed", "messages": USER}
    response = await http.post("/v1/chat/completions", json=chat)
    message = _error(response, 400, "invalid_request")["message"]
    assert message == "model 'tiny-embed' is an embedding model; use /v1/embeddings"


async def test_v1_models_lists_loaded_models(sdk: openai.AsyncOpenAI) -> None:
    models = [m async for m in sdk.models.list()]
    assert {m.id for m in models} == {"tiny-chat", "tiny-embed"}
    assert {m.owned_by for m in models} == {"fake"}
    chat = next(m for m in models if m.id == "tiny-chat")
    assert chat.model_extra == {"kind": "chat", "state": "ready", "context_length": 400}


# ---- errors ----------------------------------------------------------------------------------


async def test_malformed_json_is_400(http: httpx.AsyncClient) -> None:
    headers = {"content-type": "application/json"}
    response = await http.post("/v1/chat/completions", content=b'{"model": ', headers=headers)
    assert "JSON" in _error(response, 400, "invalid_request")["message"]


async def test_wrong_types_and_missing_fields_name_the_field(http: httpx.AsyncClient) -> None:
    cases = [
        ({"model": "tiny-chat", "messages": USER, "temperature": "hot"}, "temperature"),
        ({"model": "tiny-chat", "messages": USER, "temperature": 9}, "temperature"),
        ({"model": "tiny-chat", "messages": USER, "n": 17}, "n"),
        ({"model": "tiny-chat", "messages": USER, "n": 0}, "n"),
        ({"model": "tiny-chat"}, "messages"),
        ({"model": "tiny-chat", "messages": []}, "messages"),
        ({"messages": USER}, "model"),
        (
            {"model": "tiny-chat", "messages": [{"role": "robot", "content": "x"}]},
            "messages.0.role",
        ),
        (  # OpenAI's deprecated functions: refused, never silently ignored
            {"model": "tiny-chat", "messages": USER, "functions": [{"name": "f"}]},
            "functions",
        ),
        ({"model": "tiny-chat", "messages": USER, "function_call": "auto"}, "function_call"),
        (  # content may be a string or a list: the list's bad part is named
            {"model": "tiny-chat", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages.0.content.0.text",
        ),
    ]
    for body, param in cases:
        response = await http.post("/v1/chat/completions", json=body)
        error = _error(response, 400, "invalid_request")
        assert error["param"] == param, error
        assert error["type"] == "invalid_request_error"
        assert error["message"].startswith(param)


async def test_unknown_model_is_404(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await sdk.chat.completions.create(model="gpt-9", messages=USER)  # type: ignore[arg-type]
    assert caught.value.code == "model_not_found"


async def test_context_overflow(http: httpx.AsyncClient) -> None:
    long = {"model": "tiny-chat", "messages": [{"role": "user", "content": "x" * 400}]}
    for strict in ("false", "true"):  # a prompt that fills the context is refused either way
        answer = await http.post("/v1/chat/completions", json=long, headers={STRICT_HEADER: strict})
        error = _error(answer, 400, "context_length_exceeded")
        assert error["param"] == "messages" and "400" in error["message"]
    prompt = {"model": "tiny-chat", "prompt": "x" * 400}
    _error(await http.post("/v1/completions", json=prompt), 400, "context_length_exceeded")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_max_tokens_beyond_the_context_is_clamped_and_reported(
    http: httpx.AsyncClient, runtime: FakeRuntime, path: str, stream: bool
) -> None:
    served = runtime.models["tiny-chat"]
    # Over the context (400), within the neuron's max_tokens_limit (1000): clamped.
    body: dict[str, Any] = {"model": "tiny-chat", "max_tokens": 900, "stream": stream}
    if path == "/v1/chat/completions":
        body["messages"] = USER
        prompt_len = len(served.render_chat(USER, None))
    else:
        body["prompt"] = "Once upon a time"
        prompt_len = len("Once upon a time")
    room = 400 - prompt_len
    answer = await http.post(path, json=body)
    assert answer.status_code == 200, answer.text
    assert answer.headers[CLAMPED_HEADER] == f"900->{room}"
    assert served.last_params and served.last_params.max_tokens == room
    body["max_tokens"] = room  # what fits is left alone, and no header says otherwise
    assert CLAMPED_HEADER not in (await http.post(path, json=body)).headers


async def test_the_gateways_output_limit_clamps_max_tokens_too(
    http: httpx.AsyncClient, runtime: FakeRuntime
) -> None:
    """A seed catalogue's `limit.output` reaches the neuron as a header: a max_tokens over it is
    clamped to it and reported, or, strict, a 400 that names the limit."""
    served = runtime.models["tiny-chat"]
    body = {"model": "tiny-chat", "messages": USER, "max_tokens": 300}
    capped = await http.post("/v1/chat/completions", json=body, headers={OUTPUT_CAP_HEADER: "8"})
    assert capped.status_code == 200, capped.text
    assert capped.headers[CLAMPED_HEADER] == "300->8"
    assert served.last_params and served.last_params.max_tokens == 8
    strict = {OUTPUT_CAP_HEADER: "8", STRICT_HEADER: "true"}
    refused = await http.post("/v1/chat/completions", json=body, headers=strict)
    error = _error(refused, 400, "invalid_request")
    assert error["param"] == "max_tokens" and "8 output tokens" in error["message"]
    bad = await http.post("/v1/chat/completions", json=body, headers={OUTPUT_CAP_HEADER: "x"})
    _error(bad, 400, "invalid_request")


async def test_strict_max_tokens_is_a_400_from_gateway_model_or_neuron(
    runtime: FakeRuntime,
) -> None:
    over = {"model": "tiny-chat", "messages": USER, "max_tokens": 32000}

    async def status(config: NeuronConfig, headers: dict[str, str] | None = None) -> int:
        runtime.config = config
        transport = httpx.ASGITransport(app=create_app(runtime))  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://neuron") as client:
            answer = await client.post("/v1/chat/completions", json=over, headers=headers)
        if answer.status_code == 400:
            error = answer.json()["error"]
            assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
            assert "32000" in error["message"] and "400" in error["message"]
        return answer.status_code

    lenient, strict = _config(), _config(strict_max_tokens=True)
    assert await status(lenient) == 200
    assert await status(strict) == 400
    assert await status(strict, {STRICT_HEADER: "false"}) == 200  # the gateway's word wins
    assert await status(lenient, {STRICT_HEADER: "true"}) == 400
    runtime.models["tiny-chat"].strict_max_tokens = True  # the catalogue entry's, then
    assert await status(lenient) == 400
    assert await status(lenient, {STRICT_HEADER: "false"}) == 200


async def test_streamed_usage_reports_cached_prompt_tokens_from_the_first_chunk(
    http: httpx.AsyncClient, runtime: FakeRuntime
) -> None:
    runtime.models["tiny-chat"].cached_tokens = 5
    body = {
        "model": "tiny-chat",
        "messages": USER,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    answer = await http.post("/v1/chat/completions", json=body)
    chunks = [
        json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: {")
    ]
    cached = [c["usage"]["prompt_tokens_details"]["cached_tokens"] for c in chunks]
    assert cached == [5] * len(chunks)


async def test_absurd_max_tokens(http: httpx.AsyncClient, runtime: FakeRuntime) -> None:
    runtime.models["tiny-chat"].context_length = 100_000
    body = {"model": "tiny-chat", "messages": USER, "max_tokens": 1001}
    error = _error(await http.post("/v1/chat/completions", json=body), 400, "invalid_request")
    assert error["param"] == "max_tokens" and "1000" in error["message"]
    body["max_tokens"] = -1
    assert _error(await http.post("/v1/chat/completions", json=body), 400, "invalid_request")


async def test_oversized_bodies_are_413(http: httpx.AsyncClient) -> None:
    big = {"model": "tiny-chat", "messages": [{"role": "user", "content": "x" * 30_000}]}
    _error(await http.post("/v1/chat/completions", json=big), 413, "request_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while reading
        for _ in range(30):
            yield b" " * 1000

    response = await http.post(
        "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    _error(response, 413, "request_too_large")
    assert (
        await http.post("/v1/chat/completions", json={"model": "tiny-chat", "messages": USER})
    ).status_code == 200


async def test_overload_is_429_with_retry_after(
    http: httpx.AsyncClient, runtime: FakeRuntime
) -> None:
    runtime.models["tiny-chat"].refuse = overloaded()
    for stream in (False, True):
        body = {"model": "tiny-chat", "messages": USER, "stream": stream}
        response = await http.post("/v1/chat/completions", json=body)
        _error(response, 429, "overloaded")
        assert response.headers["retry-after"] == "3"


async def test_loading_model_is_503_with_retry_after(
    http: httpx.AsyncClient, runtime: FakeRuntime
) -> None:
    runtime.loading.add("later")
    response = await http.post("/v1/completions", json={"model": "later", "prompt": "x"})
    _error(response, 503, "neuron_unavailable")
    assert response.headers["retry-after"] == "2"


async def test_generation_error_mid_stream_is_an_error_event(
    http: httpx.AsyncClient, sdk: openai.AsyncOpenAI, runtime: FakeRuntime
) -> None:
    runtime.models["tiny-chat"].finish = "error"
    body = {"model": "tiny-chat", "messages": USER, "stream": True}
    events = _events(await http.post("/v1/chat/completions", json=body))
    assert "[DONE]" not in events and "boom" in events[-1]["error"]["message"]
    stream = await sdk.chat.completions.create(model="tiny-chat", messages=USER, stream=True)  # type: ignore[arg-type]
    with pytest.raises(openai.APIError, match="boom"):
        async for _ in stream:
            pass
    response = await http.post("/v1/chat/completions", json={**body, "stream": False})
    assert "boom" in _error(response, 500, "generation_failed")["message"]


async def test_a_stream_that_ends_badly_before_its_first_token_is_an_error_status(
    http: httpx.AsyncClient, runtime: FakeRuntime
) -> None:
    """Not a 200 and then an error event: the status is what the gateway retries on."""
    served = runtime.models["tiny-chat"]
    served.script, served.finish = [], "cancelled"  # as an unload's casualties end
    chat = {"model": "tiny-chat", "messages": USER, "stream": True}
    _error(await http.post("/v1/chat/completions", json=chat), 503, "generation_cancelled")
    completion = {"model": "tiny-chat", "prompt": "hi", "stream": True}
    _error(await http.post("/v1/completions", json=completion), 503, "generation_cancelled")
    served.finish = "error"
    _error(await http.post("/v1/chat/completions", json=chat), 500, "generation_failed")


async def test_unexpected_errors_are_500_and_the_app_keeps_serving(
    app: FastAPI, runtime: FakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Starlette re-raises after answering (so the server logs it); this client must not.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    http = httpx.AsyncClient(transport=transport, base_url="http://neuron")

    def explode(*_: object, **__: object) -> list[int]:
        raise RuntimeError("template blew up")

    served = runtime.models["tiny-chat"]
    monkeypatch.setattr(served, "render_chat", explode)
    body = {"model": "tiny-chat", "messages": USER}
    error = _error(await http.post("/v1/chat/completions", json=body), 500, "internal_error")
    assert error["type"] == "server_error" and "template blew up" in error["message"]
    monkeypatch.undo()
    assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
    await http.aclose()


async def test_unknown_route_and_method_in_openai_shape(http: httpx.AsyncClient) -> None:
    _error(await http.get("/v1/nothing"), 404, "not_found")
    _error(await http.get("/v1/chat/completions"), 405, "method_not_allowed")


# ---- metrics ---------------------------------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_exposition(http: httpx.AsyncClient, sdk: openai.AsyncOpenAI) -> None:
    await sdk.chat.completions.create(model="tiny-chat", messages=USER)  # type: ignore[arg-type]
    await http.post("/v1/chat/completions", json={"model": "gpt-9", "messages": USER})
    await sdk.embeddings.create(model="tiny-embed", input="abc")
    response = await http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    chat = (("model", "tiny-chat"),)
    assert samples[("cortex_neuron_generated_tokens_total", chat)] == 3
    assert samples[("cortex_neuron_prompt_tokens_total", chat)] > 0
    assert samples[("cortex_neuron_prompt_tokens_total", (("model", "tiny-embed"),))] == 5
    assert samples[("cortex_neuron_time_to_first_token_seconds_count", chat)] == 1
    ok = (("model", "tiny-chat"), ("route", "/v1/chat/completions"), ("status", "200"))
    missing = (("model", ""), ("route", "/v1/chat/completions"), ("status", "404"))
    assert samples[("cortex_neuron_requests_total", ok)] == 1
    assert samples[("cortex_neuron_requests_total", missing)] == 1
    assert samples[("cortex_neuron_in_flight", chat)] == 0
    assert samples[("cortex_neuron_device_memory_free_bytes", (("device", "cpu-0"),))] == 7000
    assert samples[("cortex_neuron_model_memory_bytes", chat)] == 1000


async def test_every_app_has_its_own_registry(runtime: FakeRuntime) -> None:
    first, second = create_app(runtime), create_app(runtime)  # type: ignore[arg-type]
    assert first.state.metrics.registry is not second.state.metrics.registry


# ---- disconnects, on a real server -----------------------------------------------------------


def _poll(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        time.sleep(0.02)


def test_disconnects_cancel_the_generation(runtime: FakeRuntime) -> None:
    served = runtime.models["tiny-chat"]
    served.script, served.token_delay = ["tok "] * 2000, 0.01
    app = create_app(runtime)  # type: ignore[arg-type]
    with serve(app) as url, httpx.Client(base_url=url) as http:
        body = {"model": "tiny-chat", "messages": USER, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        _poll(lambda: served.running == 0)
        assert served.cancelled == 1 and served.generated < 500

        # Non-stream: the client gives up waiting; the generation must not run to the end.
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={"model": "tiny-chat", "prompt": "x"}, timeout=0.3)
        _poll(lambda: served.running == 0)
        assert served.cancelled == 2 and served.generated < 1000
        assert http.get("/health").status_code == 200


def test_lifespan_starts_and_stops_the_runtime(runtime: FakeRuntime) -> None:
    with serve(create_app(runtime)):  # type: ignore[arg-type]
        assert runtime.started and not runtime.stopped
    assert runtime.stopped


async def test_tokenize_counts_the_rendered_chat_and_plain_prompts(
    http: httpx.AsyncClient, runtime: FakeRuntime
) -> None:
    served = runtime.served("tiny-chat")
    chat = await http.post("/tokenize", json={"model": "tiny-chat", "messages": USER})
    assert chat.status_code == 200, chat.text
    assert chat.json()["count"] == len(served.render_chat(USER, None))
    prefilled = [*USER, {"role": "assistant", "content": "Sure"}]
    body = {"model": "tiny-chat", "messages": prefilled, "continue_final_message": True}
    open_ended = await http.post("/tokenize", json=body)
    assert open_ended.json()["count"] == len(
        served.render_chat(prefilled, None, continue_final=True)
    )
    plain = await http.post("/tokenize", json={"model": "tiny-chat", "prompt": "one two three"})
    assert plain.json()["count"] == len(served.encode("one two three"))
    _error(await http.post("/tokenize", json={"model": "tiny-chat"}), 400, "invalid_request")
    _error(
        await http.post("/tokenize", json={"model": "nope", "prompt": "x"}), 404, "model_not_found"
    )


async def test_continuous_usage_stats_puts_usage_so_far_on_every_chunk(
    http: httpx.AsyncClient, runtime: FakeRuntime
) -> None:
    body = {"model": "tiny-chat", "messages": USER, "stream": True}
    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    *chunks, _usage_only, done = _events(await http.post("/v1/chat/completions", json=body))
    prompt = len(runtime.models["tiny-chat"].render_chat(USER, None))
    assert done == "[DONE]"
    assert [c["usage"]["prompt_tokens"] for c in chunks] == [prompt] * len(chunks)
    assert [c["usage"]["completion_tokens"] for c in chunks] == [0, 1, 2, 3, 3]
