"""`cortex gateway --kubernetes` end to end, on the real path: the real CLI with the chart's command
line (kubeconfig login, CORTEX_NAMESPACE), kmock's emulator as the API server, a real
`cortex neuron` serving the real model, the official SDKs. The test plays the operator."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import yaml
from kube_gateway import NS, emulator, neuron_object, placement

from cortex.core.catalogue import DEFAULT_CHAT_MODEL
from cortex.core.resources import NEURONS, PLACEMENTS

pytestmark = pytest.mark.asyncio(loop_scope="module")  # the emulator runs on the test's loop


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def cortex(log: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Path]:
    """A `cortex` subprocess, stopped at the end; yields its log file."""
    command = [sys.executable, "-m", "cortex.cli", *args]
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    try:
        yield log
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        finally:
            process.kill()


async def until(check: Callable[[], Awaitable[bool]], what: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await check():
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        await asyncio.sleep(0.2)


async def test_the_charts_gateway_serves_a_placement_from_a_real_neuron(
    model_cache: Path, tmp_path: Path
) -> None:
    neuron_port, port, metrics = _port(), _port(), _port()
    (tmp_path / "neuron.toml").write_text(f"[neuron]\nname = 'n1'\ncache_dir = '{model_cache}'\n")
    (tmp_path / "cortex.toml").write_text(
        f'[gateway]\nlisten = "127.0.0.1:{port}"\nmetrics_listen = "127.0.0.1:{metrics}"\n'
    )
    neuron_url, url = f"http://127.0.0.1:{neuron_port}", f"http://127.0.0.1:{port}"
    async with emulator() as kube, httpx.AsyncClient(timeout=10) as http:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(_kubeconfig(kube.url)))
        neuron_args = [
            "neuron",
            "--port",
            str(neuron_port),
            "--config",
            str(tmp_path / "neuron.toml"),
        ]
        gateway_args = ["gateway", "--kubernetes", f"--config={tmp_path / 'cortex.toml'}"]
        gateway_env = {"KUBECONFIG": str(kubeconfig), "CORTEX_NAMESPACE": NS}
        with (
            cortex(tmp_path / "neuron.log", *neuron_args, "--preload", DEFAULT_CHAT_MODEL) as nlog,
            cortex(tmp_path / "gateway.log", *gateway_args, env=gateway_env) as glog,
        ):
            await kube.create(PLACEMENTS, placement("chat", DEFAULT_CHAT_MODEL, aliases=["chat"]))

            async def ready() -> bool:
                return (await http.get(f"{url}/readyz")).status_code == 200

            await until(ready, "the gateway's watches", glog, 120)

            # The operator's part: the neuron has loaded the model; say so in status.
            async def loaded() -> bool:
                status = (await http.get(f"{neuron_url}/status")).json()
                return any(
                    m["id"] == DEFAULT_CHAT_MODEL and m["state"] == "ready"
                    for m in status["models"]
                )

            await until(loaded, "the real model on the neuron", nlog, 300)
            await kube.create(NEURONS, neuron_object("n1", neuron_url))
            await kube.set_replicas("chat", ("n1", neuron_url, "ready"))

            async def listed() -> bool:
                cards = (await http.get(f"{url}/v1/models")).json()["data"]
                return [(c["id"], c["state"]) for c in cards] == [(DEFAULT_CHAT_MODEL, "loaded")]

            await until(listed, "the placement in /v1/models", glog, 30)
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as oai:
                answer = await oai.chat.completions.create(
                    model="chat",
                    messages=[{"role": "user", "content": "Say hello."}],
                    max_tokens=8,
                )
                assert answer.choices[0].message.content
                assert answer.model == DEFAULT_CHAT_MODEL
            async with anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0) as claude:
                async with claude.messages.stream(
                    model=DEFAULT_CHAT_MODEL,
                    max_tokens=8,
                    messages=[{"role": "user", "content": "Say hello."}],
                ) as stream:
                    text = "".join([t async for t in stream.text_stream])
                assert text
            # The chart's gateway never loaded or unloaded anything itself.
            assert "POST /models/load" not in nlog.read_text()


def _kubeconfig(server: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "emulator",
        "contexts": [{"name": "emulator", "context": {"cluster": "kmock", "user": "gateway"}}],
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "gateway", "user": {"token": "gateway-token"}}],
    }
