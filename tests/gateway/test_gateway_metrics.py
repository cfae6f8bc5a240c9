"""The Prometheus exposition (docs/grafana/README.md charts them), parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio

from fakes.neuron import FakeNeuron, GiB
from gateway_cluster import chat_body, cluster, eventually, spec
from prometheus_client.parser import text_string_to_metric_families

from cortex.gateway.metrics import GatewayMetrics

G7_NAMES = {
    "cortex_requests",
    "cortex_request_errors",
    "cortex_request_duration_seconds",
    "cortex_time_to_first_token_seconds",
    "cortex_tokens_per_second",
    "cortex_prompt_tokens",
    "cortex_completion_tokens",
    "cortex_cold_starts",
    "cortex_evictions",
    "cortex_in_flight_requests",
    "cortex_device_memory_bytes",
}


def samples(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


async def test_exposition_has_every_g7_metric_with_model_and_neuron_labels() -> None:
    n1 = FakeNeuron("n1", loaded={"chat-a": GiB}, available={"cold": GiB})
    gate = n1.faults.hold = asyncio.Event()
    async with cluster(n1, catalogue=[spec("chat-a"), spec("cold")]) as c:
        held = asyncio.create_task(c.http.post("/v1/chat/completions", json=chat_body("chat-a")))
        await eventually(lambda: c.gateway.fleet["n1"].in_flight["chat-a"] > 0)
        text = (await c.http.get(f"{c.metrics_url}/metrics")).text
        assert (
            samples(text)[("cortex_in_flight_requests", (("model", "chat-a"), ("neuron", "n1")))]
            == 1
        )
        gate.set()
        n1.faults.hold = None
        assert (await held).status_code == 200
        stream = await c.openai().chat.completions.create(
            model="chat-a", messages=[{"role": "user", "content": "hello there"}], stream=True
        )
        _ = [chunk async for chunk in stream]
        assert (await c.http.post("/v1/chat/completions", json=chat_body("cold"))).is_success
        assert (
            await c.http.post("/v1/chat/completions", json=chat_body("nope"))
        ).status_code == 404

        text = (await c.http.get(f"{c.metrics_url}/metrics")).text
        families = {f.name for f in text_string_to_metric_families(text)}
        assert families >= G7_NAMES
        values = samples(text)
        chat_a = (("model", "chat-a"), ("neuron", "n1"))
        assert values[("cortex_requests_total", (*chat_a, ("surface", "openai")))] == 2
        assert values[("cortex_in_flight_requests", chat_a)] == 0  # idle, yet still a series
        assert values[("cortex_prompt_tokens_total", chat_a)] == 1 + 2  # "hi", then "hello there"
        assert values[("cortex_completion_tokens_total", chat_a)] == 6
        assert values[("cortex_time_to_first_token_seconds_count", chat_a)] == 1  # the stream
        assert values[("cortex_tokens_per_second_count", chat_a)] == 2
        assert values[("cortex_cold_starts_total", (("model", "cold"), ("neuron", "n1")))] == 1
        device = (("device", "cpu-0"), ("kind", "total"), ("neuron", "n1"))
        assert values[("cortex_device_memory_bytes", device)] == n1.memory
        error = (("code", "model_not_found"), ("model", "none"), ("neuron", "none"))
        assert values[("cortex_request_errors_total", (*error, ("surface", "openai")))] == 1
        # The same registry is served on the API port too.
        assert "cortex_requests_total" in (await c.http.get("/metrics")).text


async def test_two_gateways_in_one_process_keep_separate_registries() -> None:
    n1, n2 = FakeNeuron("n1", loaded={"chat-a": GiB}), FakeNeuron("n2", loaded={"chat-a": GiB})
    async with cluster(n1, catalogue=[spec("chat-a")]) as first, cluster(n2) as second:
        answer = await first.http.post("/v1/chat/completions", json=chat_body("chat-a"))
        assert answer.is_success
        text = (await second.http.get(f"{second.metrics_url}/metrics")).text
        assert not any(name == "cortex_requests_total" for name, _ in samples(text))


def test_tokens_per_second_resolves_rates_below_one() -> None:
    # Overload slows a stream below 1 tok/s; the histogram must tell 0.3 from 0.9.
    metrics = GatewayMetrics()
    metrics.tokens_per_second.labels("chat-a", "n1").observe(0.3)
    values = samples(metrics.exposition().decode())
    bucket = "cortex_tokens_per_second_bucket"
    labels = (("model", "chat-a"), ("neuron", "n1"))
    assert values[(bucket, (("le", "0.25"), *labels))] == 0
    assert values[(bucket, (("le", "0.5"), *labels))] == 1


async def test_every_answered_request_is_counted_and_refusals_name_a_known_model() -> None:
    # Errors are a share of requests: a refusal the error handler answers (an unknown model, a
    # bad body, a draining gateway) is a request too, and one refused once its model is known
    # (the key's max_in_flight, a model it may not use) carries that model.
    n1 = FakeNeuron("n1", loaded={"chat-a": GiB})
    n1.faults.hold = asyncio.Event()
    keys = [
        {"key": "sk-one", "name": "one", "max_in_flight": 1},
        {"key": "sk-other", "name": "other", "models": ["chat-b"]},
    ]
    auth = {"enabled": True, "keys": keys}
    async with cluster(n1, catalogue=[spec("chat-a"), spec("chat-b")], auth=auth) as c:
        one, other = ({"authorization": f"Bearer sk-{k}"} for k in ("one", "other"))
        held = asyncio.create_task(
            c.http.post("/v1/chat/completions", json=chat_body("chat-a"), headers=one)
        )
        await eventually(lambda: n1.in_flight() == 1)
        refusals = [
            ("/v1/chat/completions", chat_body("chat-a"), one, 429),  # its max_in_flight
            ("/v1/messages", {**chat_body("chat-a"), "max_tokens": 5}, other, 403),
            ("/v1/chat/completions", chat_body("nope"), one, 404),
            ("/v1/chat/completions", {"model": "chat-a"}, one, 400),
        ]
        for path, body, headers, status in refusals:
            response = await c.http.post(path, json=body, headers=headers)
            assert response.status_code == status, response.text
        n1.faults.hold.set()
        assert (await held).status_code == 200

        values = samples((await c.http.get(f"{c.metrics_url}/metrics")).text)

        def total(family: str) -> float:
            return sum(v for (name, _), v in values.items() if name == family)

        assert total("cortex_requests_total") == 5
        assert total("cortex_request_errors_total") == 4
        chat_a, none = ("model", "chat-a"), ("neuron", "none")
        openai, anthropic = ("surface", "openai"), ("surface", "anthropic")
        busy = (("code", "too_many_in_flight"), chat_a, none, openai)
        forbidden = (("code", "model_not_allowed"), chat_a, none, anthropic)
        assert values[("cortex_request_errors_total", busy)] == 1
        assert values[("cortex_request_errors_total", forbidden)] == 1
        assert values[("cortex_requests_total", (chat_a, none, openai))] == 1
