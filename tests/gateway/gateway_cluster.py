"""A gateway in front of fake neurons, all under real uvicorn servers in the test's event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx
import openai
from fakes.neuron import FakeNeuron, GiB, Running, running

from cortex.core.catalogue import ModelSpec
from cortex.core.config import GatewayConfig
from cortex.gateway.app import create_app, create_metrics_app
from cortex.gateway.assembly import Gateway, Tuning

FAST = Tuning(keepalive_interval=0.2, affinity_slack=2, retry_after=3.0)


def spec(model: str, memory: int = 2 * GiB, **fields: Any) -> ModelSpec:
    return ModelSpec(id=model, source=f"file:/models/{model}", memory=memory, **fields)


@dataclass
class Cluster:
    neurons: dict[str, FakeNeuron]
    served: dict[str, Running]
    url: str
    metrics_url: str
    gateway: Gateway
    http: httpx.AsyncClient
    clients: list[openai.AsyncOpenAI | anthropic.AsyncAnthropic] = field(default_factory=list)

    def openai(self, key: str = "none") -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)
        self.clients.append(client)
        return client

    def anthropic(self, key: str = "none") -> anthropic.AsyncAnthropic:
        client = anthropic.AsyncAnthropic(base_url=self.url, api_key=key, max_retries=0)
        self.clients.append(client)
        return client


@asynccontextmanager
async def cluster(
    *neurons: FakeNeuron,
    catalogue: Sequence[ModelSpec] = (),
    tuning: Tuning = FAST,
    **sections: dict[str, Any],
) -> AsyncIterator[Cluster]:
    """Serve the fake neurons, then a gateway configured with them (and `sections` of cortex.toml)."""
    async with AsyncExitStack() as stack:
        served = {n.name: await stack.enter_async_context(running(n.app)) for n in neurons}
        gateway_section = {"poll_interval": 0.05, "unhealthy_after": 2, "load_timeout": 60}
        gateway_section |= sections.pop("gateway", {})
        if "auth" in sections:  # spend stays with this cluster unless a test names a file
            sections["auth"] = {"spend_db": ":memory:", **sections["auth"]}
        config = GatewayConfig.model_validate(
            {
                "gateway": gateway_section,
                "neurons": [{"name": name, "endpoint": s.url} for name, s in served.items()],
                **sections,
            }
        )
        app = create_app(config, catalogue, tuning=tuning)
        live = await stack.enter_async_context(running(app, lifespan="on"))
        metrics = await stack.enter_async_context(running(create_metrics_app(app)))
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=live.url, timeout=30))
        c = Cluster(
            {n.name: n for n in neurons}, served, live.url, metrics.url, app.state.gateway, http
        )
        try:
            yield c
        finally:
            for client in c.clients:
                await client.close()
            for neuron in neurons:  # nothing left waiting on a gate: shutdown is quick
                for gate in (neuron.faults.load_gate, neuron.faults.hold):
                    if gate is not None:
                        gate.set()


async def eventually(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll until `predicate` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def chat_body(model: str, text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}
