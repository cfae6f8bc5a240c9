"""The operator places the real default model on a real `cortex neuron` (one load)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from operator_harness import (
    NEURONS,
    PLACEMENTS,
    Kube,
    Operator,
    neuron,
    placement,
    until,
    until_async,
)

from cortex.core.catalogue import DEFAULT_CHAT_MODEL
from cortex.core.client import NeuronClient

pytestmark = pytest.mark.asyncio(loop_scope="module")
TOKEN = "operator-test-token"


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def real_neuron(model_cache: Path, tmp_path: Path) -> AsyncIterator[str]:
    """`cortex neuron` in a subprocess, with an admin token, answering /health."""
    port = _port()
    config = tmp_path / "neuron.toml"
    config.write_text(f"[neuron]\nname = 'gpu-node-1'\ncache_dir = '{model_cache}'\n")
    log = tmp_path / "neuron.log"
    command = [sys.executable, "-m", "cortex.cli", "neuron", "--port", str(port)]
    command += ["--config", str(config), "--admin-token", TOKEN]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=2) as http:

            async def healthy() -> bool:
                try:
                    return (await http.get("/health")).status_code == 200
                except httpx.TransportError:
                    assert process.poll() is None, log.read_text()[-3000:]
                    return False

            await until_async(healthy, "the neuron to answer /health", timeout=120)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        finally:
            process.kill()


async def test_the_default_model_becomes_ready_on_a_real_neuron(
    kube: Kube, operator: Operator, real_neuron: str
) -> None:
    async with operator(admin_token=TOKEN, probe_interval=0.5):
        await kube.create(NEURONS, neuron("gpu-node-1", real_neuron))
        await kube.create(PLACEMENTS, placement("chat", DEFAULT_CHAT_MODEL, pinned=True))
        await until(
            lambda: kube.status(PLACEMENTS, "chat").get("phase") == "Ready",
            "the real model to be Ready",
            timeout=240,
        )
        status = kube.status(PLACEMENTS, "chat")
        assert [(r["neuron"], r["state"]) for r in status["replicas"]] == [("gpu-node-1", "ready")]
        client = NeuronClient(real_neuron)
        try:
            loaded = {m.id: m.state.value for m in (await client.status()).models}
        finally:
            await client.aclose()
        assert loaded == {DEFAULT_CHAT_MODEL: "ready"}
        models = await until(
            lambda: kube.status(NEURONS, "gpu-node-1").get("models"), "the Neuron's models"
        )
        assert models[0]["model"] == DEFAULT_CHAT_MODEL and models[0]["memory"] > 0
