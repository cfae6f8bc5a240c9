"""The bad-input matrix of the gateway: every route, each bad request answered with the right status
in the route's own envelope (OpenAI's, Anthropic's on /v1/messages*), and a normal request served
right after it.

The gateway runs over the real neuron server (cortex.neuron.server) with the neuron tests'
scripted runtime, so the neuron's own validation is part of what is tested. JSON bodies go through
the official SDKs (openai, anthropic); bytes no SDK would send go through raw httpx.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import openai
import pytest
from fakes.neuron import running
from gateway_cluster import FAST, eventually
from test_real_neuron_api import fake_runtime

from cortex.core.config import GatewayConfig
from cortex.core.fleet import ModelState
from cortex.gateway.app import create_app
from cortex.neuron.server import create_app as create_neuron_app

pytestmark = pytest.mark.asyncio(loop_scope="module")  # the servers run on the fixture's loop

CHAT, EMBED = "tiny-chat", "tiny-embed"
USER = [{"role": "user", "content": "hi"}]
MiB = 2**20

VALID: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": CHAT, "messages": USER},
    "/v1/completions": {"model": CHAT, "prompt": "hi"},
    "/v1/embeddings": {"model": EMBED, "input": "hi"},
    "/v1/responses": {"model": CHAT, "input": "hi"},
    "/v1/messages": {"model": CHAT, "max_tokens": 8, "messages": USER},
    "/v1/messages/count_tokens": {"model": CHAT, "messages": USER},
}
# route -> (a required field, a field set to the wrong type, a boolean field)
FIELDS: dict[str, tuple[str, tuple[str, Any], str]] = {
    "/v1/chat/completions": ("messages", ("messages", "not a list"), "stream"),
    "/v1/completions": ("prompt", ("max_tokens", "lots"), "stream"),
    "/v1/embeddings": ("input", ("input", {"a": 1}), "encoding_format"),
    "/v1/responses": ("input", ("temperature", "hot"), "stream"),
    "/v1/messages": ("max_tokens", ("max_tokens", "many"), "stream"),
    "/v1/messages/count_tokens": ("messages", ("messages", 3), "tool_choice"),
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
IMAGE_URL = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
ANTHROPIC_IMAGE = {
    "type": "image",
    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
}
ANTHROPIC_TOOL = {"name": "get_weather", "input_schema": {"type": "object"}}


def _deep(depth: int) -> bytes:
    return b'{"model": "x", "messages": ' + b"[" * depth + b"]" * depth + b"}"


def _with(route: str, **fields: Any) -> dict[str, Any]:
    return {**VALID[route], **fields}


def _user(content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


@dataclass(frozen=True)
class Case:
    """One bad request: JSON (sent through the route's SDK) or raw bytes (through httpx)."""

    name: str
    route: str
    status: int
    json: dict[str, Any] | None = None
    raw: bytes | None = None
    method: str = "POST"
    says: str = ""  # a word the error message must contain

    @property
    def anthropic(self) -> bool:
        return self.route.startswith("/v1/messages")


def _common(route: str) -> list[Case]:
    """What every POST route must refuse the same way."""
    required, (field, wrong), boolean = FIELDS[route]
    body = VALID[route]
    raw = json.dumps(body).encode()
    missing = {k: v for k, v in body.items() if k != required}
    strict_bool = (
        {"stream": "yes"}
        if boolean == "stream"
        else {"encoding_format": "hex"}
        if boolean == "encoding_format"
        else {"tool_choice": {"type": "tool", "name": "get_weather"}}
    )
    return [
        Case("malformed-json", route, 400, raw=b'{"model": ', says="JSON"),
        Case("empty-body", route, 400, raw=b"", says="empty"),
        Case("invalid-utf8", route, 400, raw=raw[:-1] + b' "x": "\xff\xfe"}', says="UTF-8"),
        Case("raw-surrogate-bytes", route, 400, raw=raw[:-1] + b' "x": "\xed\xa0\x80"}'),
        Case("json-array", route, 400, raw=b"[" + raw + b"]", says="object"),
        Case("nested-1000-deep", route, 400, raw=_deep(1000), says="nested"),
        Case("nested-100000-deep", route, 400, raw=_deep(100_000), says="nested"),
        Case("lone-surrogate", route, 400, raw=_surrogate(body), says="surrogate"),
        Case("raw-nul-byte", route, 400, raw=raw[:-1] + b', "x": "a\x00b"}', says="JSON"),
        Case("missing-model", route, 400, json={k: v for k, v in body.items() if k != "model"}),
        Case("unknown-model", route, 404, json={**body, "model": "no-such-model"}, says="no-such"),
        Case("wrong-type", route, 400, json={**body, field: wrong}, says=field),
        Case("missing-field", route, 400, json=missing, says=required),
        Case("body-20MiB", route, 413, json={**body, "padding": "x" * (20 * MiB)}),
        Case("strict-value", route, 400, json={**body, **strict_bool}),
    ]


def _surrogate(body: dict[str, Any]) -> bytes:
    """The body with `"x\\ud800y"` (a lone surrogate, as a JSON escape) in its text."""
    raw = json.dumps(body)
    text = '"hi"' if '"hi"' in raw else None
    assert text is not None
    return raw.replace(text, '"x\\ud800y"', 1).encode()


CHAT_ROUTE, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
RESPONSES, MESSAGES, COUNT = "/v1/responses", "/v1/messages", "/v1/messages/count_tokens"

SPECIFIC = [
    # OpenAI chat: sampling ranges, tools, content parts, sizes
    Case("temperature-3", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, temperature=3)),
    Case("top-p-0", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, top_p=0)),
    Case("top-k-negative", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, top_k=-1)),
    Case("min-p-above-1", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, min_p=1.01), says="min_p"),
    Case("min-p-negative", COMPLETIONS, 400, json=_with(COMPLETIONS, min_p=-1), says="min_p"),
    Case("n-17", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, n=17), says="n"),
    Case("n-0", COMPLETIONS, 400, json=_with(COMPLETIONS, n=0), says="n"),
    Case("max-tokens-0", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, max_tokens=0)),
    Case("max-tokens-huge", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, max_tokens=10**9)),
    Case("role-unknown", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, messages=[{"role": "robot"}])),
    Case("messages-empty", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, messages=[])),
    Case(
        "stream-options-yes",
        CHAT_ROUTE,
        400,
        json=_with(CHAT_ROUTE, stream=True, stream_options={"include_usage": "yes"}),
    ),
    Case(
        "tool-choice-unknown-tool",
        CHAT_ROUTE,
        400,
        json=_with(
            CHAT_ROUTE,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "launch_rockets"}},
        ),
        says="launch_rockets",
    ),
    Case(
        "tool-choice-required-no-tools",
        CHAT_ROUTE,
        400,
        json=_with(CHAT_ROUTE, tool_choice="required"),
    ),
    Case("tool-choice-nonsense", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, tool_choice="maybe")),
    Case(
        "image-part",
        CHAT_ROUTE,
        400,
        json=_with(CHAT_ROUTE, messages=_user([{"type": "text", "text": "what?"}, IMAGE_URL])),
        says="image",
    ),
    Case(
        "audio-part",
        CHAT_ROUTE,
        400,
        json=_with(CHAT_ROUTE, messages=_user([{"type": "input_audio", "input_audio": {}}])),
        says="input_audio",
    ),
    Case(
        "text-part-without-text",
        CHAT_ROUTE,
        400,
        json=_with(CHAT_ROUTE, messages=_user([{"type": "text"}])),
    ),
    Case(
        "prompt-7MB",
        CHAT_ROUTE,
        400,
        json=_with(CHAT_ROUTE, messages=_user("x" * 7_000_000)),
        says="context",
    ),
    # OpenAI completions
    Case("token-id-negative", COMPLETIONS, 400, json=_with(COMPLETIONS, prompt=[-1])),
    Case("prompts-several", COMPLETIONS, 400, json=_with(COMPLETIONS, prompt=["a", "b"])),
    Case("suffix", COMPLETIONS, 400, json=_with(COMPLETIONS, suffix="end"), says="suffix"),
    Case("best-of-2", COMPLETIONS, 400, json=_with(COMPLETIONS, best_of=2), says="best_of"),
    Case(
        "logprobs-of-the-prompt",
        COMPLETIONS,
        400,
        json=_with(COMPLETIONS, logprobs=0, echo=True),
        says="echo",
    ),
    Case("logprobs-6", COMPLETIONS, 400, json=_with(COMPLETIONS, logprobs=6)),
    Case("echo-yes", COMPLETIONS, 400, json=_with(COMPLETIONS, echo="yes")),
    Case("temperature-negative", COMPLETIONS, 400, json=_with(COMPLETIONS, temperature=-1)),
    Case("prompt-empty", COMPLETIONS, 400, json=_with(COMPLETIONS, prompt="")),
    Case("prompt-7MB", COMPLETIONS, 400, json=_with(COMPLETIONS, prompt="x" * 7_000_000)),
    # OpenAI embeddings
    Case("input-empty-string", EMBEDDINGS, 400, json=_with(EMBEDDINGS, input="")),
    Case("input-empty-list", EMBEDDINGS, 400, json=_with(EMBEDDINGS, input=[])),
    Case("input-token-ids", EMBEDDINGS, 400, json=_with(EMBEDDINGS, input=[1, 2, 3])),
    Case("chat-model", EMBEDDINGS, 400, json=_with(EMBEDDINGS, model=CHAT), says="chat"),
    Case("embedding-model-for-chat", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, model=EMBED)),
    # OpenAI Responses
    Case(
        "previous-response-id",
        RESPONSES,
        400,
        json=_with(RESPONSES, previous_response_id="resp_1"),
        says="previous_response_id",
    ),
    Case("temperature-5", RESPONSES, 400, json=_with(RESPONSES, temperature=5)),
    Case("top-logprobs", RESPONSES, 400, json=_with(RESPONSES, top_logprobs=2), says="logprobs"),
    Case(
        "include-logprobs",
        RESPONSES,
        400,
        json=_with(RESPONSES, include=["message.output_text.logprobs"]),
        says="logprobs",
    ),
    # Asked for and not given: refused, never silently dropped (chat).
    Case(
        "logprobs-with-tools",
        CHAT_ROUTE,
        400,
        json=_with(CHAT_ROUTE, logprobs=True, tools=[WEATHER]),
        says="tools",
    ),
    Case(
        "top-logprobs-alone",
        CHAT_ROUTE,
        400,
        json=_with(CHAT_ROUTE, top_logprobs=1),
        says="needs logprobs",
    ),
    Case(
        "top-logprobs-21", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, logprobs=True, top_logprobs=21)
    ),
    Case("logit-bias-101", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, logit_bias={"5": 101})),
    Case("logit-bias-word", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, logit_bias={"a": 1})),
    Case(
        "logit-bias-beyond-vocab",
        CHAT_ROUTE,
        400,
        json=_with(CHAT_ROUTE, logit_bias={str(2**40): 1}),
        says="logit_bias",
    ),
    Case("frequency-penalty-3", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, frequency_penalty=3)),
    Case(
        "continue-a-user-message",
        CHAT_ROUTE,
        400,
        json=_with(CHAT_ROUTE, continue_final_message=True),
        says="continue_final_message",
    ),
    Case(
        "continue-under-a-schema",
        CHAT_ROUTE,
        400,
        json=_with(
            CHAT_ROUTE,
            messages=[*USER, {"role": "assistant", "content": '{"a":'}],
            continue_final_message=True,
            response_format={"type": "json_object"},
        ),
        says="structured output",
    ),
    Case(
        "continue-and-open-a-turn",
        CHAT_ROUTE,
        400,
        json=_with(
            CHAT_ROUTE,
            messages=[*USER, {"role": "assistant", "content": "Hel"}],
            continue_final_message=True,
            add_generation_prompt=True,
        ),
        says="cannot both",
    ),
    Case("max-output-tokens-0", RESPONSES, 400, json=_with(RESPONSES, max_output_tokens=0)),
    Case(
        "tool-choice-unknown-tool",
        RESPONSES,
        400,
        json=_with(
            RESPONSES,
            tools=[{"type": "function", "name": "get_weather", "parameters": {}}],
            tool_choice={"type": "function", "name": "launch_rockets"},
        ),
        says="launch_rockets",
    ),
    Case(
        "input-image",
        RESPONSES,
        400,
        json=_with(
            RESPONSES,
            input=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "what?"},
                        {"type": "input_image", "image_url": IMAGE_URL["image_url"]["url"]},
                    ],
                }
            ],
        ),
        says="image",
    ),
    Case(
        "input-file",
        RESPONSES,
        400,
        json=_with(
            RESPONSES,
            input=[{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}],
        ),
        says="input_file",
    ),
    Case("store-yes", RESPONSES, 400, json=_with(RESPONSES, store="yes")),
    # Anthropic messages
    Case("temperature-1.5", MESSAGES, 400, json=_with(MESSAGES, temperature=1.5)),
    Case("max-tokens-0", MESSAGES, 400, json=_with(MESSAGES, max_tokens=0)),
    Case("messages-empty", MESSAGES, 400, json=_with(MESSAGES, messages=[])),
    Case(
        "role-tool",  # system is Claude Code's mid-conversation instruction; tool is nobody's
        MESSAGES,
        400,
        json=_with(MESSAGES, messages=[{"role": "tool", "content": "x"}]),
    ),
    Case(
        "tool-choice-unknown-tool",
        MESSAGES,
        400,
        json=_with(
            MESSAGES, tools=[ANTHROPIC_TOOL], tool_choice={"type": "tool", "name": "launch"}
        ),
        says="launch",
    ),
    Case(
        "image-block",
        MESSAGES,
        400,
        json=_with(MESSAGES, messages=_user([{"type": "text", "text": "what?"}, ANTHROPIC_IMAGE])),
        says="image",
    ),
    Case(
        "image-file-source",
        MESSAGES,
        400,
        json=_with(
            MESSAGES,
            messages=_user([{"type": "image", "source": {"type": "file", "file_id": "f"}}]),
        ),
        says="file",
    ),
    Case(
        "document-block",
        MESSAGES,
        400,
        json=_with(
            MESSAGES,
            messages=_user([{"type": "document", "source": {"type": "text", "data": "d"}}]),
        ),
        says="document",
    ),
    Case(
        "image-in-tool-result",
        MESSAGES,
        400,
        json=_with(
            MESSAGES,
            tools=[ANTHROPIC_TOOL],
            messages=[
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "get_weather"}],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "t1", "content": [ANTHROPIC_IMAGE]}
                    ],
                },
            ],
        ),
        says="tool_result",
    ),
    Case("stop-sequences-string", MESSAGES, 400, json=_with(MESSAGES, stop_sequences="END")),
    Case(
        "prefill-with-a-forced-tool",
        MESSAGES,
        400,
        json=_with(
            MESSAGES,
            messages=[*USER, {"role": "assistant", "content": "Let me"}],
            tools=[ANTHROPIC_TOOL],
            tool_choice={"type": "any"},
        ),
        says="prefilled",
    ),
    Case("prompt-7MB", MESSAGES, 400, json=_with(MESSAGES, messages=_user("x" * 7_000_000))),
    # Anthropic count_tokens
    Case(
        "tool-choice-unknown-tool",
        COUNT,
        400,
        json=_with(COUNT, tools=[ANTHROPIC_TOOL], tool_choice={"type": "tool", "name": "launch"}),
        says="launch",
    ),
    Case("image-block", COUNT, 400, json=_with(COUNT, messages=_user([ANTHROPIC_IMAGE]))),
    # Framework answers, in the surface's envelope
    Case("unknown-model-id", "/v1/models/no-such-model", 404, method="GET", says="no-such"),
    Case("unknown-path", "/v1/nothing-here", 404, method="GET"),
    Case("get-on-post-route", CHAT_ROUTE, 405, method="GET"),
    Case("get-on-messages", MESSAGES, 405, method="GET"),
    Case("put-on-count-tokens", COUNT, 405, method="PUT"),
]
CASES = [case for route in VALID for case in _common(route)] + SPECIFIC


