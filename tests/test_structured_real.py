"""Structured outputs and forced tool calls end to end: `cortex up` with the real default model,
driven by the official openai and anthropic SDKs (docs/architecture.md, "Structured outputs")."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest
from cortex_up import Up, unload_all

# Loading the model and ~25 generations take minutes on 2 shared cores.
pytestmark = pytest.mark.timeout(1800)
CHAT = "smollm2-135m-instruct"
# An object with a string enum, a bounded integer and a required array of objects. Lengths are
# bounded so that max_tokens always suffices, whatever the sampling (temperature 1.0).
ORDER = {
    "type": "object",
    "properties": {
        "size": {"type": "string", "enum": ["small", "medium", "large"]},
        "quantity": {"type": "integer", "minimum": 1, "maximum": 12},
        "toppings": {
            "type": "array",
            "minItems": 1,
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 8},
                    "extra": {"type": "boolean"},
                },
                "required": ["name", "extra"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["size", "quantity", "toppings"],
    "additionalProperties": False,
}
ORDER_FORMAT = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER}}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 20}},
    "additionalProperties": False,
}
OPENAI_TOOLS: Any = [
    {"type": "function", "function": {"name": n, "description": d, "parameters": p}}
    for n, d, p in (("get_weather", "Weather of a city", WEATHER), ("get_time", "Time now", TIME))
]
ANTHROPIC_TOOLS: Any = [
    {"name": t["function"]["name"], "description": t["function"]["description"]}
    | {"input_schema": t["function"]["parameters"]}
    for t in OPENAI_TOOLS
]
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]


@pytest.fixture(scope="module")
def gateway(shared_up: Up) -> str:
    """The session's `cortex up` (tests/conftest.py), with nothing loaded; then the model loads
    on a first request here, not inside a test's timed requests."""
    unload_all(shared_up.url)
    body = {"model": CHAT, "prompt": "Hi", "max_tokens": 1}
    httpx.post(f"{shared_up.url}/v1/completions", json=body, timeout=600).raise_for_status()
    return shared_up.url


@pytest.fixture(scope="module")
def oai(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=900)


@pytest.fixture(scope="module")
def claude(gateway: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway, api_key="unused", max_retries=0, timeout=900)


def _order(oai: openai.OpenAI, seed: int) -> str:
    answer = oai.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "Order a pizza for me, as JSON."}],
        response_format=ORDER_FORMAT,  # type: ignore[arg-type]
        temperature=1.0,
        seed=seed,
        max_tokens=90,
    )
    return answer.choices[0].message.content or ""


def test_json_schema_output_validates_every_time_at_temperature_one(oai: openai.OpenAI) -> None:
    with ThreadPoolExecutor(10) as pool:  # concurrent: the ten share forward passes
        outputs = list(pool.map(lambda seed: _order(oai, seed), range(10)))
    for output in outputs:
        jsonschema.validate(json.loads(output), ORDER)
    assert len(set(outputs)) > 1, "sampling at temperature 1.0 should vary the orders"


def test_tools_beside_a_format_give_a_call_or_the_answer_never_free_text(
    oai: openai.OpenAI,
) -> None:
    """An agent with tools and a typed answer: each output is a valid call or a valid answer."""
    for seed in range(4):
        answer = oai.chat.completions.create(
            model=CHAT,
            messages=ASK,  # type: ignore[arg-type]
            tools=OPENAI_TOOLS,
            response_format=ORDER_FORMAT,  # type: ignore[arg-type]
            temperature=1.0,
            seed=seed,
            max_tokens=90,
        )
        choice = answer.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            call = choice.message.tool_calls[0]
            schema = WEATHER if call.function.name == "get_weather" else TIME
            jsonschema.validate(json.loads(call.function.arguments), schema)
        else:  # which of the two a small model picks is its own; either is well formed
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content or ""), ORDER)


def test_openai_named_tool_choice_stream_and_not(oai: openai.OpenAI) -> None:
    forced = {"type": "function", "function": {"name": "get_time"}}
    answer = oai.chat.completions.create(
        model=CHAT, messages=ASK, tools=OPENAI_TOOLS, tool_choice=forced, max_tokens=60
    )  # type: ignore[arg-type]
    # Parallel calls allowed, a named function is still one call, with valid arguments.
    (call,) = answer.choices[0].message.tool_calls or []
    assert answer.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), TIME)
    with oai.beta.chat.completions.stream(
        model=CHAT,
        messages=ASK,  # type: ignore[arg-type]
        tools=OPENAI_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        max_tokens=60,
    ) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_anthropic_named_tool_choice_stream_and_not(claude: anthropic.Anthropic) -> None:
    # Greedy, so the test does not depend on how a sampled run spends its max_tokens.
    kwargs: Any = {
        "model": CHAT,
        "max_tokens": 90,
        "extra_body": {"temperature": 0},  # this SDK's create() has no temperature argument
        "messages": ASK,
        "tools": ANTHROPIC_TOOLS,
    }
    message = claude.messages.create(**kwargs, tool_choice={"type": "tool", "name": "get_time"})
    (use,) = [b for b in message.content if b.type == "tool_use"]
    assert message.stop_reason == "tool_use" and use.name == "get_time"
    jsonschema.validate(use.input, TIME)
    choice = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    with claude.messages.stream(**kwargs, tool_choice=choice) as stream:
        final = stream.get_final_message()
    (use,) = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and use.name == "get_weather"
    jsonschema.validate(use.input, WEATHER)


