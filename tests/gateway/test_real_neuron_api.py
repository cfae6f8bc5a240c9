"""The gateway against the real neuron HTTP API (cortex.neuron.server), over the neuron tests'
scripted runtime: the wire contract between the two, without a model."""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import anthropic
import httpx
import openai
import pytest
from fakes.neuron import running
from gateway_cluster import FAST, eventually

from cortex.core.config import GatewayConfig
from cortex.gateway.app import create_app
from cortex.neuron.server import create_app as create_neuron_app


def _fake_runtime() -> ModuleType:
    # The neuron tests' runtime stand-in (scripted tokens, no torch), loaded from its file.
    path = Path(__file__).parents[1] / "neuron" / "fake_runtime.py"
    spec = importlib.util.spec_from_file_location("neuron_fake_runtime", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fake_runtime = _fake_runtime()


@asynccontextmanager
async def gateway_over(runtime: Any) -> AsyncIterator[Any]:
    """A gateway routing to one real neuron app over `runtime`; yields the gateway's server."""
    async with running(create_neuron_app(runtime), lifespan="on") as neuron:
        config = GatewayConfig.model_validate(
            {"gateway": {"poll_interval": 0.05}, "neurons": [{"name": "n", "endpoint": neuron.url}]}
        )
        async with running(create_app(config, [], tuning=FAST), lifespan="on") as gateway:
            yield gateway


async def test_gateway_serves_through_the_real_neuron_api() -> None:
    runtime = fake_runtime.FakeRuntime()
    runtime.add(fake_runtime.FakeServed("tiny-chat"))
    async with gateway_over(runtime) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
        async with client:
            models = {m.id: m.model_dump() async for m in client.models.list()}
            assert models["tiny-chat"]["state"] == "loaded"
            assert models["tiny-chat"]["aliases"] == ["tiny"]  # from the neuron's catalogue
            assert models["tiny-embed"]["state"] == "available"

            answer = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}]
            )
            assert answer.choices[0].message.content == "Hello there!"
            stream = await client.chat.completions.create(
                model="tiny-chat",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == "Hello there!" and chunks[-1].usage is not None

            # A model the neuron lists but has not loaded is loaded on demand (no source).
            vectors = await client.embeddings.create(model="tiny-embed", input="abc")
            assert len(vectors.data[0].embedding) == 26

            # A generation failing mid-stream reaches the client as an error, not a hang.
            runtime.models["tiny-chat"].finish = "error"
            stream = await client.chat.completions.create(
                model="tiny-chat", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            with pytest.raises(openai.APIError):
                async for _ in stream:
                    pass


KEY = "sk-carol"
BUDGETED = {
    "enabled": True,
    "spend_db": ":memory:",
    "keys": [{"name": "carol", "key": KEY, "budget_tokens": 10**6}],
}


def _same_ids(stream: bytes) -> bytes:
    """A stream with its id and time made equal: all that may differ between two answers."""
    stream = re.sub(rb'"id":"[^"]*"', b'"id":"-"', stream)
    return re.sub(rb'"created":[0-9]+', b'"created":0', stream).replace(b": keep-alive\n\n", b"")


@pytest.mark.parametrize(
    "options",
    [
        None,
        {"include_usage": True},
        {"continuous_usage_stats": True},
        {"include_usage": True, "continuous_usage_stats": True},
    ],
)
async def test_a_stream_reads_as_the_neuron_writes_it_for_what_the_client_asked(
    options: dict[str, bool] | None,
) -> None:
    """The gateway asks the neuron for usage on every chunk whatever the client asked; the client
    still reads the stream the neuron would have sent it, byte for byte."""
    runtime = fake_runtime.FakeRuntime()
    runtime.add(fake_runtime.FakeServed("tiny-chat"))
    body: dict[str, Any] = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}
    body |= {"stream": True} | ({"stream_options": options} if options else {})
    async with running(create_neuron_app(runtime), lifespan="on") as neuron:
        config = GatewayConfig.model_validate(
            {"gateway": {"poll_interval": 0.05}, "neurons": [{"name": "n", "endpoint": neuron.url}]}
        )
        async with (
            running(create_app(config, [], tuning=FAST), lifespan="on") as gateway,
            httpx.AsyncClient() as http,
        ):
            for path in ("/v1/chat/completions", "/v1/completions"):
                asked = body if "chat" in path else {**body, "messages": None, "prompt": "hi"}
                asked = {k: v for k, v in asked.items() if v is not None}
                direct = await http.post(neuron.url + path, json=asked)
                relayed = await http.post(gateway.url + path, json=asked)
                assert relayed.status_code == direct.status_code == 200, relayed.text
                assert _same_ids(relayed.content) == _same_ids(direct.content)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
async def test_a_stream_cut_after_its_first_token_is_charged_its_prompt(path: str) -> None:
    """A client that reads the first token and leaves pays for the prompt the neuron read (5000
    tokens here, one per character: far over the body's estimate), as counted on the first
    chunk, not for the one token alone."""
    runtime = fake_runtime.FakeRuntime()
    script = ["Hello", *[" more"] * 200]
    runtime.add(
        fake_runtime.FakeServed("tiny-chat", context_length=20_000, script=script, token_delay=0.02)
    )
    prompt = "x" * 5000
    body: dict[str, Any] = (
        {"model": "tiny-chat", "messages": [{"role": "user", "content": prompt}], "max_tokens": 300}
        if path == "/v1/chat/completions"
        else {"model": "tiny-chat", "input": prompt, "max_output_tokens": 300}
    )
    async with running(create_neuron_app(runtime), lifespan="on") as neuron:
        config = GatewayConfig.model_validate(
            {
                "gateway": {"poll_interval": 0.05},
                "neurons": [{"name": "n", "endpoint": neuron.url}],
                "auth": BUDGETED,
            }
        )
        app = create_app(config, [], tuning=FAST)
        gw = app.state.gateway
        async with running(app, lifespan="on") as gateway, httpx.AsyncClient() as http:
            headers = {"authorization": f"Bearer {KEY}"}
            streamed = {**body, "stream": True}
            async with http.stream("POST", gateway.url + path, json=streamed, headers=headers) as r:
                seen = b""
                async for chunk in r.aiter_bytes():
                    seen += chunk
                    if b"Hello" in seen:
                        break
            await eventually(lambda: gw.ledger.reserved("carol") == 0)
            carol = gw.auth.authenticate(headers)
            assert 5000 <= gw.ledger.spent(carol, time.time()) < 5100


async def test_a_responses_client_reads_the_neurons_refusals_in_its_own_field_names() -> None:
    """The neuron names the chat request's fields (`messages.N...`, `max_tokens`); a Responses
    client reads the fields it sent: the input item (its index where items and messages match
    one to one, else just `input`), `instructions`, `max_output_tokens`."""
    runtime = fake_runtime.FakeRuntime()
    runtime.add(fake_runtime.FakeServed("tiny-chat"))
    image = {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}
    turns: list[Any] = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [{"type": "input_text", "text": "what is it?"}, image]},
    ]
    asked: list[tuple[dict[str, Any], str]] = [
        ({"instructions": "Be brief.", "input": turns}, "input.2.content.1"),
        ({"input": turns, "stream": True}, "input.2.content.1"),
        # A reasoning item makes no message: the items no longer match the messages.
        ({"input": [{"type": "reasoning", "summary": []}, *turns]}, "input"),
        ({"input": "word " * 400}, "input"),
        ({"input": "hi", "max_output_tokens": 40_000}, "max_output_tokens"),
    ]
    async with gateway_over(runtime) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
        async with client:
            for fields, param in asked:
                with pytest.raises(openai.BadRequestError) as refused:
                    await client.responses.create(model="tiny-chat", **fields)
                said = refused.value.body
                assert isinstance(said, dict), said
                assert said["param"] == param, (fields, said)
                assert "messages" not in said["message"] and "max_tokens" not in said["message"]


