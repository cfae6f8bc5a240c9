"""The neuron daemon end to end: real models, real uvicorn, the official `openai` SDK as the client."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from live_server import serve
from prometheus_client.parser import text_string_to_metric_families

from cortex.core.catalogue import DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL
from cortex.core.completion_limit import STRICT_HEADER
from cortex.core.config import NeuronConfig
from cortex.neuron.replica import ServedModel
from cortex.neuron.runtime import NeuronRuntime
from cortex.neuron.server import create_app

CHAT = DEFAULT_CHAT_MODEL
QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


class Neuron:
    """A running neuron: its URL, runtime, and clients for it."""

    def __init__(self, url: str, runtime: NeuronRuntime) -> None:
        self.url, self.runtime = url, runtime
        self.sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        self.http = httpx.Client(base_url=url, timeout=120)

    def served(self, model: str = CHAT) -> ServedModel:
        return self.runtime.served(model)

    def wait_loaded(self, timeout: float = 300.0) -> None:
        """Until every preload is ready (they run beside serving)."""
        models = set(self.runtime.config.neuron.preload)
        deadline = time.monotonic() + timeout
        while {m.id for m in self.runtime.status().models if m.state.value == "ready"} < models:
            failed = [m for m in self.runtime.status().models if m.state.value == "failed"]
            assert not failed and time.monotonic() < deadline, f"preloads not ready: {failed}"
            time.sleep(0.05)

    def in_flight(self, model: str = CHAT) -> int:
        return sum(m.in_flight + m.queued for m in self.runtime.status().models if m.id == model)

    def wait_idle(self, model: str = CHAT, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        served = self.served(model)
        while self.in_flight(model) or (served.engine is not None and served.engine.running):
            assert time.monotonic() < deadline, "generation still running after the deadline"
            time.sleep(0.02)


def _runtime(cache: Path, preload: list[str], **neuron: Any) -> NeuronRuntime:
    section = {"name": "real", "cache_dir": str(cache), "preload": preload, **neuron}
    return NeuronRuntime(NeuronConfig.model_validate({"neuron": section}))


@pytest.fixture(scope="module")
def neuron(model_cache: Path) -> Iterator[Neuron]:
    runtime = _runtime(model_cache, [CHAT, DEFAULT_EMBEDDING_MODEL], max_running=4, max_queue=8)
    with serve(create_app(runtime)) as url:
        node = Neuron(url, runtime)
        node.wait_loaded()  # preloads run beside serving
        yield node
        node.http.close()


def _chat(neuron: Neuron, **kwargs: Any) -> Any:
    kwargs.setdefault("messages", QUESTION)
    return neuron.sdk.chat.completions.create(model=CHAT, **kwargs)


def test_chat_non_stream_usage_matches_the_tokenizer(neuron: Neuron) -> None:
    answer = _chat(neuron, max_tokens=24, temperature=0)
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    prompt = neuron.served().render_chat(QUESTION, None)
    assert answer.usage.prompt_tokens == len(prompt)
    assert 0 < answer.usage.completion_tokens <= 24
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_chat_stream_matches_non_stream_under_greedy_decoding(neuron: Neuron) -> None:
    whole = _chat(neuron, max_tokens=24, temperature=0)
    stream = _chat(
        neuron, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_completions_stream_and_not(neuron: Neuron) -> None:
    answer = neuron.sdk.completions.create(model=CHAT, prompt=COUNTING, max_tokens=8, temperature=0)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens == len(neuron.served().encode(COUNTING))
    assert answer.usage.completion_tokens == 8
    stream = neuron.sdk.completions.create(
        model=CHAT, prompt=COUNTING, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == answer.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "11" in answer.choices[0].text  # the model really continues the count


def test_same_seed_same_output(neuron: Neuron) -> None:
    texts = {
        _chat(neuron, max_tokens=20, temperature=1.0, seed=1234).choices[0].message.content
        for _ in range(2)
    }
    assert len(texts) == 1


def test_logit_bias_and_penalties_steer_the_real_model(neuron: Neuron) -> None:
    served = neuron.served()
    forced = served.encode(" cortex")[0]
    answer = _chat(neuron, max_tokens=6, temperature=0, logit_bias={str(forced): 100})
    assert answer.usage.completion_tokens == 6
    assert answer.choices[0].message.content == served.decode([forced] * 6)
    # A greedy count repeats its commas and spaces: penalised per occurrence, it cannot go on.
    counting = {"model": CHAT, "prompt": COUNTING, "max_tokens": 24, "temperature": 0}
    free = neuron.sdk.completions.create(**counting).choices[0].text
    penalised = neuron.sdk.completions.create(**counting, frequency_penalty=2.0).choices[0].text
    assert free.startswith(" 11, 12, 13, 14,") and not penalised.startswith(" 11, 12, 13, 14,")
    dogs = [{"role": "user", "content": "Repeat the word dog ten times."}]
    plain = _chat(neuron, messages=dogs, max_tokens=16, temperature=0).choices[0].message
    present = _chat(neuron, messages=dogs, max_tokens=16, temperature=0, presence_penalty=2.0)
    assert present.choices[0].message.content != plain.content


def test_continue_final_message_goes_on_from_the_last_assistant_message(neuron: Neuron) -> None:
    counting = [
        {"role": "user", "content": "Count from 1 to 10, separated by commas."},
        {"role": "assistant", "content": "1, 2, 3, 4,"},
    ]
    served = neuron.served()
    ids = served.render_chat(counting, None, continue_final=True)
    assert served.decode(ids).endswith("1, 2, 3, 4,")  # left open: no end of turn after it
    assert not served.decode(served.render_chat(counting, None)).endswith("1, 2, 3, 4,")
    body = {"continue_final_message": True}
    answer = _chat(neuron, messages=counting, max_tokens=8, temperature=0, extra_body=body)
    assert answer.choices[0].message.content.startswith(" 5, 6")
    assert answer.usage.prompt_tokens == len(ids)
    # vLLM's rules: not both, and only an assistant's text can be continued.
    both = {"continue_final_message": True, "add_generation_prompt": True}
    with pytest.raises(openai.BadRequestError, match="cannot both be true"):
        _chat(neuron, messages=counting, max_tokens=2, extra_body=both)
    with pytest.raises(openai.BadRequestError, match="an assistant's text"):
        _chat(neuron, messages=counting[:1], max_tokens=2, extra_body=body)


def test_chat_logprobs_name_each_token_of_the_answer(neuron: Neuron) -> None:
    answer = _chat(neuron, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    choice = answer.choices[0]
    entries = choice.logprobs.content
    # Every token the content shows, and no other (an end-of-sequence token shows nothing).
    shown = answer.usage.completion_tokens - (choice.finish_reason == "stop")
    assert len(entries) == shown and "".join(e.token for e in entries) == choice.message.content
    for entry in entries:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        values = [top.logprob for top in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-6
        # Greedy, unpenalised, unconstrained: the chosen token is the most likely one.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    stream = _chat(neuron, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3, stream=True)
    streamed = [
        e
        for c in stream
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.top_logprobs[1].token) for e in streamed] == [
        (e.token, e.top_logprobs[1].token) for e in entries
    ]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-4)
    plain = _chat(neuron, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_logprob_bytes_rebuild_a_character_split_over_tokens(neuron: Neuron) -> None:
    # The emoji's four bytes lie in three tokens: each one's text is U+FFFD, its bytes its own.
    served = neuron.served()
    text = "é😀 the"
    ids = served.encode(text)
    assert b"".join(served.token_bytes(token) for token in ids) == text.encode()
    assert [served.token_text(token) for token in ids].count("\ufffd") == 3


def test_completion_logprobs_in_the_legacy_lists(neuron: Neuron) -> None:
    counting = {"model": CHAT, "prompt": COUNTING, "max_tokens": 6, "temperature": 0}
    choice = neuron.sdk.completions.create(**counting, logprobs=2).choices[0]
    lists = choice.logprobs
    assert "".join(lists.tokens) == choice.text and len(lists.token_logprobs) == 6
    starts = [sum(map(len, lists.tokens[:i])) for i in range(6)]
    assert lists.text_offset == starts
    assert all(len(top) <= 2 and max(top.values()) <= 0 for top in lists.top_logprobs)
    chunks = list(neuron.sdk.completions.create(**counting, logprobs=2, stream=True))
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [
        o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset
    ]
    assert streamed == lists.tokens and offsets == starts


def test_logprobs_with_a_stop_string_are_those_of_the_text_shown(neuron: Neuron) -> None:
    """Each token's logprob goes with the text that shows its first character; a token whose
    text begins at or after the stop string's cut has none (docs/architecture.md)."""
    counting = {"model": CHAT, "prompt": COUNTING, "max_tokens": 10, "temperature": 0}
    free = neuron.sdk.completions.create(**counting, logprobs=0).choices[0]
    tokens, text = free.logprobs.tokens, free.text
    starts = [sum(map(len, tokens[:i])) for i in range(len(tokens))]
    for at in range(1, len(text) - 3):
        stop = text[at : at + 3]
        cut = text.find(stop)
        shown = [t for t, start in zip(tokens, starts, strict=True) if start < cut]
        choice = neuron.sdk.completions.create(**counting, logprobs=0, stop=stop).choices[0]
        assert (choice.text, choice.logprobs.tokens) == (text[:cut], shown), stop
        chunks = neuron.sdk.completions.create(**counting, logprobs=0, stop=stop, stream=True)
        lists = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
        assert [t for lp in lists for t in lp.tokens] == shown, stop
    chat = {"max_tokens": 12, "temperature": 0, "logprobs": True, "stop": ["ow"]}
    answer = _chat(neuron, **chat).choices[0]
    entries = [e.token for e in answer.logprobs.content]
    assert len("".join(entries[:-1])) < len(answer.message.content) <= len("".join(entries))
    streamed = [
        e.token
        for c in _chat(neuron, **chat, stream=True)
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert streamed == entries


def test_completion_text_offsets_hold_past_characters_split_over_tokens(neuron: Neuron) -> None:
    """An emoji's tokens each read U+FFFD, yet the text holds the emoji once: offsets are where
    each token's text starts in the text returned, not a sum of token texts."""
    emoji = "Emoji list: 🍕 pizza, 🍔 burger, 日本語 Japanese, 🍕 pizza, 🍔"
    asked = {"model": CHAT, "prompt": emoji, "max_tokens": 25, "temperature": 0, "logprobs": 1}
    choice = neuron.sdk.completions.create(**asked).choices[0]
    text, lists = choice.text, choice.logprobs
    assert "\ufffd" in lists.tokens  # the output does split a character over tokens
    for token, offset in zip(lists.tokens, lists.text_offset, strict=True):
        if token != "\ufffd":
            assert text[offset : offset + len(token)] == token, (token, offset)
    assert lists.text_offset == sorted(lists.text_offset) and lists.text_offset[-1] < len(text)
    chunks = neuron.sdk.completions.create(**asked, stream=True)
    offsets = [
        o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset
    ]
    assert offsets == lists.text_offset


def test_vllm_sampling_extensions_are_honoured(neuron: Neuron) -> None:
    """min_tokens, ignore_eos, stop_token_ids and include_stop_str_in_output do what vLLM's do."""
    brief = [{"role": "user", "content": "What is the capital of France? One word."}]
    short = _chat(neuron, messages=brief, max_tokens=60, temperature=0)
    assert short.choices[0].finish_reason == "stop"
    ended = short.usage.completion_tokens
    at_least = {"min_tokens": ended + 4}
    longer = _chat(neuron, messages=brief, max_tokens=60, temperature=0, extra_body=at_least)
    assert longer.usage.completion_tokens >= ended + 4
    assert longer.choices[0].message.content.startswith(short.choices[0].message.content)
    endless = _chat(
        neuron, messages=brief, max_tokens=ended + 6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert endless.choices[0].finish_reason == "length"
    assert endless.usage.completion_tokens == ended + 6
    counting = {"model": CHAT, "prompt": COUNTING, "max_tokens": 8, "temperature": 0}
    comma = neuron.served().encode(",")[-1]
    cut = neuron.sdk.completions.create(**counting, extra_body={"stop_token_ids": [comma]})
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (" 11", "stop")
    kept = {"include_stop_str_in_output": True}
    stopped = neuron.sdk.completions.create(**counting, stop="12", extra_body=kept)
    assert stopped.choices[0].text == " 11, 12" and stopped.choices[0].finish_reason == "stop"


def test_min_p_of_one_leaves_only_the_best_token(neuron: Neuron) -> None:
    """vLLM's min_p, through the SDK's extra_body: at 1 only the best token is left, so a hot
    temperature answers token for token as greedy does, on chat and on completions, where the
    same seed without it does not. Outside [0, 1] it is a 400 that names it."""
    story = [{"role": "user", "content": "Tell me a story about a dragon."}]
    # No penalty: the fallback's 1.1 reaches sampled rows only. ignore_eos: all 24 tokens.
    endless = {"ignore_eos": True, "repetition_penalty": 1.0}
    chat = {"messages": story, "max_tokens": 24, "seed": 5}
    greedy = _chat(neuron, **chat, temperature=0, extra_body=endless).choices[0]
    hot = {**chat, "temperature": 1.5}
    only_best = _chat(neuron, **hot, extra_body={**endless, "min_p": 1.0}).choices[0]
    assert only_best.message.content == greedy.message.content
    assert _chat(neuron, **hot, extra_body=endless).choices[0].message.content != (
        greedy.message.content
    )
    prose = {"model": CHAT, "prompt": "Once upon a time", "max_tokens": 24, "seed": 5}
    plain = neuron.sdk.completions.create(**prose, temperature=0, extra_body=endless).choices[0]
    cut = {**endless, "min_p": 1.0}
    sampled = neuron.sdk.completions.create(**prose, temperature=1.5, extra_body=cut).choices[0]
    assert sampled.text == plain.text
    for wrong in (1.5, -0.1):
        with pytest.raises(openai.BadRequestError, match="min_p") as refused:
            _chat(neuron, max_tokens=2, extra_body={"min_p": wrong})
        assert refused.value.param == "min_p"


def test_what_cortex_cannot_honour_is_refused_not_ignored(neuron: Neuron) -> None:
    vocab = neuron.served().vocab_size
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        _chat(neuron, max_tokens=2, top_logprobs=3)
    with pytest.raises(openai.BadRequestError, match="requests with tools"):
        weather = {"type": "function", "function": {"name": "weather", "parameters": {}}}
        _chat(neuron, max_tokens=2, logprobs=True, tools=[weather])
    with pytest.raises(openai.BadRequestError, match="echo"):
        neuron.sdk.completions.create(
            model=CHAT, prompt=COUNTING, max_tokens=2, logprobs=1, echo=True
        )
    with pytest.raises(openai.BadRequestError, match=f"from 0 to {vocab - 1}") as outside:
        _chat(neuron, max_tokens=2, logit_bias={str(vocab): 5})
    assert outside.value.body["param"] == "logit_bias"
    for bad in ({"1": 101}, {"x": 1}):
        with pytest.raises(openai.BadRequestError, match="logit_bias"):
            _chat(neuron, max_tokens=2, logit_bias=bad)
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        _chat(neuron, max_tokens=2, presence_penalty=2.5)
    # What clients send by default is accepted as it is.
    answer = _chat(neuron, max_tokens=2, logprobs=False, presence_penalty=0, frequency_penalty=0)
    assert answer.choices[0].message.content


def test_max_tokens_ends_with_length(neuron: Neuron) -> None:
    answer = _chat(neuron, max_tokens=3, temperature=0)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 3


def test_stop_strings_never_appear(neuron: Neuron) -> None:
    free = neuron.sdk.completions.create(model=CHAT, prompt=COUNTING, max_tokens=12, temperature=0)
    text = free.choices[0].text
    assert " 13," in text
    stopped = neuron.sdk.completions.create(
        model=CHAT, prompt=COUNTING, max_tokens=12, temperature=0, stop=[" 13,", "zzz"]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(" 13,")]
    stream = neuron.sdk.completions.create(
        model=CHAT, prompt=COUNTING, max_tokens=12, temperature=0, stop=" 13,", stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == stopped.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def test_tools_answer_has_a_valid_shape(neuron: Neuron) -> None:
    # A 135M model calls tools unreliably; the parser itself is pinned by the fake-runtime tests.
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    answer = _chat(neuron, messages=messages, tools=[WEATHER_TOOL], max_tokens=60, temperature=0)
    choice = answer.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            assert call.id.startswith("call_") and call.function.name
            assert isinstance(json.loads(call.function.arguments), dict)
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content is not None
    assert "<tool_call>" not in (choice.message.content or "")


def test_tool_call_round_trip_history_is_accepted(neuron: Neuron) -> None:
    call = {
        "id": "call_abc",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"temp_c": 21, "sky": "clear"}'},
    ]
    for stream in (False, True):
        answer = _chat(
            neuron,
            messages=messages,
            tools=[WEATHER_TOOL],
            max_tokens=30,
            temperature=0,
            stream=stream,
        )
        if stream:
            chunks = list(answer)
            assert chunks[-1].choices[0].finish_reason in ("stop", "length", "tool_calls")
        else:
            assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
            assert answer.usage.prompt_tokens == len(
                neuron.served().render_chat(messages, [WEATHER_TOOL])
            )


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b)
    )


