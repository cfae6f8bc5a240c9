"""The gateway against the real neuron HTTP API (cortex.neuron.server), over the neuron tests'
scripted runtime: the wire contract between the two, without a model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import openai
import pytest
from fakes.neuron import running
from gateway_cluster import FAST

from cortex.core.config import GatewayConfig
from cortex.gateway.app import create_app
from cortex.neuron.server import create_app as create_neuron_app


def _fake_runtime() -> ModuleType:
    # The neuron tests' runtime stand-in (scripted tokens, no torch), loaded from its file.
    path = Path(__file__).parents[1] / "neuron" / "fake_runtime.py"
    spec = importlib.util.spec_from_file_location("neuron_fake_runtime", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fake_runtime = _fake_runtime()


async def test_gateway_serves_through_the_real_neuron_api() -> None:
    runtime = fake_runtime.FakeRuntime()
    runtime.add(fake_runtime.FakeServed("tiny-chat"))
    async with running(create_neuron_app(runtime), lifespan="on") as neuron:
        config = GatewayConfig.model_validate(
            {"gateway": {"poll_interval": 0.05}, "neurons": [{"name": "n", "endpoint": neuron.url}]}
        )
        async with running(create_app(config, [], tuning=FAST), lifespan="on") as gateway:
            client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
            async with client:
                models = {m.id: m.model_dump() async for m in client.models.list()}
                assert models["tiny-chat"]["state"] == "loaded"
                assert models["tiny-chat"]["aliases"] == ["tiny"]  # from the neuron's catalogue
                assert models["tiny-embed"]["state"] == "available"

                answer = await client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "hi"}]
                )
                assert answer.choices[0].message.content == "Hello there!"
                stream = await client.chat.completions.create(
                    model="tiny-chat",
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                    stream_options={"include_usage": True},
                )
                chunks = [chunk async for chunk in stream]
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                assert text == "Hello there!" and chunks[-1].usage is not None

                # A model the neuron lists but has not loaded is loaded on demand (no source).
                vectors = await client.embeddings.create(model="tiny-embed", input="abc")
                assert len(vectors.data[0].embedding) == 26

                # A generation failing mid-stream reaches the client as an error, not a hang.
                runtime.models["tiny-chat"].finish = "error"
                stream = await client.chat.completions.create(
                    model="tiny-chat", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                with pytest.raises(openai.APIError):
                    async for _ in stream:
                        pass
