"""A running neuron re-reads neuron.toml on SIGHUP (docs/security.md, "Rotating a key"): its
[[models]] and admin token change at once, what waits for a restart is named, and a file that
cannot be used changes nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest

from cortex.core.catalogue import ModelSpec
from cortex.core.config import ConfigError, NeuronConfig, NeuronSection
from cortex.neuron.runtime import NeuronRuntime


def _config(**neuron: object) -> NeuronConfig:
    return NeuronConfig.model_validate({"neuron": {"name": "n1", **neuron}})


async def test_models_and_token_change_at_once_and_the_rest_waits(tmp_path: Path) -> None:
    runtime = NeuronRuntime(_config(admin_token="first", port=13131, kv_tokens=4096))
    wanted = _config(admin_token="second", port=14141, kv_tokens=8192, strict_max_tokens=True)
    wanted.models = [ModelSpec(id="chat-b", source=f"file:{tmp_path}", aliases=["b"])]

    changes = await runtime.reload(wanted)

    assert changes == [
        "models: added chat-b",
        "changed neuron.admin_token, neuron.strict_max_tokens",
        "needs a restart to change: neuron.port, neuron.kv_tokens",
    ]
    section = runtime.config.neuron
    assert section.admin_secret() == "second" and section.strict_max_tokens
    assert (section.port, section.kv_tokens) == (13131, 4096)  # kept until a restart
    assert "chat-b" in {spec.id for spec in runtime.catalogue}
    assert tmp_path in runtime.allowed_paths  # its file: source may be loaded now
    assert await runtime.reload(wanted) == [
        "",
        "needs a restart to change: neuron.port, neuron.kv_tokens",
    ]

    wanted.models = []
    assert (await runtime.reload(wanted))[0] == "models: removed chat-b"
    assert "chat-b" not in {spec.id for spec in runtime.catalogue}


async def test_an_unreadable_token_file_changes_nothing(tmp_path: Path) -> None:
    runtime = NeuronRuntime(_config(admin_token="first"))
    wanted = NeuronConfig(
        neuron=NeuronSection(name="n1", admin_token_file=tmp_path / "missing"),
        models=[ModelSpec(id="chat-b", source=f"file:{tmp_path}")],
    )
    with pytest.raises(ConfigError, match="admin_token_file"):
        await runtime.reload(wanted)
    assert runtime.config.neuron.admin_secret() == "first"
    assert "chat-b" not in {spec.id for spec in runtime.catalogue}


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_sighup_reloads_a_real_neuron_process(tmp_path: Path) -> None:
    """`cortex neuron` itself: SIGHUP after the file changed swaps the admin token; a file that
    does not parse is refused, and the neuron serves on with the config it had."""
    port, path, log = _port(), tmp_path / "neuron.toml", tmp_path / "neuron.log"
    path.write_text('[neuron]\nname = "n1"\nadmin_token = "first"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}
    with log.open("w") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "cortex.cli", "neuron", "--config", str(path), "--port", str(port)),
            stdout=out,
            stderr=out,
            env=env,
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

            async def unload_as(token: str) -> int:
                """An unload of a model that is not there: 401 without the token, 404 with it."""
                try:
                    answer = await http.post(
                        "/models/unload",
                        json={"model": "absent"},
                        headers={"authorization": f"Bearer {token}"},
                    )
                except httpx.TransportError:
                    return 0
                return answer.status_code

            async def answers(token: str, code: int) -> None:
                for _ in range(3000):  # a fresh process imports torch first
                    if await unload_as(token) == code:
                        return
                    assert process.returncode is None, log.read_text()
                    await asyncio.sleep(0.02)
                raise AssertionError(f"{token} never got {code}:\n{log.read_text()}")

            await answers("first", 404)
            assert await unload_as("second") == 401
            path.write_text('[neuron]\nname = "n1"\nadmin_token = "second"\n')
            process.send_signal(signal.SIGHUP)
            await answers("second", 404)
            assert await unload_as("first") == 401

            path.write_text("[neuron\n")
            process.send_signal(signal.SIGHUP)
            for _ in range(1500):
                if "reload refused" in log.read_text():
                    break
                await asyncio.sleep(0.02)
            assert "reload refused, the config in use stays" in log.read_text()
            assert await unload_as("second") == 404 and process.returncode is None
            assert "config reloaded: changed neuron.admin_token" in log.read_text()
    finally:
        process.terminate()
        await process.wait()
