"""What Claude Code meets at the gateway: the model list in Anthropic's shape with each model's
limits, and a clamped max_tokens reported (or, strict, refused) on every surface."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest
from fakes.neuron import FakeNeuron, GiB
from gateway_cluster import chat_body, cluster, spec

from cortex.core.completion_limit import CLAMPED_HEADER, STRICT_HEADER
from cortex.core.errors import InvalidRequest, ModelNotFound
from cortex.core.protocol.anthropic import ModelInfo
from cortex.gateway.anthropic_models import model_page

ANTHROPIC = {"anthropic-version": "2023-06-01"}


async def test_anthropic_clients_get_anthropics_model_list_with_limits() -> None:
    n1 = FakeNeuron("n1", loaded={"chat-a": GiB})
    catalogue = [
        spec("chat-a", context=8192),
        spec("chat-b", context=4096, max_output_tokens=512),
        spec("embed", kind="embedding", context=256),
    ]
    async with cluster(n1, catalogue=catalogue) as c:
        page = (await c.http.get("/v1/models", headers=ANTHROPIC)).json()
        assert set(page) == {"data", "has_more", "first_id", "last_id"}
        assert "embed" not in {m["id"] for m in page["data"]}  # not for a messages client
        assert page["has_more"] is False
        models = {m["id"]: m for m in page["data"]}
        assert page["first_id"] == page["data"][0]["id"]
        assert page["last_id"] == page["data"][-1]["id"]
        assert models["chat-a"] == {
            "type": "model",
            "id": "chat-a",
            "display_name": "chat-a",
            "created_at": "1970-01-01T00:00:00Z",
            "max_input_tokens": 8192,
            "max_tokens": 8192,
        }
        assert (models["chat-b"]["max_input_tokens"], models["chat-b"]["max_tokens"]) == (4096, 512)
        sdk = c.anthropic()
        listed = [m.id async for m in sdk.models.list()]
        assert listed == [m["id"] for m in page["data"]]
        one = await sdk.models.retrieve("chat-b")
        assert one.type == "model" and one.id == "chat-b" and one.display_name == "chat-b"
        with pytest.raises(anthropic.NotFoundError) as caught:
            await sdk.models.retrieve("nope")
        assert caught.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
        # Without the header, OpenAI's list as before.
        assert (await c.http.get("/v1/models")).json()["object"] == "list"


def test_model_pages_follow_the_apis_cursors() -> None:
    infos = [ModelInfo(id=f"m{i}", display_name=f"m{i}", created_at="x") for i in range(5)]

    def ids(**kw: Any) -> tuple[list[str], bool]:
        page = model_page(infos, **kw)
        return [m.id for m in page.data], page.has_more

    assert ids() == (["m0", "m1", "m2", "m3", "m4"], False)
    assert ids(limit="2") == (["m0", "m1"], True)
    assert ids(limit="2", after_id="m1") == (["m2", "m3"], True)
    assert ids(limit="2", after_id="m2") == (["m3", "m4"], False)
    assert ids(limit="2", before_id="m3") == (["m1", "m2"], True)
    assert ids(limit="5", before_id="m2") == (["m0", "m1"], False)
    for bad in ("0", "1001", "x"):
        with pytest.raises(InvalidRequest):
            model_page(infos, limit=bad)
    with pytest.raises(ModelNotFound):
        model_page(infos, after_id="gone")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", chat_body("chat-a", max_tokens=32000)),
        ("/v1/completions", {"model": "chat-a", "prompt": "hi", "max_tokens": 32000}),
        ("/v1/messages", {**chat_body("chat-a"), "max_tokens": 32000}),
        ("/v1/responses", {"model": "chat-a", "input": "hi", "max_output_tokens": 32000}),
    ],
)
async def test_the_neurons_clamp_report_reaches_the_client_on_every_surface(
    path: str, body: dict[str, Any], stream: bool
) -> None:
    n1 = FakeNeuron("n1", loaded={"chat-a": GiB})
    n1.answer_headers = {CLAMPED_HEADER: "32000->4090", "x-internal": "kept back"}
    async with cluster(n1, catalogue=[spec("chat-a")]) as c:
        answer = await c.http.post(path, json={**body, "stream": stream})
        assert answer.status_code == 200, answer.text
        assert answer.headers[CLAMPED_HEADER] == "32000->4090"
        assert "x-internal" not in answer.headers
        assert n1.strictness == [None]  # nothing set: the neuron decides


async def test_strictness_goes_to_the_neuron_from_the_model_then_the_gateway() -> None:
    n1 = FakeNeuron("n1", loaded={"strict": GiB, "lenient": GiB, "default": GiB})
    catalogue = [
        spec("strict", strict_max_tokens=True),
        spec("lenient", strict_max_tokens=False),
        spec("default"),
    ]
    async with cluster(n1, catalogue=catalogue, gateway={"strict_max_tokens": True}) as c:
        for model in ("strict", "lenient", "default"):
            answer = await c.http.post("/v1/chat/completions", json=chat_body(model))
            assert answer.status_code == 200
    assert n1.strictness == ["true", "false", "true"]
    assert STRICT_HEADER == "x-cortex-strict-max-tokens"
