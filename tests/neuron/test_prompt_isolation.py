"""One huge prompt never stalls the streams beside it: it is refused by size before any work, or
tokenized off the event loop, and never for longer than the prompt timeout.

A real neuron (uvicorn, the real runtime) serves a tiny random-weight Llama with an 8k context and
a real tokenizer; a stream runs while the huge prompt is sent, and its largest gap between chunks
is measured.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from live_server import serve
from tiny_models import make_tiny_llama

from cortex.core.config import NeuronConfig
from cortex.core.errors import InvalidRequest, NeuronUnavailable
from cortex.neuron.prompts import MAX_CHARS_PER_TOKEN, PromptPool
from cortex.neuron.runtime import NeuronRuntime
from cortex.neuron.server import create_app

MODEL = "tiny"
CONTEXT = 8192
LARGEST_GAP = 0.5  # seconds between two chunks of the running stream
# Just under the size bound, so it is tokenized: 130k one-letter words, seconds of work.
TOKENIZED = "a " * 130_000


@dataclass
class Neuron:
    url: str
    http: httpx.Client
    prompts: PromptPool


@pytest.fixture(scope="module")
def neuron(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Neuron]:
    model = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny", context=CONTEXT)
    section = {
        "name": "n",
        "cache_dir": str(tmp_path_factory.mktemp("cache")),
        "max_running": 4,
        "allowed_paths": [str(model)],
    }
    app = create_app(NeuronRuntime(NeuronConfig.model_validate({"neuron": section}), []))
    with serve(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        loaded = http.post("/models/load", json={"model": MODEL, "source": f"file:{model}"})
        assert loaded.status_code == 200, loaded.text
        yield Neuron(url, http, app.state.prompts)


@dataclass
class Stream:
    """A long completion stream read on its own thread; the arrival time of every chunk."""

    url: str
    arrivals: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    ended: bool = False

    def run(self) -> None:
        # Sampled text from random weights meets EOS now and then (about one stream in eight
        # over 4000 tokens), which ended the stream before the test was done with it.
        body = {
            "model": MODEL,
            "prompt": "once upon a time",
            "max_tokens": CONTEXT - 64,
            "ignore_eos": True,
            "stream": True,
        }
        with (
            httpx.Client(base_url=self.url, timeout=60) as http,
            http.stream("POST", "/v1/completions", json=body) as response,
        ):
            for _ in response.iter_lines():
                self.arrivals.append(time.monotonic())
                if self.stop.is_set():
                    return
        self.ended = True

    def chunks_after(self, moment: float) -> int:
        return sum(1 for t in self.arrivals if t > moment)

    def largest_gap(self, since: float) -> float:
        """The longest silence from the last chunk before `since` on."""
        before = [t for t in self.arrivals if t < since]
        times = before[-1:] + [t for t in self.arrivals if t >= since]
        return max(b - a for a, b in itertools.pairwise(times))


def _poll(stream: Stream, chunks: Callable[[], int], wanted: int, timeout: float = 60.0) -> None:
    """Wait until `chunks()` reaches `wanted`; a stream that ended first fails at once."""
    deadline = time.monotonic() + timeout
    while chunks() < wanted:
        assert not stream.ended, f"the stream ended after {len(stream.arrivals)} chunks"
        assert time.monotonic() < deadline, f"{chunks()} of {wanted} chunks in {timeout:g}s"
        time.sleep(0.01)


def _beside_a_stream(
    neuron: Neuron, body: dict[str, object]
) -> tuple[httpx.Response, float, float]:
    """Send `body` while a stream runs: the answer, its latency and the stream's largest gap."""
    stream = Stream(neuron.url)
    reader = threading.Thread(target=stream.run, daemon=True)
    reader.start()
    try:
        _poll(stream, lambda: len(stream.arrivals), 5)
        sent = time.monotonic()
        answer = neuron.http.post("/v1/chat/completions", json=body)
        answered = time.monotonic()
        _poll(stream, lambda: stream.chunks_after(answered), 10)
    finally:
        stream.stop.set()
        reader.join(timeout=60)
    return answer, answered - sent, stream.largest_gap(sent)


def _chat(text: str) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8}


def test_a_prompt_past_the_size_bound_is_refused_before_any_work(neuron: Neuron) -> None:
    huge = "word " * 1_400_000  # 7 MB: tens of seconds to tokenize
    assert len(huge) > CONTEXT * MAX_CHARS_PER_TOKEN
    answer, latency, gap = _beside_a_stream(neuron, _chat(huge))
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "context_length_exceeded"
    assert "characters" in answer.json()["error"]["message"]
    assert latency < 2.0
    assert gap < LARGEST_GAP


def test_a_long_prompt_is_tokenized_off_the_event_loop(neuron: Neuron) -> None:
    assert len(TOKENIZED) < CONTEXT * MAX_CHARS_PER_TOKEN
    answer, _, gap = _beside_a_stream(neuron, _chat(TOKENIZED))
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "tokens" in error["message"] and "characters" not in error["message"]
    assert gap < LARGEST_GAP


def test_preparing_a_prompt_is_capped_in_time(neuron: Neuron) -> None:
    timeout, neuron.prompts.timeout = neuron.prompts.timeout, 0.05
    try:
        started = time.monotonic()
        answer = neuron.http.post("/v1/chat/completions", json=_chat(TOKENIZED))
        latency = time.monotonic() - started
    finally:
        neuron.prompts.timeout = timeout
    assert answer.status_code == 400, answer.text
    assert "took longer than 0.05s" in answer.json()["error"]["message"]
    assert latency < 1.0
    ok = neuron.http.post("/v1/chat/completions", json=_chat("hi"))
    assert ok.status_code == 200, ok.text


async def test_a_prompt_that_never_got_a_thread_is_a_503_not_a_400() -> None:
    """Only a preparation that ran too long is the request's fault; a wait for a thread is not."""
    pool = PromptPool(timeout=0.05, threads=1)
    release = threading.Event()
    try:
        with pytest.raises(InvalidRequest, match="took longer"):
            await pool.run(lambda: release.wait(10), "messages")
        with pytest.raises(NeuronUnavailable, match="busy") as busy:
            await pool.run(lambda: None, "messages")
        assert busy.value.retry_after is not None
    finally:
        release.set()
        pool.close()
    with pytest.raises(NeuronUnavailable, match="shutting down"):
        await pool.run(lambda: None, "messages")
