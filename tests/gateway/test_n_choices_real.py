"""OpenAI's `n` (several choices for one prompt) through the gateway to a real neuron.

The neuron is the real server and runtime with a tiny random-weight Llama (real loaders, real
engine), asked through the official `openai` SDK. Random weights reach end of sequence early, so
lengths are held with `ignore_eos`.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fakes.neuron import running
from gateway_cluster import FAST, eventually

from cortex.core.catalogue import ModelSpec
from cortex.core.config import GatewayConfig, NeuronConfig
from cortex.gateway.app import create_app
from cortex.neuron.runtime import NeuronRuntime
from cortex.neuron.server import create_app as create_neuron_app

sys.path.insert(0, str(Path(__file__).parents[1] / "neuron"))
from tiny_models import make_tiny_llama

pytestmark = pytest.mark.asyncio(loop_scope="module")  # the servers run on the fixture's loop

MODEL = "tiny"
MAX_RUNNING = 4  # the neuron's slots: a request of more choices can never run there
USER = [{"role": "user", "content": "Tell me about the sea."}]
LONG = {"ignore_eos": True}


@dataclass
class Served:
    client: openai.AsyncOpenAI
    runtime: NeuronRuntime


@pytest.fixture(scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    tiny = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny")
    source = f"file:{tiny}"
    section = {
        "name": "n1",
        "cache_dir": str(tmp_path_factory.mktemp("cache")),
        "allowed_paths": [str(tiny)],
        "max_running": MAX_RUNNING,
    }
    runtime = NeuronRuntime(NeuronConfig.model_validate({"neuron": section}), catalogue=[])
    async with AsyncExitStack() as stack:
        neuron = await stack.enter_async_context(running(create_neuron_app(runtime), lifespan="on"))
        async with httpx.AsyncClient(timeout=120) as http:
            loaded = await http.post(
                f"{neuron.url}/models/load", json={"model": MODEL, "source": source}
            )
            assert loaded.status_code == 200, loaded.text
        config = GatewayConfig.model_validate(
            {
                "gateway": {"poll_interval": 0.05},
                "neurons": [{"name": "n1", "endpoint": neuron.url}],
            }
        )
        app = create_app(config, [ModelSpec(id=MODEL, source=source)], tuning=FAST)
        gateway = await stack.enter_async_context(running(app, lifespan="on"))
        await eventually(lambda: len(app.state.gateway.replicas.ready(MODEL)) == 1)
        client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
        async with client:
            yield Served(client, runtime)


def _by_choice(chunks: list[Any], read: str) -> tuple[dict[int, str], dict[int, list[str]]]:
    """Each choice's streamed text and the finish reasons its chunks carried."""
    texts: dict[int, str] = defaultdict(str)
    finishes: dict[int, list[str]] = defaultdict(list)
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += (
                (choice.delta.content or "") if read == "chat" else (choice.text or "")
            )
            if choice.finish_reason:
                finishes[choice.index].append(choice.finish_reason)
    return dict(texts), dict(finishes)


async def test_chat_answers_n_choices_with_the_usage_of_all(served: Served) -> None:
    one = await served.client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=6, temperature=0, extra_body=LONG
    )
    three = await served.client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=6, temperature=0, n=3, extra_body=LONG
    )
    assert [c.index for c in three.choices] == [0, 1, 2]
    # Greedy: every choice is the model's most likely answer, as OpenAI answers n with it.
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}
    assert [c.finish_reason for c in three.choices] == ["length"] * 3
    assert three.usage is not None and one.usage is not None
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt once
    assert three.usage.completion_tokens == 18  # every choice's output
    assert three.usage.total_tokens == one.usage.prompt_tokens + 18

    stream = await served.client.chat.completions.create(
        model=MODEL,
        messages=USER,
        max_tokens=6,
        temperature=0,
        n=3,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=LONG,
    )
    chunks = [chunk async for chunk in stream]
    texts, finishes = _by_choice(chunks, "chat")
    assert texts == {c.index: c.message.content for c in three.choices}
    assert finishes == {0: ["length"], 1: ["length"], 2: ["length"]}
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role]
    assert sorted(roles) == [0, 1, 2]
    usages = [(c.usage.prompt_tokens, c.usage.completion_tokens) for c in chunks if c.usage]
    assert usages == [(one.usage.prompt_tokens, 18)] and chunks[-1].choices == []  # at the end


async def test_completions_answer_n_choices_streamed_or_not(served: Served) -> None:
    asked: dict[str, Any] = {
        "model": MODEL,
        "prompt": "The sea is",
        "max_tokens": 5,
        "temperature": 0,
        "n": 2,
        "extra_body": LONG,
    }
    answer = await served.client.completions.create(**asked)
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.choices[0].text == answer.choices[1].text
    assert [c.finish_reason for c in answer.choices] == ["length", "length"]
    assert answer.usage is not None and answer.usage.completion_tokens == 10
    stream = await served.client.completions.create(
        **asked, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    texts, finishes = _by_choice(chunks, "completion")
    assert texts == {0: answer.choices[0].text, 1: answer.choices[1].text}
    assert finishes == {0: ["length"], 1: ["length"]}
    usages = [(c.usage.prompt_tokens, c.usage.completion_tokens) for c in chunks if c.usage]
    assert usages == [(answer.usage.prompt_tokens, 10)]


async def test_seeded_choices_differ_and_the_answer_repeats(served: Served) -> None:
    """Choice i samples with seed + i: the choices differ, the same request gives the same
    answer, and choice 0 is what n=1 with the seed gives."""

    async def ask(n: int, seed: int) -> list[str | None]:
        answer = await served.client.chat.completions.create(
            model=MODEL,
            messages=USER,
            max_tokens=8,
            temperature=1.0,
            seed=seed,
            n=n,
            extra_body=LONG,
        )
        return [c.message.content for c in answer.choices]

    first = await ask(3, 7)
    assert len(set(first)) == 3
    assert await ask(3, 7) == first
    assert await ask(1, 7) == first[:1]
    assert await ask(1, 8) == first[1:2]
    assert await ask(3, 9) != first


async def test_too_many_choices_are_a_400_naming_n(served: Served) -> None:
    for n, says in ((17, "1 to 16"), (MAX_RUNNING + 1, f"at most {MAX_RUNNING} sequences")):
        with pytest.raises(openai.BadRequestError) as refused:
            await served.client.chat.completions.create(
                model=MODEL, messages=USER, max_tokens=4, n=n
            )
        body: Any = refused.value.body
        assert body["param"] == "n" and says in body["message"], body
        assert body["type"] == "invalid_request_error"
    admission = served.runtime.served(MODEL).admission
    assert admission.running == 0 and admission.queued == 0
    answer = await served.client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=4, n=MAX_RUNNING
    )
    assert len(answer.choices) == MAX_RUNNING


async def test_a_client_that_leaves_cancels_every_choice(served: Served) -> None:
    model = served.runtime.served(MODEL)
    assert model.engine is not None
    stream = await served.client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=200, n=3, stream=True, extra_body=LONG
    )
    seen: set[int] = set()
    async for chunk in stream:
        seen |= {c.index for c in chunk.choices if c.delta.content}
        if seen == {0, 1, 2}:
            break
    engine, admission = model.engine, model.admission
    assert engine.load.running == 3 and admission.running == 3
    await stream.close()
    await eventually(
        lambda: (engine.load.running, engine.load.waiting, admission.running) == (0, 0, 0)
    )