async def test_responses_truncation_auto_drops_nothing_and_says_so() -> None:
    """cortex drops no input items: an input that fits is answered as `truncation: "auto"` would
    answer it (and says `auto`); one that does not fit is a 400 naming `truncation`, not the
    neuron's plain overflow, which a client that asked for auto would not expect."""
    runtime = fake_runtime.FakeRuntime()
    runtime.add(fake_runtime.FakeServed("tiny-chat"))
    long_input = [{"role": "user", "content": "word " * 40} for _ in range(10)]
    async with gateway_over(runtime) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
        async with client:
            fits = await client.responses.create(model="tiny-chat", input="hi", truncation="auto")
            assert fits.truncation == "auto" and fits.output_text == "Hello there!"
            plain = await client.responses.create(model="tiny-chat", input="hi")
            assert plain.truncation == "disabled"
            for stream in (False, True):
                with pytest.raises(openai.BadRequestError) as refused:
                    await client.responses.create(
                        model="tiny-chat", input=long_input, truncation="auto", stream=stream
                    )
                said = refused.value.body
                assert isinstance(said, dict) and said["param"] == "truncation", said
                assert said["code"] == "context_length_exceeded", said
                assert "truncation 'auto' is not supported" in said["message"], said
            with pytest.raises(openai.BadRequestError) as refused:
                await client.responses.create(model="tiny-chat", input="hi", truncation="x")  # type: ignore[arg-type]
            said = refused.value.body
            assert isinstance(said, dict) and said["param"] == "truncation", said


