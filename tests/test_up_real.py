"""`cortex up` end to end: the real CLI, the real model, driven by the official openai and anthropic SDKs."""

from __future__ import annotations

import os
import subprocess
import sys

import anthropic
import httpx
import openai
import pytest
from cortex_up import Up, unload_all
from prometheus_client.parser import text_string_to_metric_families

CHAT = "smollm2-135m-instruct"
WEATHER = {
    "name": "get_weather",
    "description": "Current weather of a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture(scope="module")
def gateway(shared_up: Up) -> str:
    """The session's `cortex up` (tests/conftest.py), with nothing loaded."""
    unload_all(shared_up.url)
    return shared_up.url


@pytest.fixture(scope="module")
def oai(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def claude(gateway: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway, api_key="unused", max_retries=0, timeout=300)


def test_catalogue_lists_the_defaults_before_anything_loads(oai: openai.OpenAI) -> None:
    ids = {m.id for m in oai.models.list().data}
    assert {CHAT, "all-minilm-l6-v2"} <= ids
    assert oai.models.retrieve("smollm2").id == CHAT  # alias


def test_openai_chat_loads_on_demand_then_streams(oai: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answer = oai.chat.completions.create(
        model=CHAT, messages=messages, max_tokens=12, temperature=0
    )  # type: ignore[arg-type]
    assert answer.choices[0].message.content and answer.usage and answer.usage.completion_tokens > 0
    chunks = list(
        oai.chat.completions.create(
            model=CHAT,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content
    assert chunks[-1].usage and chunks[-1].usage.prompt_tokens == answer.usage.prompt_tokens


def test_default_sampling_answers_sensibly(oai: openai.OpenAI) -> None:
    # No sampling parameters: the catalogue's defaults for the model (temperature 0.2, top_p 0.9)
    # apply, not 1.0, at which this small model's answers are gibberish. Seeded, so the check is
    # the same every run: unseeded, about one answer in three opens "L'Étoile (The City)..." and
    # a few of those name Paris only after 30 tokens.
    question = [{"role": "user", "content": "What is the capital of France?"}]

    def ask(seed: int, **sampling: float) -> str:
        answer = oai.chat.completions.create(
            model=CHAT,
            messages=question,  # type: ignore[arg-type]
            max_tokens=30,
            seed=seed,
            **sampling,  # type: ignore[arg-type]
        )
        return answer.choices[0].message.content or ""

    answers = [ask(seed) for seed in range(5)]
    assert sum("Paris" in answer for answer in answers) >= 4, answers
    # The same draws as a request that names the catalogue's sampling (a seed gives the same tokens).
    assert answers[:2] == [ask(seed, temperature=0.2, top_p=0.9) for seed in range(2)]


def test_openai_completions_and_embeddings(oai: openai.OpenAI) -> None:
    completion = oai.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=5)
    assert completion.choices[0].finish_reason in ("stop", "length") and completion.usage
    vectors = oai.embeddings.create(model="all-minilm-l6-v2", input=["a cat", "a kitten", "taxes"])
    assert len(vectors.data) == 3 and len(vectors.data[0].embedding) == 384


def test_anthropic_messages_stream_and_not(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=CHAT,
        max_tokens=16,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "Name a colour."}],
        metadata={"user_id": "test"},
        extra_body={"temperature": 0},
    )
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens") and message.usage.input_tokens > 0
    with claude.messages.stream(
        model=CHAT,
        max_tokens=16,
        messages=[{"role": "user", "content": "Name a colour."}],
        system="Be brief.",
        extra_body={"temperature": 0},
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert events[0].type == "message_start" and events[0].message.usage.input_tokens > 0
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == message.content[0].text and final.usage.output_tokens > 0


def test_logprobs_come_through_the_gateway(oai: openai.OpenAI) -> None:
    answer = oai.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    entries = answer.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == answer.choices[0].message.content
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)


def test_anthropic_prefill_is_continued(claude: anthropic.Anthropic) -> None:
    # A last assistant message is the start of the reply (Anthropic's prefill): the model goes on
    # from it rather than opening a turn of its own, which would count from 1 again.
    counting = [
        {"role": "user", "content": "Count from 1 to 10, separated by commas."},
        {"role": "assistant", "content": "1, 2, 3, 4,"},
    ]
    message = claude.messages.create(
        model=CHAT, max_tokens=8, messages=counting, extra_body={"temperature": 0}
    )
    assert message.content[0].text.startswith(" 5, 6")


def test_anthropic_count_tokens_uses_the_real_tokenizer(
    claude: anthropic.Anthropic, oai: openai.OpenAI
) -> None:
    messages = [{"role": "user", "content": "How many tokens is this?"}]
    counted = claude.messages.count_tokens(model=CHAT, messages=messages)  # type: ignore[arg-type]
    served = oai.chat.completions.create(model=CHAT, messages=messages, max_tokens=1)  # type: ignore[arg-type]
    assert served.usage and counted.input_tokens == served.usage.prompt_tokens
    with_tools = claude.messages.count_tokens(model=CHAT, messages=messages, tools=[WEATHER])  # type: ignore[arg-type,list-item]
    assert with_tools.input_tokens > counted.input_tokens


def test_anthropic_tool_round_trip_shape(claude: anthropic.Anthropic) -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                }
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C, sunny"}],
        },
    ]
    reply = claude.messages.create(
        model=CHAT,
        max_tokens=24,
        tools=[WEATHER],
        messages=history,  # type: ignore[arg-type]
        extra_body={"temperature": 0},
    )
    assert reply.role == "assistant" and reply.content
    assert reply.stop_reason in ("end_turn", "max_tokens", "tool_use")
    for block in reply.content:
        assert block.type in ("text", "tool_use")