@dataclass
class Gateway:
    url: str
    http: httpx.AsyncClient
    openai: openai.AsyncOpenAI
    anthropic: anthropic.AsyncAnthropic


@pytest.fixture(scope="module")
async def gateway() -> AsyncIterator[Gateway]:
    runtime = fake_runtime.FakeRuntime()
    runtime.add(fake_runtime.FakeServed(CHAT))
    runtime.add(fake_runtime.FakeServed(EMBED, kind="embedding"))
    async with AsyncExitStack() as stack:
        neuron = await stack.enter_async_context(running(create_neuron_app(runtime), lifespan="on"))
        config = GatewayConfig.model_validate(
            {"gateway": {"poll_interval": 0.05}, "neurons": [{"name": "n", "endpoint": neuron.url}]}
        )
        app = create_app(config, [], tuning=FAST)
        live = await stack.enter_async_context(running(app, lifespan="on"))
        await eventually(lambda: app.state.gateway.fleet.polled(CHAT, ModelState.READY) == ["n"])
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=live.url, timeout=60))
        oai = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0)
        ant = anthropic.AsyncAnthropic(base_url=live.url, api_key="x", max_retries=0)
        stack.push_async_callback(oai.close)
        stack.push_async_callback(ant.close)
        yield Gateway(live.url, http, oai, ant)


