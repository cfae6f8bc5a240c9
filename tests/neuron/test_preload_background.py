"""Preloads run beside serving (docs/kubernetes.md): a neuron whose first download or conversion
outlasts the startup probe still answers /health, and a failed preload is a failed model in
/status, not a neuron that never starts. The loader is held or broken by a fault-injected wrapper."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import serve
from tiny_models import make_tiny_llama

from cortex.core.config import NeuronConfig
from cortex.neuron import loader
from cortex.neuron.runtime import NeuronRuntime
from cortex.neuron.server import create_app


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _runtime(tiny: Path, cache: Path) -> NeuronRuntime:
    section = {"name": "p", "cache_dir": str(cache), "preload": ["tiny"], "devices": ["cpu-0"]}
    models = [{"id": "tiny", "source": f"file:{tiny}"}]
    return NeuronRuntime(NeuronConfig.model_validate({"neuron": section, "models": models}))


def _model(url: str) -> dict[str, Any]:
    (model,) = httpx.get(f"{url}/status").json()["models"]
    return dict(model)


def _until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.05)


def broken(*args: Any, **kwargs: Any) -> Any:
    raise OSError("disk on fire")


@pytest.fixture
def held_loader(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """load_weights waits for the event (on the device worker's thread) before it reads anything."""
    release, real = threading.Event(), loader.load_weights

    def slow(*args: Any, **kwargs: Any) -> Any:
        release.wait(120)
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "load_weights", slow)
    try:
        yield release
    finally:
        release.set()  # never leave a worker thread (or, on the old code, app startup) stuck


def test_a_slow_preload_leaves_the_neuron_healthy_while_it_loads(
    tiny: Path, tmp_path: Path, held_loader: threading.Event
) -> None:
    with serve(create_app(_runtime(tiny, tmp_path)), start_timeout=30) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        assert _model(url)["state"] == "loading"
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        assert httpx.post(f"{url}/v1/chat/completions", json=chat).status_code == 503
        held_loader.set()
        _until(lambda: _model(url)["state"] == "ready", "the preload finishing")
        assert httpx.post(f"{url}/v1/chat/completions", json=chat).status_code == 200


def test_a_failed_preload_is_a_failed_model_not_a_dead_neuron(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader, "load_weights", broken)
    with serve(create_app(_runtime(tiny, tmp_path)), start_timeout=30) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        _until(lambda: _model(url)["state"] == "failed", "the preload failing")
        assert "disk on fire" in _model(url)["error"]


async def test_cortex_up_waits_for_its_preloads_and_hears_a_failure(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cortex up` prints its banner after runtime.preloaded(): the model answers by then."""
    runtime = _runtime(tiny, tmp_path)
    await runtime.start()
    try:
        await runtime.preloaded()
        assert [m.state.value for m in runtime.status().models] == ["ready"]
    finally:
        await runtime.stop()

    monkeypatch.setattr(loader, "load_weights", broken)
    runtime = _runtime(tiny, tmp_path / "again")
    await runtime.start()
    try:
        with pytest.raises(OSError, match="disk on fire"):
            await runtime.preloaded()
    finally:
        await runtime.stop()