def test_responses_api(oai: openai.OpenAI) -> None:
    response = oai.responses.create(model=CHAT, input="Say hi.", max_output_tokens=16)
    assert response.status in ("completed", "incomplete") and response.output_text
    events = [
        e.type
        for e in oai.responses.create(model=CHAT, input="Say hi.", max_output_tokens=8, stream=True)
    ]
    assert events[0] == "response.created" and events[-1] in (
        "response.completed",
        "response.incomplete",
    )
    assert "response.output_text.delta" in events


def test_bad_inputs_get_their_surface_error_shape(gateway: str) -> None:
    bad_json = httpx.post(f"{gateway}/v1/chat/completions", content=b"{nope", timeout=10)
    assert bad_json.status_code == 400 and "error" in bad_json.json()
    unknown = httpx.post(
        f"{gateway}/v1/messages",
        json={"model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
        timeout=10,
    )
    assert unknown.status_code == 404 and unknown.json()["type"] == "error"
    huge = httpx.post(
        f"{gateway}/v1/chat/completions",
        json={"model": CHAT, "messages": [{"role": "user", "content": "hi " * 20000}]},
        timeout=30,
    )
    assert huge.status_code == 400 and huge.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.get(f"{gateway}/health", timeout=5).json()["status"] == "ok"


def test_metrics_and_status_after_traffic(gateway: str) -> None:
    fleet = httpx.get(f"{gateway}/fleet", timeout=5).json()
    loaded = [r["id"] for n in fleet["neurons"] for r in n["replicas"] if r["state"] == "ready"]
    assert CHAT in loaded
    text = httpx.get(f"{gateway}/metrics", timeout=5).text
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"cortex_requests", "cortex_completion_tokens", "cortex_cold_starts"} <= names
    status = subprocess.run(
        [sys.executable, "-m", "cortex.cli", "status", "--endpoint", gateway],
        capture_output=True, text=True, timeout=30, check=True, env={**os.environ, "COLUMNS": "160"},
    )  # fmt: skip
    assert CHAT in status.stdout and "cpu-0" in status.stdout
