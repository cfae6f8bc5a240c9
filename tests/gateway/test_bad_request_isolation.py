"""A bad request beside running streams, through the gateway over two real neurons.

Each neuron is the real server and runtime with a tiny random-weight Llama (real loaders, real
engine). Bad token ids are refused at the API with a 400; a request that breaks the forward itself
(a fault injected into one neuron's model) fails alone with a 500 that is not carried to the other
neuron; every stream running meanwhile ends normally.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from fakes.neuron import running
from gateway_cluster import FAST, eventually

from cortex.core.catalogue import ModelSpec
from cortex.core.config import GatewayConfig, NeuronConfig
from cortex.gateway.app import create_app
from cortex.neuron.runtime import NeuronRuntime
from cortex.neuron.server import create_app as create_neuron_app

sys.path.insert(0, str(Path(__file__).parents[1] / "neuron"))
from tiny_models import make_tiny_llama

pytestmark = pytest.mark.asyncio(loop_scope="module")  # the servers run on the fixture's loop

MODEL = "tiny"
STREAM_TOKENS = 120
POISON_WORD = "zebra"  # its token breaks the forward on neuron n1 (injected)


@dataclass
class Fleet:
    gateway: str
    runtimes: dict[str, NeuronRuntime]
    poison_id: int
    poisoned_prefills: dict[str, int]


@pytest.fixture(scope="module")
async def fleet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fleet]:
    tiny = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny")
    source = f"file:{tiny}"
    async with AsyncExitStack() as stack:
        runtimes, urls = {}, {}
        for name in ("n1", "n2"):
            cache = tmp_path_factory.mktemp(f"cache-{name}")
            config = NeuronConfig.model_validate(
                {"neuron": {"name": name, "cache_dir": str(cache), "allowed_paths": [str(tiny)]}}
            )
            runtimes[name] = NeuronRuntime(config, catalogue=[])
            app = create_neuron_app(runtimes[name])
            urls[name] = (await stack.enter_async_context(running(app, lifespan="on"))).url
            async with httpx.AsyncClient(timeout=120) as http:
                loaded = await http.post(
                    f"{urls[name]}/models/load", json={"model": MODEL, "source": source}
                )
                assert loaded.status_code == 200, loaded.text
        config = GatewayConfig.model_validate(
            {
                "gateway": {"poll_interval": 0.05, "unhealthy_after": 2},
                "neurons": [{"name": n, "endpoint": u} for n, u in urls.items()],
            }
        )
        catalogue = [ModelSpec(id=MODEL, source=source)]
        app = create_app(config, catalogue, tuning=FAST)
        gateway = await stack.enter_async_context(running(app, lifespan="on"))
        await eventually(lambda: len(app.state.gateway.replicas.ready(MODEL)) == 2)

        served = {name: runtime.served(MODEL) for name, runtime in runtimes.items()}
        poison_id = served["n1"].encode(POISON_WORD)[0]
        counts = {"n1": 0, "n2": 0}

        def watch(name: str, breaks: bool):
            def hook(_module, args) -> None:
                ids = args[0]
                if ids.shape[-1] > 1 and bool((ids == poison_id).any()):  # prefills only
                    counts[name] += 1
                    if breaks:
                        raise IndexError("index out of range in self (injected)")

            return hook

        # Hooks are set from this thread while no forward runs yet (nothing sent so far).
        for name, breaks in (("n1", True), ("n2", False)):
            embedding = served[name].weights.model.get_input_embeddings()
            embedding.register_forward_pre_hook(watch(name, breaks))
        yield Fleet(gateway.url, runtimes, poison_id, counts)


async def _stream(client: openai.AsyncOpenAI, i: int, started: asyncio.Event) -> tuple[str, int]:
    stream = await client.completions.create(
        model=MODEL,
        prompt=f"stream number {i} says",
        max_tokens=STREAM_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    finish, tokens = "", 0
    async for chunk in stream:
        started.set()
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return finish, tokens


async def test_streams_survive_bad_requests_beside_them(fleet: Fleet) -> None:
    client = openai.AsyncOpenAI(base_url=f"{fleet.gateway}/v1", api_key="x", max_retries=0)
    async with client:
        started = [asyncio.Event() for _ in range(4)]
        streams = [asyncio.create_task(_stream(client, i, started[i])) for i in range(4)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout=60)

        vocab = fleet.runtimes["n1"].served(MODEL).vocab_size
        for ids in ([vocab], [1_000_000_000], [-1]):
            with pytest.raises(openai.BadRequestError) as refused:
                await client.completions.create(model=MODEL, prompt=ids, max_tokens=4)
            assert refused.value.body["param"] == "prompt"  # type: ignore[index]

        # Breaks the forward on n1 only. Every n1 attempt must reach its client as the 500 (no
        # retry elsewhere), and n2 only sees the requests routed to it in the first place.
        statuses = []
        for i in range(12):
            try:
                await client.completions.create(
                    model=MODEL, prompt=f"{i} {POISON_WORD}", max_tokens=4
                )
                statuses.append(200)
            except openai.InternalServerError as failed:
                assert "generation failed" in str(failed.body)
                statuses.append(failed.status_code)
            if 500 in statuses and 200 in statuses:
                break
        assert statuses.count(500) == fleet.poisoned_prefills["n1"] >= 1
        assert statuses.count(200) == fleet.poisoned_prefills["n2"] >= 1

        results = await asyncio.wait_for(asyncio.gather(*streams), timeout=120)
        assert results == [("length", STREAM_TOKENS)] * 4
    async with httpx.AsyncClient(base_url=fleet.gateway) as http:
        assert (await http.get("/health")).json()["status"] == "ok"
