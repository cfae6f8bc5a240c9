"""Bad input on every route (docs/architecture.md): the right status, in the route's own error shape, and the
gateway stays healthy."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fakes.neuron import FakeNeuron, GiB
from gateway_cluster import cluster, spec

MODEL = "chat-a"
LIMIT = 4096

# route -> (a valid body, a field set to the wrong type, a required field)
ROUTES: dict[str, tuple[dict[str, Any], tuple[str, Any], str]] = {
    "/v1/chat/completions": (
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        ("messages", "not a list"),
        "messages",
    ),
    "/v1/completions": ({"model": MODEL, "prompt": "hi"}, ("max_tokens", "lots"), "prompt"),
    "/v1/embeddings": ({"model": MODEL, "input": "hi"}, ("input", {"a": 1}), "input"),
    "/v1/responses": ({"model": MODEL, "input": "hi"}, ("temperature", "hot"), "input"),
    "/v1/messages": (
        {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
        ("max_tokens", "many"),
        "max_tokens",
    ),
    "/v1/messages/count_tokens": (
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        ("messages", 3),
        "messages",
    ),
}


def assert_shape(route: str, response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    if route.startswith("/v1/messages"):
        assert body["type"] == "error"
        assert set(body["error"]) == {"type", "message"}
        return body["error"]  # type: ignore[no-any-return]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("route", list(ROUTES))
async def test_bad_input_gets_the_routes_error_shape(route: str) -> None:
    valid, (field, wrong), required = ROUTES[route]
    n1 = FakeNeuron("n1", loaded={MODEL: GiB})
    async with cluster(n1, catalogue=[spec(MODEL)], gateway={"max_body_bytes": LIMIT}) as c:
        post = c.http.post
        headers = {"content-type": "application/json"}
        assert_shape(route, await post(route, content=b'{"model": ', headers=headers), 400)
        assert_shape(route, await post(route, content=b"", headers=headers), 400)
        assert_shape(route, await post(route, content=b"\xff\xfe", headers=headers), 400)
        assert_shape(route, await post(route, json=[valid]), 400)
        error = assert_shape(route, await post(route, json={**valid, field: wrong}), 400)
        assert field in error["message"]
        missing = {k: v for k, v in valid.items() if k != required}
        error = assert_shape(route, await post(route, json=missing), 400)
        assert required in error["message"]
        unknown = assert_shape(route, await post(route, json={**valid, "model": "nope"}), 404)
        assert "nope" in unknown["message"]
        huge = {**valid, "padding": "x" * LIMIT}
        assert_shape(route, await post(route, json=huge), 413)
        chunked = await post(route, content=_chunks(huge), headers=headers)  # no content-length
        assert_shape(route, chunked, 413)
        # Unknown fields are tolerated, and after all of that the gateway still serves.
        ok = await post(route, json={**valid, "some_future_field": True})
        assert ok.status_code == 200, ok.text
        assert (await c.http.get("/health")).json()["status"] == "ok"


def _chunks(body: dict[str, Any]) -> Any:
    import json

    raw = json.dumps(body).encode()

    async def gen() -> Any:
        for i in range(0, len(raw), 1024):
            yield raw[i : i + 1024]

    return gen()


async def test_framework_errors_use_the_surface_shape() -> None:
    async with cluster(FakeNeuron("n1"), catalogue=[spec(MODEL)]) as c:
        missing = await c.http.get("/v1/nothing-here")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        wrong_method = await c.http.get("/v1/messages")
        assert wrong_method.status_code == 405
        assert wrong_method.json()["type"] == "error"


async def test_empty_conversation_is_400() -> None:
    async with cluster(FakeNeuron("n1", loaded={MODEL: GiB}), catalogue=[spec(MODEL)]) as c:
        body = {"model": MODEL, "max_tokens": 8, "messages": [], "system": "x"}
        error = assert_shape("/v1/messages", await c.http.post("/v1/messages", json=body), 400)
        assert "messages" in error["message"]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/messages"])
async def test_neuron_rejection_is_relayed_in_the_route_shape_not_retried(route: str) -> None:
    n1, n2 = FakeNeuron("n1", loaded={MODEL: GiB}), FakeNeuron("n2", loaded={MODEL: GiB})
    n1.faults.reject = n2.faults.reject = "max_tokens exceeds the limit of 32768"
    async with cluster(n1, n2, catalogue=[spec(MODEL)]) as c:
        valid = ROUTES[route][0]
        response = await c.http.post(route, json={**valid, "max_tokens": 10**9})
        error = assert_shape(route, response, 400)
        assert error["message"] == "max_tokens exceeds the limit of 32768"
        assert len(n1.requests) + len(n2.requests) == 1


# route -> (a body whose string-or-list content is a list with a bad element, the field named)
NESTED: dict[str, tuple[dict[str, Any], str]] = {
    "/v1/messages": (
        {
            "model": MODEL,
            "max_tokens": 8,
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "tool_use", "name": "f", "input": {}}]},
            ],
        },
        "messages.1.content.0.id: field required",
    ),
    "/v1/responses": (
        {"model": MODEL, "input": [{"role": "tool", "content": "x"}]},
        "input.0.role: Input should be 'user', 'assistant', 'system' or 'developer'",
    ),
}  # the chat route passes its body to the neuron, which names the field (tests/neuron)


@pytest.mark.parametrize("route", list(NESTED))
async def test_a_bad_element_of_a_list_is_named_not_the_string_alternative(route: str) -> None:
    body, said = NESTED[route]
    n1 = FakeNeuron("n1", loaded={MODEL: GiB})
    async with cluster(n1, catalogue=[spec(MODEL)]) as c:
        error = assert_shape(route, await c.http.post(route, json=body), 400)
        assert error["message"] == said
        if not route.startswith("/v1/messages"):
            assert error["param"] == said.split(":")[0]


@pytest.mark.parametrize("path", ["/session", "/admin/models/chat-a/load", "/admin/keys/x/reset"])
async def test_control_routes_cap_their_bodies_before_the_key_check(path: str) -> None:
    """FastAPI reads a body before the key is checked: without a cap on /admin/* and /session, a
    caller with no key could make the gateway hold any amount (docs/security.md)."""
    auth = {"enabled": True, "keys": [{"name": "root", "key": "sk-root", "admin": True}]}
    async with cluster(FakeNeuron("n1"), catalogue=[spec(MODEL)], auth=auth) as c:
        headers = {"content-type": "application/json"}
        for body in (b"x" * 2**20, _megabytes(4)):  # with Content-Length, then without
            too_large = await c.http.post(path, content=body, headers=headers)
            error = assert_shape(path, too_large, 413)
            assert error["code"] == "request_too_large"
        # A form of the usual size is still read: the key is judged, not the size.
        small = await c.http.post(path, content=b"key=sk-root", headers=headers)
        assert small.status_code != 413


def _megabytes(n: int) -> Any:
    async def gen() -> Any:
        for _ in range(n):
            yield b"x" * 2**20

    return gen()