async def _send(gateway: Gateway, case: Case) -> httpx.Response:
    """The case's request: JSON through the route's SDK, anything else through httpx."""
    if case.json is None or case.method != "POST":
        headers = {"content-type": "application/json"}
        return await gateway.http.request(
            case.method, case.route, content=case.raw, headers=headers
        )
    try:
        if case.anthropic:
            return await gateway.anthropic.post(case.route, cast_to=httpx.Response, body=case.json)
        path = case.route.removeprefix("/v1")
        return await gateway.openai.post(path, cast_to=httpx.Response, body=case.json)
    except (openai.APIStatusError, anthropic.APIStatusError) as refused:
        return refused.response


def _envelope(case: Case, response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    if case.anthropic:
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        assert body["error"]["type"] != "api_error", body  # a typed error, not a crash
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["type"] != "server_error", body
    error: dict[str, Any] = body["error"]
    return error


async def _serves_normally(gateway: Gateway, anthropic_route: bool) -> None:
    assert (await gateway.http.get("/health")).json()["status"] == "ok"
    if anthropic_route:
        message = await gateway.anthropic.messages.create(model=CHAT, max_tokens=8, messages=USER)
        assert message.content[0].text == "Hello there!"  # type: ignore[union-attr]
    else:
        answer = await gateway.openai.chat.completions.create(model=CHAT, messages=USER)  # type: ignore[arg-type]
        assert answer.choices[0].message.content == "Hello there!"


async def test_the_matrix_is_wide() -> None:
    assert len(CASES) >= 80
    assert len({(c.route, c.name) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.route}:{c.name}")
async def test_bad_input(gateway: Gateway, case: Case) -> None:
    response = await _send(gateway, case)
    assert response.status_code == case.status, response.text[:500]
    error = _envelope(case, response)
    assert case.says.lower() in error["message"].lower(), error
    await _serves_normally(gateway, case.anthropic)


async def test_nul_characters_in_text_are_served(gateway: Gateway) -> None:
    """An escaped NUL is a valid character: carried to the model, not an error."""
    answer = await gateway.openai.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "a\u0000b"}],
    )
    assert answer.choices[0].message.content == "Hello there!"
    message = await gateway.anthropic.messages.create(
        model=CHAT, max_tokens=8, messages=[{"role": "user", "content": "a\u0000b"}]
    )
    assert message.stop_reason == "end_turn"


