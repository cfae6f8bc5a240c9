"""Every model route against every way a key can be wrong or right, each answer in its surface's
envelope: OpenAI's on /v1/* (Responses included), Anthropic's on /v1/messages*."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
from fakes.neuron import FakeNeuron, GiB
from gateway_cluster import Cluster, cluster, spec

KEY = "sk-matrix-0123456789"
NARROW = "sk-matrix-narrow-abcdef"  # allowed chat-a by id, the embedder by its alias
AUTH = {
    "enabled": True,
    "keys": [
        {"name": "wide", "key": KEY},
        {"name": "narrow", "key": NARROW, "models": ["chat-a", "embedder"]},
    ],
}
CATALOGUE = [
    spec("chat-a", aliases=["a-alias"]),
    spec("chat-b"),
    spec("embed-e", kind="embedding", aliases=["embedder"]),
]
USER = [{"role": "user", "content": "hi"}]


def _body(route: str, model: str) -> dict[str, Any] | None:
    """A valid request for `model` on `route` (None for GETs)."""
    if route in ("/v1/chat/completions",):
        return {"model": model, "messages": USER, "max_tokens": 4}
    if route == "/v1/completions":
        return {"model": model, "prompt": "hi", "max_tokens": 4}
    if route == "/v1/embeddings":
        return {"model": model, "input": "hi"}
    if route == "/v1/responses":
        return {"model": model, "input": "hi", "max_output_tokens": 4}
    if route == "/v1/messages":
        return {"model": model, "messages": USER, "max_tokens": 4}
    if route == "/v1/messages/count_tokens":
        return {"model": model, "messages": USER}
    return None


CHAT_ROUTES = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
]
ROUTES = ["/v1/models", "/v1/models/{model}", *CHAT_ROUTES, "/v1/embeddings"]


async def _ask(
    c: Cluster,
    route: str,
    model: str,
    headers: dict[str, str] | None = None,
    query: str = "",
) -> httpx.Response:
    path = route.replace("{model}", model) + query
    body = _body(route, model)
    if body is None:
        return await c.http.get(path, headers=headers or {})
    return await c.http.post(path, json=body, headers=headers or {})


def _model_for(route: str) -> str:
    return "embed-e" if route == "/v1/embeddings" else "chat-a"


def _assert_envelope(route: str, answer: httpx.Response, status: int, kind: str) -> None:
    assert answer.status_code == status, (route, answer.text)
    body = answer.json()
    if route.startswith("/v1/messages"):
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
        assert body["error"]["type"] == kind, (route, body)
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}, (route, body)
        assert body["error"]["type"] == kind, (route, body)
    assert KEY not in answer.text and NARROW not in answer.text  # no key is ever echoed


def matrix() -> AbstractAsyncContextManager[Cluster]:
    neuron = FakeNeuron("n1", loaded={"chat-a": GiB, "chat-b": GiB, "embed-e": GiB})
    return cluster(neuron, catalogue=CATALOGUE, auth=AUTH)


BAD_KEYS = {
    "no key": {},
    "wrong key": {"Authorization": "Bearer sk-matrix-wrong"},
    "prefix of a key": {"x-api-key": KEY[:-1]},
    "key plus a suffix": {"x-api-key": KEY + "0"},
    "bearer without a key": {"Authorization": "Bearer"},
    "other scheme": {"Authorization": f"Basic {KEY}"},
}


async def test_a_bad_key_is_401_in_the_surface_envelope() -> None:
    async with matrix() as c:
        for route in ROUTES:
            model = _model_for(route)
            for case, headers in BAD_KEYS.items():
                answer = await _ask(c, route, model, headers)
                assert answer.status_code == 401, (route, case)
                _assert_envelope(route, answer, 401, "authentication_error")
            # A key in the query string is not a key (and the access log would have shown it).
            for name in ("api_key", "key", "x-api-key"):
                answer = await _ask(c, route, model, query=f"?{name}={KEY}")
                _assert_envelope(route, answer, 401, "authentication_error")


async def test_a_good_key_is_served_on_every_route() -> None:
    async with matrix() as c:
        for route in ROUTES:
            for headers in ({"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
                answer = await _ask(c, route, _model_for(route), headers)
                assert answer.status_code == 200, (route, answer.text)


async def test_the_allowlist_admits_by_id_and_by_alias() -> None:
    narrow = {"x-api-key": NARROW}
    async with matrix() as c:
        for route in [*CHAT_ROUTES, "/v1/embeddings", "/v1/models/{model}"]:
            # chat-a is allowed by its id; embed-e through its alias "embedder" only.
            allowed = ["embed-e", "embedder"] if route == "/v1/embeddings" else ["chat-a"]
            for model in allowed:
                answer = await _ask(c, route, model, narrow)
                assert answer.status_code == 200, (route, model, answer.text)
            answer = await _ask(c, route, "chat-b", narrow)
            if route == "/v1/models/{model}":  # outside the allowlist is as good as absent
                _assert_envelope(route, answer, 404, "invalid_request_error")
            else:
                _assert_envelope(route, answer, 403, "permission_error")
                assert "narrow" in answer.json()["error"]["message"]


async def test_the_model_list_shows_only_the_allowlist() -> None:
    async with matrix() as c:
        await _lists_follow_the_allowlist(c)


async def _lists_follow_the_allowlist(c: Cluster) -> None:
    narrow = await c.http.get("/v1/models", headers={"x-api-key": NARROW})
    assert {m["id"] for m in narrow.json()["data"]} == {"chat-a", "embed-e"}
    wide = await c.http.get("/v1/models", headers={"x-api-key": KEY})
    assert {m["id"] for m in wide.json()["data"]} == {"chat-a", "chat-b", "embed-e"}