def test_embeddings_similarity(neuron: Neuron) -> None:
    texts = [
        "A cat is sleeping on the sofa.",
        "A kitten naps on the couch.",
        "The central bank raised interest rates again.",
    ]
    floats = neuron.sdk.embeddings.create(
        model=DEFAULT_EMBEDDING_MODEL, input=texts, encoding_format="float"
    )
    cat, kitten, bank = (d.embedding for d in floats.data)
    assert len(cat) == 384
    assert _cosine(cat, kitten) > _cosine(cat, bank) + 0.2
    assert math.isclose(_cosine(cat, cat), 1.0, abs_tol=1e-5)
    assert floats.usage.prompt_tokens > sum(len(t.split()) for t in texts)
    decoded = neuron.sdk.embeddings.create(model="all-MiniLM-L6-v2", input=texts)  # alias, base64
    assert decoded.data[0].embedding == pytest.approx(cat, abs=1e-6)


def _generated(neuron: Neuron) -> float:
    text = neuron.http.get("/metrics").text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "cortex_neuron_generated_tokens_total" and s.labels["model"] == CHAT
    )


def test_disconnect_stops_the_generation(neuron: Neuron) -> None:
    before = _generated(neuron)
    body = {"model": CHAT, "prompt": COUNTING, "max_tokens": 3000, "temperature": 0}
    with neuron.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        for _ in range(5):
            next(lines)
        assert neuron.in_flight() == 1
    started = time.monotonic()
    neuron.wait_idle(timeout=10)  # 3000 tokens would take minutes on CPU
    assert time.monotonic() - started < 10
    assert _generated(neuron) - before < 100
    assert neuron.http.get("/health").status_code == 200


