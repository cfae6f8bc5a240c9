"""Day one at the gateway, as an SDK user meets it: a typo'd model is a 404 that says what was
meant; a seed `limit.output` bounds max_tokens; `cost` feeds cortex_spend_usd_total; one
x-request-id follows a request from the client through the gateway to the neuron."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest
from fakes.neuron import FakeNeuron, GiB
from gateway_cluster import chat_body, cluster, spec
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp, Receive, Scope, Send

from cortex.core.catalogue import DEFAULT_CHAT_MODEL, ModelCost


async def test_a_typo_is_a_404_that_names_the_close_match() -> None:
    n1 = FakeNeuron("n1", loaded={DEFAULT_CHAT_MODEL: GiB})
    async with cluster(n1, catalogue=[spec(DEFAULT_CHAT_MODEL)]) as c:
        with pytest.raises(openai.NotFoundError) as caught:
            await c.openai().chat.completions.create(
                model="smollm2-135m-instrct", messages=[{"role": "user", "content": "hi"}]
            )
        assert f"did you mean {DEFAULT_CHAT_MODEL}?" in caught.value.message
        # Nothing close: no guess.
        far = await c.http.post("/v1/chat/completions", json=chat_body("gpt-4o"))
        assert far.status_code == 404 and "did you mean" not in far.text


async def test_limit_output_bounds_max_tokens() -> None:
    """Lenient (the default), a max_tokens over the model's output limit goes to the neuron with
    the limit, which fits it (tests/neuron/test_server.py); strict, the gateway refuses it."""
    n1 = FakeNeuron("n1", loaded={"small": GiB, "exact": GiB})
    catalogue = [
        spec("small", max_output_tokens=64),
        spec("exact", max_output_tokens=64, strict_max_tokens=True),
    ]
    async with cluster(n1, catalogue=catalogue) as c:
        over = chat_body("small", max_tokens=32000)
        assert (await c.http.post("/v1/chat/completions", json=over)).status_code == 200
        assert n1.caps[-1] == "64" and n1.strictness[-1] is None
        with pytest.raises(openai.BadRequestError) as caught:
            await c.openai().chat.completions.create(
                model="exact", max_tokens=65, messages=[{"role": "user", "content": "hi"}]
            )
        assert "64 output tokens" in caught.value.message
        fits = await c.http.post("/v1/chat/completions", json=chat_body("exact", max_tokens=64))
        assert fits.status_code == 200 and n1.strictness[-1] == "true"


def _spend(text: str) -> dict[tuple[str, str, str], float]:
    return {
        (s.labels["key"], s.labels["model"], s.labels["kind"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "cortex_spend_usd_total"
    }


async def test_cost_drives_spend_per_key_and_model() -> None:
    n1 = FakeNeuron("n1", loaded={"priced": GiB, "free": GiB})
    priced = spec("priced", cost=ModelCost(input=2.0, output=4.0))
    auth = {"enabled": True, "keys": [{"name": "team-a", "key": "sk-team-a"}]}
    async with cluster(n1, catalogue=[priced, spec("free")], auth=auth) as c:
        client = c.openai("sk-team-a")
        for model in ("priced", "free"):
            answer = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "three words here"}]
            )
        usage = answer.usage
        assert usage is not None
        spend = _spend((await c.http.get(f"{c.metrics_url}/metrics")).text)
    assert spend[("team-a", "priced", "input")] == pytest.approx(3 * 2.0 / 1e6)
    assert spend[("team-a", "priced", "output")] == pytest.approx(
        usage.completion_tokens * 4.0 / 1e6
    )
    assert not any(model == "free" for _, model, _ in spend)


class RequestIds:
    """Records the x-request-id each request reached the (fake) neuron with."""

    def __init__(self, app: ASGIApp) -> None:
        self.app, self.seen = app, list[str | None]()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers: dict[bytes, bytes] = dict(scope["headers"])
            given = headers.get(b"x-request-id")
            self.seen.append(given.decode() if given else None)
        await self.app(scope, receive, send)


async def test_a_request_id_goes_from_client_to_neuron_and_back() -> None:
    n1 = FakeNeuron("n1", loaded={"chat-a": GiB})
    recorder: Any = RequestIds(n1.app)
    n1.app = recorder
    async with cluster(n1, catalogue=[spec("chat-a")]) as c:
        given = await c.http.post(
            "/v1/chat/completions", json=chat_body("chat-a"), headers={"x-request-id": "req-42"}
        )
        made = await c.http.post("/v1/chat/completions", json=chat_body("chat-a"))
    assert given.headers["x-request-id"] == "req-42"
    generated = made.headers["x-request-id"]
    assert len(generated) == 32 and generated != "req-42"
    assert recorder.seen == ["req-42", generated]
    assert "request-id" not in given.headers  # Anthropic's name, on Anthropic's routes only


async def test_the_anthropic_sdk_sees_the_request_id() -> None:
    async with cluster(FakeNeuron("n1", loaded={"chat-a": GiB}), catalogue=[spec("chat-a")]) as c:
        client = c.anthropic()
        hi = [{"role": "user", "content": "hi"}]
        message = await client.messages.create(model="chat-a", max_tokens=5, messages=hi)
        assert message._request_id is not None and len(message._request_id) == 32
        with pytest.raises(anthropic.NotFoundError) as caught:
            await client.messages.create(model="nope", max_tokens=5, messages=hi)
        assert caught.value.request_id is not None


async def test_the_guess_never_names_a_model_the_key_may_not_use() -> None:
    n1 = FakeNeuron("n1", loaded={"secret-model": GiB, "open-model": GiB})
    keys = [{"name": "narrow", "key": "sk-narrow", "models": ["open-model"]}]
    async with cluster(
        n1,
        catalogue=[spec("secret-model"), spec("open-model")],
        auth={"enabled": True, "keys": keys},
    ) as c:
        client = c.openai("sk-narrow")
        for typo, guess in (("secret-modl", None), ("open-modl", "open-model")):
            with pytest.raises(openai.NotFoundError) as caught:
                await client.chat.completions.create(
                    model=typo, messages=[{"role": "user", "content": "hi"}]
                )
            assert "secret-model" not in caught.value.message
            assert (f"did you mean {guess}?" in caught.value.message) == (guess is not None)
