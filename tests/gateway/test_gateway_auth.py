"""API keys, allowlists and token budgets (docs/security.md), through both SDKs and both header styles."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import anthropic
import openai
import pytest
from fakes.neuron import FakeNeuron, GiB
from gateway_cluster import chat_body, cluster, eventually, spec

from cortex.cli import commands
from cortex.core.access_log import JsonFormatter
from cortex.core.errors import CortexError
from cortex.gateway.budget import MIN_PERIOD

SECRETS = {
    "alice": "sk-alice-0123",
    "bob": "sk-bob-4567",
    "carol": "sk-carol-89",
    "dave": "sk-dave",
    "root": "sk-root-admin",
    "erin": "sk-erin-2",
    "frank": "sk-frank-3",
}
AUTH = {
    "enabled": True,
    "keys": [
        {"name": "alice", "key": SECRETS["alice"]},
        {"name": "bob", "key": SECRETS["bob"], "models": ["a-alias"]},
        {"name": "carol", "key": SECRETS["carol"], "budget_tokens": 10},
        {
            "name": "dave",
            "key_env": "CORTEX_TEST_DAVE",
            "budget_tokens": 10,
            "budget_window": "60s",
        },
        {"name": "root", "key": SECRETS["root"], "admin": True},
        {"name": "erin", "key": SECRETS["erin"], "max_in_flight": 2},
        {"name": "frank", "key": SECRETS["frank"], "budget_tokens": 1000},
    ],
}
CATALOGUE = [spec("chat-a", aliases=["a-alias"]), spec("chat-b")]


def neuron() -> FakeNeuron:
    return FakeNeuron("n1", loaded={"chat-a": GiB, "chat-b": GiB})


@pytest.fixture(autouse=True)
def dave_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORTEX_TEST_DAVE", SECRETS["dave"])


async def test_both_header_styles_are_accepted() -> None:
    async with cluster(neuron(), catalogue=CATALOGUE, auth=AUTH) as c:
        chat = await c.openai(SECRETS["alice"]).chat.completions.create(
            model="chat-a", messages=[{"role": "user", "content": "hi"}]
        )
        assert chat.choices[0].message.content == "Hello from n1."
        message = await c.anthropic(SECRETS["alice"]).messages.create(
            model="chat-a", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )
        assert message.content[0].text == "Hello from n1."  # type: ignore[union-attr]
        bearer = {"Authorization": f"Bearer {SECRETS['alice']}"}
        assert (await c.http.get("/v1/models", headers=bearer)).status_code == 200
        assert (await c.http.get("/v1/models", headers={"x-api-key": SECRETS["alice"]})).is_success


async def test_missing_or_wrong_key_is_401_in_each_surface_shape() -> None:
    async with cluster(neuron(), catalogue=CATALOGUE, auth=AUTH) as c:
        missing = await c.http.post("/v1/chat/completions", json=chat_body("chat-a"))
        assert missing.status_code == 401
        assert missing.json()["error"]["type"] == "authentication_error"
        assert "x-api-key" in missing.json()["error"]["message"]
        wrong = await c.http.post(
            "/v1/messages",
            json={**chat_body("chat-a"), "max_tokens": 5},
            headers={"x-api-key": "sk-nobody"},
        )
        assert wrong.status_code == 401
        assert wrong.json() == {
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid API key"},
        }
        with pytest.raises(openai.AuthenticationError):
            await c.openai("sk-nobody").models.list()
        with pytest.raises(anthropic.AuthenticationError):
            await c.anthropic("sk-nobody").messages.create(
                model="chat-a", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            )
        # Probes stay open.
        for probe in ("/health", "/livez", "/readyz"):
            assert (await c.http.get(probe)).status_code == 200


async def test_allowlist_admits_models_by_id_or_alias() -> None:
    async with cluster(neuron(), catalogue=CATALOGUE, auth=AUTH) as c:
        bob = c.openai(SECRETS["bob"])
        for name in ("chat-a", "a-alias"):
            answer = await bob.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}]
            )
            assert answer.choices[0].message.content
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await bob.chat.completions.create(
                model="chat-b", messages=[{"role": "user", "content": "hi"}]
            )
        assert "bob" in str(caught.value) and "chat-b" in str(caught.value)
        with pytest.raises(anthropic.PermissionDeniedError):
            await c.anthropic(SECRETS["bob"]).messages.create(
                model="chat-b", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            )


@pytest.mark.parametrize(("who", "window"), [("carol", False), ("dave", True)])
async def test_token_budget_ends_in_429_with_retry_after(who: str, window: bool) -> None:
    async with cluster(neuron(), catalogue=CATALOGUE, auth=AUTH) as c:
        client = c.openai(SECRETS[who])
        spent = 0
        while spent < 10:  # each answer costs its prompt plus three completion tokens
            answer = await client.chat.completions.create(
                model="chat-a", messages=[{"role": "user", "content": "hi"}]
            )
            assert answer.usage is not None
            spent += answer.usage.total_tokens
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(
                model="chat-a", messages=[{"role": "user", "content": "hi"}]
            )
        retry = int(caught.value.response.headers["retry-after"])
        assert caught.value.body["code"] == "budget_exceeded"  # type: ignore[index]
        # A charge counts until the end of its period of the window (10 s at least).
        assert (0 < retry <= 60 + MIN_PERIOD) if window else retry == 3600


async def test_max_in_flight_caps_the_requests_a_key_runs_at_once() -> None:
    n1 = neuron()
    gate = n1.faults.hold = asyncio.Event()  # answers wait here until the test lets them go
    hi = [{"role": "user", "content": "hi"}]
    async with cluster(n1, catalogue=CATALOGUE, auth=AUTH) as c:
        erin, ledger = c.openai(SECRETS["erin"]), c.gateway.ledger
        running = [
            asyncio.create_task(erin.chat.completions.create(model="chat-a", messages=hi)),
            asyncio.create_task(
                erin.chat.completions.create(model="chat-a", messages=hi, stream=True)
            ),
        ]
        await eventually(lambda: len(n1.requests) == 2)
        with pytest.raises(openai.RateLimitError) as caught:
            await erin.chat.completions.create(model="chat-a", messages=hi)
        assert caught.value.body["code"] == "too_many_in_flight"  # type: ignore[index]
        assert caught.value.response.headers["retry-after"] == "1"
        with pytest.raises(anthropic.RateLimitError) as refused:
            await c.anthropic(SECRETS["erin"]).messages.create(
                model="chat-a", max_tokens=5, messages=hi
            )
        assert "max_in_flight" in refused.value.message
        # Another key is not held back by erin's limit.
        alice = asyncio.create_task(
            c.openai(SECRETS["alice"]).chat.completions.create(model="chat-a", messages=hi)
        )
        await eventually(lambda: len(n1.requests) == 3)
        gate.set()
        answer, stream, _ = await asyncio.gather(*running, alice)
        assert answer.choices[0].message.content == "Hello from n1."
        assert [chunk async for chunk in stream]
        assert ledger.running("erin") == 0  # every slot back, the stream's once it ended
        again = await erin.chat.completions.create(model="chat-a", messages=hi)
        assert again.choices[0].message.content == "Hello from n1."


async def test_a_budgeted_key_reads_what_is_left_in_each_surfaces_headers() -> None:
    """OpenAI's x-ratelimit-*-tokens and Anthropic's anthropic-ratelimit-tokens-*: the limit, and
    what is left once this request's worst case is held; the key's tokens are also a metric."""
    hi = [{"role": "user", "content": "hi"}]
    async with cluster(neuron(), catalogue=CATALOGUE, auth=AUTH) as c:
        frank = c.openai(SECRETS["frank"])
        first = await frank.chat.completions.with_raw_response.create(
            model="chat-a", messages=hi, max_tokens=5
        )
        usage = first.parse().usage
        assert usage is not None and first.headers["x-ratelimit-limit-tokens"] == "1000"
        left = int(first.headers["x-ratelimit-remaining-tokens"])
        assert 800 < left < 1000  # the body's bytes, the template's part and max_tokens held
        second = await frank.chat.completions.with_raw_response.create(
            model="chat-a", messages=hi, max_tokens=5
        )
        assert int(second.headers["x-ratelimit-remaining-tokens"]) == left - usage.total_tokens
        streamed = await frank.chat.completions.with_raw_response.create(
            model="chat-a", messages=hi, max_tokens=5, stream=True
        )
        assert int(streamed.headers["x-ratelimit-remaining-tokens"]) < left - usage.total_tokens
        _ = [chunk async for chunk in streamed.parse()]
        message = await c.anthropic(SECRETS["frank"]).messages.with_raw_response.create(
            model="chat-a", max_tokens=5, messages=hi
        )
        assert message.headers["anthropic-ratelimit-tokens-limit"] == "1000"
        assert int(message.headers["anthropic-ratelimit-tokens-remaining"]) < left
        unbudgeted = await c.openai(SECRETS["alice"]).chat.completions.with_raw_response.create(
            model="chat-a", messages=hi
        )
        assert "x-ratelimit-limit-tokens" not in unbudgeted.headers
        scraped = (await c.http.get(f"{c.metrics_url}/metrics")).text
        assert 'cortex_key_tokens_total{key="frank",kind="completion"} 12.0' in scraped


async def test_streamed_usage_is_charged_to_the_key() -> None:
    async with cluster(neuron(), catalogue=CATALOGUE, auth=AUTH) as c:
        stream = await c.openai(SECRETS["carol"]).chat.completions.create(
            model="chat-a", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        _ = [chunk async for chunk in stream]
        carol = c.gateway.auth.authenticate({"x-api-key": SECRETS["carol"]})
        assert c.gateway.ledger.spent(carol, time.time()) == 4  # 1 prompt + 3 completion
        assert c.gateway.ledger.reserved("carol") == 0


async def test_keys_never_reach_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with cluster(neuron(), catalogue=CATALOGUE, auth=AUTH) as c:
        for secret in SECRETS.values():
            await c.http.post(
                "/v1/chat/completions",
                json=chat_body("chat-b"),
                headers={"Authorization": f"Bearer {secret}"},
            )
        await c.http.post(
            "/v1/chat/completions", json=chat_body("x"), headers={"x-api-key": "sk-bad"}
        )
    logged = caplog.text
    assert logged  # something was logged at debug level
    assert not any(secret in logged for secret in [*SECRETS.values(), "sk-bad"])


ADMIN_SURFACE = ("/fleet", "/", "/docs", "/openapi.json", "/metrics")


async def test_the_admin_surface_needs_an_admin_key() -> None:
    async with cluster(neuron(), catalogue=CATALOGUE, auth=AUTH) as c:
        neuron_url = c.served["n1"].url
        for path in ADMIN_SURFACE:
            anonymous = await c.http.get(path)
            assert anonymous.status_code == 401 and neuron_url not in anonymous.text, path
            if path == "/":  # a browser gets the page's key form, not an error envelope
                assert 'action="/session"' in anonymous.text
            else:
                assert anonymous.json()["error"]["type"] == "authentication_error"
            user = await c.http.get(path, headers={"x-api-key": SECRETS["alice"]})
            assert user.status_code == 403 and neuron_url not in user.text, path
            admin = await c.http.get(path, headers={"x-api-key": SECRETS["root"]})
            assert admin.status_code == 200, path
        fleet = await c.http.get("/fleet", headers={"Authorization": f"Bearer {SECRETS['root']}"})
        assert fleet.json()["neurons"][0]["endpoint"] == neuron_url
        schema = await c.http.get("/openapi.json", headers={"x-api-key": SECRETS["root"]})
        assert "/v1/chat/completions" in schema.json()["paths"]
        # Metrics stay open on their own port, for Prometheus.
        assert (await c.http.get(f"{c.metrics_url}/metrics")).status_code == 200


async def test_health_details_are_for_admin_keys_only() -> None:
    async with cluster(neuron(), catalogue=CATALOGUE, auth=AUTH) as c:
        for headers in ({}, {"x-api-key": SECRETS["alice"]}, {"x-api-key": "sk-wrong"}):
            summary = await c.http.get("/health", headers=headers)
            assert summary.status_code == 200 and summary.json() == {"status": "ok"}
        detailed = await c.http.get("/health", headers={"x-api-key": SECRETS["root"]})
        assert detailed.json()["status"] == "ok" and "n1" in detailed.json()["neurons"]


async def test_without_auth_everything_stays_open() -> None:
    async with cluster(neuron(), catalogue=CATALOGUE) as c:
        for path in ADMIN_SURFACE:
            assert (await c.http.get(path)).status_code == 200, path
        assert "n1" in (await c.http.get("/health")).json()["neurons"]


async def test_model_lists_follow_the_allowlist() -> None:
    async with cluster(neuron(), catalogue=CATALOGUE, auth=AUTH) as c:
        bob = {"x-api-key": SECRETS["bob"]}  # allowed chat-a through its alias a-alias
        listed = (await c.http.get("/v1/models", headers=bob)).json()["data"]
        assert [m["id"] for m in listed] == ["chat-a"]
        assert (await c.http.get("/v1/models/a-alias", headers=bob)).json()["id"] == "chat-a"
        # Outside the allowlist reads as absent, and a guess names only what bob may use.
        hidden = await c.http.get("/v1/models/chat-b", headers=bob)
        assert hidden.status_code == 404
        message = hidden.json()["error"]["message"]
        assert message == "model 'chat-b' does not exist; did you mean chat-a?"
        near = await c.http.get("/v1/models/chat-b2", headers=bob)
        assert near.status_code == 404
        assert "did you mean chat-b" not in near.json()["error"]["message"]
        everyone = (await c.http.get("/v1/models", headers={"x-api-key": SECRETS["alice"]})).json()
        assert {m["id"] for m in everyone["data"]} == {"chat-a", "chat-b"}


async def test_cortex_status_reads_the_fleet_with_an_admin_key(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with cluster(neuron(), catalogue=CATALOGUE, auth=AUTH) as c:
        assert await commands.status(c.url) == 1
        assert "needs an admin key" in capsys.readouterr().err
        assert await commands.status(c.url, SECRETS["root"]) == 0
        assert "n1" in capsys.readouterr().out


async def test_the_admin_api_lists_keys_with_what_they_spent_and_never_a_secret(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with cluster(neuron(), catalogue=CATALOGUE, auth=AUTH) as c:
        answer = await c.openai(SECRETS["frank"]).chat.completions.create(
            model="chat-a", messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.usage is not None
        refused = await c.http.get("/admin/keys", headers={"x-api-key": SECRETS["frank"]})
        assert refused.status_code == 403
        listed = await c.http.get("/admin/keys", headers={"x-api-key": SECRETS["root"]})
        assert listed.status_code == 200
        assert not any(secret in listed.text for secret in SECRETS.values())
        keys = {key["name"]: key for key in listed.json()["keys"]}
        assert list(keys) == [k["name"] for k in AUTH["keys"]]  # type: ignore[index]
        spent = answer.usage.total_tokens
        assert keys["frank"] | {"spent": spent, "remaining": 1000 - spent} == keys["frank"]
        assert keys["frank"]["budget_tokens"] == 1000 and keys["frank"]["running"] == 0
        assert keys["dave"]["budget_window"] == 60 and keys["dave"]["spent"] == 0
        assert keys["erin"]["max_in_flight"] == 2 and keys["erin"]["spent"] is None
        assert keys["bob"]["models"] == ["a-alias"] and keys["root"]["admin"]

        assert await commands.keys(c.url, SECRETS["root"]) == 0
        table = capsys.readouterr().out
        assert "frank" in table and "1,000 in total" in table and f"{1000 - spent:,}" in table
        assert "10 per 60s" in table and "0/2" in table
        with pytest.raises(CortexError, match="is a neuron: cortex keys needs a gateway"):
            await commands.keys(c.served["n1"].url, None)  # a neuron's endpoint


async def test_an_admin_resets_a_spent_key_and_its_budget_is_whole_again(
    capsys: pytest.CaptureFixture[str],
) -> None:
    hi = [{"role": "user", "content": "hi"}]
    async with cluster(neuron(), catalogue=CATALOGUE, auth=AUTH) as c:
        carol = c.openai(SECRETS["carol"])  # 10 tokens in total
        while True:
            try:
                await carol.chat.completions.create(model="chat-a", messages=hi)
            except openai.RateLimitError:
                break
        root = {"x-api-key": SECRETS["root"]}
        refused = await c.http.post(
            "/admin/keys/carol/reset", headers={"x-api-key": SECRETS["carol"]}
        )
        assert refused.status_code == 403
        unknown = await c.http.post("/admin/keys/karol/reset", headers=root)
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "key_not_found"
        assert "did you mean carol?" in unknown.json()["error"]["message"]

        assert await commands.keys(c.url, SECRETS["root"], reset="carol") == 0
        assert "reset carol: spent 0, 10 tokens left" in capsys.readouterr().out
        answer = await carol.chat.completions.create(model="chat-a", messages=hi)
        assert answer.usage is not None
        again = (await c.http.post("/admin/keys/carol/reset", headers=root)).json()
        assert again["spent"] == 0 and again["remaining"] == 10
        with pytest.raises(CortexError, match="no API key named 'nobody'"):
            await commands.keys(c.url, SECRETS["root"], reset="nobody")


async def test_the_usage_log_has_a_line_per_request_and_no_content(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="cortex.usage")
    hi = [{"role": "user", "content": "a secret prompt"}]
    async with cluster(neuron(), catalogue=CATALOGUE, auth=AUTH, gateway={"usage_log": True}) as c:
        await c.openai(SECRETS["frank"]).chat.completions.create(model="chat-a", messages=hi)
        stream = await c.anthropic(SECRETS["alice"]).messages.create(
            model="a-alias", max_tokens=5, messages=hi, stream=True
        )
        _ = [event async for event in stream]
        with pytest.raises(openai.APIStatusError) as refused:
            await c.openai(SECRETS["bob"]).chat.completions.create(model="chat-b", messages=hi)
        anonymous = await c.http.post("/v1/chat/completions", json=chat_body("chat-a"))
        assert anonymous.status_code == 401
    records = [r for r in caplog.records if r.name == "cortex.usage"]
    first, second, bobs, nobodys = (getattr(r, "usage") for r in records)  # noqa: B009
    assert [(u["key"], u["surface"]) for u in (first, second)] == [
        ("frank", "openai"),
        ("alice", "anthropic"),
    ]
    assert first | {"model": "chat-a", "neuron": "n1", "outcome": "ok"} == first
    assert (first["prompt_tokens"], first["completion_tokens"]) == (3, 3)
    assert first["ttft_ms"] is None and second["ttft_ms"] is not None  # only a stream has one
    assert second["model"] == "chat-a" and second["duration_ms"] >= second["ttft_ms"]
    assert "key=frank model=chat-a neuron=n1 surface=openai outcome=ok" in records[0].getMessage()
    # Refused before dispatch: who asked, for which model, and why not (no key: "-").
    code = refused.value.body["code"]  # type: ignore[index]
    assert bobs | {"key": "bob", "outcome": code, "model": "chat-b"} == bobs
    assert (nobodys["key"], nobodys["outcome"]) == ("-", "invalid_api_key")
    assert not any(
        "secret prompt" in r.getMessage() or SECRETS["frank"] in r.getMessage()
        for r in caplog.records
    )

    entry = json.loads(JsonFormatter().format(records[0]))
    assert entry["logger"] == "cortex.usage" and entry["usage"] == first