def test_bad_inputs_leave_the_daemon_serving(neuron: Neuron) -> None:
    post = neuron.http.post
    assert (
        post(
            "/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
        ).status_code
        == 400
    )
    assert post("/v1/chat/completions", json={"model": CHAT}).json()["error"]["param"] == "messages"
    assert (
        post("/v1/chat/completions", json={"model": "nope", "messages": QUESTION}).status_code
        == 404
    )
    overflow = post(
        "/v1/chat/completions",
        json={"model": CHAT, "messages": QUESTION, "max_tokens": 8192},
        headers={STRICT_HEADER: "true"},  # lenient, it would be clamped and answered
    )
    assert overflow.json()["error"]["code"] == "context_length_exceeded"
    huge = [{"role": "user", "content": "word " * 9000}]
    assert post("/v1/chat/completions", json={"model": CHAT, "messages": huge}).status_code == 400
    wrong = post("/v1/embeddings", json={"model": CHAT, "input": "x"})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "model"
    with pytest.raises(openai.BadRequestError):
        neuron.sdk.embeddings.create(model=DEFAULT_EMBEDDING_MODEL, input=[])
    answer = _chat(neuron, max_tokens=5, temperature=0)
    assert answer.choices[0].message.content
    assert neuron.http.get("/status").json()["healthy"] is True


def test_overload_is_429_with_retry_after(model_cache: Path) -> None:
    runtime = _runtime(model_cache, [CHAT], max_running=1, max_queue=0)
    with serve(create_app(runtime)) as url:
        node = Neuron(url, runtime)
        node.wait_loaded()  # preloads run beside serving
        body = {"model": CHAT, "prompt": COUNTING, "max_tokens": 3000, "temperature": 0}
        with node.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as held:
            lines = held.iter_lines()  # kept referenced: dropping it would close the stream
            assert next(lines).startswith("data: ")
            refused = node.http.post("/v1/completions", json={**body, "max_tokens": 4})
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "overloaded"
            assert int(refused.headers["retry-after"]) >= 1
            with pytest.raises(openai.RateLimitError):
                node.sdk.completions.create(model=CHAT, prompt="hi", max_tokens=2)
        node.wait_idle()
        answer = node.sdk.completions.create(model=CHAT, prompt="hi", max_tokens=2, temperature=0)
        assert answer.usage.completion_tokens == 2
        node.http.close()