async def test_min_p_reaches_the_engine_through_the_gateway_on_chat_and_completions() -> None:
    """vLLM's min_p is the neuron's to apply: the gateway passes it on from either route; out of
    [0, 1] the gateway refuses it itself, naming it."""
    runtime = fake_runtime.FakeRuntime()
    served = runtime.add(fake_runtime.FakeServed("tiny-chat"))
    async with gateway_over(runtime) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
        async with client:
            await client.chat.completions.create(
                model="tiny-chat",
                messages=[{"role": "user", "content": "hi"}],
                extra_body={"min_p": 0.1},
            )
            assert served.last_params.min_p == 0.1
            await client.completions.create(
                model="tiny-chat", prompt="hi", extra_body={"min_p": 0.2}
            )
            assert served.last_params.min_p == 0.2
            with pytest.raises(openai.BadRequestError) as refused:
                await client.completions.create(
                    model="tiny-chat", prompt="hi", extra_body={"min_p": 2}
                )
            assert refused.value.param == "min_p" and served.last_params.min_p == 0.2


async def test_what_would_change_the_answer_is_refused_what_clients_send_by_default_is_not() -> (
    None
):
    """Spoken output and web search cannot be made: a 400 naming the field, through the gateway
    as from the neuron. The fields the SDKs and agents send by default are served."""
    runtime = fake_runtime.FakeRuntime()
    runtime.add(fake_runtime.FakeServed("tiny-chat"))
    refused: list[tuple[dict[str, Any], str]] = [
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"web_search_options": {}}, "web_search_options"),
    ]
    harmless: dict[str, Any] = {
        "store": False,
        "metadata": {"a": "b"},
        "user": "u",
        "service_tier": "auto",
        "prompt_cache_key": "k",
        "safety_identifier": "s",
    }
    user = [{"role": "user", "content": "hi"}]
    async with running(create_neuron_app(runtime), lifespan="on") as neuron:
        config = GatewayConfig.model_validate(
            {"gateway": {"poll_interval": 0.05}, "neurons": [{"name": "n", "endpoint": neuron.url}]}
        )
        async with running(create_app(config, [], tuning=FAST), lifespan="on") as gateway:
            client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
            direct = openai.AsyncOpenAI(base_url=f"{neuron.url}/v1", api_key="x", max_retries=0)
            async with client, direct:
                for fields, param in refused:
                    for to in (client, direct):
                        with pytest.raises(openai.BadRequestError) as err:
                            await to.chat.completions.create(
                                model="tiny-chat", messages=user, extra_body=fields
                            )
                        said = err.value.body
                        assert isinstance(said, dict) and said["param"] == param, said
                served = await client.chat.completions.create(
                    model="tiny-chat",
                    messages=user,
                    modalities=["text"],
                    parallel_tool_calls=True,
                    prediction={"type": "content", "content": "Hello"},
                    reasoning_effort="low",
                    **harmless,
                )
                assert served.choices[0].message.content == "Hello there!"
                answered = await client.responses.create(
                    model="tiny-chat",
                    input="hi",
                    parallel_tool_calls=True,
                    include=["reasoning.encrypted_content"],
                    reasoning={"effort": "medium", "summary": "auto"},
                    **harmless,
                )
                assert answered.output_text == "Hello there!"


async def test_anthropic_max_tokens_0_is_refused_by_name() -> None:
    """The anthropic SDK documents max_tokens 0 as "fill the prompt cache, generate nothing";
    cortex does not serve it, and says so rather than calling 0 a wrong number."""
    runtime = fake_runtime.FakeRuntime()
    runtime.add(fake_runtime.FakeServed("tiny-chat"))
    async with gateway_over(runtime) as gateway:
        client = anthropic.AsyncAnthropic(base_url=gateway.url, api_key="x", max_retries=0)
        async with client:
            with pytest.raises(anthropic.BadRequestError) as refused:
                await client.messages.create(
                    model="tiny-chat",
                    max_tokens=0,
                    messages=[{"role": "user", "content": "hi"}],
                )
            said = refused.value.body
            assert isinstance(said, dict), said
            assert "max_tokens 0 (filling the prompt cache" in said["error"]["message"], said
            with pytest.raises(anthropic.BadRequestError):  # below 0 stays a wrong number
                await client.messages.create(
                    model="tiny-chat",
                    max_tokens=-1,
                    messages=[{"role": "user", "content": "hi"}],
                )


async def test_anthropic_refuses_an_empty_user_turn_and_a_prefill_ending_in_whitespace() -> None:
    """As Anthropic's API does, in its words: `content: ""` is no more a turn than `[]`, and a
    prefill ending in a space would be continued from a token the model rarely ends on."""
    runtime = fake_runtime.FakeRuntime()
    runtime.add(fake_runtime.FakeServed("tiny-chat"))
    asked: list[tuple[list[Any], str]] = [
        ([{"role": "user", "content": ""}], "messages.0: all messages must have non-empty"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, "}],
            "messages: final assistant content cannot end with trailing whitespace",
        ),
    ]
    async with gateway_over(runtime) as gateway:
        client = anthropic.AsyncAnthropic(base_url=gateway.url, api_key="x", max_retries=0)
        async with client:
            for messages, words in asked:
                with pytest.raises(anthropic.BadRequestError) as refused:
                    await client.messages.create(model="tiny-chat", max_tokens=8, messages=messages)
                said = refused.value.body
                assert isinstance(said, dict) and said["error"]["message"].startswith(words)
