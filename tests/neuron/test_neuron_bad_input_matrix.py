"""The bad-input matrix of the neuron: every route, each bad request answered with the right status
in OpenAI's envelope, and a normal request served right after it.

Most cases run on the real server over the scripted runtime (fast); the cases that need a real
tokenizer or real loads (lone surrogates, huge prompts, conflicting sources) run on a tiny
random-weight Llama. JSON bodies go through the openai SDK on its routes, raw httpx elsewhere.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fake_runtime import FakeRuntime, FakeServed
from live_server import serve
from tiny_models import make_tiny_llama

from cortex.core.config import NeuronConfig
from cortex.neuron.runtime import NeuronRuntime
from cortex.neuron.server import create_app

CHAT, EMBED, TINY = "tiny-chat", "tiny-embed", "tiny"
USER = [{"role": "user", "content": "hi"}]
MiB = 2**20
IMAGE_URL = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}

VALID: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": CHAT, "messages": USER},
    "/v1/completions": {"model": CHAT, "prompt": "hi"},
    "/v1/embeddings": {"model": EMBED, "input": "hi"},
    "/tokenize": {"model": CHAT, "prompt": "hi"},
    "/models/load": {"model": CHAT},
    "/models/unload": {"model": "no-such-model"},
}
# route -> (a required field, a field set to the wrong type, a field given a non-boolean string)
FIELDS: dict[str, tuple[str, tuple[str, Any], str | None]] = {
    "/v1/chat/completions": ("messages", ("messages", "not a list"), "stream"),
    "/v1/completions": ("prompt", ("max_tokens", "lots"), "echo"),
    "/v1/embeddings": ("input", ("input", {"a": 1}), None),
    "/tokenize": ("model", ("messages", 3), None),
    "/models/load": ("model", ("devices", "cpu-0"), "wait"),
    "/models/unload": ("model", ("model", ["x"]), "force"),
}


@dataclass(frozen=True)
class Case:
    name: str
    route: str
    status: int
    json: dict[str, Any] | None = None
    raw: bytes | None = None
    method: str = "POST"
    says: str = ""


def _deep(depth: int) -> bytes:
    return b'{"model": "x", "messages": ' + b"[" * depth + b"]" * depth + b"}"


def _surrogate(body: dict[str, Any]) -> bytes:
    """The body with `"x\\ud800y"` (a lone surrogate, as a JSON escape) for its "hi"."""
    return json.dumps(body).replace('"hi"', '"x\\ud800y"', 1).encode()


def _with(route: str, **fields: Any) -> dict[str, Any]:
    return {**VALID[route], **fields}


def _common(route: str) -> list[Case]:
    required, (field, wrong), boolean = FIELDS[route]
    body = VALID[route]
    raw = json.dumps(body).encode()
    cases = [
        Case("malformed-json", route, 400, raw=b'{"model": ', says="JSON"),
        Case("empty-body", route, 400, raw=b""),
        Case("invalid-utf8", route, 400, raw=raw[:-1] + b', "x": "\xff\xfe"}'),
        Case("json-array", route, 400, raw=b"[" + raw + b"]"),
        Case("nested-1000-deep", route, 400, raw=_deep(1000)),
        Case("raw-nul-byte", route, 400, raw=raw[:-1] + b', "x": "a\x00b"}'),
        Case("wrong-type", route, 400, json={**body, field: wrong}, says=field),
        Case("missing-field", route, 400, json={k: v for k, v in body.items() if k != required}),
        Case("body-20MiB", route, 413, json={**body, "padding": "x" * (20 * MiB)}),
    ]
    if boolean is not None:
        cases.append(Case("bool-as-string", route, 400, json={**body, boolean: "yes"}))
    if route != "/models/unload":
        cases.append(Case("unknown-model", route, 404, json={**body, "model": "no-such-model"}))
    return cases


CHAT_ROUTE, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
TOKENIZE = "/tokenize"

SPECIFIC = [
    Case("temperature-3", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, temperature=3)),
    Case("top-p-2", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, top_p=2)),
    Case("min-p-above-1", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, min_p=1.5), says="min_p"),
    Case("n-17", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, n=17), says="n"),
    Case("seed-past-64-bits", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, seed=2**64), says="seed"),
    Case(
        "seed-below-64-bits",
        COMPLETIONS,
        400,
        json=_with(COMPLETIONS, seed=-(2**63) - 1),
        says="seed",
    ),
    Case("max-tokens-0", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, max_tokens=0)),
    Case("max-tokens-huge", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, max_tokens=10**9)),
    # A max_tokens past the context is clamped (docs/architecture.md, "Completion limits"); a
    # prompt that alone fills it is refused, naming the numbers.
    Case(
        "prompt-fills-context",
        CHAT_ROUTE,
        400,
        json=_with(CHAT_ROUTE, messages=[{"role": "user", "content": "x" * 400}]),
        says="maximum context length",
    ),
    Case("embedding-model", CHAT_ROUTE, 400, json=_with(CHAT_ROUTE, model=EMBED)),
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
        "image-part",
        CHAT_ROUTE,
        400,
        json=_with(CHAT_ROUTE, messages=[{"role": "user", "content": [IMAGE_URL]}]),
        says="text only",
    ),
    Case(
        "file-part",
        CHAT_ROUTE,
        400,
        json=_with(CHAT_ROUTE, messages=[{"role": "user", "content": [{"type": "file"}]}]),
        says="file",
    ),
    Case(
        "prompt-7MB",
        CHAT_ROUTE,
        400,
        json=_with(CHAT_ROUTE, messages=[{"role": "user", "content": "x" * 7_000_000}]),
        says="context",
    ),
    Case(
        "stream-options-yes",
        CHAT_ROUTE,
        400,
        json=_with(CHAT_ROUTE, stream_options={"include_usage": 1}),
    ),
    Case("token-id-past-vocab", COMPLETIONS, 400, json=_with(COMPLETIONS, prompt=[0x110000])),
    Case("suffix", COMPLETIONS, 400, json=_with(COMPLETIONS, suffix="x"), says="suffix"),
    Case("prompt-7MB", COMPLETIONS, 400, json=_with(COMPLETIONS, prompt="x" * 7_000_000)),
    Case("top-k-negative", COMPLETIONS, 400, json=_with(COMPLETIONS, top_k=-2)),
    Case("min-p-negative", COMPLETIONS, 400, json=_with(COMPLETIONS, min_p=-0.1), says="min_p"),
    Case("input-empty-string", EMBEDDINGS, 400, json=_with(EMBEDDINGS, input="")),
    Case("lone-surrogate", EMBEDDINGS, 400, raw=_surrogate(VALID[EMBEDDINGS]), says="surrogate"),
    Case("input-too-many", EMBEDDINGS, 400, json=_with(EMBEDDINGS, input=["a"] * 2049)),
    Case("dimensions-wrong", EMBEDDINGS, 400, json=_with(EMBEDDINGS, dimensions=7)),
    Case("chat-model", EMBEDDINGS, 400, json=_with(EMBEDDINGS, model=CHAT)),
    Case("nothing-to-count", TOKENIZE, 400, json={"model": CHAT}),
    Case(
        "image-part",
        TOKENIZE,
        400,
        json={"model": CHAT, "messages": [{"role": "user", "content": [IMAGE_URL]}]},
    ),
    Case("prompt-7MB", TOKENIZE, 400, json={"model": CHAT, "prompt": "x" * 7_000_000}),
    Case("unknown-path", "/nothing-here", 404, method="GET"),
    Case("get-on-chat", CHAT_ROUTE, 405, method="GET"),
    Case("get-on-load", "/models/load", 405, method="GET"),
]
CASES = [case for route in VALID for case in _common(route)] + SPECIFIC


@pytest.fixture(scope="module")
def neuron() -> Iterator[str]:
    runtime = FakeRuntime()
    runtime.add(FakeServed(CHAT))
    runtime.add(FakeServed(EMBED, kind="embedding"))
    with serve(create_app(runtime)) as url:  # type: ignore[arg-type]
        yield url


@pytest.fixture(scope="module")
def clients(neuron: str) -> Iterator[tuple[httpx.Client, openai.OpenAI]]:
    with httpx.Client(base_url=neuron, timeout=60) as http:
        sdk = openai.OpenAI(base_url=f"{neuron}/v1", api_key="x", max_retries=0)
        yield http, sdk
        sdk.close()


def send(http: httpx.Client, sdk: openai.OpenAI, case: Case) -> httpx.Response:
    """JSON on /v1/* through the openai SDK; bytes and the lifecycle routes through httpx."""
    if case.json is not None and case.method == "POST" and case.route.startswith("/v1/"):
        try:
            return sdk.post(case.route.removeprefix("/v1"), cast_to=httpx.Response, body=case.json)
        except openai.APIStatusError as refused:
            return refused.response
    if case.json is not None:
        return http.request(case.method, case.route, json=case.json)
    headers = {"content-type": "application/json"}
    return http.request(case.method, case.route, content=case.raw, headers=headers)


def assert_refused(case: Case, response: httpx.Response) -> None:
    assert response.status_code == case.status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] != "server_error", error
    assert case.says.lower() in error["message"].lower(), error


def test_the_matrix_is_wide() -> None:
    assert len(CASES) >= 60
    assert len({(c.route, c.name) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.route}:{c.name}")
def test_bad_input(clients: tuple[httpx.Client, openai.OpenAI], case: Case) -> None:
    http, sdk = clients
    assert_refused(case, send(http, sdk, case))
    assert http.get("/health").json()["status"] == "ok"
    answer = sdk.chat.completions.create(model=CHAT, messages=USER)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "Hello there!"


# ---- a real tokenizer and real loads -----------------------------------------------------------


@dataclass
class TinyNeuron:
    url: str
    http: httpx.Client
    source: str


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyNeuron]:
    model = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny")
    cache = tmp_path_factory.mktemp("cache")
    section = {
        "name": "tiny",
        "cache_dir": str(cache),
        "allowed_paths": [str(tmp_path_factory.getbasetemp())],  # the tests' models live there
    }
    config = NeuronConfig.model_validate({"neuron": section})
    with (
        serve(create_app(NeuronRuntime(config, catalogue=[]))) as url,
        httpx.Client(base_url=url, timeout=120) as http,
    ):
        source = f"file:{model}"
        loaded = http.post("/models/load", json={"model": TINY, "source": source})
        assert loaded.status_code == 200, loaded.text
        yield TinyNeuron(url, http, source)


TINY_SOURCE = "<the tiny model's source>"  # replaced when sent


REAL_CASES = [
    Case("lone-surrogate", CHAT_ROUTE, 400, raw=_surrogate({"model": TINY, "messages": USER})),
    Case("lone-surrogate", COMPLETIONS, 400, raw=_surrogate({"model": TINY, "prompt": "hi"})),
    Case("lone-surrogate", TOKENIZE, 400, raw=_surrogate({"model": TINY, "prompt": "hi"})),
    Case(
        "raw-surrogate-bytes",
        CHAT_ROUTE,
        400,
        raw=json.dumps({"model": TINY, "messages": USER}, ensure_ascii=False)
        .replace('"hi"', '"x\udfffy"')
        .encode("utf-8", "surrogatepass"),
    ),
    Case(
        "prompt-7MB",
        CHAT_ROUTE,
        400,
        json={"model": TINY, "messages": [{"role": "user", "content": "word " * 1_400_000}]},
        says="context",
    ),
    Case(
        "image-part",
        CHAT_ROUTE,
        400,
        json={"model": TINY, "messages": [{"role": "user", "content": [IMAGE_URL]}]},
        says="text only",
    ),
    Case(
        "unknown-device",
        "/models/load",
        400,
        json={"model": "other", "source": TINY_SOURCE, "devices": ["tpu-9"]},
        says="tpu-9",
    ),
    Case("missing-source", "/models/load", 404, json={"model": "other", "source": "file:/nowhere"}),
]


@pytest.mark.parametrize("case", REAL_CASES, ids=lambda c: f"{c.route}:{c.name}")
def test_bad_input_on_a_real_model(tiny: TinyNeuron, case: Case) -> None:
    started = time.monotonic()
    if case.json is not None:
        body = {k: tiny.source if v == TINY_SOURCE else v for k, v in case.json.items()}
        response = tiny.http.post(case.route, json=body)
    else:
        headers = {"content-type": "application/json"}
        response = tiny.http.post(case.route, content=case.raw, headers=headers)
    assert_refused(case, response)
    assert time.monotonic() - started < 5  # refused cheaply, not after tokenizing megabytes
    answer = tiny.http.post(COMPLETIONS, json={"model": TINY, "prompt": "hi", "max_tokens": 2})
    assert answer.status_code == 200, answer.text


def test_loading_a_loaded_id_from_another_source_is_a_conflict(
    tiny: TinyNeuron, tmp_path: Path
) -> None:
    other = f"file:{tmp_path / 'elsewhere'}"
    again = tiny.http.post("/models/load", json={"model": TINY, "source": tiny.source})
    assert again.status_code == 200, again.text  # the same source: idempotent
    conflict = tiny.http.post("/models/load", json={"model": TINY, "source": other})
    assert conflict.status_code == 409, conflict.text
    error = conflict.json()["error"]
    assert error["code"] == "source_conflict"
    assert tiny.source in error["message"] and other in error["message"]
    assert tiny.http.get("/models").json()["loaded"][0]["source"] == tiny.source


def test_concurrent_loads_of_one_id_from_two_sources(tiny: TinyNeuron, tmp_path: Path) -> None:
    """The first load proceeds; the second, naming another source, is refused while it runs."""
    make_tiny_llama(tmp_path / "second")
    first = {"model": "twin", "source": tiny.source}
    second = {"model": "twin", "source": f"file:{tmp_path / 'second'}"}
    started = tiny.http.post("/models/load", json={**first, "wait": False})
    assert started.status_code == 202, started.text
    with ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(tiny.http.post, "/models/load", json=first)
        refused = pool.submit(tiny.http.post, "/models/load", json=second)
        assert refused.result().status_code == 409, refused.result().text
        assert second["source"] in refused.result().json()["error"]["message"]
        assert waiting.result().status_code == 200, waiting.result().text
    listed = {m["id"]: m["source"] for m in tiny.http.get("/models").json()["loaded"]}
    assert listed["twin"] == tiny.source
    unloaded = tiny.http.post("/models/unload", json={"model": "twin"})
    assert unloaded.status_code == 200, unloaded.text
