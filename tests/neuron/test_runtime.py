"""The neuron runtime on the real default models: loading, single-flight, failures, unload, generation."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from tiny_models import make_tiny_llama

from cortex.core.catalogue import DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL
from cortex.core.client import NeuronClient
from cortex.core.config import NeuronConfig
from cortex.core.errors import CapacityExhausted, ModelBusy, ModelLoadFailed, ModelNotFound
from cortex.core.fleet import LoadRequest, ModelState
from cortex.neuron.generation import Finished, SamplingParams, TextDelta
from cortex.neuron.metrics import NeuronMetrics
from cortex.neuron.runtime import NeuronRuntime
from cortex.neuron.server import create_app as create_neuron_app

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
async def runtime(
    model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[NeuronRuntime]:
    config = NeuronConfig.model_validate(
        {
            "neuron": {
                "name": "test",
                "cache_dir": str(model_cache),
                "allowed_paths": [str(tmp_path_factory.getbasetemp())],
                "max_running": 4,
                "max_queue": 4,
            }
        }
    )
    runtime = NeuronRuntime(config)
    await runtime.start()
    yield runtime
    await runtime.stop()


async def test_fifty_concurrent_loads_are_one_load(runtime: NeuronRuntime) -> None:
    calls = 0
    original = runtime._place_and_load

    async def counting(*args: object) -> None:
        nonlocal calls
        calls += 1
        await original(*args)  # type: ignore[arg-type]

    runtime._place_and_load = counting  # type: ignore[method-assign]
    try:
        records = await asyncio.gather(
            *(runtime.load(LoadRequest(model=DEFAULT_CHAT_MODEL)) for _ in range(50))
        )
    finally:
        del runtime._place_and_load
    assert calls == 1
    assert {r.state for r in records} == {ModelState.READY}
    again = await runtime.load(LoadRequest(model="smollm2"))  # alias, already loaded: no new load
    assert again.state is ModelState.READY and calls == 1
    status = runtime.status()
    (model,) = [m for m in status.models if m.id == DEFAULT_CHAT_MODEL]
    assert model.devices == ["cpu-0"] and model.memory_bytes > 500 * 2**20
    assert status.devices[0].memory_used >= model.memory_bytes


async def test_generation_streams_and_counts_tokens(runtime: NeuronRuntime) -> None:
    served = runtime.served(DEFAULT_CHAT_MODEL)
    prompt = served.render_chat([{"role": "user", "content": "Say hello."}], None)
    events = [e async for e in served.generate(prompt, SamplingParams(max_tokens=8, temperature=0))]
    final = events[-1]
    assert isinstance(final, Finished) and final.reason in ("stop", "length")
    assert final.prompt_tokens == len(prompt) and 0 < final.completion_tokens <= 8
    assert all(isinstance(e, TextDelta) for e in events[:-1])


async def test_unload_refuses_busy_model_unless_forced(runtime: NeuronRuntime) -> None:
    served = runtime.served(DEFAULT_CHAT_MODEL)
    prompt = served.render_chat([{"role": "user", "content": "Count to one hundred."}], None)
    stream = served.generate(prompt, SamplingParams(max_tokens=200, temperature=0))
    await anext(stream)
    # The engine's picture is replaced after each step: the one that emitted this token soon.
    deadline = time.monotonic() + 10
    while (record := runtime.replicas[DEFAULT_CHAT_MODEL].record()).batch_size != 1:
        assert time.monotonic() < deadline, record
        await asyncio.sleep(0.01)
    assert record.in_flight == 1 and record.kv_waiting == 0
    with pytest.raises(ModelBusy):
        await runtime.unload(DEFAULT_CHAT_MODEL)
    await runtime.unload(DEFAULT_CHAT_MODEL, force=True)
    remaining = [e async for e in stream]
    assert isinstance(remaining[-1], Finished) and remaining[-1].reason == "cancelled"
    assert DEFAULT_CHAT_MODEL not in {m.id for m in runtime.status().models}
    assert runtime.status().devices[0].memory_used == 0


async def test_progress_is_visible_while_loading(runtime: NeuronRuntime) -> None:
    record = await runtime.load(LoadRequest(model=DEFAULT_CHAT_MODEL, wait=False))
    assert record.state is ModelState.LOADING
    seen = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        (model,) = [m for m in runtime.status().models if m.id == DEFAULT_CHAT_MODEL]
        seen.add(model.state)
        if model.state is not ModelState.LOADING:
            break
        await asyncio.sleep(0.01)
    assert ModelState.LOADING in seen and model.state is ModelState.READY and model.progress == 1.0


async def test_embeddings_put_similar_sentences_closer(runtime: NeuronRuntime) -> None:
    await runtime.load(LoadRequest(model=DEFAULT_EMBEDDING_MODEL))
    served = runtime.served("all-MiniLM-L6-v2")
    vectors, tokens = await served.embed(
        [
            "A cat sits on the mat.",
            "A kitten is sitting on a rug.",
            "Quarterly tax filing deadlines.",
        ]
    )
    assert len(vectors) == 3 and len(vectors[0]) == 384 and tokens > 10
    dot = [sum(a * b for a, b in zip(vectors[0], v, strict=True)) for v in vectors]
    assert dot[1] > dot[2] + 0.2


async def test_failed_loads_leave_nothing_behind(runtime: NeuronRuntime, tmp_path: Path) -> None:
    before = runtime.status()
    with pytest.raises(ModelNotFound):
        await runtime.load(LoadRequest(model="ghost", source=f"file:{tmp_path}/missing.gguf"))
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x00" * 64)
    with pytest.raises(ModelLoadFailed):
        await runtime.load(LoadRequest(model="corrupt", source=f"file:{corrupt}"))
    with pytest.raises(ModelNotFound):
        await runtime.load(LoadRequest(model="never-heard-of-it"))
    after = runtime.status()
    assert after.devices[0].memory_used == before.devices[0].memory_used
    # Ad-hoc sources that failed were never models of this neuron: not in /status, /models or
    # the metrics' labels.
    assert {m.id for m in after.models} == {m.id for m in before.models}
    listing = runtime.listing()
    assert not {"ghost", "corrupt"} & {m.id for m in [*listing.loaded, *listing.available]}
    exposition = NeuronMetrics(runtime.status).exposition().decode()
    assert "ghost" not in exposition and "corrupt" not in exposition


async def test_a_failed_catalogue_model_stays_listed_with_why(tmp_path: Path) -> None:
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x00" * 64)
    config = NeuronConfig.model_validate(
        {
            "neuron": {"name": "t", "cache_dir": str(tmp_path)},
            "models": [{"id": "broken", "source": f"file:{corrupt}"}],
        }
    )
    broken = NeuronRuntime(config, catalogue=[])
    await broken.start()
    try:
        with pytest.raises(ModelLoadFailed):
            await broken.load(LoadRequest(model="broken"))
        [model] = broken.status().models
        assert model.id == "broken" and model.state is ModelState.FAILED
        assert model.error and "broken.gguf" in model.error
    finally:
        await broken.stop()


async def test_model_too_large_is_refused_before_loading(model_cache: Path) -> None:
    config = NeuronConfig.model_validate(
        {"neuron": {"cache_dir": str(model_cache), "cpu_memory": "100MiB"}}
    )
    small = NeuronRuntime(config)
    await small.start()
    try:
        with pytest.raises(CapacityExhausted, match="needs"):
            await small.load(LoadRequest(model=DEFAULT_CHAT_MODEL))
        assert small.status().devices[0].memory_used == 0
    finally:
        await small.stop()


async def test_a_catalogue_model_refused_for_room_leaves_no_failed_record(tmp_path: Path) -> None:
    # A gateway reads a failed record as a failure of the model on this neuron, for good; a full
    # neuron is no such failure (docs/fleet-control.md).
    tiny = make_tiny_llama(tmp_path / "tiny")
    config = NeuronConfig.model_validate(
        {
            "neuron": {"name": "t", "cache_dir": str(tmp_path), "cpu_memory": "1MiB"},
            "models": [{"id": "tiny", "source": f"file:{tiny}"}],
        }
    )
    full = NeuronRuntime(config, catalogue=[])
    await full.start()
    try:
        with pytest.raises(CapacityExhausted, match="needs"):
            await full.load(LoadRequest(model="tiny"))
        assert full.status().models == []
    finally:
        await full.stop()


@asynccontextmanager
async def client_of_neuron(tmp_path: Path, tiny: Path, memory: str) -> AsyncIterator[NeuronClient]:
    """A NeuronClient over the real server and runtime, with `memory` of CPU and `tiny` listed."""
    config = NeuronConfig.model_validate(
        {
            "neuron": {"name": "t", "cache_dir": str(tmp_path), "cpu_memory": memory},
            "models": [{"id": "tiny", "source": f"file:{tiny}"}],
        }
    )
    runtime = NeuronRuntime(config, catalogue=[])
    await runtime.start()
    app = create_neuron_app(runtime)
    client = NeuronClient("http://neuron", transport=httpx.ASGITransport(app=app))
    try:
        yield client
    finally:
        await client.aclose()
        await runtime.stop()


async def test_a_refusal_for_room_says_what_the_model_needs_on_the_wire(tmp_path: Path) -> None:
    # The estimate the neuron refuses with (from the weights' files) reaches a NeuronClient as a
    # number, not text, and is a lower bound of what the model takes once ready: a gateway that
    # sent the load on a guess plans again with it (docs/architecture.md).
    tiny = make_tiny_llama(tmp_path / "tiny")
    async with client_of_neuron(tmp_path, tiny, "1MiB") as full:
        with pytest.raises(CapacityExhausted) as refused:
            await full.load(LoadRequest(model="tiny"))
    memory = refused.value.memory
    assert memory is not None and memory.free == 2**20
    assert f"needs {memory.needed / 2**20:.0f} MiB" in refused.value.message
    async with client_of_neuron(tmp_path, tiny, "1GiB") as roomy:
        loaded = await roomy.load(LoadRequest(model="tiny"))
    assert 2**20 < memory.needed <= loaded.memory_bytes