def test_required_and_any_yield_a_tool_call(
    oai: openai.OpenAI, claude: anthropic.Anthropic
) -> None:
    hello = [{"role": "user", "content": "Hello! How are you?"}]
    # Greedy: with parallel calls allowed, a sampled run may list calls past max_tokens.
    answer = oai.chat.completions.create(
        model=CHAT,
        messages=hello,  # type: ignore[arg-type]
        tools=OPENAI_TOOLS,
        tool_choice="required",
        max_tokens=60,
        temperature=0,
    )
    calls = answer.choices[0].message.tool_calls or []
    assert calls and all(c.function.name in ("get_weather", "get_time") for c in calls)
    message = claude.messages.create(
        model=CHAT,
        max_tokens=90,
        extra_body={"temperature": 0},
        messages=hello,
        tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )  # type: ignore[arg-type]
    assert any(b.type == "tool_use" for b in message.content) and message.stop_reason == "tool_use"


def test_a_forced_call_cut_by_max_tokens_keeps_its_start_in_every_dialect(
    oai: openai.OpenAI, claude: anthropic.Anthropic
) -> None:
    """The README's forced call at a max_tokens too small for it: the call comes back with its
    name and the arguments so far, as a call cut by the limit (docs/architecture.md)."""
    weather = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    # 20 tokens reach into the arguments (the whole call is about 30)
    ask: Any = {"model": CHAT, "max_tokens": 20, "messages": ASK}
    # greedy, so the call's length does not vary from run to run (this SDK takes no temperature)
    forced: Any = {"extra_body": {"temperature": 0}}
    forced["tools"] = [{"name": "get_weather", "input_schema": weather}]
    forced["tool_choice"] = {"type": "tool", "name": "get_weather"}
    call = claude.messages.create(**ask, **forced)
    assert call.stop_reason == "max_tokens"
    [block] = call.content
    assert block.type == "tool_use" and block.name == "get_weather"
    # arguments that are not yet JSON travel as their text (translate/anthropic.py)
    assert list(block.input) == ["_raw"] and block.input["_raw"].startswith("{")  # type: ignore[index]
    with claude.messages.stream(**ask, **forced) as stream:
        streamed = stream.get_final_message()
    assert [b.type for b in streamed.content] == ["tool_use"]
    assert streamed.stop_reason == "max_tokens"
    tool: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": weather}}]
    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    chat = oai.chat.completions.create(**ask, tools=tool, tool_choice=named, temperature=0)
    [cut] = chat.choices[0].message.tool_calls or []
    assert chat.choices[0].finish_reason == "length" and cut.function.name == "get_weather"  # type: ignore[union-attr]
    assert cut.function.arguments.startswith("{")  # type: ignore[union-attr]
    reply = oai.responses.create(
        model=CHAT,
        max_output_tokens=20,
        temperature=0,
        input=ASK[0]["content"],
        tools=[{"type": "function", "name": "get_weather", "parameters": weather, "strict": False}],
        tool_choice={"type": "function", "name": "get_weather"},
    )
    assert reply.status == "incomplete"
    assert [(i.type, getattr(i, "name", None)) for i in reply.output] == [
        ("function_call", "get_weather")
    ]


def _story(oai: openai.OpenAI) -> str:
    chunks = oai.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "Tell me a short story about a cat."}],
        temperature=0,
        max_tokens=40,
        stream=True,
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_a_free_stream_beside_a_constrained_one_is_unaffected(oai: openai.OpenAI) -> None:
    alone = _story(oai)
    with ThreadPoolExecutor(2) as pool:
        constrained = pool.submit(_order, oai, 7)
        free = pool.submit(_story, oai)
        beside, order = free.result(), constrained.result()
    jsonschema.validate(json.loads(order), ORDER)
    assert beside == alone and alone


def test_schemas_that_cannot_be_enforced_are_refused(
    oai: openai.OpenAI, claude: anthropic.Anthropic
) -> None:
    broken = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}
    with pytest.raises(openai.BadRequestError) as invalid:
        oai.chat.completions.create(model=CHAT, messages=ASK, response_format=broken, max_tokens=5)  # type: ignore[arg-type]
    assert "strin" in str(invalid.value)
    unsupported = {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}
    tool = [{"name": "f", "input_schema": unsupported}]
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(
            model=CHAT, max_tokens=5, messages=ASK, tools=tool, tool_choice={"type": "any"}
        )  # type: ignore[arg-type]
    assert '"if"' in str(refused.value)
