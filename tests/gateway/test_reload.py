"""A running gateway re-reads cortex.toml on SIGHUP (README.md, "Changing it while the gateway
runs"): keys, models, [[neurons]] and the eviction strategy change at once; other fields wait for
a restart."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes.neuron import FakeNeuron, GiB, running
from gateway_cluster import chat_body, cluster, eventually, spec

from cortex.core.config import ConfigError, GatewayConfig, NeuronEntry
from cortex.core.reload import hangup_handler
from cortex.gateway.registry import Fleet

AUTH = {"enabled": True, "spend_db": ":memory:", "keys": [{"name": "alice", "key": "sk-alice"}]}


def reloaded(current: GatewayConfig, **sections: Any) -> GatewayConfig:
    """The running config with `sections` replaced, as a re-read file would give it."""
    return GatewayConfig.model_validate({**current.model_dump(), **sections})


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_keys_models_neurons_and_strategy_change_at_once() -> None:
    n1 = FakeNeuron("n1", loaded={"chat-a": GiB})
    n2 = FakeNeuron("n2", loaded={"chat-b": GiB})
    async with (
        running(n2.app) as served_n2,
        cluster(n1, catalogue=[spec("chat-a")], auth=AUTH) as c,
    ):
        http, gateway = c.http, c.gateway
        assert (
            await http.post(
                "/v1/chat/completions", json=chat_body("chat-a"), headers=bearer("sk-alice")
            )
        ).is_success
        config = reloaded(
            gateway.config,
            auth={**AUTH, "keys": [{"name": "bob", "key": "sk-bob", "models": ["bee"]}]},
            models=[spec("chat-b", aliases=["bee"]).model_dump()],
            neurons=[{"name": "n2", "endpoint": served_n2.url}],
            eviction={"strategy": "lru"},
            gateway={**gateway.config.gateway.model_dump(), "listen": "127.0.0.1:1"},
        )

        changes = await gateway.reload(config)

        assert changes == [
            "api keys: added bob; removed alice",
            "models: added chat-b",
            "neurons: added n2; removed n1",
            "eviction: lru, defrag_after_cycles 0",
            "needs a restart to change: gateway.listen",
        ]
        # n1 ran nothing, so it left at once; n2 was polled before the reload returned.
        assert list(gateway.fleet.neurons) == ["n2"] and gateway.fleet.healthy("n2")
        assert gateway.placer.policy.strategy == "lru"
        assert gateway.config.gateway.listen != "127.0.0.1:1"  # not applied, only named
        refused = await http.post(
            "/v1/chat/completions", json=chat_body("chat-a"), headers=bearer("sk-alice")
        )
        assert refused.status_code == 401
        answer = await http.post(
            "/v1/chat/completions", json=chat_body("bee"), headers=bearer("sk-bob")
        )
        assert answer.json()["choices"][0]["message"]["content"] == "Hello from n2."
        models = await http.get("/v1/models", headers=bearer("sk-bob"))
        assert "chat-b" in {m["id"] for m in models.json()["data"]}
        # The same file again: only what still waits for a restart.
        assert await gateway.reload(config) == ["needs a restart to change: gateway.listen"]


async def test_a_neuron_taken_out_finishes_its_requests_and_takes_no_new_ones() -> None:
    n1 = FakeNeuron("n1", loaded={"chat-a": GiB})
    n2 = FakeNeuron("n2", loaded={"chat-a": GiB})
    gate = n1.faults.hold = asyncio.Event()
    async with running(n2.app) as served_n2, cluster(n1, catalogue=[spec("chat-a")]) as c:
        fleet = c.gateway.fleet
        held = asyncio.create_task(c.http.post("/v1/chat/completions", json=chat_body("chat-a")))
        await eventually(lambda: fleet["n1"].in_flight["chat-a"] == 1)

        config = reloaded(c.gateway.config, neurons=[{"name": "n2", "endpoint": served_n2.url}])
        assert await c.gateway.reload(config) == ["neurons: added n2; removed n1"]

        assert fleet["n1"].leaving and not fleet.healthy("n1")  # still counted: busy
        health = (await c.http.get("/health")).json()["neurons"]["n1"]
        assert not health["healthy"] and "taken out of the fleet" in health["error"]
        answer = await c.http.post("/v1/chat/completions", json=chat_body("chat-a"))
        assert answer.json()["choices"][0]["message"]["content"] == "Hello from n2."
        gate.set()
        finished = await held
        assert finished.json()["choices"][0]["message"]["content"] == "Hello from n1."
        assert "n1" not in fleet.neurons  # gone with its last request
        await eventually(lambda: fleet.healthy("n2"))
        assert len(n1.requests) == 1


async def test_a_changed_endpoint_gets_a_new_client_and_an_unreadable_key_changes_nothing() -> None:
    n1, moved = FakeNeuron("n1", loaded={"chat-a": GiB}), FakeNeuron("n1", reply="moved")
    moved.models = dict(n1.models)
    async with (
        running(moved.app) as served_moved,
        cluster(n1, catalogue=[spec("chat-a")], auth=AUTH) as c,
    ):
        gateway = c.gateway
        broken = reloaded(
            gateway.config,
            auth={**AUTH, "keys": [{"name": "eve", "key_env": "CORTEX_TEST_UNSET_KEY"}]},
            neurons=[{"name": "n1", "endpoint": served_moved.url}],
        )
        with pytest.raises(ConfigError, match="eve"):
            await gateway.reload(broken)
        ok = await c.http.post(
            "/v1/chat/completions", json=chat_body("chat-a"), headers=bearer("sk-alice")
        )
        assert ok.json()["choices"][0]["message"]["content"] == "Hello from n1."  # all as before

        old_client = gateway.fleet["n1"].client
        gateway.fleet["n1"].cordoned = True  # as POST /admin/neurons/n1/cordon does
        config = reloaded(gateway.config, neurons=[{"name": "n1", "endpoint": served_moved.url}])
        assert await gateway.reload(config) == ["neurons: changed n1"]
        assert gateway.fleet["n1"].client is not old_client
        assert gateway.fleet["n1"].cordoned  # a cordon outlives the move
        moved_answer = await c.http.post(
            "/v1/chat/completions", json=chat_body("chat-a"), headers=bearer("sk-alice")
        )
        assert moved_answer.json()["choices"][0]["message"]["content"] == "moved"


async def test_a_first_budget_whose_spend_store_cannot_open_changes_nothing(
    tmp_path: Path,
) -> None:
    """The store opens before any key changes: a key with a budget is never live unheld."""
    unopenable = {**AUTH, "spend_db": str(tmp_path)}  # a directory: SQLite cannot open it
    async with cluster(FakeNeuron("n1", loaded={"chat-a": GiB}), auth=unopenable) as c:
        carol = {"name": "carol", "key": "sk-carol", "budget_tokens": 10}
        broken = reloaded(c.gateway.config, auth={**unopenable, "keys": [carol]})
        with pytest.raises(ConfigError, match="spend_db"):
            await c.gateway.reload(broken)
        body = chat_body("chat-a")
        refused = await c.http.post("/v1/chat/completions", json=body, headers=bearer("sk-carol"))
        assert refused.status_code == 401  # the new keys are not in use
        ok = await c.http.post("/v1/chat/completions", json=body, headers=bearer("sk-alice"))
        assert ok.is_success and c.gateway.ledger.store is None


async def test_a_reload_warns_that_keys_from_variables_are_not_rotated(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORTEX_TEST_CI_KEY", "sk-ci")
    async with cluster(FakeNeuron("n1", loaded={"chat-a": GiB}), auth=AUTH) as c:
        keys = [*AUTH["keys"], {"name": "ci", "key_env": "CORTEX_TEST_CI_KEY"}]
        await c.gateway.reload(reloaded(c.gateway.config, auth={**AUTH, "keys": keys}))
    [warning] = [r for r in caplog.records if r.name == "cortex.gateway.assembly"]
    said = warning.getMessage()
    assert warning.levelname == "WARNING" and "api keys ci come from" in said and "restart" in said


async def test_a_reload_that_fails_unexpectedly_is_logged_on_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def apply(config: GatewayConfig) -> list[str]:
        raise RuntimeError("disk on fire")

    hangup_handler(GatewayConfig, apply)()
    await eventually(lambda: any(r.name == "cortex.reload" for r in caplog.records))
    [record] = [r for r in caplog.records if r.name == "cortex.reload"]
    assert record.levelname == "ERROR" and record.exc_info is None
    assert record.getMessage().endswith("RuntimeError: disk on fire")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(port: int, neuron: str, key: str) -> str:
    return f"""