@pytest.mark.parametrize("route", [CHAT_ROUTE, COMPLETIONS, RESPONSES])
async def test_stream_null_is_no_stream(gateway: Gateway, route: str) -> None:
    """OpenAI's `stream` is boolean or null: null is the default, one JSON answer."""
    response = await gateway.http.post(route, json=_with(route, stream=None))
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    assert "Hello there!" in response.text


async def test_sdk_typed_calls_get_their_error_classes(gateway: Gateway) -> None:
    """The typed SDK methods see the same refusals as their own exception classes."""
    with pytest.raises(openai.BadRequestError) as chat:
        await gateway.openai.chat.completions.create(
            model=CHAT,
            messages=USER,  # type: ignore[arg-type]
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "launch_rockets"}},
        )
    assert chat.value.body["param"] == "tool_choice"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        await gateway.openai.models.retrieve("no-such-model")
    with pytest.raises(openai.BadRequestError):
        await gateway.openai.responses.create(model=CHAT, input="hi", temperature=5)
    with pytest.raises(anthropic.BadRequestError) as messages:
        await gateway.anthropic.messages.create(
            model=CHAT,
            max_tokens=8,
            messages=[{"role": "user", "content": [ANTHROPIC_IMAGE]}],  # type: ignore[list-item]
        )
    assert "image" in messages.value.message
    with pytest.raises(anthropic.BadRequestError):
        await gateway.anthropic.messages.count_tokens(
            model=CHAT,
            messages=USER,  # type: ignore[arg-type]
            tools=[ANTHROPIC_TOOL],  # type: ignore[list-item]
            tool_choice={"type": "tool", "name": "launch"},
        )
