"""serve(): the API and the metrics endpoint on their configured addresses, stopped by cancel."""

from __future__ import annotations

import asyncio
import socket

import httpx
from fakes.neuron import FakeNeuron, GiB, running
from gateway_cluster import eventually

from cortex.core.config import GatewayConfig, NeuronEntry
from cortex.gateway.app import serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_serve_runs_api_and_metrics_until_cancelled() -> None:
    neuron = FakeNeuron("embedded", loaded={"m": GiB})
    async with running(neuron.app) as live:
        api, metrics = free_port(), free_port()
        config = GatewayConfig.model_validate(
            {"gateway": {"listen": f"127.0.0.1:{api}", "metrics_listen": f"127.0.0.1:{metrics}"}}
        )
        extra = [NeuronEntry(name="embedded", endpoint=live.url)]
        task = asyncio.create_task(serve(config, [], extra_neurons=extra))
        async with httpx.AsyncClient() as http:
            ready = False

            async def probe() -> None:
                nonlocal ready
                try:
                    ready = (await http.get(f"http://127.0.0.1:{api}/readyz")).status_code == 200
                except httpx.TransportError:
                    ready = False

            deadline = asyncio.get_running_loop().time() + 10
            while not ready and asyncio.get_running_loop().time() < deadline:
                await probe()
                await asyncio.sleep(0.02)
            assert ready
            models = (await http.get(f"http://127.0.0.1:{api}/v1/models")).json()["data"]
            assert [m["id"] for m in models] == ["m"]  # the neuron's own model, no config needed
            scrape = await http.get(f"http://127.0.0.1:{metrics}/metrics")
            assert "cortex_neuron_healthy" in scrape.text
        task.cancel()
        await eventually(task.done)
        with socket.socket() as sock:  # the ports are free again
            sock.bind(("127.0.0.1", api))