[gateway]
listen = "127.0.0.1:{port}"
metrics_listen = "127.0.0.1:{_port()}"
poll_interval = 0.05

[auth]
enabled = true
spend_db = ":memory:"
keys = [{{ name = "ops", key = "{key}" }}]

[[neurons]]
name = "n1"
endpoint = "{neuron}"

[[models]]
id = "chat-a"
source = "file:/models/chat-a"
"""


async def test_sighup_reloads_a_real_gateway_process(tmp_path: Path) -> None:
    """`cortex gateway` itself: SIGHUP after the file changed swaps the key; a file that does
    not parse is refused, and the gateway serves on with the config it had."""
    n1 = FakeNeuron("n1", loaded={"chat-a": GiB})
    port, path, log = _port(), tmp_path / "cortex.toml", tmp_path / "gateway.log"
    async with (
        running(n1.app) as served,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http,
    ):
        path.write_text(_config(port, served.url, "sk-first"))
        with log.open("w") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "cortex.cli",
                "gateway",
                "--config",
                str(path),
                stdout=out,
                stderr=out,
                env=os.environ,
            )
        try:

            async def status(key: str) -> int:
                try:
                    answer = await http.post(
                        "/v1/chat/completions", json=chat_body("chat-a"), headers=bearer(key)
                    )
                except httpx.TransportError:
                    return 0
                return answer.status_code

            async def becomes(key: str, code: int) -> None:
                for _ in range(1500):
                    if await status(key) == code:
                        return
                    assert process.returncode is None, log.read_text()
                    await asyncio.sleep(0.02)
                raise AssertionError(f"{key} never got {code}:\n{log.read_text()}")

            await becomes("sk-first", 200)
            path.write_text(_config(port, served.url, "sk-second"))
            process.send_signal(signal.SIGHUP)
            await becomes("sk-second", 200)
            assert await status("sk-first") == 401

            path.write_text("[gateway\n")
            process.send_signal(signal.SIGHUP)
            await eventually(lambda: "reload refused" in log.read_text())
            assert await status("sk-second") == 200 and process.returncode is None
            assert "config reloaded: api keys: added ops" not in log.read_text()
            assert "config reloaded: api keys: changed ops" in log.read_text()
        finally:
            process.terminate()
            await process.wait()


async def test_reloads_under_traffic_lose_no_request_and_leak_no_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Twenty reloads that move n1 between two spellings of its address, while sixty streamed
    and plain requests run: every request succeeds, no poll or request finds a client closed
    under it (the neuron is never suspected), and every old client is closed."""
    n1 = FakeNeuron("n1", loaded={"chat-a": GiB})
    async with cluster(n1, catalogue=[spec("chat-a")]) as c:
        fleet, url = c.gateway.fleet, c.served["n1"].url
        spellings = [url, url.replace("127.0.0.1", "localhost")]
        sdk = c.openai()

        async def ask(i: int) -> str:
            if i % 2:
                stream = await sdk.chat.completions.create(
                    model="chat-a", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                return "".join(
                    [
                        chunk.choices[0].delta.content or ""
                        async for chunk in stream
                        if chunk.choices
                    ]
                )
            answer = await c.http.post("/v1/chat/completions", json=chat_body("chat-a"))
            assert answer.status_code == 200, answer.text
            return str(answer.json()["choices"][0]["message"]["content"])

        async def reloads() -> None:
            for turn in range(20):
                entry = {"name": "n1", "endpoint": spellings[turn % 2 == 0]}
                await c.gateway.reload(reloaded(c.gateway.config, neurons=[entry]))
                await asyncio.sleep(0)

        answers, _ = await asyncio.gather(asyncio.gather(*(ask(i) for i in range(60))), reloads())
        assert answers == ["Hello from n1."] * 60
        await eventually(lambda: not fleet._retired and not fleet._closing)
        assert list(fleet.neurons) == ["n1"] and fleet.healthy("n1")
        assert fleet["n1"].entry.endpoint == spellings[0]  # the last reload's spelling
        assert "suspect" not in caplog.text and "unhealthy" not in caplog.text


async def test_a_load_on_a_neuron_taken_out_ends_failed_not_broken() -> None:
    """An admin load's progress stream whose neuron a reload takes out ends with a `failed`
    line once the neuron answers the load (the stream stays whole), and the gateway serves on."""
    n1 = FakeNeuron("n1", loaded={"chat-a": GiB}, available={"cold": GiB})
    gate = n1.faults.load_gate = asyncio.Event()  # the load is answered when the test says
    async with cluster(n1, catalogue=[spec("chat-a"), spec("cold")]) as c:
        async with c.http.stream("POST", "/admin/models/cold/load", json={"neuron": "n1"}) as load:
            lines = load.aiter_lines()
            assert '"state":"loading"' in await anext(lines)
            await eventually(lambda: c.gateway.placer.loading("cold") == ["n1"])
            assert await c.gateway.reload(reloaded(c.gateway.config, neurons=[])) == [
                "neurons: removed n1"
            ]
            gate.set()
            rest = [line async for line in lines]
        assert '"state":"failed"' in rest[-1] and "n1" in rest[-1], rest
        assert (await c.http.get("/health")).status_code in (200, 503)
        assert "n1" not in c.gateway.fleet.neurons


async def test_a_neuron_back_before_it_drained_gets_a_fresh_handle() -> None:
    """Retire, then the same neuron again while a request still runs on the old handle (a
    Neuron deleted and recreated, a reload undone): a new handle that does not say it is
    leaving, and the old client closes with that request."""
    fleet = Fleet([NeuronEntry(name="n1", endpoint="http://127.0.0.1:1")])
    old = fleet["n1"]
    fleet.begin("n1", "chat-a")
    fleet.retire("n1")
    assert fleet["n1"] is old and old.leaving and "taken out" in (old.last_error or "")
    back = fleet.replace(NeuronEntry(name="n1", endpoint="http://127.0.0.1:1"))
    assert back is not old and not back.leaving and back.last_error is None
    assert back.in_flight is old.in_flight  # the running request is still counted
    assert fleet._retired == [old]
    fleet.end("n1", "chat-a")
    await eventually(lambda: not fleet._retired and not fleet._closing)  # old closed
    assert list(fleet.neurons.values()) == [back]
    await fleet.aclose()
